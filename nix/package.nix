# nixos-repl as a Nix package: the Python package built from pyproject.toml, its three console
# scripts wrapped with the runtime tools on PATH, the Jupyter kernelspec in
# share/jupyter/kernels/nixos-repl.
#
# The arguments after `src` are the ones nixpkgs' test framework passes to
# `nixos-test-driver.override` (nixos/lib/testing/driver.nix), so the overlay can install this
# package as `nixos-test-driver`:
#   enableOCR            tesseract on PATH (wait_for_text, get_screen_text)
#   extraPythonPackages  p: [ ... ] Python packages the test script imports
#   enableNspawn         accepted; containers run when the driver is root with systemd-nspawn
#   qemu_pkg             the QEMU on PATH
{
  lib,
  python3Packages,
  makeWrapper,
  qemu,
  qemu_pkg ? qemu,
  vde2,
  tesseract,
  enableOCR ? true,
  enableNspawn ? false,
  extraPythonPackages ? (_: [ ]),
  withNotebook ? true,
  jupyter-kernel-test ? null,
}:
let
  py = python3Packages;
  project = (lib.importTOML ../pyproject.toml).project;

  # One Nix name per entry of pyproject.toml's `dependencies` (tests/test_nix.py checks the two
  # lists match).
  dependencies = [
    py.ipython
    py.ipykernel
    py.ptpython
    py.qemu-qmp
    py.pillow
    py.junitparser
    py.textual-image
    py.rich
    py.jupyter-client
    py.jupyter-console
  ];
  notebook = [ py.jupyterlab ];
  dev = [
    py.pytest
    py.pytest-timeout
    py.mypy
    py.ruff
    py.jupyterlab
    py.nbclient
    py.nbformat
    py.selenium
    py.setuptools
  ]
  ++ lib.optional (jupyter-kernel-test != null) jupyter-kernel-test;

  pythonDeps = dependencies ++ lib.optionals withNotebook notebook ++ extraPythonPackages py;
  runtimeTools = [
    qemu_pkg
    vde2
  ]
  ++ lib.optional enableOCR tesseract;
  sitePackages = "${placeholder "out"}/${py.python.sitePackages}";
  wrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath runtimeTools)
    "--prefix"
    "PYTHONPATH"
    ":"
    "${sitePackages}:${py.makePythonPath pythonDeps}"
  ];

  package = py.buildPythonApplication {
    pname = project.name;
    inherit (project) version;
    pyproject = true;
    src = lib.fileset.toSource {
      root = ../.;
      fileset = lib.fileset.unions [
        ../pyproject.toml
        ../README.md
        ../nixos_repl
        ../test_driver
        ../kernel
      ];
    };
    build-system = [ py.setuptools ];
    nativeBuildInputs = [ makeWrapper ];
    dependencies = pythonDeps;
    optional-dependencies = { inherit notebook dev; };

    # The REPL and `nixos-repl notebook` start Python children (the Jupyter server, kernels)
    # with sys.executable: they get the same modules through PYTHONPATH, and the tools on PATH.
    makeWrapperArgs = wrapperArgs;

    # The kernelspec pip installed from pyproject.toml's data-files names `python3`; point it at
    # a wrapper that has nixos-repl's modules and tools.
    postInstall = ''
      kernels=$out/share/jupyter/kernels/nixos-repl
      test -f $kernels/kernel.json
      makeWrapper ${py.python.interpreter} $out/libexec/nixos-repl/kernel \
        --add-flags "-m nixos_repl.interactive.kernel" \
        ${lib.escapeShellArgs wrapperArgs}
      cat > $kernels/kernel.json <<JSON
      {
        "argv": ["$out/libexec/nixos-repl/kernel", "-f", "{connection_file}"],
        "display_name": "nixos-repl",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": false}
      }
      JSON
    '';

    # The suite runs in the flake's checks (the part without VMs) and on Debian (all of it).
    doCheck = false;
    pythonImportsCheck = [
      "nixos_repl"
      "test_driver.driver"
      "test_driver.machine"
    ];

    passthru = {
      inherit enableOCR enableNspawn runtimeTools;
      # Python with nixos-repl as a module and its notebook and dev extras (the devShell, the
      # tests check).
      devPython = py.python.withPackages (_: [ (py.toPythonModule package) ] ++ notebook ++ dev);
    };

    meta = {
      description = project.description;
      license = lib.licenses.mit;
      mainProgram = "nixos-repl";
      platforms = lib.platforms.linux;
    };
  };
in
package
