"""Compaction of a finished run's part files: what a kill at any point of it leaves is resumed
with every pair exactly once, and a run with --compact ends with few files and the same results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.output.checkpoint import done_in, open_output
from rank1_batch.output.commits import commit_record
from rank1_batch.output.compaction import COMPACTED_PREFIX, compacted_name, groups, merge
from rank1_batch.output.key_index import KEY_SCHEMA, InputKeys
from rank1_batch.output.storage import Output
from rank1_batch.schema import SCORES_SCHEMA, TRACES_SCHEMA

from .conftest import candidate_lists, pair_keys, read_dir, tiny_job, tiny_run_options, write_shards

BATCHES = [[("q1", "d1"), ("q1", "d2")], [("q1", "d3")], [("q2", "d1"), ("q2", "d2")]]
NAMES = [f"part-{number}.parquet" for number in range(len(BATCHES))]


def test_groups_gather_files_up_to_the_target_and_leave_a_lone_file_alone():
    sizes = {"a": 40, "b": 70, "c": 10, "d": 300, "e": 5}
    assert groups(sizes, target=100) == [["a", "b"], ["c", "d"]]  # "e" would be alone
    assert groups({"a": 500}, target=100) == []


def committed_batches(tmp_path: Path) -> tuple[Output, object]:
    """An output claimed by a job, with three batches committed as a run commits them."""
    job = tiny_job(input=["unused"], output=str(tmp_path / "out"))
    output = Output(job.run.output, job.run)
    open_output(output, job)
    for name, pairs in zip(NAMES, BATCHES):
        rows = [{"query_id": q, "doc_id": d, "score": 0.5, "outcome": "answered", "reasoning_tokens": 3,
                 "prompt_tokens": 9, "truncated": False, "first_stage_rank": 1, "reused": False} for q, d in pairs]
        scores = pa.Table.from_pylist(rows, SCORES_SCHEMA)
        traces = pa.Table.from_pylist([{"query_id": q, "doc_id": d, "reasoning": "because"} for q, d in pairs], TRACES_SCHEMA)
        output.write_table("traces", name, traces)
        output.write_table("scores", name, scores, record=commit_record(scores))
    return output, job


def part_names(output: Output, directory: str) -> list[str]:
    return [path.rsplit("/", 1)[-1] for path in output.files(directory)]


def every_pair_once(output: Output, job) -> None:
    """What a resume of the output finds: each pair once among the done keys, in scores/ and in traces/."""
    listed = open_output(output, job)
    queries = pa.table({"query_id": ["q1", "q2"], "partition": pa.array([0, 0], pa.int32())})
    done = done_in(output, listed, InputKeys(KEY_SCHEMA.empty_table(), queries, {"input": 0}), num_cpus=0.5)
    keys = done.keys.for_shards(pa.array(["input"]))
    expected = sorted(pair for batch in BATCHES for pair in batch)
    assert sorted(zip(keys["query_id"].to_pylist(), keys["doc_id"].to_pylist())) == expected
    for directory in ("scores", "traces"):
        table = pa.concat_tables([pq.read_table(path) for path in output.files(directory)], promote_options="default")
        assert sorted(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist())) == expected, directory


def test_a_merge_replaces_a_group_and_its_twins_by_one_file_each(ray_session, tmp_path):
    output, job = committed_batches(tmp_path)
    merge(output, "scores", output.sizes("scores"), {"traces": output.sizes("traces")})
    merged = compacted_name(NAMES)
    assert part_names(output, "scores") == part_names(output, "traces") == [merged]
    record = json.loads(pq.read_schema(output.path("scores", merged)).metadata[b"rank1_batch.commit"])
    assert record["scored"] == 5 and record["replaces"] == NAMES
    every_pair_once(output, job)


def test_a_kill_after_the_merged_twins_and_before_the_commit_leaves_the_batches(ray_session, tmp_path):
    output, job = committed_batches(tmp_path)
    out, saved = tmp_path / "out", tmp_path / "saved"
    shutil.copytree(out, saved)
    merge(output, "scores", output.sizes("scores"), {"traces": output.sizes("traces")})
    merged = compacted_name(NAMES)
    # the state a kill leaves between the merged traces file and its scores file
    merged_traces = (out / "traces" / merged).read_bytes()
    for directory in ("scores", "traces"):
        shutil.rmtree(out / directory)
        shutil.copytree(saved / directory, out / directory)
    (out / "traces" / merged).write_bytes(merged_traces)
    every_pair_once(output, job)  # the resume removed the merged traces file as an orphan
    assert merged not in part_names(output, "traces")


def test_a_kill_while_the_replaced_files_are_removed_is_finished_by_the_resume(ray_session, tmp_path):
    output, job = committed_batches(tmp_path)
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "out", saved)
    merge(output, "scores", output.sizes("scores"), {"traces": output.sizes("traces")})
    # the state a kill leaves after the commit, with the first trace removed and nothing else
    for directory in ("scores", "traces"):
        for name in NAMES[1:] if directory == "traces" else NAMES:
            shutil.copy(saved / directory / name, tmp_path / "out" / directory / name)
    every_pair_once(output, job)
    assert part_names(output, "scores") == part_names(output, "traces") == [compacted_name(NAMES)]


def test_a_run_with_compact_ends_with_one_file_per_directory_and_resumes(ray_session, tmp_path):
    pairs = candidate_lists(queries=3, per_query=6, seed=51).drop_columns(["relevant"])
    write_shards(pairs, tmp_path / "input", shards=3)
    options = ["run", "--input", str(tmp_path / "input"), "--output", str(tmp_path / "out"), "--top-k", "4",
               "--batch-size", "4", "--compact", *tiny_run_options()]
    finished = CliRunner().invoke(main, options)
    assert finished.exit_code == 0, finished.output
    out = tmp_path / "out"
    for directory in ("scores", "traces"):  # three batches of four, merged
        names = [path.name for path in (out / directory).glob("*.parquet")]
        assert len(names) == 1 and names[0].startswith(COMPACTED_PREFIX), (directory, names)
    assert len(list((out / "unscored").glob("*.parquet"))) == 1  # merged, or written as one file
    assert pair_keys(read_dir(out / "scores")) == pair_keys(pairs.filter(pa.compute.less_equal(pairs["first_stage_rank"], 4)))
    assert pair_keys(read_dir(out / "ranked")) == pair_keys(pairs)
    counts = json.loads((out / "_manifest.json").read_text())["counts"]
    assert (counts["scored"], counts["unscored"]) == (12, 6)
    again = CliRunner().invoke(main, options)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "_manifest.json").read_text())["scored_this_run"] == 0
