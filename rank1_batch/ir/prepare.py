"""First-stage runs into Parquet input shards: TREC run + topics + corpus, or RankLLM results.

Inputs (any fsspec URL; `.gz` and other compressions are inferred from the name):
- a TREC run (`qid Q0 docid rank score tag`), topics (`qid<TAB>text`) and a corpus, either TSV
  (`docid<TAB>text`) or JSONL (`docid`/`_id`/`id`, `text`/`contents`/`segment`, optional `title`);
- RankLLM retrieve results: a JSON list of `{"query", "hits": [{"content", "qid", "docid", "rank",
  "score"}]}`, or JSONL requests `{"query": {"text", "qid"}, "candidates": [{"docid", "score",
  "doc"}]}` where `doc` is a string or an object with a text key and an optional `title`.

Several TREC runs, or one with `--depth` or `--judged`, make a pool (see `pool`): one row per
(query, passage) of the union of each run's top K; its record (runs, depth, each query's pool
size, judged and holes) is written beside the shards as `_pool.json`.

The files are read and checked by `input_files`; this module joins them and writes the shards.

Error policy: strict. The first problem stops the preparation with a `PrepareError` naming the
file and the 1-based line: a malformed line, a missing field, a pair listed twice, a run row whose
query is not in the topics or whose passage is not in the corpus. A half-joined run would be
reranked and evaluated as if it were whole, so nothing is skipped silently. In a RankLLM JSON
list, which is parsed whole, a missing field is located by query and hit instead of by line.

Text is kept exactly as read (no whitespace or encoding repair).
"""

from __future__ import annotations

import json

import click
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import pool
from .input_files import (
    PREPARED_SCHEMA,
    Pairs,
    PrepareError,
    at_place,
    from_rankllm,
    numbered_lines,
    parse_run_line,
    read_corpus,
    read_topics,
)

SHARD_NAME = "pairs-{:05d}.parquet"
# Beside the shards; its leading underscore keeps it out of `rank1-batch run`'s input files.
POOL_RECORD = "_pool.json"


def from_trec(run_path: str, topics_path: str, corpus_path: str) -> pa.Table:
    """The pairs of a TREC run, joined with their query and passage texts; rank and score come
    from the run. Only the queries and passages the run names are kept in memory."""
    rows = []
    for number, line in numbered_lines(run_path):
        with at_place(run_path, f"line {number}"):
            rows.append((number, *parse_run_line(line)))
    topics = read_topics(topics_path, {query_id for _, query_id, _, _, _ in rows})
    passages = read_corpus(corpus_path, {doc_id for _, _, doc_id, _, _ in rows})
    pairs = Pairs()
    for number, query_id, doc_id, rank, score in rows:
        with at_place(run_path, f"line {number}"):
            if query_id not in topics:
                raise ValueError(f"qid {query_id} not in topics {topics_path}")
            if doc_id not in passages:
                raise ValueError(f"docid {doc_id} not in corpus {corpus_path}")
            pairs.add(query_id, topics[query_id], doc_id, *passages[doc_id], rank, score)
    return pairs.table()


def from_pool(run_paths: list[str], topics_path: str, corpus_path: str, depth: int | None = None,
              qrels_path: str | None = None, holes_only: bool = False) -> tuple[pa.Table, dict]:
    """The pool of TREC runs (see `pool.pool_runs`) joined with its query and passage texts, and
    the pool's record for `_pool.json`. Only the pairs kept need their texts."""

    runs, pairs, record = pool.pool_runs(run_paths, depth, qrels_path, holes_only)
    return _with_texts(pairs, topics_path, corpus_path, lambda *ids: pool.where(runs, depth, *ids)), record


def _with_texts(pairs: pa.Table, topics_path: str, corpus_path: str, where) -> pa.Table:
    """The pairs with their query text, passage text and title: PREPARED_SCHEMA's columns, then
    the pairs' others. `where(query_id[, doc_id])` names the run line of a missing id."""
    topics = read_topics(topics_path, set(pc.unique(pairs["query_id"]).to_pylist()))
    passages = read_corpus(corpus_path, set(pc.unique(pairs["doc_id"]).to_pylist()))
    query_at = _places_in(pairs, "query_id", topics, lambda q, d: f"{where(q)}: qid {q} not in topics {topics_path}")
    doc_at = _places_in(pairs, "doc_id", passages, lambda q, d: f"{where(q, d)}: docid {d} not in corpus {corpus_path}")
    texts = (("query", list(topics.values()), query_at), ("text", [text for text, _ in passages.values()], doc_at),
             ("title", [title for _, title in passages.values()], doc_at))
    columns = pairs.column_names
    for name, values, at in texts:
        pairs = pairs.append_column(PREPARED_SCHEMA.field(name), pa.array(values, pa.string()).take(at))
    return pairs.select([*PREPARED_SCHEMA.names, *(name for name in columns if name not in PREPARED_SCHEMA.names)])


def _places_in(pairs: pa.Table, column: str, known: dict, missing) -> pa.Array:
    """Each pair's place among the `known` ids; an unknown one is refused: `missing(query_id, doc_id)`."""
    at = pc.index_in(pairs[column], value_set=pa.array(list(known), pa.string()))
    if at.null_count:
        row = pc.index(pc.is_null(at), True).as_py()
        raise PrepareError(missing(pairs["query_id"][row].as_py(), pairs["doc_id"][row].as_py()))
    return at


def shard_slices(query_ids: pa.Array | pa.ChunkedArray, rows_per_shard: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard over rows grouped by query: whole queries are packed into
    shards of at most `rows_per_shard` rows; only a query longer than that is split."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    ids = query_ids.to_numpy(zero_copy_only=False)
    count = len(ids)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if count else np.zeros(0, int)
    slices = []
    shard_start = 0
    for group_start, group_stop in zip(starts.tolist(), [*starts[1:].tolist(), count]):
        if group_stop - shard_start > rows_per_shard and group_start > shard_start:
            slices.append((shard_start, group_start))
            shard_start = group_start
        while group_stop - shard_start > rows_per_shard:
            slices.append((shard_start, shard_start + rows_per_shard))
            shard_start += rows_per_shard
    if shard_start < count:
        slices.append((shard_start, count))
    return slices


def write_shards(
    table: pa.Table, output_url: str, rows_per_shard: int, storage_options: dict | None = None, overwrite: bool = False,
    pool_record: dict | None = None,
) -> list[str]:
    """Write the pairs as `pairs-00000.parquet`, ... under the output URL, sorted by query and
    first-stage rank, then a pool's record, and return the shards' URLs. Shards left by an earlier
    preparation would be read as input too, so they are refused, or deleted first with
    `overwrite`; an earlier pool's record, which would describe them, is deleted."""
    fs, root = fsspec.core.url_to_fs(output_url, **(storage_options or {}))
    root = root.rstrip("/")
    earlier = fs.glob(f"{root}/pairs-*.parquet")
    if earlier and not overwrite:
        raise FileExistsError(f"{output_url} already holds {len(earlier)} pairs-*.parquet shard(s)")
    if earlier or fs.exists(f"{root}/{POOL_RECORD}"):
        fs.rm(earlier + fs.glob(f"{root}/{POOL_RECORD}"))
    fs.makedirs(root, exist_ok=True)
    ordered = table.take(
        pc.sort_indices(
            table,
            sort_keys=[("query_id", "ascending"), ("first_stage_rank", "ascending"), ("doc_id", "ascending")],
            null_placement="at_end",
        )
    )
    written = []
    for number, (start, stop) in enumerate(shard_slices(ordered["query_id"], rows_per_shard)):
        name = SHARD_NAME.format(number)
        with fs.open(f"{root}/{name}", "wb") as handle:
            pq.write_table(ordered.slice(start, stop - start), handle)
        written.append(f"{output_url.rstrip('/')}/{name}")
    if pool_record is not None:
        with fs.open(f"{root}/{POOL_RECORD}", "w") as handle:
            json.dump(pool_record, handle, indent=2)
    return written


@click.command("prepare")
@click.option("--output", required=True, help="Directory URL for the Parquet shards (any fsspec URL).")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Most pairs per shard; a query is split only when it alone has more.")
@click.option("--rankllm", metavar="FILE", help="RankLLM retrieve results: a JSON list or JSONL requests.")
@click.option("--run", "run_paths", metavar="FILE", multiple=True,
              help="TREC run: qid Q0 docid rank score tag. Repeat it to pool several systems' runs (one tag each).")
@click.option("--topics", metavar="FILE", help="Queries of the TREC run: qid<TAB>text.")
@click.option("--corpus", metavar="FILE", help="Passages of the TREC run: TSV docid<TAB>text, or JSONL.")
@click.option("--depth", type=click.IntRange(min=1), metavar="K",
              help="Pool each run's top K by its rank column [default: all of each run]; pools even one run.")
@click.option("--judged", "qrels", metavar="QRELS", help="Pool, and mark the pairs these qrels judge (column judged).")
@click.option("--holes-only", is_flag=True, help="Keep only the pooled pairs that --judged does not judge.")
@click.option("--overwrite", is_flag=True, help="Replace pairs-*.parquet shards already under --output.")
def prepare_command(output, rows_per_shard, rankllm, run_paths, topics, corpus, depth, qrels, holes_only, overwrite):
    """Turn first-stage runs into Parquet shards of query-candidate pairs for `rank1-batch run`:
    one run as it is, or the pool of several."""
    trec = {"--run": run_paths, "--topics": topics, "--corpus": corpus}
    if rankllm and any(trec.values()):
        raise click.UsageError("give either --rankllm, or --run with --topics and --corpus, not both")
    if not rankllm and not all(trec.values()):
        missing = ", ".join(name for name, value in trec.items() if not value)
        raise click.UsageError(f"give --rankllm FILE, or --run, --topics and --corpus (missing {missing})")
    if rankllm and (depth or qrels):
        raise click.UsageError("--depth and --judged pool TREC runs (--run), not --rankllm")
    if holes_only and not qrels:
        raise click.UsageError("--holes-only needs --judged QRELS")
    try:
        if rankllm or (len(run_paths) == 1 and not depth and not qrels):
            table, record = (from_rankllm(rankllm) if rankllm else from_trec(run_paths[0], topics, corpus)), None
        else:
            table, record = from_pool(list(run_paths), topics, corpus, depth, qrels, holes_only)
        if table.num_rows == 0:
            raise PrepareError(f"{rankllm or ', '.join(run_paths)}: no pairs")
        written = write_shards(table, output, rows_per_shard, overwrite=overwrite, pool_record=record)
    except (PrepareError, OSError) as error:
        raise click.ClickException(str(error)) from None
    queries = pc.count_distinct(table["query_id"]).as_py()
    click.echo(f"{queries} queries, {table.num_rows} pairs, {len(written)} shards -> {output}")
