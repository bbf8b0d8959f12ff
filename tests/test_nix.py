"""The flake, checked without a Nix store: every .nix file parses, every path it names exists, and
its outputs (package, apps, devShell, overlay, lib, checks, template) evaluate against a stub
nixpkgs (tests/nix/stub-nixpkgs.nix) into what pyproject.toml and the command line expect.

Debian's nix-bin runs unprivileged here: a dummy store, no daemon, HOME and the XDG dirs in a
temporary directory. What only a Nix machine can check (builds, the VM checks) is listed in the
README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import nbformat
import pytest

from nixos_repl.cli import _parser
from nixos_repl.config import load_driver_configuration

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "nix"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NIX_DIRS = ("nix", "templates", "tests/nix")


def nix_files(root: Path = ROOT) -> list[Path]:
    files = [root / "flake.nix"]
    for folder in NIX_DIRS:
        files += sorted((root / folder).rglob("*.nix"))
    return files


@pytest.fixture(scope="session")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which nix-instantiate touches nothing outside a temporary directory."""
    if shutil.which("nix-instantiate") is None:
        pytest.fail("nix-instantiate not found: install Debian's nix-bin (./dev.sh test does)")
    home = tmp_path_factory.mktemp("nix-home")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "NIX_CONFIG": "build-users-group =\n",
        "NIX_STATE_DIR": str(home / "state"),
        "NIX_LOG_DIR": str(home / "log"),
    }
    for xdg in ("CACHE", "CONFIG", "DATA", "STATE"):
        env[f"XDG_{xdg}_HOME"] = str(home / xdg.lower())
    return env


def instantiate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--store", "dummy://", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def summary_args(root: Path) -> list[str]:
    return ["--eval", "--strict", "--json", "--arg", "root", str(root), str(STUB / "summary.nix")]


def evaluate(env: dict[str, str], root: Path = ROOT) -> Any:
    """tests/nix/summary.nix over the flake in ``root``, as JSON."""
    result = instantiate(env, *summary_args(root))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def summary(nix_env: dict[str, str]) -> Any:
    return evaluate(nix_env)


def normalize(requirement: str) -> str:
    """A pyproject requirement's name as nixpkgs spells the attribute."""
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def command_after_exec(text: str, word: str = "nixos-repl") -> list[str]:
    """The argv of the line that runs ``word``, without a trailing "$@"."""
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        if word in argv:
            argv = argv[argv.index(word) + 1 :]
            return argv[:-1] if argv and argv[-1] == "$@" else argv
    raise AssertionError(f"no {word} command in {text!r}")


# -- parsing and paths -----------------------------------------------------------------------


def test_every_nix_file_parses(nix_env: dict[str, str], tmp_path: Path) -> None:
    files = nix_files()
    assert ROOT / "nix" / "package.nix" in files and ROOT / "templates/default/flake.nix" in files
    for path in files:
        result = instantiate(nix_env, "--parse", str(path))
        assert result.returncode == 0, f"{path}: {result.stderr}"
    broken = tmp_path / "broken.nix"
    broken.write_text("{ outputs = { self }: { packages = ; }; }\n")
    result = instantiate(nix_env, "--parse", str(broken))
    assert result.returncode != 0 and "syntax error" in result.stderr


PATH_LITERAL = re.compile(r"(?<![\w/$}])(\.\.?(?:/[\w.+-]+)+)")


def referenced_paths(path: Path) -> list[str]:
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    return PATH_LITERAL.findall(text)


def test_every_path_the_nix_files_name_exists() -> None:
    seen = 0
    for path in nix_files():
        for literal in referenced_paths(path):
            seen += 1
            assert (path.parent / literal).exists(), f"{path}: {literal} does not exist"
    assert seen >= 10  # the pattern finds them (./nix/package.nix, ../pyproject.toml, ...)
    assert referenced_paths(ROOT / "flake.nix").count("./nix/package.nix") >= 2


# -- the flake's outputs -------------------------------------------------------------------------


def test_one_input_and_two_systems(summary: Any) -> None:
    assert summary["inputs"] == ["nixpkgs"]
    for output, systems in summary["systems"].items():
        assert systems == ["aarch64-linux", "x86_64-linux"], output


def test_package_matches_pyproject(summary: Any) -> None:
    package = summary["package"]
    project = PYPROJECT["project"]
    assert package["pname"] == project["name"] and package["version"] == project["version"]
    assert package["pyproject"] is True and package["isApplication"] is True
    assert package["build-system"] == ["setuptools"]
    wanted = [normalize(r) for r in project["dependencies"]]
    notebook = [normalize(r) for r in project["optional-dependencies"]["notebook"]]
    assert [normalize(d) for d in package["dependencies"]] == wanted + notebook
    assert [normalize(d) for d in package["notebook"]] == notebook
    dev = [normalize(r) for r in project["optional-dependencies"]["dev"]]
    assert sorted(normalize(d) for d in package["dev"]) == sorted(dev)
    for module in package["pythonImportsCheck"]:
        __import__(module)
    # The source holds what setuptools reads.
    names = {Path(p).name for p in package["src"]}
    assert {"pyproject.toml", project["readme"], "kernel"} <= names
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]) == {
        f"{n}*" for n in names if (ROOT / n / "__init__.py").exists()
    }


def test_console_scripts_and_app(summary: Any) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"nixos-repl", "nixos-test-driver", "generate-driver-symbols"}
    assert summary["package"]["mainProgram"] == "nixos-repl"
    assert summary["app"]["type"] == "app"
    assert summary["app"]["program"].endswith("-nixos-repl-0.1.0/bin/nixos-repl")
    assert "REPL" in summary["app"]["description"]  # apps carry meta.description


def test_runtime_tools_are_on_the_wrapped_path(summary: Any) -> None:
    package = summary["package"]
    assert package["runtimeTools"] == ["qemu", "vde2", "tesseract"]
    args = package["makeWrapperArgs"]
    path = args[args.index("PATH") + 2].split(":")
    assert [p.rsplit("-", 1)[-1] for p in path] == ["qemu/bin", "vde2/bin", "tesseract/bin"]
    pythonpath = args[args.index("PYTHONPATH") + 2].split(":")
    assert len(pythonpath) == 1 + len(package["dependencies"])
    assert all(p.endswith("/site-packages") for p in pythonpath)


def test_kernelspec_is_installed_and_points_at_nixos_repl(summary: Any) -> None:
    data = PYPROJECT["tool"]["setuptools"]["data-files"]
    assert list(data) == ["share/jupyter/kernels/nixos-repl"]
    for file in data["share/jupyter/kernels/nixos-repl"]:
        assert (ROOT / file).is_file(), file
    script = summary["package"]["postInstall"]
    assert "kernels=$out/share/jupyter/kernels/nixos-repl" in script
    assert '--add-flags "-m nixos_repl.interactive.kernel"' in script
    spec = json.loads(script.split("<<JSON\n", 1)[1].split("\nJSON\n", 1)[0])
    ours = json.loads((ROOT / "kernel/nixos-repl/kernel.json").read_text())
    assert spec["argv"] == ["$out/libexec/nixos-repl/kernel", "-f", "{connection_file}"]
    assert {k: v for k, v in spec.items() if k != "argv"} == {
        k: v for k, v in ours.items() if k != "argv"
    }


def test_dev_shell(summary: Any) -> None:
    shell = summary["devShell"]
    assert shell[0].startswith("python3-") and shell[0].endswith("-env")
    assert {"ruff", "mypy", "qemu", "vde2", "tesseract", "tmux", "shellcheck"} <= set(shell)


def test_overlay_replaces_nixos_test_driver_and_honours_override(summary: Any) -> None:
    overlay = summary["overlay"]
    assert overlay["nixos-repl"] == "nixos-repl"
    driver = overlay["driver"]
    # nixpkgs' defaults: qemu_test, no OCR, no notebook.
    assert driver["pname"] == "nixos-repl" and driver["enableOCR"] is False
    assert driver["runtimeTools"] == ["qemu-test", "vde2"]
    assert "jupyterlab" not in driver["dependencies"]
    # nixpkgs' .override { enableOCR; extraPythonPackages; qemu_pkg; enableNspawn; }
    ocr = overlay["driverOCR"]
    assert ocr["enableOCR"] is True and ocr["enableNspawn"] is True
    assert ocr["runtimeTools"] == ["qemu", "vde2", "tesseract"]
    assert ocr["dependencies"][-1] == "numpy"
    # A test built from the overlaid packages gets nixos-repl as its driver, the interactive
    # driver with full QEMU.
    assert overlay["exampleDriver"] == "nixos-repl"
    assert overlay["exampleInteractiveDriver"] == ["qemu", "vde2"]


def test_repl_and_notebook_apps_run_on_the_tests_machines(summary: Any, tmp_path: Path) -> None:
    lib = summary["lib"]
    assert lib["repl"]["type"] == "app"
    assert lib["repl"]["program"].endswith("/bin/" + lib["replPackage"]["name"])
    assert lib["repl"]["description"] == (
        "nixos-repl repl on the machines of the NixOS test nixos-repl-example"
    )
    config = json.loads(lib["interactiveConfig"])
    assert sorted(config["vms"]) == ["client", "server"]
    assert "nixos-vm-qemu/bin/run-server-vm" in config["vms"]["server"]["start_script"]
    for name, command in (("replPackage", None), ("notebookPackage", "notebook")):
        package = lib[name]
        assert package["runtimeInputs"] == ["nixos-repl"]
        args = _parser().parse_args(command_after_exec(package["text"]))
        assert args.command == command
        assert args.config.name.endswith("-driverConfiguration.json")
    # The interactive configuration (full QEMU), not the batch one.
    repl_args = _parser().parse_args(command_after_exec(lib["replPackage"]["text"]))
    batch_argv = command_after_exec(lib["batch"]["buildCommand"].replace("$out", str(tmp_path)))
    batch_args = _parser().parse_args(batch_argv)
    assert repl_args.config != batch_args.config


def test_without_driver_configuration_the_nodes_give_the_machines(
    summary: Any, tmp_path: Path
) -> None:
    lib = summary["lib"]
    assert command_after_exec(lib["legacyRepl"]["text"]) == ["--config", lib["legacyConfigPath"]]
    path = tmp_path / "driverConfiguration.json"
    path.write_text(lib["legacyConfig"])
    config = load_driver_configuration(path)
    assert sorted(config.vms) == ["alpha", "beta"]
    assert config.vms["beta"].start_script.name == "run-beta-vm"
    assert sorted(config.vlans) == [1, 2]
    assert config.global_timeout.total_seconds() == 3600


def test_batch_is_a_kvm_derivation_running_nixos_repl_batch(summary: Any, tmp_path: Path) -> None:
    batch = summary["lib"]["batch"]
    assert batch["requiredSystemFeatures"] == ["nixos-test", "kvm"]
    assert batch["nativeBuildInputs"] == ["nixos-repl"]
    argv = command_after_exec(batch["buildCommand"].replace("$out", str(tmp_path)))
    args = _parser().parse_args(argv)
    assert args.batch.name.endswith("-test-script")
    assert args.output_directory == tmp_path and args.junit_xml == Path("junit.xml")
    assert "export HOME=$TMPDIR LOGFILE=/dev/null" in batch["buildCommand"]
    assert "start_all()" in summary["lib"]["testScript"]
    script = command_after_exec(summary["lib"]["batchScript"].replace("$out", str(tmp_path)))
    assert script[1].endswith("-example-test.nix")  # script = ... overrides the test's


def test_checks(summary: Any) -> None:
    checks = summary["checks"]
    assert sorted(checks) == ["package", "tests", "vm-batch", "vm-test-driver"]
    for name in ("vm-batch", "vm-test-driver"):
        assert "kvm" in checks[name]["requiredSystemFeatures"], name
    assert checks["package"]["name"] == "nixos-repl-0.1.0"
    tests = checks["tests"]["buildCommand"]
    assert 'pytest -q -p no:cacheprovider -m "not vm"' in tests
    assert "mypy --strict nixos_repl test_driver tests bench" in tests
    # The fast lane includes this file: it needs nix-instantiate in the sandbox too.
    tools = set(checks["tests"]["nativeBuildInputs"])
    assert {"nix", "tmux", "shellcheck", "qemu", "vde2", "tesseract"} <= tools


# A machine named by a magic (`%succeed client ...`) or called (`server.wait_for_unit(...)`).
MACHINE_USE = re.compile(r"^%\w+ (\w+)|^(\w+)\.\w+\(", re.M)


def test_template(summary: Any) -> None:
    template = summary["template"]
    assert Path(template["path"]) == ROOT / "templates" / "default"
    assert template["inputs"] == ["nixos-repl", "nixpkgs"]
    assert sorted(template["apps"]) == ["default", "notebook", "repl"]
    assert template["apps"]["default"] == template["apps"]["repl"]
    assert template["checks"] == ["batch", "test"]
    assert template["batchFeatures"] == ["nixos-test", "kvm"]
    assert command_after_exec(template["repl"]["text"])[0] == "--config"
    # The notebook is valid, for the nixos-repl kernel, and drives the test's own machines.
    read: Any = nbformat.read
    validate: Any = nbformat.validate
    notebook = read(ROOT / "templates/default/notebooks/test.ipynb", as_version=4)
    validate(notebook)
    assert notebook.metadata.kernelspec.name == "nixos-repl"
    assert template["nodes"] == ["client", "server"]
    used = set()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for magic_arg, receiver in MACHINE_USE.findall(cell.source):
                used.add(magic_arg or receiver)
    assert used == {"server", "client"}


# -- the checks can fail -------------------------------------------------------------------------


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("flake.nix", "pyproject.toml", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    for name in ("nix", "templates", "kernel", "nixos_repl", "test_driver"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize(
    ("file", "old", "new", "error"),
    [
        ("nix/package.nix", "py.qemu-qmp", "py.qemu_qmp", "qemu_qmp"),  # a wrong attribute
        ("nix/package.nix", "../test_driver", "../test_drivers", "test_drivers"),  # a bad path
        ("flake.nix", "enableOCR = false", "enableOcr = false", "enableOcr"),  # a bad argument
        ("nix/lib.nix", "runtimeInputs =", "runtimeInput =", "runtimeInput"),
    ],
)
def test_a_typo_fails_the_evaluation(
    nix_env: dict[str, str], tmp_path: Path, file: str, old: str, new: str, error: str
) -> None:
    root = copy_tree(tmp_path)
    evaluate(nix_env, root)  # the copy evaluates
    path = root / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    result = instantiate(nix_env, *summary_args(root))
    assert result.returncode != 0
    assert error in result.stderr, result.stderr
