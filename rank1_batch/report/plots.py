"""The plots of a run's report: arrays in, PNG bytes out. A Figure made without pyplot draws with
Agg: no display, no global state."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, StrMethodFormatter

from ..ir.agreement import Agreement

# One colour per outcome in every plot, so that the plots read together.
OUTCOME_COLOURS = {"answered": "tab:blue", "forced": "tab:orange", "fallback": "tab:gray"}
# Lengths whose longest is this many times their median are drawn on a log axis.
LONG_TAIL = 10
MAX_BINS = 50
# Cell counts from which the rank grid's colours follow a log scale.
LOG_COUNTS = 100
SCORE_MEANINGS = {"probability": "P(true)", "sigmoid": "the sigmoid of the logit", "logit": "the raw logit"}


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def count_axis(axis, label: str) -> None:
    """An axis of counts: whole numbers only, with thousands separated."""
    axis.set_label_text(label)
    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def integer_bins(low: int, high: int, most: int = MAX_BINS) -> np.ndarray:
    """Bin edges between integers, so that no bin holds more whole values than its neighbours."""
    width = max(1, math.ceil((high - low + 1) / most))
    return np.arange(low, high + width + 1, width) - 0.5


def plot_scores(scores: dict[str, np.ndarray], threshold: float, score: str) -> bytes:
    """The scores' histogram, stacked by outcome for Rank1's; a logit has neither the range [0, 1]
    nor a threshold."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    values = np.concatenate(list(scores.values()))
    low, high = (0.0, 1.0) if score != "logit" else (float(values.min()), float(values.max()) or 1.0)
    axes.hist(list(scores.values()), bins=np.linspace(low, high, MAX_BINS + 1), stacked=True,
              color=[OUTCOME_COLOURS.get(outcome, "tab:blue") for outcome in scores], label=list(scores))
    if score != "logit":
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    axes.set(xlim=(low, high), xlabel=f"score, {SCORE_MEANINGS[score]}",
             title="Scores by outcome" if set(scores) <= set(OUTCOME_COLOURS) else "Scores")
    count_axis(axes.yaxis, "pairs")
    figure.legend(loc="outside right upper")  # beside the axes: the bars can be anywhere
    return png(figure)


def plot_outcomes(outcomes: dict[str, int]) -> bytes:
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    total = sum(outcomes.values())
    bars = axes.bar(list(outcomes), list(outcomes.values()),
                    color=[OUTCOME_COLOURS[outcome] for outcome in outcomes])
    axes.bar_label(bars, labels=[f"{count:,} ({count / total:.1%})" for count in outcomes.values()], padding=2)
    axes.margins(y=0.15)  # room for the labels above the tallest bar
    axes.set(title="Pairs by outcome")
    count_axis(axes.yaxis, "pairs")
    return png(figure)


def plot_reasoning(lengths: dict[str, np.ndarray], budget: int) -> bytes:
    values = np.concatenate(list(lengths.values()))
    longest = int(values.max())
    long_tailed = longest >= LONG_TAIL * max(np.median(values), 1)
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    if long_tailed:
        # A log axis has no zero: an empty reasoning is drawn in the first bin.
        bins = np.geomspace(max(int(values.min()), 1), longest + 1, MAX_BINS + 1)
        lengths = {outcome: np.maximum(values, 1) for outcome, values in lengths.items()}
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    else:
        bins = integer_bins(int(values.min()), longest)
    axes.hist(list(lengths.values()), bins=bins, stacked=True,
              color=[OUTCOME_COLOURS[outcome] for outcome in lengths], label=list(lengths))
    if longest >= budget:
        axes.axvline(budget, color="black", linestyle="--", label=f"budget {budget:,}")
    axes.set(xlabel="reasoning tokens" + (" (log scale)" if long_tailed else ""), title="Reasoning length by outcome")
    count_axis(axes.yaxis, "pairs")
    figure.legend(loc="outside right upper")
    return png(figure)


def plot_movement(first_stage: np.ndarray, new: np.ndarray) -> bytes:
    shift = first_stage - new
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.hist(shift, bins=integer_bins(int(shift.min()), int(shift.max())), color="tab:blue")
    left.axvline(0, color="black", linestyle="--", linewidth=1)
    left.set(xlabel="first-stage rank − new rank  (> 0: moved up)", title="How far candidates moved")
    count_axis(left.yaxis, "candidates")
    deepest = int(max(first_stage.max(), new.max()))
    bins = integer_bins(1, deepest)
    # A grid of counts rather than points, so that it stays readable for millions of candidates;
    # counts spread over decades only on a large run, and only then need a log scale.
    counts, *_ = np.histogram2d(first_stage, new, bins=[bins, bins])
    norm = LogNorm(vmin=1) if counts.max() >= LOG_COUNTS else Normalize(vmin=0, vmax=counts.max())
    image = right.pcolormesh(bins, bins, np.ma.masked_equal(counts.T, 0), norm=norm, cmap="viridis")
    right.plot([1, deepest], [1, deepest], color="black", linestyle="--", linewidth=1)
    right.invert_yaxis()  # rank 1 at the top: a cell above the line moved up
    for axis in (right.xaxis, right.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="first-stage rank", ylabel="new rank  (above the dashed line: moved up)",
              title="New rank against first-stage rank", aspect="equal")
    colorbar = figure.colorbar(image, ax=right)
    if isinstance(norm, LogNorm):
        colorbar.set_label("candidates")
    else:
        count_axis(colorbar.ax.yaxis, "candidates")
    return png(figure)


def plot_confusion(result: Agreement) -> bytes:
    """The binary confusion matrix, and the graded one beside it when the run has grades."""
    cut = result.binary.relevance_cut
    panels = [("label", [f"< {cut}", f">= {cut}"], ["false", "true"], result.binary.confusion)]
    if result.graded is not None:
        names = [str(value) for value in result.graded.values]
        panels.append(("grade", names, names, result.graded.confusion))
    figure = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    for axes, (name, rows, columns, counts) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        counts = np.array(counts)
        axes.imshow(counts, cmap="Blues", vmin=0)
        # each cell's count, dark on light cells and light on dark ones
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, f"{count:,}", ha="center", va="center",
                      color="white" if count > counts.max() / 2 else "black")
        axes.set_xticks(range(len(columns)), columns)
        axes.set_yticks(range(len(rows)), rows)
        axes.set(xlabel=f"run's {name}", ylabel="qrels relevance", title=f"{name.capitalize()} against the qrels")
    return png(figure)


def plot_sample_agreement(values: np.ndarray) -> bytes:
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    # a few samples give a few shares (k of n): one bar each
    shares, counts = np.unique(values, return_counts=True)
    width = 0.8 * (np.diff(shares).min() if shares.size > 1 else 0.1)
    axes.bar(shares, counts, width=width, color="tab:blue")
    axes.set(xlim=(0, 1.05), xlabel="share of samples agreeing with the label", title="Agreement between samples")
    count_axis(axes.yaxis, "pairs")
    return png(figure)
