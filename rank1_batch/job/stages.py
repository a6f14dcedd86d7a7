"""The per-batch stages of a run, each with one job; Ray Data calls them on its workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig, job_logging
from .checkpoint import Done
from ..model.encoding import EncodedPrompt, PromptEncoder, PromptTooLong
from ..model.engine_metrics import EngineTotals, read_totals
from ..model.scorer import pair_score
from ..ir.ranking import top_k_mask
from ..model.judgement import OUTCOMES
from ..schema import (
    ERRORS_SCHEMA,
    REASON,
    ROW_HASH,
    SCORES_SCHEMA,
    TRACES_SCHEMA,
    UNSCORED_SCHEMA,
    conform,
    count_values,
    relevance_labels,
    split_rejects,
    to_contract,
)
from .storage import Output, content_name

IDS = ("query_id", "doc_id", "first_stage_rank", "first_stage_score")
# The texts ride along to the writer, which needs them for relevance labels.
PASSTHROUGH = (*IDS, "query", "text")
PROMPTS_SCHEMA = pa.schema(
    [
        *(SCORES_SCHEMA.field(name) for name in IDS),
        ("query", pa.string()),
        ("text", pa.string()),
        # null for a pair set aside here (rejected, or outside the top k): it is only counted later
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
    ]
)
# Scores with the reasoning and texts beside them, as the score stage hands them to the writer.
SCORED_SCHEMA = pa.schema(
    [*SCORES_SCHEMA, TRACES_SCHEMA.field("reasoning"), PROMPTS_SCHEMA.field("query"), PROMPTS_SCHEMA.field("text")]
)

log = logging.getLogger(__name__)
_encoders: dict[str, PromptEncoder] = {}


def _encoder(job: JobConfig) -> PromptEncoder:
    """One tokenizer per worker process and configuration: loading it costs more than a batch."""
    key = json.dumps([asdict(job.engine), asdict(job.scoring)], sort_keys=True)
    if key not in _encoders:
        _encoders[key] = PromptEncoder.for_model(job.engine, job.scoring)
    return _encoders[key]


def build_prompts(batch: pa.Table, job: JobConfig, output: Output, done: Done, duplicates: pa.Table | None) -> pa.Table:
    """Skip work already done, validate rows, keep the top k, and build each prompt. Rows set
    aside (rejected, or beyond the top k) are written here and pass on without a prompt, so the
    progress display can count them."""
    pairs = to_contract(batch, job.run.columns)
    pairs = pairs.filter(pc.invert(pc.is_in(pairs[ROW_HASH], done.rejected_rows)))
    pairs, rejects = split_rejects(pairs, duplicates)
    pairs = pairs.join(done.keys, keys=["query_id", "doc_id"], join_type="left anti")
    reranked = top_k_mask(pairs["first_stage_rank"], job.run.top_k)
    tail, pairs = pairs.filter(pc.invert(reranked)), pairs.filter(reranked)

    prompts, truncated, too_long = _encode(_encoder(job), pairs)
    pairs = pairs.set_column(pairs.column_names.index(REASON), REASON, too_long)
    fits = pc.is_null(too_long)
    rejects = pa.concat_tables([rejects, pairs.filter(pc.invert(fits))])
    if rejects.num_rows:
        output.write_table("rejects", content_name(rejects[ROW_HASH]), rejects)
    if tail.num_rows:
        tail = tail.select(UNSCORED_SCHEMA.names)
        output.write_table("unscored", content_name(tail["query_id"], tail["doc_id"]), tail)

    to_score = pairs.append_column("prompt_token_ids", prompts).append_column("truncated", truncated).filter(fits)
    return pa.concat_tables([conform(rows, PROMPTS_SCHEMA) for rows in (to_score, rejects, tail)])


def _encode(encoder: PromptEncoder, pairs: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Prompt token ids, truncation flags, and for prompts that cannot fit, the reason."""
    prompts, truncated, too_long = [], [], []
    for row in pairs.select(["query", "text", "title", "instruction"]).to_pylist():
        try:
            encoded = encoder.encode(row["query"], row["text"], row["title"], row["instruction"])
            prompts.append(encoded.token_ids), truncated.append(encoded.truncated), too_long.append(None)
        except PromptTooLong as error:
            prompts.append(None), truncated.append(None), too_long.append(str(error))
    return (
        pa.array(prompts, pa.list_(pa.int32())),
        pa.array(truncated, pa.bool_()),
        pa.array(too_long, pa.string()),
    )


class EngineStartError(RuntimeError):
    """vLLM could not start; the message carries the engine's own error."""


class ScorePairs:
    """An actor holding one engine (vLLM's async engine): scores the prompts of each batch it is
    given and commits them. Ray Data gives it several batches at once (`max_concurrent_batches`),
    so the engine's free slots are filled from the next batches while a batch's last chains run.

    Committing here, batch by batch, makes each batch a commit of its own: a killed run loses at
    most the batches in flight. The writes run in a thread, off the engine's event loop.
    """

    def __init__(self, job: JobConfig, output: Output):
        from ..model.engine import AsyncRank1Engine

        job_logging()
        self.job, self.output = job, output
        try:
            self.engine = AsyncRank1Engine(job.engine, _encoder(job))
        except Exception as error:
            raise EngineStartError(f"the engine could not start (model {job.engine.model}): {error}") from error
        self.engine_totals = read_totals()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.monotonic()
        prompts = batch.filter(pc.is_valid(batch["prompt_token_ids"]))
        encoded = [
            EncodedPrompt(ids, truncated)
            for ids, truncated in zip(prompts["prompt_token_ids"].to_pylist(), prompts["truncated"].to_pylist())
        ]
        generations = await asyncio.gather(*(self.engine.generate(item.token_ids) for item in encoded), return_exceptions=True)
        if any(isinstance(generation, BaseException) and is_engine_dead(generation) for generation in generations):
            # Ray restarts an actor whose process died and retries its batches on a new engine.
            log.error("the engine died; ending this actor so that Ray starts another")
            os._exit(1)
        scored, errors = score_table(prompts, encoded, generations, self.job.scoring.threshold)
        name = content_name(prompts["query_id"], prompts["doc_id"])  # the whole batch: a retry rewrites it
        await asyncio.to_thread(write_results, scored, errors, name, self.job, self.output)
        now = read_totals()
        engine, self.engine_totals = now - self.engine_totals, now
        counts = batch_counts(batch, scored, errors, engine)
        log.info("batch of %d pairs committed in %.1f s: %d reasoning tokens, %d errors", prompts.num_rows,
                 time.monotonic() - started, pc.sum(scored["reasoning_tokens"]).as_py() or 0, errors.num_rows)
        return counts


def is_engine_dead(error: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def score_table(prompts: pa.Table, encoded: list[EncodedPrompt], generations: list, threshold: float) -> tuple[pa.Table, pa.Table]:
    """Scored pairs with their reasoning and texts, and the pairs whose request failed, with the
    engine's message."""
    failed = pa.array([isinstance(generation, BaseException) for generation in generations], pa.bool_())
    results = [
        pair_score(generation, item, threshold).to_dict()
        for generation, item in zip(generations, encoded)
        if not isinstance(generation, BaseException)
    ]
    scored = prompts.filter(pc.invert(failed)).select(PASSTHROUGH)
    for field in SCORED_SCHEMA:
        if field.name not in PASSTHROUGH:
            scored = scored.append_column(field, pa.array([row[field.name] for row in results], field.type))
    messages = [f"{type(error).__name__}: {error}" for error in generations if isinstance(error, BaseException)]
    errors = prompts.filter(failed).select(["query_id", "doc_id"]).append_column("error", pa.array(messages, pa.string()))
    return conform(scored, SCORED_SCHEMA), errors


def batch_counts(batch: pa.Table, scored: pa.Table, errors: pa.Table, engine: EngineTotals) -> pa.Table:
    """What the driver counts of a committed batch: its pairs (set-aside ones included), outcomes
    and errors, and the engine's steps and generated tokens since the actor's previous batch."""
    counts = {"pairs": batch.num_rows, **dict.fromkeys(OUTCOMES, 0), **count_values(scored["outcome"]),
              "errors": errors.num_rows, "engine_steps": engine.steps, "generated_tokens": engine.generated_tokens}
    return pa.Table.from_pylist([counts])


def write_results(scored: pa.Table, errors: pa.Table, name: str, job: JobConfig, output: Output) -> None:
    """Commit a batch: traces and labels first, as a scores file marks its pairs done; failed
    pairs go to errors/, which a re-run does not count as done."""
    if errors.num_rows:
        output.write_table("errors", name, errors.cast(ERRORS_SCHEMA))
    elif output.exists(f"errors/{name}"):  # an earlier attempt of this batch failed where this one did not
        output.fs.rm(output.path("errors", name))
    if not scored.num_rows:
        return
    if job.run.write_traces:
        output.write_table("traces", name, scored.select(TRACES_SCHEMA.names).cast(TRACES_SCHEMA))
    if job.run.labels:
        output.write_table("labels", name, relevance_labels(scored, job.engine.model, job.run.labels_answered_only))
    output.write_table("scores", name, scored.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA))
