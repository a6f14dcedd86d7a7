"""Resuming a run: what an output already holds, and whether it was made by the same job.

A pair is done once a `scores/` file holding it is committed (an object upload completes, or a
local file is renamed into place); traces and labels are written first, so such a file without
its scores twin is an orphan of a killed run and is removed. A re-run skips every pair already in
`scores/` or `unscored/` and every input row already in `rejects/` (known by its row hash, as a
rejected row may have no usable ids), so nothing is scored or written twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa

from ..config import DEFAULT_FIT, GREEDY, RANK1_SCORER, CascadeConfig, JobConfig, JobError
from ..schema import ROW_HASH
from .compaction import DIRECTORIES, TWINS, finish_interrupted
from .key_index import DoneKeys, InputKeys, index_done
from .layout import DEATHS_DIR, JOB_FILE, LAYOUT, LEASE_FILE, MANIFEST
from .parallel_reads import in_parallel
from .storage import Listings, Output, staging_name

# Options that do not change what a run writes; anything else must match to resume. Prefix
# caching is not free: the label pass reads each answered pair's label from the prefix the main
# pass left in the cache, and a recomputed prefix may round differently.
_FREE_ENGINE = {"tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens"}
_FREE_RUN = {"output", "engines", "min_engines", "max_engines", "cpus_per_engine", "device", "batch_size",
             "ray_address", "s3_endpoint_url", "s3_profile", "overwrite", "verbose", "trec_run", "run_tag",
             "placement_timeout", "stall_timeout", "grace_period", "lease_timeout", "max_failed_share", "max_concurrent_batches", "store",
             "compact"}
# What an output made before an option existed ran with: it resumes as that, not as today's default.
_BEFORE_OPTION = {"engine": {"fit": "budget", "enable_prefix_caching": True, **GREEDY}, "scoring": RANK1_SCORER,
                  "cascade": dataclasses.asdict(CascadeConfig())}


class ConfigurationChanged(JobError):
    """The output was made with another job configuration."""


class NotAnOutput(JobError):
    """The output URL holds something rank1-batch did not write."""


def identity(job: JobConfig) -> dict:
    """The parts of a job configuration that decide its results."""
    described = job.to_dict()
    described["engine"] = {k: v for k, v in described["engine"].items() if k not in _FREE_ENGINE}
    described["run"] = {k: v for k, v in described["run"].items() if k not in _FREE_RUN}
    return described


def recorded_identity(output: Output) -> dict:
    """The identity in an output's `_job.json`, with options it predates filled in as they ran;
    NotAnOutput when it has none."""
    try:
        recorded = json.loads(output.fs.cat_file(output.path(JOB_FILE)))
    except FileNotFoundError:
        raise NotAnOutput(f"{output.url}: no {JOB_FILE}, so not a rank1-batch output") from None
    for part, defaults in _BEFORE_OPTION.items():
        recorded[part] = {**defaults, **recorded.get(part, {})}
    return recorded


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict) and key not in ("engine_args", "columns"):
            found += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            found.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return found


@dataclass(frozen=True)
class Done:
    """What an output already holds."""

    keys: DoneKeys  # (query_id, doc_id) of pairs scored, or set aside beyond the top k
    rejected_rows: pa.Array  # row_hash of input rows already in rejects/

    @property
    def pairs(self) -> int:
        return self.keys.rows + len(self.rejected_rows)


def with_fit_settled(output: Output, job: JobConfig) -> JobConfig:
    """The job with its fit policy named. A job that names none keeps the output's own when it
    resumes one (`budget` for an output made before the option existed, so that yesterday's
    command resumes yesterday's output), and gets the default otherwise."""
    if job.engine.fit is not None:
        return job
    resumes = not job.run.overwrite and output.exists(JOB_FILE)
    fit = recorded_identity(output)["engine"].get("fit", DEFAULT_FIT) if resumes else DEFAULT_FIT
    return dataclasses.replace(job, engine=dataclasses.replace(job.engine, fit=fit))


def check_output(output: Output, job: JobConfig) -> list[str]:
    """Refuse, before anything is written, an output this job may not use: one that holds
    something other than a rank1-batch output, or one made with another configuration (unless
    `overwrite`). Reads only; returns the names at the output's top level, but the lease."""
    entries = [name for name in output.entries() if name != LEASE_FILE]
    if not entries:
        return entries
    if JOB_FILE not in entries:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise NotAnOutput(
            f"{output.url} holds files that rank1-batch did not write ({shown}) and no {JOB_FILE}; "
            "nothing was changed: choose an empty or new --output"
        )
    if not job.run.overwrite:
        changed = differences(recorded_identity(output), identity(job))
        if changed:
            raise ConfigurationChanged(
                f"{output.url} was made with another job configuration ({'; '.join(changed)}); "
                "run with --overwrite to replace that run's outputs, or choose another --output"
            )
    return entries


def open_output(output: Output, job: JobConfig) -> Listings:
    """Claim a checked output for this job (the caller holds its lease), and leave in it only
    what a resume keeps. With `overwrite`, the previous run's outputs (the layout's paths,
    nothing else) are removed first. Returns the listings of its committed part files, which
    `done_in` reads: one round of listings serves every step, as only the lease's holder writes."""
    present = set(check_output(output, job))
    if job.run.overwrite:
        # with the hidden copy a killed write of a top-level file leaves (see `Output.write_bytes`)
        removed = [*LAYOUT, *(staging_name(name) for name in LAYOUT)]
    else:
        # errors/ holds pairs this run scores again, and engine deaths count within one run; a
        # finished run's manifest is rewritten at the end
        removed = [MANIFEST, "errors", DEATHS_DIR]
    in_parallel(output.remove, [name for name in removed if name in present])
    output.write_bytes(JOB_FILE, json.dumps(identity(job), indent=2, sort_keys=True).encode())
    listed = finish_interrupted(output, output.listings(*DIRECTORIES, *TWINS))
    _remove_orphans(output, listed)
    return listed


def done_in(output: Output, listed: Listings, inputs: InputKeys, num_cpus: float) -> Done:
    """What an opened output already holds, from its listings (see `open_output`). Rejected
    rows are few (the failed share bounds them), so the driver keeps them; the done keys stay in
    Ray's object store."""
    rejected = output.read("rejects", [ROW_HASH], pa.schema([(ROW_HASH, pa.uint64())]), listed["rejects"])
    return Done(index_done(output, listed, inputs, num_cpus), rejected[ROW_HASH].combine_chunks())


def _remove_orphans(output: Output, listed: Listings) -> None:
    """Trace and label files whose scores file was never committed: their pairs will be redone."""
    committed = {path.rsplit("/", 1)[-1] for path in listed["scores"]}
    in_parallel(output.fs.rm, [path for twin in TWINS for path in listed[twin]
                               if path.rsplit("/", 1)[-1] not in committed])
