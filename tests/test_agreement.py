"""Agreement of a run's labels with qrels, on hand-made cases whose figures are worked out here by
hand, through the pure functions and the `agreement` and `calibrate` commands (the systems'
orderings through the command; their pure figures are in test_system_order.py)."""

import json
import math

import krippendorff
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
    graded,
    judged_pairs,
    topics,
)
from rank1_batch.schema import SCORES_SCHEMA, conform, grades

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
# Krippendorff's ordinal alpha, qrels and grades as two coders of each of the 10 pairs. Coincidences:
# the confusion matrix plus its transpose, o = [[6,0,1,0],[0,0,3,0],[1,3,2,0],[0,0,0,4]], so the
# values 0..3 are given n = 7, 3, 6, 4 times (20 in all). The ordinal distance of c and k is
# (n_c + ... + n_k - (n_c + n_k) / 2)^2: 0-1 5^2, 0-2 9.5^2, 0-3 14.5^2, 1-2 4.5^2, 1-3 9.5^2, 2-3 5^2.
# Observed, over the off-diagonal coincidences: 2 * (1 * 90.25 + 3 * 20.25) = 302. By chance, sum over
# c != k of n_c * n_k * distance = 2 * (21*25 + 42*90.25 + 28*210.25 + 18*20.25 + 12*90.25 + 24*25)
# = 2 * 12250 = 24500. alpha = 1 - (20 - 1) * 302 / 24500.
ALPHA = 1 - 19 * 302 / 24500
# (relevance, grade) pairs: (3,3) (2,2) (1,2) (0,0) (0,2) (2,1) (0,0) (1,2) (3,3) (0,0).
# 0|123: relevant 6, graded >= 1 7; only (0,2) differs. Observed 0.9, chance 0.6*0.7 + 0.4*0.3 = 0.54.
# 01|23: relevant 4, graded >= 2 6; (1,2) (0,2) (2,1) (1,2) differ. Observed 0.6, chance 0.48 (as KAPPA_2).
# 012|3: both sides 3 on the same two pairs, so they agree on all ten.
SPLITS = {"0|123": (0.9 - 0.54) / (1 - 0.54), "01|23": (0.6 - 0.48) / (1 - 0.48), "012|3": 1.0}
# Per query, label against relevance >= 2. q1: relevant T T F F F T, labelled T T T F T F: 3 of 6 agree,
# chance 3/6 * 4/6 + 3/6 * 2/6 = 0.5, kappa 0. q2: relevant F F T F, labelled F T T F: 3 of 4 agree,
# chance 1/4 * 2/4 + 3/4 * 2/4 = 0.5, kappa 0.5.
TOPICS_2 = {"q1": 0.0, "q2": 0.5}
# At 1, q1: relevant T T T F F T, labelled T T T F T F: 4 of 6 agree, chance (4/6)^2 + (2/6)^2 = 5/9,
# kappa (2/3 - 5/9) / (4/9) = 1/4. q2: relevant F T T F, as labelled: kappa 1.
TOPICS_1 = {"q1": 0.25, "q2": 1.0}


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
    assert result.graded.alpha == pytest.approx(ALPHA) and result.graded.alpha == pytest.approx(18762 / 24500)
    assert {split.name: split.kappa for split in result.graded.splits} == pytest.approx(SPLITS)
    assert [split.at for split in result.graded.splits] == [1, 2, 3]
    assert result.topics.kappa == pytest.approx(TOPICS_2) and result.topics.undefined == []
    lenient = agreement(judged, relevance_cut=1)
    assert lenient.binary.confusion == CONFUSION_1 and lenient.binary.kappa == pytest.approx(KAPPA_1)
    assert lenient.topics.kappa == pytest.approx(TOPICS_1)


def test_alpha_by_hand_is_the_krippendorff_package_s():
    judged = judged_pairs(scores_table(), qrels())
    assert krippendorff.alpha(reliability_data=[judged.relevance, judged.grade], level_of_measurement="ordinal") \
        == pytest.approx(ALPHA)
    # Relevance 4 stays 4 for alpha. Units (0, 0) and (4, 3): n = 2, 1, 1 for 0, 3, 4 (4 in all);
    # distances 0-3 (3 - 1.5)^2 = 2.25, 0-4 (4 - 1.5)^2 = 6.25, 3-4 (2 - 1)^2 = 1. Observed 2 * 1 = 2;
    # by chance 2 * (2*1*2.25 + 2*1*6.25 + 1*1*1) = 36. alpha = 1 - 3 * 2 / 36.
    four = graded(np.array([0, 4]), np.array([0, 3]))
    assert four.alpha == pytest.approx(5 / 6) and four.values == [0, 1, 2, 3, 4]
    assert krippendorff.alpha(reliability_data=[[0, 4], [0, 3]], level_of_measurement="ordinal") \
        == pytest.approx(5 / 6)
    # but counts as 3 in the splits: relevant at every cut, as grade 3 is, so they agree at each
    assert [split.kappa for split in four.splits] == [1.0, 1.0, 1.0]
    # Every value alike: alpha, as kappa, is undefined.
    same = graded(np.array([2, 2]), np.array([2, 2]))
    assert same.alpha is None and same.kappa is None and [split.kappa for split in same.splits] == [None] * 3


def test_per_query_kappa_spread_and_the_queries_where_it_is_undefined():
    # q1 and q2 as TOPICS_2 (kappa 0 and 0.5); q3 judged not relevant and labelled false throughout,
    # q4 judged relevant and labelled true throughout: kappa 0/0 at both.
    judged = judged_pairs(scores_table(), qrels())
    query_id = np.concatenate([judged.query_id, ["q3", "q3", "q4"]])
    relevance = np.concatenate([judged.relevance, [0, 1, 3]])
    label = np.concatenate([judged.label, [False, False, True]])
    found = topics(query_id, relevance, label, relevance_cut=2)
    assert found.kappa == pytest.approx(TOPICS_2) and found.undefined == ["q3", "q4"]
    # mean 0.25, population standard deviation sqrt(((0 - 0.25)^2 + (0.5 - 0.25)^2) / 2) = 0.25
    spread = found.spread
    assert (spread.count, spread.minimum, spread.median, spread.maximum) == (2, 0.0, 0.25, 0.5)
    assert (spread.mean, spread.std) == pytest.approx((0.25, 0.25))
    none = topics(np.array(["q3", "q3"]), np.array([0, 1]), np.array([False, False]), relevance_cut=2)
    assert none.kappa == {} and none.undefined == ["q3"] and none.spread is None


def test_a_run_without_grades_has_no_graded_figures_and_undefined_is_none():
    judged = judged_pairs(scores_table(with_grades=False), qrels())
    assert judged.grade is None and agreement(judged).graded is None
    # Both sides say "not relevant" for every pair: kappa is undefined, and no pair is labelled relevant.
    same = binary(np.array([0, 0, 1]), np.array([False, False, False]), relevance_cut=2)
    assert same.kappa is None and same.precision is None and same.recall is None


def test_calibration_finds_the_cut_points_that_part_the_judgments():
    # Perfectly separable: relevance 0 0 1 2 2 3 3 by increasing score.
    relevance = np.array([0, 0, 1, 2, 2, 3, 3])
    score = np.array([0.1, 0.2, 0.35, 0.6, 0.65, 0.9, 0.95])
    judged = Judged(np.full(7, "q"), relevance, score, score >= 0.5, None, 0, 0)
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
    judged = Judged(np.full(300, "q"), relevance, score, score >= 0.5, None, 0, 0)
    found = calibrate(judged)
    every = [binary(relevance, score >= cut, 2).kappa for cut in np.unique(score)]
    assert found.kappa == pytest.approx(max(every))
    assert 0 <= found.grades[0] < found.grades[1] < found.grades[2] <= 1
    with pytest.raises(ValueError, match="no judged pair is relevant at --relevance-cut 2"):
        calibrate(Judged(np.array(["q", "q"]), np.array([0, 1]), np.array([0.2, 0.8]), np.array([False, True]),
                         None, 0, 0))


def write_output(tmp_path, parts: list[pa.Table]) -> tuple[str, str]:
    """An output's scores/, one Parquet file for each table given, and the qrels beside it."""
    (tmp_path / "out" / "scores").mkdir(parents=True)
    for number, part in enumerate(parts):
        pq.write_table(part, tmp_path / "out" / "scores" / f"part-{number}.parquet")
    lines = [f"{q} 0 {d} {r}" for q, docs in qrels().items() for d, r in docs.items()]
    (tmp_path / "qrels.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "out"), str(tmp_path / "qrels.txt")


@pytest.fixture
def labelled_run(tmp_path):
    """An output's scores/: one file with grades, one written before the grade column existed
    (its pairs are unjudged, so the run's grades are still complete on the judged pairs)."""
    scores = scores_table()
    return write_output(tmp_path, [scores.slice(0, len(JUDGED)), scores.slice(len(JUDGED)).drop_columns(
        ["grade", "samples", "sample_scores", "agreement"])])


@pytest.fixture
def graded_run(tmp_path):
    """An output whose every pair has a grade."""
    return write_output(tmp_path, [scores_table()])


def test_agreement_command_json_and_text(labelled_run):
    url, qrels_file = labelled_run
    runner = CliRunner()
    result = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert (figures["judged"], figures["run_only"], figures["qrels_only"]) == (10, 2, 1)
    assert figures["binary"]["confusion"] == CONFUSION_2 and figures["binary"]["kappa"] == pytest.approx(KAPPA_2)
    assert figures["binary"]["precision"] == pytest.approx(PRECISION_2)
    assert figures["binary"]["recall"] == pytest.approx(RECALL_2)
    assert figures["graded"]["confusion"] == GRADED_CONFUSION
    assert figures["graded"]["kappa"] == pytest.approx(GRADED_KAPPA)
    assert figures["graded"]["quadratic_kappa"] == pytest.approx(QUADRATIC_KAPPA)
    assert figures["graded"]["alpha"] == pytest.approx(ALPHA)
    assert {split["name"]: split["kappa"] for split in figures["graded"]["splits"]} == pytest.approx(SPLITS)
    assert figures["topics"]["kappa"] == pytest.approx(TOPICS_2) and figures["topics"]["undefined"] == []
    assert figures["topics"]["spread"]["count"] == 2 and figures["topics"]["spread"]["mean"] == pytest.approx(0.25)
    assert figures["systems"] is None

    text = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--relevance-cut", "1"])
    assert text.exit_code == 0, text.output
    assert "pairs judged by both: 10; scored by the run only: 2; judged by the qrels only (queries of the run): 1" \
           in text.output
    assert f"kappa      {KAPPA_1:.4f}" in text.output
    assert f"kappa {GRADED_KAPPA:.4f}, quadratic-weighted {QUADRATIC_KAPPA:.4f}, Krippendorff's alpha (ordinal) " \
           f"{ALPHA:.4f}" in text.output
    assert ", ".join(f"{name} {value:.4f}" for name, value in SPLITS.items()) in text.output
    # TOPICS_1: 0.25 and 1, so mean and median 0.625, population standard deviation 0.375
    assert "over 2 queries: mean 0.6250, standard deviation 0.3750, min 0.2500, median 0.6250, max 1.0000" \
           in text.output
    assert "qrels >= 1" in text.output and "undefined at" not in text.output and "systems by" not in text.output


def test_agreement_command_orders_systems_under_the_qrels_and_the_run_s_grades(graded_run, tmp_path):
    url, qrels_file = graded_run
    # Systems retrieving one passage of q1 each: human d1 3 > d6 2 > d3 1 > d4 0; the run's grades
    # d1 3 > d3 2 > d6 1 > d4 0. Only (S2, S3) swaps: 5 concordant of 6, tau = (5 - 1) / 6.
    # tau_ap: in the labels' order S1 S2 S3 S4, S2 has S1 rightly above it (1/1), S3 has S1 rightly and
    # S2 wrongly above it (1/2), S4 has all three rightly (3/3): 2 / 3 * (1 + 1/2 + 1) - 1 = 2/3.
    # rho: ranks 1 3 2 4 against 1 2 3 4, squared differences 0 1 1 0: 1 - 6 * 2 / (4 * 15) = 0.8.
    names = {}
    for name, doc in (("S1", "d1"), ("S2", "d3"), ("S3", "d6"), ("S4", "d4")):
        names[name] = str(tmp_path / f"{name}.trec")
        (tmp_path / f"{name}.trec").write_text(f"q1 Q0 {doc} 1 1.0 {name}\n")
    systems_options = [word for file in names.values() for word in ("--system", file)]
    runner = CliRunner()
    result = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--json", *systems_options])
    assert result.exit_code == 0, result.output
    systems = json.loads(result.output)["systems"]
    assert (systems["measure"], systems["queries"], systems["labels_graded"]) == ("nDCG@10", 2, True)
    assert (systems["kendall_tau"], systems["tau_ap"], systems["spearman_rho"]) == pytest.approx((4 / 6, 2 / 3, 0.8))
    # Over q1 and q2 (each system scores 0 on q2). q1's ideal under the qrels holds 3, 2, 2, 1, 1; under
    # the grades (d1 3, d2 d3 d5 2, d6 and d8 (0.4) 1, d4 0) 3, 2, 2, 2, 1, 1.
    ideal = 3 + 2 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(6)
    graded_ideal = 3 + 2 / math.log2(3) + 2 / math.log2(4) + 2 / math.log2(5) + 1 / math.log2(6) + 1 / math.log2(7)
    assert systems["measured"][names["S1"]] == pytest.approx({"qrels": 3 / ideal / 2, "labels": 3 / graded_ideal / 2})
    # Judged@10: q1's one passage is judged (1/1), q2 has none (0).
    assert systems["judged"] == pytest.approx({file: 0.5 for file in names.values()})

    text = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, *systems_options])
    assert text.exit_code == 0, text.output
    assert "systems by nDCG@10 over 2 queries: under the qrels, and under the run's grades (0-3) as qrels; " \
           "Judged@10 under the qrels" in text.output
    assert f"{names['S1']}  {3 / ideal / 2:.4f}  {3 / graded_ideal / 2:.4f}     0.5000" in text.output
    assert "over 4 systems: Kendall's tau 0.6667, tau_ap 0.6667 (the qrels' ordering as the truth), " \
           "Spearman's rho 0.8000" in text.output

    unknown = runner.invoke(main, ["agreement", "--run", url, "--qrels", qrels_file, "--measure", "nDCG@ten",
                                   *systems_options])
    assert unknown.exit_code == 2 and "--measure" in unknown.output and "unknown metric 'nDCG@ten'" in unknown.output


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
