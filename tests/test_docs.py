"""The README cannot rot.

* Every fenced block whose info string is ``sh runnable`` runs, in document order, with ``bash -euo
  pipefail`` in one scratch copy of the repository (blocks marked ``python file=NAME`` are written
  to NAME first), on the embedded tiny guests; each must exit 0. The copy is made afresh at one
  path (``README_COPY``) in every run, so the guests the blocks build keep their paths and the
  boot cache finds their machines again.
* Every other ``nixos-repl`` / ``nixos-test-driver`` line shown in a shell block parses with the
  real argument parsers.
* The README opens with its two commands.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixos_repl.cli import _parser, _test_driver_parser

from .helpers import SUITE_GUESTS, leftovers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
TWO_COMMANDS = ["./dev.sh demo", "./dev.sh test"]
README_COPY = SUITE_GUESTS.parent / "readme"


def blocks(text: str | None = None) -> list[tuple[list[str], str]]:
    """(info string words, body) of each fenced block, in order."""
    text = README.read_text() if text is None else text
    return [(m.group(1).split(), m.group(2)) for m in FENCE.finditer(text)]


def runnable(text: str | None = None) -> list[str]:
    return [body for info, body in blocks(text) if info == ["sh", "runnable"]]


CONTROL = {"|", "||", "&&", ";", "&"}
REDIRECT = {"<", ">", ">>", "2>", "2>&1"}


def simple_commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments, control operators
    and redirections dropped."""
    commands: list[list[str]] = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        skip = False
        for token in lexer:
            if skip:
                skip = False
            elif token in CONTROL:
                commands.append(words)
                words = []
            elif token in REDIRECT:
                skip = True
            else:
                words.append(token)
        commands.append(words)
    return [words for words in commands if words]


def test_the_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    assert text.startswith("# nixos-repl\n\n```sh\n")
    info, body = blocks(text)[0]
    assert info == ["sh"]
    assert [line.split("#")[0].strip() for line in body.splitlines()] == TWO_COMMANDS


def test_runnable_blocks_are_found_and_never_the_test_command() -> None:
    bodies = runnable()
    assert len(bodies) >= 4
    for body in bodies:
        assert "dev.sh" not in body
    # The marker is what the test looks for: a block marked otherwise is not run.
    sample = "```sh\necho shown\n```\n```sh runnable\necho run\n```\n```shell runnable\nx\n```\n"
    assert runnable(sample) == ["echo run\n"]


def scratch_copy(target: Path) -> Path:
    """The repository's tracked files (or, outside git, its files without build output)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False
    )
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    else:
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".*_cache")
        shutil.copytree(ROOT, target, ignore=ignore, dirs_exist_ok=True)
    return target


@pytest.fixture
def readme_copy() -> Iterator[Path]:
    """A fresh copy of the repository at README_COPY, for one test run at a time."""
    README_COPY.parent.mkdir(parents=True, exist_ok=True)
    with open(README_COPY.parent / "readme.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(README_COPY, ignore_errors=True)
        README_COPY.mkdir()
        yield scratch_copy(README_COPY)


@pytest.mark.vm
def test_every_runnable_block_runs(readme_copy: Path, tmp_path: Path) -> None:
    scratch = readme_copy
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "XDG_RUNTIME_DIR": str(runtime),
        "NIXOS_REPL_ACCEL": "tcg",
        "NIX_CONFIG": "build-users-group =\n",
    }
    ran = 0
    for info, body in blocks():
        files = [word.removeprefix("file=") for word in info if word.startswith("file=")]
        if files:
            (scratch / files[0]).write_text(body)
        if info == ["sh", "runnable"]:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", body],
                cwd=scratch,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, (
                f"README block failed (exit {result.returncode}):\n{body}\n"
                f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
            )
            ran += 1
    assert ran == len(runnable())
    assert leftovers(runtime) == []


def test_every_command_line_shown_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    parsers = {"nixos-repl": _parser, "nixos-test-driver": _test_driver_parser}
    checked = 0
    for info, body in blocks():
        if not info or info[0] != "sh":
            continue
        for words in simple_commands(body):
            line = shlex.join(words)
            while words and re.fullmatch(r"[A-Za-z_]+=.*", words[0]):
                words = words[1:]  # environment assignments
            if not words or words[0] not in parsers or any(w.startswith("[") for w in words):
                continue
            try:
                parsers[words[0]]().parse_args(words[1:])
            except SystemExit as e:
                pytest.fail(f"README line does not parse (exit {e.code}): {line}")
            checked += 1
    assert checked >= 10


def test_shell_lines_are_split_into_commands() -> None:
    body = (
        "printf 'a|b' | nixos-repl --start-scripts x \\\n    --vlans 1 # comment\n"
        "A=1 nixos-test-driver -K < /dev/null && generate-driver-symbols\n"
    )
    assert simple_commands(body) == [
        ["printf", "a|b"],
        ["nixos-repl", "--start-scripts", "x", "--vlans", "1"],
        ["A=1", "nixos-test-driver", "-K"],
        ["generate-driver-symbols"],
    ]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--no-such-flag"])


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_inside_the_readme_resolve() -> None:
    text = README.read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10
    assert [link for link in links if link not in anchors] == []


def test_the_architecture_names_real_files() -> None:
    text = README.read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    tree = next(body for info, body in blocks(section) if not info)
    names = re.findall(r"(?<![\w.])([\w-]+(?:\.py|\.nix|/))", tree)
    assert len(names) >= 30
    files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".venv" not in p.parts]
    paths = {f"/{f}" for f in files} | {f"/{f}/" for f in files}
    missing = [n for n in names if not any(p.endswith(f"/{n}") for p in paths)]
    assert missing == [], f"the README's architecture names what the code does not have: {missing}"
