"""What a finished run reads back: each part file once, counts from the scores files' own commit
records (or from their columns when written before records), and the candidates to rank."""

from __future__ import annotations

from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from rank1_batch.config import JobConfig, RunConfig
from rank1_batch.output import commits
from rank1_batch.output.commits import RANKING_COLUMNS, commit_record, read_committed
from rank1_batch.output.storage import Output
from rank1_batch.run import finish
from rank1_batch.run.finish import write_ranked_outputs
from rank1_batch.schema import ERRORS_SCHEMA, RANKED_SCHEMA, SCORES_SCHEMA, UNSCORED_SCHEMA, conform


def scores(query: str, outcomes: list[str], reused: bool = False) -> pa.Table:
    rows = [
        {"query_id": query, "doc_id": f"{query}-d{n}", "score": 0.1 * n, "label": n > 4, "outcome": outcome,
         "logprob_true": -1.0, "logprob_false": -2.0, "reasoning_tokens": 10 * n, "prompt_tokens": 100 + n,
         "truncated": n == 1, "first_stage_rank": n, "first_stage_score": 9.0 - n, "reused": reused}
        for n, outcome in enumerate(outcomes, start=1)
    ]
    return pa.Table.from_pylist(rows, SCORES_SCHEMA)


def committed_output(path) -> tuple[Output, pa.Table]:
    """An output of several attempts: scores files with records and one from before records (and
    before the `reused` column), unscored, rejected and failed pairs; and every scored row."""
    output = Output(str(path), RunConfig())
    first, resumed = scores("q1", ["answered", "forced", "answered"]), scores("q2", ["fallback", "answered"], reused=True)
    for name, table in (("part-a.parquet", first), ("part-b.parquet", resumed)):
        output.write_table("scores", name, table, record=commit_record(table))
    # a scores file from before records (and before the `reused` column) is counted from its columns
    older = scores("q3", ["forced"]).drop_columns(["reused"])
    pq.write_table(older, path / "scores" / "part-c.parquet")
    output.write_table("unscored", "part-d.parquet",
                       pa.Table.from_pylist([{"query_id": "q1", "doc_id": "q1-d9", "first_stage_rank": 9}], UNSCORED_SCHEMA))
    output.write_table("rejects", "part-e.parquet", pa.table({"query_id": ["q4", "q4"], "reason": ["empty", "empty"]}))
    output.write_table("errors", "part-f.parquet", pa.Table.from_pylist(
        [{"query_id": "q5", "doc_id": "q5-d1", "error": "ValueError: out of vocabulary"}], ERRORS_SCHEMA))
    return output, pa.concat_tables([first, resumed, conform(older, SCORES_SCHEMA)])


def test_counts_add_up_the_commit_records_of_every_attempt(tmp_path):
    output, everything = committed_output(tmp_path)
    committed = read_committed(output, input_rows=10, num_cpus=1)
    assert committed.counts == {
        "input": 10, "scored": 6, "rejected": 2, "unscored": 1, "errors": 1,
        "outcomes": {"answered": 3, "forced": 2, "fallback": 1},
        "truncated": 3, "prompt_tokens": sum(everything["prompt_tokens"].to_pylist()),
        "reasoning_tokens": sum(everything["reasoning_tokens"].to_pylist()), "reused": 2,
    }
    assert committed.candidates.column_names == RANKING_COLUMNS
    assert sorted(committed.candidates["doc_id"].to_pylist()) == sorted([*everything["doc_id"].to_pylist(), "q1-d9"])


def test_a_file_with_a_record_is_read_for_its_ranking_columns_only(tmp_path):
    output = Output(str(tmp_path), RunConfig())
    table = scores("q1", ["answered", "forced"])
    output.write_table("scores", "part-a.parquet", table, record=commit_record(table))
    output.write_table("scores", "part-b.parquet", table)
    listed = output.listing("scores")
    read = [output.read_part(*file, RANKING_COLUMNS, SCORES_SCHEMA, without_record=["outcome"]) for file in listed.items()]
    parts = {part.record is not None: part for part in read}
    assert parts[True].table.column_names == RANKING_COLUMNS
    assert parts[True].record == commit_record(table)
    assert parts[False].table.column_names == [*RANKING_COLUMNS, "outcome"]
    assert pq.read_table(tmp_path / "scores" / "part-a.parquet").equals(table)  # the record adds no column
    footer_only = [output.read_part(*file, [], SCORES_SCHEMA) for file in listed.items()]
    assert [part.table for part in footer_only] == [None, None] and [part.rows for part in footer_only] == [2, 2]


def test_ray_data_ranks_and_counts_as_the_driver_does(ray_session, tmp_path):
    """Above RANKED_ON_DRIVER input rows, ranked/ and run.trec come from Ray Data, by query."""
    job = JobConfig()
    on_driver, _ = committed_output(tmp_path / "driver")
    on_ray, _ = committed_output(tmp_path / "ray")
    counts = write_ranked_outputs(on_driver, job, input_rows=10, num_cpus=1)
    with mock.patch.object(finish, "RANKED_ON_DRIVER", 5):
        assert write_ranked_outputs(on_ray, job, input_rows=10, num_cpus=1) == counts
    by_rank = [("query_id", "ascending"), ("rank", "ascending")]
    driver_ranked = on_driver.read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA).sort_by(by_rank)
    ray_ranked = on_ray.read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA).sort_by(by_rank)
    assert ray_ranked.equals(driver_ranked) and ray_ranked.num_rows == 7
    trec = {name: sorted((tmp_path / name / "run.trec").read_text().splitlines()) for name in ("driver", "ray")}
    assert trec["ray"] == trec["driver"] and "q1 Q0 q1-d9 4 1 rank1" in trec["ray"]  # the unscored tail last


def test_reading_tasks_count_and_gather_candidates_as_the_driver_does(ray_session, tmp_path):
    """An output of more files than one process reads is read by Ray tasks, a group each."""
    output, _ = committed_output(tmp_path)
    on_driver = read_committed(output, input_rows=10, num_cpus=1)
    with mock.patch.object(commits, "FILES_PER_READING_TASK", 1):
        in_tasks = read_committed(output, input_rows=10, num_cpus=1)
    assert in_tasks.counts == on_driver.counts
    by_key = [("query_id", "ascending"), ("doc_id", "ascending")]
    assert in_tasks.candidates.sort_by(by_key).equals(on_driver.candidates.sort_by(by_key))


def test_an_output_with_no_candidate_is_ranked_on_the_driver_at_any_size(ray_session, tmp_path):
    output = Output(str(tmp_path), RunConfig())
    output.write_table("rejects", "part-a.parquet", pa.table({"query_id": ["q1"], "reason": ["empty"]}))
    with mock.patch.object(finish, "RANKED_ON_DRIVER", 0):
        counts = write_ranked_outputs(output, JobConfig(), input_rows=1, num_cpus=1)
    assert (counts["rejected"], counts["scored"]) == (1, 0)
    assert output.read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA).num_rows == 0
    assert (tmp_path / "run.trec").read_text() == ""
