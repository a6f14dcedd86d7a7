"""A request that fails inside the engine is a row error, not a failed batch, and a pair that
kills the engine twice is one too: the score stage's actor, on its real async engine (no Ray
around it)."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rank1_batch.run.prompts import PROMPTS_SCHEMA
from rank1_batch.run.scoring import ScorePairs

from rank1_batch.config import RunConfig
from rank1_batch.model.encoding import PromptEncoder
from rank1_batch.output.layout import DEATHS_DIR
from rank1_batch.output.storage import Output, content_name
from rank1_batch.run.engine_watch import EngineDeaths
from rank1_batch.schema import ERRORS_SCHEMA

from .conftest import tiny_job

OUT_OF_VOCABULARY = 10_000_000
# The actor starts its own engine in this process.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    output = tmp_path_factory.mktemp("row-errors")
    job = tiny_job(input=["unused"], output=str(output))
    scorer = ScorePairs(job, Output(str(output), RunConfig()))
    scorer.start_engine()  # as its first batch with a pair to judge would
    # One event loop for the actor's life, as in a Ray actor: the engine's output handler lives on it.
    loop = asyncio.new_event_loop()
    scorer.call = lambda batch: loop.run_until_complete(scorer(batch))
    yield scorer, job, output
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
    counts = scorer.call(prompts_batch(job)).to_pylist()[0]
    assert counts["pairs"] == 2 and counts["errors"] == 1 and sum(counts[o] for o in ("answered", "forced", "fallback")) == 1
    scores = pq.read_table(output / "scores")
    assert scores["doc_id"].to_pylist() == ["d1"]
    errors = pq.read_table(output / "errors")
    assert errors.schema.equals(ERRORS_SCHEMA) and errors["doc_id"].to_pylist() == ["d2"]
    assert str(OUT_OF_VOCABULARY) in errors["error"][0].as_py()  # the engine's own message

    # A retry of the same batch in which the pair succeeds rewrites the same commit and clears its error.
    name = (output / "scores").iterdir().__next__().name
    retried = scorer.call(good_batch(job))
    assert retried.to_pylist()[0]["errors"] == 0
    assert [path.name for path in (output / "scores").iterdir()] == [name]
    assert sorted(pq.read_table(output / "scores")["doc_id"].to_pylist()) == ["d1", "d2"]
    assert not list((output / "errors").iterdir())


def good_batch(job) -> pa.Table:
    return prompts_batch(job, ids_of_second=prompts_batch(job)["prompt_token_ids"][0].as_py())


def after_engine_deaths(scorer, batch: pa.Table, *alone) -> dict:
    """The batch as an actor that Ray restarted scores it, after engine deaths with it in flight,
    each with `alone` the pair it had alone in the engine."""
    deaths = EngineDeaths(scorer.output)
    name = content_name(batch["query_id"], batch["doc_id"])
    for pair in alone:
        deaths.record({name: pair})
    scorer.restarted = True
    try:
        return scorer.call(batch).to_pylist()[0]
    finally:
        scorer.restarted = False


def test_a_batch_in_flight_at_an_engine_death_is_scored_one_at_a_time(actor):
    scorer, job, output = actor
    scorer.call(good_batch(job))
    together = pq.read_table(output / "scores").sort_by("doc_id")
    counts = after_engine_deaths(scorer, good_batch(job), None)
    alone = pq.read_table(output / "scores").sort_by("doc_id")
    assert counts["errors"] == 0 and alone["doc_id"].to_pylist() == ["d1", "d2"]
    assert alone["score"].to_pylist() == pytest.approx(together["score"].to_pylist(), abs=1e-6)
    assert not list((output / DEATHS_DIR).iterdir())  # the record goes with the commit


def test_a_pair_that_killed_the_engine_twice_is_a_row_error(actor):
    scorer, job, output = actor
    counts = after_engine_deaths(scorer, good_batch(job), None, ("q1", "d2"))
    assert counts["errors"] == 1 and counts["answered"] + counts["forced"] + counts["fallback"] == 1
    errors = pq.read_table(output / "errors")
    assert errors["doc_id"].to_pylist() == ["d2"] and "died twice" in errors["error"][0].as_py()
    assert pq.read_table(output / "scores")["doc_id"].to_pylist() == ["d1"]
    assert not list((output / DEATHS_DIR).iterdir())


def test_the_async_engine_schedules_as_many_sequences_as_the_batch_engine(actor, scorer):
    """vLLM sizes its scheduler by how it is started: the score stage's engine must get the limits
    of an offline `vllm.LLM`, not those of a server's engine (half as many sequences per step here)."""
    stage, _, _ = actor
    batch_engine = scorer.engine.llm.llm_engine.vllm_config.scheduler_config
    stage_engine = stage.engine.llm.vllm_config.scheduler_config
    limits = ("max_num_seqs", "max_num_batched_tokens")
    assert [getattr(stage_engine, name) for name in limits] == [getattr(batch_engine, name) for name in limits]
