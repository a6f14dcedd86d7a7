import pyarrow as pa

from rank1_batch.run.ranking import rank, top_k_mask


def table(rows):
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64()), ("first_stage_rank", pa.int64())]
        ),
    )


def test_order_is_score_then_first_stage_rank_then_doc_id():
    ranked = rank(
        table(
            [
                {"query_id": "q1", "doc_id": "d3", "score": 0.5, "first_stage_rank": 3},
                {"query_id": "q1", "doc_id": "d1", "score": 0.9, "first_stage_rank": 1},
                {"query_id": "q1", "doc_id": "d2", "score": 0.5, "first_stage_rank": 2},
                {"query_id": "q1", "doc_id": "b", "score": 0.5, "first_stage_rank": None},
                {"query_id": "q1", "doc_id": "a", "score": 0.5, "first_stage_rank": None},
            ]
        )
    )
    assert ranked["doc_id"].to_pylist() == ["d1", "d2", "d3", "a", "b"]
    assert ranked["rank"].to_pylist() == [1, 2, 3, 4, 5]


def test_ranks_restart_in_each_query_and_unscored_candidates_keep_first_stage_order():
    ranked = rank(
        table(
            [
                {"query_id": "q2", "doc_id": "x", "score": 0.1, "first_stage_rank": 1},
                {"query_id": "q1", "doc_id": "tail2", "score": None, "first_stage_rank": 4},
                {"query_id": "q1", "doc_id": "tail1", "score": None, "first_stage_rank": 3},
                {"query_id": "q1", "doc_id": "low", "score": 0.01, "first_stage_rank": 1},
                {"query_id": "q1", "doc_id": "high", "score": 0.99, "first_stage_rank": 2},
                {"query_id": "q2", "doc_id": "y", "score": 0.7, "first_stage_rank": 2},
            ]
        )
    )
    assert ranked["query_id"].to_pylist() == ["q1"] * 4 + ["q2"] * 2
    assert ranked["doc_id"].to_pylist() == ["high", "low", "tail1", "tail2", "y", "x"]
    assert ranked["rank"].to_pylist() == [1, 2, 3, 4, 1, 2]


def test_empty_table_ranks_to_empty():
    assert rank(table([])).num_rows == 0


def test_top_k_keeps_candidates_within_k():
    ranks = pa.array([1, 5, 3, None, 10], pa.int64())
    assert top_k_mask(ranks, 3).to_pylist() == [True, False, True, False, False]
    assert top_k_mask(ranks, None).to_pylist() == [True] * 5
