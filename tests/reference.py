"""An independent copy of the public Rank1 reference procedure (`rank1.py`, mteb's rank1 wrapper),
for comparison only. It imports nothing from rank1_batch: its rules are written from rank1.py.

Prompts are text, built by string formatting and tokenised by vLLM (control tokens parsed); labels
are read from the top 20 logprobs; the forced pass and the 0.5 fallback are the reference's. It runs
on the `vllm.LLM` of the scorer under test, as the reference's own code would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOP_LOGPROBS = 20
STOP = ["</think> true", "</think> false"]


@dataclass(frozen=True)
class ReferenceScore:
    score: float
    # How the reference scored it: "last" (both labels in the top 20 at the main pass's last
    # position), "forced" or "fallback".
    path: str
    # Whether the main pass ended on a label stop string. The reference never looks at this; the
    # tests use it to tell a label the model wrote from a position it merely stopped at.
    stopped_on_label: bool


def query_with_instruction(query: str, instruction: str | None) -> str:
    # rank1.py applies this to a batch whose instructions are given; here, to each pair that has one.
    if instruction is None:
        return query
    return f"{query} {instruction}".strip() if query.strip() != instruction.strip() else query.strip()


def passage_with_title(passage: dict | str) -> str:
    if isinstance(passage, dict):
        return f"{passage['title']} {passage['text']}" if "title" in passage else passage["text"]
    return passage


def prompt_text(query: str, passage: str, dataset_prompt: str | None = None) -> str:
    query = dataset_prompt.replace("FILL_QUERY_HERE", query) if dataset_prompt else query
    return (
        "Determine if the following passage is relevant to the query. "
        "Answer only with 'true' or 'false'.\n"
        f"Query: {query}\n"
        f"Passage: {passage}\n"
        "<think>"
    )


def cleaned_text(text: str) -> str:
    text = text.rstrip()
    if not text.endswith((".", "!", "?")):
        last_punct = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
        if last_punct != -1:
            text = text[: last_punct + 1]
    return text.strip()


def forced_prompt(prompt: str, generated: str) -> str:
    return f"{prompt}\n{cleaned_text(generated)}\n</think>"


def _score(logprob_true: float, logprob_false: float) -> float:
    return math.exp(logprob_true) / (math.exp(logprob_true) + math.exp(logprob_false))


def reference_scores(
    llm, pairs, max_output_tokens: int = 8192, dataset_prompt: str | None = None
) -> list[ReferenceScore]:
    """One result per (query, passage, instruction) pair; a passage is a string or a dict with
    `text` and maybe `title`, the instruction a string or None.

    `max_output_tokens` is not capped by prompt length: vLLM ends a request whose prompt and
    output reach `max_model_len` (finish reason "length") instead of rejecting it, as the
    reference's vLLM 0.7.2 did (that one stopped a token later).
    """
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    true_token = tokenizer(" true", add_special_tokens=False).input_ids[0]
    false_token = tokenizer(" false", add_special_tokens=False).input_ids[0]
    prompts = [
        prompt_text(query_with_instruction(query, instruction), passage_with_title(passage), dataset_prompt)
        for query, passage, instruction in pairs
    ]
    main = SamplingParams(
        temperature=0, max_tokens=max_output_tokens, logprobs=TOP_LOGPROBS, stop=STOP, skip_special_tokens=False
    )
    results: list[ReferenceScore | None] = []
    incomplete = []
    for index, output in enumerate(llm.generate(prompts, main, use_tqdm=False)):
        completion = output.outputs[0]
        stopped = completion.finish_reason == "stop" and completion.stop_reason in STOP
        final = completion.logprobs[-1] if completion.logprobs else {}
        if true_token in final and false_token in final:
            results.append(ReferenceScore(_score(final[true_token].logprob, final[false_token].logprob), "last", stopped))
        else:
            results.append(None)
            incomplete.append((index, forced_prompt(prompts[index], completion.text), stopped))
    if incomplete:
        # The reference asks for the top 20 logprobs here. vLLM 0.7.2 computed them after the
        # allowed-token mask, so both labels were always among them; vLLM 0.32 returns them before
        # it, where a label can fall outside the top 20. Asking for the two labels' logprobs gives
        # what the reference got: the score depends only on their difference.
        forced = SamplingParams(
            temperature=0,
            max_tokens=1,
            logprob_token_ids=[true_token, false_token],
            allowed_token_ids=[true_token, false_token],
            skip_special_tokens=False,
        )
        outputs = llm.generate([text for _, text, _ in incomplete], forced, use_tqdm=False)
        for (index, _, stopped), output in zip(incomplete, outputs):
            final = output.outputs[0].logprobs[-1]
            if true_token in final and false_token in final:
                results[index] = ReferenceScore(_score(final[true_token].logprob, final[false_token].logprob), "forced", stopped)
            else:
                results[index] = ReferenceScore(0.5, "fallback", stopped)
    return results
