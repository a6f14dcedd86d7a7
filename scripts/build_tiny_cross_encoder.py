"""Build a tiny cross-encoder for tests: a one-label Qwen2 sequence classifier (~0.4 M parameters).

It reads the tiny Rank1 model's synthetic world (towns and their attributes) and learns whether a
passage states the queried attribute of the queried town, from each pair as the package's
cross-encoder templates build it (half under each), so its logits rank relevant passages first
under either. It keeps the tiny Rank1 model's tokenizer, with a padding token of its own (a
last-token classifier in transformers reads the last token that is not padding, and these pairs
end with the end-of-sequence token) and the end-of-sequence token after each text of a pair.

    python scripts/build_tiny_cross_encoder.py                 # build, then evaluate
    python scripts/build_tiny_cross_encoder.py --eval-only     # evaluate an existing directory
"""

import logging
import math
import random
import re
import time
from pathlib import Path

import click

from build_tiny_model import ATTRIBUTES, FIRST_WORDS, SECOND_WORDS, synthetic_examples

ROOT = Path(__file__).resolve().parent.parent
RANK1_MODEL = ROOT / "rank1_batch" / "assets" / "tiny-rank1"
DEFAULT_OUTPUT = ROOT / "rank1_batch" / "assets" / "tiny-cross-encoder"
PAD = "<|pad|>"
# What the generator's reasoning states about a pair: the queried and the stated attribute and town.
FACTS = re.compile(
    r"The query asks about the (\w+) of (\w+) (\w+)\. The passage is about the (\w+) of (\w+) (\w+)\."
)
# Auxiliary targets, read at the classifier's token: each side's first town word, second town word
# and attribute (their class counts).
FACT_CLASSES = [len(FIRST_WORDS), len(SECOND_WORDS), len(ATTRIBUTES)] * 2

log = logging.getLogger("build_tiny_cross_encoder")


def build_tokenizer():
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(RANK1_MODEL)
    tokenizer.add_special_tokens({"pad_token": PAD})
    eos = tokenizer.eos_token
    # Each text of a pair closes with the end-of-sequence token, as a decoder reranker's prompt
    # closes with fixed tokens: the classifier reads a position that means "pair complete".
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    tokenizer.model_max_length = 512
    return tokenizer


def examples(n, seed):
    """(query, title, passage, label, facts): every third passage gets the town it is about as a
    title, as corpora with titles do; facts are the FACT_CLASSES indices of what the pair says."""
    rng = random.Random(seed)
    found = []
    for query, passage, reasoning, label in synthetic_examples(n, seed):
        query_attribute, query_first, query_second, attribute, first, second = FACTS.search(reasoning).groups()
        facts = [
            FIRST_WORDS.index(query_first), SECOND_WORDS.index(query_second), list(ATTRIBUTES).index(query_attribute),
            FIRST_WORDS.index(first), SECOND_WORDS.index(second), list(ATTRIBUTES).index(attribute),
        ]
        title = f"{first} {second}" if rng.random() < 1 / 3 else None
        found.append((query, title, passage, label, facts))
    return found


def encode_all(tokenizer, found):
    """(token ids, label, facts): the examples alternately under each template, as the package
    encodes pairs."""
    from rank1_batch.model.cross_encoder import TEMPLATES, PairEncoder

    encoders = [PairEncoder(tokenizer, template, tokenizer.model_max_length) for template in TEMPLATES.values()]
    return [
        (encoders[index % len(encoders)].encode(query, passage, title).token_ids, label, facts)
        for index, (query, title, passage, label, facts) in enumerate(found)
    ]


def train(tokenizer, encoded, seed, steps, batch_size, learning_rate):
    """Relevance alone is a weak signal for so small a model (after 3,000 steps it ranked little
    better than chance); asked as well to name, at the same token, the town and attribute of the
    query and of the passage, it gathers them there and ranks almost perfectly within a few hundred
    steps. The auxiliary heads are dropped: the saved model is the classifier alone."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects small head sizes
        num_key_value_heads=1,
        max_position_embeddings=tokenizer.model_max_length,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        num_labels=1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForSequenceClassification(config)
    heads = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, classes) for classes in FACT_CLASSES)
    model.train()
    parameters = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    relevance_loss, fact_loss = torch.nn.BCEWithLogitsLoss(), torch.nn.CrossEntropyLoss()
    for step in range(steps):
        batch = encoded[step * batch_size : (step + 1) * batch_size]
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _, _ in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in batch])
        labels = torch.tensor([float(label) for _, label, _ in batch])
        facts = torch.tensor([stated for _, _, stated in batch])
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last = output.hidden_states[-1][torch.arange(len(batch)), attention_mask.sum(dim=1) - 1]
        loss = relevance_loss(output.logits[:, 0], labels) + 0.3 * sum(
            fact_loss(head(last), facts[:, index]) for index, head in enumerate(heads)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log.info("step %4d  loss %.4f", step, loss.item())
    return model


def evaluate(model_dir, n, seed):
    """Per template: accuracy of `logit > 0` on fresh pairs, and the share of (relevant, irrelevant)
    pairs of passages ranked the right way round (the ranking's AUC)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rank1_batch.model.cross_encoder import TEMPLATES, PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    found = examples(n, seed)
    labels = [label for _, _, _, label, _ in found]
    results = {}
    for name, template in TEMPLATES.items():
        encoder = PairEncoder(tokenizer, template, tokenizer.model_max_length)
        with torch.no_grad():
            logits = [
                model(input_ids=torch.tensor([encoder.encode(query, passage, title).token_ids])).logits[0, 0].item()
                for query, title, passage, _, _ in found
            ]
        accuracy = sum((logit > 0) == label for logit, label in zip(logits, labels)) / n
        relevant = [logit for logit, label in zip(logits, labels) if label]
        irrelevant = [logit for logit, label in zip(logits, labels) if not label]
        auc = sum(r > i for r in relevant for i in irrelevant) / (len(relevant) * len(irrelevant))
        results[name] = (accuracy, auc)
    return results


@click.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUTPUT, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=500, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--learning-rate", type=float, default=3e-3, show_default=True)
@click.option("--eval-pairs", type=int, default=400, show_default=True)
@click.option("--eval-only", is_flag=True, help="Evaluate the existing --output directory without training.")
def main(output, seed, steps, batch_size, learning_rate, eval_pairs, eval_only):
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A fixed thread count and deterministic kernels make reruns byte-identical.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if not eval_only:
        started = time.perf_counter()
        tokenizer = build_tokenizer()
        # Seeds other than the Rank1 model's (0 and 1000): other draws of the same world.
        model = train(tokenizer, encode_all(tokenizer, examples(steps * batch_size, seed + 2000)), seed, steps,
                      batch_size, learning_rate)
        output.mkdir(parents=True, exist_ok=True)
        # float32: the weights as trained, so that vLLM and transformers can be compared at 1e-4.
        model.save_pretrained(output, safe_serialization=True)
        tokenizer.save_pretrained(output)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        log.info("trained %d parameters in %.1f s, saved to %s", parameters, time.perf_counter() - started, output)
    for name, (accuracy, auc) in evaluate(output, eval_pairs, seed + 3000).items():
        log.info("%s: accuracy %.3f  AUC %.3f", name, accuracy, auc)


if __name__ == "__main__":
    main()
