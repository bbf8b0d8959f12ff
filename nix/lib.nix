# nixos-repl over an existing NixOS test (the result of `pkgs.testers.runNixOSTest { ... }` or
# `pkgs.nixosTest`): the machines are the test's own, from its driverConfiguration when the
# nixpkgs revision has one, else from `nodes.<name>.system.build.vm`.
#
# `packageFor pkgs` is nixos-repl built against a package set (the flake passes its own
# package.nix through callPackage).
{ lib, packageFor }:
let
  # The package set the test was built with (its `hostPkgs`), unless the caller gives one.
  pkgsOf =
    test: pkgs:
    if pkgs != null then
      pkgs
    else if test ? config && test.config ? hostPkgs then
      test.config.hostPkgs
    else
      throw "nixos-repl: this test has no config.hostPkgs (an old nixpkgs?); pass pkgs as well: { test; pkgs; }";

  # The configuration `driverInteractive` uses (interactive.* applied, full QEMU), or the
  # test's own for batch runs.
  configOf =
    interactive: test:
    let
      config = test.config or { };
    in
    if interactive && config ? interactive then config.interactive else config;

  nodesOf = test: config: config.nodes or test.nodes or (throw "nixos-repl: the test has no nodes");

  # nixpkgs' driverConfiguration.json, or the same file written from the nodes.
  configFile =
    pkgs: test: config:
    if config ? driverConfigurationFile then
      config.driverConfigurationFile
    else
      let
        nodes = nodesOf test config;
        vm = name: node: {
          inherit name;
          start_script = "${node.system.build.vm}/bin/run-${node.system.name}-vm";
        };
        vlans = node: node.virtualisation.vlans or [ ];
      in
      pkgs.writeText "driverConfiguration.json" (
        builtins.toJSON {
          vms = lib.mapAttrs vm nodes;
          containers = { };
          vlans = lib.unique (lib.concatMap vlans (lib.attrValues nodes));
          global_timeout = config.globalTimeout or 3600;
          enable_ssh_backdoor = false;
          test_script = testScriptFile pkgs test config;
        }
      );

  testScriptFile =
    pkgs: test: config:
    if config ? driverConfiguration then
      config.driverConfiguration.test_script
    else if config ? testScriptString then
      pkgs.writeText "test-script" config.testScriptString
    else if test ? driver then
      "${test.driver}/test-script"
    else
      throw "nixos-repl: cannot find the test script; pass script = <a path to it>";

  testName = test: config: config.name or test.name or "test";

  # A command on the test's machines: `nixos-repl [ARGS...] --config <file> "$@"`.
  launcher =
    {
      kind,
      args,
      test,
      pkgs ? null,
    }:
    let
      hostPkgs = pkgsOf test pkgs;
      config = configOf true test;
      name = "nixos-repl-${kind}-${testName test config}";
    in
    hostPkgs.writeShellApplication {
      inherit name;
      runtimeInputs = [ (packageFor hostPkgs) ];
      text = ''
        exec nixos-repl ${lib.concatMapStrings (arg: "${lib.escapeShellArg arg} ") args}--config ${configFile hostPkgs test config} "$@"
      '';
      meta.description = "nixos-repl ${kind} on the machines of the NixOS test ${testName test config}";
    };

  app = drv: {
    type = "app";
    program = "${drv}/bin/${drv.name}";
    inherit (drv) meta;
  };
in
rec {
  # The test's driverConfiguration.json (what nixos-repl --config and nixos-test-driver --config
  # read): the machines of `driverInteractive` unless interactive = false.
  driverConfiguration =
    {
      test,
      pkgs ? null,
      interactive ? true,
    }:
    configFile (pkgsOf test pkgs) test (configOf interactive test);

  # The terminal REPL on the test's machines (a package; `repl` is the app).
  replPackage =
    { test, pkgs ? null }:
    launcher {
      kind = "repl";
      args = [ ];
      inherit test pkgs;
    };

  # JupyterLab whose nixos-repl kernels get the test's machines (a package; `notebook` is the app).
  notebookPackage =
    { test, pkgs ? null }:
    launcher {
      kind = "notebook";
      args = [ "notebook" ];
      inherit test pkgs;
    };

  repl = args: app (replPackage args);
  notebook = args: app (notebookPackage args);

  # A derivation that replays a test script through `nixos-repl --batch` on the test's machines
  # (the test's own script unless `script` is given): $out holds the JUnit XML, screenshots and
  # copied files. Needs a builder with KVM, like every NixOS test.
  batch =
    {
      test,
      script ? null,
      pkgs ? null,
    }:
    let
      hostPkgs = pkgsOf test pkgs;
      config = configOf false test;
      scriptFile = if script != null then script else testScriptFile hostPkgs test config;
    in
    hostPkgs.runCommand "nixos-repl-batch-${testName test config}"
      {
        nativeBuildInputs = [ (packageFor hostPkgs) ];
        requiredSystemFeatures = [
          "nixos-test"
          "kvm"
        ];
      }
      ''
        mkdir -p $out
        export HOME=$TMPDIR LOGFILE=/dev/null
        nixos-repl --batch ${scriptFile} --config ${configFile hostPkgs test config} \
          -o $out --junit-xml junit.xml
      '';
}
