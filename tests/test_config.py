from pathlib import Path

import click
import pytest

from rank1_batch.options import job_config
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
