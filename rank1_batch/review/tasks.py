"""What `review export` writes: Label Studio tasks of a run's pairs, in the order a review wants
them, and the labeling configuration their project is created from. Pure: tables in, JSON-ready
dicts and XML text out.

Review order (`ordered`): the pairs whose samples agree least first (self-consistency; a pair of
one sample agrees fully), then those whose score is nearest a boundary of the run's judgement (the
threshold, or a grade's nearest cut point), then by query_id and doc_id. With qrels, the pairs
whose label disagrees with them come before all others, each part in that order.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..model.prompt import query_text
from ..schema import pair_keys
from .scored import Scale, ScoredRun

ORDERS = ("uncertainty", "disagreement")
# The names that tie a task's prediction and annotations to the labeling configuration.
FROM_NAME = "relevance"
TO_NAME = "passage"
CONFIG_SUFFIX = ".label-config.xml"
# TREC Deep Learning's four grades, as the choices' header explains them.
GRADE_MEANINGS = "0 irrelevant, 1 related (on topic, does not answer), 2 highly relevant, 3 perfectly relevant"


def config_url(tasks_url: str) -> str:
    """The labeling configuration beside the tasks: `tasks.json` -> `tasks.label-config.xml`."""
    stem = tasks_url[: -len(".json")] if tasks_url.endswith(".json") else tasks_url
    return stem + CONFIG_SUFFIX


def uncertainty(pairs: pa.Table, boundaries: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's samples' agreement (1 for one sample) and its score's distance to the nearest boundary."""
    agreement = pc.fill_null(pairs["agreement"], 1.0).to_numpy()
    score = pairs["score"].to_numpy()
    distance = np.abs(score[:, None] - np.asarray(boundaries, float)[None, :]).min(axis=1)
    return agreement, distance


def disagreeing(pairs: pa.Table, judgments: pa.Table, relevance_cut: int) -> np.ndarray:
    """Which pairs' label differs from the qrels' `relevance >= relevance_cut` (unjudged pairs do not)."""
    relevance = judgments["relevance"].take(pc.index_in(pair_keys(pairs), value_set=pair_keys(judgments)))
    differs = pc.not_equal(pairs["label"], pc.greater_equal(relevance, relevance_cut))
    return pc.fill_null(differs, False).to_numpy(zero_copy_only=False)


def ordered(pairs: pa.Table, boundaries: Sequence[float], disagrees: np.ndarray | None = None) -> pa.Table:
    """The pairs in review order (see the module's docstring)."""
    agreement, distance = uncertainty(pairs, boundaries)
    keys = pa.table({"agreement": agreement, "distance": distance, "query_id": pairs["query_id"],
                     "doc_id": pairs["doc_id"]})
    sort_keys = [(name, "ascending") for name in keys.column_names]
    if disagrees is not None:
        keys = keys.append_column("agrees", pa.array(~disagrees))
        sort_keys.insert(0, ("agrees", "ascending"))
    return pairs.take(pc.sort_indices(keys, sort_keys))


def order_text(run: ScoredRun, sampled: bool, disagreements: int | None = None, qrels_url: str | None = None,
               relevance_cut: int | None = None) -> str:
    """The review order in words: "lowest agreement first, then nearest the threshold 0.5"."""
    boundary = (f"a grade's cut point ({', '.join(f'{cut:g}' for cut in run.cuts)})" if run.graded
                else f"the threshold {run.threshold:g}")
    parts = [f"nearest {boundary}"]
    if sampled:
        parts.insert(0, "lowest agreement")
    if disagreements is not None:
        parts.insert(0, f"the {disagreements:,} whose label disagrees with {qrels_url} (relevance >= {relevance_cut} "
                        "is relevant)")
    return " first, then ".join(parts[:2]) + "".join(f", then {part}" for part in parts[2:])


def prediction(run: ScoredRun, score: float, choice: str) -> dict:
    return {"model_version": run.model, "score": score,
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [choice]}}]}


def tasks(pairs: pa.Table, run: ScoredRun) -> list[dict]:
    """One task a pair: `pairs` holds the scores' columns, the input texts and `reasoning`."""
    relevance = run.model_relevance(pairs).to_pylist()
    made = []
    for row, said in zip(pairs.to_pylist(), relevance):
        data = {
            "query": query_text(row["query"], row["instruction"]),
            "title": row["title"] or "",
            "text": row["text"],
            "reasoning": row["reasoning"] or "",
            **{name: row[name] for name in ("query_id", "doc_id", "score", "label", "grade", "agreement", "outcome")},
            "model": run.model,
            "output": run.url,
        }
        made.append({"data": data, "predictions": [prediction(run, row["score"], run.scale.choice(said))]})
    return made


def label_config(scale: Scale) -> str:
    """Label Studio's `<View>`: the query, the passage, the model's reasoning and one choice of the scale."""
    view = ElementTree.Element("View")

    def add(tag: str, **attributes: str) -> ElementTree.Element:
        return ElementTree.SubElement(view, tag, attributes)

    add("Header", value="Query")
    add("Text", name="query", value="$query")
    add("Header", value="Passage")
    add("Text", name="title", value="$title")
    add("Text", name=TO_NAME, value="$text")
    add("Header", value="The model's reasoning")
    add("Text", name="reasoning", value="$reasoning")
    add("Header", value=f"Relevance: {GRADE_MEANINGS}" if scale.graded else "Relevance")
    choices = add("Choices", name=FROM_NAME, toName=TO_NAME, choice="single-radio", showInline="true", required="true")
    for choice in scale.choices:
        ElementTree.SubElement(choices, "Choice", value=choice)
    ElementTree.indent(view)
    return ElementTree.tostring(view, encoding="unicode") + "\n"
