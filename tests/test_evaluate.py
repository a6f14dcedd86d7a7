import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.ir.evaluate import (
    eval_command,
    evaluate,
    judged_queries,
    measures,
    metric_names,
    read_qrels,
    read_run,
    run_from_ranks,
)
from rank1_batch.schema import RANKED_SCHEMA

# Graded judgments. q3 is judged but not retrieved; the run's q4 is not judged.
QRELS = {"q1": {"a": 3, "b": 0, "c": 2, "d": 1, "e": 2}, "q2": {"x": 2, "y": 0}, "q3": {"z": 2}}
ORDER = {"q1": ["b", "a", "d", "c"], "q2": ["y", "w", "x"], "q4": ["m"]}


def ranked_table(order: dict[str, list[str]]) -> pa.Table:
    rows = [(q, d, position) for q, docs in order.items() for position, d in enumerate(docs, 1)]
    return pa.table({"query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows], "rank": [r[2] for r in rows]})


def by_hand() -> dict[str, float]:
    """The measures of ORDER against QRELS, worked out from their definitions, over q1 and q2."""
    log2 = math.log2
    # nDCG@10: gain = grade, discount log2(rank + 1), ideal from every judgment of the query.
    ndcg_q1 = (0 + 3 / log2(3) + 1 / log2(4) + 2 / log2(5)) / (3 + 2 / log2(3) + 2 / log2(4) + 1 / log2(5))
    ndcg_q2 = (2 / log2(4)) / 2
    # Relevant from grade 2: q1 {a, c, e}, q2 {x}.
    rr = (1 / 2 + 1 / 3) / 2  # a at rank 2, x at rank 3
    ap_q1 = (1 / 2 + 2 / 4) / 3  # a at 2, c at 4, e never retrieved
    ap_q2 = (1 / 3) / 1
    recall = (2 / 3 + 1 / 1) / 2
    return {"nDCG@10": (ndcg_q1 + ndcg_q2) / 2, "MRR@10": rr, "Recall@100": recall, "MAP": (ap_q1 + ap_q2) / 2}


def test_default_metrics_match_hand_computed_values():
    run = run_from_ranks(ranked_table(ORDER), "rank")
    assert judged_queries(run, QRELS) == {"q1", "q2"}
    assert evaluate(run, QRELS) == pytest.approx(by_hand(), abs=1e-9)


def test_relevance_level_moves_binary_measures_only():
    run = run_from_ranks(ranked_table(ORDER), "rank")
    level_1 = evaluate(run, QRELS, ["MAP", "nDCG@10"], relevance_level=1)
    # From grade 1, q1 also counts d: a at 2, d at 3, c at 4 of {a, c, d, e}.
    assert level_1["MAP"] == pytest.approx(((1 / 2 + 2 / 3 + 3 / 4) / 4 + 1 / 3) / 2)
    assert level_1["nDCG@10"] == pytest.approx(by_hand()["nDCG@10"])


def test_given_queries_count_a_missing_one_as_zero():
    run = run_from_ranks(ranked_table(ORDER), "rank")
    values = evaluate(run, QRELS, ["MAP"], queries={"q1", "q2", "q3"})
    assert values["MAP"] == pytest.approx(by_hand()["MAP"] * 2 / 3)


def test_rank_derived_scores_keep_rank_order_when_real_scores_tie():
    table = ranked_table(ORDER)
    run = run_from_ranks(table, "rank")
    assert run["q1"] == {"b": 4.0, "a": 3.0, "d": 2.0, "c": 1.0}
    # With the real, tied scores TREC tools would order q1 by docid (d, c, b, a) instead.
    tied = {query_id: {doc_id: 0.5 for doc_id in docs} for query_id, docs in ORDER.items()}
    assert evaluate(tied, QRELS, ["nDCG@10"])["nDCG@10"] != pytest.approx(by_hand()["nDCG@10"])


def test_equal_ranks_fall_back_to_doc_id_and_missing_ranks_are_left_out():
    table = pa.table({"query_id": ["q"] * 4, "doc_id": ["z", "y", "x", "w"], "rank": [1, 2, 2, None]})
    assert list(run_from_ranks(table, "rank")["q"]) == ["z", "x", "y"]


def test_metric_names_and_measures():
    assert metric_names(["nDCG@10,MRR@10 Recall@100", "RR(rel=1,judged_only=True)@10", " MAP ,"]) == [
        "nDCG@10", "MRR@10", "Recall@100", "RR(rel=1,judged_only=True)@10", "MAP"
    ]
    parsed = measures(["MAP", "RR(rel=1)@10", "nDCG@10", "P@5"], relevance_level=2)
    assert [m.params.get("rel") for m in parsed.values()] == [2, 1, None, 2]
    with pytest.raises(ValueError, match="unknown metric 'ndcg'"):
        measures(["ndcg"])


@pytest.fixture
def output(tmp_path):
    """A rank1-batch output: the reranker put b first; d has no first-stage rank."""
    first_stage = {"a": 1, "b": 2, "c": 3, "d": None, "y": 1, "w": 2, "x": 3, "m": 1}
    table = ranked_table(ORDER)
    table = table.append_column("score", pa.array([0.5] * table.num_rows, pa.float64())).append_column(
        "first_stage_rank", pa.array([first_stage[d] for d in table["doc_id"].to_pylist()], pa.int64())
    )
    (tmp_path / "ranked").mkdir()
    pq.write_table(table.select(RANKED_SCHEMA.names).cast(RANKED_SCHEMA), tmp_path / "ranked" / "part-00000.parquet")
    return tmp_path


@pytest.fixture
def qrels_file(tmp_path):
    path = tmp_path / "qrels.txt"
    lines = [f"{q} {'Q0' if q == 'q1' else '0'} {d} {grade}" for q, docs in QRELS.items() for d, grade in docs.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_run_of_an_output_gives_both_orders(output):
    runs = read_run(str(output))
    assert list(runs.reranked["q1"]) == ["b", "a", "d", "c"]
    assert list(runs.first_stage["q1"]) == ["a", "b", "c"]
    assert list(runs.first_stage["q2"]) == ["y", "w", "x"]


def test_read_run_of_a_trec_file_keeps_its_scores_and_has_no_first_stage(tmp_path, qrels_file):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 a 1 2.5 bm25\nq1 Q0 b 2 1.5 bm25\n")
    assert read_run(str(path)) == ({"q1": {"a": 2.5, "b": 1.5}}, None)
    assert read_qrels(qrels_file) == QRELS


def test_eval_command_json(output, qrels_file):
    result = CliRunner().invoke(eval_command, ["--run", str(output), "--qrels", qrels_file, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"reranked", "first_stage", "queries"}
    assert report["queries"] == 2
    assert report["reranked"] == pytest.approx(by_hand())
    # First stage on q1: a, b, c; a (grade 3) first, so RR = 1 on q1, and x still third on q2.
    assert report["first_stage"]["MRR@10"] == pytest.approx((1 + 1 / 3) / 2)


def test_eval_command_table_and_trec_file(tmp_path, output, qrels_file):
    runner = CliRunner()
    table = runner.invoke(eval_command, ["--run", str(output), "--qrels", qrels_file, "--metrics", "nDCG@10 P@1"])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["metric", "reranked", "first", "stage"]
    assert [line.split()[0] for line in table.output.splitlines()[1:3]] == ["nDCG@10", "P@1"]
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 a 1 2.5 bm25\n")
    report = json.loads(runner.invoke(eval_command, ["--run", str(path), "--qrels", qrels_file, "--json"]).output)
    assert report["first_stage"] == {} and report["queries"] == 1
    bad = runner.invoke(eval_command, ["--run", str(path), "--qrels", qrels_file, "--metrics", "nope@3"])
    assert bad.exit_code == 2 and "unknown metric 'nope@3'" in bad.output
