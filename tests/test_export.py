"""`export`: a run's traces as chat-messages training examples, each with the prompt the scorer
built for its pair, on a hand-built output (no engine)."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import EngineConfig, JobConfig, ScoringConfig
from rank1_batch.model.encoding import PromptEncoder
from rank1_batch.output.checkpoint import identity
from rank1_batch.schema import SCORES_SCHEMA, TRACES_SCHEMA, conform

TEMPLATE = "Find passages about: FILL_QUERY_HERE"
# The input, with its passage column named `passage` (mapped with --column text=passage).
INPUT = [
    {"query_id": "q1", "query": "river of Old Vale", "doc_id": "a", "passage": "The Esk runs through Old Vale.",
     "title": "Esk", "instruction": "briefly"},
    {"query_id": "q1", "query": "river of Old Vale", "doc_id": "b", "passage": "Bread rises in the oven.",
     "title": None, "instruction": None},
    {"query_id": "q1", "query": "river of Old Vale", "doc_id": "c", "passage": "Old Vale's mill stands on the Esk.",
     "title": "", "instruction": None},
    {"query_id": "q2", "query": "who built the mill", "doc_id": "d", "passage": "Ann Hale built the mill in 1820.",
     "title": None, "instruction": None},
    {"query_id": "q2", "query": "who built the mill", "doc_id": "e", "passage": "The mill's wheel is oak.",
     "title": None, "instruction": None},
    {"query_id": "q2", "query": "who built the mill", "doc_id": "f", "passage": "Trains stop here at noon.",
     "title": None, "instruction": None},
    {"query_id": "q2", "query": "who built the mill", "doc_id": "g", "passage": "A long passage, cut by the scorer.",
     "title": None, "instruction": None},
    # h appears twice: the run scored one of its rows, and which one is not known from the input
    {"query_id": "q2", "query": "who built the mill", "doc_id": "h", "passage": "One text.", "title": None,
     "instruction": None},
    {"query_id": "q2", "query": "who built the mill", "doc_id": "h", "passage": "Another text.", "title": None,
     "instruction": None},
]
# (query, doc, score, outcome, truncated): labels at 0.5.
SCORED = [
    ("q1", "a", 0.9, "answered", False), ("q1", "b", 0.1, "answered", False), ("q1", "c", 0.7, "forced", False),
    ("q2", "d", 0.8, "answered", False), ("q2", "e", 0.6, "answered", False), ("q2", "f", 0.2, "answered", False),
    ("q2", "g", 0.3, "answered", True), ("q2", "h", 0.4, "answered", False),
]
# b, d, f, a judged; a and d relevant (>= 2). e at 1. Label agrees: a (true, 3), b (false, 0), d (true, 2),
# f (false, 1); e is true against 1, not relevant at cut 2; c is not judged.
QRELS = "q1 0 a 3\nq1 0 b 0\nq2 0 d 2\nq2 0 e 1\nq2 0 f 1\n"


@pytest.fixture
def run_output(tmp_path):
    (tmp_path / "input").mkdir()
    pq.write_table(pa.Table.from_pylist(INPUT), tmp_path / "input" / "pairs-0.parquet")
    out = tmp_path / "out"
    job = JobConfig.from_options({"input": [str(tmp_path / "input")], "output": str(out), "model": "tiny",
                                  "columns": {"text": "passage"}, "task_template": TEMPLATE})
    out.mkdir()
    (out / "_job.json").write_text(json.dumps(identity(job)))
    columns = list(zip(*SCORED))
    scores = conform(pa.table({"query_id": columns[0], "doc_id": columns[1], "score": columns[2],
                               "label": [score >= 0.5 for score in columns[2]], "outcome": columns[3],
                               "truncated": columns[4]}), SCORES_SCHEMA)
    traces = pa.table({"query_id": columns[0], "doc_id": columns[1],
                       "reasoning": [f"Reasoning about {doc}." for doc in columns[1]]}).cast(TRACES_SCHEMA)
    for directory, table in (("scores", scores), ("traces", traces)):
        (out / directory).mkdir()
        pq.write_table(table, out / directory / "part-0.parquet")
    (tmp_path / "qrels.txt").write_text(QRELS)
    return tmp_path


def examples(path) -> dict:
    return {(row["query_id"], row["doc_id"]): row for row in map(json.loads, path.read_text().splitlines())}


def test_each_example_holds_the_scorers_prompt_and_the_runs_trace_and_label(run_output):
    target = run_output / "train.jsonl"
    result = CliRunner().invoke(main, ["export", str(run_output / "out"), "--to", str(target)])
    assert result.exit_code == 0, result.output
    assert "6 examples of 8 scored pairs written" in result.output
    assert "repeated in the input 1" in result.output and "truncated 1" in result.output
    written = examples(target)
    assert sorted(written) == [("q1", "a"), ("q1", "b"), ("q1", "c"), ("q2", "d"), ("q2", "e"), ("q2", "f")]
    encoder = PromptEncoder.for_model(EngineConfig(model="tiny", max_model_len=1024, max_reasoning_tokens=64),
                                      ScoringConfig(task_template=TEMPLATE))
    texts = {(row["query_id"], row["doc_id"]): row for row in INPUT}
    for query_id, doc_id, score, *_ in SCORED:
        if (query_id, doc_id) not in written:
            continue
        row, pair = written[query_id, doc_id], texts[query_id, doc_id]
        user, assistant = row["messages"]
        # The scorer's prompt, read back from its token ids: everything before the opening <think>.
        ids = encoder.encode(pair["query"], pair["passage"], pair["title"], pair["instruction"]).token_ids
        assert user == {"role": "user", "content": encoder.tokenizer.decode(ids).removesuffix("<think>")}
        answer = "true" if score >= 0.5 else "false"
        assert assistant == {"role": "assistant", "content": f"<think>Reasoning about {doc_id}.</think> {answer}"}
        assert row["score"] == score
    prompt = written["q1", "a"]["messages"][0]["content"]
    assert "Query: Find passages about: river of Old Vale briefly\nPassage: Esk The Esk" in prompt


def test_the_qrels_filter_keeps_exactly_the_agreeing_pairs(run_output):
    target = run_output / "agreeing.jsonl.gz"
    result = CliRunner().invoke(main, ["export", str(run_output / "out"), "--to", str(target),
                                       "--qrels", str(run_output / "qrels.txt")])
    assert result.exit_code == 0, result.output
    lines = gzip.decompress(target.read_bytes()).decode().splitlines()
    assert sorted((row["query_id"], row["doc_id"]) for row in map(json.loads, lines)) == [
        ("q1", "a"), ("q1", "b"), ("q2", "d"), ("q2", "f")]
    assert "not judged in the qrels 1, label disagrees with the qrels 1" in result.output
    lenient = run_output / "lenient.jsonl"
    CliRunner().invoke(main, ["export", str(run_output / "out"), "--to", str(lenient),
                              "--qrels", str(run_output / "qrels.txt"), "--relevance-cut", "1"])
    # From 1, e (true) agrees and f (false) does not.
    assert sorted(examples(lenient)) == [("q1", "a"), ("q1", "b"), ("q2", "d"), ("q2", "e")]


def test_answered_only_and_balance(run_output):
    runner = CliRunner()
    answered = run_output / "answered.jsonl"
    result = runner.invoke(main, ["export", str(run_output / "out"), "--to", str(answered), "--answered-only"])
    assert result.exit_code == 0 and "not answered 1" in result.output
    assert ("q1", "c") not in examples(answered) and len(examples(answered)) == 5
    # Of the 5: a, d, e true and b, f false; balanced, 2 of the 3 positives are drawn.
    draws = []
    for seed in ("1", "1", "2", "3", "4"):
        balanced = run_output / f"balanced-{seed}.jsonl"
        result = runner.invoke(main, ["export", str(run_output / "out"), "--to", str(balanced), "--answered-only",
                                      "--balance", "--seed", seed])
        assert result.exit_code == 0 and "to balance 1" in result.output
        written = examples(balanced)
        labels = [row["messages"][1]["content"].endswith("true") for row in written.values()]
        assert labels.count(True) == labels.count(False) == 2 and {("q1", "b"), ("q2", "f")} <= set(written)
        draws.append(sorted(written))
    assert draws[0] == draws[1] and len({tuple(draw) for draw in draws}) > 1


def test_an_input_moved_since_the_run_is_given_with_input(run_output):
    moved = run_output / "moved"
    (run_output / "input").rename(moved)
    target = run_output / "train.jsonl"
    missing = CliRunner().invoke(main, ["export", str(run_output / "out"), "--to", str(target)])
    assert missing.exit_code == 1 and "no such file or directory" in missing.output and not target.exists()
    result = CliRunner().invoke(main, ["export", str(run_output / "out"), "--to", str(target), "--input", str(moved)])
    assert result.exit_code == 0, result.output
    assert len(examples(target)) == 6
