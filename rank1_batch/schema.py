"""The input contract and the output schemas, as Arrow types: pure, free of Ray and vLLM."""

from __future__ import annotations

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

SCORES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("label", pa.bool_()),
        ("outcome", pa.string()),
        ("logprob_true", pa.float64()),
        ("logprob_false", pa.float64()),
        ("reasoning_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("first_stage_rank", pa.int64()),
        ("first_stage_score", pa.float64()),
    ]
)
TRACES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("reasoning", pa.string())])
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
        ("confidence", pa.float64()),
        ("rationale", pa.string()),
        ("outcome", pa.string()),
        ("model", pa.string()),
    ]
)
REASON = "reason"


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
    """Rename mapped columns, cast to the contract's types, and add absent optional columns as nulls."""
    renamed = {source: target for target, source in (columns or {}).items()}
    return conform(batch.rename_columns([renamed.get(name, name) for name in batch.column_names]), INPUT_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with exactly the schema's columns, cast to its types; absent columns are nulls."""
    arrays = [
        table[field.name].cast(field.type) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def split_rejects(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Rows that can be scored, and the others with a `reason`."""
    reasons = pa.array([None] * batch.num_rows, pa.string())
    for column in REQUIRED_COLUMNS:
        values = batch[column]
        empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
        empty = pc.fill_null(empty, True)
        reasons = pc.if_else(pc.and_(pc.is_null(reasons), empty), f"{column} is null or empty", reasons)
    rejected = pc.is_valid(reasons)
    return batch.filter(pc.invert(rejected)), batch.filter(rejected).append_column(REASON, reasons.filter(rejected))


def count_values(values: pa.Array | pa.ChunkedArray) -> dict:
    """How often each value occurs, as a plain dict."""
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(values).to_pylist()}


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
