import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.ir.input_files import PREPARED_SCHEMA, PrepareError, from_rankllm
from rank1_batch.ir.prepare import from_trec, prepare_command, shard_slices, write_shards

TOPICS = {"1": "how long do fleas live", "2": "wifi vs bluetooth"}
PASSAGES = {
    "d1": ("Fleas live up to a year.", "Flea"),
    "d2": ("A flea\tcycle lasts 20 days.", "Flea cycle"),  # a tab inside the text
    "d3": ("Bluetooth is short range.", "Bluetooth"),
    "d4": ("An unrelated passage.", "Other"),  # in the corpus, not in the run
}
# query_id, doc_id, rank, score: queries in file order, and a passage shared by two queries.
RUN = [("1", "d1", 1, 12.5), ("1", "d2", 2, 11.0), ("2", "d3", 1, 9.25), ("2", "d1", 2, 8.5)]


def expected(titled: bool) -> pa.Table:
    rows = [
        {
            "query_id": query_id,
            "query": TOPICS[query_id],
            "doc_id": doc_id,
            "text": PASSAGES[doc_id][0],
            "title": PASSAGES[doc_id][1] if titled else None,
            "first_stage_rank": rank,
            "first_stage_score": score,
        }
        for query_id, doc_id, rank, score in RUN
    ]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def trec(tmp_path):
    """Paths of a TREC run and its topics, with a blank line and CRLF endings to be tolerated."""
    run = write(tmp_path / "run.trec", [f"{q} Q0 {d} {r} {s} bm25" for q, d, r, s in RUN])
    topics = tmp_path / "topics.tsv"
    topics.write_bytes(b"".join(f"{q}\t{text}\r\n".encode() for q, text in TOPICS.items()) + b"\n")
    return run, str(topics)


def test_trec_with_tsv_corpus(trec, tmp_path):
    corpus = write(tmp_path / "corpus.tsv", [f"{d}\t{text}" for d, (text, _) in PASSAGES.items()])
    assert from_trec(*trec, corpus).equals(expected(titled=False))


def test_trec_with_jsonl_corpus_with_and_without_title(trec, tmp_path):
    titled = write(
        tmp_path / "corpus.jsonl",
        [json.dumps({"docid" if i % 2 else "_id": d, "text": text, "title": title})
         for i, (d, (text, title)) in enumerate(PASSAGES.items())],
    )
    assert from_trec(*trec, titled).equals(expected(titled=True))
    plain = write(tmp_path / "plain.jsonl", [json.dumps({"docid": d, "text": t}) for d, (t, _) in PASSAGES.items()])
    assert from_trec(*trec, plain).equals(expected(titled=False))


def test_corpus_format_is_told_by_content_when_the_extension_says_nothing(trec, tmp_path):
    corpus = write(tmp_path / "passages", [json.dumps({"id": d, "contents": t}) for d, (t, _) in PASSAGES.items()])
    assert from_trec(*trec, corpus).equals(expected(titled=False))


def test_rankllm_json_list(tmp_path):
    entries = [
        {
            "query": TOPICS[query_id],
            "hits": [
                {"content": PASSAGES[d][0], "qid": int(q), "docid": d, "rank": r, "score": s}
                for q, d, r, s in RUN
                if q == query_id
            ],
        }
        for query_id in TOPICS
    ]
    path = tmp_path / "retrieved.json"
    path.write_text(json.dumps(entries, indent=2))
    assert from_rankllm(str(path)).equals(expected(titled=False))


def test_rankllm_jsonl_requests_with_string_and_object_docs(tmp_path):
    keys = {"d1": "text", "d2": "contents", "d3": "segment"}

    def requests(doc):
        return [
            json.dumps({
                "query": {"text": TOPICS[query_id], "qid": int(query_id)},
                # No rank: the position in the list stands for it.
                "candidates": [{"docid": d, "score": s, "doc": doc(d)} for q, d, _, s in RUN if q == query_id],
            })
            for query_id in TOPICS
        ]

    titled = write(tmp_path / "titled.jsonl", requests(lambda d: {keys[d]: PASSAGES[d][0], "title": PASSAGES[d][1]}))
    assert from_rankllm(titled).equals(expected(titled=True))
    plain = write(tmp_path / "plain.jsonl", ["", *requests(lambda d: PASSAGES[d][0])])
    assert from_rankllm(plain).equals(expected(titled=False))


@pytest.fixture
def corpus(tmp_path):
    return write(tmp_path / "corpus.jsonl", [json.dumps({"docid": d, "text": t}) for d, (t, _) in PASSAGES.items()])


def test_malformed_run_line_names_file_and_line(trec, corpus, tmp_path):
    run = write(tmp_path / "bad.trec", ["1 Q0 d1 1 12.5 bm25", "", "1 Q0 d2 2 bm25"])
    with pytest.raises(PrepareError, match=r"bad\.trec line 3: expected 'qid Q0 docid rank score tag', got 5 fields"):
        from_trec(run, trec[1], corpus)
    run = write(tmp_path / "rank.trec", ["1 Q0 d1 first 12.5 bm25"])
    with pytest.raises(PrepareError, match=r"rank\.trec line 1: rank 'first' is not an integer"):
        from_trec(run, trec[1], corpus)


def test_missing_passage_or_query_names_the_run_line(trec, corpus, tmp_path):
    run = write(tmp_path / "run.trec", ["1 Q0 d1 1 2.0 bm25", "1 Q0 d9 2 1.0 bm25", "7 Q0 d1 1 1.0 bm25"])
    with pytest.raises(PrepareError, match=r"run\.trec line 2: docid d9 not in corpus .*corpus\.jsonl"):
        from_trec(run, trec[1], corpus)
    run = write(tmp_path / "run.trec", ["1 Q0 d1 1 2.0 bm25", "7 Q0 d1 1 1.0 bm25"])
    with pytest.raises(PrepareError, match=r"run\.trec line 2: qid 7 not in topics .*topics\.tsv"):
        from_trec(run, trec[1], corpus)


def test_pair_listed_twice_is_refused(trec, corpus, tmp_path):
    run = write(tmp_path / "run.trec", ["1 Q0 d1 1 2.0 bm25", "1 Q0 d1 2 1.0 bm25"])
    with pytest.raises(PrepareError, match=r"run\.trec line 2: docid d1 listed twice for qid 1"):
        from_trec(run, trec[1], corpus)


def test_malformed_corpus_and_rankllm_lines(trec, tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", [json.dumps({"docid": "d1", "text": "x"}), '{"docid": "d2", "text": '])
    with pytest.raises(PrepareError, match=r"corpus\.jsonl line 2: not valid JSON"):
        from_trec(trec[0], trec[1], corpus)
    corpus = write(tmp_path / "untitled.jsonl", [json.dumps({"docid": "d1"})])
    with pytest.raises(PrepareError, match=r"untitled\.jsonl line 1: no text / contents / segment"):
        from_trec(trec[0], trec[1], corpus)
    request = {"query": {"text": "q", "qid": 1}, "candidates": [{"docid": "d1", "doc": "x"}, {"doc": "y"}]}
    requests = write(tmp_path / "requests.jsonl", [json.dumps(request), json.dumps(request)])
    with pytest.raises(PrepareError, match=r"requests\.jsonl line 1: candidate 2: no docid"):
        from_rankllm(requests)
    entries = tmp_path / "retrieved.json"
    entries.write_text(json.dumps([{"query": "q", "hits": [{"content": "x", "qid": 1, "docid": "d1"}, {"content": "y"}]}]))
    with pytest.raises(PrepareError, match=r"retrieved\.json query 1 hit 2: no qid"):
        from_rankllm(str(entries))


def test_shard_slices_pack_whole_queries_and_split_only_long_ones():
    query_ids = pa.array(["a"] * 3 + ["b"] * 2 + ["c"] * 5 + ["d"])
    assert shard_slices(query_ids, 4) == [(0, 3), (3, 5), (5, 9), (9, 11)]
    assert shard_slices(query_ids, 5) == [(0, 5), (5, 10), (10, 11)]
    assert shard_slices(query_ids, 100) == [(0, 11)]
    assert shard_slices(pa.array([], pa.string()), 4) == []


def test_write_shards_sorts_splits_and_round_trips(tmp_path):
    table = expected(titled=True)
    output = str(tmp_path / "shards")
    paths = write_shards(table.take([3, 0, 2, 1]), output, 2)
    assert paths == [f"{output}/pairs-00000.parquet", f"{output}/pairs-00001.parquet"]
    shards = [pq.read_table(path) for path in paths]
    assert [shard["query_id"].to_pylist() for shard in shards] == [["1", "1"], ["2", "2"]]
    assert pa.concat_tables(shards).equals(table)


def test_write_shards_refuses_earlier_shards_unless_overwriting(tmp_path):
    table = expected(titled=True)
    output = f"memory://{tmp_path.name}/shards"  # any fsspec URL
    write_shards(table, output, 1)
    with pytest.raises(FileExistsError, match="already holds 4"):
        write_shards(table, output, 2)
    assert write_shards(table, output, 10, overwrite=True) == [f"{output}/pairs-00000.parquet"]
    fs, root = fsspec.core.url_to_fs(output)
    assert fs.ls(root, detail=False) == [f"{root}/pairs-00000.parquet"]


def test_prepare_command(trec, corpus, tmp_path):
    output = str(tmp_path / "out")
    result = CliRunner().invoke(
        prepare_command, ["--output", output, "--rows-per-shard", "3", "--run", trec[0], "--topics", trec[1],
                          "--corpus", corpus]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"2 queries, 4 pairs, 2 shards -> {output}"
    assert pq.read_table(output).sort_by([("query_id", "ascending")]).equals(expected(titled=False))


def test_prepare_command_usage_and_input_errors(trec, corpus, tmp_path):
    runner = CliRunner()
    both = runner.invoke(prepare_command, ["--output", str(tmp_path), "--rankllm", corpus, "--run", trec[0]])
    assert both.exit_code == 2 and "not both" in both.output
    partial = runner.invoke(prepare_command, ["--output", str(tmp_path), "--run", trec[0], "--topics", trec[1]])
    assert partial.exit_code == 2 and "missing --corpus" in partial.output
    run = write(tmp_path / "run.trec", ["1 Q0 d9 1 1.0 bm25"])
    failed = runner.invoke(
        prepare_command, ["--output", str(tmp_path / "out"), "--run", run, "--topics", trec[1], "--corpus", corpus]
    )
    assert failed.exit_code == 1 and "run.trec line 1: docid d9 not in corpus" in failed.output
