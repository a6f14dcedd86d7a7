"""Qrels out of a run: TREC's and TREC RAG's forms, merged with human judgments, with provenance;
and how a pair's samples become one label (`--aggregate`)."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import JobConfig, RunConfig
from rank1_batch.ir.evaluate import read_qrels
from rank1_batch.ir.qrels import read_provenance
from rank1_batch.model.judgement import consensus
from rank1_batch.output.checkpoint import ConfigurationChanged, check_output, identity
from rank1_batch.output.layout import JOB_FILE, MANIFEST
from rank1_batch.output.storage import Output
from rank1_batch.schema import SCORES_SCHEMA, conform, pair_grades

from .conftest import tiny_job

CUTS = (0.25, 0.5, 0.75)
# (query, doc, score): grades at CUTS 3, 1, 0 and 2; labels at 0.5 true, false, false, true.
SCORED = [("q1", "b", 0.8), ("q1", "a", 0.3), ("q2", "c", 0.1), ("q2", "d", 0.6)]
HUMAN = "q1 0 a 3\nq1 0 z 1\nq3 0 x 2\n"


def write_output(directory, grades: tuple | None, task_template: str | None = None) -> str:
    job = JobConfig.from_options({"input": ["in/"], "output": str(directory), "model": "tiny", "grades": grades,
                                  "task_template": task_template, "samples": 3, "temperature": 0.7,
                                  "aggregate": "mode", "run_tag": "mine"})
    query_ids, doc_ids, scores = zip(*SCORED)
    table = pa.table({"query_id": query_ids, "doc_id": doc_ids, "score": scores,
                      "label": [score >= 0.5 for score in scores],
                      "grade": pair_grades(pa.table({"score": scores, "sample_scores": pa.nulls(4, pa.list_(pa.float64()))}),
                                           grades, "mean")})
    (directory / "scores").mkdir(parents=True)
    pq.write_table(conform(table, SCORES_SCHEMA), directory / "scores" / "part-0.parquet")
    # as a finished run leaves them: its identity in _job.json, the whole job in the manifest
    (directory / JOB_FILE).write_text(json.dumps(identity(job)))
    (directory / MANIFEST).write_text(json.dumps({"job": job.to_dict()}))
    return str(directory)


@pytest.fixture
def graded(tmp_path):
    return write_output(tmp_path / "graded", CUTS)


def qrels_of(runner_args, target) -> list[str]:
    result = CliRunner().invoke(main, runner_args)
    assert result.exit_code == 0, result.output
    return open(target).read().splitlines()


def test_a_graded_runs_qrels_are_its_grades_line_by_line_with_provenance(graded, tmp_path):
    target = str(tmp_path / "llm.qrels")
    lines = qrels_of(["qrels", graded, "--to", target], target)
    assert lines == ["q1 0 a 1", "q1 0 b 3", "q2 0 c 0", "q2 0 d 2"]  # sorted by query, then passage
    provenance = read_provenance(target).to_pylist()
    assert [(row["doc_id"], row["source"], row["model_score"]) for row in provenance] == [
        ("a", "model", 0.3), ("b", "model", 0.8), ("c", "model", 0.1), ("d", "model", 0.6)]
    first = provenance[0]
    assert first["model"] == "tiny" and first["output"] == graded and first["aggregate"] == "mode"
    assert json.loads(first["sampling"]) == {"samples": 3, "temperature": 0.7, "top_p": 1.0}
    assert "Query: {query}\nPassage: {passage}" in first["template"]
    assert first["template_sha256"] == hashlib.sha256(first["template"].encode()).hexdigest()


def test_a_binary_runs_qrels_are_its_labels_and_rag_form_has_six_columns(tmp_path):
    binary = write_output(tmp_path / "binary", None, task_template="Find: FILL_QUERY_HERE")
    target = str(tmp_path / "llm.qrels")
    assert qrels_of(["qrels", binary, "--to", target], target) == ["q1 0 a 0", "q1 0 b 1", "q2 0 c 0", "q2 0 d 1"]
    assert "Query: Find: {query}" in read_provenance(target)["template"][0].as_py()
    rag = str(tmp_path / "rag.qrels")
    assert qrels_of(["qrels", binary, "--to", rag, "--format", "rag"], rag) == [
        "q1 Q0 a 0 0.3 mine", "q1 Q0 b 1 0.8 mine", "q2 Q0 c 0 0.1 mine", "q2 Q0 d 1 0.6 mine"]
    # what eval and agreement read: the six columns as qrels
    assert read_qrels(rag) == {"q1": {"a": 0, "b": 1}, "q2": {"c": 0, "d": 1}}


def test_merged_qrels_keep_every_human_judgment_and_fill_exactly_the_holes(graded, tmp_path):
    (tmp_path / "human.qrels").write_text(HUMAN)
    target = str(tmp_path / "merged.qrels")
    lines = qrels_of(["qrels", graded, "--to", target, "--merge", str(tmp_path / "human.qrels")], target)
    # q1 a is judged 3 by a person (the model said 1): the person wins. b, c and d are holes the
    # model fills; z and x keep their human judgments though the run never scored them.
    assert lines == ["q1 0 a 3", "q1 0 b 3", "q1 0 z 1", "q2 0 c 0", "q2 0 d 2", "q3 0 x 2"]
    sources = {(row["query_id"], row["doc_id"]): (row["source"], row["output"])
               for row in read_provenance(target).to_pylist()}
    human = str(tmp_path / "human.qrels")
    assert sources == {("q1", "a"): ("human", human), ("q1", "z"): ("human", human), ("q3", "x"): ("human", human),
                       ("q1", "b"): ("model", graded), ("q2", "c"): ("model", graded), ("q2", "d"): ("model", graded)}
    rag = str(tmp_path / "merged-rag.qrels")
    assert qrels_of(["qrels", graded, "--to", rag, "--merge", human, "--format", "rag"], rag)[:2] == [
        "q1 Q0 a 3 1 human", "q1 Q0 b 3 0.8 mine"]


@pytest.mark.parametrize("human, message", [
    ("q7 0 a 1\nq8 0 b 0\n", "share no query"),
    ("q1 0 a 1\nq1 0 b high\n", "line 2: 'q1 0 b high' is not qrels"),
    ("q1 0 a\n", "line 1: 'q1 0 a' is not qrels"),
])
def test_bad_merge_qrels_are_an_error_and_nothing_is_written(graded, tmp_path, human, message):
    (tmp_path / "human.qrels").write_text(human)
    target = tmp_path / "merged.qrels"
    result = CliRunner().invoke(main, ["qrels", graded, "--to", str(target), "--merge", str(tmp_path / "human.qrels")])
    assert result.exit_code == 1 and message in result.output
    assert not target.exists() and not (tmp_path / "merged.qrels.provenance.parquet").exists()


def test_a_directory_that_is_not_an_output_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["qrels", str(tmp_path), "--to", str(tmp_path / "q")])
    assert result.exit_code == 1 and "no _job.json, so not a rank1-batch output" in result.output


def test_mode_takes_the_most_common_sample_grade_and_a_tie_goes_to_the_lower():
    scored = pa.table({"score": [0.6, 0.5, 0.45, 0.9],
                       "sample_scores": pa.array([[0.8, 0.3, 0.7], [0.9, 0.1], None, [0.8, 0.9, 0.3, 0.1]],
                                                 pa.list_(pa.float64()))})
    # Sample grades at CUTS: [3, 1, 2] a three-way tie -> 1; [3, 0] a tie -> 0; no samples: the
    # score's grade, 1; [3, 3, 1, 0] -> 3. The mean's grades are those of 0.6, 0.5, 0.45, 0.9.
    assert pair_grades(scored, CUTS, "mode").to_pylist() == [1, 0, 1, 3]
    assert pair_grades(scored, CUTS, "mean").to_pylist() == [2, 2, 1, 3]
    assert pair_grades(scored, None, "mode").null_count == 4


def test_by_mode_a_tie_of_votes_is_false_whatever_the_mean():
    # two votes each way; the mean 0.575 is above the threshold, which decides a tie by the mean
    assert consensus([0.9, 0.2, 0.3, 0.9], 0.5).label is True
    mode = consensus([0.9, 0.2, 0.3, 0.9], 0.5, "mode")
    assert (mode.label, mode.agreement, mode.chosen) == (False, 0.5, 1)
    assert consensus([0.9, 0.2, 0.9], 0.5, "mode").label is True


def test_the_aggregate_is_recorded_and_a_resume_checks_it(tmp_path):
    output = Output(str(tmp_path / "out"), RunConfig())
    by_mean = tiny_job(output=str(tmp_path / "out"))
    recorded = identity(by_mean)
    del recorded["scoring"]["aggregate"]  # an output made before the option: it ran by the mean
    output.write_bytes(JOB_FILE, json.dumps(recorded).encode())
    check_output(output, by_mean)
    by_mode = tiny_job(output=str(tmp_path / "out"), aggregate="mode")
    assert identity(by_mode)["scoring"]["aggregate"] == "mode"
    with pytest.raises(ConfigurationChanged, match="scoring.aggregate: 'mean' -> 'mode'"):
        check_output(output, by_mode)
    with pytest.raises(ValueError, match="--aggregate 'median': expected mean or mode"):
        tiny_job(aggregate="median")
