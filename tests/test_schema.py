import pyarrow as pa

from rank1_batch.schema import INPUT_SCHEMA, missing_columns, relevance_labels, source_columns, split_rejects, to_contract


def test_missing_columns_respect_the_mapping():
    assert missing_columns(["qid", "query", "doc_id", "body"], {"query_id": "qid", "text": "body"}) == []
    assert missing_columns(["query_id", "query", "doc_id"]) == ["text"]
    assert source_columns(["qid", "query", "extra", "title"], {"query_id": "qid"}) == ["qid", "query", "title"]


def test_contract_casts_ids_renames_and_fills_optional_columns():
    batch = pa.table({"qid": pa.array([7, 8]), "query": ["a", "b"], "doc_id": pa.array([1, 2]), "body": ["x", "y"],
                      "row_hash": pa.array([1, 2], pa.uint64())})
    pairs = to_contract(batch, {"query_id": "qid", "text": "body"})
    assert pairs["query_id"].to_pylist() == ["7", "8"] and pairs["text"].to_pylist() == ["x", "y"]
    assert pairs.schema.names[: len(INPUT_SCHEMA)] == INPUT_SCHEMA.names
    assert pairs["title"].null_count == 2 and pairs["reason"].null_count == 2


def test_invalid_utf8_is_replaced_and_marked():
    text = pa.array([b"fine", b"bro\xffken", None], pa.binary()).view(pa.string())
    pairs = to_contract(pa.table({"query_id": ["1", "2", "3"], "query": ["q"] * 3, "doc_id": ["a", "b", "c"], "text": text}))
    assert pairs["text"].to_pylist() == ["fine", "bro\ufffdken", None]
    assert pairs["reason"].to_pylist() == [None, "text is not valid UTF-8", None]


def test_rejects_name_the_first_problem_and_keep_one_duplicate():
    pairs = to_contract(
        pa.table(
            {
                "query_id": ["1", "1", "1", "2", None],
                "query": ["q", "q", "q", " ", "q"],
                "doc_id": ["a", "a", "a", "b", "c"],
                "text": ["t", "t", "t", "t", "t"],
                "row_hash": pa.array([30, 10, 20, 40, 50], pa.uint64()),
            }
        )
    )
    duplicates = pa.table({"query_id": ["1"], "doc_id": ["a"], "keep_row_hash": pa.array([10], pa.uint64())})
    kept, rejects = split_rejects(pairs, duplicates)
    assert kept["row_hash"].to_pylist() == [10]
    assert dict(zip(rejects["row_hash"].to_pylist(), rejects["reason"].to_pylist())) == {
        30: "duplicate (query_id, doc_id): scored once",
        20: "duplicate (query_id, doc_id): scored once",
        40: "query is null or empty",
        50: "query_id is null or empty",
    }


def test_labels_carry_confidence_of_the_given_label_and_can_keep_answered_only():
    scored = pa.table({"query_id": ["1", "1"], "doc_id": ["a", "b"], "query": ["q", "q"], "text": ["x", "y"],
                       "score": [0.9, 0.2], "label": [True, False], "outcome": ["answered", "forced"],
                       "reasoning": ["r1", "r2"]})
    labels = relevance_labels(scored, "m", answered_only=False)
    assert labels["confidence"].to_pylist() == [0.9, 0.8]
    assert labels["rationale"].to_pylist() == ["r1", "r2"] and labels["model"].to_pylist() == ["m", "m"]
    assert relevance_labels(scored, "m", answered_only=True)["doc_id"].to_pylist() == ["a"]
