"""The (query_id, doc_id) keys of many files, gathered by Ray tasks so that no one process holds
them all: at ten million pairs the keys alone are hundreds of megabytes.

- The input's repeated keys: each reading task splits its keys by a hash of their query (a repeat
  shares its query), and one task per bucket finds the repeats; only they, which are rare, reach
  the driver.
- The keys an output already holds, for a resume: split by the *input partition* their query came
  from (consecutive input shards of about `PARTITION_ROWS` rows), so that a prepare task, whose
  rows come from one or two shards, fetches only its partitions' keys from Ray's object store.

The driver holds the object references, one row per input query and one entry per input shard.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..schema import to_contract
from .parallel_reads import FILES_PER_READING_TASK, ROWS_PER_READING_TASK, in_groups, in_parallel
from .storage import Listings, Output, Shard

KEY_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string())])
# Input rows per partition of done keys: what a prepare task fetches for a shard.
PARTITION_ROWS = 250_000
# Partitions a prepare worker keeps between its tasks (its next block is likely of the same shard).
KEPT_PARTITIONS = 4


def key_columns(columns: dict[str, str]) -> list[str]:
    """The input's own names of the key columns, under the run's column mapping."""
    return [columns.get(name, name) for name in KEY_SCHEMA.names]


def partition_of_shards(shards: list[Shard]) -> dict[str, int]:
    """Consecutive input shards grouped into partitions of about `PARTITION_ROWS` rows."""
    found, number, rows = {}, 0, 0
    for shard in shards:
        if rows >= PARTITION_ROWS:
            number, rows = number + 1, 0
        found[shard.path] = number
        rows += shard.rows
    return found


def query_buckets(query_ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Each row's bucket, from a hash of its query that is the same in every process (a null
    query goes to bucket 0)."""
    if isinstance(query_ids, pa.ChunkedArray):
        query_ids = query_ids.combine_chunks()
    encoded = pc.dictionary_encode(query_ids)
    of_query = [int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets
                for value in encoded.dictionary.to_pylist()]
    of_query = np.array([*of_query, 0], np.int64)  # the last for nulls
    return of_query[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


@dataclass(frozen=True)
class Partitioned:
    """A table's rows in `parts`, as one object: row i in part `numbers[i]`. A reading task leaves
    one of these in Ray's object store, not one object per part: Ray keeps an object under
    100 KB in its owner's memory, the driver's here, and at ten million pairs most parts of a
    task's keys are that small. The cost: a node that runs a part's task holds every reading
    task's keys in its object store, not only that part's."""

    table: pa.Table  # the rows ordered by part
    ends: np.ndarray  # where each part ends in `table`

    @classmethod
    def of(cls, table: pa.Table, numbers: np.ndarray, parts: int) -> Partitioned:
        order = np.argsort(numbers, kind="stable")
        return cls(table.take(pa.array(order, pa.int64())), np.cumsum(np.bincount(numbers, minlength=parts)))

    def part(self, number: int) -> pa.Table:
        start = int(self.ends[number - 1]) if number else 0
        return self.table.slice(start, int(self.ends[number]) - start)


def repeated(keys: pa.Table) -> pa.Table:
    """Each key that occurs more than once."""
    counted = keys.group_by(KEY_SCHEMA.names).aggregate([("query_id", "count")])
    return counted.filter(pc.greater(counted["query_id_count"], 1)).select(KEY_SCHEMA.names)


def _input_keys(fs, paths: list[str], partitions: list[int], columns: dict[str, str],
                buckets: int) -> tuple[Partitioned, pa.Table]:
    """A reading task over input shards: their keys in `buckets` parts by query, and the
    (query_id, partition) pairs they hold."""
    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=key_columns(columns))
        return to_contract(table, columns).select(KEY_SCHEMA.names)

    tables = in_parallel(read, paths)
    queries = pa.concat_tables([
        pa.table({"query_id": table["query_id"], "partition": pa.array(np.full(table.num_rows, partition, np.int32))})
        for table, partition in zip(tables, partitions)
    ]).group_by(["query_id", "partition"]).aggregate([])
    keys = pa.concat_tables([KEY_SCHEMA.empty_table(), *tables])
    return Partitioned.of(keys, query_buckets(keys["query_id"], buckets), buckets), queries


def _part_of_each(number: int, *partitioned: Partitioned) -> pa.Table:
    """Part `number` of every reading task's keys, as one table."""
    return pa.concat_tables([KEY_SCHEMA.empty_table(), *(each.part(number) for each in partitioned)])


def _repeated_in(number: int, *partitioned: Partitioned) -> pa.Table:
    return repeated(_part_of_each(number, *partitioned))


def _done_keys(output: Output, files: list[tuple[str, int]], queries: pa.Table,
               partitions: int) -> tuple[Partitioned, int]:
    """A reading task over committed part files (each a path and its size): their keys in one
    part per input partition that holds the key's query, and how many keys it read."""
    def read(file: tuple[str, int]) -> pa.Table:
        with output.open_part(*file) as handle:
            return pq.read_table(handle, columns=KEY_SCHEMA.names, use_threads=False).cast(KEY_SCHEMA)

    keys = pa.concat_tables([KEY_SCHEMA.empty_table(), *in_parallel(read, files)])
    placed = keys.join(queries, "query_id", join_type="inner").select([*KEY_SCHEMA.names, "partition"])
    return Partitioned.of(placed.select(KEY_SCHEMA.names), placed["partition"].to_numpy(), partitions), keys.num_rows


@dataclass(frozen=True)
class InputKeys:
    """What the driver keeps of the input's keys."""

    repeated: pa.Table  # KEY_SCHEMA: each key that occurs more than once
    queries: pa.Table  # (query_id, partition): the input partitions holding each query
    partition_of_shard: dict[str, int]

    @property
    def partitions(self) -> int:
        return partition_count(self.partition_of_shard)


def partition_count(partition_of_shard: dict[str, int]) -> int:
    return max(partition_of_shard.values()) + 1


def index_inputs(fs, shards: list[Shard], columns: dict[str, str], num_cpus: float) -> InputKeys:
    """Read every input shard's keys in Ray tasks, and keep the repeated ones and where each
    query lives."""
    import ray

    partition_of_shard = partition_of_shards(shards)
    buckets = partition_count(partition_of_shard)
    reading = ray.remote(_input_keys).options(num_cpus=num_cpus, num_returns=2)
    keys, queries = zip(*(reading.remote(fs, paths, [partition_of_shard[path] for path in paths], columns, buckets)
                          for paths in in_groups([shard.path for shard in shards],
                                                 sum(shard.rows for shard in shards), ROWS_PER_READING_TASK)))
    finding = ray.remote(_repeated_in).options(num_cpus=num_cpus)
    repeats = [finding.remote(bucket, *keys) for bucket in range(buckets)]
    queries = pa.concat_tables(ray.get(list(queries)))
    return InputKeys(pa.concat_tables([KEY_SCHEMA.empty_table(), *ray.get(repeats)]),
                     queries.group_by(["query_id", "partition"]).aggregate([]), partition_of_shard)


_kept: OrderedDict = OrderedDict()  # a prepare worker's fetched partitions, by object id


@dataclass(frozen=True)
class DoneKeys:
    """The keys an output holds, one table per input partition in Ray's object store."""

    partitions: tuple  # ObjectRef of a KEY_SCHEMA table, per input partition
    rows: int  # keys read from the output
    partition_of_shard: dict[str, int]

    def for_shards(self, paths: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The done keys of the partitions these input shards belong to, fetched once per worker."""
        if not self.partitions:
            return KEY_SCHEMA.empty_table()
        import ray

        wanted = sorted({self.partition_of_shard[path] for path in pc.unique(paths).to_pylist()})
        tables = []
        for number in wanted:
            ref = self.partitions[number]
            if ref.hex() not in _kept:
                _kept[ref.hex()] = ray.get(ref)
                while len(_kept) > KEPT_PARTITIONS:
                    _kept.popitem(last=False)
            tables.append(_kept[ref.hex()])
        return pa.concat_tables([KEY_SCHEMA.empty_table(), *tables])


def index_done(output: Output, listed: Listings, inputs: InputKeys, num_cpus: float) -> DoneKeys:
    """Read the keys of every scores/ and unscored/ file of the output's listings in Ray tasks,
    into one table per input partition."""
    import ray

    files = [file for directory in ("scores", "unscored") for file in listed[directory].items()]
    if not files:
        return DoneKeys((), 0, inputs.partition_of_shard)
    partitions = inputs.partitions
    queries = ray.put(inputs.queries)
    reading = ray.remote(_done_keys).options(num_cpus=num_cpus, num_returns=2)
    keys, rows = zip(*(reading.remote(output, group, queries, partitions)
                       for group in in_groups(files, len(files), FILES_PER_READING_TASK)))
    joining = ray.remote(_part_of_each).options(num_cpus=num_cpus)
    refs = tuple(joining.remote(number, *keys) for number in range(partitions))
    return DoneKeys(refs, sum(ray.get(list(rows))), inputs.partition_of_shard)
