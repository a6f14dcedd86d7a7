"""Turn a pair into prompt token ids that fit the context: needs a tokenizer, not vLLM or Ray."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_FIT, EngineConfig, ScoringConfig
from . import prompt

# The forced pass appends "\n", the cut reasoning, "\n" and `</think>`, then reads one token:
# room kept beyond the reasoning budget so that pass fits whenever the main pass did.
FORCED_PASS_ROOM = 4
# The reference procedure's context length.
REFERENCE_MAX_MODEL_LEN = 16000


class ContextTooShort(ValueError):
    """The reasoning budget leaves no room for a prompt in the context (`budget` fit)."""


class PromptTooLong(ValueError):
    """The prompt cannot fit the context: whole (`reference` fit), or without its passage beside
    the reasoning budget (`budget` fit)."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A pair's model input: a Rank1 prompt, or a cross-encoder's text pair."""

    token_ids: list[int]
    truncated: bool
    # A cross-encoder's first passage token, for a model whose tokenizer gives token types
    # (BERT's): vLLM rebuilds the types from it. None for the others.
    passage_start: int | None = None


def load_tokenizer(engine: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    # Passages are encoded whole before they are fitted to max_model_len, so the tokenizer's
    # own length limit (and its warning) does not apply.
    return AutoTokenizer.from_pretrained(
        engine.model_path,
        revision=engine.revision,
        trust_remote_code=engine.trust_remote_code,
        model_max_length=sys.maxsize,
    )


def context_length(engine: EngineConfig) -> int:
    """`max_model_len` as configured, else the reference's, or the model's own context if shorter
    (the bundled tiny model has 4,096)."""
    if engine.max_model_len:
        return engine.max_model_len
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        engine.model_path, revision=engine.revision, trust_remote_code=engine.trust_remote_code
    )
    return min(REFERENCE_MAX_MODEL_LEN, getattr(config, "max_position_embeddings", None) or REFERENCE_MAX_MODEL_LEN)


class PromptEncoder:
    """Builds Rank1 prompts as token ids, fitted to the context by the configured policy.

    `reference` keeps every prompt whole, as the reference does, and leaves its pair whatever
    reasoning budget the context has room for; `budget` cuts the passage so that the whole budget
    fits. Either way `FORCED_PASS_ROOM` tokens stay free beside the reasoning for the forced pass.

    Query and passage text is tokenised with the tokenizer's special tokens split into plain
    text, so a passage that spells `</think>` (or any control token) cannot end the reasoning;
    only the template's own `<think>` is the control token.
    """

    def __init__(self, tokenizer: Any, engine: EngineConfig, scoring: ScoringConfig):
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.fit = engine.fit or DEFAULT_FIT
        self.max_model_len = context_length(engine)
        self.max_reasoning_tokens = engine.max_reasoning_tokens
        if self.fit == "reference":
            # room for at least one reasoning token and the forced pass
            self.prompt_limit = self.max_model_len - 1 - FORCED_PASS_ROOM
        else:
            self.prompt_limit = self.max_model_len - engine.max_reasoning_tokens - FORCED_PASS_ROOM
            if self.prompt_limit <= 0:
                raise ContextTooShort(
                    f"max_reasoning_tokens {engine.max_reasoning_tokens} leaves no room for a prompt in the "
                    f"{self.max_model_len}-token context of {engine.model}: lower --max-reasoning-tokens "
                    "or raise --max-model-len"
                )
        self.think_open_id = self._control_token(prompt.THINK_OPEN)
        self.think_close_id = self._control_token(prompt.THINK_CLOSE)
        self.true_id = self._label_id(prompt.LABEL_TRUE)
        self.false_id = self._label_id(prompt.LABEL_FALSE)

    @classmethod
    def for_model(cls, engine: EngineConfig, scoring: ScoringConfig) -> "PromptEncoder":
        return cls(load_tokenizer(engine), engine, scoring)

    def _control_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer encodes {text!r} as {len(ids)} tokens; a Rank1 model has it as one")
        return ids[0]

    def _label_id(self, text: str) -> int:
        # The reference takes the first token of the label word, as the model writes it.
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)[0]

    def _prompt_ids(self, query: str, passage: str) -> list[int]:
        body = self.tokenizer.encode(prompt.prompt_body(query, passage), split_special_tokens=True)
        return body + [self.think_open_id]

    def encode(
        self, query: str, text: str, title: str | None = None, instruction: str | None = None
    ) -> EncodedPrompt:
        """The prompt for a pair; under the `budget` fit its passage is cut at a token boundary if the
        prompt is too long."""
        query = prompt.query_text(query, instruction, self.scoring.task_template)
        passage = prompt.passage_text(text, title)
        ids = self._prompt_ids(query, passage)
        if len(ids) <= self.prompt_limit:
            return EncodedPrompt(ids, truncated=False)
        if self.fit == "reference":
            raise PromptTooLong(
                f"the prompt takes {len(ids)} tokens, more than the {self.prompt_limit} that max_model_len "
                f"{self.max_model_len} leaves beside one reasoning token and the forced pass "
                "(--fit budget cuts the passage instead)"
            )
        without_passage = len(self._prompt_ids(query, ""))
        if without_passage > self.prompt_limit:
            raise PromptTooLong(
                f"the prompt without its passage takes {without_passage} tokens, more than the "
                f"{self.prompt_limit} that max_model_len leaves beside the reasoning budget"
            )
        offsets = self.tokenizer(
            passage, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )["offset_mapping"]
        keep = min(len(offsets), self.prompt_limit - without_passage)
        while True:
            # Token counts of the passage alone and inside the prompt can differ at the edges,
            # so cut, re-encode, and cut again by the overshoot.
            ids = self._prompt_ids(query, passage[: offsets[keep - 1][1]] if keep > 0 else "")
            overshoot = len(ids) - self.prompt_limit
            if overshoot <= 0:
                return EncodedPrompt(ids, truncated=True)
            keep = max(0, keep - overshoot)

    def reasoning_budget(self, prompt_tokens: int) -> int:
        """A pair's reasoning budget: the configured one, or, if less, what the context leaves beside
        the prompt and the forced pass (only a `reference` fit prompt can leave less)."""
        return min(self.max_reasoning_tokens, self.max_model_len - prompt_tokens - FORCED_PASS_ROOM)

    def forced_ids(self, prompt_ids: list[int], generated: str) -> list[int]:
        """The forced pass's prompt: the main prompt, then all the main pass generated, cut to its
        last sentence end, and `</think>`, tokenised as the reference's text is (control tokens
        parsed)."""
        return prompt_ids + self.tokenizer.encode(prompt.forced_continuation(generated), add_special_tokens=False)
