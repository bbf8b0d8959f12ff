"""Command-line entry point: parses arguments and dispatches, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import NixosReplError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixos-repl",
        description="An interactive environment for NixOS VM tests.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    guest = commands.add_parser("guest", help="embedded guests for demos and tests")
    guest_commands = guest.add_subparsers(dest="guest_command", metavar="ACTION", required=True)
    build = guest_commands.add_parser(
        "build", help="build a guest and write one run-<name>-vm script per --name"
    )
    build.add_argument("kind", choices=["tiny", "debian"], help="which guest to build")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet = args.command == "demo" and not args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        if args.command == "guest":
            from .guests import build_debian, build_tiny

            builder = build_debian if args.kind == "debian" else build_tiny
            for script in builder(args.names, args.out):
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


if __name__ == "__main__":
    sys.exit(main())
