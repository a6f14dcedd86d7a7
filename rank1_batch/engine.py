"""The vLLM side of scoring: one engine, a main pass and a forced pass. Knows nothing of Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from . import prompt
from .config import EngineConfig
from .encoding import PromptEncoder, context_length
from .scoring import Judgement, Outcome, answered_label, judge


@dataclass(frozen=True)
class Generation:
    """What the engine made of one prompt."""

    judgement: Judgement
    reasoning: str
    reasoning_tokens: int


# The smallest KV-cache block the CPU attention kernels take (vLLM's CPU default is 128). Prefix
# caching reuses whole blocks only, so small blocks let candidates of one query share the query's
# prompt prefix, and let the label pass reuse nearly all of the prefix it re-reads.
CPU_BLOCK_SIZE = 32


def default_block_size() -> int | None:
    """`CPU_BLOCK_SIZE` on a CPU build of vLLM; elsewhere vLLM's own choice (16 on GPUs)."""
    from vllm.platforms import current_platform

    return CPU_BLOCK_SIZE if current_platform.is_cpu() else None


def engine_arguments(engine: EngineConfig) -> dict:
    """Keyword arguments of `vllm.LLM` for this configuration."""
    arguments = dict(
        block_size=engine.block_size or default_block_size(),
        model=engine.model_path,
        revision=engine.revision,
        tokenizer_revision=engine.revision,
        dtype=engine.dtype,
        max_model_len=context_length(engine),
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
        self.label_pass = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=labels,
            skip_special_tokens=False,
            logprob_token_ids=labels,
        )

    @staticmethod
    def main_pass(max_tokens: int):
        """Greedy reasoning up to a label stop string. It asks for no logprobs: returning them at
        every reasoning step cost about a third of the engine's throughput, and the label pass
        reads the same numbers from the prefix the main pass left in the cache."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, stop=list(prompt.STOP_STRINGS), skip_special_tokens=False
        )

    def _generate(self, prompts: Sequence[list[int]], params) -> list:
        from vllm import TokensPrompt

        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)

    def generate(self, prompts: Sequence[list[int]]) -> list[Generation]:
        """The main pass for all prompts, then one label pass that reads each pair's label.

        A pair that answered is read where it wrote its label (its prompt and reasoning up to the
        label token, as the main pass saw them); one that did not is forced, as the reference does,
        from all it generated. Each pair reasons up to its own budget: a long prompt kept whole
        leaves less room in the context.
        """
        budgets = [self.encoder.reasoning_budget(len(ids)) for ids in prompts]
        passes = {budget: self.main_pass(budget) for budget in set(budgets)}
        reasonings, label_reads = [], []
        for ids, output in zip(prompts, self._generate(prompts, [passes[budget] for budget in budgets])):
            completion = output.outputs[0]
            reasonings.append(self._reasoning(completion))
            if answered_label(completion.finish_reason, completion.stop_reason, prompt.STOP_STRINGS):
                label_reads.append((Outcome.ANSWERED, [*ids, *completion.token_ids[:-1]]))
            else:
                label_reads.append((Outcome.FORCED, self.encoder.forced_ids(ids, completion.text)))
        judgements = self.read_labels(label_reads)
        return [Generation(judgement, *reasoning) for judgement, reasoning in zip(judgements, reasonings)]

    def read_labels(self, label_reads: Sequence[tuple[Outcome, list[int]]]) -> list[Judgement]:
        """One token after each prefix, restricted to the labels, judged as its outcome.

        A prefix that does not fit the context (only a forced one can) gets the fallback score.
        """
        fits = [len(ids) < self.encoder.max_model_len for _, ids in label_reads]
        outputs = iter(self._generate([ids for (_, ids), fit in zip(label_reads, fits) if fit], self.label_pass))
        judgements = []
        for (outcome, _), fit in zip(label_reads, fits):
            if fit:
                judgements.append(judge(outcome, *self._label_logprobs(next(outputs).outputs[0].logprobs[-1])))
            else:
                judgements.append(judge(Outcome.FALLBACK, None, None))
        return judgements

    def _label_logprobs(self, position: dict) -> tuple[float | None, float | None]:
        def logprob(token_id: int) -> float | None:
            entry = position.get(token_id)
            return None if entry is None else entry.logprob

        return logprob(self.encoder.true_id), logprob(self.encoder.false_id)

    def _reasoning(self, completion) -> tuple[str, int]:
        """The trace: the text before the first `</think>` (all of it if the model never closed) and
        its token count. A forced pass reads on past a stray `</think>`; the trace stops there."""
        token_ids = list(completion.token_ids)
        if self.encoder.think_close_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.encoder.think_close_id)]
        return completion.text.split(prompt.THINK_CLOSE, 1)[0], len(token_ids)
