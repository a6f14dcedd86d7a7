"""Resuming a run: what an output already holds, and whether it was made by the same job.

A pair is done once a `scores/` file holding it is committed (an object upload completes, or a
local file is renamed into place); traces and labels are written first, so such a file without
its scores twin is an orphan of a killed run and is removed. A re-run skips every pair already in
`scores/` or `unscored/` and every input row already in `rejects/` (known by its row hash, as a
rejected row may have no usable ids), so nothing is scored or written twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from .config import JobConfig
from .outputs import MANIFEST
from .schema import ROW_HASH
from .storage import Output

JOB_FILE = "_job.json"
KEY_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string())])
# Options that do not change what a run writes; anything else must match to resume.
_FREE_ENGINE = {"tensor_parallel_size", "gpu_memory_utilization", "enable_prefix_caching"}
_FREE_RUN = {"output", "engines", "min_engines", "max_engines", "cpus_per_engine", "device", "batch_size",
             "ray_address", "s3_endpoint_url", "s3_profile", "overwrite", "verbose", "trec_run", "run_tag"}


class ConfigurationChanged(ValueError):
    """The output was made with another job configuration."""


def identity(job: JobConfig) -> dict:
    """The parts of a job configuration that decide its results."""
    described = job.to_dict()
    described["engine"] = {k: v for k, v in described["engine"].items() if k not in _FREE_ENGINE}
    described["run"] = {k: v for k, v in described["run"].items() if k not in _FREE_RUN}
    return described


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

    keys: pa.Table  # (query_id, doc_id) of pairs scored, or set aside beyond the top k
    rejected_rows: pa.Array  # row_hash of input rows already in rejects/


def open_output(output: Output, job: JobConfig) -> Done:
    """Claim the output for this job and return what it already holds.

    An output made with another configuration is refused unless `overwrite` is set, in which
    case it is emptied first.
    """
    if output.fs.exists(output.root) and output.fs.ls(output.root):
        if job.run.overwrite:
            output.fs.rm(output.root, recursive=True)
        elif not output.exists(JOB_FILE):
            raise ConfigurationChanged(f"{output.url} is not empty and was not made by rank1-batch; use --overwrite")
        else:
            changed = differences(json.loads(output.fs.cat_file(output.path(JOB_FILE))), identity(job))
            if changed:
                raise ConfigurationChanged(
                    f"{output.url} was made with another job configuration ({'; '.join(changed)}); "
                    "run with --overwrite to replace it, or choose another --output"
                )
    if output.exists(MANIFEST):
        output.fs.rm(output.path(MANIFEST))
    output.write_bytes(JOB_FILE, json.dumps(identity(job), indent=2, sort_keys=True).encode())
    _remove_orphans(output)
    keys = [output.read(directory, KEY_SCHEMA.names, KEY_SCHEMA) for directory in ("scores", "unscored")]
    rejected = output.read("rejects", [ROW_HASH], pa.schema([(ROW_HASH, pa.uint64())]))
    return Done(pa.concat_tables(keys), rejected[ROW_HASH].combine_chunks())


def _remove_orphans(output: Output) -> None:
    """Trace and label files whose scores file was never committed: their pairs will be redone."""
    committed = {path.rsplit("/", 1)[-1] for path in output.files("scores")}
    for path in output.files("traces") + output.files("labels"):
        if path.rsplit("/", 1)[-1] not in committed:
            output.fs.rm(path)
