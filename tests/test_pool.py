import json
import logging
import math
import re

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.ir.input_files import PREPARED_SCHEMA
from rank1_batch.ir.pool import POOL_SCHEMA, build_pool, read_run_table, read_runs
from rank1_batch.ir.prepare import prepare_command

TOPICS = {"1": "how long do fleas live", "2": "wifi vs bluetooth"}
PASSAGES = {"d1": "Fleas live up to a year.", "d2": "A flea cycle lasts 20 days.", "d3": "Fleas jump.",
            "d4": "Bluetooth is short range.", "d5": "Flea collars."}
# (query_id, doc_id, rank) of two systems; splade is given first, so pooled_by's order is the
# systems' names, not the runs'.
SPLADE = [("1", "d2", 1), ("1", "d5", 2), ("1", "d1", 3), ("2", "d4", 2)]
BM25 = [("1", "d1", 1), ("1", "d2", 2), ("1", "d3", 3), ("2", "d4", 1)]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def run_file(path, tag, rows):
    return write(path, [f"{q} Q0 {d} {r} {10 - r}.5 {tag}" for q, d, r in rows])


@pytest.fixture
def runs(tmp_path):
    return [run_file(tmp_path / "splade.trec", "splade", SPLADE), run_file(tmp_path / "bm25.trec", "bm25", BM25)]


@pytest.fixture
def texts(tmp_path):
    topics = write(tmp_path / "topics.tsv", [f"{q}\t{text}" for q, text in TOPICS.items()])
    corpus = write(tmp_path / "corpus.jsonl", [json.dumps({"docid": d, "text": t}) for d, t in PASSAGES.items()])
    return ["--topics", topics, "--corpus", corpus]


def rows(pool):
    """(query_id, doc_id, first_stage_rank, first_stage_score, pooled_by, pooled_best_rank) in order."""
    return [tuple(row.values()) for row in pool.select(POOL_SCHEMA.names).to_pylist()]


def test_a_pair_in_two_runs_is_pooled_once_with_both_systems_best_rank_and_fused_score(runs):
    pool = build_pool(read_runs(runs))
    assert pool.schema == POOL_SCHEMA
    assert rows(pool) == [
        # d2: splade rank 1, bm25 rank 2: 1/61 + 1/62 = 0.032522; ahead of d1's 1/61 + 1/63 = 0.032266
        ("1", "d2", 1, 1 / 61 + 1 / 62, ["bm25", "splade"], 1),
        ("1", "d1", 2, 1 / 61 + 1 / 63, ["bm25", "splade"], 1),
        ("1", "d5", 3, 1 / 62, ["splade"], 2),  # 0.016129
        ("1", "d3", 4, 1 / 63, ["bm25"], 3),  # 0.015873
        ("2", "d4", 1, 1 / 61 + 1 / 62, ["bm25", "splade"], 1),
    ]


def test_depth_cuts_each_run_at_its_rank(runs):
    # Depth 2 drops splade's d1 (rank 3) and bm25's d3 (rank 3): d1 keeps bm25's 1/61 alone.
    assert rows(build_pool(read_runs(runs), depth=2)) == [
        ("1", "d2", 1, 1 / 61 + 1 / 62, ["bm25", "splade"], 1),
        ("1", "d1", 2, 1 / 61, ["bm25"], 1),
        ("1", "d5", 3, 1 / 62, ["splade"], 2),
        ("2", "d4", 1, 1 / 61 + 1 / 62, ["bm25", "splade"], 1),
    ]
    # Depth 1: d1 (bm25) and d2 (splade) both score 1/61 with best rank 1, so doc_id orders them.
    assert [row[:3] for row in rows(build_pool(read_runs(runs), depth=1))] == [
        ("1", "d1", 1), ("1", "d2", 2), ("2", "d4", 1)]


def test_first_stage_rank_follows_the_fusion_with_its_tie_rule(tmp_path):
    # Query 1: dz and dy were retrieved at ranks 1, 2 and 7, by different systems: their scores
    # tie exactly, 1/61 + 1/62 + 1/67 rounded once (a running sum in the systems' order would give
    # dz (1/61 + 1/62) + 1/67 = 0.0474478480153437 and dy (1/67 + 1/61) + 1/62 = ...369), so
    # doc_id puts dy first. Query 2: p1, at rank 64 by two systems, scores 1/124 + 1/124 = 1/62,
    # as p9 at rank 2 does; p9's best rank, 2, puts it ahead of p1 (64) despite its doc_id.
    runs = [
        run_file(tmp_path / "a.trec", "a", [("1", "dz", 1), ("1", "dy", 7), ("2", "p1", 64)]),
        run_file(tmp_path / "b.trec", "b", [("1", "dz", 2), ("1", "dy", 1), ("2", "p1", 64)]),
        run_file(tmp_path / "c.trec", "c", [("1", "dz", 7), ("1", "dy", 2), ("2", "p9", 2)]),
    ]
    fused = math.fsum([1 / 61, 1 / 62, 1 / 67])
    assert rows(build_pool(read_runs(runs))) == [
        ("1", "dy", 1, fused, ["a", "b", "c"], 1),
        ("1", "dz", 2, fused, ["a", "b", "c"], 1),
        ("2", "p9", 1, 1 / 62, ["c"], 2),
        ("2", "p1", 2, 1 / 62, ["a", "b"], 64),
    ]


def test_runs_split_by_any_whitespace_read_as_single_spaced_ones(tmp_path):
    spaced = read_run_table(run_file(tmp_path / "spaced.trec", "bm25", BM25))
    messy = tmp_path / "messy.trec"
    messy.write_bytes(b"".join(f" {q}\tQ0  {d} {r}\t{10 - r}.5 bm25 \r\n\n".encode() for q, d, r in BM25))
    assert read_run_table(str(messy)).equals(spaced)


def invoke(args):
    return CliRunner().invoke(prepare_command, args)


def test_judged_marks_pairs_holes_only_keeps_the_rest_and_the_pool_record(runs, texts, tmp_path, caplog):
    # Depth 2 pools d2, d1, d5 for query 1 and d4 for query 2 (see above). The qrels judge d1
    # (relevance 0 counts: judged is judged), d3 (not pooled at depth 2) and d9 (never pooled).
    qrels = write(tmp_path / "qrels.txt", ["1 0 d1 0", "1 0 d3 2", "2 0 d9 1"])
    pool_args = ["--run", runs[0], "--run", runs[1], "--depth", "2", *texts, "--judged", qrels]
    output = tmp_path / "pool"
    with caplog.at_level(logging.INFO, logger="rank1_batch.ir.pool"):
        marked = invoke([*pool_args, "--output", str(output)])
    assert marked.exit_code == 0, marked.output
    assert marked.output.strip() == f"2 queries, 4 pairs, 1 shards -> {output}"
    assert "pool of 2 runs at depth 2: 2 queries, 4 pairs (per query min 1, median 2, max 3); " \
           "1 judged, 3 holes" in caplog.text
    table = pq.read_table(output)  # _pool.json beside the shard is not read as a shard
    assert table.column_names == [*PREPARED_SCHEMA.names, "pooled_by", "pooled_best_rank", "judged"]
    assert [(r["query_id"], r["doc_id"], r["first_stage_rank"], r["judged"], r["query"], r["text"])
            for r in table.to_pylist()] == [
        ("1", "d2", 1, False, TOPICS["1"], PASSAGES["d2"]), ("1", "d1", 2, True, TOPICS["1"], PASSAGES["d1"]),
        ("1", "d5", 3, False, TOPICS["1"], PASSAGES["d5"]), ("2", "d4", 1, False, TOPICS["2"], PASSAGES["d4"])]
    record = json.loads((output / "_pool.json").read_text())
    assert record == {
        "runs": [{"path": runs[0], "system": "splade", "lines": 4}, {"path": runs[1], "system": "bm25", "lines": 4}],
        "depth": 2, "rrf_k": 60, "queries": 2, "pairs": 4, "per_query": {"min": 1, "median": 2, "max": 3},
        "sizes": {"1": 3, "2": 1}, "qrels": {"path": qrels, "judged": 1, "holes": 3, "holes_only": False},
    }
    holes = invoke([*pool_args, "--holes-only", "--output", str(tmp_path / "holes")])
    assert holes.exit_code == 0, holes.output
    # The holes keep their ranks in the whole pool: d1's place, 2, is left empty.
    assert [(r["query_id"], r["doc_id"], r["first_stage_rank"], r["judged"])
            for r in pq.read_table(tmp_path / "holes").to_pylist()] == [
        ("1", "d2", 1, False), ("1", "d5", 3, False), ("2", "d4", 1, False)]
    assert json.loads((tmp_path / "holes" / "_pool.json").read_text())["qrels"]["holes_only"] is True


def test_one_run_with_depth_is_pooled_and_without_it_prepared_as_before(runs, texts, tmp_path):
    pooled = invoke(["--run", runs[1], "--depth", "2", *texts, "--output", str(tmp_path / "pooled")])
    assert pooled.exit_code == 0, pooled.output
    table = pq.read_table(tmp_path / "pooled")
    # bm25 alone at depth 2: d1 (1/61), d2 (1/62)
    assert table.select(["doc_id", "first_stage_rank", "first_stage_score", "pooled_by"]).to_pylist() == [
        {"doc_id": "d1", "first_stage_rank": 1, "first_stage_score": 1 / 61, "pooled_by": ["bm25"]},
        {"doc_id": "d2", "first_stage_rank": 2, "first_stage_score": 1 / 62, "pooled_by": ["bm25"]},
        {"doc_id": "d4", "first_stage_rank": 1, "first_stage_score": 1 / 61, "pooled_by": ["bm25"]}]
    plain = invoke(["--run", runs[1], *texts, "--output", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert pq.read_table(tmp_path / "plain").column_names == PREPARED_SCHEMA.names
    assert not (tmp_path / "plain" / "_pool.json").exists()


@pytest.mark.parametrize("lines, message", [
    (["1 Q0 d1 1 2.0 bm25", "", "1 Q0 d2 2 bm25"],
     r"bad\.trec line 3: expected 'qid Q0 docid rank score tag', got 5 fields"),
    (["1 Q0 d1 1 2.0 bm25", "1 Q0 d2 first 1.0 bm25"], r"bad\.trec line 2: rank 'first' is not an integer"),
    (["1 Q0 d1 1 2.0 bm25", "1 Q0 d2 2 1.0 dense"], r"bad\.trec line 2: tag dense after tag bm25"),
    (["1 Q0 d1 1 2.0 bm25", "1 Q0 d2 2 1.0 bm25", "1 Q0 d1 3 0.5 bm25"],
     r"bad\.trec line 3: docid d1 listed twice for qid 1"),
    (["1 Q0 d1 1 2.0 bm25", "7 Q0 d1 1 1.0 bm25"], r"bad\.trec line 2: qid 7 not in topics .*topics\.tsv"),
    (["1 Q0 d1 1 2.0 bm25", "2 Q0 d4 1 1.0 bm25", "2 Q0 d9 2 0.5 bm25"],
     r"bad\.trec line 3: docid d9 not in corpus .*corpus\.jsonl"),
    (["1 Q0 d1 0 2.0 bm25"], r"bad\.trec line 1: rank below 1"),
])
def test_a_bad_run_is_refused_by_file_and_line_and_nothing_is_written(runs, texts, tmp_path, lines, message):
    bad = write(tmp_path / "bad.trec", lines)
    output = tmp_path / "out"
    refused = invoke(["--run", runs[0], "--run", bad, *texts, "--output", str(output)])
    assert refused.exit_code == 1 and re.search(message, refused.output), refused.output
    assert not output.exists()


def test_refusals_of_options_qrels_and_tags(runs, texts, tmp_path):
    output = tmp_path / "out"
    depth = invoke(["--run", runs[0], "--run", runs[1], "--depth", "0", *texts, "--output", str(output)])
    assert depth.exit_code == 2 and "Invalid value for '--depth': 0 is not in the range x>=1" in depth.output
    holes = invoke(["--run", runs[0], "--run", runs[1], "--holes-only", *texts, "--output", str(output)])
    assert holes.exit_code == 2 and "--holes-only needs --judged" in holes.output
    qrels = write(tmp_path / "qrels.txt", ["1 0 d1 1", "1 0 d2 high"])
    relevance = invoke(["--run", runs[0], "--run", runs[1], "--judged", qrels, *texts, "--output", str(output)])
    assert relevance.exit_code == 1 and "qrels.txt, line 2" in relevance.output
    again = run_file(tmp_path / "again.trec", "bm25", SPLADE)
    tag = invoke(["--run", runs[1], "--run", again, *texts, "--output", str(output)])
    assert tag.exit_code == 1
    assert f"{runs[1]} and {again} both have tag bm25" in tag.output
    assert not output.exists()
