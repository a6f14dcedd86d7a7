"""The prepare stage, on Ray Data's CPU workers: each batch of input pairs validated, cut to each
query's top k, reused from the score store where it can be, and encoded as prompts that fit the
model's context. The rows set aside (rejects, the tail past top k, reused pairs) are written here."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..model.encoding import PromptTooLong
from ..model.scorer_kinds import ScorerKind, scorer_kind
from ..output.checkpoint import Done
from ..output.commits import write_results
from ..output.storage import Output, content_name
from ..schema import (
    ERRORS_SCHEMA,
    REASON,
    ROW_HASH,
    SCORES_SCHEMA,
    SHARD_PATH,
    TRACES_SCHEMA,
    UNSCORED_SCHEMA,
    conform,
    pair_grades,
    split_rejects,
    to_contract,
)
from ..store.keys import KEY_TYPE, store_keys
from ..store.score_store import JUDGEMENT, ScoreStore
from .follow import stop_if_lease_lost
from .ranking import top_k_mask, with_first_stage

IDS = ("query_id", "doc_id", "first_stage_rank", "first_stage_score")
# The texts ride along to the writer, which needs them for relevance labels, and with the pair's
# store key (null without a store) to the score store.
PASSTHROUGH = (*IDS, "query", "instruction", "text", "store_key")
PROMPTS_SCHEMA = pa.schema(
    [
        *(SCORES_SCHEMA.field(name) for name in IDS),
        ("query", pa.string()),
        ("instruction", pa.string()),
        ("text", pa.string()),
        ("store_key", KEY_TYPE),
        # null for a pair set aside here (rejected, beyond the top k, or reused): it is only counted later
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
        ("passage_start", pa.int32()),  # see EncodedPrompt: null but for a cross-encoder with token types
    ]
)


# The prompts table's columns of an EncodedPrompt, by its fields.
ENCODED_COLUMNS = {"prompt_token_ids": "token_ids", "truncated": "truncated", "passage_start": "passage_start"}
# Scores with the reasoning, texts and store key beside them, as the score stage hands them to the writer.
SCORED_SCHEMA = pa.schema(
    [*SCORES_SCHEMA, TRACES_SCHEMA.field("reasoning"), *(PROMPTS_SCHEMA.field(name) for name in PASSTHROUGH[len(IDS):])]
)


@dataclass(frozen=True)
class Reuse:
    """A run's score store, the result identity its keys are made under, and the run's id."""

    store: ScoreStore
    result: dict
    run_id: str


log = logging.getLogger(__name__)
_scorers: dict[str, tuple[ScorerKind, object]] = {}


def scorer_of(job: JobConfig, encoder=None) -> tuple[ScorerKind, object]:
    """The job's kind of scorer and its pair encoder, once per worker process and configuration:
    loading a tokenizer costs more than a batch. A worker given the driver's `encoder` keeps it
    rather than loading one: unpickled, it imports only its tokenizer's own class, not the
    transformers auto classes that take seconds of a fresh worker's CPU, and needs no model files."""
    key = json.dumps([asdict(job.engine), asdict(job.scoring)], sort_keys=True)
    if key not in _scorers:
        kind = scorer_kind(job.engine, job.scoring)
        _scorers[key] = kind, kind.encoder() if encoder is None else encoder
    return _scorers[key]


def build_prompts(batch: pa.Table, job: JobConfig, output: Output, done: Done, duplicates: pa.Table | None,
                  reuse: Reuse | None, gate=None, first_stage: pa.Table | None = None, encoder=None) -> pa.Table:
    """Skip work already done, validate rows, keep the top k, build each prompt, and commit the
    pairs whose judgement is in the score store. A cascade's `first_stage` (the cross-encoder's
    ranking) replaces the input's first-stage rank and score, so the top k are of its order. Rows
    set aside (rejected, beyond the top k, or reused) are written here, while the run holds its
    output (asked of the `gate`), and pass on without a prompt, so the progress display can count
    them. `encoder` is the driver's (see `scorer_of`)."""
    pairs = to_contract(batch, job.run.columns)
    if first_stage is not None:
        pairs = with_first_stage(pairs, first_stage)
    pairs = pairs.filter(pc.invert(pc.is_in(pairs[ROW_HASH], done.rejected_rows)))
    pairs, rejects = split_rejects(pairs, duplicates)
    # only the done keys of this batch's input shards, not the whole output's
    pairs = pairs.join(done.keys.for_shards(batch[SHARD_PATH]), keys=["query_id", "doc_id"], join_type="left anti")
    reranked = top_k_mask(pairs["first_stage_rank"], job.run.top_k)
    tail, pairs = pairs.filter(pc.invert(reranked)), pairs.filter(reranked)

    encoded, too_long = _encode(scorer_of(job, encoder)[1], pairs)
    pairs = pairs.set_column(pairs.column_names.index(REASON), REASON, too_long)
    fits = pc.is_null(too_long)
    rejects = pa.concat_tables([rejects, pairs.filter(pc.invert(fits))])
    if gate is not None and (rejects.num_rows or tail.num_rows or reuse is not None):
        import ray

        stop_if_lease_lost(ray.get(gate.lease_lost.remote()))
    if rejects.num_rows:
        output.write_table("rejects", content_name(rejects[ROW_HASH]), rejects)
    if tail.num_rows:
        tail = tail.select(UNSCORED_SCHEMA.names)
        output.write_table("unscored", content_name(tail["query_id"], tail["doc_id"]), tail)

    for name, values in encoded.items():
        pairs = pairs.append_column(name, values)
    to_score = pairs.filter(fits)
    reused = pa.table({})
    if reuse is not None and to_score.num_rows:
        to_score, reused = reuse_stored(to_score, reuse, job, output)
    return pa.concat_tables([conform(rows, PROMPTS_SCHEMA) for rows in (to_score, rejects, tail, reused)])


def reuse_stored(to_score: pa.Table, reuse: Reuse, job: JobConfig, output: Output) -> tuple[pa.Table, pa.Table]:
    """Commit the pairs the store has judged, with this run's ids, threshold and grades, as a batch of
    their own; return the others with their store keys, and the reused ones."""
    keys = store_keys(reuse.result, to_score["prompt_token_ids"])
    to_score = to_score.append_column("store_key", keys)
    stored = reuse.store.lookup(to_score["query"], keys, to_score["instruction"])
    found = pc.is_in(keys, value_set=stored["key"])
    hits = to_score.filter(found)
    if hits.num_rows:
        judged = stored.take(pc.index_in(hits["store_key"], value_set=stored["key"]))
        scored = hits.select(PASSTHROUGH)
        for name in JUDGEMENT:
            scored = scored.append_column(name, judged[name])
        scored = (scorer_of(job)[0].stored_labels(scored)
                  .append_column("grade", pair_grades(scored, job.scoring.grades, job.scoring.aggregate))
                  .append_column("reused", pa.array([True] * scored.num_rows)))
        name = content_name(hits["query_id"], hits["doc_id"])
        write_results(conform(scored, SCORED_SCHEMA), ERRORS_SCHEMA.empty_table(), name, job, output,
                      scorer_of(job)[0].reasons)
    log.info("score store: %d of %d pairs reused", hits.num_rows, to_score.num_rows)
    return to_score.filter(pc.invert(found)), hits.drop_columns(["prompt_token_ids"])


def _encode(encoder, pairs: pa.Table) -> tuple[dict[str, pa.Array], pa.Array]:
    """The columns of each pair's encoding (null where it cannot fit), and for those, the reason."""
    encoded, too_long = [], []
    for row in pairs.select(["query", "text", "title", "instruction"]).to_pylist():
        try:
            encoded.append(encoder.encode(row["query"], row["text"], row["title"], row["instruction"]))
            too_long.append(None)
        except PromptTooLong as error:
            encoded.append(None), too_long.append(str(error))
    columns = {column: pa.array([None if item is None else getattr(item, field) for item in encoded],
                                PROMPTS_SCHEMA.field(column).type)
               for column, field in ENCODED_COLUMNS.items()}
    return columns, pa.array(too_long, pa.string())
