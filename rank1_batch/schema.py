"""The input contract and the output schemas, as Arrow types: pure, free of Ray and vLLM."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REQUIRED_COLUMNS = ("query_id", "query", "doc_id", "text")
OPTIONAL_COLUMNS = ("title", "instruction", "first_stage_rank", "first_stage_score")
INPUT_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("instruction", pa.string()),
        ("first_stage_rank", pa.int64()),
        ("first_stage_score", pa.float64()),
    ]
)

# A cross-encoder's (see model/scorer_kinds.py): `score` is its template's (sigmoid or raw logit),
# `label` null for a logit; outcome, logprobs, reasoning tokens, samples, sample scores and
# agreement are Rank1's and null.
SCORES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("label", pa.bool_()),
        # 0 to 3: how many of --grades' cut points the score reaches; null without --grades
        ("grade", pa.int8()),
        ("outcome", pa.string()),
        ("logprob_true", pa.float64()),
        ("logprob_false", pa.float64()),
        ("reasoning_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("first_stage_rank", pa.int64()),
        ("first_stage_score", pa.float64()),
        # the judgement came from the score store; null in outputs written before the column: false
        ("reused", pa.bool_()),
        # Self-consistency (see `judgement.consensus`): how many samples judged the pair, each
        # one's score, and the share whose label is `label`. With several, `score` is their mean,
        # `label` their majority's, and outcome, logprobs, reasoning and reasoning_tokens are the
        # first agreeing sample's. Null in outputs written before the columns: one sample.
        ("samples", pa.int32()),
        ("sample_scores", pa.list_(pa.float64())),
        ("agreement", pa.float64()),
    ]
)
UNSCORED_SCHEMA = pa.schema([SCORES_SCHEMA.field(name) for name in ("query_id", "doc_id", "first_stage_rank", "first_stage_score")])
TRACES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("reasoning", pa.string())])
# A pair whose request failed inside the engine: not done, so a re-run scores it again.
ERRORS_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("error", pa.string())])
RANKED_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float64()),
        ("first_stage_rank", pa.int64()),
    ]
)
LABELS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("query", pa.string()),
        ("text", pa.string()),
        ("label", pa.bool_()),
        ("grade", pa.int8()),
        ("confidence", pa.float64()),
        ("rationale", pa.string()),
        ("outcome", pa.string()),
        ("model", pa.string()),
    ]
)
REASON = "reason"
# Ray's hash of an input row's file and position: the row's identity across re-runs.
ROW_HASH = "row_hash"
# Ray Data's column of each input row's file (`include_paths`), which replaces a file column so named.
SHARD_PATH = "path"


class InputError(ValueError):
    """Input that breaks the contract, named by file and column."""


def missing_columns(names: list[str], columns: dict[str, str] | None = None) -> list[str]:
    """Required contract columns that a file with these column names cannot provide."""
    return [name for name in REQUIRED_COLUMNS if (columns or {}).get(name, name) not in names]


def source_columns(names: list[str], columns: dict[str, str] | None = None) -> list[str]:
    """The file columns to read: those that map onto the contract, nothing else."""
    wanted = {(columns or {}).get(name, name) for name in INPUT_SCHEMA.names}
    return [name for name in names if name in wanted]


def to_contract(batch: pa.Table, columns: dict[str, str] | None = None) -> pa.Table:
    """Rename mapped columns, cast to the contract's types, and add absent optional columns as
    nulls. Text that is not valid UTF-8 is decoded with replacement characters, and its row gets
    a `reason`, so the row can still be written to rejects/."""
    renamed = {source: target for target, source in (columns or {}).items()}
    batch = batch.rename_columns([renamed.get(name, name) for name in batch.column_names])
    reasons = pa.nulls(batch.num_rows, pa.string())
    for field in INPUT_SCHEMA:
        if field.name in batch.column_names and pa.types.is_string(field.type):
            values, invalid = _decode(batch[field.name])
            batch = batch.set_column(batch.column_names.index(field.name), field.name, values)
            reasons = _first_reason(reasons, invalid, f"{field.name} is not valid UTF-8")
    contract = conform(batch, INPUT_SCHEMA)
    if ROW_HASH in batch.column_names:
        contract = contract.append_column(ROW_HASH, batch[ROW_HASH])
    return contract.append_column(REASON, reasons)


def _decode(values: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Strings, and which of them were not valid UTF-8 (those come back with U+FFFD in them)."""
    if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type) or _is_string(values.type)):
        return values.combine_chunks(), pa.array([False] * len(values))
    raw = values.combine_chunks()
    if _is_string(raw.type):
        try:
            raw.validate(full=True)
            return raw, pa.array([False] * len(raw))
        except pa.ArrowInvalid:
            pass
    as_bytes = raw.view(pa.large_binary() if pa.types.is_large_string(raw.type) else pa.binary()) if _is_string(raw.type) else raw
    decoded, invalid = [], []
    for item in as_bytes.to_pylist():
        text = None if item is None else item.decode("utf-8", errors="replace")
        decoded.append(text)
        invalid.append(item is not None and text.encode("utf-8") != item)
    return pa.array(decoded, pa.string()), pa.array(invalid)


def _is_string(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _first_reason(reasons: pa.Array, rows: pa.Array, reason: str) -> pa.Array:
    """Give `reason` to the rows selected that have none yet."""
    return pc.if_else(pc.and_(pc.is_null(reasons), pc.fill_null(rows, False)), reason, reasons)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with exactly the schema's columns, cast to its types; absent columns are nulls."""
    arrays = [
        table[field.name].cast(field.type) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def split_rejects(pairs: pa.Table, duplicates: pa.Table | None = None) -> tuple[pa.Table, pa.Table]:
    """Rows that can be scored, and the others with their `reason` column filled.

    `duplicates` lists each (query_id, doc_id) that occurs more than once in the input, with the
    `row_hash` of the one occurrence that is kept.
    """
    reasons = pairs[REASON].combine_chunks()
    for column in REQUIRED_COLUMNS:
        values = pairs[column]
        empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
        reasons = _first_reason(reasons, empty, f"{column} is null or empty")
    if duplicates is not None and duplicates.num_rows:
        reasons = _first_reason(reasons, _later_occurrence(pairs, duplicates), "duplicate (query_id, doc_id): scored once")
    rejected = pc.is_valid(reasons)
    pairs = pairs.set_column(pairs.column_names.index(REASON), REASON, reasons)
    return pairs.filter(pc.invert(rejected)), pairs.filter(rejected)


def _later_occurrence(pairs: pa.Table, duplicates: pa.Table) -> pa.Array:
    """Which rows repeat a (query_id, doc_id) whose kept occurrence is another row."""
    indexed = pairs.select(["query_id", "doc_id", "row_hash"]).append_column(
        "_position", pa.array(range(pairs.num_rows), pa.int64())
    )
    joined = indexed.join(duplicates, keys=["query_id", "doc_id"], join_type="inner")
    later = joined.filter(pc.not_equal(joined["row_hash"], joined["keep_row_hash"]))["_position"]
    mask = np.zeros(pairs.num_rows, bool)
    mask[later.to_numpy()] = True
    return pa.array(mask)


def count_values(values: pa.Array | pa.ChunkedArray) -> dict:
    """How often each value occurs, as a plain dict; nulls are not counted."""
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(pc.drop_null(values)).to_pylist()}


def relevance_labels(scored: pa.Table, model: str, answered_only: bool) -> pa.Table:
    """Labels with the reasoning as rationale. `confidence` is the probability of the label given:
    the score for a true label, one minus it for a false one."""
    if answered_only:
        scored = scored.filter(pc.equal(scored["outcome"], "answered"))
    confidence = pc.if_else(scored["label"], scored["score"], pc.subtract(1.0, scored["score"]))
    labels = scored.append_column("confidence", confidence).append_column(
        "model", pa.array([model] * scored.num_rows, pa.string())
    )
    return conform(labels.rename_columns(["rationale" if n == "reasoning" else n for n in labels.column_names]), LABELS_SCHEMA)


def pair_keys(pairs: pa.Table) -> pa.Array:
    """One string per (query_id, doc_id), to match the pairs of two tables by `is_in` or
    `index_in`, where a join cannot carry list columns or the order of one table must be kept."""
    return pc.binary_join_element_wise(pairs["query_id"], pairs["doc_id"], "\x00").combine_chunks()


def run_relevance(scored: pa.Table, graded: bool) -> pa.ChunkedArray:
    """A run's verdict on each scored pair as qrels relevance: its grade (0 to 3) when the run is
    graded, else its label as 0 or 1."""
    return scored["grade" if graded else "label"].cast(pa.int64())


def pair_grades(scored: pa.Table, cuts: Sequence[float] | None, aggregate: str) -> pa.Array:
    """Each scored pair's grade by `aggregate`: `mean`, the grade of its score (the samples' mean);
    `mode`, the most common of its samples' own grades, a tie going to the lower (a pair with no
    sample scores, stored before they were kept, is one sample: its score)."""
    if aggregate == "mean" or cuts is None:
        return grades(scored["score"], cuts)
    scores = pa.chunked_array(scored["score"]).combine_chunks()
    alone = pa.ListArray.from_arrays(pa.array(np.arange(len(scores) + 1, dtype=np.int32)), scores)
    samples = pc.if_else(pc.is_null(scored["sample_scores"]), alone, scored["sample_scores"])
    samples = pa.chunked_array(samples).combine_chunks()
    each = grades(pc.list_flatten(samples), cuts).to_numpy(zero_copy_only=False)
    counts = np.zeros((len(samples), len(cuts) + 1), np.int64)
    np.add.at(counts, (pc.list_parent_indices(samples).to_numpy(), each), 1)
    return pa.array(counts.argmax(axis=1), SCORES_SCHEMA.field("grade").type)  # argmax: the lowest of a tie


def grades(scores, cuts: Sequence[float] | None) -> pa.Array:
    """Each score's grade: how many of the cut points are at or below it; null without cut points."""
    grade = SCORES_SCHEMA.field("grade").type
    if cuts is None:
        return pa.nulls(len(scores), grade)
    return pa.array(np.searchsorted(np.asarray(cuts, float), np.asarray(scores, float), side="right"), grade)
