"""Cross-encoder scoring: one forward pass per (query, passage) pair through a sequence-classification
model on vLLM's pooling runner, its one output logit read as the pair's relevance. Knows nothing of
Ray.

A template turns a pair into the text pair the model was trained on and says what of the logit is
the score; the engines take encoded pairs (token ids), so the pipeline can count and cut them as it
does Rank1 prompts.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable, Mapping, Sequence

from ..config import EngineConfig, JobError
from .cross_encoder_templates import CrossEncoderTemplate, cross_encoder_template
from .encoding import EncodedPrompt, PromptTooLong, context_length, load_tokenizer
from .engine import engine_arguments, set_cpu_cache_space
from .scorer import Pair, _as_pair

SEQUENCE_CLASSIFIER_SUFFIX = "ForSequenceClassification"


class CrossEncoderRefused(JobError):
    """The model cannot be served as a one-label sequence classifier."""


class PairEncoder:
    """A pair's token ids by a template, within the context: a passage too long is cut at a token
    boundary (the query and markers are kept whole). Query and passage text is tokenised with the
    tokenizer's special tokens split into plain text, so a passage cannot spell a control token."""

    def __init__(self, tokenizer: Any, template: CrossEncoderTemplate, max_model_len: int):
        self.tokenizer = tokenizer
        self.template = template
        self.max_model_len = max_model_len
        self.tail = [tokenizer.eos_token_id] if template.append_eos else []

    def _encoded(self, first: str, second: str, truncated: bool = False) -> EncodedPrompt:
        cut = {"truncation": "only_second", "max_length": self.max_model_len - len(self.tail)} if truncated else {}
        encoding = self.tokenizer(first, second, split_special_tokens=True, **cut)
        types = encoding.get("token_type_ids") or []
        passage_start = types.index(1) if 1 in types else None
        return EncodedPrompt(encoding["input_ids"] + self.tail, truncated, passage_start)

    def encode(self, query: str, text: str, title: str | None = None, instruction: str | None = None) -> EncodedPrompt:
        first, second = self.template.texts(query, text, title, instruction)
        encoded = self._encoded(first, second)
        if len(encoded.token_ids) <= self.max_model_len:
            return encoded
        without_passage = len(self._encoded(first, "").token_ids)
        if without_passage > self.max_model_len:
            raise PromptTooLong(
                f"the query takes {without_passage} tokens without its passage, more than max_model_len "
                f"{self.max_model_len}"
            )
        return self._encoded(first, second, truncated=True)


def check_cross_encoder(engine: EngineConfig) -> None:
    """Refuse a model whose config is not a one-label sequence classifier, before any engine starts:
    vLLM's pooling runner would load a causal LM as an embedding model, or with an untrained head.

    An `hf_overrides` engine argument counts as vLLM applies it; one with `classifier_from_token`
    (vLLM's conversion of a causal-LM reranker) sets the label count itself.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            engine.model_path, revision=engine.revision, trust_remote_code=engine.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise CrossEncoderRefused(f"{engine.model}: transformers cannot read its config: {error}") from error
    overrides = engine.engine_args.get("hf_overrides") or {}
    architectures = overrides.get("architectures") or config.architectures or []
    if not any(name.endswith(SEQUENCE_CLASSIFIER_SUFFIX) for name in architectures):
        raise CrossEncoderRefused(
            f"{engine.model} is not a sequence-classification model: its config names "
            f"{', '.join(architectures) or 'no architecture'}, where a cross-encoder has a *{SEQUENCE_CLASSIFIER_SUFFIX} "
            "with one label"
        )
    labels = overrides.get("num_labels", config.num_labels)
    if "classifier_from_token" not in overrides and labels != 1:
        raise CrossEncoderRefused(f"{engine.model} has {labels} labels; a cross-encoder's score is one logit (num_labels=1)")


def cross_encoder_arguments(engine: EngineConfig) -> dict:
    """Keyword arguments of `vllm.LLM` (and `AsyncEngineArgs`) that serve the model's classification
    head on the pooling runner."""
    return {**engine_arguments(engine), "runner": "pooling"}


def _started(engine: EngineConfig, start):
    """The engine `start()` returns, checked to give one logit per pair; any failure to load names
    the model."""
    try:
        llm = start()
    except Exception as error:
        raise CrossEncoderRefused(f"vLLM could not load {engine.model} as a cross-encoder: {error}") from error
    labels = getattr(llm.model_config.hf_config, "num_labels", None)
    if labels != 1:
        raise CrossEncoderRefused(f"vLLM loaded {engine.model} with {labels} labels; a cross-encoder's score is one logit")
    return llm


def _request(pair: EncodedPrompt):
    """A classify request for the pair without the head's activation: the engine returns the raw
    logit, and the template decides what of it is the score. Token types go as vLLM's own scoring
    sends them, as the position where type 1 begins."""
    from vllm import PoolingParams, TokensPrompt

    types = None if pair.passage_start is None else {"compressed_token_type_ids": pair.passage_start}
    return TokensPrompt(prompt_token_ids=pair.token_ids), PoolingParams(task="classify", use_activation=False, extra_kwargs=types)


def _logit(output) -> float:
    if output.error is not None:
        raise RuntimeError(f"vLLM could not score a pair: {output.error.message}")
    return float(output.outputs.data[0])


class CrossEncoderEngine:
    """A vLLM pooling engine that scores batches of encoded pairs in one blocking call: for
    notebooks, scripts and batch actors."""

    def __init__(self, engine: EngineConfig, template: CrossEncoderTemplate, llm=None):
        """`llm` reuses a running pooling `vllm.LLM` (another template on the same model) instead of
        starting one."""
        from vllm import LLM

        self.template = template
        if llm is None:
            check_cross_encoder(engine)
            set_cpu_cache_space()
            llm = _started(engine, lambda: LLM(**cross_encoder_arguments(engine)))
        self.llm = llm

    def score(self, pairs: Sequence[EncodedPrompt]) -> list[float]:
        if not pairs:
            return []
        prompts, params = zip(*map(_request, pairs))
        outputs = self.llm.encode(list(prompts), list(params), pooling_task="classify", use_tqdm=False)
        return [self.template.score_of(_logit(output)) for output in outputs]


class AsyncCrossEncoderEngine:
    """vLLM's async engine on the pooling runner, one request per pair, many in flight."""

    def __init__(self, engine: EngineConfig, template: CrossEncoderTemplate):
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        check_cross_encoder(engine)
        set_cpu_cache_space()
        self.template = template
        # An offline batch job's scheduler, as for the Rank1 async engine.
        self.llm = _started(engine, lambda: AsyncLLM.from_engine_args(
            AsyncEngineArgs(**cross_encoder_arguments(engine), disable_log_stats=False), usage_context=UsageContext.LLM_CLASS,
        ))

    async def score(self, pair: EncodedPrompt) -> float:
        final = None
        async for output in self.llm.encode(*_request(pair), uuid.uuid4().hex):
            final = output
        return self.template.score_of(_logit(final))

    def shutdown(self) -> None:
        self.llm.shutdown()


class CrossEncoderScorer:
    """One pooling engine and a template's pair encoder; `score` takes pairs."""

    def __init__(self, engine: EngineConfig, template: CrossEncoderTemplate | str = "pair", llm=None, tokenizer=None):
        self.engine_config = engine
        self.template = cross_encoder_template(template) if isinstance(template, str) else template
        self.engine = CrossEncoderEngine(engine, self.template, llm)
        self.encoder = PairEncoder(tokenizer or load_tokenizer(engine), self.template, context_length(engine))

    def with_template(self, template: CrossEncoderTemplate | str) -> "CrossEncoderScorer":
        """Another scorer on the same running engine and tokenizer that reads pairs by another
        template: no second engine start."""
        return CrossEncoderScorer(self.engine_config, template, self.engine.llm, self.encoder.tokenizer)

    def score(self, pairs: Iterable[Pair | Mapping]) -> list[float]:
        """One score per pair, in order. A passage too long for the context is cut; a query too
        long for it raises `PromptTooLong`."""
        return self.engine.score(
            [self.encoder.encode(pair.query, pair.text, pair.title, pair.instruction) for pair in map(_as_pair, pairs)]
        )
