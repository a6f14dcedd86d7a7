"""Self-consistency: each pair judged several times, its reasoning sampled. The seeds and what a
resume and the score store make of sampled judgements, without an engine; then the scorer on the
session's engine, and one sampled run on the session's Ray, resumed and reused from its store."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rank1_batch.config import EngineConfig, RunConfig, ScoringConfig
from rank1_batch.model.engine import sample_seeds
from rank1_batch.model.judgement import consensus
from rank1_batch.model.scorer import Pair
from rank1_batch.model.scorer_kinds import Rank1Kind
from rank1_batch.output.checkpoint import ConfigurationChanged, check_output, identity
from rank1_batch.output.layout import JOB_FILE
from rank1_batch.output.storage import Output
from rank1_batch.run.pipeline import run

from .conftest import candidate_lists, pair_keys, read_dir, tiny_job, write_shards

# The tiny model is sure of itself: at 0.8 its samples of these pairs are all alike.
SAMPLED = {"samples": 3, "temperature": 1.5, "max_reasoning_tokens": 32}
SORT = [("query_id", "ascending"), ("doc_id", "ascending")]


# --- without an engine ---

def test_each_sample_has_a_seed_of_its_own_from_the_jobs_seed_and_the_prompt():
    prompt = [151644, 8, 99, 1024, 7, 151667]
    seeds = sample_seeds(0, prompt, 3)
    assert seeds == sample_seeds(0, list(prompt), 3) and len(set(seeds)) == 3
    assert sample_seeds(0, prompt, 1) == seeds[:1]  # more samples add seeds, never change the first ones
    assert set(sample_seeds(1, prompt, 3)).isdisjoint(seeds)
    assert set(sample_seeds(0, prompt[:-1], 3)).isdisjoint(seeds)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_an_output_made_before_the_sampling_options_resumes_as_greedy(tmp_path):
    """Its `_job.json` lacks them: it ran one greedy judgement per pair, so the defaults resume it."""
    output = Output(str(tmp_path / "out"), RunConfig())
    greedy = tiny_job(output=str(tmp_path / "out"))
    recorded = identity(greedy)
    for option in ("samples", "temperature", "top_p"):
        del recorded["engine"][option]
    output.write_bytes(JOB_FILE, json.dumps(recorded).encode())
    check_output(output, greedy)
    with pytest.raises(ConfigurationChanged, match=r"engine.samples: 1 -> 3; engine.temperature: 0.0 -> 0.8"):
        check_output(output, tiny_job(output=str(tmp_path / "out"), samples=3, temperature=0.8))


def test_a_reused_judgement_takes_its_label_and_agreement_from_its_samples_at_the_runs_threshold():
    stored = pa.table({"score": [0.5, 0.6], "sample_scores": pa.array([[0.8, 0.4, 0.3], None], pa.list_(pa.float64()))})
    reused = Rank1Kind(EngineConfig(), ScoringConfig(threshold=0.35)).stored_labels(stored)
    assert reused["label"].to_pylist() == [True, True]
    assert reused["agreement"].to_pylist() == [pytest.approx(2 / 3), 1.0]
    # a judgement stored before the samples were kept is one sample, its score
    assert reused["samples"].to_pylist() == [3, 1] and reused["sample_scores"].to_pylist()[1] == [0.6]
    assert Rank1Kind(EngineConfig(), ScoringConfig(threshold=0.5)).stored_labels(stored)["label"].to_pylist() == [False, True]


# --- the scorer, on the session's engine ---

@pytest.fixture(scope="module")
def pairs() -> pa.Table:
    return candidate_lists(queries=2, per_query=4, seed=17)


def as_pairs(table: pa.Table) -> list[Pair]:
    return [Pair(row["query"], row["text"]) for row in table.to_pylist()]


@pytest.fixture(scope="module")
def sampled(scorer, pairs):
    return scorer.with_options(**SAMPLED).score(as_pairs(pairs))


def test_samples_are_drawn_and_agreed_on(sampled):
    for result in sampled:
        assert result.samples == 3 and len(result.sample_scores) == 3
        together = consensus(result.sample_scores, 0.5)
        assert (result.score, result.label, result.agreement) == (together.score, together.label, together.agreement)
        assert result.agreement in (pytest.approx(2 / 3), 1.0)
    # sampled, not three greedy chains: the samples of some pair differ
    assert any(len(set(result.sample_scores)) > 1 for result in sampled)


def test_a_seed_makes_the_samples_repeatable_whatever_the_batch(scorer, pairs, sampled):
    again = scorer.with_options(**SAMPLED).score(as_pairs(pairs)[::-1])[::-1]
    assert [r.sample_scores for r in again] == [r.sample_scores for r in sampled]
    assert [r.reasoning for r in again] == [r.reasoning for r in sampled]
    other_seed = scorer.with_options(seed=1, **SAMPLED).score(as_pairs(pairs))
    assert [r.sample_scores for r in other_seed] != [r.sample_scores for r in sampled]
    # the first sample is the same whether one or three are drawn
    one = scorer.with_options(**{**SAMPLED, "samples": 1}).score(as_pairs(pairs))
    assert [r.sample_scores for r in one] == [r.sample_scores[:1] for r in sampled]


def test_one_greedy_sample_is_the_judgement_of_before(scorer, pairs):
    """The default: the one main pass it always was (the reference's greedy parameters, asked
    once), and the scores it always gave (checked against the reference in test_engine)."""
    passes = scorer.engine.passes
    prompt_ids = scorer.encoder.encode(pairs["query"][0].as_py(), pairs["text"][0].as_py()).token_ids
    (main_pass,) = passes.main_passes(prompt_ids)
    assert main_pass is passes.main_pass(prompt_ids) and main_pass.temperature == 0.0 and main_pass.seed is None
    for result in scorer.score(as_pairs(pairs)):
        assert (result.samples, result.sample_scores, result.agreement) == (1, [result.score], 1.0)
        assert result.label == (result.score >= 0.5)


# --- a sampled run, resumed, and reused from its store ---

@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, pairs):
    """One sampled run with a store; the same run again into its output (a resume of a finished
    run), and into a new output (every pair from the store)."""
    root = tmp_path_factory.mktemp("sampled")
    write_shards(pairs, root / "input", shards=2)

    def sampled_run(output: str) -> dict:
        job = tiny_job(input=[str(root / "input")], output=str(root / output), store=str(root / "store"),
                       batch_size=4, labels=True, **SAMPLED)
        return run(job, show_progress=False)

    manifests = [sampled_run(output) for output in ("output", "output", "reused")]
    return root, manifests


def scores_of(root, output: str) -> pa.Table:
    return read_dir(root / output / "scores").sort_by(SORT)


def test_a_sampled_run_writes_the_scorers_samples_and_agreement(runs, pairs, sampled):
    root, _ = runs
    scores = scores_of(root, "output")
    assert pair_keys(scores) == pair_keys(pairs)
    by_pair = dict(zip(zip(pairs["query_id"].to_pylist(), pairs["doc_id"].to_pylist()), sampled))
    for row in scores.to_pylist():
        mine = by_pair[(row["query_id"], row["doc_id"])]
        assert row["samples"] == 3 and row["sample_scores"] == pytest.approx(mine.sample_scores, abs=1e-6)
        assert row["agreement"] == mine.agreement and row["label"] == mine.label and row["outcome"] == mine.outcome
    traces = read_dir(root / "output" / "traces").sort_by(SORT)
    assert traces["reasoning"].to_pylist() == [by_pair[key].reasoning for key in pair_keys(traces)]
    labels = read_dir(root / "output" / "labels").sort_by(SORT)
    assert labels["label"].to_pylist() == scores["label"].to_pylist()


def test_a_sampled_run_resumes_without_judging_again(runs, pairs):
    _, (first, again, _) = runs
    assert first["scored_this_run"] == pairs.num_rows and first["store"]["misses"] == pairs.num_rows
    assert again["scored_this_run"] == 0 and again["engine"]["starts"] == 0


def test_the_store_gives_the_samples_back(runs, pairs):
    root, (_, _, reused) = runs
    assert reused["store"]["hits"] == pairs.num_rows and reused["engine"]["starts"] == 0
    before, after = scores_of(root, "output"), scores_of(root, "reused")
    assert after["reused"].to_pylist() == [True] * pairs.num_rows
    for column in ("score", "label", "samples", "sample_scores", "agreement", "outcome", "reasoning_tokens"):
        assert after[column].to_pylist() == before[column].to_pylist(), column
