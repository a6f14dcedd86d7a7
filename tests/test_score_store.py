"""The score store on its own: keys, the model's fingerprint, and the store's reads, writes and
upkeep on local files and on S3. No engine, no Ray."""

from __future__ import annotations

import datetime
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import TINY_MODEL_DIR, EngineConfig, JobConfig, RunConfig
from rank1_batch.output.lease import Holder
from rank1_batch.store import score_store
from rank1_batch.store.keys import (
    UnresolvedModel,
    model_fingerprint,
    query_hashes,
    result_identity,
    store_key,
    store_keys,
)
from rank1_batch.store.score_store import STORE_SCHEMA, NotAScoreStore, ScoreStore, StoreInUse

FINGERPRINT = "sha256:" + "0" * 64
PROMPT = [151644, 8, 99, 1024, 7, 151667]
UTC = datetime.timezone.utc


def key_of(prompt=PROMPT, fingerprint=FINGERPRINT, **options) -> bytes:
    return store_key(result_identity(JobConfig.from_options({"model": "tiny", **options}), fingerprint), prompt)


# --- the key ---

@pytest.mark.parametrize("option, value", [
    ("dtype", "bfloat16"), ("quantization", "awq"), ("enforce_eager", True), ("max_model_len", 2048),
    ("max_reasoning_tokens", 512), ("fit", "budget"), ("enable_prefix_caching", False), ("block_size", 16),
    ("seed", 1), ("engine_args", {"kv_cache_dtype": "fp8"}), ("trust_remote_code", True), ("temperature", 0.8),
    ("top_p", 0.9),
])
def test_each_option_that_decides_a_judgement_is_in_the_key(option, value):
    assert key_of(**{option: value}) != key_of()


def test_the_samples_are_in_the_key():
    assert key_of(samples=3, temperature=0.8) != key_of(temperature=0.8)
    assert key_of(samples=3, temperature=0.8) != key_of(samples=5, temperature=0.8)


def test_a_greedy_judgement_keeps_the_key_it_had_before_the_sampling_options():
    """A store filled before the options existed is hit: at their defaults they are left out of
    the key (this is the key the release before them made)."""
    before = "a779fc6bea27c60aa29aef383ab51e0484b7059032430bab5d5b2af2c7632f55"
    assert key_of().hex() == key_of(samples=1, temperature=0.0, top_p=1.0).hex() == before
    assert key_of(temperature=1) == key_of(temperature=1.0)  # a job spec's 1, the command line's 1.0


def test_the_prompt_and_the_model_fingerprint_are_in_the_key():
    for position in range(len(PROMPT)):
        changed = list(PROMPT)
        changed[position] += 1
        assert key_of(changed) != key_of()
    assert key_of(PROMPT[:-1]) != key_of()
    assert key_of(fingerprint="sha256:" + "1" * 64) != key_of()


@pytest.mark.parametrize("option, value", [
    ("threshold", 0.9), ("grades", (0.2, 0.5, 0.8)), ("task_template", "Q: FILL_QUERY_HERE"), ("batch_size", 8), ("max_num_seqs", 64),
    ("max_num_batched_tokens", 4096), ("tensor_parallel_size", 2), ("gpu_memory_utilization", 0.5), ("top_k", 10),
    ("write_traces", False), ("labels", True), ("engines", 3), ("max_concurrent_batches", 1),
    ("model", str(TINY_MODEL_DIR)), ("revision", "main"), ("input", ["elsewhere/"]), ("output", "out/"),
])
def test_options_that_decide_no_judgement_are_not_in_the_key(option, value):
    """The model's name and revision are stood for by its fingerprint; the task template is in the
    prompt's ids; the threshold decides only the label, recomputed when read."""
    assert key_of(**{option: value}) == key_of()


def test_every_option_is_decided_on():
    """The scoring and run parts that remain are empty: an option added to either is in the key
    until it is declared free (in checkpoint) or deciding no judgement (in score_store)."""
    result = result_identity(JobConfig.from_options({"model": "tiny"}), FINGERPRINT)
    assert result["scoring"] == {} and result["run"] == {}
    assert result["model"] == FINGERPRINT and "model" not in result["engine"] and "revision" not in result["engine"]


def test_keys_in_bulk_are_the_keys_one_by_one():
    result = result_identity(JobConfig.from_options({"model": "tiny"}), FINGERPRINT)
    prompts = [PROMPT, PROMPT[:3], [5], PROMPT[::-1]]
    one_by_one = [store_key(result, prompt) for prompt in prompts]
    as_arrow = pa.array(prompts, pa.list_(pa.int32()))
    assert store_keys(result, prompts).to_pylist() == one_by_one
    assert store_keys(result, as_arrow.slice(1)).to_pylist() == one_by_one[1:]
    assert store_keys(result, pa.chunked_array([as_arrow.slice(0, 2), as_arrow.slice(2)])).to_pylist() == one_by_one
    assert store_keys(result, pa.array(prompts, pa.list_(pa.int64()))).to_pylist() == one_by_one
    assert all(len(key) == 32 for key in one_by_one) and store_keys(result, prompts).type == pa.binary(32)


def test_a_query_hash_is_the_query_as_the_prompt_has_it():
    hashes = query_hashes(["what is x", "what is x", "what is x", "what is y"], [None, "briefly", None, None])
    assert hashes.type == pa.int64()
    assert hashes[0] == hashes[2] and hashes[0] != hashes[1] and hashes[0] != hashes[3]
    # the instruction appended to the query is the same prompt, so the same partition
    assert query_hashes(["what is x briefly"])[0] == hashes[1]


# --- the model's fingerprint ---

@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    return Path(shutil.copytree(TINY_MODEL_DIR, tmp_path / "tiny"))


def test_a_model_directory_is_known_by_its_contents_not_its_path(tiny_copy):
    assert model_fingerprint(EngineConfig(model="tiny")) == model_fingerprint(EngineConfig(model=str(tiny_copy)))


@pytest.mark.parametrize("name, offset", [
    ("model.safetensors", 20),  # in the JSON header
    ("model.safetensors", -1000),  # in the data, in one of the sampled blocks
    ("tokenizer.json", 100),
    ("config.json", 10),
])
def test_a_changed_byte_of_the_model_changes_its_fingerprint(tiny_copy, name, offset):
    before = model_fingerprint(EngineConfig(model=str(tiny_copy)))
    content = bytearray((tiny_copy / name).read_bytes())
    if offset < 0:  # the last sampled block starts at 7/8 of the data
        header = 8 + int.from_bytes(content[:8], "little")
        offset = header + (len(content) - header) * 7 // 8 + 10
    content[offset] ^= 1
    (tiny_copy / name).write_bytes(bytes(content))
    assert model_fingerprint(EngineConfig(model=str(tiny_copy))) != before


def test_a_chat_template_added_changes_the_fingerprint_and_other_files_do_not(tiny_copy):
    before = model_fingerprint(EngineConfig(model=str(tiny_copy)))
    (tiny_copy / "README.md").write_text("notes")
    assert model_fingerprint(EngineConfig(model=str(tiny_copy))) == before
    (tiny_copy / "chat_template.jinja").write_text("{{ messages }}")
    assert model_fingerprint(EngineConfig(model=str(tiny_copy))) != before


def test_a_model_that_cannot_be_fingerprinted_is_refused(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(UnresolvedModel, match="no \\*.safetensors"):
        model_fingerprint(EngineConfig(model=str(tiny_copy)))
    with pytest.raises(UnresolvedModel, match="stage the model in a local directory"):
        model_fingerprint(EngineConfig(model="s3://models/rank1-7b"))


class FakeHub:
    calls: list = []
    answer: object = None

    def model_info(self, model, revision=None):
        FakeHub.calls.append((model, revision))
        if isinstance(FakeHub.answer, Exception):
            raise FakeHub.answer
        return SimpleNamespace(sha=FakeHub.answer)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    return FakeHub


def test_a_hub_model_is_known_by_its_commit(hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint(EngineConfig(model="jhu-clsp/rank1-7b", revision=commit)) == f"hf:jhu-clsp/rank1-7b@{commit}"
    assert hub.calls == []  # a commit needs no hub
    hub.answer = commit
    assert model_fingerprint(EngineConfig(model="jhu-clsp/rank1-7b", revision="main")).endswith(commit)
    assert hub.calls == [("jhu-clsp/rank1-7b", "main")]
    hub.answer = OSError("offline")
    with pytest.raises(UnresolvedModel, match="needs a resolvable model revision.*give --revision COMMIT"):
        model_fingerprint(EngineConfig(model="jhu-clsp/rank1-7b"))


# --- the store ---

def judgements(keys: list[bytes], queries: list[str], **columns) -> pa.Table:
    rows = len(keys)
    values = {
        "key": pa.array(keys, pa.binary(32)), "query": queries, "score": [0.25 + i / (4 * rows) for i in range(rows)],
        "logprob_true": [-1.0 - i for i in range(rows)], "logprob_false": [-0.5] * rows,
        "outcome": ["answered"] * rows, "reasoning_tokens": list(range(rows)), "prompt_tokens": [40] * rows,
        "truncated": [i % 2 == 0 for i in range(rows)], "reasoning": [f"reason {i}" for i in range(rows)],
        "model": ["tiny"] * rows, **columns,
    }
    return pa.table(values)


def pairs(queries: int, per_query: int, salt: str = "") -> tuple[list[bytes], list[str]]:
    result = result_identity(JobConfig.from_options({"model": "tiny"}), FINGERPRINT)
    texts = [f"query {salt}{q}" for q in range(queries) for _ in range(per_query)]
    prompts = [[q, d, *salt.encode()] for q in range(queries) for d in range(per_query)]
    return store_keys(result, prompts).to_pylist(), texts


def filled_store(tmp_path, queries: int, per_query: int) -> tuple[ScoreStore, list[bytes], list[str]]:
    """A store of one partition holding the pairs of `queries` queries."""
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=1)
    keys, texts = pairs(queries, per_query)
    store.add(judgements(keys, texts), "filled")
    return store, keys, texts


def part_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("part=*/*") if p.name.endswith(".parquet") and not p.name.startswith("."))


def test_rows_added_are_read_back_as_written(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True)
    keys, queries = pairs(queries=5, per_query=4)
    added = judgements(keys, queries)
    assert store.add(added, "run-1") == 20
    found = store.lookup(queries[::-1], keys[::-1])  # in the order asked
    assert found.schema == STORE_SCHEMA
    expected = added.to_pylist()[::-1]
    for row, want in zip(found.to_pylist(), expected):
        assert {name: row[name] for name in want if name != "query"} == {n: v for n, v in want.items() if n != "query"}
        assert row["judged_by"] == "run-1" and row["judged_at"].tzinfo is not None
    # a file per partition touched, its name the run's
    files = part_files(tmp_path / "store")
    assert len(files) == len(set(store.partition_of(query_hashes(queries)))) and all(f.name.startswith("run-1-") for f in files)
    marker = json.loads((tmp_path / "store" / "_store.json").read_text())
    assert marker["format"] == "rank1-batch-score-store" and marker["version"] == 1 and marker["partitions"] == 256


def test_missing_keys_are_absent_and_a_key_is_read_once(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=4)
    keys, queries = pairs(queries=3, per_query=3)
    assert store.lookup(queries, keys).num_rows == 0  # an empty store
    early = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    store.add(judgements(keys, queries, judged_at=pa.array([early.replace(day=2)] * 9, pa.timestamp("us", tz="UTC"))), "later")
    store.add(judgements(keys[:2], queries[:2], reasoning=["first", "first"],
                         judged_at=pa.array([early] * 2, pa.timestamp("us", tz="UTC"))), "earlier")
    other_keys, other_queries = pairs(queries=1, per_query=2, salt="other")
    found = store.lookup(queries + other_queries + queries[:1], keys + other_keys + keys[:1])
    assert found["key"].to_pylist() == keys  # each stored key once, unknown ones absent
    assert found["reasoning"].to_pylist()[:2] == ["first", "first"]  # the earliest judgement wins
    assert found["judged_by"].to_pylist() == ["earlier"] * 2 + ["later"] * 7
    # a key given twice in one call is written once
    assert store.add(judgements([keys[0], keys[0]], queries[:2]), "twice") == 1


def test_lookup_reads_only_the_row_groups_of_its_queries(tmp_path, monkeypatch):
    store, keys, queries = filled_store(tmp_path, queries=200, per_query=50)
    chosen = []
    original = score_store._row_groups_holding

    def spy(metadata, hashes):
        chosen.append((original(metadata, hashes), metadata.num_row_groups))
        return chosen[-1][0]

    whole_rows = []
    read_row_groups = pq.ParquetFile.read_row_groups

    def reads(self, groups, columns=None, **kwargs):
        if columns is None:
            whole_rows.append(groups)
        return read_row_groups(self, groups, columns, **kwargs)

    monkeypatch.setattr(score_store, "_row_groups_holding", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", reads)
    found = store.lookup(queries[5000:5050], keys[5000:5050])
    assert found["key"].to_pylist() == keys[5000:5050]
    (groups, total), = chosen
    assert total == 10 and 1 <= len(groups) <= 2
    # a query not stored reads at most the keys of the group its hash falls in, never whole rows
    whole_rows.clear()
    other_keys, other_queries = pairs(queries=1, per_query=3, salt="absent")
    assert store.lookup(other_queries, other_keys).num_rows == 0 and whole_rows == []


def test_writers_at_once_lose_nothing(tmp_path):
    url = str(tmp_path / "store")
    ScoreStore.open(url, create=True, partitions=2)
    batches = [pairs(queries=4, per_query=5, salt=f"w{writer}b{batch}") for writer in range(2) for batch in range(10)]
    start = threading.Barrier(2)

    def write(writer: int) -> None:
        store = ScoreStore.open(url)
        start.wait()
        with store.writing(f"writer-{writer}"):
            for keys, queries in batches[writer * 10:(writer + 1) * 10]:
                store.add(judgements(keys, queries), f"writer-{writer}")

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = [key for batch_keys, _ in batches for key in batch_keys]
    queries = [query for _, batch_queries in batches for query in batch_queries]
    assert ScoreStore.open(url).lookup(queries, keys).num_rows == len(keys) == 400
    assert not list((tmp_path / "store" / "_writers").iterdir())  # each writer's record went with it


def test_a_writer_killed_while_committing_leaves_a_readable_store(tmp_path, monkeypatch):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=1)
    keys, queries = pairs(queries=2, per_query=3)
    store.add(judgements(keys[:3], queries[:3]), "whole")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.output.fs, "mv", killed)  # the local commit is a rename
    with pytest.raises(KeyboardInterrupt):
        store.add(judgements(keys[3:], queries[3:]), "killed")
    monkeypatch.undo()
    leftovers = list((tmp_path / "store" / "part=0000").glob(".*.tmp"))
    assert len(leftovers) == 1  # what a killed Output.write_table leaves behind
    assert store.lookup(queries, keys)["key"].to_pylist() == keys[:3]
    assert store.stats()["files"] == 1
    assert store.compact()["leftovers_removed"] == 1 and not list((tmp_path / "store").rglob("*.tmp"))


def test_a_file_compacted_away_while_it_is_read_is_listed_again(tmp_path, monkeypatch):
    store, keys, queries = filled_store(tmp_path, queries=2, per_query=2)
    listings = []
    files = store._files

    def stale_once(partition):
        listings.append(partition)
        gone = [str(tmp_path / "store" / "part=0000" / "filled-gone.parquet")] if len(listings) == 1 else []
        return gone + files(partition)

    monkeypatch.setattr(store, "_files", stale_once)
    assert store.lookup(queries, keys)["key"].to_pylist() == keys
    assert listings == [0, 0]


@pytest.mark.parametrize("content, message", [
    ({"notes.txt": "mine", "data.parquet": ""}, "holds data.parquet, notes.txt and no _store.json"),
    ({"_store.json": json.dumps({"format": "rank1-batch-score-store", "version": 99, "partitions": 4})},
     "format version 99; this rank1-batch reads version 1"),
    ({"_store.json": json.dumps({"format": "something else"})}, "not a rank1-batch score store's marker"),
    ({"_store.json": "{"}, "cannot be read as JSON"),
])
def test_a_url_that_holds_something_else_is_refused(tmp_path, content, message):
    for name, text in content.items():
        (tmp_path / name).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(NotAScoreStore, match=message) as refused:
        ScoreStore.open(str(tmp_path), create=True)
    assert str(tmp_path) in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_missing_store_is_created_only_when_asked(tmp_path):
    with pytest.raises(NotAScoreStore, match="no score store at"):
        ScoreStore.open(str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAScoreStore, match="is a file"):
        ScoreStore.open(str(tmp_path / "file"), create=True)
    (tmp_path / "empty").mkdir()
    assert ScoreStore.open(str(tmp_path / "empty"), create=True, partitions=8).partitions == 8
    assert ScoreStore.open(str(tmp_path / "empty"), create=True).partitions == 8  # the marker's, not the default


def test_stats(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=4)
    keys, queries = pairs(queries=6, per_query=2)
    first = datetime.datetime(2026, 3, 1, tzinfo=UTC)
    store.add(judgements(keys, queries, judged_at=pa.array([first] * 12, pa.timestamp("us", tz="UTC"))), "a")
    store.add(judgements(keys[:3], queries[:3], model=["other"] * 3), "b")
    stats = store.stats()
    used = len(set(store.partition_of(query_hashes(queries))))
    assert stats["rows"] == 15 and stats["duplicate_rows"] == 3
    assert stats["partitions"] == {"used": used, "total": 4}
    assert stats["files"] == used + len(set(store.partition_of(query_hashes(queries[:3]))))
    assert stats["bytes"] == sum(p.stat().st_size for p in part_files(tmp_path / "store"))
    assert stats["models"] == {"tiny": 12, "other": 3}
    assert stats["oldest"] == first.isoformat() and stats["newest"] > stats["oldest"]
    assert stats["writers"] == []


def test_compact_merges_each_partition_and_drops_repeated_keys(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=4)
    keys, queries = pairs(queries=8, per_query=5)
    for start in range(0, 40, 10):
        store.add(judgements(keys[start:start + 10], queries[start:start + 10]), f"night-{start}")
    store.add(judgements(keys[:10], queries[:10], reasoning=["again"] * 10), "repeat")
    before = store.lookup(queries, keys)
    done = store.compact()
    assert done["duplicates_dropped"] == 10 and done["files_after"] == store.stats()["partitions"]["used"]
    per_partition = [len(list(d.glob("*.parquet"))) for d in (tmp_path / "store").glob("part=*")]
    assert per_partition and set(per_partition) == {1}
    after = store.lookup(queries, keys)
    assert after.equals(before) and "again" not in after["reasoning"].to_pylist()
    assert store.stats()["duplicate_rows"] == 0
    assert store.compact()["partitions_merged"] == 0  # nothing left to merge


def test_files_written_before_the_samples_were_kept_still_read_and_compact(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=1)
    keys, queries = pairs(queries=2, per_query=3)
    store.add(judgements(keys[:3], queries[:3]), "before")
    (old,) = part_files(tmp_path / "store")
    pq.write_table(pq.read_table(old).drop_columns(["sample_scores"]), old)  # as the release before wrote it
    sampled = pa.array([[0.2, 0.3, 0.4]] * 3, pa.list_(pa.float64()))
    store.add(judgements(keys[3:], queries[3:], score=[0.3] * 3, sample_scores=sampled), "after")
    found = store.lookup(queries, keys)
    assert found["sample_scores"].to_pylist() == [None] * 3 + [[0.2, 0.3, 0.4]] * 3  # null: one sample, the score
    store.compact()
    assert len(part_files(tmp_path / "store")) == 1 and store.lookup(queries, keys).equals(found)


def test_compact_waits_for_a_live_writer_but_not_for_one_that_has_ended(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=1)
    keys, queries = pairs(queries=1, per_query=2)
    store.add(judgements(keys[:1], queries[:1]), "a")
    store.add(judgements(keys[1:], queries[1:]), "b")
    with store.writing("nightly-1"):
        with pytest.raises(StoreInUse, match="not compacted while runs write to it: run nightly-1 \\(process"):
            store.compact()
        assert [writer["run_id"] for writer in store.stats()["writers"]] == ["nightly-1"]
    ended = Holder("killed-run", "another-host", 1, 0.0, 0.0, time.time() - 3600)
    (tmp_path / "store" / "_writers" / "killed-run.json").write_text(json.dumps(vars(ended)))
    done = store.compact()
    assert done["partitions_merged"] == 1 and done["writer_records_removed"] == 1
    assert not list((tmp_path / "store" / "_writers").iterdir())


def test_a_compaction_killed_before_removing_its_inputs_leaves_a_readable_store(tmp_path, monkeypatch):
    store = ScoreStore.open(str(tmp_path / "store"), create=True, partitions=1)
    keys, queries = pairs(queries=3, per_query=4)
    store.add(judgements(keys[:6], queries[:6]), "a")
    store.add(judgements(keys[6:], queries[6:]), "b")
    expected = store.lookup(queries, keys)
    remove = store.output.fs.rm

    def killed(path, *args, **kwargs):
        if "/part=" in str(path):
            raise KeyboardInterrupt
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(store.output.fs, "rm", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()
    assert len(part_files(tmp_path / "store")) == 3  # the merged file committed beside its inputs
    assert store.lookup(queries, keys).equals(expected)
    assert store.stats()["duplicate_rows"] == 12
    store.compact()
    assert len(part_files(tmp_path / "store")) == 1 and store.lookup(queries, keys).equals(expected)


def test_a_run_id_that_would_hide_its_files_is_refused(tmp_path):
    store = ScoreStore.open(str(tmp_path / "store"), create=True)
    keys, queries = pairs(queries=1, per_query=1)
    for run_id in ("_run", ".run", "a/b", ""):
        with pytest.raises(ValueError, match="run id"):
            store.add(judgements(keys, queries), run_id)


def test_store_on_s3(s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="scores")
    run = RunConfig(s3_endpoint_url=s3_endpoint)
    store = ScoreStore.open("s3://scores/store", run, create=True, partitions=8)
    keys, queries = pairs(queries=4, per_query=3)
    store.add(judgements(keys[:6], queries[:6]), "first")
    store.add(judgements(keys[4:], queries[4:]), "second")
    found = ScoreStore.open("s3://scores/store", run).lookup(queries, keys)
    assert found["key"].to_pylist() == keys
    assert found["judged_by"].to_pylist() == ["first"] * 6 + ["second"] * 6
    stats = store.stats()
    assert stats["rows"] == 14 and stats["duplicate_rows"] == 2 and stats["bytes"] > 0
    assert store.compact()["duplicates_dropped"] == 2
    assert store.lookup(queries, keys).equals(found)
    partition = f"part={int(store.partition_of(query_hashes(queries[:1]))[0]):04d}"
    with pytest.raises(NotAScoreStore, match=f"s3://scores/store/{partition} holds .*parquet and no _store.json"):
        ScoreStore.open(f"s3://scores/store/{partition}", run, create=True)


# --- the command line ---

def test_store_stats_and_compact_on_the_command_line(tmp_path):
    url = str(tmp_path / "store")
    store = ScoreStore.open(url, create=True, partitions=2)
    keys, queries = pairs(queries=2, per_query=3)
    store.add(judgements(keys, queries), "a")
    store.add(judgements(keys[:2], queries[:2]), "b")
    shown = CliRunner().invoke(main, ["store", "stats", url])
    assert shown.exit_code == 0, shown.output
    assert f"score store {url}" in shown.output and "rows        8 (2 repeat a key" in shown.output
    assert "models      tiny 8" in shown.output
    as_json = json.loads(CliRunner().invoke(main, ["store", "stats", url, "--json"]).output)
    assert as_json["rows"] == 8 and as_json["partitions"]["total"] == 2
    with store.writing("busy"):
        refused = CliRunner().invoke(main, ["store", "compact", url])
    assert refused.exit_code != 0 and "run busy" in refused.output and "Traceback" not in refused.output
    compacted = CliRunner().invoke(main, ["store", "compact", url])
    assert compacted.exit_code == 0 and "2 repeated keys dropped" in compacted.output
    missing = CliRunner().invoke(main, ["store", "stats", str(tmp_path / "none"), "--s3-profile", "unused"])
    assert missing.exit_code != 0 and "no score store at" in missing.output
