"""The vLLM side of scoring: a main pass and a label pass per pair, on a batch engine (blocking
calls) or on vLLM's async engine (one request at a time, many in flight). Knows nothing of Ray."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Sequence

from ..config import EngineConfig
from . import prompt
from .encoding import PromptEncoder, context_length
from .judgement import Judgement, Outcome, answered_label, judge


@dataclass(frozen=True)
class Generation:
    """What the engine made of one prompt in one sample."""

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
    limits = {"max_num_seqs": engine.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens}
    arguments.update({name: value for name, value in limits.items() if value is not None})
    arguments.update(engine.engine_args)
    return arguments


def sample_seeds(seed: int, prompt_ids: Sequence[int], samples: int) -> list[int]:
    """Each sample's seed, from the job's seed, the prompt and the sample's index: a pair's samples
    are the same whichever batch, engine or run draws them, and the same texts under other ids
    are the same samples, as the score store has them."""
    prompt_bytes = struct.pack(f"<q{len(prompt_ids)}i", seed, *prompt_ids)
    return [int.from_bytes(hashlib.sha256(struct.pack("<I", index) + prompt_bytes).digest()[:8], "little") >> 1
            for index in range(samples)]


class Rank1Passes:
    """A pair's requests and what their outputs mean, shared by the batch and async engines.

    The main pass reasons up to a label stop string, within the pair's own budget (a long prompt
    kept whole leaves less room in the context): greedily, or, with self-consistency, once per
    sample, each sampled with its own seed. The label pass, greedy, reads one token restricted to
    the labels: for a sample that answered, after its prompt and reasoning up to the label token,
    as the main pass saw them; for one that did not, after the forced text, as the reference
    does, from all it generated.
    """

    def __init__(self, encoder: PromptEncoder, engine: EngineConfig):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.encoder = encoder
        self.engine = engine
        labels = [encoder.true_id, encoder.false_id]
        # Only each request's final output is wanted: no per-token stream to the caller.
        self.label_pass = SamplingParams(
            temperature=0.0, max_tokens=1, allowed_token_ids=labels, skip_special_tokens=False,
            logprob_token_ids=labels, output_kind=RequestOutputKind.FINAL_ONLY,
        )
        self._main_passes: dict[int, SamplingParams] = {}
        self._main_pass = partial(
            SamplingParams, temperature=0.0, stop=list(prompt.STOP_STRINGS), skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def main_pass(self, prompt_ids: Sequence[int]):
        """The main pass asks for no logprobs: returning them at every reasoning step cost about a
        third of the engine's throughput, and the label pass reads the same numbers from the
        prefix the main pass left in the cache."""
        budget = self.encoder.reasoning_budget(len(prompt_ids))
        if budget not in self._main_passes:
            self._main_passes[budget] = self._main_pass(max_tokens=budget)
        return self._main_passes[budget]

    def main_passes(self, prompt_ids: Sequence[int]) -> list:
        """One main pass per sample: the greedy one alone, or each sample's, seeded."""
        if self.engine.temperature == 0:
            return [self.main_pass(prompt_ids)]
        budget = self.encoder.reasoning_budget(len(prompt_ids))
        return [self._main_pass(max_tokens=budget, temperature=self.engine.temperature, top_p=self.engine.top_p, seed=seed)
                for seed in sample_seeds(self.engine.seed, prompt_ids, self.engine.samples)]

    def label_read(self, prompt_ids: list[int], completion) -> tuple[Outcome, list[int] | None]:
        """How the pair's label is read, and after which prefix; None when the forced prefix does
        not fit the context (only a forced one can), which leaves the fallback score."""
        if answered_label(completion.finish_reason, completion.stop_reason, prompt.STOP_STRINGS):
            return Outcome.ANSWERED, [*prompt_ids, *completion.token_ids[:-1]]
        forced = self.encoder.forced_ids(prompt_ids, completion.text)
        return Outcome.FORCED, forced if len(forced) < self.encoder.max_model_len else None

    def judge_label(self, outcome: Outcome, label_completion) -> Judgement:
        if label_completion is None:
            return judge(Outcome.FALLBACK, None, None)
        position = label_completion.logprobs[-1]
        found = [position.get(token_id) for token_id in (self.encoder.true_id, self.encoder.false_id)]
        return judge(outcome, *(None if entry is None else entry.logprob for entry in found))

    def generation(self, judgement: Judgement, completion) -> Generation:
        """The trace: the text before the first `</think>` (all of it if the model never closed) and
        its token count. A forced pass reads on past a stray `</think>`; the trace stops there."""
        token_ids = list(completion.token_ids)
        if self.encoder.think_close_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.encoder.think_close_id)]
        return Generation(judgement, completion.text.split(prompt.THINK_CLOSE, 1)[0], len(token_ids))


def set_cpu_cache_space() -> None:
    """A CPU build sizes its KV cache from this variable; its default is sized for servers, and a
    GPU build ignores it."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


class Rank1Engine:
    """A vLLM engine that turns batches of prompt token ids into Rank1 judgements, one blocking
    call per pass: for notebooks and scripts."""

    def __init__(self, engine: EngineConfig, encoder: PromptEncoder, llm=None):
        """`llm` reuses a running `vllm.LLM` (same model and context length) instead of starting one."""
        from vllm import LLM

        set_cpu_cache_space()
        self.llm = llm or LLM(**engine_arguments(engine))
        self.passes = Rank1Passes(encoder, engine)

    def _generate(self, prompts: Sequence[list[int]], params) -> list:
        from vllm import TokensPrompt

        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)

    def generate(self, prompts: Sequence[list[int]]) -> list[list[Generation]]:
        """Each prompt's samples: the main passes of all samples of all prompts, then one label
        pass for each of them."""
        passes = [self.passes.main_passes(ids) for ids in prompts]
        samples = [ids for ids, each in zip(prompts, passes) for _ in each]
        outputs = self._generate(samples, [params for each in passes for params in each])
        completions = [output.outputs[0] for output in outputs]
        reads = [self.passes.label_read(ids, completion) for ids, completion in zip(samples, completions)]
        labels = iter(self._generate([prefix for _, prefix in reads if prefix is not None], self.passes.label_pass))
        generations = iter([
            self.passes.generation(self.passes.judge_label(outcome, None if prefix is None else next(labels).outputs[0]), completion)
            for (outcome, prefix), completion in zip(reads, completions)
        ])
        return [[next(generations) for _ in each] for each in passes]


class AsyncRank1Engine:
    """vLLM's async engine, one request per pass: each sample's label pass is issued as soon as its
    own main pass ends, while the main passes of other samples, pairs and batches keep the engine
    full. The engine's statistics are on, so vLLM logs them at intervals."""

    def __init__(self, engine: EngineConfig, encoder: PromptEncoder):
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        set_cpu_cache_space()
        # An offline batch job, as `vllm.LLM` is: vLLM sizes its scheduler by this context, and its
        # default (a server's engine) allows half the sequences per step on a CPU build (128 against
        # 256) and an eighth on an H100 (128 against 1,024).
        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_arguments(engine), disable_log_stats=False), usage_context=UsageContext.LLM_CLASS,
        )
        self.passes = Rank1Passes(encoder, engine)

    async def _final(self, prompt_ids: list[int], params):
        from vllm import TokensPrompt

        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
            final = output
        return final.outputs[0]

    async def generate(self, prompt_ids: list[int]) -> list[Generation]:
        """The pair's samples, all in flight at once: they share the prompt's cached prefix."""
        return list(await asyncio.gather(*(self._sample(prompt_ids, params) for params in self.passes.main_passes(prompt_ids))))

    async def _sample(self, prompt_ids: list[int], main_pass) -> Generation:
        completion = await self._final(prompt_ids, main_pass)
        outcome, prefix = self.passes.label_read(prompt_ids, completion)
        label = None if prefix is None else await self._final(prefix, self.passes.label_pass)
        return self.passes.generation(self.passes.judge_label(outcome, label), completion)

    def shutdown(self) -> None:
        self.llm.shutdown()
