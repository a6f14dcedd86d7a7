"""The keys of inputs and outputs gathered by Ray tasks: repeats found across shards, and a resume's
done keys split by input partition so that a prepare task fetches only its own shards' part."""

from __future__ import annotations

from unittest import mock

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rank1_batch.output import key_index

from rank1_batch.config import RunConfig
from rank1_batch.output.key_index import (
    KEY_SCHEMA,
    Partitioned,
    index_done,
    index_inputs,
    partition_of_shards,
    query_buckets,
    repeated,
)
from rank1_batch.output.storage import Output, Shard


def keys(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"query_id": q, "doc_id": d} for q, d in pairs], KEY_SCHEMA)


def pairs_of(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist()))


def test_shards_are_grouped_into_partitions_of_about_the_partition_rows():
    shards = [Shard(name, pa.schema([]), rows) for name, rows in (("a", 100), ("b", 150), ("c", 10), ("d", 300))]
    with mock.patch.object(key_index, "PARTITION_ROWS", 200):
        assert partition_of_shards(shards) == {"a": 0, "b": 0, "c": 1, "d": 1}


def test_a_query_has_one_bucket_in_every_process_and_rows_follow_their_bucket():
    queries = pa.chunked_array([["q1", "q2", None], ["q1", "q3"]])
    buckets = query_buckets(queries, 7)
    assert buckets[0] == buckets[3] and buckets[2] == 0
    # blake2b, not Python's salted hash(): the same on every worker
    assert buckets.tolist() == query_buckets(pa.array(["q1", "q2", None, "q1", "q3"]), 7).tolist()
    table = keys([("q1", "a"), ("q2", "b"), ("q3", "c"), ("q4", "d")])
    parts = Partitioned.of(table, np.array([2, 0, 2, 2]), 4)
    assert [pairs_of(parts.part(number)) for number in range(4)] == [[("q2", "b")], [], [("q1", "a"), ("q3", "c"), ("q4", "d")], []]


def test_repeated_keeps_each_repeated_key_once():
    assert pairs_of(repeated(keys([("q1", "a"), ("q1", "b"), ("q1", "a"), ("q2", "a"), ("q1", "a")]))) == [("q1", "a")]


def test_repeats_across_shards_are_found_and_done_keys_are_fetched_by_partition(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    # Three shards in three partitions; q2 spans the last two, and one of its keys is in both.
    shards = []
    for name, pairs in (("s0", [("q0", "a"), ("q0", "b")]), ("s1", [("q1", "a"), ("q2", "a")]),
                        ("s2", [("q2", "a"), ("q2", "b"), ("q3", "a")])):
        path = str(tmp_path / f"{name}.parquet")
        # the input's own column names, mapped to the contract's
        pq.write_table(keys(pairs).rename_columns(["qid", "pid"]), path)
        shards.append(Shard(path, pa.schema([]), len(pairs)))
    with mock.patch.object(key_index, "PARTITION_ROWS", 1):
        inputs = index_inputs(fs, shards, {"query_id": "qid", "doc_id": "pid"}, num_cpus=0.5)
    assert pairs_of(inputs.repeated) == [("q2", "a")]
    assert inputs.partitions == 3

    output = Output(str(tmp_path / "out"), RunConfig())
    output.write_table("scores", "part-1.parquet", keys([("q0", "a"), ("q2", "a")]))
    output.write_table("unscored", "part-2.parquet", keys([("q3", "a")]))
    done = index_done(output, output.listings("scores", "unscored"), inputs, num_cpus=0.5)
    assert done.rows == 3
    s0, s1, s2 = (pa.array([shard.path]) for shard in shards)
    assert pairs_of(done.for_shards(s0)) == [("q0", "a")]
    assert pairs_of(done.for_shards(s1)) == [("q2", "a")]  # q2 is in both partitions
    assert pairs_of(done.for_shards(s2)) == [("q2", "a"), ("q3", "a")]
    assert pairs_of(done.for_shards(pa.chunked_array([[shards[0].path], [shards[2].path]]))) == [
        ("q0", "a"), ("q2", "a"), ("q3", "a")]
    empty = Output(str(tmp_path / "empty"), RunConfig())
    assert index_done(empty, empty.listings("scores", "unscored"), inputs, num_cpus=0.5).for_shards(s0).num_rows == 0
