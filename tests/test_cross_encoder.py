"""The cross-encoder on vLLM against transformers' sequence classifier on the same model and text.

The reference below is written from the templates' definitions (RankLLaMA's model card, the plain
text pair), not from rank1_batch: it formats and tokenises each pair itself, runs
AutoModelForSequenceClassification and reads the logit.
"""

from __future__ import annotations

import math

import pytest

from rank1_batch.config import TINY_CROSS_ENCODER_DIR, EngineConfig
from rank1_batch.model.cross_encoder import (
    CrossEncoderRefused,
    CrossEncoderScorer,
    PairEncoder,
    check_cross_encoder,
    cross_encoder_template,
)
from rank1_batch.model.encoding import PromptTooLong
from rank1_batch.model.scorer import Pair

# float32 on both sides: the engine's scores can then be held to the reference's within 1e-4.
TOLERANCE = 1e-4


def reference_input(tokenizer, template: str, pair: Pair) -> list[int]:
    passage = pair.text if pair.title is None else f"{pair.title} {pair.text}"
    if template == "rankllama":
        return tokenizer(f"query: {pair.query}", f"document: {passage}")["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(pair.query, passage)["input_ids"]


def reference_logits(template: str, pairs: list[Pair]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_CROSS_ENCODER_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(TINY_CROSS_ENCODER_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([reference_input(tokenizer, template, pair)])).logits[0, 0].item()
            for pair in pairs
        ]


@pytest.fixture(scope="module")
def pairs(synthetic):
    """20 pairs of the tiny models' world, every other one with its town as a title, and labels."""
    found = synthetic.synthetic_pairs(20, seed=4242)
    titled = [
        Pair(query, passage, next(town for town in synthetic.TOWNS if town in passage) if index % 2 else None)
        for index, (query, passage, _) in enumerate(found)
    ]
    return titled, [label for *_, label in found]


@pytest.mark.parametrize("template", ["rankllama", "pair"])
def test_logits_match_transformers(cross_encoder, pairs, template):
    pairs, labels = pairs
    expected = reference_logits(template, pairs)
    logits = cross_encoder.with_template(cross_encoder_template(template, score="logit")).score(pairs)
    assert max(abs(a - b) for a, b in zip(logits, expected)) < TOLERANCE
    # The tiny model was trained to rank: every relevant passage above every irrelevant one here.
    assert min(l for l, relevant in zip(logits, labels) if relevant) > max(l for l, relevant in zip(logits, labels) if not relevant)


@pytest.mark.parametrize("template", ["rankllama", "pair"])
def test_scores_follow_the_template(cross_encoder, pairs, template):
    pairs, _ = pairs
    scores = cross_encoder.with_template(template).score(pairs)
    expected = reference_logits(template, pairs)
    if template == "pair":
        expected = [1 / (1 + math.exp(-logit)) for logit in expected]
    assert max(abs(a - b) for a, b in zip(scores, expected)) < TOLERANCE


def test_long_passage_is_cut_to_the_context(cross_encoder, pairs):
    pair = pairs[0][0]
    long = Pair(pair.query, " ".join([pair.text] * 200))
    scorer = cross_encoder.with_template("rankllama")
    encoded = scorer.encoder.encode(long.query, long.text)
    assert encoded.truncated and len(encoded.token_ids) == scorer.encoder.max_model_len
    assert encoded.token_ids[-1] == scorer.encoder.tokenizer.eos_token_id
    assert len(scorer.score([long])) == 1


def test_query_longer_than_the_context_is_refused():
    from transformers import AutoTokenizer

    encoder = PairEncoder(AutoTokenizer.from_pretrained(TINY_CROSS_ENCODER_DIR), cross_encoder_template("pair"), 16)
    with pytest.raises(PromptTooLong, match="max_model_len 16"):
        encoder.encode("what is the climate of North Haven " * 4, "The climate of North Haven is dry.")


def test_causal_lm_is_refused_before_an_engine_starts():
    # The refusal comes from the model's config, read before the engine would start.
    with pytest.raises(CrossEncoderRefused, match=r"tiny is not a sequence-classification model.*Qwen2ForCausalLM"):
        CrossEncoderScorer(EngineConfig(model="tiny"))


def test_missing_model_is_refused_naming_it(tmp_path):
    with pytest.raises(CrossEncoderRefused, match="no-such-model.*transformers cannot read its config"):
        check_cross_encoder(EngineConfig(model=str(tmp_path / "no-such-model")))


def test_unknown_template_and_score_are_refused():
    with pytest.raises(ValueError, match="rankllama or pair"):
        cross_encoder_template("monot5")
    with pytest.raises(ValueError, match="logit or sigmoid"):
        cross_encoder_template("pair", score="softmax")
