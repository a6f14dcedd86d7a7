"""What `review import` makes of Label Studio's JSON export: each reviewed pair's decision, and how
far the reviewers agreed with the model. Pure: parsed JSON and tables in, tables and figures out.

A decision is the majority of a pair's annotators' choices; a tie is no decision. An annotation
that was skipped (`was_cancelled`) or holds no choice is no vote. Tasks of the same pair (imported
twice) pool their votes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ir.agreement import kappa
from ..ir.qrels import KEY, with_provenance
from ..schema import pair_keys
from .scored import Scale, ScoredRun

SOURCE = "human-review"


class ExportError(ValueError):
    """A Label Studio export that cannot be taken, named by file and task."""


@dataclass(frozen=True)
class Review:
    """One pair's tasks, and each vote on it: (annotator, choice)."""

    query_id: str
    doc_id: str
    tasks: tuple[int, ...]
    votes: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"task {', '.join(map(str, self.tasks))} ({self.query_id}, {self.doc_id})"


def read_export(text: str, url: str) -> list[dict]:
    """The tasks of a Label Studio JSON export: a list of tasks, each with its `id`, `data` and `annotations`."""
    shape = "a Label Studio JSON export (a list of tasks, each with its id, data and annotations)"
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as error:
        raise ExportError(f"{url}: not JSON ({error}), so not {shape}") from None
    if not isinstance(tasks, list) or not tasks:
        raise ExportError(f"{url}: not {shape}" + (": it holds no task" if tasks == [] else ""))
    for position, task in enumerate(tasks):
        if not (isinstance(task, dict) and "id" in task and isinstance(task.get("data"), dict)
                and isinstance(task.get("annotations"), list)):
            raise ExportError(f"{url}: the task at position {position} is not a task of {shape}")
        if not all(isinstance(task["data"].get(name), str) for name in KEY):
            raise ExportError(f"{url}: task {task['id']} has no query_id and doc_id in its data, so is not a "
                              "task of `rank1-batch review export`")
    return tasks


def annotator(completed_by) -> str:
    """Who made an annotation: Label Studio exports the user's id, or the user as an object."""
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    return str(completed_by)


def votes(task: dict, scale: Scale, url: str) -> list[tuple[str, str]]:
    """The task's votes: its annotations not skipped and with a choice, each on the scale."""
    found = []
    for annotation in task["annotations"]:
        if annotation.get("was_cancelled"):
            continue
        chosen = [choice for result in annotation.get("result") or [] if result.get("type") == "choices"
                  for choice in (result.get("value") or {}).get("choices") or []]
        if not chosen:
            continue
        where = (f"{url}: task {task['id']} ({task['data']['query_id']}, {task['data']['doc_id']}), annotation "
                 f"{annotation.get('id')}")
        if len(chosen) > 1 or chosen[0] not in scale.choices:
            raise ExportError(f"{where}: {', '.join(map(repr, chosen))} is not one choice of the run's scale "
                              f"({', '.join(scale.choices)})")
        found.append((annotator(annotation.get("completed_by")), chosen[0]))
    return found


def reviews(tasks: list[dict], scale: Scale, url: str) -> list[Review]:
    """Each pair's tasks and votes, in the order of their first task."""
    pooled: dict[tuple[str, str], tuple[list[int], list]] = {}
    for task in tasks:
        ids, found = pooled.setdefault((task["data"]["query_id"], task["data"]["doc_id"]), ([], []))
        ids.append(task["id"])
        found.extend(votes(task, scale, url))
    return [Review(query_id, doc_id, tuple(ids), tuple(found)) for (query_id, doc_id), (ids, found) in pooled.items()]


def decision(review: Review) -> str | None:
    """The choice most votes give; None for a tie, or no vote."""
    counts = Counter(choice for _, choice in review.votes).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


@dataclass(frozen=True)
class Decided:
    decisions: pa.Table  # query_id, doc_id, relevance, annotators (those whose choice it is)
    ties: list[Review]
    undecided: list[Review]  # every annotation skipped, or none


def decide(found: list[Review], scale: Scale) -> Decided:
    rows, ties, undecided = [], [], []
    for review in found:
        choice = decision(review)
        if choice is not None:
            rows.append((review.query_id, review.doc_id, scale.relevance_of(choice),
                         sorted({who for who, voted in review.votes if voted == choice})))
        elif review.votes:
            ties.append(review)
        else:
            undecided.append(review)
    columns = list(zip(*rows)) or [(), (), (), ()]
    decisions = pa.table({"query_id": pa.array(columns[0], pa.string()), "doc_id": pa.array(columns[1], pa.string()),
                          "relevance": pa.array(columns[2], pa.int64()),
                          "annotators": pa.array(columns[3], pa.list_(pa.string()))})
    return Decided(decisions, ties, undecided)


def unknown_pairs(found: list[Review], scores: pa.Table) -> list[Review]:
    """The reviewed pairs that the run did not score."""
    reviewed = pa.table({"query_id": [review.query_id for review in found],
                         "doc_id": [review.doc_id for review in found]})
    scored = pc.is_in(pair_keys(reviewed), value_set=pair_keys(scores)).to_numpy(zero_copy_only=False)
    return [found[position] for position in np.flatnonzero(~scored)]


def provenance(decisions: pa.Table, run: ScoredRun) -> pa.Table:
    """The decisions as qrels with their provenance: the reviewers, and what the model had said.
    Every decided pair is in the run (see `unknown_pairs`)."""
    said = run.scores.take(pc.index_in(pair_keys(decisions), value_set=pair_keys(run.scores)))
    return with_provenance(decisions, SOURCE, model=run.model, output=run.url, annotators=decisions["annotators"],
                           model_relevance=run.model_relevance(said), model_score=said["score"])


@dataclass(frozen=True)
class ReviewAgreement:
    """The reviewers' decisions against the model's judgements of the same pairs, on the run's
    scale: `confusion`'s rows are the reviewers' choices, its columns the model's."""

    pairs: int
    overridden: int  # decisions other than the model's
    kappa: float | None
    quadratic_kappa: float | None  # graded runs only: a near miss counts less
    choices: list[str]
    confusion: list[list[int]]


def review_agreement(reviewed: pa.Table, scale: Scale) -> ReviewAgreement:
    """`reviewed` holds `relevance` (the reviewers') and `model_relevance` of each decided pair, one or more."""
    from sklearn.metrics import confusion_matrix

    reviewers, model = reviewed["relevance"].to_numpy(), reviewed["model_relevance"].to_numpy()
    values = list(scale.relevance)
    return ReviewAgreement(
        pairs=len(reviewers),
        overridden=int(np.sum(reviewers != model)),
        kappa=kappa(reviewers, model, values),
        quadratic_kappa=kappa(reviewers, model, values, "quadratic") if scale.graded else None,
        choices=list(scale.choices),
        confusion=confusion_matrix(reviewers, model, labels=values).tolist(),
    )
