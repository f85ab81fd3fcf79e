"""The README's commands refer to things that exist: scripts, subcommands, configs."""

import os
import re
from pathlib import Path

import pytest

from entityclip.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
COMMANDS = set(build_parser()._subparsers._group_actions[0].choices)


def bash_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_two_commands_come_first_and_ci_runs_the_second():
    first, second = bash_lines()[:2]
    assert first == "./scripts/setup && .venv/bin/entityclip pipeline"
    assert second == "./scripts/test"
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
    for script in ("scripts/setup", "scripts/test", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), script


def test_every_entityclip_command_in_the_readme_exists():
    used = {m for line in bash_lines() for m in re.findall(r"(?<![\w-])entityclip (\w+)", line)}  # not model names
    assert used and used <= COMMANDS, used - COMMANDS


DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_file_and_link_a_page_points_to_exists(page):
    text = page.read_text()
    for path in re.findall(r"`((?:configs|serve|infra|jobs|benchmarks|scripts)/[\w./-]+)`", text):
        assert (REPO / path).exists(), path
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative Markdown links and images
        assert (page.parent / link).exists(), link


def test_the_command_table_names_every_subcommand():
    table = re.search(r"\| Command \| What it does \|\n((?:\|.*\|\n)+)", README).group(1)
    named = set(re.findall(r"`(\w+)`", table.split("\n", 1)[1]))
    assert named >= COMMANDS, COMMANDS - named


def test_the_python_example_names_what_exists():
    import importlib

    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    for module, names in re.findall(r"^from ([\w.]+) import (\w+)", block, flags=re.M):
        assert hasattr(importlib.import_module(module), names), (module, names)
