"""The users' whole path on a small sample with the tiny model: prepare a RankLLM first-stage
run, rerank it with graded relevance labels, evaluate it, measure and calibrate its labels against
qrels, export its traces, and report on it."""

from __future__ import annotations

import json

import pyarrow.compute as pc
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.run.pipeline import run

from .conftest import candidate_lists, read_dir, tiny_job


def test_prepare_run_eval_labels_report(ray_session, tmp_path):
    pairs = candidate_lists(queries=3, per_query=6, seed=61)
    rankllm = []
    for query_id in sorted(set(pairs["query_id"].to_pylist())):
        rows = pairs.filter(pc.equal(pairs["query_id"], query_id)).to_pylist()
        hits = [{"content": r["text"], "qid": query_id, "docid": r["doc_id"], "rank": r["first_stage_rank"],
                 "score": r["first_stage_score"]} for r in rows]
        rankllm.append({"query": rows[0]["query"], "hits": hits})
    (tmp_path / "bm25.json").write_text(json.dumps(rankllm))
    (tmp_path / "qrels.txt").write_text(
        "".join(f"{r['query_id']} 0 {r['doc_id']} {int(r['relevant'])}\n" for r in pairs.to_pylist())
    )
    cli = CliRunner()

    prepared = cli.invoke(main, ["prepare", "--output", str(tmp_path / "pairs"), "--rankllm", str(tmp_path / "bm25.json"),
                                 "--rows-per-shard", "6"])
    assert prepared.exit_code == 0, prepared.output

    output = tmp_path / "output"
    cuts = (0.25, 0.5, 0.75)
    manifest = run(tiny_job(input=[str(tmp_path / "pairs")], output=str(output), labels=True, grades=cuts),
                   show_progress=False)
    assert manifest["counts"]["scored"] == pairs.num_rows
    labels = read_dir(output / "labels")
    assert labels.num_rows == pairs.num_rows and set(labels["model"].to_pylist()) == {"tiny"}
    assert all(text for text in labels["rationale"].to_pylist())
    scores = read_dir(output / "scores")
    by_pair = dict(zip(zip(scores["query_id"].to_pylist(), scores["doc_id"].to_pylist()), scores["score"].to_pylist()))
    for table in (scores, labels):
        for query_id, doc_id, grade in zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(),
                                           table["grade"].to_pylist()):
            assert grade == sum(by_pair[query_id, doc_id] >= cut for cut in cuts)

    agreement = cli.invoke(main, ["agreement", "--run", str(output), "--qrels", str(tmp_path / "qrels.txt"),
                                  "--relevance-cut", "1", "--json"])
    assert agreement.exit_code == 0, agreement.output
    agreed = json.loads(agreement.output)
    assert agreed["judged"] == pairs.num_rows and agreed["graded"] is not None
    calibrated = cli.invoke(main, ["calibrate", "--run", str(output), "--qrels", str(tmp_path / "qrels.txt"),
                                   "--relevance-cut", "1", "--json"])
    assert calibrated.exit_code == 0, calibrated.output
    assert json.loads(calibrated.output)["kappa"] >= agreed["binary"]["kappa"]
    exported = cli.invoke(main, ["export", str(output), "--to", str(tmp_path / "train.jsonl")])
    assert exported.exit_code == 0, exported.output
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == pairs.num_rows

    evaluated = cli.invoke(main, ["eval", "--run", str(output), "--qrels", str(tmp_path / "qrels.txt"),
                                  "--relevance-level", "1", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    figures = json.loads(evaluated.output)
    assert figures["queries"] == 3 and set(figures["first_stage"]) == set(figures["reranked"])
    # The tiny model knows its world: reranking must beat a shuffled first stage.
    assert figures["reranked"]["nDCG@10"] > figures["first_stage"]["nDCG@10"]

    reported = cli.invoke(main, ["report", str(output), "--qrels", str(tmp_path / "qrels.txt"), "--relevance-level", "1"])
    assert reported.exit_code == 0, reported.output
    report = (output / "report" / "report.md").read_text()
    assert "nDCG@10" in report and all((output / "report" / name).exists() for name in
                                       ("score-histogram.png", "outcomes.png", "reasoning-tokens.png", "rank-movement.png"))
