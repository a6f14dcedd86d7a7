"""Build a tiny Rank1-format model whose reasoning length is set by its passage.

Rank1's reasoning lengths are long-tailed, and a benchmark needs that shape under control. This
model lives in a synthetic world where each passage carries a count, "Reviewing it takes XLII
steps.", and a verdict, "The reviewers said yes." Greedily, it reasons by counting the steps
down, " XLII XLI XL ... II I" (one token per numeral, so exactly `count` reasoning tokens), then
writes `</think>` and ` true` for "yes" or ` false` for "no". Numerals, not digits: transformers
loads the tokenizer as Qwen2's, which splits digits one by one but keeps a word of letters whole.
The prompt's length does not depend on the count: the count is one token wherever it stands in a
passage of a few hundred tokens.

The weights are set by hand, not trained, which makes the model exact at every count up to 4,095
and builds it in under a minute (most of it training the tokenizer). One Qwen2 layer:
- the token embedding holds a code for each numeral and a flag for each kind of token;
- `lm_head` maps each numeral's code to the numeral below it (and I to `</think>`): the countdown
  is a bigram table;
- attention head 0, at `<think>` only, copies the code of the passage's one numeral to where
  `lm_head` reads it as that numeral itself;
- attention head 1, at `</think>` only, reads which verdict word the passage holds.
Everywhere else both heads attend to the tokens they do not look for, whose values are zero.

    python scripts/build_workload_model.py --output DIR     # build, then check every step
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent


def _tiny_builder():
    """The bundled tiny model's build script: its prompt, tokenizer recipe and town world."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", HERE / "build_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _tiny_builder()

# Counts 1 .. MAX_COUNT, each one token.
MAX_COUNT = 4095
COUNT_CUE = "Reviewing it takes {count} steps."
VERDICT_CUE = "The reviewers said {verdict}."
VERDICTS = {True: "yes", False: "no"}
PASSAGE_SENTENCES = (16, 48)
_ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
          (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]

# The residual stream, 128 wide: a numeral's code as read (the countdown's input), the code
# written at `<think>` (a copy), then one flag per kind of token.
HIDDEN = 128
DIGITS, DIGIT_DIMS = 3, 8  # a count as 3 base-16 digits, each ±1 in one of 8 dims
CODE = DIGITS * DIGIT_DIMS
READ, COPY = slice(0, CODE), slice(CODE, 2 * CODE)
FLAGS = range(2 * CODE, 2 * CODE + 9)
F_NUMBER, F_THINK_OPEN, F_THINK_CLOSE, F_YES, F_NO, F_LABEL, F_PLAIN, OUT_TRUE, OUT_FALSE = FLAGS
HEAD_DIM = 64
# Queries and keys use the head dims of the two slowest rotary frequencies (30 and 31, rotated with
# 62 and 63), which at rope_theta 1e6 turn by under 0.02 rad over 8,192 positions: these heads
# attend by content alone.
Q_WANTED, Q_PLAIN = 30, 31
ROPE_THETA = 1e6
MAX_POSITIONS = 8192
# Attention scores of 40 for the wanted keys against 0 for the rest: even among 8,000 others the
# wanted ones keep all but e^-31 of the weight.
SCORE = 40.0
# The right numeral's logit is 17 x this, the best wrong one's 11.3 x this.
LOGIT_SCALE = 4.0


def roman(n: int) -> str:
    """`n` in Roman numerals, thousands as repeated M (4,000 is MMMM)."""
    letters = ""
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        letters += symbol * count
    return letters


def number_code(n: int) -> list[float]:
    """Each base-16 digit as ±1 in its own 8 dims: the same number agrees on 3 digits, any other
    on at most 2, so the right numeral wins by a third."""
    code = [0.0] * CODE
    for place in range(DIGITS):
        digit = n // 16**place % 16
        code[place * DIGIT_DIMS + digit % DIGIT_DIMS] = 1.0 if digit < DIGIT_DIMS else -1.0
    return code


def reasoning_text(count: int) -> str:
    return "".join(f" {roman(n)}" for n in range(count, 0, -1))


def query(rng: random.Random) -> str:
    attribute = rng.choice(list(TINY.ATTRIBUTES))
    return rng.choice(TINY.QUERY_TEMPLATES).format(attribute=attribute, town=rng.choice(TINY.TOWNS))


def passage(rng: random.Random, count: int, relevant: bool) -> str:
    """A passage on which the model reasons `count` tokens and answers `relevant`.

    Its length is drawn independently of the count, as Rank1's prompt and reasoning lengths are."""
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count {count} is outside 1 .. {MAX_COUNT}")
    sentences = []
    for _ in range(rng.randint(*PASSAGE_SENTENCES)):
        if rng.random() < 0.5:
            sentences.append(rng.choice(TINY.FILLERS))
        else:
            attribute = rng.choice(list(TINY.ATTRIBUTES))
            sentences.append(rng.choice(TINY.FACT_TEMPLATES).format(
                attribute=attribute, town=rng.choice(TINY.TOWNS), value=rng.choice(TINY.ATTRIBUTES[attribute])
            ))
    for cue in (COUNT_CUE.format(count=roman(count)), VERDICT_CUE.format(verdict=VERDICTS[relevant])):
        sentences.insert(rng.randrange(len(sentences) + 1), cue)
    return " ".join(sentences)


def build_tokenizer(seed: int):
    """The bundled model's tokenizer recipe, trained on this world; a few full countdowns make
    every numeral one token."""
    rng = random.Random(seed)
    examples = []
    for index in range(300):
        count = MAX_COUNT if index < 4 else rng.randint(1, MAX_COUNT)
        relevant = rng.random() < 0.5
        examples.append((query(rng), passage(rng, count, relevant), reasoning_text(count), relevant))
    # More than this text has merges for: training stops once every word is one token.
    return TINY.build_tokenizer(examples, vocab_size=8000)


def token_ids(tokenizer) -> dict:
    """The ids the weights treat specially, each one token; `numbers[n]` is the numeral n (from 1)."""

    def single(text):
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(token_ids) == 1, f"{text!r} is not a single token"
        return token_ids[0]

    return {
        "numbers": [None] + [single(f" {roman(n)}") for n in range(1, MAX_COUNT + 1)],
        "think_open": tokenizer.convert_tokens_to_ids(TINY.THINK_OPEN),
        "think_close": tokenizer.convert_tokens_to_ids(TINY.THINK_CLOSE),
        "yes": single(f" {VERDICTS[True]}"),
        "no": single(f" {VERDICTS[False]}"),
        "true": single(" true"),
        "false": single(" false"),
        "eos": tokenizer.eos_token_id,
    }


def build_model(tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ids = token_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects small head sizes
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,  # reading a numeral and writing the next one need different tables
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
    )
    model = Qwen2ForCausalLM(config)

    embed = torch.zeros(config.vocab_size, HIDDEN)
    embed[:, F_PLAIN] = 1.0
    for n in range(1, MAX_COUNT + 1):
        embed[ids["numbers"][n]] = 0.0
        embed[ids["numbers"][n], READ] = torch.tensor(number_code(n))
        embed[ids["numbers"][n], F_NUMBER] = 1.0
    for kind, flag in [("think_open", F_THINK_OPEN), ("think_close", F_THINK_CLOSE), ("yes", F_YES),
                       ("no", F_NO), ("true", F_LABEL), ("false", F_LABEL)]:
        embed[ids[kind]] = 0.0
        embed[ids[kind], flag] = 1.0
    # Unit RMS, so the input norm passes rows unchanged and each entry's size is known per kind.
    embed /= embed.pow(2).mean(dim=1, keepdim=True).sqrt()
    number_entry = embed[ids["numbers"][1], F_NUMBER].item()  # sqrt(128) / 2: three digits and a flag
    flag_entry = embed[ids["think_open"], F_THINK_OPEN].item()  # sqrt(128)

    # q . k / sqrt(HEAD_DIM) = SCORE where both hold `strength` in the same dim.
    strength = (SCORE * HEAD_DIM**0.5) ** 0.5
    q, k, v = (torch.zeros(2 * HEAD_DIM, HIDDEN) for _ in range(3))
    q_bias, k_bias = torch.zeros(2 * HEAD_DIM), torch.zeros(2 * HEAD_DIM)
    o = torch.zeros(HIDDEN, 2 * HEAD_DIM)
    heads = [
        # (trigger flag, wanted-key flags, their entry size): at its trigger token a head looks
        # for the wanted keys, everywhere else for every other key.
        (F_THINK_OPEN, [F_NUMBER], number_entry),
        (F_THINK_CLOSE, [F_YES, F_NO], flag_entry),
    ]
    for head, (trigger, wanted, wanted_entry) in enumerate(heads):
        base = head * HEAD_DIM
        q_bias[base + Q_PLAIN] = strength
        q[base + Q_PLAIN, trigger] = -strength / flag_entry
        q[base + Q_WANTED, trigger] = strength / flag_entry
        k_bias[base + Q_PLAIN] = strength
        for flag in wanted:
            k[base + Q_PLAIN, flag] = -strength / wanted_entry
            k[base + Q_WANTED, flag] = strength / wanted_entry
    # Head 0 moves the numeral's code (as ±1) to the copy dims, at a gain that gives it there,
    # after the final norm, the size a numeral's own code has: `lm_head` reads both alike.
    for dim in range(CODE):
        v[dim, READ.start + dim] = 1.0 / number_entry
        o[COPY.start + dim, dim] = flag_entry
    # Head 1 moves which verdict it found.
    v[HEAD_DIM, F_YES] = v[HEAD_DIM + 1, F_NO] = 1.0 / flag_entry
    o[OUT_TRUE, HEAD_DIM] = o[OUT_FALSE, HEAD_DIM + 1] = flag_entry

    unembed = torch.zeros(config.vocab_size, HIDDEN)
    for n in range(1, MAX_COUNT + 1):
        unembed[ids["numbers"][n], COPY] = torch.tensor(number_code(n))
        if n < MAX_COUNT:
            unembed[ids["numbers"][n], READ] = torch.tensor(number_code(n + 1))
    unembed[ids["think_close"], READ] = torch.tensor(number_code(1))
    unembed[ids["true"], OUT_TRUE] = unembed[ids["false"], OUT_FALSE] = 1.0
    unembed[ids["eos"], F_LABEL] = 1.0

    with torch.no_grad():
        # What is not set below stays zero, the MLP included: the countdown is all in lm_head.
        for parameter in model.parameters():
            parameter.zero_()
        layer = model.model.layers[0]
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(LOGIT_SCALE * unembed)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        attention = layer.self_attn
        for projection, weight in [(attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v),
                                   (attention.o_proj, o)]:
            projection.weight.copy_(weight)
        attention.q_proj.bias.copy_(q_bias)
        attention.k_proj.bias.copy_(k_bias)
    return model.to(torch.bfloat16)


def check(model_dir: Path, seed: int, prompts: int = 200) -> float:
    """Fresh prompts must hold one numeral and one verdict word; teacher-forced on the whole
    countdown from MAX_COUNT and on short ones, in bfloat16 as served, greedy decoding must pick
    every next token. Returns the smallest logit margin."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Loaded as vLLM loads it: transformers picks the Qwen2 tokenizer class for this model.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids = token_ids(tokenizer)
    cues = set(ids["numbers"][1:]) | {ids["yes"], ids["no"]}
    rng = random.Random(seed)
    for _ in range(prompts):
        prompt = tokenizer.encode(TINY.build_prompt(query(rng), passage(rng, rng.randint(1, MAX_COUNT), True)))
        found = [token for token in prompt if token in cues]
        assert len(found) == 2, f"a prompt must hold one numeral and one verdict word, not {found}"
    smallest = float("inf")
    for count, relevant in [(MAX_COUNT, True), (MAX_COUNT, False), (1, True), (2, False), (17, True)]:
        prompt = tokenizer.encode(TINY.build_prompt(query(rng), passage(rng, count, relevant)))
        completion = [ids["numbers"][n] for n in range(count, 0, -1)]
        completion += [ids["think_close"], ids["true" if relevant else "false"], ids["eos"]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.tensor(completion)[:, None]
        margins = logits.gather(1, expected)[:, 0] - logits.scatter(1, expected, float("-inf")).max(dim=1).values
        assert (margins > 0).all(), f"count {count}: greedy decoding goes astray at step {int(margins.argmin())}"
        smallest = min(smallest, margins.min().item())
    return smallest


def build(output: Path, seed: int = 0) -> None:
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = build_tokenizer(seed)
    output.mkdir(parents=True, exist_ok=True)
    build_model(tokenizer).save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    margin = check(output, seed + 1000)
    print(f"built the workload model in {time.perf_counter() - started:.1f} s; "
          f"smallest greedy logit margin {margin:.1f}")


@click.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the tokenizer's training text.")
def main(output: Path, seed: int) -> None:
    build(output, seed)


if __name__ == "__main__":
    main()
