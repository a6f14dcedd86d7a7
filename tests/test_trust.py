"""The command line as a new user meets it: it never deletes what it did not write, refuses a bad
job before touching a finished output, names the model it uses, and fails loudly rather than
waiting or exiting 0 on a broken night."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from rank1_batch.cli import SAMPLE, main
from rank1_batch.run.follow import stall_message

from .conftest import candidate_lists, tiny_run_options, write_shards

CLI = str(Path(sys.executable).parent / "rank1-batch")
# The demo's own configuration, spelled as `run` options, so a run can meet a demo's output.
DEMO_OPTIONS = ["--input", str(SAMPLE), "--model", "tiny", "--dtype", "bfloat16", "--max-model-len", "2048",
                "--max-reasoning-tokens", "256", "--enforce-eager"]


def cli(*arguments: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *arguments], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory) -> Path:
    """`rank1-batch demo` without a directory: it makes a fresh one of its own, here."""
    here = tmp_path_factory.mktemp("demo")
    (here / "notes.txt").write_text("mine")
    finished = cli("demo", cwd=here)
    assert finished.returncode == 0, finished.stderr[-3000:]
    made = [path for path in here.iterdir() if path.name.startswith("rank1-demo-")]
    assert len(made) == 1 and (made[0] / "_manifest.json").exists()
    assert (here / "notes.txt").read_text() == "mine"
    # What a first run shows is the user's: none of Ray's notices about itself
    for notice in ("core_worker", "constructor arguments", "Token authentication", "Progress bars disabled"):
        assert notice not in finished.stderr, finished.stderr[-3000:]
    # and the next step it prints works as printed
    report = next(line.strip() for line in finished.stdout.splitlines() if line.startswith("  ") and " report " in line)
    reported = subprocess.run(shlex.split(report), capture_output=True, text=True, cwd=here, timeout=300)
    assert reported.returncode == 0 and (made[0] / "report" / "report.md").exists(), reported.stderr[-3000:]
    shutil.rmtree(made[0] / "report")
    return made[0]


@pytest.mark.integration
def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    before = snapshot(tmp_path)
    refused = cli("demo", str(tmp_path))
    assert refused.returncode != 0
    assert "thesis.tex" in refused.stderr and "did not write" in refused.stderr
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_an_output_rank1_batch_did_not_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("keep me")
    refused = CliRunner().invoke(main, ["run", *DEMO_OPTIONS, "--output", str(tmp_path / "out"), "--overwrite"])
    assert refused.exit_code != 0
    assert "results.csv" in refused.output and "--overwrite" not in refused.output
    assert (tmp_path / "out" / "results.csv").read_text() == "keep me"


def test_run_refuses_a_job_without_a_model(tmp_path):
    refused = CliRunner().invoke(main, ["run", "--input", str(SAMPLE), "--output", str(tmp_path / "out")])
    assert refused.exit_code != 0
    assert "no model: give --model" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, spec, message",
    [
        (["--min-engines", "4", "--max-engines", "2"], None, "--min-engines 4 is more than --max-engines 2"),
        (["--engines", "2", "--min-engines", "1"], None, "not both"),
        (["--min-engines", "0"], None, "--min-engines must be at least 1"),
        ([], {"device": "tpu"}, "--device 'tpu'"),
        (["--tensor-parallel-size", "0"], None, "--tensor-parallel-size must be at least 1"),
        (["--threshold", "1.5"], None, "--threshold must be in [0, 1]"),
        (["--task-template", "Find passages about the topic."], None, "must contain FILL_QUERY_HERE"),
        (["--engine-arg", "max_model_len=99"], None, "--engine-arg max_model_len: set by its own option"),
        (["--engine-arg", "block_size=16"], None, "--engine-arg block_size"),
        (["--fit", "squeeze"], None, "--fit"),
        (["--max-concurrent-batches", "0"], None, "--max-concurrent-batches must be at least 1"),
        # the label pass reads answered pairs' labels from the prefix their main pass cached
        (["--no-enable-prefix-caching"], None, "engine.enable_prefix_caching: True -> False"),
        (["--fit", "budget"], None, "engine.fit: 'reference' -> 'budget'"),
    ],
)
def test_a_refused_rerun_leaves_a_finished_run_as_it_was(finished_demo, tmp_path, options, spec, message):
    before = snapshot(finished_demo)
    config = []
    if spec is not None:
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        config = ["--config", str(tmp_path / "spec.yaml")]
    refused = CliRunner().invoke(main, ["run", *config, *DEMO_OPTIONS, "--output", str(finished_demo), *options])
    assert refused.exit_code != 0
    assert message in refused.output
    assert snapshot(finished_demo) == before
    reported = CliRunner().invoke(main, ["report", str(finished_demo)])
    assert reported.exit_code == 0, reported.output
    shutil.rmtree(finished_demo / "report")


def test_yesterdays_command_resumes_an_output_made_before_fit_and_prefix_caching_were_options(
        ray_session, finished_demo, tmp_path):
    """An upgrade must not refuse yesterday's outputs: one whose `_job.json` predates both options
    resumes under the same command as it ran then (`budget`, caching on), and says so in its
    `_job.json`; asking for the new default policy on it is a change of configuration."""
    output = tmp_path / "yesterday"
    shutil.copytree(finished_demo, output)
    recorded = json.loads((output / "_job.json").read_text())
    for option in ("fit", "enable_prefix_caching"):
        del recorded["engine"][option]
    (output / "_job.json").write_text(json.dumps(recorded))
    scores = snapshot(output / "scores")

    resumed = CliRunner().invoke(main, ["run", *DEMO_OPTIONS, "--output", str(output)])
    assert resumed.exit_code == 0, resumed.output
    engine = json.loads((output / "_job.json").read_text())["engine"]
    assert engine["fit"] == "budget" and engine["enable_prefix_caching"] is True
    assert json.loads((output / "_manifest.json").read_text())["job"]["engine"]["fit"] == "budget"
    assert snapshot(output / "scores") == scores  # nothing scored again

    refused = CliRunner().invoke(main, ["run", *DEMO_OPTIONS, "--output", str(output), "--fit", "reference"])
    assert refused.exit_code != 0 and "engine.fit: 'budget' -> 'reference'" in refused.output


@pytest.mark.integration
def test_options_without_effect_are_named(tmp_path):
    warned = cli("run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--model", "tiny",
                 "--answered-only", "--no-labels", "--run-tag", "nightly", "--no-trec-run")
    assert warned.returncode != 0  # the input is missing: the warnings come first
    assert "--answered-only has no effect without --labels" in warned.stderr
    assert "--run-tag has no effect with --no-trec-run" in warned.stderr

    unfillable = cli("run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--model", "tiny",
                     "--batch-size", "16", "--max-concurrent-batches", "2", "--max-num-seqs", "256")
    assert "16 x --max-concurrent-batches 2 = 32 pairs in flight cannot fill --max-num-seqs 256" in unfillable.stderr


def test_engines_that_cannot_be_placed_are_refused_at_once(ray_session, tmp_path):
    """On the session's 2-CPU local Ray: two engines leave no CPU to build prompts, and there is
    no GPU. A pool on the command line replaces the job spec's (here, an autoscaling one)."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"min_engines": 1, "max_engines": 8, "device": "cpu"}))
    started = time.monotonic()
    too_many = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "spec.yaml"), *DEMO_OPTIONS,
                                         "--output", str(tmp_path / "a"), "--engines", "2"])
    assert too_many.exit_code != 0
    assert "needs 2.5 CPU, 0 GPU (2 engine(s) of 1 CPU each, plus 0.5 CPU to build prompts)" in too_many.output
    assert "has 2 CPU, 0 GPU" in too_many.output
    no_gpu = CliRunner().invoke(main, ["run", *DEMO_OPTIONS, "--output", str(tmp_path / "b"), "--device", "gpu"])
    assert no_gpu.exit_code != 0 and "1 GPU" in no_gpu.output and "has 2 CPU, 0 GPU" in no_gpu.output
    assert time.monotonic() - started < 60
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_output_held_by_a_live_run_is_refused(ray_session, finished_demo):
    me = psutil.Process()
    holder = {"run_id": "0123456789ab", "host": socket.gethostname(), "pid": me.pid,
              "process_started": me.create_time(), "started": time.time(), "heartbeat": time.time()}
    (finished_demo / "_lease.json").write_text(json.dumps(holder))
    try:
        before = snapshot(finished_demo)
        refused = CliRunner().invoke(main, ["run", *DEMO_OPTIONS, "--output", str(finished_demo), "--overwrite"])
        assert refused.exit_code != 0
        assert f"held by run 0123456789ab (process {me.pid} on {socket.gethostname()}" in refused.output
        assert snapshot(finished_demo) == before
    finally:
        (finished_demo / "_lease.json").unlink()


def test_a_run_where_every_pair_fails_exits_non_zero(ray_session, tmp_path):
    pairs = candidate_lists(queries=1, per_query=4, seed=5).drop_columns(["relevant"])
    pairs = pairs.set_column(pairs.column_names.index("text"), "text", [" "] * 4)
    write_shards(pairs, tmp_path / "input", shards=1)
    failed = CliRunner().invoke(main, ["run", "--input", str(tmp_path / "input"), "--output", str(tmp_path / "out"),
                                       *tiny_run_options(max_failed_share=1.0)])
    assert failed.exit_code != 0
    assert "4 of 4 pairs to rerank (100.0%) were rejected or fell back" in failed.output
    assert (tmp_path / "out" / "_manifest.json").exists()  # everything else was written
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["engine"]["starts"] == 0  # nothing to judge


def test_the_failed_share_counts_only_the_pairs_to_rerank(ray_session, tmp_path):
    """One of the two pairs within --top-k 1 is rejected: half the night's reranking failed, however
    many candidates lie beyond the top k (here 38, which would dilute it to 2.5 %)."""
    pairs = candidate_lists(queries=2, per_query=20, seed=6).drop_columns(["relevant"])
    texts = pairs["text"].to_pylist()
    first = pairs["first_stage_rank"].to_pylist().index(1)
    texts[first] = " "
    write_shards(pairs.set_column(pairs.column_names.index("text"), "text", pa.array(texts)), tmp_path / "input", shards=1)
    options = ["run", "--input", str(tmp_path / "input"), "--output", str(tmp_path / "out")]
    failed = CliRunner().invoke(main, [*options, *tiny_run_options(top_k=1)])
    assert failed.exit_code != 0
    assert "1 of 2 pairs to rerank (50.0%) were rejected or fell back" in failed.output
    counts = json.loads((tmp_path / "out" / "_manifest.json").read_text())["counts"]
    assert (counts["rejected"], counts["unscored"], counts["scored"]) == (1, 38, 1)
    # a share the user accepts: the re-run resumes (nothing is left to score) and exits 0
    accepted = CliRunner().invoke(main, [*options, *tiny_run_options(top_k=1, max_failed_share=0.6)])
    assert accepted.exit_code == 0, accepted.output


def test_overwrite_removes_only_what_a_run_wrote_and_a_stall_fails_the_run(finished_demo, tmp_path):
    """--overwrite on a finished output beside a user's file: the layout's paths go, the file stays.
    The run is then stopped by the stall watchdog, as its engine needs longer than 5 s to start."""
    output = tmp_path / "copy"
    shutil.copytree(finished_demo, output)
    (output / "notes.txt").write_text("mine")
    (output / ".run.trec.tmp").write_text("half a run written when a run was killed")
    stalled = cli("run", *DEMO_OPTIONS, "--output", str(output), "--overwrite", "--threshold", "0.7",
                  "--stall-timeout", "5")
    assert stalled.returncode != 0
    assert "no batch committed for 5 s (--stall-timeout) after 0 of 160 pairs" in stalled.stderr
    assert "the score stage has not committed its first batch" in stalled.stderr
    assert (output / "notes.txt").read_text() == "mine"
    assert not (output / "_manifest.json").exists() and not (output / "run.trec").exists()
    assert not (output / ".run.trec.tmp").exists()
    assert not (output / "_lease.json").exists()  # released on the way out
    assert json.loads((output / "_job.json").read_text())["scoring"]["threshold"] == 0.7


def test_a_stall_names_the_stage_that_holds_the_work():
    def stage(states: dict, in_flight: int) -> str:
        return stall_message(5, 10, 160, Counter(states), in_flight).split(": ", 2)[2]

    assert stage({"PENDING_CREATION": 1, "ALIVE": 1}, 0).startswith("1 engine actor(s) still starting")
    assert stage({"ALIVE": 2}, 3).startswith("2 engine actor(s) scoring 3 batch(es)")
    assert "the prepare stage (reading the input, building prompts)" in stage({"ALIVE": 2}, 0)
    assert stage({}, 0).startswith("no engine actor has been placed")


@pytest.mark.own_processes
def test_a_run_whose_output_is_taken_over_stops_writing_and_leaves_the_successor(tmp_path):
    """Another run takes the output over, as one does after this run's heartbeat stalled past
    --lease-timeout: no batch is committed after the run's workers next look at the lease (every
    1 s here; the driver's own renewal, every 3 s, may notice first), and nothing more is written:
    had the last batches beaten that look, the driver's own read before ranking would stop the run.
    The run fails, and the successor's lease stays. The 200 batches take several seconds to commit
    here (50 took under 2 s), so the takeover lands well before the last one. The run is a process
    of its own: Ray Data keeps a failed dataset's engine actor until Python's cyclic garbage
    collection frees it, which in the session's shared Ray would starve the tests after this one."""
    write_shards(candidate_lists(queries=40, per_query=10, seed=12).drop_columns(["relevant"]), tmp_path / "input",
                 shards=1)
    output = tmp_path / "out"
    taken = []

    def take_over():
        deadline = time.monotonic() + 300
        while not list((output / "scores").glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        successor = {"run_id": "next0run", "host": "another-head", "pid": 1, "process_started": 0.0,
                     "started": time.time(), "heartbeat": time.time()}
        (output / "_lease.json").write_text(json.dumps(successor))
        taken.append(time.time())

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    stopped = subprocess.run([CLI, "run", "--input", str(tmp_path / "input"), "--output", str(output),
                              *tiny_run_options(batch_size=2, lease_timeout=12)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    thread.join(timeout=10)
    assert stopped.returncode != 0 and taken
    assert "held by run next0run" in stopped.stdout or "another run took over" in stopped.stdout, stopped.stdout
    committed = list((output / "scores").glob("*.parquet"))
    assert len(committed) < 200  # of the 200 batches
    assert not [path.name for path in committed if path.stat().st_mtime > taken[0] + 4]
    assert not (output / "_manifest.json").exists() and not (output / "ranked").exists()
    assert json.loads((output / "_lease.json").read_text())["run_id"] == "next0run"
