"""Score arithmetic and the choice of outcome: pure functions shared by the engine and the tests."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

FALLBACK_SCORE = 0.5


class Outcome(str, Enum):
    ANSWERED = "answered"  # the main pass closed its reasoning and said true or false
    FORCED = "forced"  # the label was read after appending `</think>` to the cut reasoning
    FALLBACK = "fallback"  # no label could be read; the pair scores 0.5


OUTCOMES = tuple(outcome.value for outcome in Outcome)


def score_from_logprobs(logprob_true: float, logprob_false: float) -> float:
    """P(true) against P(false): exp(lt) / (exp(lt) + exp(lf)), computed without overflow."""
    diff = logprob_true - logprob_false
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    expd = math.exp(diff)
    return expd / (1.0 + expd)


def answered_label(finish_reason: str | None, stop_reason: object, stop_strings: tuple[str, ...]) -> bool:
    """Whether the main pass ended on one of the label stop strings.

    With exact label logprobs both labels are present at every position, so their presence no
    longer tells that the model answered; only the stop string does.
    """
    return finish_reason == "stop" and stop_reason in stop_strings


def usable(logprob_true: float | None, logprob_false: float | None) -> bool:
    return (
        logprob_true is not None
        and logprob_false is not None
        and not (math.isinf(logprob_true) and math.isinf(logprob_false))
        and not (math.isnan(logprob_true) or math.isnan(logprob_false))
    )


@dataclass(frozen=True)
class Judgement:
    score: float
    outcome: Outcome
    logprob_true: float | None
    logprob_false: float | None


def judge(outcome: Outcome, logprob_true: float | None, logprob_false: float | None) -> Judgement:
    """The score of a pair read at `outcome`'s step, or the fallback when the logprobs are unusable."""
    if outcome is Outcome.FALLBACK or not usable(logprob_true, logprob_false):
        return Judgement(FALLBACK_SCORE, Outcome.FALLBACK, logprob_true, logprob_false)
    return Judgement(score_from_logprobs(logprob_true, logprob_false), outcome, logprob_true, logprob_false)


@dataclass(frozen=True)
class Consensus:
    """What a pair's samples say together (one sample: its own judgement)."""

    score: float  # the mean P(true) over the samples
    label: bool  # the label most samples give (score >= threshold); a tie goes to the mean score's, or by mode to false
    agreement: float  # the share of samples whose label is `label`
    chosen: int  # the first sample whose label is `label`: its outcome, logprobs and trace stand for the pair


def consensus(scores: Sequence[float], threshold: float, aggregate: str = "mean") -> Consensus:
    """The consensus of the samples' scores, each sample's label being its score >= threshold; a
    tie of votes goes to the mean score's side, or with aggregate `mode` to the lower label, false.
    `fsum` keeps the mean independent of the samples' order, and one sample's score exact."""
    votes = [score >= threshold for score in scores]
    score = math.fsum(scores) / len(scores)
    true = sum(votes)
    label = 2 * true > len(votes) or (2 * true == len(votes) and aggregate == "mean" and score >= threshold)
    agreeing = true if label else len(votes) - true
    return Consensus(score, label, agreeing / len(votes), votes.index(label))
