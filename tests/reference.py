"""The public reference procedure of Rank1 (text prompts, top-20 logprobs), for comparison only.

It runs on the same `vllm.LLM` as the scorer under test, as the reference's own code does.
"""

from __future__ import annotations

import math

from rank1_batch import prompt

TOP_LOGPROBS = 20


def reference_scores(llm, pairs, max_reasoning_tokens: int) -> list[tuple[float, bool]]:
    """(score, main pass answered) per (query, passage) pair."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    true_id = tokenizer.encode(" true", add_special_tokens=False)[0]
    false_id = tokenizer.encode(" false", add_special_tokens=False)[0]
    texts = [prompt.prompt(query, passage) for query, passage in pairs]
    main = SamplingParams(
        temperature=0,
        max_tokens=max_reasoning_tokens,
        logprobs=TOP_LOGPROBS,
        stop=list(prompt.STOP_STRINGS),
        skip_special_tokens=False,
    )
    results: list[tuple[float, bool] | None] = []
    retry = []
    for index, output in enumerate(llm.generate(texts, main, use_tqdm=False)):
        completion = output.outputs[0]
        last = completion.logprobs[-1] if completion.logprobs else {}
        if true_id in last and false_id in last:
            results.append((_score(last[true_id].logprob, last[false_id].logprob), True))
        else:
            results.append(None)
            retry.append((index, texts[index] + "\n" + prompt.cut_to_last_sentence(completion.text) + "\n</think>"))
    if retry:
        forced = SamplingParams(
            temperature=0, max_tokens=1, logprobs=TOP_LOGPROBS, allowed_token_ids=[true_id, false_id],
            skip_special_tokens=False,
        )
        outputs = llm.generate([text for _, text in retry], forced, use_tqdm=False)
        for (index, _), output in zip(retry, outputs):
            last = output.outputs[0].logprobs[-1]
            ok = true_id in last and false_id in last
            results[index] = (_score(last[true_id].logprob, last[false_id].logprob) if ok else 0.5, False)
    return results


def _score(logprob_true: float, logprob_false: float) -> float:
    return math.exp(logprob_true) / (math.exp(logprob_true) + math.exp(logprob_false))
