"""The command line: parses options into one JobConfig and hands it on."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import click

from .cli_options import engine_options, job_config, run_options
from .cluster.submit import logs_command, status_command, stop_command, submit_command
from .config import JobConfig, JobError, job_logging
from .ir.evaluate import eval_command
from .ir.export import export_command
from .ir.labels import agreement_command, calibrate_command
from .ir.prepare import prepare_command
from .ir.qrels import qrels_command
from .model.encoding import ContextTooShort
from .report.summary import report_command
from .review.commands import review_group
from .run.scoring import EngineStartError
from .schema import InputError
from .store.commands import store_group

SAMPLE = Path(__file__).parent / "assets" / "sample"
# Errors whose own message says what is wrong and where.
JOB_ERRORS = (JobError, InputError, EngineStartError, ContextTooShort, FileNotFoundError)

log = logging.getLogger("rank1_batch")


@click.group()
@click.version_option(package_name="rank1-batch")
def main():
    """Rerank query-candidate pairs with Rank1 reasoning rerankers on Ray Data and vLLM."""
    job_logging()


@main.command()
@run_options
@engine_options
def run(config_path, **given):
    """Score, rank and write every pair of --input under --output."""
    job = job_config(config_path, given)
    if not job.run.input or not job.run.output:
        raise click.UsageError("--input and --output are required (on the command line or in --config)")
    run_and_report(job)


def run_and_report(job: JobConfig) -> None:
    """Run the job, print its summary, and exit non-zero when too many pairs failed."""
    from .run.pipeline import run as run_job

    for warning in job.ineffective_options():
        log.warning(warning)
    with sigterm_as_exit():
        manifest = report_errors(run_job, job)
    click.echo(summary_line(manifest, job.run.output))
    errors = manifest["counts"]["errors"]
    if errors:
        raise click.ClickException(
            f"{errors} pairs ended in an engine error (see errors/ for each message); a re-run scores them again"
        )
    failed, total = failed_pairs(manifest["counts"])
    if failed and (failed == total or failed / total > job.run.max_failed_share):
        raise click.ClickException(
            f"{failed} of {total} pairs to rerank ({failed / total:.1%}) were rejected or fell back, more than "
            f"--max-failed-share {job.run.max_failed_share:g}: see rejects/ and the scores whose outcome is fallback"
        )


def failed_pairs(counts: dict) -> tuple[int, int]:
    """Pairs rejected or scored by the fallback, and the pairs the run was to rerank: candidates
    beyond --top-k are left out, so a night where every reranked pair failed is never diluted
    into a small share."""
    return counts["rejected"] + counts["outcomes"].get("fallback", 0), counts["input"] - counts["unscored"]


@contextmanager
def sigterm_as_exit():
    """SIGTERM (a stopped job, an evicted pod) unwinds like Ctrl-C, so the output's lease is released."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_errors(function, *arguments):
    """Run, turning a failure into one clear message rather than Ray's wrapped tracebacks."""
    try:
        return function(*arguments)
    except Exception as error:
        raise click.ClickException(describe(error)) from error


def describe(error: BaseException) -> str:
    """The message of our own error in the chain of causes, else of the innermost cause."""
    chain = [error]
    while len(chain) < 20 and (getattr(chain[-1], "cause", None) or chain[-1].__cause__) is not None:
        chain.append(getattr(chain[-1], "cause", None) or chain[-1].__cause__)
    for cause in chain:
        if isinstance(cause, JOB_ERRORS):
            return str(cause)
    # An actor that died in its constructor reaches the driver only as text with a traceback.
    text = str(error)
    for kind in JOB_ERRORS:
        if f"{kind.__name__}: " in text:
            return text.rsplit(f"{kind.__name__}: ", 1)[1].strip()
    return f"{type(chain[-1]).__name__}: {chain[-1]}"


def summary_line(manifest: dict, output: str) -> str:
    counts = manifest["counts"]
    outcomes = ", ".join(f"{name} {count}" for name, count in counts["outcomes"].items())
    return (
        f"{counts['scored']} pairs scored ({outcomes}), {counts['rejected']} rejected, "
        f"{counts['unscored']} beyond top-k, {counts['truncated']} truncated, {counts['errors']} errors; "
        f"{manifest['pairs_per_second']} pairs/s over {manifest['wall_seconds']} s -> {output}"
    )


@main.command()
@click.argument("output", required=False)
def demo(output):
    """Run the whole pipeline on the bundled sample with the bundled tiny model, into OUTPUT
    (new, empty, or an earlier demo's, which resumes) or else a new rank1-demo-* directory here."""
    output = output or tempfile.mkdtemp(prefix="rank1-demo-", dir=os.getcwd())
    job = JobConfig.from_options(
        {
            "input": [str(SAMPLE)],
            "output": str(Path(output).resolve()),
            "model": "tiny",
            "dtype": "bfloat16",
            "max_model_len": 2048,
            "max_reasoning_tokens": 256,
            "enforce_eager": True,
        }
    )
    run_and_report(job)
    out = shlex.quote(job.run.output)
    click.echo(
        f"\nOutputs under {job.run.output}: scores/, traces/, ranked/, run.trec, _manifest.json\n"
        "Next, a report of the run (report/report.md, with plots), and its TREC run:\n"
        f"  {this_command()} report {out}\n"
        f"  head {out}/run.trec"
    )


def this_command() -> str:
    """How to run rank1-batch again as it was run now (from a virtual environment not activated,
    say), so that a printed next step works as printed."""
    if Path(sys.argv[0]).name == "rank1-batch":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m rank1_batch.cli"


@main.command("trec-run")
@click.argument("output")
@click.option("--tag", default="rank1", show_default=True, help="Run tag (last column).")
@click.option("--to", "target", type=click.File("w"), default="-", help="File to write (default: stdout).")
def trec_run_command(output, tag, target):
    """Write the TREC run of a finished run's ranked/ (also written as run.trec by `run`)."""
    from .config import RunConfig
    from .output.storage import Output
    from .run.finish import TREC_SCORE, trec_lines, trec_scores
    from .schema import RANKED_SCHEMA

    ranked = Output(output, RunConfig()).read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA)
    if not ranked.num_rows:
        raise click.UsageError(f"{output}: no ranked/ to export (is it a finished rank1-batch output?)")
    target.write(trec_lines(ranked.append_column(TREC_SCORE, trec_scores(ranked)), tag))


for command in (
    prepare_command,
    eval_command,
    agreement_command,
    calibrate_command,
    qrels_command,
    export_command,
    report_command,
    submit_command,
    status_command,
    logs_command,
    stop_command,
    store_group,
    review_group,
):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
