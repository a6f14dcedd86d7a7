"""Score (query, passage) pairs with a Rank1 model, without Ray: for notebooks and for the pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..config import EngineConfig, ScoringConfig
from .encoding import EncodedPrompt, PromptEncoder, PromptTooLong, load_tokenizer
from .engine import Generation, Rank1Engine
from .judgement import consensus

# Engine options that shape each request rather than the running engine (the seed: each sample's
# request carries a seed of its own, derived from it).
REQUEST_OPTIONS = ("max_reasoning_tokens", "fit", "samples", "temperature", "top_p", "seed")


@dataclass(frozen=True)
class Pair:
    """A query and a passage, with the input contract's optional title and instruction."""

    query: str
    text: str
    title: str | None = None
    instruction: str | None = None


@dataclass(frozen=True)
class PairScore:
    """One pair's result. A rejected pair has a `reject_reason` and no score. With several samples,
    `score` is their mean, `label` their majority's, and outcome, logprobs and reasoning are the
    first agreeing sample's (see `judgement.consensus`)."""

    score: float | None
    label: bool | None
    outcome: str | None
    logprob_true: float | None
    logprob_false: float | None
    reasoning: str | None
    reasoning_tokens: int | None
    prompt_tokens: int | None
    truncated: bool | None
    samples: int | None = None
    sample_scores: list[float] | None = None
    agreement: float | None = None
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
    """One engine and its prompt encoder, without Ray: `score` takes pairs, `score_encoded` takes
    prompts. A pair is judged as a run judges it.

    Args:
        engine: The engine to start; its `model` must be named.
        scoring: The threshold of `label`, and the task template. None: `ScoringConfig()`.
        llm (vllm.LLM | None): A running engine to score with instead of starting one.

    Example:
        In a script, under `if __name__ == "__main__":`, as vLLM starts processes of its own:

        ```python
        from rank1_batch.config import EngineConfig
        from rank1_batch.model.scorer import Pair, Rank1Scorer

        scorer = Rank1Scorer(EngineConfig(model="tiny", dtype="bfloat16", max_model_len=1024,
                                          max_reasoning_tokens=128, enforce_eager=True))
        first, second = scorer.score([
            Pair("what is the river of New Haven", "The river of New Haven is the Wye."),
            {"query": "what is the river of New Haven", "text": "Old Haven has a mild climate."},
        ])
        short = scorer.with_options(max_reasoning_tokens=8)  # the same engine, a smaller budget
        ```
    """

    def __init__(self, engine: EngineConfig | None = None, scoring: ScoringConfig | None = None, llm=None):
        self.engine_config = engine or EngineConfig()
        self.scoring = scoring or ScoringConfig()
        self.encoder = PromptEncoder(
            llm.get_tokenizer() if llm else load_tokenizer(self.engine_config), self.engine_config, self.scoring
        )
        self.engine = Rank1Engine(self.engine_config, self.encoder, llm)

    def with_options(self, **options) -> "Rank1Scorer":
        """Another scorer on the same running engine, with other request options (reasoning budget,
        fit policy, sampling) or scoring options (threshold, task_template): no second engine start."""
        engine = {name: options.pop(name) for name in REQUEST_OPTIONS if name in options}
        return Rank1Scorer(
            dataclasses.replace(self.engine_config, **engine), dataclasses.replace(self.scoring, **options), self.engine.llm
        )

    def score(self, pairs: Iterable[Pair | Mapping]) -> list[PairScore]:
        """One result per pair, in order: a `Pair`, or a mapping with `query` and `text` (and
        optionally `title` and `instruction`). A pair whose prompt cannot fit the context comes
        back with its `reject_reason`."""
        encoded = [encode_pair(self.encoder, _as_pair(pair)) for pair in pairs]
        return self.score_encoded(encoded)

    def score_encoded(self, encoded: list[EncodedPrompt | str]) -> list[PairScore]:
        """Results in input order; a `str` entry is a rejection reason and passes through."""
        prompts = [item for item in encoded if isinstance(item, EncodedPrompt)]
        generations = iter(self.engine.generate([item.token_ids for item in prompts]))
        return [
            rejected(item) if isinstance(item, str) else pair_score(next(generations), item, self.scoring.threshold, self.scoring.aggregate)
            for item in encoded
        ]


def pair_score(samples: Sequence[Generation], encoded: EncodedPrompt, threshold: float,
               aggregate: str = "mean") -> PairScore:
    """A pair's result from its samples (one, for a greedy judgement), by `aggregate` (see
    `judgement.consensus`)."""
    scores = [sample.judgement.score for sample in samples]
    together = consensus(scores, threshold, aggregate)
    chosen = samples[together.chosen]
    judgement = chosen.judgement
    return PairScore(
        score=together.score,
        label=together.label,
        outcome=judgement.outcome.value,
        logprob_true=judgement.logprob_true,
        logprob_false=judgement.logprob_false,
        reasoning=chosen.reasoning,
        reasoning_tokens=chosen.reasoning_tokens,
        prompt_tokens=len(encoded.token_ids),
        truncated=encoded.truncated,
        samples=len(samples),
        sample_scores=scores,
        agreement=together.agreement,
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
