"""`review export` and `review import`: the round trip of a run's pairs through Label Studio."""

from __future__ import annotations

import json
from collections import Counter

import click
import fsspec
import pyarrow.compute as pc

from ..cli_options import s3_options
from ..config import RunConfig
from ..ir.evaluate import read_qrels_table
from ..ir.export import input_texts
from ..ir.labels import matrix, relevance_cut_option, value_text
from ..ir.qrels import KEY, merge, read_with_provenance, write_qrels
from ..output.checkpoint import NotAnOutput
from ..output.storage import Output, storage_options
from ..schema import TRACES_SCHEMA, pair_keys
from .decisions import (
    ExportError,
    Review,
    ReviewAgreement,
    decide,
    provenance,
    read_export,
    review_agreement,
    reviews,
    unknown_pairs,
)
from .scored import read_scored_run
from .tasks import ORDERS, config_url, disagreeing, label_config, order_text, ordered, tasks

# Tasks named at most in one message.
NAMED = 5


@click.group("review")
def review_group():
    """People review a run's uncertain labels in Label Studio; their decisions come back as qrels."""


@review_group.command("export")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--to", "target", required=True, metavar="TASKS.json",
              help="The Label Studio tasks to write (any fsspec URL). The labeling configuration to create the "
                   "project from goes beside it, named as TASKS with .label-config.xml in place of .json.")
@click.option("--limit", type=click.IntRange(min=1), help="Write only the first N pairs of the order.")
@click.option("--order", type=click.Choice(ORDERS), default="uncertainty", show_default=True,
              help="uncertainty: the lowest self-consistency agreement first, then the nearest the threshold (or "
                   "a grade's cut point); disagreement: the pairs whose label disagrees with --qrels first, then "
                   "as uncertainty.")
@click.option("--qrels", "qrels_url", metavar="FILE", help="TREC qrels, for --order disagreement.")
@relevance_cut_option
@click.option("--answered-only", is_flag=True, help="Only the pairs whose outcome is `answered`.")
@click.option("--input", "inputs", multiple=True, metavar="URL",
              help="The run's input where it is now; repeatable (default: the input recorded in OUTPUT/_job.json).")
@s3_options
def export_command(output_url, target, limit, order, qrels_url, relevance_cut, answered_only, inputs,
                   s3_endpoint_url, s3_profile):
    """Write Label Studio tasks of a run's pairs, one a pair, with the model's judgement as a prediction."""
    if (order == "disagreement") != (qrels_url is not None):
        raise click.BadParameter("--order disagreement and --qrels go together", param_hint="--qrels")
    storage = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    try:
        run = read_scored_run(output_url, storage, extra=["outcome", "samples", "agreement"])
        judgments = read_qrels_table(qrels_url, storage_options(qrels_url, storage)) if qrels_url else None
        source = RunConfig(input=tuple(inputs or run.job["run"]["input"]), columns=run.job["run"]["columns"],
                           s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
        texts, _ = input_texts(source)
        traces = Output(output_url, storage).read("traces", TRACES_SCHEMA.names, TRACES_SCHEMA)
    except (ValueError, OSError, NotAnOutput) as error:
        raise click.ClickException(str(error)) from None
    pairs, left_out = run.scores, {}
    if answered_only:
        pairs = pairs.filter(pc.equal(pairs["outcome"], "answered"))
        left_out["not answered"] = run.scores.num_rows - pairs.num_rows
    with_texts = pairs.join(texts, KEY, join_type="inner")
    left_out["not in the input, or repeated there"] = pairs.num_rows - with_texts.num_rows
    disagrees = disagreeing(with_texts, judgments, relevance_cut) if judgments is not None else None
    chosen = ordered(with_texts, run.boundaries, disagrees).slice(0, limit)
    reasoning = traces["reasoning"].take(pc.index_in(pair_keys(chosen), value_set=pair_keys(traces)))
    chosen = chosen.append_column("reasoning", reasoning)
    try:
        with fsspec.open(target, "wt", encoding="utf-8", **storage_options(target, storage)) as out:
            json.dump(tasks(chosen, run), out, ensure_ascii=False, indent=1)
        with fsspec.open(config_url(target), "wt", encoding="utf-8", **storage_options(target, storage)) as out:
            out.write(label_config(run.scale))
    except OSError as error:
        raise click.ClickException(f"{target}: {error}") from None
    sampled = (pc.max(run.scores["samples"]).as_py() or 1) > 1
    why = order_text(run, sampled, None if disagrees is None else int(disagrees.sum()), qrels_url, relevance_cut)
    dropped = "".join(f"; left out: {reason} {count:,}" for reason, count in left_out.items() if count)
    click.echo(f"wrote {chosen.num_rows:,} of {with_texts.num_rows:,} pairs to {target}, {why}{dropped}\n"
               f"labeling configuration: {config_url(target)}")


def named_run(found: list[dict], export_url: str) -> str:
    """The one run that `review export` wrote into every task's data."""
    outputs = Counter(task["data"].get("output") for task in found)
    if len(outputs) != 1 or None in outputs:
        raise ExportError(f"{export_url}: its tasks do not name one run ({', '.join(map(str, outputs))}): give --run")
    return next(iter(outputs))


def named(found: list[Review]) -> str:
    shown = ", ".join(review.name for review in found[:NAMED])
    return shown + (f" and {len(found) - NAMED:,} more" if len(found) > NAMED else "")


@review_group.command("import")
@click.argument("export_url", metavar="EXPORT.json")
@click.option("--to", "target", required=True, metavar="QRELS",
              help="The TREC qrels to write (any fsspec URL); their provenance goes beside, QRELS.provenance.parquet.")
@click.option("--run", "run_url", metavar="OUTPUT",
              help="The run the tasks were exported from (default: the output that `review export` wrote into "
                   "each task's data).")
@click.option("--merge", "merge_url", metavar="QRELS",
              help="Qrels (a run's, or merged ones) to merge the decisions into: a reviewer's decision wins.")
@s3_options
def import_command(export_url, target, run_url, merge_url, s3_endpoint_url, s3_profile):
    """Write the decisions of a Label Studio JSON export as TREC qrels: each pair's majority of its
    annotators (a tie is left out; a skipped annotation is no vote), with their provenance."""
    storage = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    try:
        with fsspec.open(export_url, "rt", encoding="utf-8", **storage_options(export_url, storage)) as handle:
            found = read_export(handle.read(), export_url)
        run = read_scored_run(run_url or named_run(found, export_url), storage)
        scale = run.scale
        pairs = reviews(found, scale, export_url)
        unknown = unknown_pairs(pairs, run.scores)
        if unknown:
            raise ExportError(f"{export_url}: {named(unknown)}: not a pair that {run.url} scored; was the export "
                              "made from another run (--run)?")
        decided = decide(pairs, scale)
        if not decided.decisions.num_rows:
            raise ExportError(f"{export_url}: no decision to write ({len(decided.ties):,} ties, "
                              f"{len(decided.undecided):,} pairs without a vote)")
        reviewed = provenance(decided.decisions, run)
        qrels = reviewed
        if merge_url:
            qrels = merge(reviewed, read_with_provenance(merge_url, storage_options(merge_url, storage)),
                          export_url, merge_url)
        write_qrels(qrels, target, storage_options(target, storage))
    except (ValueError, OSError, NotAnOutput) as error:
        raise click.ClickException(str(error)) from None
    merged = f", merged into {merge_url}'s for {qrels.num_rows:,} judgments" if merge_url else ""
    lines = [f"{len(found):,} tasks of {len(pairs):,} pairs read from {export_url}; {reviewed.num_rows:,} decisions "
             f"written to {target}{merged}"]
    if decided.ties:
        lines.append("ties, left out: " + "; ".join(
            f"{review.name}: " + ", ".join(f"{count} for {choice!r}" for choice, count in Counter(
                choice for _, choice in review.votes).items()) for review in decided.ties))
    if decided.undecided:
        lines.append(f"no vote (every annotation skipped): {named(decided.undecided)}")
    click.echo("\n".join([*lines, *agreement_lines(review_agreement(reviewed, scale), run.model)]))


def agreement_lines(result: ReviewAgreement, model: str) -> list[str]:
    quadratic = "" if result.quadratic_kappa is None else f", quadratic-weighted {value_text(result.quadratic_kappa)}"
    return [
        f"reviewers against the model {model} on the {result.pairs:,} decided pairs: {result.overridden:,} overridden",
        f"  Cohen's kappa {value_text(result.kappa)}{quadratic}",
        *("  " + line for line in matrix([f"reviewers {choice}" for choice in result.choices],
                                         [f"model {choice}" for choice in result.choices], result.confusion)),
    ]
