import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.config import JobConfig, RunConfig
from rank1_batch.output.commits import read_committed
from rank1_batch.output.storage import Output
from rank1_batch.report.plots import integer_bins
from rank1_batch.report.summary import duration, movement, report_command
from rank1_batch.run.finish import ThisRun, write_manifest
from rank1_batch.schema import (
    INPUT_SCHEMA,
    RANKED_SCHEMA,
    REASON,
    SCORES_SCHEMA,
    TRACES_SCHEMA,
    UNSCORED_SCHEMA,
    conform,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BUDGET = 4096
# (query, doc, first-stage rank, score, outcome, reasoning tokens, truncated). Top-k 4, so q1's e is
# left unscored; q2's z has no first-stage rank. Two pairs used the whole budget: a long tail.
SCORED = [
    ("q1", "a", 1, 0.7, "answered", 100, False),
    ("q1", "b", 2, 0.9, "answered", 120, False),
    ("q1", "c", 3, 0.6, "answered", 80, True),
    ("q1", "d", 4, 0.1, "forced", BUDGET, False),
    ("q2", "x", 1, 0.4, "answered", 90, False),
    ("q2", "w", 2, 0.5, "fallback", BUDGET, False),
    ("q2", "y", 3, 0.8, "answered", 110, False),
    ("q2", "z", None, 0.95, "answered", 150, False),
]
# Ranked by score: q1 b a c d, then the unscored e; q2 z y w x.
RANKED = [("q1", "b", 1), ("q1", "a", 2), ("q1", "c", 3), ("q1", "d", 4), ("q1", "e", 5),
          ("q2", "z", 1), ("q2", "y", 2), ("q2", "w", 3), ("q2", "x", 4)]
QRELS = "q1 0 b 2\nq1 0 c 1\nq1 0 a 0\nq2 0 y 2\nq2 0 x 0\n"


@pytest.fixture
def finished_run(tmp_path):
    """A finished output written with the project's own writers, so its shape is a real run's."""
    url = str(tmp_path / "out")
    output = Output(url, RunConfig())
    columns = list(zip(*SCORED))
    scores = conform(pa.table({
        "query_id": columns[0], "doc_id": columns[1], "first_stage_rank": pa.array(columns[2], pa.int64()),
        "score": columns[3], "label": [score >= 0.5 for score in columns[3]], "outcome": columns[4],
        "reasoning_tokens": pa.array(columns[5], pa.int32()), "prompt_tokens": pa.array([50] * len(SCORED), pa.int32()),
        "truncated": columns[6],
    }), SCORES_SCHEMA)
    output.write_table("scores", "part-0.parquet", scores)
    output.write_table("traces", "part-0.parquet", conform(
        pa.table({"query_id": columns[0], "doc_id": columns[1], "reasoning": ["Because."] * len(SCORED)}), TRACES_SCHEMA))
    output.write_table("unscored", "part-0.parquet", conform(
        pa.table({"query_id": ["q1"], "doc_id": ["e"], "first_stage_rank": [5]}), UNSCORED_SCHEMA))
    output.write_table("rejects", "part-0.parquet", conform(
        pa.table({"query_id": ["q3"], "query": ["?"], "doc_id": ["r"], "text": [""]}), INPUT_SCHEMA
    ).append_column(REASON, pa.array(["text is null or empty"])))
    by_pair = {(q, d): (rank, score) for q, d, rank, score, *_ in SCORED} | {("q1", "e"): (5, None)}
    output.write_table("ranked", "part-00000.parquet", pa.table({
        "query_id": [q for q, _, _ in RANKED], "doc_id": [d for _, d, _ in RANKED], "rank": [r for *_, r in RANKED],
        "score": [by_pair[q, d][1] for q, d, _ in RANKED], "first_stage_rank": [by_pair[q, d][0] for q, d, _ in RANKED],
    }).cast(RANKED_SCHEMA))
    job = JobConfig.from_options({"input": ["in/"], "output": url, "model": "jhu-clsp/rank1-7b", "top_k": 4,
                                  "max_reasoning_tokens": BUDGET, "threshold": 0.5})
    write_manifest(output, job, read_committed(output, input_rows=10, num_cpus=1).counts, ThisRun(scored=8), wall_seconds=125.0)
    qrels = tmp_path / "qrels.txt"
    qrels.write_text(QRELS)
    return url, str(qrels)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_links_real_plots_and_holds_the_runs_figures(finished_run, tmp_path):
    url, qrels = finished_run
    result = CliRunner().invoke(report_command, [url, "--qrels", qrels, "--relevance-level", "1"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "out" / "report" / "report.md"
    assert str(report) in result.output
    text = report.read_text()

    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert links == ["score-histogram.png", "outcomes.png", "reasoning-tokens.png", "rank-movement.png",
                     "confusion-matrix.png"]
    for link in links:
        data = (report.parent / link).read_bytes()
        width, height = png_size(data)
        assert len(data) > 10_000 and width >= 500 and height >= 300, link

    assert "Model `jhu-clsp/rank1-7b`; threshold 0.5; top-k 4; reasoning budget 4,096 tokens." in text
    assert "Input `in/`." in text
    for row in ["| input | 10 | |", "| scored | 8 | 80.0% of input |", "| &nbsp;&nbsp;answered | 6 | 75.0% of scored |",
                "| &nbsp;&nbsp;forced | 1 | 12.5% of scored |", "| &nbsp;&nbsp;fallback | 1 | 12.5% of scored |",
                "| rejected | 1 | 10.0% of input |", "| unscored (beyond top-k) | 1 | 10.0% of input |",
                "| truncated (passage cut to fit) | 1 | 12.5% of scored |"]:
        assert row in text
    assert "Wall time 2 min 05 s, 0.064 pairs/s." in text
    assert "Tokens: 400 prompt, 8,842 reasoning (50 and 1,105 per scored pair)." in text
    # a, b, c, w (0.5 is at the threshold), y, z.
    assert "6 of 8 scored pairs (75.0%)" in text
    # Answered lengths 80 90 100 110 120 150: median 105, p90 120 + 0.5 * 30.
    assert "| answered | 6 | 105 | 135 | 150 |" in text
    assert "| all | 8 | 115 | 4,096 | 4,096 |" in text
    assert "2 pairs (25.0%) used the whole budget" in text
    # Scored with a first-stage rank: b, y up; a, w, x down (x by 3); c, d stay. e is unscored, z unranked.
    assert "Of the 7 reranked candidates with a first-stage rank, 28.6% moved up, 42.9% moved down and 28.6% stayed; " \
           "the median move was 1 place." in text

    # Reranked q1 b a c, q2 z y w x; first stage q1 a b c, q2 x w y. Relevant from 1: q1 b, c; q2 y.
    rr = ((1 + 1 / 2) / 2, (1 / 2 + 1 / 3) / 2)
    ap = (((1 + 2 / 3) / 2 + 1 / 2) / 2, ((1 / 2 + 2 / 3) / 2 + 1 / 3) / 2)
    assert f"| MRR@10 | {rr[0]:.4f} | {rr[1]:.4f} | {rr[0] - rr[1]:+.4f} |" in text
    assert f"| MAP | {ap[0]:.4f} | {ap[1]:.4f} | {ap[0] - ap[1]:+.4f} |" in text
    assert "Over 2 queries" in text and "judgment of 1 or more" in text

    # Judged: a 0.7 (relevance 0), b 0.9 (2), c 0.6 (1), x 0.4 (0), y 0.8 (2). From 1: relevant b, c, y, all
    # labelled true; a true, x false. Observed 4/5; by chance 0.6 * 0.8 + 0.4 * 0.2 = 0.56.
    assert f"| kappa: label against qrels relevance >= 1 | {(0.8 - 0.56) / (1 - 0.56):.4f} |" in text
    assert "| precision of the label | 0.7500 |" in text and "| recall of the label | 1.0000 |" in text
    assert "grade against" not in text and "## Agreement between samples" not in text
    assert "Over the 5 pairs that both the run and the qrels judge; 3 scored pairs are not judged, and 0 " in text


def test_report_without_qrels_or_scored_pairs(tmp_path):
    url = str(tmp_path / "out")
    output = Output(url, RunConfig())
    output.write_table("ranked", "part-00000.parquet", RANKED_SCHEMA.empty_table())
    write_manifest(output, JobConfig(), read_committed(output, input_rows=0, num_cpus=1).counts, ThisRun(), wall_seconds=1.0)
    result = CliRunner().invoke(report_command, [url])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| scored | 0 | - of input |" in text
    assert "![" not in text and "## Evaluation" not in text


def test_report_of_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "scores").mkdir()
    result = CliRunner().invoke(report_command, [str(tmp_path)])
    assert result.exit_code == 1 and "no _manifest.json, so not a finished run" in result.output
    assert not (tmp_path / "report").exists()


def test_movement_counts_and_median_move():
    moved = movement(np.array([1, 2, 3, 4, 5]), np.array([3, 1, 2, 4, 9]))
    assert (moved.candidates, moved.up, moved.down, moved.stayed) == (5, 2, 2, 1)
    assert moved.median_move == 1.5  # of 2, 1, 1, 4


def test_integer_bins_hold_equally_many_whole_values():
    assert list(integer_bins(-2, 2)) == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    edges = integer_bins(0, 999, most=50)
    assert np.all(np.diff(edges) == 20) and edges[0] < 0 < 999 < edges[-1]


def test_duration():
    assert (duration(9.25), duration(125), duration(3 * 3600 + 61)) == ("9.2 s", "2 min 05 s", "3 h 01 min 01 s")


def test_report_with_grades_and_samples(finished_run, tmp_path):
    """Grades give the graded kappa and a second confusion matrix; several samples a histogram of
    their agreement."""
    url, qrels = finished_run
    path = tmp_path / "out" / "scores" / "part-0.parquet"
    scores = pq.read_table(path)
    # Grades at 0.3, 0.6, 0.85 of the scores 0.7 0.9 0.6 0.1 0.4 0.5 0.8 0.95; five samples each.
    graded = {"grade": pa.array([2, 3, 2, 0, 1, 1, 2, 3], pa.int8()), "samples": pa.array([5] * 8, pa.int32()),
              "agreement": [1.0, 1.0, 0.6, 0.8, 1.0, 0.6, 1.0, 0.8]}
    for name, values in graded.items():
        scores = scores.set_column(scores.column_names.index(name), name, pa.array(values, SCORES_SCHEMA.field(name).type))
    pq.write_table(scores, path)
    result = CliRunner().invoke(report_command, [url, "--qrels", qrels])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "sample-agreement.png" in text and "confusion-matrix.png" in text
    assert all((tmp_path / "out" / "report" / name).read_bytes()[:8] == PNG_SIGNATURE
               for name in ("sample-agreement.png", "confusion-matrix.png"))
    assert "Of the 8 pairs judged by several samples, 4 (50.0%) were unanimous; the median share of samples " \
           "agreeing with the label was 0.90." in text
    # Judged (relevance, grade): a (0, 2), b (2, 3), c (1, 2), x (0, 1), y (2, 2). Rows of relevance 0, 1, 2 sum
    # to 2, 1, 2; columns of grade 0..3 to 0, 1, 3, 1. Observed on the diagonal: y, 1 of 5; by chance
    # (2*0 + 1*1 + 2*3 + 0*1) / 25 = 7/25.
    assert f"| kappa: grade against qrels relevance | {(1 / 5 - 7 / 25) / (1 - 7 / 25):.4f} |" in text
    # Quadratic: observed disagreement 4 (a) + 1 (b) + 1 (c) + 1 (x) = 7; by chance, sum over cells of
    # rows_i * columns_j * (i - j)^2 / 5: row 0: 2 * (1*1 + 3*4 + 1*9) = 44; row 1: 1 * (0 + 3*1 + 1*4) = 7;
    # row 2: 2 * (1*1 + 0 + 1*1) = 4: 55 / 5 = 11.
    assert f"| quadratic-weighted kappa: grade against qrels relevance | {1 - 7 / 11:.4f} |" in text


def test_review_queue_counts_pairs_below_each_agreement_and_the_labels_right_by_confidence(finished_run, tmp_path):
    url, qrels = finished_run
    path = tmp_path / "out" / "scores" / "part-0.parquet"
    scores = pq.read_table(path)
    shares = {"samples": pa.array([5] * 8, pa.int32()), "agreement": pa.array([1.0, 1.0, 0.6, 0.8, 1.0, 0.6, 1.0, 0.4])}
    for name, values in shares.items():
        scores = scores.set_column(scores.column_names.index(name), name, values)
    pq.write_table(scores, path)
    result = CliRunner().invoke(report_command, [url, "--qrels", qrels])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Review queue" in text and "rank1-batch review export" in text
    # Below 1.0: 0.6, 0.8, 0.6, 0.4; below 0.8: 0.6, 0.6, 0.4; below 0.6: 0.4. Of 8 scored.
    for row in ["| below 1.0 | 4 | 50.0% |", "| below 0.8 | 3 | 37.5% |", "| below 0.6 | 1 | 12.5% |"]:
        assert row in text
    # Judged, relevant from 2: x 0.4 (0, label false: right), c 0.6 (1, true: wrong), a 0.7 (0, true: wrong),
    # y 0.8 (2, true: right), b 0.9 (2, true: right); the other bins hold no judged pair.
    for row in ["| 0.0 to 0.1 | 0 | - |", "| 0.4 to 0.5 | 1 | 100.0% |", "| 0.6 to 0.7 | 1 | 0.0% |",
                "| 0.7 to 0.8 | 1 | 0.0% |", "| 0.8 to 0.9 | 1 | 100.0% |", "| 0.9 to 1.0 | 1 | 100.0% |"]:
        assert row in text
    assert "relevance >= 2 is relevant" in text


def test_no_review_queue_without_samples_or_qrels(finished_run, tmp_path):
    url, _ = finished_run
    assert CliRunner().invoke(report_command, [url]).exit_code == 0
    assert "## Review queue" not in (tmp_path / "out" / "report" / "report.md").read_text()
