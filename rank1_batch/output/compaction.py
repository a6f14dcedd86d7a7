"""Coalescing a finished run's part files (`--compact`). One file per batch is what lets a killed
run resume, but a night of ten million pairs leaves tens of thousands of them on object storage.

Files are merged in groups of about `TARGET_BYTES`, each into a file named from the names it
replaces. A group of scores/ files is merged with its traces/ and labels/ twins: the twins' merged
files are written first and the scores file last, as for a batch, so the scores file is the
commit; its footer lists the files it replaces, and only then are they removed. A kill therefore
leaves either the old files (perhaps beside merged twins without their scores file, which a
resume removes as orphans), or a committed merged file beside some of the files it replaces,
which `finish_interrupted` removes before anything reads the output. unscored/ and rejects/ are
merged the same way, alone. A finished output never holds a pair twice: its manifest is written
after the compaction.
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from .commits import commit_record
from .parallel_reads import in_parallel
from .storage import Listings, Output, record_of

COMPACTED_PREFIX = "compact-"
# Merged files of about this size: large enough that listing and opening them is cheap, small
# enough for one task's memory.
TARGET_BYTES = 256 * 2**20
TWINS = ("traces", "labels")
DIRECTORIES = ("scores", "unscored", "rejects")

log = logging.getLogger(__name__)


def compacted_name(names: list[str]) -> str:
    return f"{COMPACTED_PREFIX}{hashlib.sha256(' '.join(sorted(names)).encode()).hexdigest()[:32]}.parquet"


def groups(sizes: dict[str, int], target: int = TARGET_BYTES) -> list[list[str]]:
    """Consecutive files (by name) gathered until a group reaches `target` bytes; a file that
    would be alone in its group stays as it is."""
    found, group, total = [], [], 0
    for name in sorted(sizes):
        group.append(name)
        total += sizes[name]
        if total >= target:
            found.append(group)
            group, total = [], 0
    found.append(group)
    return [group for group in found if len(group) > 1]


def _read(output: Output, directory: str, sizes: dict[str, int]) -> pa.Table:
    """The files of a directory named in `sizes` (with their sizes) as one table."""
    def read(name: str) -> pa.Table:
        with output.open_part(output.path(directory, name), sizes[name]) as handle:
            return pq.read_table(handle, use_threads=False).replace_schema_metadata(None)

    tables = in_parallel(read, list(sizes))
    # files written before a column was added to the layout lack it: nulls there
    return pa.concat_tables(tables, promote_options="default")


def merge(output: Output, directory: str, group: dict[str, int], twins: dict[str, dict[str, int]]) -> None:
    """Merge one group (its files' names and sizes): its twins' files first (`twins`: those each
    twin directory holds), the commit next, then remove what it replaces."""
    names = list(group)
    merged = compacted_name(names)
    for twin, present in twins.items():
        if present:
            output.write_table(twin, merged, _read(output, twin, present))
    table = _read(output, directory, group)
    record = commit_record(table) if directory == "scores" else {}
    output.write_table(directory, merged, table, record={**record, "replaces": names})
    _remove(output, [*twins, directory], names)


def _remove(output: Output, directories: list[str], names: list[str]) -> None:
    """The replaced files, in the order of `directories`: twins before the scores file that marks
    them as committed."""
    for directory in directories:
        in_parallel(output.remove_file, [f"{directory}/{name}" for name in names])


def finish_interrupted(output: Output, listed: Listings) -> Listings:
    """Remove the files that a committed merged file replaces, where a kill left them behind;
    return the output's listings (`listed`, of `DIRECTORIES` and `TWINS` at least) without them."""
    removed: dict[str, set[str]] = {directory: set() for directory in listed}
    for directory in DIRECTORIES:
        for path, size in listed[directory].items():
            if path.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX):
                with output.open_part(path, size) as handle:
                    replaced = record_of(pq.ParquetFile(handle))["replaces"]
                directories = [*(TWINS if directory == "scores" else ()), directory]
                _remove(output, directories, replaced)
                for each in directories:
                    removed[each].update(replaced)
    return {directory: {path: size for path, size in files.items() if path.rsplit("/", 1)[-1] not in removed[directory]}
            for directory, files in listed.items()}


def compact(output: Output, merge_cpus: float) -> dict[str, tuple[int, int]]:
    """Merge every directory's small files, each group in a Ray task of its own; returns the
    number of files before and after, per directory. An earlier compaction that a kill
    interrupted was finished when the run opened the output (`checkpoint.open_output`)."""
    import ray

    listed = [*DIRECTORIES, *TWINS]
    sizes = dict(zip(listed, in_parallel(output.sizes, listed)))
    # a scores file weighs with its twins, which it is merged with (traces are most of the bytes)
    weights = {name: size + sum(sizes[twin].get(name, 0) for twin in TWINS) for name, size in sizes["scores"].items()}
    planned = {directory: groups(weights if directory == "scores" else sizes[directory]) for directory in DIRECTORIES}

    def twins_of(directory: str, group: list[str]) -> dict[str, dict[str, int]]:
        if directory != "scores":
            return {}
        return {twin: {name: sizes[twin][name] for name in group if name in sizes[twin]} for twin in TWINS}

    task = ray.remote(num_cpus=merge_cpus)(merge)
    ray.get([task.remote(output, directory, {name: sizes[directory][name] for name in group},
                         twins_of(directory, group))
             for directory, found in planned.items() for group in found])
    counts = {directory: (len(sizes[directory]), len(sizes[directory]) - sum(len(group) - 1 for group in found))
              for directory, found in planned.items()}
    log.info("compacted: %s", ", ".join(f"{d} {before} -> {after} files" for d, (before, after) in counts.items()))
    return counts
