"""The orderings of systems under qrels and under a run's labels: tau_ap, Kendall's tau, Spearman's
rho and Judged@10 on hand-made cases worked out here by hand (the command is tested in
test_agreement.py)."""

import itertools
import math

import numpy as np
import pyarrow as pa
import pytest

from rank1_batch.ir.system_order import Labels, label_qrels, systems, tau_ap

TRUTH = np.array([0.4, 0.3, 0.2, 0.1])  # systems A B C D, in that order under the qrels


def plain_tau_ap(truth, estimate) -> float:
    """The definition, for orderings without ties: 2 / (N - 1) * sum over i >= 2 of C(i) / (i - 1) - 1."""
    order = sorted(range(len(estimate)), key=lambda system: -estimate[system])
    right = sum(sum(truth[order[above]] > truth[order[i]] for above in range(i)) / i for i in range(1, len(order)))
    return 2 / (len(order) - 1) * right - 1


def test_tau_ap_by_hand_weighs_a_swap_near_the_top_more():
    assert tau_ap(TRUTH, TRUTH) == 1.0 and tau_ap(TRUTH, -TRUTH) == -1.0
    # Estimated B A C D: B's neighbour A is wrongly below it (C = 0 of 1); C has B and A rightly above
    # (2 of 2), D all three (3 of 3): 2 / 3 * (0 + 1 + 1) - 1 = 1/3.
    assert tau_ap(TRUTH, np.array([0.3, 0.4, 0.2, 0.1])) == pytest.approx(1 / 3)
    # Estimated A B D C: B 1 of 1, D 2 of 2, C 2 of 3 (D wrongly above it): 2 / 3 * (1 + 1 + 2/3) - 1 = 7/9.
    # Kendall's tau is 2/3 for both: one swap of six pairs.
    assert tau_ap(TRUTH, np.array([0.4, 0.3, 0.1, 0.2])) == pytest.approx(7 / 9)
    # Estimated B C A D: C 1 of 1, A 0 of 2, D 3 of 3: 2 / 3 * 2 - 1 = 1/3. With the roles swapped
    # (truth B C A D, estimated A B C D): B 0 of 1, C 1 of 2 (B rightly, A wrongly), D 3 of 3:
    # 2 / 3 * 1.5 - 1 = 0. tau_ap is asymmetric.
    swapped = np.array([0.2, 0.4, 0.3, 0.1])
    assert tau_ap(TRUTH, swapped) == pytest.approx(1 / 3) and tau_ap(swapped, TRUTH) == pytest.approx(0.0)


def test_tau_ap_with_ties_is_its_mean_over_the_ways_to_break_them():
    # Truth A B C, estimate A then B and C tied. Broken B C: the same order, 1; broken C B: C 1 of 1,
    # B 1 of 2, 2 / 2 * 1.5 - 1 = 0.5. Mean 0.75. A tie in the truth instead (B and C tied, the
    # estimate A B C) gives the same: B 1 of 1, C 1 and a half of 2 (B half right), 0.75.
    assert tau_ap(np.array([3.0, 2, 1]), np.array([3.0, 2, 2])) == pytest.approx(0.75)
    assert tau_ap(np.array([3.0, 2, 2]), np.array([3.0, 2, 1])) == pytest.approx(0.75)
    # Every system tied in the estimate: every pair is right half the time, 2 / 3 * 3 * 0.5 - 1 = 0.
    assert tau_ap(TRUTH, np.zeros(4)) == pytest.approx(0.0)
    random = np.random.default_rng(5)
    for _ in range(20):
        truth, estimate = random.integers(0, 3, 4).astype(float), random.integers(0, 3, 4).astype(float)
        # each tie broken by a small step in each order of the systems, both sides alike
        broken = [plain_tau_ap(truth - 1e-6 * np.array(first), estimate - 1e-6 * np.array(second))
                  for first in itertools.permutations(range(4)) for second in itertools.permutations(range(4))]
        assert tau_ap(truth, estimate) == pytest.approx(np.mean(broken))


def test_systems_by_hand_with_judged_at_10():
    # Four systems on q. Human relevance a 3, b 2, c 1, d 0; the run's grades a 2, b 3, c 0, d 1. Both
    # ideal rankings hold 3, 2, 1, 0. A retrieves a, then x, which neither side judges.
    human = {"q": {"a": 3, "b": 2, "c": 1, "d": 0}}
    labels = Labels({"q": {"a": 2, "b": 3, "c": 0, "d": 1}}, graded=True)
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    runs = {name: {"q": {doc: 1.0}} for name, doc in (("B", "b"), ("C", "c"), ("D", "d"))}
    runs["A"] = {"q": {"a": 2.0, "x": 1.0}}
    result = systems(runs, human, labels)
    assert result.measured["A"] == pytest.approx({"qrels": 3 / ideal, "labels": 2 / ideal})
    assert result.measured["D"] == pytest.approx({"qrels": 0.0, "labels": 1 / ideal})
    # Judged@10: of A's two passages one is judged (1/2); the others' one passage each is (1/1).
    assert result.judged == pytest.approx({"A": 0.5, "B": 1.0, "C": 1.0, "D": 1.0})
    # Human order A B C D, labels' B A D C. Of the 6 pairs, (A, B) and (C, D) swap: tau (4 - 2) / 6.
    # tau_ap, the labels' order B A D C: A 0 of 1, D 2 of 2, C 2 of 3: 2 / 3 * (0 + 1 + 2/3) - 1 = 1/9.
    # rho: ranks 1 2 3 4 against 2 1 4 3, squared differences 1 each: 1 - 6 * 4 / (4 * 15) = 0.6.
    assert (result.kendall_tau, result.tau_ap, result.spearman_rho) == pytest.approx((2 / 6, 1 / 9, 0.6))
    assert (result.measure, result.queries, result.labels_graded) == ("nDCG@10", 1, True)


def test_a_binary_measure_counts_label_1_relevant_and_grades_from_the_relevance_cut():
    # P@1 of systems retrieving one passage each; the qrels count relevance >= 2 relevant.
    human = {"q": {"a": 3, "b": 2, "c": 1, "d": 0}}
    runs = {name: {"q": {doc: 1.0}} for name, doc in (("A", "a"), ("B", "b"), ("C", "c"), ("D", "d"))}
    # Labels a and c true: relevant from 1, so A and C score 1.
    labelled = systems(runs, human, Labels({"q": {"a": 1, "b": 0, "c": 1, "d": 0}}, graded=False), "P@1")
    assert {name: value["labels"] for name, value in labelled.measured.items()} == {"A": 1, "B": 0, "C": 1, "D": 0}
    assert {name: value["qrels"] for name, value in labelled.measured.items()} == {"A": 1, "B": 1, "C": 0, "D": 0}
    # The same values as grades are relevant from 2: none is.
    graded = systems(runs, human, Labels({"q": {"a": 1, "b": 0, "c": 1, "d": 0}}, graded=True), "P@1")
    assert {name: value["labels"] for name, value in graded.measured.items()} == dict.fromkeys("ABCD", 0)
    # Every system alike under the labels: tau and rho are undefined; tau_ap, every pair right half
    # the time, is 0.
    assert graded.kendall_tau is None and graded.spearman_rho is None and graded.tau_ap == pytest.approx(0.0)


def test_label_qrels_take_the_grades_when_every_pair_has_one_else_the_labels():
    table = pa.table({"query_id": ["q", "q", "q"], "doc_id": ["a", "b", "c"], "label": [True, False, True],
                      "grade": pa.array([2, 0, 1], pa.int8())})
    assert label_qrels(table) == Labels({"q": {"a": 2, "b": 0, "c": 1}}, graded=True)
    # One pair without a grade (written before the column): the labels, one scale for every pair.
    mixed = table.set_column(3, "grade", pa.array([2, None, 1], pa.int8()))
    assert label_qrels(mixed) == Labels({"q": {"a": 1, "b": 0, "c": 1}}, graded=False)
    # A pair without a label is left out.
    unlabelled = mixed.set_column(2, "label", pa.array([True, None, True]))
    assert label_qrels(unlabelled) == Labels({"q": {"a": 1, "c": 1}}, graded=False)
