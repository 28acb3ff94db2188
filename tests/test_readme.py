"""Every `mesh` command README.md and deploy/README.md show exists, with the flags shown."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from mesh.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md"]


def shown_commands(path: Path) -> list[str]:
    """`mesh ...` invocations in the file's sh code blocks (continuations joined, one per pipeline stage)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0]
            for part in re.split(r"\|\||&&|[|;]|\$\(|\bdo\b", line):
                part = part.strip()
                if part.startswith("mesh "):
                    commands.append(part)
    return commands


def resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    command: click.Command = main
    rest = argv
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`mesh {' '.join(argv)}`: no command {rest[0]!r} under {command.name}"
        command, rest = sub, rest[1:]
    return command, rest


CASES = [(path.relative_to(REPO), text) for path in DOCS for text in shown_commands(path)]


def test_the_docs_show_commands():
    assert len(CASES) >= 15


@pytest.mark.parametrize("where, text", CASES, ids=[f"{w}:{t[:40]}" for w, t in CASES])
def test_each_shown_command_exists_with_its_flags(where, text):
    argv = shlex.split(text, comments=False)[1:]
    command, rest = resolve(argv)
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    options |= {"--help", "-h", "--version"}
    for token in rest:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{where}: `{text}`: {command.name} has no {flag} ({sorted(options)})"
