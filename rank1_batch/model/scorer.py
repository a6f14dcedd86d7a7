"""Score (query, passage) pairs with a Rank1 model, without Ray: for notebooks and for the pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..config import EngineConfig, ScoringConfig
from .encoding import EncodedPrompt, PromptEncoder, PromptTooLong, load_tokenizer
from .engine import Generation, Rank1Engine


# Engine options that shape each request rather than the running engine.
REQUEST_OPTIONS = ("max_reasoning_tokens", "fit")


@dataclass(frozen=True)
class Pair:
    query: str
    text: str
    title: str | None = None
    instruction: str | None = None


@dataclass(frozen=True)
class PairScore:
    """One pair's result. A rejected pair has a `reject_reason` and no score."""

    score: float | None
    label: bool | None
    outcome: str | None
    logprob_true: float | None
    logprob_false: float | None
    reasoning: str | None
    reasoning_tokens: int | None
    prompt_tokens: int | None
    truncated: bool | None
    reject_reason: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rejected(reason: str) -> PairScore:
    return PairScore(None, None, None, None, None, None, None, None, None, reject_reason=reason)


def encode_pair(encoder: PromptEncoder, pair: Pair) -> EncodedPrompt | str:
    """The pair's prompt, or the reason it cannot be scored."""
    try:
        return encoder.encode(pair.query, pair.text, pair.title, pair.instruction)
    except PromptTooLong as error:
        return str(error)


class Rank1Scorer:
    """One engine and its prompt encoder; `score` takes pairs, `score_encoded` takes prompts."""

    def __init__(self, engine: EngineConfig | None = None, scoring: ScoringConfig | None = None, llm=None):
        self.engine_config = engine or EngineConfig()
        self.scoring = scoring or ScoringConfig()
        self.encoder = PromptEncoder(
            llm.get_tokenizer() if llm else load_tokenizer(self.engine_config), self.engine_config, self.scoring
        )
        self.engine = Rank1Engine(self.engine_config, self.encoder, llm)

    def with_options(self, **options) -> "Rank1Scorer":
        """Another scorer on the same running engine, with other request options (reasoning budget,
        fit policy) or scoring options (threshold, task_template): no second engine start."""
        engine = {name: options.pop(name) for name in REQUEST_OPTIONS if name in options}
        return Rank1Scorer(
            dataclasses.replace(self.engine_config, **engine), dataclasses.replace(self.scoring, **options), self.engine.llm
        )

    def score(self, pairs: Iterable[Pair | Mapping]) -> list[PairScore]:
        encoded = [encode_pair(self.encoder, _as_pair(pair)) for pair in pairs]
        return self.score_encoded(encoded)

    def score_encoded(self, encoded: list[EncodedPrompt | str]) -> list[PairScore]:
        """Results in input order; a `str` entry is a rejection reason and passes through."""
        prompts = [item for item in encoded if isinstance(item, EncodedPrompt)]
        generations = iter(self.engine.generate([item.token_ids for item in prompts]))
        return [
            rejected(item) if isinstance(item, str) else pair_score(next(generations), item, self.scoring.threshold)
            for item in encoded
        ]


def pair_score(generation: Generation, encoded: EncodedPrompt, threshold: float) -> PairScore:
    judgement = generation.judgement
    return PairScore(
        score=judgement.score,
        label=judgement.score >= threshold,
        outcome=judgement.outcome.value,
        logprob_true=judgement.logprob_true,
        logprob_false=judgement.logprob_false,
        reasoning=generation.reasoning,
        reasoning_tokens=generation.reasoning_tokens,
        prompt_tokens=len(encoded.token_ids),
        truncated=encoded.truncated,
    )


def _as_pair(pair: Pair | Mapping) -> Pair:
    if isinstance(pair, Pair):
        return pair
    return Pair(pair["query"], pair["text"], pair.get("title"), pair.get("instruction"))


def score_pairs(
    pairs: Iterable[Pair | Mapping], engine: EngineConfig | None = None, scoring: ScoringConfig | None = None
) -> list[PairScore]:
    """Start an engine, score the pairs in one batch, and return one result per pair, in order."""
    return Rank1Scorer(engine, scoring).score(pairs)
