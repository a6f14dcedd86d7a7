"""A report of a finished run, for people: counts, the score and reasoning-length distributions,
how far the reranker moved candidates from their first-stage ranks, how far a pair's samples agree
(with several), the review queue (how many pairs are uncertain, for `rank1-batch review`) and,
given qrels, effectiveness against the first stage and how far the labels agree with the qrels.
Written under report/ in the output: report.md beside the PNGs it links, so the folder reads the
same wherever it is viewed or copied.

The statistics and the markdown, one function a section, are pure; the plots (plots.py)
turn arrays into PNG bytes; only the command reads and writes the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import RunConfig
from ..ir.agreement import Agreement, Judged, agreement, judged_pairs
from ..ir.evaluate import DEFAULT_METRICS, evaluate, judged_queries, read_qrels, run_from_ranks
from ..ir.labels import value_text
from ..model.judgement import OUTCOMES
from ..output.layout import MANIFEST
from ..output.storage import Output
from ..schema import RANKED_SCHEMA, SCORES_SCHEMA
from .plots import plot_confusion, plot_movement, plot_outcomes, plot_reasoning, plot_sample_agreement, plot_scores

REPORT_DIR = "report"
REPORT = "report.md"
SCORE_PLOT = "score-histogram.png"
OUTCOME_PLOT = "outcomes.png"
REASONING_PLOT = "reasoning-tokens.png"
MOVEMENT_PLOT = "rank-movement.png"
CONFUSION_PLOT = "confusion-matrix.png"
SAMPLES_PLOT = "sample-agreement.png"
SCORES_COLUMNS = ["query_id", "doc_id", "score", "label", "grade", "outcome", "reasoning_tokens", "samples", "agreement"]
# The review queue: pairs whose samples agree with their label less than each of these shares.
AGREEMENT_LEVELS = (1.0, 0.8, 0.6)
# The review queue: the scores' range [0, 1] in this many bins of equal width.
CONFIDENCE_BINS = 10


@dataclass(frozen=True)
class Spread:
    pairs: int
    median: float
    p90: float
    longest: int


@dataclass(frozen=True)
class Movement:
    """How the reranked candidates moved: first-stage rank minus new rank, > 0 is up."""

    candidates: int
    up: int
    down: int
    stayed: int
    median_move: float  # places, over the candidates that moved


@dataclass(frozen=True)
class Evaluation:
    queries: int
    reranked: dict[str, float]
    first_stage: dict[str, float]  # empty when the input had no first-stage ranks


# The scorer of a manifest written before it named one.
RANK1_SCORER = {"kind": "rank1", "score": "probability"}


@dataclass(frozen=True)
class Summary:
    labelled: int  # scored pairs at or above the threshold
    reasoning: dict[str, Spread]  # "all", then each outcome present
    at_budget: int  # pairs whose reasoning used the whole budget
    movement: Movement | None  # None when no scored candidate has a first-stage rank
    evaluation: Evaluation | None  # None without qrels
    qrels_agreement: Agreement | None  # None without qrels, or when they judge no scored pair
    sample_agreement: np.ndarray  # of each pair judged by several samples: the share agreeing with its label
    # (low, high, judged pairs, whose label agrees with the qrels) of each score bin; empty without
    # qrels, without judged pairs, or for a raw logit
    confidence: list[tuple[float, float, int, int]]


def by_outcome(scores: pa.Table, column: str) -> dict[str, np.ndarray]:
    """A column's values for each outcome present, in the order of OUTCOMES."""
    outcomes = scores["outcome"].to_numpy(zero_copy_only=False)
    values = scores[column].to_numpy()
    return {outcome: values[outcomes == outcome] for outcome in OUTCOMES if (outcomes == outcome).any()}


def spread(values: np.ndarray) -> Spread:
    return Spread(int(values.size), float(np.median(values)), float(np.percentile(values, 90)), int(values.max()))


def reranked_ranks(ranked: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """First-stage and new ranks of the scored candidates that have both. Candidates beyond
    --top-k keep their first-stage order below the reranked ones, so they would only dilute it."""
    rows = ranked.filter(pc.and_(pc.is_valid(ranked["score"]), pc.is_valid(ranked["first_stage_rank"])))
    return rows["first_stage_rank"].to_numpy().astype(np.int64), rows["rank"].to_numpy().astype(np.int64)


def movement(first_stage: np.ndarray, new: np.ndarray) -> Movement:
    shift = first_stage - new
    moved = np.abs(shift[shift != 0])
    return Movement(
        candidates=int(shift.size),
        up=int((shift > 0).sum()),
        down=int((shift < 0).sum()),
        stayed=int((shift == 0).sum()),
        median_move=float(np.median(moved)) if moved.size else 0.0,
    )


def evaluation(ranked: pa.Table, qrels: dict, relevance_level: int) -> Evaluation:
    """Both orders over the run's judged queries, as `rank1-batch eval` measures them."""
    reranked = run_from_ranks(ranked, "rank")
    first_stage = run_from_ranks(ranked, "first_stage_rank")
    queries = judged_queries(reranked, qrels)
    return Evaluation(
        queries=len(queries),
        reranked=evaluate(reranked, qrels, DEFAULT_METRICS, relevance_level, queries),
        first_stage=evaluate(first_stage, qrels, DEFAULT_METRICS, relevance_level, queries) if first_stage else {},
    )


def sample_agreement(scores: pa.Table) -> np.ndarray:
    """The agreement of the pairs judged by more than one sample (one sample always agrees)."""
    several = pc.fill_null(pc.greater(scores["samples"], 1), False)
    return scores.filter(several)["agreement"].to_numpy()


def summarise(manifest: dict, scores: pa.Table, ranked: pa.Table, qrels: dict | None, relevance_level: int) -> Summary:
    judged = judged_pairs(scores, qrels) if qrels is not None else None
    probability = manifest.get("scorer", RANK1_SCORER)["score"] != "logit"
    lengths = by_outcome(scores, "reasoning_tokens")
    # only Rank1's judgements reason; a cross-encoder's have no reasoning tokens
    reasoned = pc.drop_null(scores["reasoning_tokens"]).to_numpy()
    reasoning = {"all": spread(reasoned)} if reasoned.size else {}
    reasoning.update({outcome: spread(values) for outcome, values in lengths.items()})
    budget = manifest["job"]["engine"]["max_reasoning_tokens"]
    first_stage, new = reranked_ranks(ranked)
    return Summary(
        labelled=pc.sum(scores["label"]).as_py() or 0,
        reasoning=reasoning,
        at_budget=int(pc.sum(pc.greater_equal(scores["reasoning_tokens"], budget)).as_py() or 0),
        movement=movement(first_stage, new) if first_stage.size else None,
        evaluation=evaluation(ranked, qrels, relevance_level) if qrels is not None else None,
        qrels_agreement=agreement(judged, relevance_level) if judged is not None and judged.pairs else None,
        sample_agreement=sample_agreement(scores),
        confidence=confidence(judged, relevance_level) if judged is not None and judged.pairs and probability else [],
    )


def confidence(judged: Judged, relevance_level: int) -> list[tuple[float, float, int, int]]:
    """Each score bin's judged pairs, and how many of them the label gets right by the qrels."""
    inner = np.arange(1, CONFIDENCE_BINS) / CONFIDENCE_BINS  # 0.1 ... 0.9, each the nearest float to its decimal
    bins = np.searchsorted(inner, judged.score, side="right")
    agrees = judged.label == (judged.relevance >= relevance_level)
    pairs = np.bincount(bins, minlength=CONFIDENCE_BINS)
    agreeing = np.bincount(bins, weights=agrees, minlength=CONFIDENCE_BINS).astype(int)
    edges = np.arange(CONFIDENCE_BINS + 1) / CONFIDENCE_BINS
    return [(float(edges[n]), float(edges[n + 1]), int(pairs[n]), int(agreeing[n])) for n in range(CONFIDENCE_BINS)]


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {seconds:02d} s" if hours else f"{minutes} min {seconds:02d} s"


def render(manifest: dict, summary: Summary, relevance_level: int) -> str:
    """report.md: the manifest's counts and the summary's figures, linking the plots beside it."""
    scorer = manifest.get("scorer", RANK1_SCORER)
    lines = counts_section(manifest, summary)
    if manifest["counts"]["scored"]:
        lines += scores_section(manifest, summary, scorer["score"])
    if summary.reasoning:
        lines += reasoning_section(manifest, summary)
    if summary.movement is not None:
        lines += movement_section(summary.movement)
    if summary.sample_agreement.size:
        lines += sample_agreement_section(summary.sample_agreement)
    if summary.sample_agreement.size or summary.confidence:
        lines += review_queue_section(manifest, summary, relevance_level)
    if summary.evaluation is not None:
        lines += ["## Evaluation", "", *evaluation_table(summary.evaluation), "",
                  f"Over {summary.evaluation.queries:,} queries (those of the run with judgments); binary measures "
                  f"count a judgment of {relevance_level} or more as relevant.", ""]
        lines += qrels_agreement_section(summary.qrels_agreement, relevance_level)
    return "\n".join(lines)


def counts_section(manifest: dict, summary: Summary) -> list[str]:
    """The run's model and settings, its pairs by what became of them, its time and tokens."""
    job, counts = manifest["job"], manifest["counts"]
    scored, total = counts["scored"], counts["input"]
    revision = f" (revision `{manifest['revision']}`)" if manifest.get("revision") else ""
    top_k = job["run"]["top_k"]
    scorer = manifest.get("scorer", RANK1_SCORER)
    judged_by = (f"reasoning budget {job['engine']['max_reasoning_tokens']:,} tokens" if scorer["kind"] == "rank1"
                 else f"a {scorer['kind']} with the `{scorer['template']}` template, scored by its {scorer['score']}")
    return [
        "# Run report",
        "",
        f"Model `{manifest['model']}`{revision}; threshold {job['scoring']['threshold']:g}; "
        f"top-k {top_k if top_k is not None else 'all'}; {judged_by}.",
        "",
        f"Input {', '.join(f'`{url}`' for url in job['run']['input'])}.",
        "",
        "| pairs | count | share |",
        "| --- | ---: | ---: |",
        f"| input | {total:,} | |",
        f"| scored | {scored:,} | {share(scored, total)} of input |",
        *(f"| &nbsp;&nbsp;{outcome} | {count:,} | {share(count, scored)} of scored |"
          for outcome, count in counts["outcomes"].items() if summary.reasoning),
        f"| rejected | {counts['rejected']:,} | {share(counts['rejected'], total)} of input |",
        f"| unscored (beyond top-k) | {counts['unscored']:,} | {share(counts['unscored'], total)} of input |",
        f"| truncated (passage cut to fit) | {counts['truncated']:,} | {share(counts['truncated'], scored)} of scored |",
        "",
        f"Wall time {duration(manifest['wall_seconds'])}, {manifest['pairs_per_second']} pairs/s"
        + (f" (over the {manifest['scored_this_run']:,} pairs that the last run scored; it resumed the others)"
           if manifest.get("scored_this_run", scored) != scored else "")
        + ".",
        "",
        f"Tokens: {counts['prompt_tokens']:,} prompt, {counts['reasoning_tokens']:,} reasoning"
        + (f" ({counts['prompt_tokens'] / scored:,.0f} and {counts['reasoning_tokens'] / scored:,.0f} per scored pair)."
           if scored else "."),
        "",
    ]


def scores_section(manifest: dict, summary: Summary, score: str) -> list[str]:
    lines = ["## Scores", "", f"![Histogram of scores]({SCORE_PLOT})", ""]
    if score == "logit":  # a raw logit has no threshold, so no label
        return lines
    scored, threshold = manifest["counts"]["scored"], manifest["job"]["scoring"]["threshold"]
    return lines + [
        f"{summary.labelled:,} of {scored:,} scored pairs ({share(summary.labelled, scored)}) score at or above "
        f"the threshold {threshold:g} and are labelled relevant.",
        "",
    ]


def reasoning_section(manifest: dict, summary: Summary) -> list[str]:
    """Outcomes and reasoning lengths: Rank1's only, as a cross-encoder neither answers nor reasons."""
    budget = manifest["job"]["engine"]["max_reasoning_tokens"]
    return [
        "## Outcomes",
        "",
        f"![Pairs by outcome]({OUTCOME_PLOT})",
        "",
        "`answered`: the model closed its reasoning and answered; `forced`: the label was read after "
        "closing the cut reasoning; `fallback`: no label could be read, score 0.5.",
        "",
        "## Reasoning length",
        "",
        f"![Histogram of reasoning tokens by outcome]({REASONING_PLOT})",
        "",
        "| outcome | pairs | median | p90 | longest |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {s.pairs:,} | {s.median:,.0f} | {s.p90:,.0f} | {s.longest:,} |"
          for name, s in summary.reasoning.items()),
        "",
        f"{summary.at_budget:,} pairs ({share(summary.at_budget, manifest['counts']['scored'])}) used the whole "
        f"budget of {budget:,} reasoning tokens.",
        "",
    ]


def movement_section(moved: Movement) -> list[str]:
    return [
        "## Rank movement",
        "",
        f"![Rank movement from the first stage]({MOVEMENT_PLOT})",
        "",
        f"Of the {moved.candidates:,} reranked candidates with a first-stage rank, {share(moved.up, moved.candidates)} "
        f"moved up, {share(moved.down, moved.candidates)} moved down and {share(moved.stayed, moved.candidates)} "
        f"stayed; the median move was {moved.median_move:g} place{'' if moved.median_move == 1 else 's'}.",
        "",
    ]


def review_queue_section(manifest: dict, summary: Summary, relevance_level: int) -> list[str]:
    """How many pairs a review would take: those whose samples agree less than each level, and,
    given qrels, how often the labels agree with them at each confidence."""
    scored = manifest["counts"]["scored"]
    lines = ["## Review queue", "",
             "`rank1-batch review export OUTPUT --to tasks.json --limit N` writes Label Studio tasks of the N least "
             "certain pairs (the lowest agreement between samples first, then the nearest the threshold or a "
             "grade's cut point) for people to review; `rank1-batch review import` brings their decisions back "
             "as qrels.", ""]
    if summary.sample_agreement.size:
        below = {level: int((summary.sample_agreement < level).sum()) for level in AGREEMENT_LEVELS}
        lines += ["| samples agreeing with the label | pairs | share of scored |", "| --- | ---: | ---: |",
                  *(f"| below {level:.1f} | {count:,} | {share(count, scored)} |" for level, count in below.items()), ""]
    if summary.confidence:
        lines += [f"How often the label agrees with the qrels (relevance >= {relevance_level} is relevant), by the "
                  "pair's score:", "",
                  "| score | judged pairs | label agrees with the qrels |", "| --- | ---: | ---: |",
                  *(f"| {low:.1f} to {high:.1f} | {pairs:,} | {share(agree, pairs)} |"
                    for low, high, pairs, agree in summary.confidence), ""]
    return lines


def qrels_agreement_section(result: Agreement | None, relevance_level: int) -> list[str]:
    lines = ["## Agreement with the qrels", ""]
    if result is None:
        return lines + ["The qrels judge none of the scored pairs.", ""]
    rows = [(f"kappa: label against qrels relevance >= {relevance_level}", result.binary.kappa),
            ("precision of the label", result.binary.precision), ("recall of the label", result.binary.recall)]
    if result.graded is not None:
        rows += [("kappa: grade against qrels relevance", result.graded.kappa),
                 ("quadratic-weighted kappa: grade against qrels relevance", result.graded.quadratic_kappa)]
    return lines + [
        f"![Confusion matrices of the labels against the qrels]({CONFUSION_PLOT})",
        "",
        "| measure | value |",
        "| --- | ---: |",
        *(f"| {name} | {value_text(value)} |" for name, value in rows),
        "",
        f"Over the {result.judged:,} pairs that both the run and the qrels judge; {result.run_only:,} scored pairs "
        f"are not judged, and {result.qrels_only:,} judgments of the run's queries are of pairs it did not score.",
        "",
    ]


def sample_agreement_section(values: np.ndarray) -> list[str]:
    unanimous = int((values == 1).sum())
    return [
        "## Agreement between samples",
        "",
        f"![Histogram of the samples' agreement]({SAMPLES_PLOT})",
        "",
        f"Of the {values.size:,} pairs judged by several samples, {unanimous:,} ({share(unanimous, values.size)}) were "
        f"unanimous; the median share of samples agreeing with the label was {np.median(values):.2f}.",
        "",
    ]


def evaluation_table(result: Evaluation) -> list[str]:
    if not result.first_stage:
        return ["| metric | reranked |", "| --- | ---: |",
                *(f"| {name} | {value:.4f} |" for name, value in result.reranked.items())]
    return [
        "| metric | reranked | first stage | change |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {value:.4f} | {result.first_stage[name]:.4f} | {value - result.first_stage[name]:+.4f} |"
          for name, value in result.reranked.items()),
    ]


def plots(manifest: dict, scores: pa.Table, ranked: pa.Table, summary: Summary) -> dict[str, bytes]:
    """The PNGs that report.md links, by file name."""
    files = {}
    scorer = manifest.get("scorer", RANK1_SCORER)
    if scores.num_rows:
        # Rank1's scores by outcome; a cross-encoder's, which have none, as one group
        by_kind = by_outcome(scores, "score") if summary.reasoning else {scorer["kind"]: scores["score"].to_numpy()}
        files[SCORE_PLOT] = plot_scores(by_kind, manifest["job"]["scoring"]["threshold"], scorer["score"])
    if summary.reasoning:
        files[OUTCOME_PLOT] = plot_outcomes(manifest["counts"]["outcomes"])
        files[REASONING_PLOT] = plot_reasoning(by_outcome(scores, "reasoning_tokens"),
                                               manifest["job"]["engine"]["max_reasoning_tokens"])
    first_stage, new = reranked_ranks(ranked)
    if first_stage.size:
        files[MOVEMENT_PLOT] = plot_movement(first_stage, new)
    if summary.sample_agreement.size:
        files[SAMPLES_PLOT] = plot_sample_agreement(summary.sample_agreement)
    if summary.qrels_agreement is not None:
        files[CONFUSION_PLOT] = plot_confusion(summary.qrels_agreement)
    return files


@click.command("report")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--qrels", "qrels_url", metavar="FILE",
              help="TREC qrels: adds reranked against first-stage figures, and the labels' agreement with the qrels.")
@click.option("--relevance-level", type=int, default=2, show_default=True,
              help="Lowest judgment that binary metrics, and the labels' agreement, count as relevant.")
def report_command(output_url, qrels_url, relevance_level):
    """Write report.md and its plots under OUTPUT/report/ for a finished run."""
    output = Output(output_url, RunConfig())
    if not output.exists(MANIFEST):
        raise click.ClickException(f"{output_url}: no {MANIFEST}, so not a finished run")
    try:
        manifest = json.loads(output.fs.cat_file(output.path(MANIFEST)))
        qrels = read_qrels(qrels_url) if qrels_url else None
        scores = output.read("scores", SCORES_COLUMNS, SCORES_SCHEMA)
        ranked = output.read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA)
        summary = summarise(manifest, scores, ranked, qrels, relevance_level)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    for name, data in plots(manifest, scores, ranked, summary).items():
        output.write_bytes(f"{REPORT_DIR}/{name}", data)
    output.write_bytes(f"{REPORT_DIR}/{REPORT}", render(manifest, summary, relevance_level).encode())
    click.echo(f"Report: {output.url}/{REPORT_DIR}/{REPORT}")
