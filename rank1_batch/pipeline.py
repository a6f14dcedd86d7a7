"""The whole flow of a run: read pairs, prepare prompts, score them on an actor pool, write.

    Parquet shards -> prepare (validate, top-k, prompt; set-aside rows written) -> score (one
    vLLM engine per actor) -> write scores/ and traces/ -> ranked/, run.trec -> _manifest.json
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from . import stages
from .checkpoint import open_output
from .config import JobConfig
from .outputs import counts, trec_run, write_manifest, write_ranked
from .resources import actor_pool_size, engine_resources, uses_gpus
from .schema import InputError, missing_columns, source_columns
from .storage import Output, Shard, list_input_files, read_footer, url_of

# Building prompts is light next to generation, and writing waits on storage: neither needs a
# whole core. A request unlike the engine actors' also keeps Ray from fusing prompt building
# into them, where it would hold up the engine.
PREPARE_CPUS = 0.5
WRITE_CPUS = 0.25


def inspect_inputs(job: JobConfig) -> tuple[object, list[Shard]]:
    """Every input file's footer, checked against the contract before any engine starts."""
    fs, files = list_input_files(job.run)
    with ThreadPoolExecutor(max_workers=16) as pool:
        shards = list(pool.map(lambda path: read_footer(fs, path), files))
    for shard in shards:
        missing = missing_columns(shard.columns, job.run.columns)
        if missing:
            raise InputError(f"{url_of(fs, shard.path)}: missing required column(s) {', '.join(missing)}")
    return fs, shards


def connect(job: JobConfig) -> None:
    """Join the cluster named by --ray-address (or RAY_ADDRESS), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=job.run.ray_address, include_dashboard=False, log_to_driver=job.run.verbose)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = job.run.verbose


def run(job: JobConfig, show_progress: bool = True) -> dict:
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    started = time.monotonic()
    fs, shards = inspect_inputs(job)
    output = Output(job.run.output, job.run)
    done = open_output(output, job)
    connect(job)
    columns = set.intersection(*(set(source_columns(shard.columns, job.run.columns)) for shard in shards))

    pairs = ray.data.read_parquet(
        [shard.path for shard in shards],
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        columns=sorted(columns),
        file_extensions=None,
    )
    prompts = pairs.map_batches(
        stages.prepare, fn_kwargs={"job": job, "output": output, "done": done},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=PREPARE_CPUS,
    )
    scored = prompts.map_batches(
        stages.ScorePairs,
        fn_constructor_kwargs={"job": job},
        compute=ray.data.ActorPoolStrategy(**actor_pool_size(job.run)),
        batch_size=job.run.batch_size,
        batch_format="pyarrow",
        **engine_resources(
            job.engine.tensor_parallel_size,
            job.run.cpus_per_engine,
            uses_gpus(job.run.device, ray.cluster_resources().get("GPU", 0)),
        ),
    )
    written = scored.map_batches(
        stages.write_results,
        fn_kwargs={"job": job, "output": output},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=WRITE_CPUS,
    )
    to_do = sum(shard.rows for shard in shards) - done.num_rows
    scored_now = follow(written, to_do, show_progress) if to_do > 0 else 0

    ranked = write_ranked(output)
    if job.run.trec_run:
        output.write_bytes("run.trec", trec_run(ranked, job.run.run_tag).encode())
    run_counts = counts(output, sum(shard.rows for shard in shards))
    return write_manifest(output, job, run_counts, scored_now, time.monotonic() - started)


def follow(written, total: int, show_progress: bool) -> int:
    """Drive the dataset to the end, showing pairs done and outcomes as batches are written;
    return how many pairs were scored."""
    outcomes = dict.fromkeys(stages.OUTCOMES, 0)
    with tqdm(total=total, unit="pair", desc="scoring", disable=not show_progress, dynamic_ncols=True) as bar:
        for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                bar.update(row["pairs"])
                for outcome in outcomes:
                    outcomes[outcome] += row[outcome]
                bar.set_postfix(outcomes, refresh=False)
    return sum(outcomes.values())
