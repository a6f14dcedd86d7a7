"""The documentation site builds with `--strict`, and its command reference names every command and
every option of `run`, as the click commands define them today."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from rank1_batch.cli import main

ROOT = Path(__file__).resolve().parent.parent


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's path under the group, nested groups and their commands included."""
    paths = []
    for name, command in group.commands.items():
        paths.append(prefix + (name,))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, prefix + (name,)))
    return paths


def text_of(page: str) -> str:
    """A built page's text, tags dropped and entities decoded, as a reader sees it."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def command_section(page: str, anchor: str) -> str:
    """The part of the built reference from the command's heading to the next command's."""
    start = page.index(f'id="{anchor}"')
    following = re.compile(r'<h[1-6] id="rank1-batch-').search(page, start + 1)
    return page[start:following.start() if following else len(page)]


def named(text: str, word: str) -> bool:
    """`word` as a whole token: `--top-k` is not found inside `--cascade-top-k`."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@pytest.mark.integration
def test_site_builds_strictly_and_cli_reference_covers_every_command_and_run_option(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr[-5000:]

    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    reference = text_of(page)
    paths = command_paths(main)
    # the walk itself reaches a nested group's commands (store stats, store compact)
    assert ("store", "stats") in paths and ("run",) in paths
    missing = [" ".join(path) for path in paths if f"rank1-batch {' '.join(path)}" not in reference]
    assert not missing, f"commands missing from docs/cli.md's page: {missing}"

    run = main.commands["run"]
    options = [opt for param in run.get_params(click.Context(run)) if isinstance(param, click.Option)
               for opt in param.opts + param.secondary_opts if opt.startswith("--")]
    assert {"--input", "--no-traces", "--help"} <= set(options)
    section = text_of(command_section(page, "rank1-batch-run"))
    absent = [opt for opt in options if not named(section, opt)]
    assert not absent, f"run options missing from docs/cli.md's page: {absent}"
