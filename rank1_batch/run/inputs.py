"""The run's input, read by the driver before anything is written and by Ray Data as it streams: the shards' footers (their columns and row counts), the pairs' Parquet reads, and the pairs the input repeats."""

from __future__ import annotations

import contextlib
import logging
import os

import pyarrow as pa

from ..cluster.resources import (
    PREPARE_CPUS,
)
from ..config import JobConfig
from ..output.key_index import KEY_SCHEMA, key_columns
from ..output.parallel_reads import in_parallel
from ..output.storage import Shard, arrow_filesystem, list_input_files, read_footer, url_of
from ..schema import ROW_HASH, SHARD_PATH, InputError, missing_columns, source_columns, to_contract

log = logging.getLogger(__name__)


def inspect_inputs(job: JobConfig) -> tuple[object, list[Shard]]:
    """Every input file's footer, checked against the contract before any engine starts."""
    fs, files = list_input_files(job.run)
    shards = in_parallel(lambda path: read_footer(fs, path), files)
    for shard in shards:
        missing = missing_columns(shard.columns, job.run.columns)
        if missing:
            raise InputError(f"{url_of(fs, shard.path)}: missing required column(s) {', '.join(missing)}")
        if SHARD_PATH in source_columns(shard.columns, job.run.columns):
            raise InputError(f"{url_of(fs, shard.path)}: the column {SHARD_PATH!r} cannot be read, as Ray Data "
                             "gives that name to each row's file; rename it in the input and map it with --columns")
    return fs, shards


def read(fs, shards: list[Shard], job: JobConfig, keys_only: bool = False):
    """A streaming read of the input shards, each row with its hash and its shard's path, of the
    columns the contract needs (or only the two key columns). Shards are read in groups of equal
    columns and types, so an optional column that only some shards have is kept where it exists,
    and shards may disagree on a column's type (integer or string ids): each block is cast to the
    contract later."""
    import ray

    groups: dict[tuple[str, ...], list[str]] = {}
    for shard in shards:
        columns = key_columns(job.run.columns) if keys_only else source_columns(shard.columns, job.run.columns)
        signature = tuple((name, str(shard.schema.field(name).type)) for name in columns)
        groups.setdefault(signature, []).append(shard.path)
    datasets = []
    for signature, paths in groups.items():
        with footer_readers_for(len(paths)):
            dataset = ray.data.read_parquet(paths, filesystem=arrow_filesystem(fs), file_extensions=None,
                                            include_row_hash=True, include_paths=True)
        datasets.append(dataset.select_columns([*(name for name, _ in signature), ROW_HASH, SHARD_PATH]))
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


# Ray Data 2.60 reads each Parquet footer again, on a pool of FooterReader actors of a fixed size (32
# unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise) however few the files, and each actor is
# a Python process to start: on 2 cores, a run of a few shards spent about a third of its CPU time
# starting them. The pool is read from the variable when `read_parquet` is called, on the driver.
FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_READ = 10  # Ray Data's own batch of files per footer-reading call
MOST_FOOTER_READERS = 32


@contextlib.contextmanager
def footer_readers_for(files: int):
    """One footer-reading actor per batch of files that Ray Data hands one, unless the user set the
    pool's size."""
    if FOOTER_READERS in os.environ:
        yield
        return
    os.environ[FOOTER_READERS] = str(min(MOST_FOOTER_READERS, -(-files // FILES_PER_FOOTER_READ)))
    try:
        yield
    finally:
        del os.environ[FOOTER_READERS]


def find_duplicates(fs, shards: list[Shard], job: JobConfig, repeated: pa.Table) -> pa.Table | None:
    """Each (query_id, doc_id) that occurs more than once, with the row to keep: the one with the
    lowest row hash, which is the same on every read, so a re-run keeps the same row.

    `repeated` (found by `key_index.index_inputs`) are rare, so only when there are some is the
    input read again through Ray Data, for the row hashes that tell the repeated rows apart.
    """
    if not repeated.num_rows:
        return None
    occurrences = read(fs, shards, job, keys_only=True).map_batches(
        occurrences_of, fn_kwargs={"columns": job.run.columns, "repeated": repeated}, batch_format="pyarrow",
        batch_size=None, num_cpus=PREPARE_CPUS)
    table = pa.concat_tables([KEY_SCHEMA.empty_table().append_column(ROW_HASH, pa.array([], pa.uint64())),
                              *occurrences.iter_batches(batch_format="pyarrow", batch_size=None)])
    counted = table.group_by(["query_id", "doc_id"]).aggregate([(ROW_HASH, "min")])
    return counted.select(["query_id", "doc_id", f"{ROW_HASH}_min"]).rename_columns(["query_id", "doc_id", "keep_row_hash"])


def occurrences_of(batch: pa.Table, columns: dict[str, str], repeated: pa.Table) -> pa.Table:
    """The rows of a batch whose key is one of the `repeated`, with their row hashes."""
    keys = to_contract(batch, columns).select(["query_id", "doc_id", ROW_HASH])
    return keys.join(repeated, keys=["query_id", "doc_id"], join_type="left semi")
