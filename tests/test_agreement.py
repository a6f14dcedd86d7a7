"""Agreement of a run's labels with qrels, on hand-made cases whose figures are worked out here by
hand, through the pure functions and the `agreement` and `calibrate` commands."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import JobConfig
from rank1_batch.ir.agreement import (
    Judged,
    agreement,
    binary,
    calibrate,
    grades,
    judged_pairs,
    label_qrels,
    systems,
)
from rank1_batch.schema import SCORES_SCHEMA, conform

CUTS = (0.25, 0.5, 0.75)
# (query, doc, qrels relevance, score). Labels at 0.5; grades at CUTS count the cut points reached.
JUDGED = [
    ("q1", "d1", 3, 0.95), ("q1", "d2", 2, 0.7), ("q1", "d3", 1, 0.6), ("q1", "d4", 0, 0.2), ("q1", "d5", 0, 0.55),
    ("q1", "d6", 2, 0.3), ("q2", "d1", 0, 0.1), ("q2", "d2", 1, 0.52), ("q2", "d3", 3, 0.8), ("q2", "d4", 0, 0.05),
]
# Scored but not judged (run only), and judged but not scored: q1's d7 counts, q3 is not the run's query.
UNJUDGED = [("q1", "d8", 0.4), ("q2", "d9", 0.9)]
NOT_SCORED = [("q1", "d7", 1), ("q3", "d1", 2)]

# Binary at cut 2. Relevant: q1 d1, d2, d6; q2 d3. Labelled true (>= 0.5): q1 d1, d2, d3, d5; q2 d2, d3.
# not relevant: labelled false q1 d4, q2 d1, q2 d4 (3), true q1 d3, q1 d5, q2 d2 (3)
# relevant:     labelled false q1 d6 (1), true q1 d1, q1 d2, q2 d3 (3)
CONFUSION_2 = [[3, 3], [1, 3]]
# observed agreement 6/10; by chance 0.4 * 0.6 (both true) + 0.6 * 0.4 (both false) = 0.48
KAPPA_2 = (0.6 - 0.48) / (1 - 0.48)  # 3/13
PRECISION_2, RECALL_2 = 3 / 6, 3 / 4
# Cut 1 adds q1 d3 and q2 d2 to the relevant: both labelled true.
CONFUSION_1 = [[3, 1], [1, 5]]
KAPPA_1 = (0.8 - (0.6 * 0.6 + 0.4 * 0.4)) / (1 - 0.52)  # 7/12
# Grades: q1 3 2 2 0 2 1, q2 0 2 3 0. Rows qrels 0..3, columns grades 0..3.
GRADED_CONFUSION = [[3, 0, 1, 0], [0, 0, 2, 0], [0, 1, 1, 0], [0, 0, 0, 2]]
# Rows sum to 4 2 2 2, columns to 3 1 4 2. Observed 6/10 on the diagonal; by chance
# (4*3 + 2*1 + 2*4 + 2*2) / 100 = 0.26.
GRADED_KAPPA = (0.6 - 0.26) / (1 - 0.26)  # 17/37
# Quadratic: observed disagreement (weight (i - j)^2) 1*4 + 2*1 + 1*1 = 7; by chance, sum over cells of
# rows_i * columns_j * (i - j)^2 / 10 = (4*35 + 2*15 + 2*15 + 2*35) / 10 = 27.
QUADRATIC_KAPPA = 1 - 7 / 27


def scores_table(with_grades: bool = True) -> pa.Table:
    rows = [(q, d, score) for q, d, _, score in JUDGED] + UNJUDGED
    score = [row[2] for row in rows]
    return conform(pa.table({
        "query_id": [row[0] for row in rows], "doc_id": [row[1] for row in rows], "score": score,
        "label": [value >= 0.5 for value in score], "outcome": ["answered"] * len(rows),
        "grade": grades(score, CUTS if with_grades else None),
    }), SCORES_SCHEMA)


def qrels() -> dict:
    judged = {}
    for query_id, doc_id, relevance in [(q, d, r) for q, d, r, _ in JUDGED] + NOT_SCORED:
        judged.setdefault(query_id, {})[doc_id] = relevance
    return judged


def test_grades_count_the_cut_points_reached():
    assert grades([0.0, 0.25, 0.3, 0.5, 0.74, 0.75, 1.0], CUTS).to_pylist() == [0, 1, 1, 2, 2, 3, 3]
    assert grades(pa.chunked_array([[0.1], [0.9]]), CUTS).type == pa.int8()
    assert grades([0.3, 0.9], None).to_pylist() == [None, None]


def test_agreement_by_hand():
    judged = judged_pairs(scores_table(), qrels())
    assert (judged.pairs, judged.run_only, judged.qrels_only) == (10, 2, 1)
    result = agreement(judged, relevance_cut=2)
    assert result.binary.confusion == CONFUSION_2
    assert result.binary.kappa == pytest.approx(KAPPA_2) and result.binary.kappa == pytest.approx(3 / 13)
    assert (result.binary.precision, result.binary.recall) == pytest.approx((PRECISION_2, RECALL_2))
    assert result.graded.values == [0, 1, 2, 3] and result.graded.confusion == GRADED_CONFUSION
    assert result.graded.kappa == pytest.approx(GRADED_KAPPA) and result.graded.kappa == pytest.approx(17 / 37)
    assert result.graded.quadratic_kappa == pytest.approx(QUADRATIC_KAPPA)
    lenient = agreement(judged, relevance_cut=1).binary
    assert lenient.confusion == CONFUSION_1 and lenient.kappa == pytest.approx(KAPPA_1)


def test_a_run_without_grades_has_no_graded_figures_and_undefined_is_none():
    judged = judged_pairs(scores_table(with_grades=False), qrels())
    assert judged.grade is None and agreement(judged).graded is None
    # Both sides say "not relevant" for every pair: kappa is undefined, and no pair is labelled relevant.
    same = binary(np.array([0, 0, 1]), np.array([False, False, False]), relevance_cut=2)
    assert same.kappa is None and same.precision is None and same.recall is None


def test_label_qrels_take_the_grade_else_the_label():
    table = pa.table({"query_id": ["q", "q", "q"], "doc_id": ["a", "b", "c"], "label": [True, False, True],
                      "grade": pa.array([2, None, None], pa.int8())})
    assert label_qrels(table) == {"q": {"a": 2, "b": 0, "c": 1}}


def test_kendall_tau_between_system_orderings_by_hand():
    # Four systems, each retrieving one passage of q. Human relevance a 3, b 2, c 1, d 0; the run's
    # grades a 2, b 3, c 0, d 1. Both ideal rankings hold grades 3, 2, 1, 0.
    human = {"q": {"a": 3, "b": 2, "c": 1, "d": 0}}
    labels = {"q": {"a": 2, "b": 3, "c": 0, "d": 1}}
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    runs = {name: {"q": {doc: 1.0}} for name, doc in (("A", "a"), ("B", "b"), ("C", "c"), ("D", "d"))}
    result = systems(runs, human, labels)
    assert result.measured["A"] == pytest.approx({"qrels": 3 / ideal, "labels": 2 / ideal})
    assert result.measured["D"] == pytest.approx({"qrels": 0.0, "labels": 1 / ideal})
    # Human order A B C D, labels' B A D C. Of the 6 pairs of systems, (A, B) and (C, D) swap:
    # 4 concordant, 2 discordant, no ties.
    assert result.kendall_tau == pytest.approx((4 - 2) / 6)
    assert result.queries == 1


def test_calibration_finds_the_cut_points_that_part_the_judgments():
    # Perfectly separable: relevance 0 0 1 2 2 3 3 by increasing score.
    relevance = np.array([0, 0, 1, 2, 2, 3, 3])
    score = np.array([0.1, 0.2, 0.35, 0.6, 0.65, 0.9, 0.95])
    judged = Judged(relevance, score, score >= 0.5, None, 0, 0)
    strict = calibrate(judged, relevance_cut=2)
    # Relevant from 0.6: any threshold in (0.35, 0.6] parts them; 0.6 is the shortest decimal there.
    assert (strict.threshold, strict.kappa) == (0.6, 1.0)
    # Grades need cuts in (0.2, 0.35], (0.35, 0.6] and (0.65, 0.9]: shortest 0.3, 0.6, 0.9.
    assert strict.grades == (0.3, 0.6, 0.9) and strict.graded.quadratic_kappa == 1.0 and strict.graded.kappa == 1.0
    assert calibrate(judged, relevance_cut=1).threshold == 0.3


def test_calibrated_threshold_is_the_best_of_every_threshold():
    random = np.random.default_rng(3)
    relevance = random.integers(0, 4, 300)
    score = np.clip(relevance / 4 + random.normal(0, 0.2, 300), 0, 1)
    judged = Judged(relevance, score, score >= 0.5, None, 0, 0)
    found = calibrate(judged)
    every = [binary(relevance, score >= cut, 2).kappa for cut in np.unique(score)]
    assert found.kappa == pytest.approx(max(every))
    assert 0 <= found.grades[0] < found.grades[1] < found.grades[2] <= 1
    with pytest.raises(ValueError, match="no judged pair is relevant at --relevance-cut 2"):
        calibrate(Judged(np.array([0, 1]), np.array([0.2, 0.8]), np.array([False, True]), None, 0, 0))


@pytest.fixture
def labelled_run(tmp_path):
    """An output's scores/: one file with grades, one written before the grade column existed
    (its pairs are unjudged, so the run's grades are still complete on the judged pairs)."""
    scores = scores_table()
    (tmp_path / "out" / "scores").mkdir(parents=True)
    pq.write_table(scores.slice(0, len(JUDGED)), tmp_path / "out" / "scores" / "part-0.parquet")
    pq.write_table(scores.slice(len(JUDGED)).drop_columns(["grade", "samples", "sample_scores", "agreement"]),
                   tmp_path / "out" / "scores" / "part-1.parquet")
    lines = [f"{q} 0 {d} {r}" for q, docs in qrels().items() for d, r in docs.items()]
    (tmp_path / "qrels.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "out"), str(tmp_path / "qrels.txt")


def test_agreement_command_json_and_text(labelled_run, tmp_path):
    url, qrels_file = labelled_run
    # Systems retrieving one passage of q1 each: human d1 3 > d6 2 > d3 1 > d4 0; the run's grades
    # d1 3 > d3 2 > d6 1 > d4 0. Only (S2, S3) swaps: 5 concordant of 6, tau = (5 - 1) / 6.
    systems_files = []
    for name, doc in (("S1", "d1"), ("S2", "d3"), ("S3", "d6"), ("S4", "d4")):
        (tmp_path / f"{name}.trec").write_text(f"q1 Q0 {doc} 1 1.0 {name}\n")
        systems_files += ["--system", str(tmp_path / f"{name}.trec")]
    runner = CliRunner()
    result = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--json", *systems_files])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert (figures["judged"], figures["run_only"], figures["qrels_only"]) == (10, 2, 1)
    assert figures["binary"]["confusion"] == CONFUSION_2 and figures["binary"]["kappa"] == pytest.approx(KAPPA_2)
    assert figures["binary"]["precision"] == pytest.approx(PRECISION_2)
    assert figures["binary"]["recall"] == pytest.approx(RECALL_2)
    assert figures["graded"]["confusion"] == GRADED_CONFUSION
    assert figures["graded"]["kappa"] == pytest.approx(GRADED_KAPPA)
    assert figures["graded"]["quadratic_kappa"] == pytest.approx(QUADRATIC_KAPPA)
    assert figures["systems"]["kendall_tau"] == pytest.approx(4 / 6)
    # Over q1 and q2 (each system scores 0 on q2); q1's ideal under the qrels holds 3, 2, 2, 1, 1.
    ideal = 3 + 2 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(6)
    assert figures["systems"]["measured"][str(tmp_path / "S1.trec")]["qrels"] == pytest.approx(3 / ideal / 2)

    text = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--relevance-cut", "1"])
    assert text.exit_code == 0, text.output
    assert "pairs judged by both: 10; scored by the run only: 2; judged by the qrels only (queries of the run): 1" \
           in text.output
    assert f"kappa      {KAPPA_1:.4f}" in text.output
    assert f"kappa {GRADED_KAPPA:.4f}, quadratic-weighted {QUADRATIC_KAPPA:.4f}" in text.output
    assert "qrels >= 1" in text.output and "systems by" not in text.output


def test_qrels_that_share_no_pair_are_an_error_naming_both(labelled_run, tmp_path):
    url, _ = labelled_run
    other = tmp_path / "other-qrels.txt"
    other.write_text("q9 0 d1 2\n")
    for command in ("agreement", "calibrate"):
        result = CliRunner().invoke(main, [command, "--run", url, "--qrels", str(other)])
        assert result.exit_code == 1
        assert f"{other} judges none of the pairs that {url} scored" in result.output
    one = CliRunner().invoke(main, ["agreement", "--run", url, "--qrels", str(other), "--system", str(other)])
    assert one.exit_code == 2 and "--system" in one.output


def test_calibrate_command_prints_the_options_to_use(labelled_run):
    url, qrels_file = labelled_run
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "--run", url, "--qrels", qrels_file, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    # Relevant at 2: scores 0.95 0.8 0.7 0.3; not: 0.6 0.55 0.52 0.2 0.1 0.05. From 0.7 up, every pair
    # labelled relevant is relevant and only 0.3 is missed: observed 9/10, by chance
    # 0.3 * 0.4 + 0.7 * 0.6 = 0.54, kappa 0.36 / 0.46. No other threshold misses fewer than two.
    assert found["threshold"] == 0.7 and found["kappa"] == pytest.approx(0.36 / 0.46)
    assert found["labels_kappa"] == pytest.approx(KAPPA_2)
    assert found["options"] == f"--threshold 0.7 --grades {','.join(map(str, found['grades']))}"
    text = runner.invoke(main, ["calibrate", "--run", url, "--qrels", qrels_file])
    assert text.exit_code == 0, text.output
    assert f"options: {found['options']}" in text.output and "threshold 0.7: kappa 0.7826" in text.output


@pytest.mark.parametrize("given", ["0.5,0.1,0.9", "0.1,0.5,1.5", "0.1,0.5", "0.1,0.1,0.9", "a,b,c"])
def test_grade_cut_points_out_of_order_or_range_are_refused_before_anything_is_written(tmp_path, given):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--input", str(tmp_path), "--output", str(out), "--model", "tiny",
                                       "--grades", given])
    assert result.exit_code == 2 and "--grades must be three cut points in [0, 1], strictly increasing" in result.output
    assert not out.exists()


def test_grades_from_a_job_spec_and_the_command_line_agree():
    assert JobConfig.from_options({"grades": [0.1, 0.5, 0.9]}).scoring.grades == (0.1, 0.5, 0.9)
    job = JobConfig.from_options({"grades": "0.1,0.5,0.9"})
    assert job.scoring.grades == (0.1, 0.5, 0.9) and job.to_dict()["scoring"]["grades"] == [0.1, 0.5, 0.9]


def test_a_run_scored_by_raw_logits_has_no_labels_to_agree_or_calibrate(tmp_path):
    logits = scores_table().set_column(SCORES_SCHEMA.get_field_index("label"), "label",
                                       pa.nulls(len(JUDGED) + 2, pa.bool_()))
    (tmp_path / "out" / "scores").mkdir(parents=True)
    pq.write_table(logits, tmp_path / "out" / "scores" / "part-0.parquet")
    (tmp_path / "qrels.txt").write_text("q1 0 d1 3\n")
    for command in ("agreement", "calibrate"):
        result = CliRunner().invoke(main, [command, "--run", str(tmp_path / "out"), "--qrels", str(tmp_path / "qrels.txt")])
        assert result.exit_code == 1 and "no labels, as its scores are a cross-encoder's raw logits" in result.output
