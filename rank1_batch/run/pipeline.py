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
import time

import pyarrow as pa

from ..cluster.connection import connect, is_own_cluster
from ..cluster.resources import (
    PREPARE_CPUS,
    actor_pool_size,
    check_placement,
    engine_overrides,
    engine_resources,
    uses_gpus,
)
from ..config import JobConfig
from ..output.checkpoint import Done, check_output, done_in, open_output, with_fit_settled
from ..output.compaction import compact
from ..output.key_index import index_inputs
from ..output.layout import MANIFEST
from ..output.lease import Lease
from ..output.storage import Output
from ..store.keys import model_fingerprint, result_identity
from ..store.score_store import ScoreStore
from . import cascade, prompts, scoring
from .finish import ThisRun, write_manifest, write_ranked_outputs
from .follow import follow, start_gate
from .inputs import find_duplicates, inspect_inputs, read

log = logging.getLogger(__name__)


def run(job: JobConfig, show_progress: bool = True) -> dict:
    """Run the job to the end and return its manifest. A re-run into the same output resumes.

    Everything that can refuse the job is checked before the output is touched, so a refused
    re-run leaves a finished run's results as they were."""
    started = time.monotonic()
    fs, shards = inspect_inputs(job)
    output = Output(job.run.output, job.run)
    job = with_fit_settled(output, job)
    check_output(output, job)
    prompts.scorer_of(job)  # the model's tokenizer and the context budget; a model the scorer cannot serve is refused
    if job.cascade.model:
        prompts.scorer_of(cascade.cross_encoder_job(job))
    store = ScoreStore.open(job.run.store, job.run, create=True) if job.run.store else None
    result = result_identity(job, model_fingerprint(job.engine)) if store else None
    connect(job)
    gpus = place_engines(job)

    with Lease(output, job.run.lease_timeout) as lease, store.writing(lease.holder.run_id) if store else contextlib.nullcontext():
        reuse = prompts.Reuse(store, result, lease.holder.run_id) if store else None
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


def committed_batches(pairs, job: JobConfig, output: Output, done: Done, duplicates: pa.Table | None,
                      reuse: prompts.Reuse | None, gpus: bool, gate, first_stage: pa.Table | None = None):
    """The dataset of committed batches' counts: prepare (CPU tasks) -> score and commit each
    batch (actor pool, one engine each), each batch started only while the `gate` lets it."""
    import ray

    # The placement a multi-GPU engine gets needs matching engine arguments; the user's win.
    engine = dataclasses.replace(
        job.engine, engine_args={**engine_overrides(job.engine.tensor_parallel_size, gpus), **job.engine.engine_args}
    )

    prepared = pairs.map_batches(
        prompts.build_prompts,
        fn_kwargs={"job": job, "output": output, "done": done, "duplicates": duplicates, "reuse": reuse,
                   "gate": gate, "first_stage": first_stage, "encoder": prompts.scorer_of(job)[1]},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=PREPARE_CPUS,
    )
    # One block per engine call (a streaming split, not a shuffle): blocks spread over all the
    # engines, and each batch's counts reach the driver as soon as it is committed.
    prepared = prepared.repartition(target_num_rows_per_block=job.run.batch_size)
    # As Ray's own vLLM stage: the actor runs this many batches at once on its event loop, and
    # Ray Data keeps that many more queued so that a finished batch is replaced at once.
    in_flight = job.run.max_concurrent_batches
    return prepared.map_batches(
        scoring.ScorePairs,
        fn_constructor_kwargs={"job": dataclasses.replace(job, engine=engine), "output": output, "reuse": reuse,
                               "gate": gate},
        compute=ray.data.ActorPoolStrategy(**actor_pool_size(job.run), max_concurrent_calls_per_actor=in_flight,
                                           max_tasks_in_flight_per_actor=2 * in_flight),
        batch_size=job.run.batch_size,
        batch_format="pyarrow",
        **engine_resources(job.engine.tensor_parallel_size, job.run.cpus_per_engine, gpus),
    )
