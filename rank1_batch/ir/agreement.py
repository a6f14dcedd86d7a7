"""How far a run's relevance labels agree with human judgments (qrels), and the cut points that
make them agree best: pure, free of Ray and vLLM.

A run labels each pair twice over: `label` (score >= threshold) and, given cut points, `grade`
(how many of them the score reaches, 0 to 3). On the pairs that both the run and the qrels judge,
`label` is compared with qrels relevance >= a cut (2 for TREC DL passages, as UMBRELA does), over
all pairs and query by query, and `grade` with the relevance itself: by Cohen's kappa, plain and
quadratic-weighted, as grades are ordered (a 2 against a 3 is a nearer miss than a 0 against a 3),
by Krippendorff's alpha for ordinal data, and by Cohen's kappa with both sides cut in two at each
point of the 0-3 scale, as LLMJudge's analysis does.

scikit-learn, scipy and krippendorff are imported where they are used: they take about a second
to import, and a run, whose workers map scores to grades, needs none of them.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import grades
from .evaluate import Qrels

# The qrels' cut for a relevant passage: TREC DL's passage judgments are 0 to 3, and 2 is relevant.
DEFAULT_RELEVANCE_CUT = 2
# The top grade: a run's grades count three cut points, as TREC DL's judgments run 0 to 3.
TOP_GRADE = 3
# Candidate cut points for the grades, from the quantiles of the judged scores: every triple of
# them is tried, 161,700 at this many, in well under a second.
GRADE_CANDIDATES = 100


def qrels_table(qrels: Qrels) -> pa.Table:
    judgments = [(query_id, doc_id, relevance) for query_id, docs in qrels.items() for doc_id, relevance in docs.items()]
    query_ids, doc_ids, relevance = zip(*judgments) if judgments else ((), (), ())
    return pa.table({"query_id": pa.array(query_ids, pa.string()), "doc_id": pa.array(doc_ids, pa.string()),
                     "relevance": pa.array(relevance, pa.int64())})


@dataclass(frozen=True)
class Judged:
    """The pairs that both the run and the qrels judge, as arrays in (query_id, doc_id) order,
    and how many pairs only one side has."""

    query_id: np.ndarray
    relevance: np.ndarray  # the qrels' judgment
    score: np.ndarray
    label: np.ndarray
    grade: np.ndarray | None  # None when the run has no grades
    run_only: int  # pairs the run scored that the qrels do not judge
    qrels_only: int  # judgments of the run's queries for pairs the run did not score

    @property
    def pairs(self) -> int:
        return len(self.relevance)


def judged_pairs(scores: pa.Table, qrels: Qrels) -> Judged:
    """`scores` (query_id, doc_id, score, label, grade) against the qrels. Judgments of queries the
    run has none of are not counted as missing: qrels often cover more queries than one run."""
    judgments = qrels_table(qrels)
    key = ["query_id", "doc_id"]
    both = (scores.select([*key, "score", "label", "grade"]).join(judgments, key, join_type="inner")
            .sort_by([(name, "ascending") for name in key]))
    of_run = judgments.filter(pc.is_in(judgments["query_id"], pc.unique(scores["query_id"])))
    graded = both.num_rows > 0 and both["grade"].null_count == 0
    return Judged(
        query_id=both["query_id"].to_numpy(zero_copy_only=False),
        relevance=both["relevance"].to_numpy(),
        score=both["score"].to_numpy(),
        label=both["label"].to_numpy(zero_copy_only=False),
        grade=both["grade"].to_numpy().astype(np.int64) if graded else None,
        run_only=scores.num_rows - both.num_rows,
        qrels_only=of_run.num_rows - both.num_rows,
    )


@dataclass(frozen=True)
class Binary:
    """`label` against qrels relevance >= `relevance_cut`. Undefined figures are None: kappa when
    both sides give every pair one label, precision when no pair is labelled relevant, recall when
    none is judged relevant."""

    relevance_cut: int
    kappa: float | None
    precision: float | None  # of the pairs labelled relevant, the share the qrels judge relevant
    recall: float | None  # of the pairs the qrels judge relevant, the share labelled relevant
    confusion: list[list[int]]  # rows: qrels not relevant, relevant; columns: label false, true


@dataclass(frozen=True)
class Split:
    """Cohen's kappa of grade and qrels relevance, each cut in two at the same point: relevant is
    a value >= `at`. `name` shows the split of the 0-3 scale, "0|123" for `at` 1."""

    name: str
    at: int
    kappa: float | None


@dataclass(frozen=True)
class Graded:
    """`grade` against qrels relevance, on one scale: `values` are the rows (qrels) and columns
    (grades) of `confusion`."""

    values: list[int]
    kappa: float | None
    quadratic_kappa: float | None
    alpha: float | None  # Krippendorff's, for ordinal data
    splits: list[Split]  # at 1, 2 and 3
    confusion: list[list[int]]


@dataclass(frozen=True)
class Spread:
    """How a figure spreads over the queries where it is defined."""

    count: int
    mean: float
    std: float  # population standard deviation
    minimum: float
    median: float
    maximum: float


@dataclass(frozen=True)
class Topics:
    """`label` against qrels relevance >= `relevance_cut` by Cohen's kappa, query by query."""

    relevance_cut: int
    kappa: dict[str, float]  # query -> kappa, of the queries where it is defined
    undefined: list[str]  # queries where both sides give each of their pairs one and the same label
    spread: Spread | None  # of `kappa`; None when no query's kappa is defined


@dataclass(frozen=True)
class Agreement:
    """A run's labels against the qrels, on the pairs both judge."""

    judged: int
    run_only: int
    qrels_only: int
    binary: Binary
    graded: Graded | None  # None when the run has no grades
    topics: Topics


def defined(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def kappa(truth: np.ndarray, predicted: np.ndarray, values: list, weights: str | None = None) -> float | None:
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings():  # undefined is None here, not a warning
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return defined(cohen_kappa_score(truth, predicted, labels=values, weights=weights))


def binary(relevance: np.ndarray, label: np.ndarray, relevance_cut: int) -> Binary:
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    truth = relevance >= relevance_cut
    both = [False, True]
    return Binary(
        relevance_cut=relevance_cut,
        kappa=kappa(truth, label, both),
        precision=defined(precision_score(truth, label, zero_division=np.nan)),
        recall=defined(recall_score(truth, label, zero_division=np.nan)),
        confusion=confusion_matrix(truth, label, labels=both).tolist(),
    )


def graded(relevance: np.ndarray, grade: np.ndarray) -> Graded:
    """Weights go by the values' distance, so the scale is every integer from the lowest value
    to the highest of either side, and at least 0 to 3 (the grades' scale), whether it occurs or
    not. In the splits, qrels relevance above 3 (some collections judge 0 to 4) counts as 3: it is
    relevant at every cut."""
    from sklearn.metrics import confusion_matrix

    values = list(range(int(min(relevance.min(), grade.min(), 0)),
                        int(max(relevance.max(), grade.max(), TOP_GRADE)) + 1))
    scale = "".join(map(str, range(TOP_GRADE + 1)))
    return Graded(
        values=values,
        kappa=kappa(relevance, grade, values),
        quadratic_kappa=kappa(relevance, grade, values, "quadratic"),
        alpha=ordinal_alpha(relevance, grade, values),
        splits=[Split(f"{scale[:at]}|{scale[at:]}", at, kappa(relevance >= at, grade >= at, [False, True]))
                for at in range(1, TOP_GRADE + 1)],
        confusion=confusion_matrix(relevance, grade, labels=values).tolist(),
    )


def ordinal_alpha(relevance: np.ndarray, grade: np.ndarray, values: list[int]) -> float | None:
    """Krippendorff's alpha for ordinal data, the qrels and the run as two coders of each pair;
    undefined (None) when every value given is one and the same."""
    import krippendorff

    with np.errstate(divide="ignore", invalid="ignore"):
        return defined(krippendorff.alpha(reliability_data=np.stack([relevance, grade]), value_domain=values,
                                          level_of_measurement="ordinal"))


def topics(query_id: np.ndarray, relevance: np.ndarray, label: np.ndarray, relevance_cut: int) -> Topics:
    """Each query's kappa at once, from the stack of the queries' confusion matrices. A query's
    kappa is undefined (0/0) when both sides give all its pairs one and the same label."""
    encoded = pc.dictionary_encode(pa.array(query_id, pa.string()))  # a hash: np.unique sorts, ten times slower
    queries, query = encoded.dictionary.to_numpy(zero_copy_only=False), encoded.indices.to_numpy().astype(np.int64)
    cells = query * 4 + (relevance >= relevance_cut) * 2 + label.astype(np.int64)
    confusions = np.bincount(cells, minlength=len(queries) * 4).reshape(-1, 2, 2)
    both = np.array([0, 1])
    values = _kappas(confusions, both, both, quadratic=False)
    known = ~np.isnan(values)
    found = values[known]
    spread = Spread(int(found.size), float(found.mean()), float(found.std()), float(found.min()),
                    float(np.median(found)), float(found.max())) if found.size else None
    return Topics(relevance_cut, dict(zip(queries[known].tolist(), found.tolist())), queries[~known].tolist(), spread)


def agreement(judged: Judged, relevance_cut: int = DEFAULT_RELEVANCE_CUT) -> Agreement:
    return Agreement(
        judged=judged.pairs,
        run_only=judged.run_only,
        qrels_only=judged.qrels_only,
        binary=binary(judged.relevance, judged.label, relevance_cut),
        graded=graded(judged.relevance, judged.grade) if judged.grade is not None else None,
        topics=topics(judged.query_id, judged.relevance, judged.label, relevance_cut),
    )


@dataclass(frozen=True)
class Calibration:
    """The threshold and grade cut points that agree best with the qrels on the judged pairs, and
    the kappa each gives."""

    judged: int
    relevance_cut: int
    threshold: float
    kappa: float  # binary, at `threshold`
    grades: tuple[float, float, float] | None  # None with fewer than three distinct judged scores
    graded: Graded | None  # the grades at those cut points against the qrels


def calibrate(judged: Judged, relevance_cut: int = DEFAULT_RELEVANCE_CUT) -> Calibration:
    """The threshold that maximises binary kappa, tried at every distinct judged score (each parts
    the pairs differently), and the three cut points that maximise quadratic-weighted kappa on
    grades (ordered grades: a near miss costs less), every triple of up to `GRADE_CANDIDATES`
    quantiles of the judged scores. Each value is given as the shortest decimal that parts the
    judged pairs as the value found does."""
    truth = judged.relevance >= relevance_cut
    if truth.all() or not truth.any():
        raise ValueError(f"{'every' if truth.all() else 'no'} judged pair is relevant at --relevance-cut "
                         f"{relevance_cut}: kappa cannot tell one threshold from another")
    distinct = np.unique(judged.score)
    threshold = _shortest(distinct, _best_threshold(judged.score, truth, distinct))
    binary_kappa = kappa(truth, judged.score >= threshold, [False, True])
    candidates = np.unique(np.quantile(judged.score, np.linspace(0, 1, GRADE_CANDIDATES), method="higher"))
    if len(candidates) < 3:
        return Calibration(judged.pairs, relevance_cut, threshold, binary_kappa, None, None)
    cuts = tuple(_shortest(distinct, cut) for cut in _best_cuts(judged.score, judged.relevance, candidates))
    return Calibration(judged.pairs, relevance_cut, threshold, binary_kappa, cuts,
                       graded(judged.relevance, grades(judged.score, cuts).to_numpy().astype(np.int64)))


def _kappas(confusions: np.ndarray, rows: np.ndarray, columns: np.ndarray, quadratic: bool) -> np.ndarray:
    """Cohen's kappa of each confusion matrix of a stack (..., rows, columns) whose rows and
    columns hold the values given: one minus observed over chance disagreement."""
    distance = rows[:, None] - columns[None, :]
    weights = distance ** 2 if quadratic else (distance != 0)
    pairs = confusions.sum(axis=(-2, -1), keepdims=True)
    chance = confusions.sum(axis=-1, keepdims=True) * confusions.sum(axis=-2, keepdims=True) / pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 - (weights * confusions).sum(axis=(-2, -1)) / (weights * chance).sum(axis=(-2, -1))


def _best_threshold(score: np.ndarray, truth: np.ndarray, candidates: np.ndarray) -> float:
    """The candidate whose `score >= candidate` labels agree best with `truth`, all at once:
    each candidate's confusion matrix from the sorted scores of each side."""
    counts = []
    for side in (~truth, truth):
        ordered = np.sort(score[side])
        labelled = len(ordered) - np.searchsorted(ordered, candidates, side="left")
        counts.append(np.stack([len(ordered) - labelled, labelled], axis=-1))
    confusions = np.stack(counts, axis=1)  # (candidate, qrels side, label)
    both = np.array([0, 1])
    return float(candidates[np.nanargmax(_kappas(confusions, both, both, quadratic=False))])


def _best_cuts(score: np.ndarray, relevance: np.ndarray, candidates: np.ndarray) -> tuple[float, float, float]:
    """The triple of candidates whose grades agree best with `relevance` by quadratic-weighted
    kappa: each triple's confusion matrix from the counts, per relevance value, of scores below
    each candidate."""
    values = np.unique(relevance)
    below = np.stack([np.searchsorted(np.sort(score[relevance == value]), candidates, side="left") for value in values])
    totals = np.array([(relevance == value).sum() for value in values])[:, None]
    first, second, third = np.array(list(itertools.combinations(range(len(candidates)), 3))).T
    confusions = np.stack([below[:, first], below[:, second] - below[:, first], below[:, third] - below[:, second],
                           totals - below[:, third]], axis=-1).transpose(1, 0, 2)  # (triple, relevance, grade)
    best = np.nanargmax(_kappas(confusions, values, np.arange(4), quadratic=True))
    return float(candidates[first[best]]), float(candidates[second[best]]), float(candidates[third[best]])


def _shortest(distinct: np.ndarray, cut: float) -> float:
    """The shortest decimal in (the distinct score below `cut`, `cut`]: it parts the scores as
    `cut` does, and reads well as an option."""
    position = np.searchsorted(distinct, cut, side="left")
    below = distinct[position - 1] if position else -math.inf
    for digits in range(1, 17):
        shorter = math.floor(cut * 10 ** digits) / 10 ** digits
        if below < shorter <= cut:
            return shorter
    return cut
