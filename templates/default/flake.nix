{
  description = "A NixOS test, with nixos-repl's REPL, notebook and --batch replay over its machines";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Where nixos-repl lives: a checkout (git+file:///path/to/nixos-repl) or its repository.
    nixos-repl.url = "git+file:///path/to/nixos-repl";
    nixos-repl.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs =
    {
      self,
      nixpkgs,
      nixos-repl,
    }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      test = pkgs.testers.runNixOSTest ./test.nix;
    in
    {
      checks.${system} = {
        # The test as nixpkgs runs it, and the same script replayed by `nixos-repl --batch`
        # (both need a builder with KVM).
        inherit test;
        batch = nixos-repl.lib.batch { inherit test; };
      };

      packages.${system} = {
        repl = nixos-repl.lib.replPackage { inherit test; };
        notebook = nixos-repl.lib.notebookPackage { inherit test; };
      };

      # nix run .#repl       the terminal REPL on the test's machines
      # nix run .#notebook   JupyterLab on them; open notebooks/test.ipynb
      apps.${system} = {
        repl = nixos-repl.lib.repl { inherit test; };
        notebook = nixos-repl.lib.notebook { inherit test; };
        default = self.apps.${system}.repl;
      };
    };
}
