"""Would a run's labels order systems as the human qrels do? Each system is measured under the qrels
and under the run's labels used as qrels, and the two orderings of the systems are compared by
Kendall's tau, Yilmaz, Aslam and Robertson's AP rank correlation (tau_ap, which weighs a swap near
the top more) and Spearman's rho. Pure, free of Ray and vLLM; scipy is imported where it is used,
as in `agreement`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import run_relevance
from .agreement import DEFAULT_RELEVANCE_CUT, defined
from .evaluate import Qrels, Run, evaluate

DEFAULT_MEASURE = "nDCG@10"
# How much of each system's top 10 the human qrels judge: a low share makes its figures unsure.
JUDGED_MEASURE = "Judged@10"


@dataclass(frozen=True)
class Labels:
    """A run's labels as qrels."""

    qrels: Qrels
    graded: bool  # relevance is the run's grade (0-3), else its label (0 or 1)


def label_qrels(scores: pa.Table) -> Labels:
    """`scores` (query_id, doc_id, label, grade) as qrels on one scale: the grades (0-3) when
    every pair has one, else the labels as 0 or 1. Pairs without a label (a raw logit's) are left
    out."""
    graded = scores.num_rows > 0 and scores["grade"].null_count == 0
    relevance = run_relevance(scores, graded)
    valid = pc.is_valid(relevance)
    qrels: Qrels = {}
    for query_id, doc_id, value in zip(scores["query_id"].filter(valid).to_pylist(),
                                       scores["doc_id"].filter(valid).to_pylist(), relevance.filter(valid).to_pylist()):
        qrels.setdefault(query_id, {})[doc_id] = value
    return Labels(qrels, graded)


@dataclass(frozen=True)
class Systems:
    """Systems measured under the qrels and under a run's labels used as qrels, and how alike the
    two orderings of the systems are."""

    measure: str
    queries: int  # judged by both
    labels_graded: bool  # the labels' qrels hold the run's grades (0-3), else its labels (0 or 1)
    measured: dict[str, dict[str, float]]  # system -> {"qrels": value, "labels": value}
    judged: dict[str, float]  # system -> Judged@10 under the qrels
    kendall_tau: float | None  # None when either side measures every system alike
    tau_ap: float | None  # the qrels' ordering as the truth
    spearman_rho: float | None  # None when either side measures every system alike


def systems(runs: dict[str, Run], qrels: Qrels, labels: Labels, measure: str = DEFAULT_MEASURE,
            relevance_cut: int = DEFAULT_RELEVANCE_CUT) -> Systems:
    """Every system over the queries that both qrels judge (a query a system lacks scores 0), so
    that both orderings rank the same work. A binary measure counts qrels relevance from
    `relevance_cut` up as relevant, and so grades (calibrated to the qrels' scale), or label 1.
    tau_ap takes the ordering under the human qrels as the truth, the labels' as the estimate."""
    from scipy.stats import kendalltau, spearmanr

    queries = qrels.keys() & labels.qrels.keys()
    labels_cut = relevance_cut if labels.graded else 1
    measured, judged = {}, {}
    for name, run in runs.items():
        human = evaluate(run, qrels, [measure, JUDGED_MEASURE], relevance_cut, queries)
        measured[name] = {"qrels": human[measure],
                          "labels": evaluate(run, labels.qrels, [measure], labels_cut, queries)[measure]}
        judged[name] = human[JUDGED_MEASURE]
    truth = np.array([value["qrels"] for value in measured.values()])
    estimate = np.array([value["labels"] for value in measured.values()])
    with warnings.catch_warnings():  # a constant side: tau and rho are undefined, None here
        warnings.simplefilter("ignore")
        tau, rho = kendalltau(truth, estimate).statistic, spearmanr(truth, estimate).statistic
    return Systems(measure, len(queries), labels.graded, measured, judged, defined(tau),
                   tau_ap(truth, estimate) if len(truth) > 1 else None, defined(rho))


def tau_ap(truth: np.ndarray, estimate: np.ndarray) -> float:
    """AP rank correlation (Yilmaz, Aslam and Robertson, SIGIR 2008) of the ordering of systems by
    `estimate` (higher first) against the true ordering, by `truth`: for each system but the
    first of the estimated ordering, at position i, C(i) is how many of the i - 1 systems above it
    the truth also puts above it, and tau_ap = 2 / (N - 1) * sum over i of C(i) / (i - 1), minus
    1. It is 1 on the same ordering, -1 on the reversed one, and asymmetric: a swap weighs by the
    estimated position of its lower system, so a swap near the estimated top costs more, and
    swapping `truth` and `estimate` changes the value.

    Ties, which the definition does not have, are broken at random and the expectation taken, as
    Urbano and Marrero's tau_AP_a (ICTIR 2017) does for ties in the estimate: a system tied with
    others in the estimate takes each position of its tie group alike, and a pair tied on either
    side is in the right order half the time. So ties cost: all tied in the estimate gives 0,
    and the same ordering with ties on both sides gives less than 1."""
    # above[i, j]: j is above i's tie group in the estimate; right[i, j]: the truth puts j above i
    above = estimate[None, :] > estimate[:, None]
    right = np.where(truth[None, :] > truth[:, None], 1.0, np.where(truth[None, :] == truth[:, None], 0.5, 0.0))
    first = above.sum(axis=1) + 1  # each system's highest position: 1 + the systems above its group
    group = (estimate[None, :] == estimate[:, None]).sum(axis=1)
    total = 0.0
    for system in range(len(estimate)):
        # Each position p of the group alike: the systems above the group count at 1 / (p - 1)
        # (none are above the first position), and at p = first + k the k group members above
        # are each half right, at 1 / (first + k - 1).
        positions = np.arange(max(first[system], 2), first[system] + group[system])
        total += (above[system] * right[system]).sum() * (1 / (positions - 1)).sum() / group[system]
        members = np.arange(1, group[system])
        total += (members / (first[system] + members - 1)).sum() / (2 * group[system])
    return 2 / (len(estimate) - 1) * total - 1
