"""A batch's commit, and what a finished output holds counted from the commits: each scores/ file
keeps in its footer what it commits (its record), so that counting an output reads records rather
than every column of every file."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..model.judgement import OUTCOMES
from ..schema import ERRORS_SCHEMA, SCORES_SCHEMA, TRACES_SCHEMA, UNSCORED_SCHEMA, count_values, relevance_labels
from .parallel_reads import FILES_PER_READING_TASK, in_groups, in_parallel
from .storage import Output, Part

RANKING_COLUMNS = ["query_id", "doc_id", "score", "first_stage_rank"]
RANKING_SCHEMA = pa.schema([SCORES_SCHEMA.field(name) for name in RANKING_COLUMNS])
UNSCORED_COLUMNS = ["query_id", "doc_id", "first_stage_rank"]
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


def write_results(scored: pa.Table, errors: pa.Table, name: str, job: JobConfig, output: Output,
                  reasons: bool) -> None:
    """Commit a batch: traces and labels first, as a scores file marks its pairs done (and carries
    their counts in its footer); failed pairs go to errors/, which a re-run does not count as done.
    The writes before the scores file go out at once: on object storage each is a round trip.
    Traces are written when the job asks for them and the scorer `reasons`."""
    if errors.num_rows:
        first = [lambda: output.write_table("errors", name, errors.cast(ERRORS_SCHEMA))]
    else:  # an earlier attempt of this batch may have failed where this one did not
        first = [lambda: output.remove_file(f"errors/{name}")]
    if scored.num_rows and job.run.write_traces and reasons:
        first.append(lambda: output.write_table("traces", name, scored.select(TRACES_SCHEMA.names).cast(TRACES_SCHEMA)))
    if scored.num_rows and job.run.labels:
        first.append(lambda: output.write_table(
            "labels", name, relevance_labels(scored, job.engine.model, job.run.labels_answered_only)))
    in_parallel(lambda write: write(), first)
    if not scored.num_rows:
        return
    scores = scored.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)
    output.write_table("scores", name, scores, record=commit_record(scores))
