"""`agreement` and `calibrate`: a run's relevance labels against qrels, and the threshold and grade
cut points that agree with them best. The figures come from `agreement` and `system_order` (pure);
only these commands read outputs and qrels."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import click
import numpy as np
import pyarrow as pa

from ..cli_options import s3_options
from ..config import RunConfig
from ..output.storage import Output, storage_options
from ..schema import SCORES_SCHEMA
from . import agreement as figures
from . import system_order
from .evaluate import Qrels, measures, read_qrels, read_run

LABEL_COLUMNS = ["query_id", "doc_id", "score", "label", "grade"]


def relevance_cut_option(command):
    return click.option("--relevance-cut", type=int, default=figures.DEFAULT_RELEVANCE_CUT, show_default=True,
                        help="Lowest qrels relevance counted as relevant (2 for TREC DL passages; 1 is lenient).")(command)


def read_labels(output: Output, extra: Sequence[str] = ()) -> pa.Table:
    """The scored pairs of an output with their labels (`grade` is null in outputs written before it),
    and the `extra` columns of scores/ asked for."""
    scores = output.read("scores", [*LABEL_COLUMNS, *extra], SCORES_SCHEMA)
    if not scores.num_rows:
        raise ValueError(f"{output.url}: no scored pairs under scores/ (is it a rank1-batch output?)")
    if scores["label"].null_count == scores.num_rows:
        raise ValueError(f"{output.url}: its pairs have no labels, as its scores are a cross-encoder's raw logits, "
                         "not probabilities; labels need Rank1 or a cross-encoder template scored by its sigmoid")
    return scores


def judged(scores: pa.Table, qrels: Qrels, run_url: str, qrels_url: str) -> figures.Judged:
    """The pairs both the run and the qrels judge; none is an error naming both."""
    pairs = figures.judged_pairs(scores, qrels)
    if not pairs.pairs:
        raise ValueError(f"{qrels_url} judges none of the pairs that {run_url} scored (no query_id and doc_id in "
                         "common): are they of the same collection and queries?")
    return pairs


def value_text(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def decimal(value: float) -> str:
    """A cut point as an option takes it: positional, the shortest that reads back as the value."""
    return np.format_float_positional(value, trim="-")


def matrix(rows: list[str], columns: list[str], counts: list[list[int]]) -> list[str]:
    """A confusion matrix as text lines, rows and columns named."""
    width = max(len(name) for name in [*rows, *columns, *(f"{count:,}" for row in counts for count in row)])
    lines = [" " * width + "".join(f"  {name:>{width}}" for name in columns)]
    return lines + [f"{name:<{width}}" + "".join(f"  {count:>{width},}" for count in row)
                    for name, row in zip(rows, counts)]


def agreement_lines(result: figures.Agreement, systems: system_order.Systems | None) -> list[str]:
    cut = result.binary.relevance_cut
    lines = [
        f"pairs judged by both: {result.judged:,}; scored by the run only: {result.run_only:,}; "
        f"judged by the qrels only (queries of the run): {result.qrels_only:,}",
        "",
        f"binary: label against qrels relevance >= {cut}",
        f"  kappa      {value_text(result.binary.kappa)}",
        f"  precision  {value_text(result.binary.precision)}  (of the pairs labelled relevant, judged relevant)",
        f"  recall     {value_text(result.binary.recall)}  (of the pairs judged relevant, labelled relevant)",
        *("  " + line for line in matrix([f"qrels < {cut}", f"qrels >= {cut}"], ["label false", "label true"],
                                         result.binary.confusion)),
        "",
        *topics_lines(result.topics),
    ]
    if result.graded is not None:
        lines += ["", *graded_lines(result.graded)]
    if systems is not None:
        lines += ["", *systems_lines(systems)]
    return lines


def topics_lines(topics: figures.Topics) -> list[str]:
    lines = [f"per query: kappa of label against qrels relevance >= {topics.relevance_cut}"]
    if topics.spread is not None:
        spread = topics.spread
        lines.append(f"  over {spread.count:,} queries: mean {spread.mean:.4f}, standard deviation {spread.std:.4f}, "
                     f"min {spread.minimum:.4f}, median {spread.median:.4f}, max {spread.maximum:.4f}")
    if topics.undefined:
        lines.append(f"  undefined at {len(topics.undefined):,} queries (both sides give each of their pairs one and "
                     "the same label)")
    return lines


def graded_lines(graded: figures.Graded) -> list[str]:
    return [
        "graded: grade against qrels relevance",
        f"  kappa {value_text(graded.kappa)}, quadratic-weighted {value_text(graded.quadratic_kappa)}, "
        f"Krippendorff's alpha (ordinal) {value_text(graded.alpha)}",
        "  kappa with both sides cut in two (qrels relevance above 3 counts as 3): "
        + ", ".join(f"{split.name} {value_text(split.kappa)}" for split in graded.splits),
        *("  " + line for line in matrix([f"qrels {value}" for value in graded.values],
                                         [f"grade {value}" for value in graded.values], graded.confusion)),
    ]


def systems_lines(systems: system_order.Systems) -> list[str]:
    width = max(len(name) for name in ["system", *systems.measured])
    judged = system_order.JUDGED_MEASURE
    labels = "grades (0-3)" if systems.labels_graded else "labels (0 or 1)"
    return [
        f"systems by {systems.measure} over {systems.queries:,} queries: under the qrels, and under the run's "
        f"{labels} as qrels; {judged} under the qrels",
        f"  {'system':<{width}}   qrels  labels  {judged}",
        *(f"  {name:<{width}}  {values['qrels']:.4f}  {values['labels']:.4f}  {systems.judged[name]:>{len(judged)}.4f}"
          for name, values in systems.measured.items()),
        f"  over {len(systems.measured)} systems: Kendall's tau {value_text(systems.kendall_tau)}, "
        f"tau_ap {value_text(systems.tau_ap)} (the qrels' ordering as the truth), "
        f"Spearman's rho {value_text(systems.spearman_rho)}",
    ]


def measure_option(context, parameter, value: str) -> str:
    try:
        measures([value])
    except ValueError as error:
        raise click.BadParameter(str(error), context, parameter) from None
    return value


@click.command("agreement")
@click.option("--run", "run_url", required=True, metavar="OUTPUT", help="A rank1-batch output.")
@click.option("--qrels", "qrels_url", required=True, metavar="FILE", help="TREC qrels.")
@relevance_cut_option
@click.option("--system", "system_urls", multiple=True, metavar="RUN",
              help="A system's TREC run file or rank1-batch output (its reranked order); repeatable, two or more: "
                   "Kendall's tau, tau_ap and Spearman's rho between the systems' orderings under the qrels and "
                   "under the run's labels.")
@click.option("--measure", default=system_order.DEFAULT_MEASURE, show_default=True, metavar="NAME",
              callback=measure_option, help="The ir-measures measure that orders the --system runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@s3_options
def agreement_command(run_url, qrels_url, relevance_cut, system_urls, measure, as_json, s3_endpoint_url, s3_profile):
    """How far a run's labels (and grades) agree with qrels on the pairs both judge: Cohen's kappa
    of the labels against qrels relevance >= --relevance-cut, over all pairs and query by query;
    with grades, kappa (plain and quadratic-weighted) and Krippendorff's ordinal alpha of the grades
    against the relevance, and kappa with both cut in two at 1, 2 and 3 (0|123, 01|23, 012|3;
    relevance above 3 counts as 3 there). With --system runs, how alike the systems' orderings by
    --measure are under the qrels and under the run's grades (else labels) as qrels."""
    if len(set(system_urls)) == 1:
        raise click.BadParameter("give two or more systems to compare their orderings", param_hint="--system")
    run = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    try:
        scores = read_labels(Output(run_url, run))
        qrels = read_qrels(qrels_url, storage_options(qrels_url, run))
        result = figures.agreement(judged(scores, qrels, run_url, qrels_url), relevance_cut)
        systems = None
        if system_urls:
            runs = {url: read_run(url, storage_options(url, run)).reranked for url in system_urls}
            systems = system_order.systems(runs, qrels, system_order.label_qrels(scores), measure, relevance_cut)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(result),
                               "systems": dataclasses.asdict(systems) if systems is not None else None}))
        return
    click.echo("\n".join(agreement_lines(result, systems)))


@click.command("calibrate")
@click.option("--run", "run_url", required=True, metavar="OUTPUT", help="A rank1-batch output.")
@click.option("--qrels", "qrels_url", required=True, metavar="FILE", help="TREC qrels.")
@relevance_cut_option
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@s3_options
def calibrate_command(run_url, qrels_url, relevance_cut, as_json, s3_endpoint_url, s3_profile):
    """The --threshold and --grades that agree best with qrels on the pairs both judge: the
    threshold by kappa, the grades' cut points by quadratic-weighted kappa."""
    run = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    try:
        qrels = read_qrels(qrels_url, storage_options(qrels_url, run))
        pairs = judged(read_labels(Output(run_url, run)), qrels, run_url, qrels_url)
        found = figures.calibrate(pairs, relevance_cut)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    labels_kappa = figures.binary(pairs.relevance, pairs.label, relevance_cut).kappa
    cuts = ",".join(map(decimal, found.grades)) if found.grades else None
    options = f"--threshold {decimal(found.threshold)}" + (f" --grades {cuts}" if cuts else "")
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(found), "labels_kappa": labels_kappa, "options": options}))
        return
    lines = [f"judged pairs: {found.judged:,} (qrels relevance >= {relevance_cut} is relevant)",
             f"the run's labels: kappa {value_text(labels_kappa)}",
             f"threshold {decimal(found.threshold)}: kappa {value_text(found.kappa)}"]
    if found.graded is not None:
        lines.append(f"grades {cuts}: quadratic-weighted kappa "
                     f"{value_text(found.graded.quadratic_kappa)}, plain {value_text(found.graded.kappa)}")
    else:
        lines.append("grades: fewer than three distinct scores among the judged pairs, so no cut points")
    click.echo("\n".join([*lines, f"options: {options}"]))
