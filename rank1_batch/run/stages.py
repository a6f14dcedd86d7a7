"""The per-batch stages of a run, each with one job; Ray Data calls them on its workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig, ScoringConfig, job_logging
from ..ir.agreement import grades
from ..model.encoding import EncodedPrompt, PromptTooLong
from ..model.engine_metrics import EngineTotals, read_totals
from ..model.judgement import OUTCOMES
from ..model.scorer_kinds import ScorerKind, scorer_kind
from ..output.checkpoint import Done
from ..output.outputs import commit_record
from ..output.parallel_reads import in_parallel
from ..output.storage import Output, content_name
from ..schema import (
    ERRORS_SCHEMA,
    REASON,
    ROW_HASH,
    SCORES_SCHEMA,
    SHARD_PATH,
    TRACES_SCHEMA,
    UNSCORED_SCHEMA,
    conform,
    count_values,
    relevance_labels,
    split_rejects,
    to_contract,
)
from ..store.score_store import JUDGEMENT, KEY_TYPE, ScoreStore, store_keys
from .drain import stop_if_lease_lost
from .engine_deaths import Death, EngineDeaths
from .engine_monitor import EngineMonitor
from .ranking import top_k_mask, with_first_stage

IDS = ("query_id", "doc_id", "first_stage_rank", "first_stage_score")
# The texts ride along to the writer, which needs them for relevance labels, and with the pair's
# store key (null without a store) to the score store.
PASSTHROUGH = (*IDS, "query", "instruction", "text", "store_key")
PROMPTS_SCHEMA = pa.schema(
    [
        *(SCORES_SCHEMA.field(name) for name in IDS),
        ("query", pa.string()),
        ("instruction", pa.string()),
        ("text", pa.string()),
        ("store_key", KEY_TYPE),
        # null for a pair set aside here (rejected, beyond the top k, or reused): it is only counted later
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
        ("passage_start", pa.int32()),  # see EncodedPrompt: null but for a cross-encoder with token types
    ]
)
# The prompts table's columns of an EncodedPrompt, by its fields.
ENCODED_COLUMNS = {"prompt_token_ids": "token_ids", "truncated": "truncated", "passage_start": "passage_start"}
# Scores with the reasoning, texts and store key beside them, as the score stage hands them to the writer.
SCORED_SCHEMA = pa.schema(
    [*SCORES_SCHEMA, TRACES_SCHEMA.field("reasoning"), *(PROMPTS_SCHEMA.field(name) for name in PASSTHROUGH[len(IDS):])]
)


@dataclass(frozen=True)
class Reuse:
    """A run's score store, the result identity its keys are made under, and the run's id."""

    store: ScoreStore
    result: dict
    run_id: str


log = logging.getLogger(__name__)
_scorers: dict[str, tuple[ScorerKind, object]] = {}


def scorer_of(job: JobConfig, encoder=None) -> tuple[ScorerKind, object]:
    """The job's kind of scorer and its pair encoder, once per worker process and configuration:
    loading a tokenizer costs more than a batch. A worker given the driver's `encoder` keeps it
    rather than loading one: unpickled, it imports only its tokenizer's own class, not the
    transformers auto classes that take seconds of a fresh worker's CPU, and needs no model files."""
    key = json.dumps([asdict(job.engine), asdict(job.scoring)], sort_keys=True)
    if key not in _scorers:
        kind = scorer_kind(job.engine, job.scoring)
        _scorers[key] = kind, kind.encoder() if encoder is None else encoder
    return _scorers[key]


def build_prompts(batch: pa.Table, job: JobConfig, output: Output, done: Done, duplicates: pa.Table | None,
                  reuse: Reuse | None, gate=None, first_stage: pa.Table | None = None, encoder=None) -> pa.Table:
    """Skip work already done, validate rows, keep the top k, build each prompt, and commit the
    pairs whose judgement is in the score store. A cascade's `first_stage` (the cross-encoder's
    ranking) replaces the input's first-stage rank and score, so the top k are of its order. Rows
    set aside (rejected, beyond the top k, or reused) are written here, while the run holds its
    output (asked of the `gate`), and pass on without a prompt, so the progress display can count
    them. `encoder` is the driver's (see `scorer_of`)."""
    pairs = to_contract(batch, job.run.columns)
    if first_stage is not None:
        pairs = with_first_stage(pairs, first_stage)
    pairs = pairs.filter(pc.invert(pc.is_in(pairs[ROW_HASH], done.rejected_rows)))
    pairs, rejects = split_rejects(pairs, duplicates)
    # only the done keys of this batch's input shards, not the whole output's
    pairs = pairs.join(done.keys.for_shards(batch[SHARD_PATH]), keys=["query_id", "doc_id"], join_type="left anti")
    reranked = top_k_mask(pairs["first_stage_rank"], job.run.top_k)
    tail, pairs = pairs.filter(pc.invert(reranked)), pairs.filter(reranked)

    encoded, too_long = _encode(scorer_of(job, encoder)[1], pairs)
    pairs = pairs.set_column(pairs.column_names.index(REASON), REASON, too_long)
    fits = pc.is_null(too_long)
    rejects = pa.concat_tables([rejects, pairs.filter(pc.invert(fits))])
    if gate is not None and (rejects.num_rows or tail.num_rows or reuse is not None):
        import ray

        stop_if_lease_lost(ray.get(gate.lease_lost.remote()))
    if rejects.num_rows:
        output.write_table("rejects", content_name(rejects[ROW_HASH]), rejects)
    if tail.num_rows:
        tail = tail.select(UNSCORED_SCHEMA.names)
        output.write_table("unscored", content_name(tail["query_id"], tail["doc_id"]), tail)

    for name, values in encoded.items():
        pairs = pairs.append_column(name, values)
    to_score = pairs.filter(fits)
    reused = pa.table({})
    if reuse is not None and to_score.num_rows:
        to_score, reused = reuse_stored(to_score, reuse, job, output)
    return pa.concat_tables([conform(rows, PROMPTS_SCHEMA) for rows in (to_score, rejects, tail, reused)])


def reuse_stored(to_score: pa.Table, reuse: Reuse, job: JobConfig, output: Output) -> tuple[pa.Table, pa.Table]:
    """Commit the pairs the store has judged, with this run's ids, threshold and grades, as a batch of
    their own; return the others with their store keys, and the reused ones."""
    keys = store_keys(reuse.result, to_score["prompt_token_ids"])
    to_score = to_score.append_column("store_key", keys)
    stored = reuse.store.lookup(to_score["query"], keys, to_score["instruction"])
    found = pc.is_in(keys, value_set=stored["key"])
    hits = to_score.filter(found)
    if hits.num_rows:
        judged = stored.take(pc.index_in(hits["store_key"], value_set=stored["key"]))
        scored = hits.select(PASSTHROUGH)
        for name in JUDGEMENT:
            scored = scored.append_column(name, judged[name])
        scored = (scorer_of(job)[0].stored_labels(scored)
                  .append_column("grade", grades(scored["score"], job.scoring.grades))
                  .append_column("reused", pa.array([True] * scored.num_rows)))
        name = content_name(hits["query_id"], hits["doc_id"])
        write_results(conform(scored, SCORED_SCHEMA), ERRORS_SCHEMA.empty_table(), name, job, output)
    log.info("score store: %d of %d pairs reused", hits.num_rows, to_score.num_rows)
    return to_score.filter(pc.invert(found)), hits.drop_columns(["prompt_token_ids"])


def _encode(encoder, pairs: pa.Table) -> tuple[dict[str, pa.Array], pa.Array]:
    """The columns of each pair's encoding (null where it cannot fit), and for those, the reason."""
    encoded, too_long = [], []
    for row in pairs.select(["query", "text", "title", "instruction"]).to_pylist():
        try:
            encoded.append(encoder.encode(row["query"], row["text"], row["title"], row["instruction"]))
            too_long.append(None)
        except PromptTooLong as error:
            encoded.append(None), too_long.append(str(error))
    columns = {column: pa.array([None if item is None else getattr(item, field) for item in encoded],
                                PROMPTS_SCHEMA.field(column).type)
               for column, field in ENCODED_COLUMNS.items()}
    return columns, pa.array(too_long, pa.string())


class EngineStartError(RuntimeError):
    """vLLM could not start; the message carries the engine's own error."""


class ScorePairs:
    """An actor holding one engine (vLLM's async engine): scores the prompts of each batch it is
    given and commits them. Ray Data gives it several batches at once (`max_concurrent_batches`),
    so the engine's free slots are filled from the next batches while a batch's last chains run.

    Committing here, batch by batch, makes each batch a commit of its own: a killed run loses at
    most the batches in flight. The writes run in a thread, off the engine's event loop. With a
    `gate` (the run's `drain.BatchGate` actor), a batch starts only while the run is not draining,
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
        await asyncio.to_thread(write_results, scored, errors, name, self.job, self.output)
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
        death names its pair. A pair named so is not sent again (see `engine_deaths`)."""
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
    scored = scored.append_column("grade", grades(scored["score"], scoring.grades))
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


def write_results(scored: pa.Table, errors: pa.Table, name: str, job: JobConfig, output: Output) -> None:
    """Commit a batch: traces and labels first, as a scores file marks its pairs done (and carries
    their counts in its footer); failed pairs go to errors/, which a re-run does not count as done.
    The writes before the scores file go out at once: on object storage each is a round trip."""
    if errors.num_rows:
        first = [lambda: output.write_table("errors", name, errors.cast(ERRORS_SCHEMA))]
    else:  # an earlier attempt of this batch may have failed where this one did not
        first = [lambda: output.remove_file(f"errors/{name}")]
    if scored.num_rows and job.run.write_traces and scorer_of(job)[0].reasons:
        first.append(lambda: output.write_table("traces", name, scored.select(TRACES_SCHEMA.names).cast(TRACES_SCHEMA)))
    if scored.num_rows and job.run.labels:
        first.append(lambda: output.write_table(
            "labels", name, relevance_labels(scored, job.engine.model, job.run.labels_answered_only)))
    in_parallel(lambda write: write(), first)
    if not scored.num_rows:
        return
    scores = scored.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)
    output.write_table("scores", name, scores, record=commit_record(scores))
