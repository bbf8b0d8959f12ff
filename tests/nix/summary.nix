# What tests/test_nix.py checks: the flake's outputs (and the template's), evaluated against the
# stub nixpkgs, boiled down to JSON. `root` is the repository.
{ root }:
let
  flake = import (root + "/flake.nix");
  nixpkgs = import ./stub-nixpkgs.nix;
  self = flake.outputs { inherit self nixpkgs; } // {
    outPath = toString root;
  };
  inherit (nixpkgs) lib;
  names = map (d: d.pname);
  system = "x86_64-linux";
  pkgs = nixpkgs.legacyPackages.${system};
  pkg = self.packages.${system}.default;

  withOverlay = pkgs.extend self.overlays.default;
  driver = withOverlay.nixos-test-driver;
  # What nixos/lib/testing/driver.nix does with the driver package of a test that uses OCR.
  driverOCR = driver.override {
    enableOCR = true;
    extraPythonPackages = p: [ p.numpy ];
    qemu_pkg = withOverlay.qemu;
    enableNspawn = true;
  };
  example = withOverlay.testers.runNixOSTest (root + "/nix/example-test.nix");
  # A test of a nixpkgs without driverConfiguration: nodes only.
  legacyTest = {
    name = "legacy";
    nodes = {
      alpha = {
        system.name = "alpha";
        system.build.vm = pkgs.writeText "alpha-vm" "";
        virtualisation.vlans = [ 2 ];
      };
      beta = {
        system.name = "beta";
        system.build.vm = pkgs.writeText "beta-vm" "";
        virtualisation.vlans = [
          1
          2
        ];
      };
    };
    config = {
      name = "legacy";
      hostPkgs = pkgs;
      testScriptString = "start_all()";
    };
  };

  launcher = p: {
    inherit (p) name text;
    runtimeInputs = names p.runtimeInputs;
  };
  app = a: {
    inherit (a) type program;
    description = a.meta.description;
  };

  template = import (root + "/templates/default/flake.nix");
  templateSelf = template.outputs {
    self = templateSelf;
    inherit nixpkgs;
    nixos-repl = self;
  };
in
{
  inputs = lib.attrNames flake.inputs;
  systems = {
    packages = lib.attrNames self.packages;
    apps = lib.attrNames self.apps;
    devShells = lib.attrNames self.devShells;
    checks = lib.attrNames self.checks;
  };
  package = {
    inherit (pkg)
      pname
      version
      pyproject
      makeWrapperArgs
      postInstall
      pythonImportsCheck
      ;
    isApplication = pkg.isPythonApplication;
    mainProgram = pkg.meta.mainProgram;
    build-system = names pkg.build-system;
    dependencies = names pkg.dependencies;
    notebook = names pkg.optional-dependencies.notebook;
    dev = names pkg.optional-dependencies.dev;
    runtimeTools = names pkg.runtimeTools;
    src = pkg.src.files;
  };
  app = app self.apps.${system}.default;
  devShell = map (p: p.pname or p.name) self.devShells.${system}.default.packages;
  overlay = {
    nixos-repl = withOverlay.nixos-repl.pname;
    driver = {
      inherit (driver) pname enableOCR;
      runtimeTools = names driver.runtimeTools;
      dependencies = names driver.dependencies;
    };
    driverOCR = {
      inherit (driverOCR) enableOCR enableNspawn;
      runtimeTools = names driverOCR.runtimeTools;
      dependencies = names driverOCR.dependencies;
    };
    exampleDriver = example.driver.testDriver.pname;
    exampleInteractiveDriver = names example.driverInteractive.testDriver.runtimeTools;
  };
  lib = {
    repl = app (self.lib.repl { test = example; });
    replPackage = launcher (self.lib.replPackage { test = example; });
    notebookPackage = launcher (self.lib.notebookPackage { test = example; });
    interactiveConfig = example.config.interactive.driverConfigurationFile.text;
    legacyRepl = launcher (self.lib.replPackage { test = legacyTest; });
    legacyConfig = (self.lib.driverConfiguration { test = legacyTest; }).text;
    legacyConfigPath = toString (self.lib.driverConfiguration { test = legacyTest; });
    batch = {
      inherit (self.lib.batch { test = example; }) name buildCommand requiredSystemFeatures;
      nativeBuildInputs = names (self.lib.batch { test = example; }).nativeBuildInputs;
    };
    testScript = example.config.driverConfiguration.test_script.text;
    batchScript = (self.lib.batch { test = example; script = root + "/nix/example-test.nix"; }).buildCommand;
  };
  checks = lib.mapAttrs (_: c: {
    inherit (c) name;
    nativeBuildInputs = map (p: p.pname or p.name) (c.nativeBuildInputs or [ ]);
    requiredSystemFeatures = c.requiredSystemFeatures or [ ];
    buildCommand = c.buildCommand or "";
  }) self.checks.${system};
  exampleNodes = lib.attrNames example.nodes;
  template = {
    path = toString self.templates.default.path;
    description = self.templates.default.description;
    inputs = lib.attrNames template.inputs;
    apps = lib.mapAttrs (_: app) templateSelf.apps.${system};
    checks = lib.attrNames templateSelf.checks.${system};
    nodes = lib.attrNames templateSelf.checks.${system}.test.nodes;
    batchFeatures = templateSelf.checks.${system}.batch.requiredSystemFeatures;
    repl = launcher templateSelf.packages.${system}.repl;
  };
}
