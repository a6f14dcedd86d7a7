"""A run as a review sees it: its scored pairs with their labels, its model, and the scale of
choices its pairs are reviewed on: the grades 0 to 3 for a run made with --grades, else relevant
or not relevant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from ..config import RunConfig
from ..ir.labels import read_labels
from ..output.checkpoint import recorded_identity
from ..output.storage import Output
from ..schema import run_relevance

GRADES = ("0", "1", "2", "3")
RELEVANT = "relevant"
NOT_RELEVANT = "not relevant"


@dataclass(frozen=True)
class Scale:
    """The choices a reviewer has, as Label Studio shows and exports them, and the qrels relevance
    each stands for."""

    choices: tuple[str, ...]
    relevance: tuple[int, ...]

    @property
    def graded(self) -> bool:
        return self.choices == GRADES

    def choice(self, relevance: int) -> str:
        return self.choices[self.relevance.index(relevance)]

    def relevance_of(self, choice: str) -> int:
        return self.relevance[self.choices.index(choice)]


def scale(graded: bool) -> Scale:
    """A grade is its own relevance; a binary run's choices are 0 and 1, as `rank1-batch qrels`
    writes its labels."""
    if graded:
        return Scale(GRADES, tuple(range(len(GRADES))))
    return Scale((NOT_RELEVANT, RELEVANT), (0, 1))


@dataclass(frozen=True)
class ScoredRun:
    url: str  # with its protocol, as tasks carry it so that an import finds the run again
    model: str
    threshold: float
    cuts: tuple[float, ...] | None  # the grades' cut points; None for a binary run
    job: dict  # _job.json
    scores: pa.Table  # labels.LABEL_COLUMNS and the extra columns read

    @property
    def graded(self) -> bool:
        return self.cuts is not None

    @property
    def boundaries(self) -> tuple[float, ...]:
        """The scores where a pair's judgement changes: the grades' cut points, else the threshold."""
        return self.cuts if self.cuts is not None else (self.threshold,)

    @property
    def scale(self) -> Scale:
        return scale(self.graded)

    def model_relevance(self, scores: pa.Table) -> pa.ChunkedArray:
        """What the model said of each pair, as qrels relevance on the run's scale."""
        return run_relevance(scores, self.graded)


def read_scored_run(url: str, storage: RunConfig, extra: Sequence[str] = ()) -> ScoredRun:
    """The run at `url` with the `extra` columns of scores/; NotAnOutput if it is not one."""
    output = Output(url, storage)
    job = recorded_identity(output)
    cuts = job["scoring"].get("grades")
    return ScoredRun(
        url=output.fs.unstrip_protocol(output.root),
        model=job["engine"]["model"],
        threshold=job["scoring"]["threshold"],
        cuts=tuple(cuts) if cuts else None,
        job=job,
        scores=read_labels(output, extra),
    )
