from pathlib import Path

import click
import pytest

from rank1_batch.cli_options import job_config
from rank1_batch.config import TINY_MODEL_DIR, EngineConfig, JobConfig, ScoringConfig, load_options
from rank1_batch.model.encoding import FORCED_PASS_ROOM, ContextTooShort, PromptEncoder, PromptTooLong, context_length

JOBS = Path(__file__).parent.parent / "jobs"


def test_flat_options_land_in_their_parts():
    job = JobConfig.from_options({"model": "m", "max-reasoning-tokens": 64, "threshold": 0.7, "input": "a.parquet"})
    assert job.engine.model == "m"
    assert job.engine.max_reasoning_tokens == 64
    assert job.scoring.threshold == 0.7
    assert job.run.input == ("a.parquet",)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="max_tokens"):
        JobConfig.from_options({"max_tokens": 5})


def test_tiny_resolves_to_the_bundled_model():
    assert JobConfig.from_options({"model": "tiny"}).engine.model_path == str(TINY_MODEL_DIR)
    assert JobConfig.from_options({"model": "org/name"}).engine.model_path == "org/name"


@pytest.mark.parametrize("spec", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_specs_load(spec):
    job = JobConfig.from_options(load_options(spec))
    assert job.engine.model.startswith("jhu-clsp/rank1")


def test_command_line_wins_over_the_spec():
    given = {"input": ("in.parquet",), "output": "out", "model": "tiny", "top_k": None, "columns": ("text=body",),
             "engine_args": ("swap_space=8",), "engines": 2}
    job = job_config(str(JOBS / "nightly_rerank.yaml"), given)
    assert job.engine.model == "tiny"
    assert job.run.top_k == 100  # not given on the command line: the spec's value stays
    assert job.run.columns == {"text": "body"}
    assert job.engine.engine_args == {"swap_space": 8}
    # A pool on the command line replaces the spec's autoscaling bounds rather than clashing with them.
    assert (job.run.engines, job.run.min_engines, job.run.max_engines) == (2, None, None)


def test_bad_option_value_is_a_usage_error():
    with pytest.raises(click.BadParameter) as error:
        job_config(None, {"columns": ("nonsense",)})
    assert "--column" in error.value.format_message()


def test_context_is_the_references_unless_the_model_has_less():
    assert context_length(EngineConfig(model="tiny")) == 4096  # the bundled model's own
    assert context_length(EngineConfig(model="tiny", max_model_len=1024)) == 1024


def test_budget_that_leaves_no_room_for_a_prompt_is_refused_with_what_to_change():
    with pytest.raises(ContextTooShort, match="max_reasoning_tokens 8192 .* 4096-token context .*--max-reasoning-tokens"):
        PromptEncoder.for_model(EngineConfig(model="tiny", fit="budget"), ScoringConfig())


def test_reference_fit_keeps_a_prompt_whole_and_leaves_it_the_room_there_is():
    encoder = PromptEncoder.for_model(EngineConfig(model="tiny"), ScoringConfig())  # budget 8192 > context 4096
    assert encoder.reasoning_budget(100) == 4096 - 100 - FORCED_PASS_ROOM
    assert encoder.reasoning_budget(encoder.prompt_limit) == 1  # the longest prompt kept: one reasoning token
    query = "what is the river of Old Vale"
    fits = encoder.encode(query, "The river of Old Vale is the Esk. " * 400)
    assert len(fits.token_ids) > 3000 and not fits.truncated
    with pytest.raises(PromptTooLong, match=r"takes \d+ tokens, more than the 4091 that max_model_len 4096 .*--fit budget"):
        encoder.encode(query, "The river of Old Vale is the Esk. " * 1000)
    small_budget = PromptEncoder.for_model(EngineConfig(model="tiny", max_reasoning_tokens=128), ScoringConfig())
    assert small_budget.reasoning_budget(100) == 128


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, "--samples must be at least 1"),
    ({"samples": 3}, "--samples 3 at --temperature 0 would judge each pair the same way 3 times"),
    ({"samples": 3, "temperature": -0.5}, r"--temperature must be in \[0, 2\]"),
    ({"samples": 3, "temperature": 2.5}, r"--temperature must be in \[0, 2\], not 2.5"),
    ({"temperature": 0.8, "top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    ({"temperature": 0.8, "top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
])
def test_sampling_options_are_checked_together(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="tiny", **options)


def test_sampling_options_are_floats_however_given():
    """A job spec's `temperature: 1` and the command line's `--temperature 1` are one job."""
    engine = JobConfig.from_options({"samples": 3, "temperature": 1, "top_p": 1}).engine
    assert (engine.samples, engine.temperature, engine.top_p) == (3, 1.0, 1.0)
    assert isinstance(engine.temperature, float) and isinstance(engine.top_p, float)


def test_top_p_without_sampling_is_named_as_ineffective():
    assert "--top-p has no effect at --temperature 0 (greedy)" in JobConfig.from_options({"top_p": 0.9}).ineffective_options()
    assert JobConfig.from_options({"temperature": 0.7, "top_p": 0.9}).ineffective_options() == []


def test_the_samples_of_the_pairs_in_flight_fill_the_engine():
    job = {"batch_size": 16, "max_concurrent_batches": 2, "max_num_seqs": 64}
    assert "= 32 pairs in flight cannot fill --max-num-seqs 64" in " ".join(JobConfig.from_options(job).ineffective_options())
    assert JobConfig.from_options({**job, "samples": 2, "temperature": 0.7}).ineffective_options() == []
    short = JobConfig.from_options({**job, "max_num_seqs": 128, "samples": 3, "temperature": 0.7}).ineffective_options()
    assert short == ["--batch-size 16 x --max-concurrent-batches 2 = 32 pairs in flight of 3 samples each cannot fill "
                     "--max-num-seqs 128"]
