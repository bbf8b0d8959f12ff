{
  description = "nixos-repl: an interactive environment for NixOS VM tests (REPL, Jupyter kernel, --batch)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # nixos-repl built against any package set (nixpkgs' own, a test's hostPkgs, an overlay's).
      jupyterKernelTestFor = pkgs: pkgs.python3Packages.callPackage ./nix/jupyter-kernel-test.nix { };
      packageFor =
        pkgs:
        pkgs.callPackage ./nix/package.nix {
          jupyter-kernel-test = jupyterKernelTestFor pkgs;
        };

      testLib = import ./nix/lib.nix { inherit lib packageFor; };
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixos-repl = packageFor pkgs;
        default = nixos-repl;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          meta.description = "The nixos-repl REPL (machine options as nixos-test-driver's)";
        };
      });

      devShells = forAllSystems (
        pkgs:
        let
          nixos-repl = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          default = pkgs.mkShell {
            packages = [
              nixos-repl.devPython # Python with nixos-repl, its notebook and dev extras
              pkgs.ruff
              pkgs.mypy
              pkgs.tmux
              pkgs.shellcheck # tests lint the shell channel's guest-side bash
            ]
            ++ nixos-repl.runtimeTools;
          };
        }
      );

      # `nixos-test-driver` replaced by nixos-repl: every NixOS test built from these packages runs
      # its script through nixos-repl, and `driverInteractive` opens the nixos-repl REPL. The
      # defaults are nixpkgs' (qemu_test, no OCR); the test framework's `.override { enableOCR;
      # extraPythonPackages; enableNspawn; qemu_pkg; }` works as on the stock driver.
      overlays.default = final: prev: {
        nixos-repl = prev.callPackage ./nix/package.nix {
          jupyter-kernel-test = jupyterKernelTestFor prev;
        };
        nixos-test-driver = prev.callPackage ./nix/package.nix {
          qemu_pkg = final.qemu_test;
          enableOCR = false;
          withNotebook = false;
        };
      };

      # Over an existing test: `nixos-repl.lib.repl { test = self.checks.x86_64-linux.my-test; }`
      # is an app; `notebook` the same with JupyterLab; `batch` a derivation that replays the
      # test's script through `nixos-repl --batch`.
      lib = {
        inherit (testLib)
          repl
          notebook
          replPackage
          notebookPackage
          batch
          driverConfiguration
          ;
      };

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          nixos-repl = self.packages.${system}.default;
          # A NixOS test whose driver is nixos-repl (through the overlay).
          example = (pkgs.extend self.overlays.default).testers.runNixOSTest ./nix/example-test.nix;
        in
        {
          package = nixos-repl;

          # The suite's fast lane: everything that needs no guest.
          tests =
            pkgs.runCommand "nixos-repl-tests"
              {
                nativeBuildInputs = [
                  nixos-repl.devPython
                  pkgs.tmux
                  pkgs.shellcheck
                  pkgs.nix # tests/test_nix.py evaluates this flake against the stub nixpkgs
                ]
                ++ nixos-repl.runtimeTools;
              }
              ''
                cp -r ${self} src && chmod -R u+w src && cd src
                export HOME=$TMPDIR
                ruff check .
                mypy --strict nixos_repl test_driver tests bench
                pytest -q -p no:cacheprovider -m "not vm"
                touch $out
              '';

          # Needs a builder with KVM (requiredSystemFeatures nixos-test, kvm).
          vm-test-driver = example;
          vm-batch = testLib.batch { test = example; };
        }
      );

      templates.default = {
        path = ./templates/default;
        description = "A flake with one NixOS test, a notebook for it, and nixos-repl's apps";
        welcomeText = ''
          nix run .#repl       # the REPL on the test's machines
          nix run .#notebook   # JupyterLab on them (open notebooks/test.ipynb)
          nix build .#checks.x86_64-linux.batch   # the test replayed by nixos-repl --batch
        '';
      };
    };
}
