"""The score store: judgements kept across runs, so that a pair judged once is not generated again.

A store is a Parquet dataset behind any fsspec URL (a local path, `s3://`, ...), read and written
through `Output` like a run's output. It holds one row per judged pair, found by its key.

Each judgement is found by its key (see `keys`).

**Layout** under the store's URL:

    _store.json                        format, version, partition count, created_at
    _writers/<run_id>.json             a run adding rows: host, process, heartbeat (as a lease)
    part=NNNN/<run_id>-<uuid4>.parquet rows, NNNN = query_hash mod partitions, zero-padded

`query_hash` is the first 8 bytes of sha256 of the query as it goes into the prompt (the query
with its instruction appended, before the task template), so one query's candidates share a
partition. Each file is sorted by (query_hash, key) and written in row groups of
`ROW_GROUP_ROWS`, so a reader reads, of the partitions its queries map to, each file's footer and
only the row groups whose query_hash statistics may hold one of its queries.

**Writing** commits each file whole (`Output.write_table`: an object store shows an upload only
once it completes; a local file is written as `.NAME.tmp` and renamed), under a name no other
writer can choose, so writers running at once lose nothing. A killed local writer may leave a
`.NAME.tmp`, which readers do not list; `compact` removes it. A key may then be stored more than
once (two runs judged the same pair at once); a reader keeps the row judged first (earliest
`judged_at`, then `judged_by`, `score` and `reasoning`, so every reader keeps the same).

**Compaction** rewrites each partition of several files as one, sorted and without repeated
keys, committing the merged file before it removes the inputs. It is safe while no run writes;
it refuses to start while a writer's record under `_writers/` is live by the lease's rule.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import uuid
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import JobError, RunConfig
from ..output.lease import STALE_AFTER_SECONDS, Heartbeat, Holder, is_gone, new_holder, read_holder
from ..output.parallel_reads import in_parallel
from ..output.storage import Output, is_part_file
from ..schema import LABELS_SCHEMA, SCORES_SCHEMA, TRACES_SCHEMA, conform, count_values
from .keys import KEY_TYPE, key_array, query_hashes

FORMAT = "rank1-batch-score-store"
VERSION = 1
MARKER = "_store.json"
WRITERS = "_writers"
DEFAULT_PARTITIONS = 256
# A query's candidates (tens to hundreds of rows) span one or two groups of this size.
ROW_GROUP_ROWS = 1024
JUDGED_AT_TYPE = pa.timestamp("us", tz="UTC")
# What the store keeps of a judgement, and a reused pair takes back from it; each sample's score
# too, so that a reused pair's label and agreement follow the run's threshold.
JUDGEMENT = ("score", "logprob_true", "logprob_false", "outcome", "reasoning_tokens", "prompt_tokens", "truncated",
             "sample_scores", "reasoning")


STORE_SCHEMA = pa.schema(
    [
        ("key", KEY_TYPE),
        ("query_hash", pa.int64()),
        *(SCORES_SCHEMA.field(name) for name in JUDGEMENT[:-1]),
        TRACES_SCHEMA.field("reasoning"),
        LABELS_SCHEMA.field("model"),
        ("judged_at", JUDGED_AT_TYPE),
        ("judged_by", pa.string()),
    ]
)


# What `add` is given for each row; it derives query_hash from the query (and instruction).
# Without `sample_scores` (null, as in files written before the column) a row is one sample's.
ADD_COLUMNS = ("key", "query", *(name for name in STORE_SCHEMA.names if name not in
                                 ("key", "query_hash", "judged_at", "judged_by", "sample_scores")))


# Of two rows with one key, the first in this order is the one kept.
_EARLIEST_FIRST = [(name, "ascending") for name in ("key", "judged_at", "judged_by", "score", "reasoning")]
_FILE_ORDER = [("query_hash", "ascending"), ("key", "ascending")]
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A file compaction removes between a reader's listing and its read: list again, this often.
_READ_ATTEMPTS = 3
log = logging.getLogger(__name__)


class NotAScoreStore(JobError):
    """The URL holds no score store, something else, or a store of another format version."""


class StoreInUse(JobError):
    """A run is writing to the store."""


def _partition_dir(partition: int) -> str:
    return f"part={partition:04d}"


def _first_per_key(rows: pa.Table) -> pa.Table:
    """One row per key, the one judged first (ties broken by content, the same for every reader)."""
    rows = rows.sort_by(_EARLIEST_FIRST)
    if rows.num_rows < 2:
        return rows
    keys = rows["key"]
    changed = pc.not_equal(keys.slice(1), keys.slice(0, rows.num_rows - 1))
    return rows.filter(pa.concat_arrays([pa.array([True]), changed.combine_chunks()]))


def _parquet(handle) -> pq.ParquetFile:
    """A Parquet file on a Python file object, read with `use_threads=False` only: Arrow threads
    that read a Python file can outlive the read and abort the interpreter at exit."""
    return pq.ParquetFile(handle, pre_buffer=True)


def _row_groups_holding(metadata: pq.FileMetaData, hashes: np.ndarray) -> list[int]:
    """Row groups whose query_hash range holds one of the (sorted) hashes, and any group without
    statistics."""
    column = metadata.schema.names.index("query_hash")
    groups = []
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        if (statistics is None or not statistics.has_min_max
                or np.searchsorted(hashes, statistics.min, "left") < np.searchsorted(hashes, statistics.max, "right")):
            groups.append(group)
    return groups


def _timestamp(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class ScoreStore:
    """A score store at a URL. `ScoreStore.open` checks (or creates) it; see the module's docstring."""

    def __init__(self, url: str, run: RunConfig, marker: dict):
        self.output = Output(url, run)
        self.url = self.output.url
        self.marker = marker
        self.partitions = int(marker["partitions"])

    @classmethod
    def open(cls, url: str, run: RunConfig | None = None, create: bool = False,
             partitions: int = DEFAULT_PARTITIONS) -> "ScoreStore":
        """The store at `url` (storage options from `run`: the S3 endpoint and profile). With
        `create`, an empty or missing URL becomes a store of `partitions` partitions; a URL that
        holds anything else, or a store of another format version, is refused."""
        output = Output(url, run or RunConfig())
        marker = cls._read_marker(output)
        if marker is None:
            if output.fs.isfile(output.root):
                raise NotAScoreStore(f"{output.url} is a file, not a score store")
            entries = []
            if output.fs.isdir(output.root):
                entries = sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in output.fs.ls(output.root))
            if entries:
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise NotAScoreStore(f"{output.url} holds {shown} and no {MARKER}: it is not a score store; nothing "
                                     "was changed: give an empty or new URL for a new store")
            if not create:
                raise NotAScoreStore(f"no score store at {output.url} (no {MARKER})")
            if not 1 <= partitions <= 10_000:
                raise ValueError(f"a score store has 1 to 10,000 partitions, not {partitions}")
            created = {"format": FORMAT, "version": VERSION, "partitions": partitions,
                       "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            output.write_bytes(MARKER, json.dumps(created, indent=2).encode())
            log.info("created a score store of %d partitions at %s", partitions, output.url)
            # two runs creating one store at once: both go on with whichever marker was written last
            marker = cls._read_marker(output)
        if marker.get("format") != FORMAT:
            raise NotAScoreStore(f"{output.url}: {MARKER} is not a rank1-batch score store's marker")
        if marker.get("version") != VERSION:
            raise NotAScoreStore(f"{output.url} is a score store of format version {marker.get('version')}; this "
                                 f"rank1-batch reads version {VERSION}: use a new store URL, or the release that wrote it")
        return cls(url, output.run, marker)

    @staticmethod
    def _read_marker(output: Output) -> dict | None:
        try:
            marker = json.loads(output.fs.cat_file(output.path(MARKER)))
        except (FileNotFoundError, NotADirectoryError):  # the latter: the URL is a local file
            return None
        except ValueError:
            raise NotAScoreStore(f"{output.url}: {MARKER} cannot be read as JSON") from None
        if not isinstance(marker, dict):
            raise NotAScoreStore(f"{output.url}: {MARKER} is not a rank1-batch score store's marker")
        return marker

    def partition_of(self, hashes: pa.Array) -> np.ndarray:
        """The partition of each query hash."""
        return hashes.to_numpy().view(np.uint64) % np.uint64(self.partitions)

    # --- reading ---

    def lookup(self, queries: Iterable | pa.Array | pa.ChunkedArray, keys: Iterable | pa.Array | pa.ChunkedArray,
               instructions: Iterable | pa.Array | pa.ChunkedArray | None = None) -> pa.Table:
        """The stored rows (STORE_SCHEMA) of these keys, one per key found, in the order the keys
        are given; `queries[i]` (with `instructions[i]`) is the query of `keys[i]`. Reads only the
        partitions of these queries, and in them only the row groups that may hold them."""
        keys = key_array(keys)
        hashes = query_hashes(queries, instructions)
        if len(hashes) != len(keys):
            raise ValueError(f"{len(hashes)} queries for {len(keys)} keys")
        partitions = self.partition_of(hashes)
        hash_values = hashes.to_numpy()
        wanted = []
        for partition in np.unique(partitions):
            chosen = partitions == partition
            wanted.append((int(partition), np.unique(hash_values[chosen]), keys.filter(pa.array(chosen))))
        found = self._read_partitions(wanted)
        rows = _first_per_key(pa.concat_tables([STORE_SCHEMA.empty_table(), *found]))
        log.debug("score store %s: %d of %d keys found in %d partitions", self.url, rows.num_rows, len(keys), len(wanted))
        return rows.take(pc.sort_indices(pc.index_in(rows["key"], value_set=keys)))

    def _read_partitions(self, wanted: list[tuple[int, np.ndarray, pa.Array]]) -> list[pa.Table]:
        """The rows of each (partition, sorted query hashes, keys), every file read in parallel."""
        for attempt in range(1, _READ_ATTEMPTS + 1):
            try:
                listed = in_parallel(lambda item: [(path, *item[1:]) for path in self._files(item[0])], wanted)
                return in_parallel(lambda read: self._read_file(*read), [read for reads in listed for read in reads])
            except FileNotFoundError:
                # compaction removed a file after the listing; its merged file was committed first
                if attempt == _READ_ATTEMPTS:
                    raise
                log.info("a file of %s went while it was read; listing again", self.url)

    def _read_file(self, path: str, hashes: np.ndarray, keys: pa.Array) -> pa.Table:
        # No read-ahead (s3fs's reads 50 MiB blocks): the footer and the groups wanted are small parts of the file.
        with self.output.fs.open(path, "rb", cache_type="none") as handle:
            parquet = _parquet(handle)
            groups = _row_groups_holding(parquet.metadata, hashes)
            if groups:
                # The keys first, 32 bytes a row: a group's query_hash range also spans queries
                # not stored, and the whole rows (reasoning included) are read only where one is.
                hits = pc.is_in(parquet.read_row_groups(groups, columns=["key"], use_threads=False)["key"], value_set=keys)
                starts = np.cumsum([0, *(parquet.metadata.row_group(group).num_rows for group in groups)])
                groups = [group for group, start, end in zip(groups, starts[:-1], starts[1:])
                          if pc.any(hits.slice(start, end - start)).as_py()]
            if not groups:
                return STORE_SCHEMA.empty_table()
            rows = parquet.read_row_groups(groups, use_threads=False)
        return conform(rows.filter(pc.is_in(rows["key"], value_set=keys)), STORE_SCHEMA)

    def _files(self, partition: int) -> list[str]:
        return self.output.files(_partition_dir(partition))  # listed now: another process may have written

    def _all_files(self) -> dict[int, list[tuple[str, int]]]:
        """Each used partition's committed files, with their sizes, from one listing of the store."""
        self.output.fs.invalidate_cache(self.output.root)
        found: dict[int, list[tuple[str, int]]] = {}
        prefix = self.output.path("part=")
        for path, info in sorted(self.output.fs.find(self.output.root, detail=True).items()):
            if path.startswith(prefix) and is_part_file(path):
                found.setdefault(int(path[len(prefix):].split("/", 1)[0]), []).append((path, info["size"]))
        return found

    # --- writing ---

    def add(self, table: pa.Table, run_id: str) -> int:
        """Append judgements: `table` has ADD_COLUMNS (`instruction` and `judged_at`, now by
        default, optional). Writes one file per partition touched, each with one row per key, and
        returns the number of rows written."""
        _check_run_id(run_id)
        missing = [name for name in ADD_COLUMNS if name not in table.column_names]
        if missing:
            raise ValueError(f"rows to add lack {', '.join(missing)}")
        if not table.num_rows:
            return 0
        if table["key"].null_count:
            raise ValueError("rows to add have a null key")
        hashes = query_hashes(table["query"], table["instruction"] if "instruction" in table.column_names else None)
        judged_at = table["judged_at"] if "judged_at" in table.column_names else pa.array(
            [datetime.datetime.now(datetime.timezone.utc)] * table.num_rows, JUDGED_AT_TYPE)
        rows = conform(table.drop_columns([n for n in ("query_hash", "judged_at", "judged_by") if n in table.column_names])
                       .append_column("query_hash", hashes)
                       .append_column("judged_at", judged_at.cast(JUDGED_AT_TYPE))
                       .append_column("judged_by", pa.array([run_id] * table.num_rows, pa.string())), STORE_SCHEMA)
        partitions = self.partition_of(hashes)
        written = 0
        for partition in np.unique(partitions):
            part = _first_per_key(rows.filter(pa.array(partitions == partition))).sort_by(_FILE_ORDER)
            self._write(int(partition), run_id, part)
            written += part.num_rows
        log.info("added %d judgements to %s in %d files", written, self.url, len(np.unique(partitions)))
        return written

    def _write(self, partition: int, run_id: str, rows: pa.Table) -> None:
        self.output.write_table(_partition_dir(partition), f"{run_id}-{uuid.uuid4().hex}.parquet", rows,
                                row_group_size=ROW_GROUP_ROWS)

    def writing(self, run_id: str) -> Heartbeat:
        """`with store.writing(run_id):` records the run under `_writers/` while it adds rows,
        with a heartbeat, so that `compact` waits for it; the record goes when the block ends."""
        _check_run_id(run_id)
        return Heartbeat(self.output, f"{WRITERS}/{run_id}.json", new_holder(run_id))

    def writers(self) -> dict[str, Holder]:
        """Every run recorded as writing, live or not, by its record's path under the store."""
        directory = self.output.path(WRITERS)
        self.output.fs.invalidate_cache(directory)
        try:
            names = sorted(path.rsplit("/", 1)[-1] for path in self.output.fs.ls(directory, detail=False))
        except FileNotFoundError:
            return {}
        found = {f"{WRITERS}/{name}": read_holder(self.output, f"{WRITERS}/{name}") for name in names if name.endswith(".json")}
        return {record: holder for record, holder in found.items() if holder is not None}

    # --- upkeep ---

    def stats(self) -> dict[str, Any]:
        """Rows, partitions used, files, bytes, rows per model, the judgement times' range, and
        keys stored more than once (within a partition, where a key's copies are). Reads the key,
        model and judged_at columns of every file, one partition at a time."""
        files = self._all_files()
        per_partition = in_parallel(self._partition_stats, [[path for path, _ in paths] for paths in files.values()])
        models: Counter = Counter()
        for partition in per_partition:
            models.update(partition["models"])
        writers = self.writers().values()
        times = [time for partition in per_partition for time in (partition["oldest"], partition["newest"]) if time]
        return {
            "url": self.url,
            "version": self.marker["version"],
            "created_at": self.marker.get("created_at"),
            "rows": sum(partition["rows"] for partition in per_partition),
            "duplicate_rows": sum(partition["duplicates"] for partition in per_partition),
            "partitions": {"used": len(files), "total": self.partitions},
            "files": sum(len(paths) for paths in files.values()),
            "bytes": sum(size for paths in files.values() for _, size in paths),
            "models": dict(models.most_common()),
            "oldest": _timestamp(min(times, default=None)),
            "newest": _timestamp(max(times, default=None)),
            "writers": [{"run_id": writer.run_id, "live": not is_gone(writer, STALE_AFTER_SECONDS),
                         "describe": writer.describe()} for writer in writers],
        }

    def _partition_stats(self, paths: list[str]) -> dict[str, Any]:
        columns = pa.concat_tables([self._read_whole(path, ("key", "model", "judged_at")) for path in paths])
        judged = pc.min_max(columns["judged_at"]).as_py()
        return {"rows": columns.num_rows, "duplicates": columns.num_rows - pc.count_distinct(columns["key"]).as_py(),
                "models": count_values(columns["model"]), "oldest": judged["min"], "newest": judged["max"]}

    def _read_whole(self, path: str, columns: tuple[str, ...] = tuple(STORE_SCHEMA.names)) -> pa.Table:
        with self.output.fs.open(path, "rb") as handle:
            rows = _parquet(handle).read(columns=list(columns), use_threads=False)
        return conform(rows, pa.schema([STORE_SCHEMA.field(name) for name in columns]))

    def compact(self, stale_after: float = STALE_AFTER_SECONDS) -> dict[str, int]:
        """Merge each partition's files into one, sorted by (query_hash, key) with one row per key
        (the one judged first), and remove what killed writers left (their temporary files and
        records). Safe while no run writes: refused while a writer's record is live (a writer is
        gone once its heartbeat is older than `stale_after`, or at once when its process on this
        host has ended). Each merged file is committed before its inputs are removed, so a kill
        leaves a readable store, at worst with keys stored twice, which readers handle. Holds a
        partition's rows in memory."""
        writers = self.writers()
        live = [writer for writer in writers.values() if not is_gone(writer, stale_after)]
        if live:
            raise StoreInUse(f"{self.url} is not compacted while runs write to it: "
                             f"{'; '.join(writer.describe() for writer in live)}; compact it when no run writes")
        for record, writer in writers.items():
            log.warning("removing the record of %s, which has ended, from %s", writer.describe(), self.url)
            self.output.fs.rm(self.output.path(record))
        done = {"partitions_merged": 0, "files_before": 0, "files_after": 0, "duplicates_dropped": 0,
                "leftovers_removed": 0, "writer_records_removed": len(writers)}
        run_id = f"compact-{uuid.uuid4().hex[:12]}"
        with self.writing(run_id):
            done["leftovers_removed"] = self._remove_leftovers()
            for partition, files in self._all_files().items():
                done["files_before"] += len(files)
                done["files_after"] += 1
                if len(files) > 1:
                    dropped = self._merge(partition, [path for path, _ in files], run_id)
                    done["partitions_merged"] += 1
                    done["duplicates_dropped"] += dropped
        return done

    def _merge(self, partition: int, paths: list[str], run_id: str) -> int:
        """Rewrite a partition's files as one; returns how many repeated keys it left out."""
        rows = pa.concat_tables([self._read_whole(path) for path in paths])
        merged = _first_per_key(rows).sort_by(_FILE_ORDER)
        self._write(partition, run_id, merged)
        for path in paths:
            self.output.fs.rm(path)
        log.info("compacted %s/%s: %d files of %d rows into one of %d", self.url, _partition_dir(partition),
                 len(paths), rows.num_rows, merged.num_rows)
        return rows.num_rows - merged.num_rows

    def _remove_leftovers(self) -> int:
        """Temporary files of killed local writers (`.NAME.tmp`); only while nobody writes."""
        leftovers = [path for path in self.output.fs.find(self.output.root)
                     if path.startswith(self.output.path("part=")) and path.rsplit("/", 1)[-1].startswith(".")
                     and path.endswith(".tmp")]
        for path in leftovers:
            self.output.fs.rm(path)
        return len(leftovers)


def _check_run_id(run_id: str) -> None:
    # a name starting with "." or "_" would be hidden from readers
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r}: letters, digits, '.', '_' and '-' only, starting with a letter or digit")
