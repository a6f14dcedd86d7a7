"""`rank1-batch store`: look into a score store and compact it."""

from __future__ import annotations

import json
from contextlib import contextmanager

import click

from ..cli_options import s3_options
from ..config import JobError, RunConfig
from .score_store import ScoreStore


@contextmanager
def _user_errors():
    """A refusal is one line naming the store, not a traceback."""
    try:
        yield
    except JobError as error:
        raise click.ClickException(str(error)) from None


def _open(url: str, s3_endpoint_url: str | None, s3_profile: str | None) -> ScoreStore:
    return ScoreStore.open(url, RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile))


@click.group("store")
def store_group():
    """Inspect and maintain a score store (judgements kept across runs)."""


@store_group.command("stats")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@s3_options
def stats_command(url, as_json, s3_endpoint_url, s3_profile):
    """Rows, partitions, files, bytes, models and judgement times of the store at URL."""
    with _user_errors():
        stats = _open(url, s3_endpoint_url, s3_profile).stats()
    click.echo(json.dumps(stats, indent=2) if as_json else describe(stats))


def describe(stats: dict) -> str:
    models = "; ".join(f"{model} {count:,}" for model, count in stats["models"].items()) or "none"
    writers = "; ".join(("" if writer["live"] else "ended: ") + writer["describe"] for writer in stats["writers"])
    judged = f"{stats['oldest']} to {stats['newest']}" if stats["oldest"] else "never"
    return "\n".join([
        f"score store {stats['url']} (format {stats['version']}, created {stats['created_at']})",
        f"rows        {stats['rows']:,} ({stats['duplicate_rows']:,} repeat a key; `store compact` drops them)",
        f"partitions  {stats['partitions']['used']:,} of {stats['partitions']['total']:,} used",
        f"files       {stats['files']:,}, {stats['bytes'] / 1e6:,.1f} MB",
        f"judged      {judged}",
        f"models      {models}",
        f"writers     {writers or 'none'}",
    ])


@store_group.command("compact")
@click.argument("url")
@s3_options
def compact_command(url, s3_endpoint_url, s3_profile):
    """Merge each partition's files into one without repeated keys. Run it while no run writes
    to the store: it refuses while one is recorded as writing."""
    with _user_errors():
        done = _open(url, s3_endpoint_url, s3_profile).compact()
    click.echo(f"{done['partitions_merged']} partitions merged: {done['files_before']} files -> {done['files_after']}, "
               f"{done['duplicates_dropped']} repeated keys dropped, {done['leftovers_removed']} leftover temporary "
               f"files and {done['writer_records_removed']} records of ended writers removed")
