# A stand-in for the nixpkgs flake input: the few attributes flake.nix, nix/*.nix and the template
# use, under their real nixpkgs names, with fakes that record their arguments. Evaluating the
# flake against it (tests/test_nix.py) catches a typo, a wrong attribute name, a missing argument
# or a path that does not exist, without a Nix store. A name missing here fails the evaluation:
# add it only after checking nixpkgs has it.
let
  inherit (builtins)
    all
    attrNames
    concatStringsSep
    elem
    foldl'
    functionArgs
    hashString
    intersectAttrs
    isAttrs
    isFunction
    isPath
    listToAttrs
    pathExists
    replaceStrings
    substring
    ;

  fix = f: let x = f x; in x;

  fakeDrv =
    name: attrs:
    attrs
    // {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/${substring 0 32 (hashString "sha256" name)}-${name}";
      drvPath = "/nix/store/${substring 0 32 (hashString "sha1" name)}-${name}.drv";
      outputs = [ "out" ];
    };

  lib = rec {
    inherit (builtins)
      attrNames
      attrValues
      concatMap
      concatStringsSep
      elem
      mapAttrs
      ;
    genAttrs =
      names: f:
      listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    concatMapStrings = f: list: concatStringsSep "" (map f list);
    makeSearchPath = sub: drvs: concatStringsSep ":" (map (d: "${d}/${sub}") drvs);
    makeBinPath = makeSearchPath "bin";
    getExe = drv: "${drv}/bin/${drv.meta.mainProgram or drv.pname or drv.name}";
    escapeShellArg = arg: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    fileset = {
      unions =
        paths:
        assert all (p: isPath p && pathExists p || throw "lib.fileset.unions: ${toString p} does not exist") paths;
        paths;
      toSource =
        { root, fileset }:
        assert pathExists root;
        fakeDrv "source" { files = map toString fileset; };
    };
    licenses.mit = {
      spdxId = "MIT";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    makeOverridable =
      f: args:
      let
        result = f args;
        override =
          newArgs: makeOverridable f (args // (if isFunction newArgs then newArgs args else newArgs));
      in
      if isAttrs result then result // { inherit override; } else result;
    callPackageWith =
      scope: fn: args:
      let
        f = if isFunction fn then fn else import fn;
      in
      makeOverridable f (intersectAttrs (functionArgs f) scope // args);
  };

  tool = name: fakeDrv name {
    pname = name;
    meta.mainProgram = name;
  };

  pythonNames = [
    "setuptools"
    "hatchling"
    "ipython"
    "ipykernel"
    "ptpython"
    "qemu-qmp"
    "pillow"
    "junitparser"
    "textual-image"
    "rich"
    "jupyter-client"
    "jupyter-console"
    "jupyterlab"
    "pytest"
    "pytest-timeout"
    "mypy"
    "ruff"
    "nbclient"
    "nbformat"
    "selenium"
    "jsonschema"
    "numpy"
  ];

  # What buildPythonPackage and buildPythonApplication check and record (not a nixpkgs name: it
  # stays out of the package set).
  buildPython =
    py: namePrefix: args:
    assert args.pyproject or false || throw "buildPythonPackage: pyproject = true is expected";
    assert args ? src || throw "buildPythonPackage: no src";
    assert args.build-system or [ ] != [ ] || throw "buildPythonPackage: no build-system";
    fakeDrv "${namePrefix}${args.pname}-${args.version}" (
      removeAttrs args [ "passthru" ]
      // args.passthru or { }
      // {
        pythonModule = py.python;
        requiredPythonModules = args.dependencies or [ ];
      }
    );

  pythonPackagesFor =
    pkgs:
    fix (
      py:
      {
        python = fakeDrv "python3-3.13" {
          pname = "python3";
          sitePackages = "lib/python3.13/site-packages";
          interpreter = "/nix/store/00000000000000000000000000000000-python3-3.13/bin/python3.13";
          withPackages = f: fakeDrv "python3-3.13-env" { packages = f py; };
          pkgs = py;
        };
        callPackage = lib.callPackageWith (pkgs // py);
        fetchPypi =
          {
            pname,
            version,
            hash,
          }:
          fakeDrv "${pname}-${version}.tar.gz" { inherit hash; };
        makePythonPath = lib.makeSearchPath py.python.sitePackages;
        buildPythonPackage = buildPython py "python3.13-";
        # Applications have no interpreter prefix in their name.
        buildPythonApplication = args: buildPython py "" args // { isPythonApplication = true; };
        toPythonModule = drv: drv // { isPythonModule = true; };
      }
      // lib.genAttrs pythonNames (
        n:
        fakeDrv "python3.13-${n}" {
          pname = n;
        }
      )
    );

  # nixpkgs' testers.runNixOSTest, as far as nixos-repl's functions look into its result: the
  # test's config (nodes, driverConfiguration, interactive, hostPkgs) and its drivers, built with
  # the `.override` call of nixos/lib/testing/driver.nix.
  runNixOSTest =
    pkgs: module:
    let
      m = if isPath module then import module else module;
      configFor =
        qemu:
        fix (config: {
          inherit (m) name;
          hostPkgs = pkgs;
          globalTimeout = m.globalTimeout or 3600;
          testScriptString = m.testScript;
          qemu.package = qemu;
          nodes = lib.mapAttrs (name: _: {
            system.name = name;
            system.build.vm = fakeDrv "nixos-vm-${qemu.name}" {
              meta.mainProgram = "run-${name}-vm";
              inherit qemu;
            };
            virtualisation.vlans = [ 1 ];
          }) m.nodes;
          driverConfiguration = {
            vms = lib.mapAttrs (name: node: {
              inherit name;
              start_script = lib.getExe node.system.build.vm;
            }) config.nodes;
            containers = { };
            vlans = [ 1 ];
            global_timeout = config.globalTimeout;
            enable_ssh_backdoor = false;
            test_script = pkgs.writeText "test-script" config.testScriptString;
          };
          driverConfigurationFile = pkgs.writeText "driverConfiguration.json" (
            builtins.toJSON config.driverConfiguration
          );
          pythonTestDriverPackage = pkgs.nixos-test-driver;
          driver = fakeDrv "nixos-test-driver-${m.name}" {
            testDriver = config.pythonTestDriverPackage.override {
              enableOCR = m.enableOCR or false;
              extraPythonPackages = m.extraPythonPackages or (_: [ ]);
              qemu_pkg = config.qemu.package;
              enableNspawn = false;
            };
          };
        });
      config = configFor pkgs.qemu_test // {
        interactive = configFor pkgs.qemu;
      };
    in
    fakeDrv "vm-test-run-${m.name}" {
      inherit config;
      inherit (config) nodes driver;
      driverInteractive = config.interactive.driver;
      requiredSystemFeatures = [
        "nixos-test"
        "kvm"
      ];
    };

  pkgsFor =
    system: overlays:
    let
      base = final: {
        inherit lib system;
        stdenv.hostPlatform.system = system;
        callPackage = lib.callPackageWith final;
        python3 = final.python3Packages.python;
        python3Packages = pythonPackagesFor final;
        makeWrapper = fakeDrv "make-shell-wrapper-hook" { };
        qemu = tool "qemu";
        qemu_test = tool "qemu-test";
        vde2 = tool "vde2";
        tesseract = tool "tesseract";
        tmux = tool "tmux";
        shellcheck = tool "shellcheck";
        ruff = tool "ruff";
        mypy = tool "mypy";
        nix = tool "nix";
        # nixpkgs' own driver, so an overlay can see what it replaces.
        nixos-test-driver = lib.makeOverridable (
          args: fakeDrv "nixos-test-driver-1.1" (args // { pname = "nixos-test-driver"; })
        ) { };
        mkShell = args: fakeDrv "nix-shell" args;
        # Named by content too, so two files of the same name differ.
        writeText = name: text: fakeDrv "${substring 0 8 (hashString "sha256" text)}-${name}" {
          inherit text;
        };
        writeShellApplication =
          {
            name,
            text,
            runtimeInputs ? [ ],
            meta ? { },
          }:
          fakeDrv name {
            inherit text runtimeInputs;
            meta = meta // {
              mainProgram = name;
            };
          };
        runCommand = name: env: buildCommand: fakeDrv name (env // { inherit buildCommand; });
        testers.runNixOSTest = runNixOSTest final;
        extend = overlay: pkgsFor system (overlays ++ [ overlay ]);
      };
    in
    fix (final: foldl' (prev: overlay: prev // overlay final prev) (base final) overlays);
in
{
  inherit lib;
  legacyPackages = lib.genAttrs [
    "x86_64-linux"
    "aarch64-linux"
    "x86_64-darwin"
    "aarch64-darwin"
  ] (system: pkgsFor system [ ]);
  outPath = "/nix/store/00000000000000000000000000000000-source";
}
