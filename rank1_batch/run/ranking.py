"""Ranking order inside each query, on Arrow tables: pure, free of Ray and vLLM."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# First-stage rank of a candidate that has none: after every candidate that has one.
_UNRANKED = np.iinfo(np.int64).max


def rank(candidates: pa.Table) -> pa.Table:
    """Candidates ordered query by query, with `rank` 1..n inside each query.

    Inside a query: score descending, then first-stage rank ascending, then doc_id. Candidates
    with no score (left out by top-k) follow the scored ones in first-stage order, so each
    query's list stays complete.
    """
    keyed = candidates.append_column("_unscored", pc.is_null(candidates["score"])).append_column(
        "_first_stage", pc.fill_null(candidates["first_stage_rank"].cast(pa.int64()), _UNRANKED)
    )
    order = pc.sort_indices(
        keyed,
        sort_keys=[
            ("query_id", "ascending"),
            ("_unscored", "ascending"),
            ("score", "descending"),
            ("_first_stage", "ascending"),
            ("doc_id", "ascending"),
        ],
    )
    ordered = candidates.take(order)
    query_ids = ordered["query_id"].to_numpy(zero_copy_only=False)
    position = np.arange(len(query_ids))
    starts = np.r_[True, query_ids[1:] != query_ids[:-1]] if len(query_ids) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(starts, position, 0)) if len(query_ids) else position
    return ordered.append_column("rank", pa.array(position - group_start + 1, pa.int32()))


def top_k_mask(first_stage_rank: pa.Array, k: int | None) -> pa.Array:
    """Which candidates are reranked: those with first-stage rank <= k (all of them without k)."""
    if k is None:
        return pa.array(np.ones(len(first_stage_rank), bool))
    return pc.fill_null(pc.less_equal(first_stage_rank, k), False)


def with_first_stage(pairs: pa.Table, ranking: pa.Table) -> pa.Table:
    """Pairs with another stage's `rank` and `score` (by query_id and doc_id) as their first-stage
    rank and score; null for a pair that stage did not rank."""
    stage = ranking.select(["query_id", "doc_id", "rank", "score"]).rename_columns(
        ["query_id", "doc_id", "first_stage_rank", "first_stage_score"])
    stage = stage.set_column(2, "first_stage_rank", stage["first_stage_rank"].cast(pa.int64()))
    return pairs.drop_columns(["first_stage_rank", "first_stage_score"]).join(
        stage, keys=["query_id", "doc_id"], join_type="left outer")
