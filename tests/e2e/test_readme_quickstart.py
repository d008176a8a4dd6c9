"""The README's quick-start commands, pasted into a shell against `spendgate dev`, work.

The commands are read from README.md itself (the ``sh`` block that starts with ``TOKEN=``), so
the README cannot rot again: the only substitutions are the ones a reader makes — the token
`spendgate dev` printed for ``TOKEN=…`` and this test's free API port for ``8080``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.dev_stack import dev_stack

README = Path(__file__).resolve().parents[2] / "README.md"
COMMAND_TIMEOUT_S = 30
START_TIMEOUT_S = 150.0


def quick_start_block(text: str) -> str:
    """The first ``sh`` block of the README that defines ``TOKEN``."""
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        if re.search(r"^TOKEN=", block, flags=re.MULTILINE):
            return str(block)
    raise AssertionError("README.md has no ```sh block starting with TOKEN=")


def commands_of(block: str) -> list[str]:
    """Shell commands of ``block``: continuation lines joined, the ``TOKEN=`` line left out."""
    joined = block.replace("\\\n", " ")
    commands = [line.strip() for line in joined.splitlines()]
    return [c for c in commands if c and not c.startswith("#") and not c.startswith("TOKEN=")]


def test_the_readme_block_is_found_and_split() -> None:
    commands = commands_of(quick_start_block(README.read_text()))
    assert len(commands) >= 2 and all(c.startswith("curl ") for c in commands), commands


@pytest.fixture
def dev_api() -> Iterator[tuple[int, str]]:
    """`spendgate dev` on free ports with a known admin token: (API port, token)."""
    with dev_stack("readme", START_TIMEOUT_S) as dev:
        assert dev.token in "".join(dev.lines)  # the token the README tells the reader to copy
        yield dev.port, dev.token


def test_readme_quick_start_commands_work_when_pasted(dev_api: tuple[int, str]) -> None:
    port, token = dev_api
    for command in commands_of(quick_start_block(README.read_text())):
        pasted = command.replace("localhost:8080", f"localhost:{port}")
        script = f"TOKEN={shlex.quote(token)}\n{pasted}\n"
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert isinstance(answer, dict) and "error" not in answer, (command, answer)
