"""The score stage: the actor pool's engine actors, each holding one vLLM engine, scoring the
prompts of several batches at once and committing each batch as it is done."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig, ScoringConfig, job_logging
from ..model.encoding import EncodedPrompt
from ..model.engine_metrics import EngineTotals, read_totals
from ..model.judgement import OUTCOMES
from ..output.commits import write_results
from ..output.storage import Output, content_name
from ..schema import (
    ERRORS_SCHEMA,
    conform,
    count_values,
    pair_grades,
)
from ..store.score_store import JUDGEMENT
from .engine_watch import Death, EngineDeaths, EngineMonitor
from .follow import stop_if_lease_lost
from .prompts import ENCODED_COLUMNS, PASSTHROUGH, SCORED_SCHEMA, Reuse, scorer_of

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """vLLM could not start; the message carries the engine's own error."""


class ScorePairs:
    """An actor holding one engine (vLLM's async engine): scores the prompts of each batch it is
    given and commits them. Ray Data gives it several batches at once (`max_concurrent_batches`),
    so the engine's free slots are filled from the next batches while a batch's last chains run.

    Committing here, batch by batch, makes each batch a commit of its own: a killed run loses at
    most the batches in flight. The writes run in a thread, off the engine's event loop. With a
    `gate` (the run's `follow.BatchGate` actor), a batch starts only while the run is not draining,
    and is committed only while the run holds its output.
    """

    def __init__(self, job: JobConfig, output: Output, reuse: Reuse | None = None, gate=None):
        job_logging()
        self.job, self.output, self.reuse, self.gate = job, output, reuse, gate
        self.engine, self.monitor, self.engine_totals = None, None, EngineTotals(0, 0)
        self.start_counted = False  # the engine's start is counted with the first batch after it
        self.deaths = EngineDeaths(output)
        self.restarted = was_restarted()
        # Each batch on this actor, with the pair it has alone in the engine when it runs one at a time.
        self.in_flight: dict[str, tuple[str, str] | None] = {}

    def start_engine(self) -> None:
        import ray

        kind, encoder = scorer_of(self.job)
        try:
            self.engine = kind.start_engine(encoder)
        except Exception as error:
            raise EngineStartError(f"the engine could not start (model {self.job.engine.model}): {error}") from error
        self.engine_totals = read_totals()
        self.monitor = EngineMonitor() if ray.is_initialized() else None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.gate is None:
            return await self.score_and_commit(batch)
        if not await self.gate.admit.remote():
            # Draining: only the rows set aside upstream, already written, are done.
            set_aside = batch.filter(pc.is_null(batch["prompt_token_ids"]))
            return batch_counts(set_aside, SCORED_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table(), EngineTotals(0, 0), 0)
        try:
            return await self.score_and_commit(batch)
        finally:
            self.gate.done.remote()

    async def score_and_commit(self, batch: pa.Table) -> pa.Table:
        started = time.monotonic()
        prompts = batch.filter(pc.is_valid(batch["prompt_token_ids"]))
        encoded = [EncodedPrompt(**{field: row[column] for column, field in ENCODED_COLUMNS.items()})
                   for row in prompts.select(list(ENCODED_COLUMNS)).to_pylist()]
        # The engine starts with the first pair to judge, so that a run with none (a resume with
        # nothing left, a night whose pairs are all stored or all rejected) starts none. On the event
        # loop, so no other batch reaches the engine before it is up.
        if encoded and self.engine is None:
            self.start_engine()
        if self.monitor:
            self.monitor.start()
        name = content_name(prompts["query_id"], prompts["doc_id"])  # the whole batch: a retry rewrites it
        death = await asyncio.to_thread(self.deaths.recorded, name) if self.restarted else None
        self.in_flight[name] = None
        if death is None:
            judgements = await asyncio.gather(*(self.judge(item) for item in encoded))
        else:
            judgements = await self.judge_one_at_a_time(name, prompts, encoded, death)
        del self.in_flight[name]
        scored, errors = score_table(prompts, judgements, self.job.scoring)
        if self.gate is not None:
            stop_if_lease_lost(await self.gate.lease_lost.remote())
        if self.reuse is not None and scored.num_rows:
            # Before the commit: a pair committed is in the store, so a resume never scores it again.
            await asyncio.to_thread(self.reuse.store.add, store_rows(scored, self.job.engine.model), self.reuse.run_id)
        await asyncio.to_thread(write_results, scored, errors, name, self.job, self.output,
                                scorer_of(self.job)[0].reasons)
        if death is not None:
            await asyncio.to_thread(self.deaths.clear, name)
        now = read_totals() if self.engine else self.engine_totals
        engine, self.engine_totals = now - self.engine_totals, now
        starts = int(self.engine is not None and not self.start_counted)
        self.start_counted = self.engine is not None
        counts = batch_counts(batch, scored, errors, engine, starts)
        if self.monitor:
            self.monitor.publish()
        log.info("batch of %d pairs committed in %.1f s: %d reasoning tokens, %d errors", prompts.num_rows,
                 time.monotonic() - started, pc.sum(scored["reasoning_tokens"]).as_py() or 0, errors.num_rows)
        return counts

    async def judge(self, item: EncodedPrompt):
        """A pair's judgement, or the error its request failed with. A dead engine ends the actor."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return await scorer_of(self.job)[0].judge(self.engine, item)
        except EngineDeadError:
            self.end_actor()
        except Exception as error:
            return error

    async def judge_one_at_a_time(self, name: str, prompts: pa.Table, encoded: list[EncodedPrompt], death: Death) -> list:
        """A batch that was in the engine when it died: its pairs one at a time, so that a second
        death names its pair. A pair named so is not sent again (see `engine_watch`)."""
        log.warning("batch %s was in flight when an engine died (%d time(s)): scoring its pairs one at a time", name, death.deaths)
        judgements = []
        for pair, item in zip(zip(prompts["query_id"].to_pylist(), prompts["doc_id"].to_pylist()), encoded):
            if pair == death.alone:
                judgements.append(EngineKilled("the engine died twice with this pair in flight, the second time alone"))
                continue
            self.in_flight[name] = pair
            judgements.append(await self.judge(item))
        return judgements

    def end_actor(self) -> None:
        """Ray restarts an actor whose process died and retries its batches on a new engine; the
        record of what was in flight bounds those retries."""
        log.error("the engine died; ending this actor so that Ray starts another")
        self.deaths.record(self.in_flight)
        os._exit(1)


class EngineKilled(RuntimeError):
    """A pair that took the engine down twice: a row error, not sent again in this run."""


def was_restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted after it died."""
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    return bool(context and context.get_actor_id() and context.was_current_actor_reconstructed)


def score_table(prompts: pa.Table, judgements: list, scoring: ScoringConfig) -> tuple[pa.Table, pa.Table]:
    """Scored pairs with their reasoning, texts and grades, and the pairs whose request failed,
    with the engine's message."""
    failed = pa.array([isinstance(judgement, BaseException) for judgement in judgements], pa.bool_())
    results = [{**judgement.to_dict(), "reused": False}
               for judgement in judgements if not isinstance(judgement, BaseException)]
    scored = prompts.filter(pc.invert(failed)).select(PASSTHROUGH)
    for field in SCORED_SCHEMA:
        if field.name not in (*PASSTHROUGH, "grade"):
            scored = scored.append_column(field, pa.array([row[field.name] for row in results], field.type))
    scored = scored.append_column("grade", pair_grades(scored, scoring.grades, scoring.aggregate))
    messages = [f"{type(error).__name__}: {error}" for error in judgements if isinstance(error, BaseException)]
    errors = prompts.filter(failed).select(["query_id", "doc_id"]).append_column("error", pa.array(messages, pa.string()))
    return conform(scored, SCORED_SCHEMA), errors


def store_rows(scored: pa.Table, model: str) -> pa.Table:
    """Scored pairs as the score store takes them: by key, with the query that partitions them."""
    rows = scored.select(["store_key", "query", "instruction", *JUDGEMENT]).rename_columns(
        ["key", "query", "instruction", *JUDGEMENT])
    return rows.append_column("model", pa.array([model] * rows.num_rows, pa.string()))


def batch_counts(batch: pa.Table, scored: pa.Table, errors: pa.Table, engine: EngineTotals, engine_starts: int) -> pa.Table:
    """What the driver counts of a committed batch: its pairs (set-aside ones included), the pairs
    scored and their outcomes (a cross-encoder's have none), errors, the engine's steps and generated tokens since the actor's previous batch, and
    whether the actor started its engine since then."""
    counts = {"pairs": batch.num_rows, "scored": scored.num_rows, **dict.fromkeys(OUTCOMES, 0),
              **count_values(scored["outcome"]),
              "errors": errors.num_rows, "engine_steps": engine.steps, "generated_tokens": engine.generated_tokens,
              "engine_starts": engine_starts}
    return pa.Table.from_pylist([counts])
