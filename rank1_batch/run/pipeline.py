"""The whole flow of a run: read pairs, prepare prompts, score them on an actor pool, write.

    checks (inputs, output, model, resources; nothing written yet) -> lease on the output ->
    [a cascade's cross-encoder: a run of its own into OUTPUT/cascade/, its order Rank1's first stage] ->
    Parquet shards -> prepare (validate, top-k, prompt; set-aside rows written) -> score (one
    vLLM engine per actor; each batch committed to traces/ and scores/) -> ranked/, run.trec
    -> _manifest.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter

import pyarrow as pa
from tqdm import tqdm

from ..cluster.connection import connect, is_own_cluster
from ..cluster.resources import (
    PREPARE_CPUS,
    actor_pool_size,
    check_placement,
    engine_overrides,
    engine_resources,
    uses_gpus,
)
from ..config import JobConfig, JobError, RunConfig
from ..model.engine_metrics import EngineFigures
from ..model.judgement import OUTCOMES
from ..output.checkpoint import Done, check_output, done_in, open_output, with_fit_settled
from ..output.compaction import compact
from ..output.key_index import KEY_SCHEMA, index_inputs, key_columns
from ..output.lease import Lease, OutputInUse
from ..output.outputs import MANIFEST, ThisRun, write_manifest, write_ranked_outputs
from ..output.parallel_reads import in_parallel
from ..output.storage import Output, Shard, arrow_filesystem, list_input_files, read_footer, url_of
from ..schema import ROW_HASH, SHARD_PATH, InputError, missing_columns, source_columns, to_contract
from ..store.score_store import ScoreStore, model_fingerprint, result_identity
from . import cascade, stages
from .drain import Preempted, sigterm_requests_drain, start_gate, stop_if_lease_lost

log = logging.getLogger(__name__)


class Stalled(JobError):
    """No batch was committed within the stall limit."""


# How often the driver looks up from waiting for commits (for SIGTERM and the stall limit).
POLL_SECONDS = 1.0
NOTHING = object()  # no commit arrived within a poll


def inspect_inputs(job: JobConfig) -> tuple[object, list[Shard]]:
    """Every input file's footer, checked against the contract before any engine starts."""
    fs, files = list_input_files(job.run)
    shards = in_parallel(lambda path: read_footer(fs, path), files)
    for shard in shards:
        missing = missing_columns(shard.columns, job.run.columns)
        if missing:
            raise InputError(f"{url_of(fs, shard.path)}: missing required column(s) {', '.join(missing)}")
        if SHARD_PATH in source_columns(shard.columns, job.run.columns):
            raise InputError(f"{url_of(fs, shard.path)}: the column {SHARD_PATH!r} cannot be read, as Ray Data "
                             "gives that name to each row's file; rename it in the input and map it with --columns")
    return fs, shards


def run(job: JobConfig, show_progress: bool = True) -> dict:
    """Run the job to the end and return its manifest. A re-run into the same output resumes.

    Everything that can refuse the job is checked before the output is touched, so a refused
    re-run leaves a finished run's results as they were."""
    started = time.monotonic()
    fs, shards = inspect_inputs(job)
    output = Output(job.run.output, job.run)
    job = with_fit_settled(output, job)
    check_output(output, job)
    stages.scorer_of(job)  # the model's tokenizer and the context budget; a model the scorer cannot serve is refused
    if job.cascade.model:
        stages.scorer_of(cascade.cross_encoder_job(job))
    store = ScoreStore.open(job.run.store, job.run, create=True) if job.run.store else None
    result = result_identity(job, model_fingerprint(job.engine)) if store else None
    connect(job)
    gpus = place_engines(job)

    with Lease(output, job.run.lease_timeout) as lease, store.writing(lease.holder.run_id) if store else contextlib.nullcontext():
        reuse = stages.Reuse(store, result, lease.holder.run_id) if store else None
        listed = open_output(output, job)
        first_stage, cross_encoder = run_cross_encoder(job, show_progress) if job.cascade.model else (None, None)
        inputs = index_inputs(fs, shards, job.run.columns, PREPARE_CPUS)
        done = done_in(output, listed, inputs, PREPARE_CPUS)
        duplicates = find_duplicates(fs, shards, job, inputs.repeated)
        gate = start_gate(output, lease.holder.run_id, job.run.lease_timeout)
        batches = committed_batches(read(fs, shards, job), job, output, done, duplicates, reuse, gpus, gate,
                                    first_stage)
        input_rows = sum(shard.rows for shard in shards)
        to_do = input_rows - done.pairs
        this_run = follow(batches, to_do, show_progress, job.run, gate, lease.heartbeat.lost) if to_do > 0 else ThisRun()
        if job.run.compact:
            lease.ensure_held("compacted files")
            compact(output, PREPARE_CPUS)

        lease.ensure_held("ranked/ and run.trec")
        counts = write_ranked_outputs(output, job, input_rows, PREPARE_CPUS)
        lease.ensure_held(MANIFEST)
        return write_manifest(output, job, counts, this_run, time.monotonic() - started, cross_encoder)


def run_cross_encoder(job: JobConfig, show_progress: bool) -> tuple[pa.Table, dict]:
    """A cascade's first run, to the end (see `cascade`): its ranking, Rank1's first stage, and
    what the Rank1 run's manifest records of it."""
    log.info("cascade: the cross-encoder %s scores the candidates first, into %s", job.cascade.model,
             cascade.cascade_url(job))
    manifest = run(cascade.cross_encoder_job(job), show_progress)
    return cascade.cross_encoder_ranking(job), cascade.stage_summary(manifest)


def place_engines(job: JobConfig) -> bool:
    """Whether the engines use GPUs, once it is known that the cluster can hold them."""
    import ray

    gpus = uses_gpus(job.run.device, ray.cluster_resources().get("GPU", 0))
    check_placement(job.run, job.engine.tensor_parallel_size, gpus, is_own_cluster(job.run))
    return gpus


def read(fs, shards: list[Shard], job: JobConfig, keys_only: bool = False):
    """A streaming read of the input shards, each row with its hash and its shard's path, of the
    columns the contract needs (or only the two key columns). Shards are read in groups of equal
    columns and types, so an optional column that only some shards have is kept where it exists,
    and shards may disagree on a column's type (integer or string ids): each block is cast to the
    contract later."""
    import ray

    groups: dict[tuple[str, ...], list[str]] = {}
    for shard in shards:
        columns = key_columns(job.run.columns) if keys_only else source_columns(shard.columns, job.run.columns)
        signature = tuple((name, str(shard.schema.field(name).type)) for name in columns)
        groups.setdefault(signature, []).append(shard.path)
    datasets = []
    for signature, paths in groups.items():
        with footer_readers_for(len(paths)):
            dataset = ray.data.read_parquet(paths, filesystem=arrow_filesystem(fs), file_extensions=None,
                                            include_row_hash=True, include_paths=True)
        datasets.append(dataset.select_columns([*(name for name, _ in signature), ROW_HASH, SHARD_PATH]))
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


# Ray Data 2.60 reads each Parquet footer again, on a pool of FooterReader actors of a fixed size (32
# unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise) however few the files, and each actor is
# a Python process to start: on 2 cores, a run of a few shards spent about a third of its CPU time
# starting them. The pool is read from the variable when `read_parquet` is called, on the driver.
FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_READ = 10  # Ray Data's own batch of files per footer-reading call
MOST_FOOTER_READERS = 32


@contextlib.contextmanager
def footer_readers_for(files: int):
    """One footer-reading actor per batch of files that Ray Data hands one, unless the user set the
    pool's size."""
    if FOOTER_READERS in os.environ:
        yield
        return
    os.environ[FOOTER_READERS] = str(min(MOST_FOOTER_READERS, -(-files // FILES_PER_FOOTER_READ)))
    try:
        yield
    finally:
        del os.environ[FOOTER_READERS]


def committed_batches(pairs, job: JobConfig, output: Output, done: Done, duplicates: pa.Table | None,
                      reuse: stages.Reuse | None, gpus: bool, gate, first_stage: pa.Table | None = None):
    """The dataset of committed batches' counts: prepare (CPU tasks) -> score and commit each
    batch (actor pool, one engine each), each batch started only while the `gate` lets it."""
    import ray

    # The placement a multi-GPU engine gets needs matching engine arguments; the user's win.
    engine = dataclasses.replace(
        job.engine, engine_args={**engine_overrides(job.engine.tensor_parallel_size, gpus), **job.engine.engine_args}
    )

    prompts = pairs.map_batches(
        stages.build_prompts,
        fn_kwargs={"job": job, "output": output, "done": done, "duplicates": duplicates, "reuse": reuse,
                   "gate": gate, "first_stage": first_stage, "encoder": stages.scorer_of(job)[1]},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=PREPARE_CPUS,
    )
    # One block per engine call (a streaming split, not a shuffle): blocks spread over all the
    # engines, and each batch's counts reach the driver as soon as it is committed.
    prompts = prompts.repartition(target_num_rows_per_block=job.run.batch_size)
    # As Ray's own vLLM stage: the actor runs this many batches at once on its event loop, and
    # Ray Data keeps that many more queued so that a finished batch is replaced at once.
    in_flight = job.run.max_concurrent_batches
    return prompts.map_batches(
        stages.ScorePairs,
        fn_constructor_kwargs={"job": dataclasses.replace(job, engine=engine), "output": output, "reuse": reuse,
                               "gate": gate},
        compute=ray.data.ActorPoolStrategy(**actor_pool_size(job.run), max_concurrent_calls_per_actor=in_flight,
                                           max_tasks_in_flight_per_actor=2 * in_flight),
        batch_size=job.run.batch_size,
        batch_format="pyarrow",
        **engine_resources(job.engine.tensor_parallel_size, job.run.cpus_per_engine, gpus),
    )


def find_duplicates(fs, shards: list[Shard], job: JobConfig, repeated: pa.Table) -> pa.Table | None:
    """Each (query_id, doc_id) that occurs more than once, with the row to keep: the one with the
    lowest row hash, which is the same on every read, so a re-run keeps the same row.

    `repeated` (found by `key_index.index_inputs`) are rare, so only when there are some is the
    input read again through Ray Data, for the row hashes that tell the repeated rows apart.
    """
    if not repeated.num_rows:
        return None
    occurrences = read(fs, shards, job, keys_only=True).map_batches(
        occurrences_of, fn_kwargs={"columns": job.run.columns, "repeated": repeated}, batch_format="pyarrow",
        batch_size=None, num_cpus=PREPARE_CPUS)
    table = pa.concat_tables([KEY_SCHEMA.empty_table().append_column(ROW_HASH, pa.array([], pa.uint64())),
                              *occurrences.iter_batches(batch_format="pyarrow", batch_size=None)])
    counted = table.group_by(["query_id", "doc_id"]).aggregate([(ROW_HASH, "min")])
    return counted.select(["query_id", "doc_id", f"{ROW_HASH}_min"]).rename_columns(["query_id", "doc_id", "keep_row_hash"])


def occurrences_of(batch: pa.Table, columns: dict[str, str], repeated: pa.Table) -> pa.Table:
    """The rows of a batch whose key is one of the `repeated`, with their row hashes."""
    keys = to_contract(batch, columns).select(["query_id", "doc_id", ROW_HASH])
    return keys.join(repeated, keys=["query_id", "doc_id"], join_type="left semi")


def follow(committed, total: int, show_progress: bool, run: RunConfig, gate, lease_lost: threading.Event) -> ThisRun:
    """Drive the dataset to the end, showing pairs done and outcomes as batches are committed;
    return what this run scored and its engines did. No commit for `run.stall_timeout` seconds
    fails the run, as does the loss of its lease (`lease_lost`: another run took the output over).
    SIGTERM drains it: no batch starts after it, and the run stops once the batches in flight are
    committed or `run.grace_period` has passed."""
    import ray

    commits: queue.Queue = queue.Queue()

    def drain():
        try:
            for batch in committed.iter_batches(batch_format="pyarrow", batch_size=None):
                commits.put(batch)
            commits.put(None)
        except BaseException as error:  # handed to the driver's thread, which raises it
            commits.put(error)

    threading.Thread(target=drain, name="commits", daemon=True).start()
    outcomes = dict.fromkeys(OUTCOMES, 0)
    scored = steps = generated = engine_starts = 0
    started = last_commit = time.monotonic()
    stop, drain_ends = threading.Event(), None
    with (sigterm_requests_drain(stop),
          tqdm(total=total, unit="pair", desc="scoring", disable=not show_progress, dynamic_ncols=True) as bar):
        while True:
            try:
                batch = commits.get(timeout=POLL_SECONDS)
            except queue.Empty:
                batch = NOTHING
            now = time.monotonic()
            if lease_lost.is_set():
                raise OutputInUse(f"another run took over {run.output} after {bar.n} of {total} pairs (this run's "
                                  f"heartbeat was not renewed for --lease-timeout {run.lease_timeout:g} s); "
                                  "this run stops, and what it committed is kept")
            if stop.is_set() and drain_ends is None:
                drain_ends = now + run.grace_period
                log.warning("SIGTERM: starting no more batches; waiting up to %g s (--grace-period) for the %d "
                            "batch(es) in flight to commit", run.grace_period, ray.get(gate.drain.remote()))
            elif drain_ends is not None:
                held = ray.get(gate.held.remote())
                if held == 0 or now > drain_ends:
                    raise Preempted(preempted_message(bar.n, total, held, run.grace_period))
            if batch is NOTHING:
                if now - last_commit > run.stall_timeout:
                    raise Stalled(stall_message(run.stall_timeout, bar.n, total, engine_actor_states(),
                                                ray.get(gate.held.remote())))
                continue
            last_commit = now
            if batch is None:
                if drain_ends is not None:  # every batch left was turned away: the run is not finished
                    raise Preempted(preempted_message(bar.n, total, 0, run.grace_period))
                break
            if isinstance(batch, BaseException):
                # Ray Data reports a stage's error without its cause: a lost lease is named here
                stop_if_lease_lost(ray.get(gate.lease_lost.remote()))
                raise batch
            for row in batch.to_pylist():
                bar.update(row["pairs"])
                for outcome in outcomes:
                    outcomes[outcome] += row[outcome]
                scored += row["scored"]
                steps, generated = steps + row["engine_steps"], generated + row["generated_tokens"]
                engine_starts += row["engine_starts"]
                bar.set_postfix(outcomes, refresh=False)
    return ThisRun(scored, EngineFigures.from_counts(steps, generated, time.monotonic() - started),
                   engine_starts)


def preempted_message(done: int, total: int, dropped: int, grace_period: float) -> str:
    dropped_text = (f"{dropped} batch(es) still in flight after --grace-period {grace_period:g} s were dropped"
                    if dropped else "every batch in flight was committed")
    return (f"stopped by SIGTERM after {done} of {total} pairs: {dropped_text}; committed outputs are kept, "
            "and a re-run resumes")


def stall_message(seconds: float, done: int, total: int, states: Counter, in_flight: int) -> str:
    """What holds the work when nothing is committed, from the states of this job's engine actors
    (see `engine_actor_states`) and the number of batches they hold (`in_flight`)."""
    alive, starting = states.get("ALIVE", 0), states.get("PENDING_CREATION", 0) + states.get("RESTARTING", 0)
    if starting:
        stage = f"{starting} engine actor(s) still starting, {alive} ready"
    elif alive and in_flight:
        stage = (f"{alive} engine actor(s) scoring {in_flight} batch(es), none finished in time (an engine still "
                 "loading its model, which it does with its first pair to judge; a batch too slow; or a hung engine)")
    elif alive:
        stage = (f"{alive} engine actor(s) ready and given no batch: the prepare stage (reading the input, building "
                 "prompts) has not produced one in time")
    else:
        stage = "no engine actor has been placed (the cluster may lack the resources the pool asks for)"
    first = "its first batch" if done == 0 else "a batch since"
    return (f"no batch committed for {seconds:g} s (--stall-timeout) after {done} of {total} pairs: the score "
            f"stage has not committed {first}: {stage}; committed outputs are kept, and a re-run resumes")


def engine_actor_states() -> Counter:
    """How many of this job's engine actors are in each state, from the cluster's actor table."""
    import ray
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    engines = [actor for actor in actors().values()
               if actor["JobID"] == job and stages.ScorePairs.__name__ in actor["ActorClassName"]]
    return Counter(actor["State"] for actor in engines)
