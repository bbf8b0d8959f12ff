"""Command-line entry point: parses arguments and dispatches, nothing else."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DriverConfig
from .errors import ConfigError, NixosReplError

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["generate_driver_symbols", "main", "test_driver_main"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def writeable_dir(arg: str) -> Path:
    """An existing writable directory (nixpkgs' check for ``--output_directory``)."""
    path = Path(arg)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory")
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} is not a writeable directory")
    return path


def _add_run_options(parser: argparse.ArgumentParser, *, legacy_positional: bool) -> None:
    """nixpkgs' nixos-test-driver options: the JSON config, the legacy flags, output and logs."""
    parser.add_argument(
        "-c", "--config", type=Path, help="the test driver configuration file (JSON)"
    )
    parser.add_argument(
        "--keep-vm-state", help=argparse.SUPPRESS, dest="keep_machine_state", action="store_true"
    )
    parser.add_argument(
        "-K",
        "--keep-machine-state",
        help="re-use a machine state coming from a previous run",
        action="store_true",
    )
    parser.add_argument(
        "--start-scripts",
        metavar="START-SCRIPT",
        nargs="*",
        help="start scripts for participating virtual machines (env: startScripts)",
    )
    parser.add_argument(
        "--vm-names",
        metavar="VM-NAME",
        nargs="*",
        help="names of participating virtual machines (env: vmNames)",
    )
    parser.add_argument(
        "--vm-start-scripts",
        metavar="VM-START-SCRIPT",
        nargs="*",
        help="start scripts for participating virtual machines (env: vmStartScripts)",
    )
    parser.add_argument(
        "--container-names",
        metavar="CONTAINER-NAME",
        nargs="*",
        help="names of participating containers (env: containerNames)",
    )
    parser.add_argument(
        "--container-start-scripts",
        metavar="CONTAINER-START-SCRIPT",
        nargs="*",
        help="start scripts for participating containers (env: containerStartScripts)",
    )
    parser.add_argument(
        "--vlans", metavar="VLAN", nargs="*", help="vlans to span by the driver (env: vlans)"
    )
    parser.add_argument(
        "--global-timeout",
        metavar="GLOBAL_TIMEOUT",
        help="Timeout in seconds for the whole test (env: globalTimeout; default 3600)",
    )
    parser.add_argument(
        "-o",
        "--output_directory",
        "--output-directory",
        dest="output_directory",
        help="The path to the directory where outputs copied from the machine will be placed "
        "(screenshots, copy_from_machine, JUnit XML); default: the current directory",
        default=None,
        type=writeable_dir,
    )
    parser.add_argument(
        "--junit-xml",
        help="Enable JunitXML report generation to the given path (in the output directory)",
        type=Path,
    )
    parser.add_argument(
        "--boot-cache",
        metavar="DIR",
        type=Path,
        help="start machines from their state right after boot saved in DIR by an earlier run "
        "(the first run saves it; env: NIXOS_REPL_BOOT_CACHE)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LOG_LEVEL",
        choices=LOG_LEVELS,
        help="Set the log level: debug, info, warning or error (env: logLevel)",
    )
    if legacy_positional:
        parser.add_argument(
            "testscript",
            nargs="?",
            type=Path,
            help="the test script to run (env: testScript)",
        )


_LEGACY = (
    "start_scripts",
    "vm_names",
    "vm_start_scripts",
    "container_names",
    "container_start_scripts",
    "vlans",
)


def _config(args: argparse.Namespace, script: Path | None = None) -> DriverConfig:
    """The machines of the command line: ``--config``, the legacy flags, or the env fallbacks."""
    from .config import resolve_config

    legacy: dict[str, Any] = {k: getattr(args, k, None) for k in _LEGACY}
    return resolve_config(
        getattr(args, "config", None),
        test_script=script,
        global_timeout=getattr(args, "global_timeout", None),
        **legacy,
    )


def _run(args: argparse.Namespace, prog: str, script: Path | None) -> int:
    """Resolve the configuration and run it; configuration errors are one line and status 2."""
    from .batch import run
    from .logs import LogLevel

    if "--keep-vm-state" in sys.argv:
        warnings.warn(
            "The flag '--keep-vm-state' is deprecated. Use '--keep-machine-state' instead.",
            DeprecationWarning,
            stacklevel=1,
        )
    level = args.log_level or os.environ.get("logLevel") or "info"
    if level not in LOG_LEVELS:
        print(f"{prog}: error: unknown log level {level!r} (choose from {', '.join(LOG_LEVELS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        config = _config(args, script)
        return run(
            config,
            out_dir=args.output_directory or Path.cwd(),
            junit_xml=args.junit_xml,
            log_level=LogLevel[level.upper()],
            keep_machine_state=args.keep_machine_state,
            interactive=bool(getattr(args, "interactive", False)),
            debug_hook_attach=getattr(args, "debug_hook_attach", None),
            pause_on_failure=bool(getattr(args, "pause_on_failure", False)),
            prompt=_prompt,
        )
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _prompt(driver: Driver) -> None:
    """The terminal REPL over a batch run's driver (``-I``, ``--pause-on-failure``)."""
    from .interactive.repl import interact

    interact(driver)


def _test_driver_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixos-test-driver",
        description="nixos-repl as a drop-in for nixpkgs' NixOS test driver.",
    )
    _add_run_options(parser, legacy_positional=True)
    parser.add_argument(
        "-I",
        "--interactive",
        help="drop into a python repl and run the tests interactively",
        action=argparse.BooleanOptionalAction,
    )
    parser.add_argument(
        "--debug-hook-attach",
        help="Enable interactive debugging breakpoints for sandboxed runs (accepted; "
        "breakpoints only log a notice)",
    )
    parser.add_argument(
        "--dump-vsocks", type=int, help=argparse.SUPPRESS
    )  # older nixpkgs; no SSH backdoor here
    return parser


def test_driver_main(argv: Sequence[str] | None = None) -> int:
    """``nixos-test-driver``: nixpkgs' command line, flag for flag."""
    args = _test_driver_parser().parse_args(argv)
    _use_boot_cache(args)
    return _run(args, "nixos-test-driver", args.testscript)


def _use_boot_cache(args: argparse.Namespace) -> None:
    """``--boot-cache DIR`` is ``NIXOS_REPL_BOOT_CACHE=DIR`` for this process and its kernels."""
    if getattr(args, "boot_cache", None) is not None:
        from .machine.bootcache import ENV

        os.environ[ENV] = str(args.boot_cache.absolute())


def generate_driver_symbols(argv: Sequence[str] | None = None) -> int:
    """``generate-driver-symbols``: write ``driver-symbols``, the globals of test scripts.

    nixpkgs' test framework lints test scripts with pyflakes using this list.
    """
    from .config import DriverConfig
    from .driver import Driver

    driver = Driver(DriverConfig(test_script=Path("testScriptWithTypes")), out_dir=Path())
    Path("driver-symbols").write_text(",".join(driver.symbol_names()))
    return 0


class _CommandParser(argparse.ArgumentParser):
    """nixos-repl's top-level parser: machine options may come before or after the command.

    A list option (``--vlans 1``, ``--start-scripts A B``) would take the command's name as one
    more value; the arguments are parsed in two parts instead, up to the command and from it.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        split = self._command_index(argv)
        if not split:
            return super().parse_known_args(argv, namespace)
        head, extra = super().parse_known_args(argv[:split], namespace)
        parsed, more = super().parse_known_args(argv[split:], head)
        return parsed, extra + more

    def _command_index(self, argv: list[str]) -> int | None:
        """Where the command is: the first command name that is not an option's value."""
        commands: set[str] = set()
        takes_value: set[str] = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands.update(action.choices)
            elif action.nargs is None:
                takes_value.update(action.option_strings)
        after_option = False
        for i, word in enumerate(argv):
            if word == "--":
                return None
            if not after_option and word in commands:
                return i
            after_option = word in takes_value
        return None


def _run_option_dests() -> set[str]:
    """What the machine options set (the REPL's, --batch's and notebook's)."""
    options = argparse.ArgumentParser(add_help=False)
    _add_run_options(options, legacy_positional=False)
    return {action.dest for action in options._actions}


def _parser() -> argparse.ArgumentParser:
    parser = _CommandParser(
        prog="nixos-repl",
        description="An interactive environment for NixOS VM tests.",
        allow_abbrev=False,  # else --batch's --output_directory would take a command's --out
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="open the REPL on two embedded tiny guests (built on first use); without a "
        "terminal on stdin, run a short scripted tour instead",
    )
    parser.add_argument(
        "--batch",
        metavar="FILE",
        type=Path,
        help="run a nixpkgs testScript (.py), an IPython script (.ipy, cells split at '# %%%%') "
        "or a notebook (.ipynb) as nixos-test-driver does, then exit with its status; the "
        "machines come from the options below",
    )
    parser.add_argument(
        "--pause-on-failure",
        action="store_true",
        help="with --batch: at a failure, open the REPL with the machines still up and the "
        "script's names loaded; leaving it exits 1",
    )
    run_options = parser.add_argument_group(
        "machine options (of the REPL, --batch and notebook; as nixos-test-driver's)"
    )
    _add_run_options(run_options, legacy_positional=False)  # type: ignore[arg-type]
    commands = parser.add_subparsers(
        parser_class=argparse.ArgumentParser,
        dest="command",
        metavar="COMMAND",
        description="Without a command (and without --batch), nixos-repl opens the terminal "
        "REPL on the machines of the machine options.",
    )

    guest = commands.add_parser("guest", help="embedded guests for demos and tests")
    guest_commands = guest.add_subparsers(dest="guest_command", metavar="ACTION", required=True)
    build = guest_commands.add_parser(
        "build",
        help="build a guest and write one run-<name>-vm (containers: run-<name>-nspawn) script "
        "per --name",
    )
    build.add_argument(
        "kind", choices=["tiny", "debian", "debian-container"], help="which guest to build"
    )
    build.add_argument(
        "--name", action="append", required=True, dest="names", metavar="NAME",
        help="a machine name (repeat for several machines)",
    )  # fmt: skip
    build.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where to write the run-<name>-vm scripts",
    )
    build.add_argument(
        "--vlan", action="append", type=int, default=[], dest="guest_vlans", metavar="N",
        help="debian-container: join VLAN N as eth1, eth2, … at 192.168.N.<node> (repeatable)",
    )  # fmt: skip
    build.add_argument(
        "--node", action="append", default=[], dest="guest_nodes", metavar="NAME",
        help="another machine of the test (a container beside VMs, a VM beside containers), "
        "counted in the node numbers and named in /etc/hosts (repeatable)",
    )  # fmt: skip

    demo = commands.add_parser("demo", help="boot two tiny guests and drive them")
    demo.add_argument(
        "--guests",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to build the demo's start scripts (default: a temp dir)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        metavar="DIR",
        help="output directory (screenshots, copies)",
    )

    kernel = commands.add_parser("kernel", help="the Jupyter kernel")
    kernel_commands = kernel.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    install = kernel_commands.add_parser("install", help="install the nixos-repl kernelspec")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user (the default)")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python's prefix")
    where.add_argument("--prefix", type=Path, metavar="P", help="under prefix P")

    notebook = commands.add_parser(
        "notebook",
        help="start JupyterLab with the machines of the machine options for the kernel",
    )
    _add_run_options(notebook, legacy_positional=False)
    for action in notebook._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS  # keep values given before the command
    notebook.add_argument(
        "--no-browser", action="store_true", help="do not open a browser (print the URL)"
    )
    notebook.add_argument(
        "jupyter_args", nargs=argparse.REMAINDER, metavar="...", help="passed to jupyter lab"
    )

    cache = commands.add_parser("cache", help="the boot cache: list or clear its entries")
    cache.add_argument("action", choices=["list", "clear"], help="list or clear the entries")
    cache.add_argument(
        "--dir", type=Path, metavar="DIR", help="the cache (default: $NIXOS_REPL_BOOT_CACHE)"
    )

    export = commands.add_parser(
        "export",
        help="write a nixpkgs testScript from a session log, a notebook or an .ipy file",
        description="Magics become the calls they wrap, plain Python is kept, failed steps "
        "become comments. The result replays with nixos-repl --batch on the same machines.",
    )
    export.add_argument(
        "source", type=Path, metavar="SESSION.jsonl|NOTEBOOK.ipynb|FILE.ipy", help="what to export"
    )
    export.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="the testScript to write"
    )
    export.add_argument(
        "--keep-failures",
        action="store_true",
        help="keep failed succeed/fail steps as the opposite assertion instead of comments",
    )
    export.add_argument(
        "--keep-undone",
        action="store_true",
        help="keep the steps a restore of a snapshot undid, as comments (default: left out)",
    )

    shell = commands.add_parser(
        "shell", help="attach this terminal to a machine's guest shell (started by %%shell NAME)"
    )
    shell.add_argument("name", metavar="NAME", help="the machine")
    shell.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the machine's state directory (%%shell NAME in a notebook prints it)",
    )
    console = commands.add_parser(
        "console",
        help="a terminal on a running kernel (a notebook's): same machines, same namespace",
    )
    console.add_argument(
        "--existing",
        nargs="?",
        const="",
        required=True,
        metavar="CONNECTION_FILE",
        help="the kernel's connection file (a notebook cell shows it with %%connect_info; "
        "default: the newest kernel's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _use_boot_cache(args)
    if args.batch is not None:
        if args.command is not None:
            parser.error("--batch runs a test script; it takes no command")
        if args.batch.suffix not in (".py", ".ipy", ".ipynb", ""):
            print(f"nixos-repl: error: {args.batch}: unknown format {args.batch.suffix!r}; "
                  "--batch runs a .py test script, an .ipy file or an .ipynb notebook",
                  file=sys.stderr)  # fmt: skip
            return 2
        return _run(args, "nixos-repl", args.batch)
    if args.demo:
        if args.command is not None:
            parser.error("--demo opens the REPL; it takes no command")
        from .interactive.tour import run_demo as run_demo_repl

        return run_demo_repl(Path("demo-out"), verbose=args.verbose)
    if args.command not in (None, "notebook"):
        dests = _run_option_dests()
        given = sorted(d for d in dests if getattr(args, d, None) not in (None, False))
        if given:
            options = ", ".join("--" + d.replace("_", "-") for d in given)
            parser.error(f"{options}: machine options go with the REPL, --batch or notebook, "
                         f"not with {args.command}")  # fmt: skip
    if args.command in (None, "notebook", "kernel", "shell", "console"):
        return _interactive(args)
    if args.command == "export":
        return _export(args)
    if args.command == "cache":
        return _cache(args)
    quiet = args.command == "demo" and not args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        if args.command == "guest":
            from .guests import build_debian, build_debian_container, build_tiny

            if args.kind == "debian-container":
                scripts = build_debian_container(
                    args.names, args.out, vlans=args.guest_vlans, nodes=args.guest_nodes
                )
            elif args.guest_vlans:
                parser.error("--vlan is for debian-container (VMs join every VLAN)")
            else:
                scripts = {"tiny": build_tiny, "debian": build_debian}[args.kind](
                    args.names, args.out, nodes=args.guest_nodes
                )
            for script in scripts:
                print(script)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.guests, args.out)
    except NixosReplError as e:
        print(f"nixos-repl: error: {e}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


def _cache(args: argparse.Namespace) -> int:
    """``nixos-repl cache list|clear [--dir DIR]``."""
    from .machine.bootcache import ENV, BootCache

    root = args.dir or (Path(os.environ[ENV]) if os.environ.get(ENV) else None)
    if root is None:
        print(f"nixos-repl: error: which boot cache? Give --dir DIR or set {ENV}",
              file=sys.stderr)  # fmt: skip
        return 2
    cache = BootCache(root.expanduser())
    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {root}")
        return 0
    entries = cache.entries()
    for entry in entries:
        print(f"{entry.meta.get('name', '?'):16s} {entry.size / 2**20:8.1f} MiB  "
              f"{entry.meta.get('created', '?')}  {entry.path}")  # fmt: skip
    if not entries:
        print(f"no entries in {root}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """``nixos-repl export SOURCE -o FILE``."""
    from .export import ExportError, export_file

    try:
        exported = export_file(
            args.source,
            args.output,
            keep_failures=args.keep_failures,
            keep_undone=args.keep_undone,
        )
    except ExportError as e:
        print(f"nixos-repl: error: {e}", file=sys.stderr)
        return 1
    note = f", {exported.commented} left as comments" if exported.commented else ""
    print(f"wrote {args.output} ({exported.statements} statements{note})")
    if exported.unknown:
        names = ", ".join(exported.unknown)
        print(f"nixos-repl: warning: {args.output} reads names that are neither nixpkgs' test "
              f"symbols nor defined in it: {names}", file=sys.stderr)  # fmt: skip
    return 0


def _interactive(args: argparse.Namespace) -> int:
    """The REPL (no command), ``notebook``, ``kernel install`` and ``shell``."""
    from .config import check_config

    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        if args.command == "kernel":
            from .interactive.kernel import install

            print(install(user=not (args.sys_prefix or args.prefix), prefix=args.prefix,
                          sys_prefix=args.sys_prefix))  # fmt: skip
            return 0
        if args.command == "console":
            from .interactive.console import run_console

            return run_console(args.existing or None)
        if args.command == "shell":
            from .interactive.guestshell import attach_standalone

            return attach_standalone(args.name, args.state_dir)
        config = _config(args)
        check_config(config, need_test_script=False)
        out_dir = getattr(args, "output_directory", None) or Path.cwd()
        if args.command == "notebook":
            from .interactive.notebook import run_notebook

            extra = [a for a in args.jupyter_args if a != "--"]
            return run_notebook(
                config,
                out_dir,
                open_browser=not args.no_browser,
                extra=extra,
                config_file=getattr(args, "config", None),  # kernels re-read it on rebuild()
            )
        from .driver import Driver
        from .interactive.repl import run_repl

        keep = bool(getattr(args, "keep_machine_state", False))
        driver = Driver(config, out_dir=out_dir, keep_machine_state=keep, interactive=True)
        driver.config_source = functools.partial(_config, args)  # what rebuild() re-reads
        return run_repl(driver, verbose=args.verbose)
    except ConfigError as e:
        print(f"nixos-repl: error: {e}", file=sys.stderr)
        return 2
    except NixosReplError as e:
        print(f"nixos-repl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
