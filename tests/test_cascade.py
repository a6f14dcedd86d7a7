"""A second kind of scorer through the pipeline (--scorer cross-encoder) and the cascade of a
cross-encoder in front of Rank1, on a real local Ray with the two tiny models."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from rank1_batch.cli import main
from rank1_batch.config import JobConfig, ScoringConfig
from rank1_batch.model.cross_encoder import CrossEncoderRefused
from rank1_batch.model.scorer_kinds import CrossEncoderKind, scorer_kind
from rank1_batch.output.checkpoint import ConfigurationChanged
from rank1_batch.output.layout import CASCADE_DIR
from rank1_batch.run.cascade import cross_encoder_job
from rank1_batch.run.pipeline import run
from rank1_batch.run.ranking import with_first_stage
from rank1_batch.store.keys import result_identity

from .conftest import TINY_ENGINE, candidate_lists, pair_keys, read_dir, tiny_job, write_shards

# As the session's `cross_encoder` fixture runs it, so that a run's scores can be held to it.
CROSS_ENCODER = {"model": "tiny-cross-encoder", "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
                 "scorer": "cross-encoder"}
SORT = [("query_id", "ascending"), ("doc_id", "ascending")]


def cross_encoder_options(**options) -> dict:
    return {**CROSS_ENCODER, "batch_size": 16, **options}


# --- without an engine ---

@pytest.mark.parametrize("options, message", [
    ({"cascade_model": "m"}, "--cascade-model needs --top-k"),
    ({"cascade_model": "m", "top_k": 30, "cascade_top_k": 20}, "--top-k 30 is more than --cascade-top-k 20"),
    ({"cascade_model": "m", "top_k": 0}, "--top-k must be at least 1"),
    ({"cascade_model": "m", "top_k": 5, "cascade_top_k": 0}, "--cascade-top-k must be at least 1"),
    ({"cascade_top_k": 20}, "--cascade-top-k needs --cascade-model"),
    ({"cascade_model": "m", "top_k": 5, "scorer": "cross-encoder"}, "give --scorer rank1"),
    ({"cross_encoder_template": "pair"}, "applies to --scorer cross-encoder only"),
    ({"scorer": "cross-encoder", "cross_encoder_template": "monot5"}, "rankllama or pair"),
    ({"scorer": "cross-encoder", "cross_encoder_template": "rankllama", "labels": True}, "--labels needs a score that is a probability"),
    ({"scorer": "cross-encoder", "cross_encoder_template": "rankllama", "grades": "0.1,0.5,0.9"}, "--grades needs"),
    ({"scorer": "cross-encoder", "samples": 3, "temperature": 1.0}, "a cross-encoder reads a pair once"),
    ({"scorer": "cross-encoder", "labels": True, "labels_answered_only": True}, "no outcome"),
    ({"scorer": "monot5"}, "--scorer 'monot5'"),
])
def test_settings_that_make_no_sense_together_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.from_options({"model": "m", **options})


def test_a_sigmoid_cross_encoder_may_write_labels_and_the_template_defaults_to_pair():
    job = JobConfig.from_options({"model": "m", "scorer": "cross-encoder", "labels": True, "grades": "0.1,0.5,0.9"})
    assert job.scoring.cross_encoder_template == "pair"


def test_the_store_key_names_the_kind_and_template_and_rank1_keys_stay_as_they_were():
    rank1 = JobConfig.from_options({"model": "m"})
    assert "scorer" not in result_identity(rank1, "f")["scoring"]
    # the cascade in front of Rank1 decides none of Rank1's judgements
    cascaded = JobConfig.from_options({"model": "m", "cascade_model": "c", "top_k": 5})
    assert result_identity(cascaded, "f") == result_identity(rank1, "f")
    keys = {template: result_identity(JobConfig.from_options(
        {"model": "m", "scorer": "cross-encoder", "cross_encoder_template": template}), "f")["scoring"]
        for template in ("pair", "rankllama")}
    assert keys["pair"]["scorer"] == "cross-encoder" and keys["pair"] != keys["rankllama"]


def test_a_threshold_for_a_raw_logit_is_named_as_ineffective():
    job = JobConfig.from_options({"model": "m", "scorer": "cross-encoder", "cross_encoder_template": "rankllama",
                                  "threshold": 0.7})
    assert job.ineffective_options() == ["--threshold has no effect on a raw logit, which gets no label"]


def test_a_cross_encoders_label_is_its_sigmoid_at_the_threshold_and_a_logit_has_none():
    judged = pa.table({"score": [0.2, 0.7]})
    sigmoid = CrossEncoderKind(TINY_ENGINE, ScoringConfig(scorer="cross-encoder", threshold=0.6))
    assert sigmoid.stored_labels(judged)["label"].to_pylist() == [False, True]
    logit = scorer_kind(TINY_ENGINE, ScoringConfig(scorer="cross-encoder", cross_encoder_template="rankllama"))
    assert logit.stored_labels(judged)["label"].to_pylist() == [None, None]
    assert logit.describe() == {"kind": "cross-encoder", "template": "rankllama", "score": "logit"}


def test_another_stages_ranking_becomes_the_first_stage_and_a_pair_it_did_not_rank_has_none():
    pairs = pa.table({"query_id": ["q", "q", "q"], "doc_id": ["a", "b", "c"], "first_stage_rank": [1, 2, 3],
                      "first_stage_score": [9.0, 8.0, 7.0], "text": ["x", "y", "z"]})
    ranking = pa.table({"query_id": ["q", "q"], "doc_id": ["b", "a"], "rank": pa.array([1, 2], pa.int32()),
                        "score": [0.9, 0.1]})
    moved = {row["doc_id"]: row for row in with_first_stage(pairs, ranking).to_pylist()}
    assert (moved["b"]["first_stage_rank"], moved["b"]["first_stage_score"], moved["b"]["text"]) == (1, 0.9, "y")
    assert moved["a"]["first_stage_rank"] == 2
    assert moved["c"]["first_stage_rank"] is None and moved["c"]["first_stage_score"] is None


def test_the_cascades_cross_encoder_runs_on_its_own_model_into_the_outputs_subdirectory():
    job = JobConfig.from_options({"model": "m", "output": "s3://b/out/", "top_k": 5, "cascade_model": "c",
                                  "cascade_template": "rankllama", "cascade_top_k": 50, "samples": 3,
                                  "temperature": 1.0, "labels": True, "store": "s3://b/store"})
    first = cross_encoder_job(job)
    assert first.engine.model == "c" and first.engine.samples == 1 and first.engine.engine_args == {}
    assert first.scoring.cross_encoder_template == "rankllama" and first.run.top_k == 50
    assert first.run.output == f"s3://b/out/{CASCADE_DIR}" and not first.run.labels and first.run.store is None


# --- with a local Ray and the engines ---

@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidates")
    pairs = candidate_lists(queries=4, per_query=8, seed=23)
    write_shards(pairs, root / "input", shards=2)
    return pairs, root / "input"


@pytest.fixture(scope="module")
def cross_encoder_run(ray_session, candidates, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-encoder")
    job = JobConfig.from_options(cross_encoder_options(input=[str(candidates[1])], output=str(root / "output"),
                                                       store=str(root / "store"), labels=True))
    return job, root, run(job, show_progress=False)


def test_a_cross_encoder_run_scores_as_the_cross_encoder_scores_the_same_pairs(cross_encoder_run, candidates,
                                                                                 cross_encoder):
    job, root, manifest = cross_encoder_run
    scores = read_dir(root / "output" / "scores").sort_by(SORT)
    texts = {(row["query_id"], row["doc_id"]): row for row in candidates[0].to_pylist()}
    expected = cross_encoder.score([texts[key] for key in pair_keys(scores)])
    assert scores["score"].to_pylist() == pytest.approx(expected, abs=1e-5)
    assert scores["label"].to_pylist() == [score >= 0.5 for score in scores["score"].to_pylist()]
    for column in ("outcome", "logprob_true", "logprob_false", "reasoning_tokens", "samples", "agreement"):
        assert scores[column].null_count == scores.num_rows, column
    assert manifest["scorer"] == {"kind": "cross-encoder", "template": "pair", "score": "sigmoid"}
    assert manifest["counts"]["scored"] == candidates[0].num_rows == manifest["scored_this_run"]
    assert not (root / "output" / "traces").exists()  # nothing reasons
    labels = read_dir(root / "output" / "labels")
    assert labels.num_rows == scores.num_rows and labels["rationale"].null_count == labels.num_rows


def test_a_cross_encoder_run_ranks_by_its_score(cross_encoder_run):
    _, root, _ = cross_encoder_run
    ranked = read_dir(root / "output" / "ranked").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    for query_id in set(ranked["query_id"].to_pylist()):
        scores = ranked.filter(pc.equal(ranked["query_id"], query_id))["score"].to_pylist()
        assert scores == sorted(scores, reverse=True)


def test_a_cross_encoder_runs_report_has_its_scores_and_no_outcomes_or_reasoning(cross_encoder_run):
    _, root, _ = cross_encoder_run
    result = CliRunner().invoke(main, ["report", str(root / "output")])
    assert result.exit_code == 0, result.output
    report = (root / "output" / "report" / "report.md").read_text()
    assert "a cross-encoder with the `pair` template, scored by its sigmoid" in report
    assert "## Scores" in report and "labelled relevant" in report
    assert "## Outcomes" not in report and "## Reasoning length" not in report
    assert sorted(path.name for path in (root / "output" / "report").glob("*.png")) == ["rank-movement.png",
                                                                                      "score-histogram.png"]


def test_a_cross_encoder_run_has_no_reasoning_to_export(cross_encoder_run, tmp_path):
    _, root, _ = cross_encoder_run
    result = CliRunner().invoke(main, ["export", str(root / "output"), "--to", str(tmp_path / "examples.jsonl")])
    assert result.exit_code == 1 and "scored by a cross-encoder, which writes no reasoning to export" in result.output


def test_the_store_gives_a_cross_encoders_scores_back_without_an_engine(cross_encoder_run, candidates):
    job, root, first = cross_encoder_run
    again = run(JobConfig.from_options(cross_encoder_options(input=[str(candidates[1])], output=str(root / "again"),
                                                             store=str(root / "store"))), show_progress=False)
    assert again["store"]["hits"] == first["counts"]["scored"] and again["engine"]["starts"] == 0
    assert read_dir(root / "again" / "scores").sort_by(SORT)["score"] == read_dir(root / "output" / "scores").sort_by(SORT)["score"]


def test_a_changed_template_is_refused_on_resume_before_anything_is_written(cross_encoder_run, candidates):
    job, root, _ = cross_encoder_run
    before = (root / "output" / "_manifest.json").read_bytes()
    changed = JobConfig.from_options(cross_encoder_options(input=[str(candidates[1])], output=str(root / "output"),
                                                           cross_encoder_template="rankllama"))
    with pytest.raises(ConfigurationChanged, match="cross_encoder_template: 'pair' -> 'rankllama'"):
        run(changed, show_progress=False)
    assert (root / "output" / "_manifest.json").read_bytes() == before


def test_a_model_that_is_not_a_sequence_classifier_is_refused_before_anything_is_written(ray_session, candidates,
                                                                                         tmp_path):
    as_cross_encoder = JobConfig.from_options({**cross_encoder_options(input=[str(candidates[1])], output=str(tmp_path / "a")),
                                               "model": "tiny"})
    with pytest.raises(CrossEncoderRefused, match="tiny is not a sequence-classification model.*Qwen2ForCausalLM"):
        run(as_cross_encoder, show_progress=False)
    cascade = tiny_job(input=[str(candidates[1])], output=str(tmp_path / "b"), top_k=2, cascade_model="tiny")
    with pytest.raises(CrossEncoderRefused, match="tiny is not a sequence-classification model"):
        run(cascade, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The cascade: the cross-encoder over each query's top K = 6, Rank1 over the top k = 3 of its order.
TOP_K, CASCADE_TOP_K = 3, 6


def cascade_job(candidates, output, **options) -> JobConfig:
    return tiny_job(input=[str(candidates[1])], output=str(output), top_k=TOP_K, batch_size=8,
                    cascade_model="tiny-cross-encoder", cascade_top_k=CASCADE_TOP_K, cascade_dtype="float32",
                    cascade_max_model_len=256, **options)


@pytest.fixture(scope="module")
def cascade_run(ray_session, candidates, tmp_path_factory):
    output = tmp_path_factory.mktemp("cascade") / "output"
    return output, run(cascade_job(candidates, output), show_progress=False)


def test_rank1_judges_each_querys_top_k_of_the_cross_encoders_order(cascade_run, candidates):
    output, manifest = cascade_run
    first = read_dir(output / CASCADE_DIR / "scores")
    # the cross-encoder scored each query's top K by the input's first stage
    assert sorted(first["first_stage_rank"].to_pylist()) == sorted(list(range(1, CASCADE_TOP_K + 1)) * 4)
    order = read_dir(output / CASCADE_DIR / "ranked")
    best = order.filter(pc.less_equal(order["rank"], TOP_K))
    scores = read_dir(output / "scores")
    assert pair_keys(scores) == pair_keys(best)
    # both scores per pair: Rank1's, and the cross-encoder's as its first stage
    by_pair = {(row["query_id"], row["doc_id"]): row for row in best.to_pylist()}
    for row in scores.to_pylist():
        assert row["first_stage_score"] == by_pair[row["query_id"], row["doc_id"]]["score"]
        assert row["first_stage_rank"] == by_pair[row["query_id"], row["doc_id"]]["rank"]
    assert manifest["cascade"]["counts"]["scored"] == 4 * CASCADE_TOP_K
    assert manifest["counts"]["scored"] == 4 * TOP_K and manifest["counts"]["unscored"] == candidates[0].num_rows - 4 * TOP_K
    assert manifest["cascade"]["wall_seconds"] < manifest["wall_seconds"]


def test_the_cascades_ranking_puts_rank1s_top_k_above_the_rest_in_the_cross_encoders_order(cascade_run):
    output, _ = cascade_run
    ranked = read_dir(output / "ranked")
    order = {(row["query_id"], row["doc_id"]): row["rank"] for row in read_dir(output / CASCADE_DIR / "ranked").to_pylist()}
    for query_id in set(ranked["query_id"].to_pylist()):
        rows = ranked.filter(pc.equal(ranked["query_id"], query_id)).sort_by("rank").to_pylist()
        top, rest = rows[:TOP_K], rows[TOP_K:]
        assert all(row["score"] is not None for row in top) and all(row["score"] is None for row in rest)
        assert [row["score"] for row in top] == sorted((row["score"] for row in top), reverse=True)
        assert [order[query_id, row["doc_id"]] for row in rest] == list(range(TOP_K + 1, len(rows) + 1))


def test_a_cascade_resumes_both_runs_and_refuses_a_changed_template(cascade_run, candidates):
    output, first = cascade_run
    again = run(cascade_job(candidates, output), show_progress=False)
    assert again["scored_this_run"] == 0 and again["cascade"]["scored_this_run"] == 0
    assert again["engine"]["starts"] == 0 and again["counts"] == first["counts"]
    with pytest.raises(ConfigurationChanged, match="cascade.template: 'pair' -> 'rankllama'"):
        run(cascade_job(candidates, output, cascade_template="rankllama"), show_progress=False)
    assert json.loads((output / "_manifest.json").read_text())["counts"] == first["counts"]
