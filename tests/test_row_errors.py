"""A request that fails inside the engine is a row error, not a failed batch: the score stage's
actor, on its real async engine (no Ray around it)."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_batch.config import RunConfig
from rank1_batch.model.encoding import PromptEncoder
from rank1_batch.schema import ERRORS_SCHEMA
from rank1_batch.job.stages import PROMPTS_SCHEMA, ScorePairs
from rank1_batch.job.storage import Output

from .conftest import tiny_job

OUT_OF_VOCABULARY = 10_000_000


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    output = tmp_path_factory.mktemp("row-errors")
    job = tiny_job(input=["unused"], output=str(output))
    scorer = ScorePairs(job, Output(str(output), RunConfig()))
    # One event loop for the actor's life, as in a Ray actor: the engine's output handler lives on it.
    loop = asyncio.new_event_loop()
    yield (lambda batch: loop.run_until_complete(scorer(batch))), job, output
    scorer.engine.shutdown()
    loop.close()


def prompts_batch(job, ids_of_second: list[int] | None = None) -> pa.Table:
    encoder = PromptEncoder.for_model(job.engine, job.scoring)
    good = encoder.encode("how tall is the tower in Ardel", "The tower in Ardel is 40 metres tall.")
    rows = [
        {"query_id": "q1", "doc_id": "d1", "query": "q", "text": "t", "prompt_token_ids": good.token_ids, "truncated": False},
        {"query_id": "q1", "doc_id": "d2", "query": "q", "text": "t",
         "prompt_token_ids": ids_of_second or [*good.token_ids[:-1], OUT_OF_VOCABULARY], "truncated": False},
    ]
    return pa.Table.from_pylist(rows, PROMPTS_SCHEMA)


def test_a_failing_request_is_recorded_and_the_rest_committed(actor):
    scorer, job, output = actor
    counts = scorer(prompts_batch(job)).to_pylist()[0]
    assert counts["pairs"] == 2 and counts["errors"] == 1 and sum(counts[o] for o in ("answered", "forced", "fallback")) == 1
    scores = pq.read_table(output / "scores")
    assert scores["doc_id"].to_pylist() == ["d1"]
    errors = pq.read_table(output / "errors")
    assert errors.schema.equals(ERRORS_SCHEMA) and errors["doc_id"].to_pylist() == ["d2"]
    assert str(OUT_OF_VOCABULARY) in errors["error"][0].as_py()  # the engine's own message

    # A retry of the same batch in which the pair succeeds rewrites the same commit and clears its error.
    name = (output / "scores").iterdir().__next__().name
    retried = scorer(prompts_batch(job, ids_of_second=prompts_batch(job)["prompt_token_ids"][0].as_py()))
    assert retried.to_pylist()[0]["errors"] == 0
    assert [path.name for path in (output / "scores").iterdir()] == [name]
    assert sorted(pq.read_table(output / "scores")["doc_id"].to_pylist()) == ["d1", "d2"]
    assert not list((output / "errors").iterdir())
