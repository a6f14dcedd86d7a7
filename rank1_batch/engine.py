"""The vLLM side of scoring: one engine, a main pass and a forced pass. Knows nothing of Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from . import prompt
from .config import EngineConfig
from .encoding import PromptEncoder
from .scoring import Judgement, Outcome, answered_label, judge


@dataclass(frozen=True)
class Generation:
    """What the engine made of one prompt."""

    judgement: Judgement
    reasoning: str
    reasoning_tokens: int


def engine_arguments(engine: EngineConfig) -> dict:
    """Keyword arguments of `vllm.LLM` for this configuration."""
    arguments = dict(
        model=engine.model_path,
        revision=engine.revision,
        tokenizer_revision=engine.revision,
        dtype=engine.dtype,
        max_model_len=engine.max_model_len,
        tensor_parallel_size=engine.tensor_parallel_size,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        enforce_eager=engine.enforce_eager,
        quantization=engine.quantization,
        trust_remote_code=engine.trust_remote_code,
        seed=engine.seed,
    )
    arguments.update(engine.engine_args)
    return arguments


class Rank1Engine:
    """A vLLM engine that turns prompt token ids into Rank1 judgements."""

    def __init__(self, engine: EngineConfig, encoder: PromptEncoder, llm=None):
        """`llm` reuses a running `vllm.LLM` (same model and context length) instead of starting one."""
        from vllm import LLM, SamplingParams

        # A CPU build sizes its KV cache from this variable; its default is sized for servers,
        # and a GPU build ignores it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.encoder = encoder
        self.llm = llm or LLM(**engine_arguments(engine))
        labels = [encoder.true_id, encoder.false_id]
        self.main_pass = SamplingParams(
            temperature=0.0,
            max_tokens=engine.max_reasoning_tokens,
            stop=list(prompt.STOP_STRINGS),
            skip_special_tokens=False,
            logprob_token_ids=labels,
        )
        self.forced_pass = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=labels,
            skip_special_tokens=False,
            logprob_token_ids=labels,
        )

    def _generate(self, prompts: Sequence[list[int]], params) -> list:
        from vllm import TokensPrompt

        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)

    def _label_logprobs(self, position: dict) -> tuple[float | None, float | None]:
        def logprob(token_id: int) -> float | None:
            entry = position.get(token_id)
            return None if entry is None else entry.logprob

        return logprob(self.encoder.true_id), logprob(self.encoder.false_id)

    def generate(self, prompts: Sequence[list[int]]) -> list[Generation]:
        """Main pass for all prompts, then one forced pass for those that did not answer."""
        results: list[Generation | None] = []
        unanswered: list[int] = []
        for index, output in enumerate(self._generate(prompts, self.main_pass)):
            completion = output.outputs[0]
            reasoning, reasoning_tokens = self._reasoning(completion)
            if answered_label(completion.finish_reason, completion.stop_reason, prompt.STOP_STRINGS):
                judgement = judge(Outcome.ANSWERED, *self._label_logprobs(completion.logprobs[-1]))
                results.append(Generation(judgement, reasoning, reasoning_tokens))
            else:
                results.append(Generation(judge(Outcome.FORCED, None, None), reasoning, reasoning_tokens))
                unanswered.append(index)
        forced = self.force_labels([prompts[i] for i in unanswered], [results[i].reasoning for i in unanswered])
        for index, judgement in zip(unanswered, forced):
            results[index] = Generation(judgement, results[index].reasoning, results[index].reasoning_tokens)
        return results

    def force_labels(self, prompts: Sequence[list[int]], reasonings: Sequence[str]) -> list[Judgement]:
        """Append the cut reasoning and `</think>` to each prompt and read the label there.

        A forced prompt that does not fit the context gets the fallback score.
        """
        forced = [self.encoder.forced_ids(ids, reasoning) for ids, reasoning in zip(prompts, reasonings)]
        fits = [len(ids) < self.encoder.max_model_len for ids in forced]
        outputs = iter(self._generate([ids for ids, fit in zip(forced, fits) if fit], self.forced_pass))
        judgements = []
        for fit in fits:
            if fit:
                judgements.append(judge(Outcome.FORCED, *self._label_logprobs(next(outputs).outputs[0].logprobs[-1])))
            else:
                judgements.append(judge(Outcome.FALLBACK, None, None))
        return judgements

    def _reasoning(self, completion) -> tuple[str, int]:
        """The text before `</think>` (all of it if the model never closed) and its token count."""
        token_ids = list(completion.token_ids)
        if self.encoder.think_close_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.encoder.think_close_id)]
        return completion.text.split(prompt.THINK_CLOSE, 1)[0], len(token_ids)
