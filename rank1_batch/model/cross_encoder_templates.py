"""Cross-encoder input templates: how a (query, passage) pair becomes a sequence-classification
model's text pair, and what of its one logit is the score. Pure: no tokenizer, vLLM or Ray."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import prompt

# What a template's score is: the model's raw logit, or its sigmoid (a value in (0, 1)).
SCORE_FUNCTIONS = ("logit", "sigmoid")
@dataclass(frozen=True)
class CrossEncoderTemplate:
    """How a pair becomes the model's input, and what of its logit is the score.

    `query` and `passage` format the two texts (`{query}`: the query with its instruction;
    `{passage}`: title, a space, text), which go to the tokenizer as a text pair, so the tokenizer
    adds its model family's own markers. `append_eos` ends the input with the tokenizer's
    end-of-sequence token, where a last-token classifier was trained to read. `score` is one of
    SCORE_FUNCTIONS; a run records the template's fields with its scores.
    """

    name: str
    query: str
    passage: str
    append_eos: bool
    score: str

    def __post_init__(self):
        if self.score not in SCORE_FUNCTIONS:
            raise ValueError(f"cross-encoder score {self.score!r}: expected {' or '.join(SCORE_FUNCTIONS)}")

    def texts(self, query: str, text: str, title: str | None = None, instruction: str | None = None) -> tuple[str, str]:
        return (
            self.query.format(query=prompt.query_text(query, instruction)),
            self.passage.format(passage=prompt.passage_text(text, title)),
        )

    def score_of(self, logit: float) -> float:
        # tanh form of the sigmoid: no overflow for logits of any size
        return logit if self.score == "logit" else 0.5 * (1.0 + math.tanh(0.5 * logit))


TEMPLATES = {
    template.name: template
    for template in (
        # RankLLaMA (castorini/rankllama-v1-7b-lora-passage): `query: {query}` and
        # `document: {title} {passage}</s>` as a pair through the Llama tokenizer; score = the logit.
        CrossEncoderTemplate("rankllama", "query: {query}", "document: {passage}", append_eos=True, score="logit"),
        # The plain text pair of bge-reranker, mxbai-rerank and other sequence-classification
        # rerankers; their documented normalised score is the sigmoid of the logit.
        CrossEncoderTemplate("pair", "{query}", "{passage}", append_eos=False, score="sigmoid"),
    )
}


def cross_encoder_template(name: str, score: str | None = None) -> CrossEncoderTemplate:
    """The named template, its score function replaced when `score` is given."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown cross-encoder template {name!r}: expected {' or '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    return template if score is None else dataclasses.replace(template, score=score)
