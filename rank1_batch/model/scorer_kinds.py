"""The kinds of scorer a run can use, behind the one interface the pipeline's stages call: how a
pair is encoded, which async engine judges it, and what its judgement holds. Knows nothing of Ray;
vLLM is imported only when an engine starts.

A run's stages never ask which kind they hold: a new kind is one more class here.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from ..config import EngineConfig, ScoringConfig
from .cross_encoder import CrossEncoderTemplate, PairEncoder, check_cross_encoder, cross_encoder_template
from .encoding import EncodedPrompt, PromptEncoder, context_length, load_tokenizer
from .judgement import consensus
from .scorer import PairScore, pair_score

# What a Rank1 score is: P(true) against P(false) at the answer.
PROBABILITY = "probability"


class ScorerKind(Protocol):
    name: str
    # What `score` is: PROBABILITY, or a cross-encoder template's score function (logit, sigmoid)
    score_function: str
    # Whether a judgement has reasoning: traces/ is written only for a kind that reasons.
    reasons: bool

    def describe(self) -> dict:
        """What a manifest records of the scorer."""

    def encoder(self):
        """The pair encoder: `encode(query, text, title, instruction)` gives an EncodedPrompt, or
        raises PromptTooLong. Loading it refuses a model the kind cannot serve, before any engine
        starts and before anything is written."""

    def start_engine(self, encoder):
        """An async engine for `judge`."""

    async def judge(self, engine, item: EncodedPrompt) -> PairScore:
        """A pair's judgement."""

    def stored_labels(self, judged: pa.Table) -> pa.Table:
        """Judgements from the score store with this run's label, samples and agreement columns."""


class Rank1Kind:
    """Rank1: the model reasons, then answers; the score is P(true) against P(false)."""

    name = "rank1"
    score_function = PROBABILITY
    reasons = True

    def __init__(self, engine: EngineConfig, scoring: ScoringConfig):
        self.engine_config, self.scoring = engine, scoring

    def describe(self) -> dict:
        return {"kind": self.name, "score": self.score_function}

    def encoder(self) -> PromptEncoder:
        return PromptEncoder.for_model(self.engine_config, self.scoring)

    def start_engine(self, encoder: PromptEncoder):
        from .engine import AsyncRank1Engine

        return AsyncRank1Engine(self.engine_config, encoder)

    async def judge(self, engine, item: EncodedPrompt) -> PairScore:
        return pair_score(await engine.generate(item.token_ids), item, self.scoring.threshold, self.scoring.aggregate)

    def stored_labels(self, judged: pa.Table) -> pa.Table:
        """Labels, samples and agreement at this run's threshold, from the samples' scores (a
        judgement stored before those were kept is one sample, its score)."""
        scores = [each if each is not None else [score]
                  for each, score in zip(judged["sample_scores"].to_pylist(), judged["score"].to_pylist())]
        together = [consensus(each, self.scoring.threshold, self.scoring.aggregate) for each in scores]
        return (judged.set_column(judged.column_names.index("sample_scores"), "sample_scores",
                                  pa.array(scores, pa.list_(pa.float64())))
                .append_column("label", pa.array([each.label for each in together], pa.bool_()))
                .append_column("samples", pa.array([len(each) for each in scores], pa.int32()))
                .append_column("agreement", pa.array([each.agreement for each in together], pa.float64())))


class CrossEncoderKind:
    """A sequence-classification model that reads the pair once; the score is its template's (the
    raw logit, or its sigmoid). There is no reasoning, outcome, label logprobs or samples: those
    columns are null. A sigmoid score is a probability, so it gets a label at the threshold; a
    logit does not."""

    name = "cross-encoder"
    reasons = False

    def __init__(self, engine: EngineConfig, scoring: ScoringConfig):
        self.engine_config, self.scoring = engine, scoring
        self.template: CrossEncoderTemplate = cross_encoder_template(scoring.cross_encoder_template)
        self.score_function = self.template.score

    def describe(self) -> dict:
        return {"kind": self.name, "template": self.template.name, "score": self.score_function}

    def encoder(self) -> PairEncoder:
        check_cross_encoder(self.engine_config)
        return PairEncoder(load_tokenizer(self.engine_config), self.template, context_length(self.engine_config))

    def start_engine(self, encoder: PairEncoder):
        from .cross_encoder import AsyncCrossEncoderEngine

        return AsyncCrossEncoderEngine(self.engine_config, self.template)

    def label(self, score: float) -> bool | None:
        return score >= self.scoring.threshold if self.score_function == "sigmoid" else None

    async def judge(self, engine, item: EncodedPrompt) -> PairScore:
        score = await engine.score(item)
        return PairScore(score=score, label=self.label(score), outcome=None, logprob_true=None, logprob_false=None,
                         reasoning=None, reasoning_tokens=None, prompt_tokens=len(item.token_ids),
                         truncated=item.truncated)

    def stored_labels(self, judged: pa.Table) -> pa.Table:
        labels = [self.label(score) for score in judged["score"].to_pylist()]
        return (judged.append_column("label", pa.array(labels, pa.bool_()))
                .append_column("samples", pa.nulls(judged.num_rows, pa.int32()))
                .append_column("agreement", pa.nulls(judged.num_rows, pa.float64())))


KINDS = {kind.name: kind for kind in (Rank1Kind, CrossEncoderKind)}


def scorer_kind(engine: EngineConfig, scoring: ScoringConfig) -> ScorerKind:
    """The kind of scorer `--scorer` names, for this engine and scoring configuration."""
    return KINDS[scoring.scorer](engine, scoring)
