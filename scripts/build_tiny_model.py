"""Build a tiny Rank1-format reranker for tests.

The real Rank1 models are Qwen2.5 causal LMs that read a fixed prompt ending in
`<think>`, write a short reasoning chain, then `</think> true` or `</think> false`.
This script trains a ~0.5 M parameter Qwen2 model on a synthetic world of
towns and their attributes so that it follows the same format, and saves it
as a Hugging Face directory that vLLM can serve.

    python scripts/build_tiny_model.py                 # build, then evaluate
    python scripts/build_tiny_model.py --eval-only     # evaluate an existing directory
"""

import math
import random
import re
import statistics
import time
from pathlib import Path

import click

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "rank1_batch" / "assets" / "tiny-rank1"

PROMPT_TEMPLATE = (
    "Determine if the following passage is relevant to the query. "
    "Answer only with 'true' or 'false'.\n"
    "Query: {query}\n"
    "Passage: {passage}\n"
    "<think>"
)
EOS = "<|endoftext|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# 42 towns named "<first> <second>". Two-word names from small word sets let a
# tiny model compare towns word by word (7-way and 6-way), which it learns far
# faster than telling apart 42 single-token names.
FIRST_WORDS = ["North", "South", "East", "West", "New", "Old", "Port"]
SECOND_WORDS = ["Haven", "Ridge", "Field", "Brook", "Stone", "Vale"]
TOWNS = [f"{first} {second}" for first in FIRST_WORDS for second in SECOND_WORDS]

# Attribute -> pool of values. Values are drawn at random: only whether the
# passage states the queried attribute of the queried town decides relevance.
ATTRIBUTES = {
    "population": [f"{n} thousand people" for n in range(5, 200, 15)],
    "climate": ["dry", "humid", "cold", "mild", "rainy", "windy"],
    "mayor": ["Anna Berg", "Tom Reyes", "Lena Park", "Omar Diaz", "Mia Stone", "Ravi Shah"],
    "industry": ["fishing", "mining", "farming", "tourism", "shipping", "weaving"],
    "festival": ["a spring fair", "a lantern parade", "a music week", "a harvest feast"],
    "landmark": ["an old bridge", "a clock tower", "a lighthouse", "a stone castle"],
    "river": ["the Oda", "the Lune", "the Tarn", "the Esk", "the Wye"],
    "speciality": ["smoked fish", "apple cake", "goat cheese", "honey bread", "plum wine"],
}

QUERY_TEMPLATES = [
    "what is the {attribute} of {town}",
    "{town} {attribute}",
    "{attribute} of {town}",
    "tell me the {attribute} of {town}",
]
FACT_TEMPLATES = [
    "The {attribute} of {town} is {value}.",
    "{town} has {value} as its {attribute}.",
]
FILLERS = [
    "It is a town with a long history.",
    "Many travellers visit every year.",
    "Local markets sell fresh food.",
    "The roads are busy in the summer.",
    "Schools teach several subjects.",
    "Old buildings stand near the river.",
]


def build_prompt(query, passage):
    return PROMPT_TEMPLATE.format(query=query, passage=passage)


def _other_town(rng, town):
    """A different town; two times in three it shares one word, so both words must be checked."""
    first, second = town.split()
    kind = rng.randrange(3)
    if kind == 0:
        candidates = [f"{first} {w}" for w in SECOND_WORDS if w != second]
    elif kind == 1:
        candidates = [f"{w} {second}" for w in FIRST_WORDS if w != first]
    else:
        candidates = [t for t in TOWNS if t != town]
    return rng.choice(candidates)


def _example(rng):
    """One (query, passage, reasoning, label); the reasoning excludes `</think>`."""
    attributes = list(ATTRIBUTES)
    query_town, query_attribute = rng.choice(TOWNS), rng.choice(attributes)
    label = rng.random() < 0.5
    passage_town, passage_attribute = query_town, query_attribute
    if not label:
        # Equal thirds of wrong town, wrong attribute, or both.
        kind = rng.randrange(3)
        if kind in (0, 2):
            passage_town = _other_town(rng, query_town)
        if kind in (1, 2):
            passage_attribute = rng.choice([a for a in attributes if a != query_attribute])

    query = rng.choice(QUERY_TEMPLATES).format(attribute=query_attribute, town=query_town)
    fact = rng.choice(FACT_TEMPLATES).format(
        attribute=passage_attribute, town=passage_town, value=rng.choice(ATTRIBUTES[passage_attribute])
    )
    sentences = rng.sample(FILLERS, rng.randrange(3)) + [fact]
    rng.shuffle(sentences)
    passage = " ".join(sentences)

    reasoning = (
        f" The query asks about the {query_attribute} of {query_town}."
        f" The passage is about the {passage_attribute} of {passage_town}."
    )
    # One comparison per sentence, stopping at the first mismatch: a tiny model
    # learns these far better than one joint verdict, and the length varies.
    if passage_town != query_town:
        reasoning += " The town differs."
    else:
        reasoning += " The town matches."
        reasoning += " The topic matches." if label else " The topic differs."
    return query, passage, reasoning, label


def synthetic_examples(n, seed):
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def synthetic_pairs(n, seed):
    """Fresh (query, passage, label) pairs; label is True when the passage answers the query."""
    return [(query, passage, label) for query, passage, _, label in synthetic_examples(n, seed)]


def completion_text(reasoning, label):
    return f"{reasoning} {THINK_CLOSE} {'true' if label else 'false'}"


def build_tokenizer(examples, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # No prefix space, no BOS: same conventions as the Qwen2.5 tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, THINK_OPEN, THINK_CLOSE],
        # The full byte alphabet keeps any real text (e.g. DL19 passages) encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Training text is cut at the special tokens, as they are at encoding time,
    # so no merges are spent on their spelling.
    special = re.compile(f"{re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)}")
    lines = []
    for query, passage, reasoning, label in examples:
        lines += special.split(build_prompt(query, passage) + completion_text(reasoning, label))
    tokenizer.train_from_iterator(lines, trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    for word in (" true", " false"):
        assert len(wrapped.encode(word, add_special_tokens=False)) == 1, f"{word!r} is not a single token"
    return wrapped


def encode_example(tokenizer, query, passage, reasoning, label):
    """Token ids and labels, with the loss masked (-100) on the prompt."""
    prompt_ids = tokenizer.encode(build_prompt(query, passage), add_special_tokens=False)
    completion_ids = tokenizer.encode(completion_text(reasoning, label), add_special_tokens=False)
    completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def train(tokenizer, examples, seed, steps, batch_size, learning_rate):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects small head sizes
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    # Short warmup, then cosine decay so the last steps settle.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    encoded = [encode_example(tokenizer, *example) for example in examples]
    for step in range(steps):
        batch = encoded[step * batch_size : (step + 1) * batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            click.echo(f"step {step:4d}  loss {loss.item():.4f}")
    return model


def evaluate(model_dir, n, seed, batch_size=50):
    """Greedy generation on fresh pairs; returns (accuracy, well-formed share, median generated tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation continues from the right end of each prompt
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    pairs = synthetic_pairs(n, seed)
    verdict = re.compile(rf"{re.escape(THINK_CLOSE)} (true|false)$")
    correct = well_formed = 0
    lengths = []
    for start in range(0, n, batch_size):
        chunk = pairs[start : start + batch_size]
        inputs = tokenizer([build_prompt(q, p) for q, p, _ in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for (_, _, label), generated in zip(chunk, output[:, inputs["input_ids"].shape[1] :].tolist()):
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            lengths.append(len(generated))
            text = tokenizer.decode(generated, skip_special_tokens=False)
            well_formed += bool(verdict.search(text))
            answer = text.rpartition(THINK_CLOSE)[2].strip() if THINK_CLOSE in text else ""
            correct += answer == ("true" if label else "false")
    return correct / n, well_formed / n, statistics.median(lengths)


@click.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUTPUT, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--learning-rate", type=float, default=3e-3, show_default=True)
@click.option("--vocab-size", type=int, default=800, show_default=True)
@click.option("--eval-pairs", type=int, default=400, show_default=True)
@click.option("--eval-only", is_flag=True, help="Evaluate the existing --output directory without training.")
def main(output, seed, steps, batch_size, learning_rate, vocab_size, eval_pairs, eval_only):
    import torch

    # A fixed thread count and deterministic kernels make reruns byte-identical.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if not eval_only:
        started = time.perf_counter()
        examples = synthetic_examples(steps * batch_size, seed)
        tokenizer = build_tokenizer(examples[:3000], vocab_size)
        model = train(tokenizer, examples, seed, steps, batch_size, learning_rate)
        output.mkdir(parents=True, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(output, safe_serialization=True)
        tokenizer.save_pretrained(output)
        click.echo(f"trained in {time.perf_counter() - started:.1f} s, saved to {output}")
    # A different RNG stream from training, so these pairs are unseen.
    accuracy, well_formed, median_length = evaluate(output, eval_pairs, seed + 1000)
    click.echo(f"accuracy {accuracy:.3f}  well-formed {well_formed:.3f}  median generated tokens {median_length}")


if __name__ == "__main__":
    main()
