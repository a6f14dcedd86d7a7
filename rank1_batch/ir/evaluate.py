"""Runs and qrels read (qrels as TREC's four columns or TREC RAG's six), and the effectiveness of
the reranked and first-stage orders against qrels, measured by ir-measures.

Queries: a run is averaged over the queries that are in both the reranked run and the qrels,
as trec_eval does by default, so the figures match published trec_eval ones. The first-stage
order is averaged over the same queries (one it lacks scores 0), so the two columns compare
like with like. ir-measures alone would also count the judged queries a run lacks, as zeros
(trec_eval -c); the qrels are cut down to the chosen queries to decide this here.

Relevance: nDCG uses the graded judgments; binary measures (those with a `rel` parameter: RR, R,
AP, P, ...) count a passage as relevant from `relevance_level` up (TREC DL uses 2).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from typing import NamedTuple

import click
import fsspec
import ir_measures
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

# ir-measures reads MRR, Recall and MAP as RR, R and AP; results keep the name the user gave.
DEFAULT_METRICS = ("nDCG@10", "MRR@10", "Recall@100", "MAP")
QRELS_COLUMNS = ("query_id", "doc_id", "relevance")
QRELS_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("relevance", pa.int64())])
_FIELDS = re.compile(rb"[ \t]+")
_EDGES = re.compile(rb"(?m)^ | $")
# A metric name is a run of characters other than spaces and commas, or a parenthesised group,
# so that `RR(rel=1,judged_only=True)@10` stays whole.
_METRIC_NAME = re.compile(r"(?:[^\s,(]|\([^)]*\))+")


class QrelsError(ValueError):
    """Qrels that cannot be read, merged or written as asked."""


class Runs(NamedTuple):
    reranked: Run
    first_stage: Run | None  # None when the order is not known (a plain TREC run)


def run_from_ranks(table: pa.Table, rank_column: str) -> Run:
    """A run of the rows that have a rank, in rank order. TREC tools order by score, so the score
    given is rank-derived (n - position + 1 inside a query) and the measured order is exactly the
    rank order; equal ranks fall back to doc_id order, as the ranking does."""
    ordered: dict[str, list[str]] = {}
    rows = zip(table["query_id"].to_pylist(), table[rank_column].to_pylist(), table["doc_id"].to_pylist())
    for query_id, _, doc_id in sorted(row for row in rows if row[1] is not None):
        ordered.setdefault(query_id, []).append(doc_id)
    return {query_id: {doc_id: float(len(docs) - position) for position, doc_id in enumerate(docs)}
            for query_id, docs in ordered.items()}


def read_run(url: str, storage_options: dict | None = None) -> Runs:
    """The runs of a rank1-batch output directory (reranked by `rank`, first stage by
    `first_stage_rank`), or of a TREC run file (its own scores; no first-stage order)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path):
        ranked = f"{path.rstrip('/')}/ranked"
        if not fs.isdir(ranked):
            raise ValueError(f"{url}: a directory without ranked/, so not a rank1-batch output")
        table = pq.read_table(ranked, filesystem=fs, columns=["query_id", "doc_id", "rank", "first_stage_rank"])
        return Runs(run_from_ranks(table, "rank"), run_from_ranks(table, "first_stage_rank") or None)
    run: Run = {}
    with fs.open(path, "rt", encoding="utf-8", compression="infer") as handle:
        try:
            for scored in ir_measures.read_trec_run(handle):
                run.setdefault(scored.query_id, {})[scored.doc_id] = scored.score
        except ValueError as error:
            raise ValueError(f"{url}: not a TREC run 'qid Q0 docid rank score tag' ({error})") from None
    return Runs(run, None)


def read_qrels_table(url: str, storage_options: dict | None = None) -> pa.Table:
    """TREC qrels `qid 0 docid relevance`, or TREC RAG's `qid Q0 docid judgment confidence runid`,
    as QRELS_SCHEMA rows; a malformed line is an error naming the file and line."""
    try:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise QrelsError(f"{url}: no such qrels file") from None
    # one space between fields, none at a line's ends, so that one-character CSV parsing reads them
    text = _EDGES.sub(b"", _FIELDS.sub(b" ", data.replace(b"\r", b"")))
    try:
        table = csv.read_csv(io.BytesIO(text), read_options=csv.ReadOptions(autogenerate_column_names=True),
                             parse_options=csv.ParseOptions(delimiter=" ", quote_char=False),
                             convert_options=csv.ConvertOptions(column_types={f"f{n}": pa.string() for n in range(6)}))
    except pa.ArrowInvalid:
        raise QrelsError(_first_bad_line(url, data, lambda fields: len(fields) not in (4, 6))) from None
    if table.num_columns not in (4, 6):
        raise QrelsError(_first_bad_line(url, data, lambda fields: True))
    try:
        relevance = pc.cast(table["f3"], pa.int64())
    except pa.ArrowInvalid:
        raise QrelsError(_first_bad_line(url, data, lambda fields: not _is_integer(fields[3]))) from None
    return pa.table([table["f0"], table["f2"], relevance], schema=QRELS_SCHEMA)


def _is_integer(field: bytes) -> bool:
    try:
        int(field)
    except ValueError:
        return False
    return True


def _first_bad_line(url: str, data: bytes, is_bad) -> str:
    """The error for the first line `is_bad` (given its fields) finds; read line by line, as only a
    failed read comes here."""
    for number, line in enumerate(data.splitlines(), 1):
        fields = line.split()
        if fields and (len(fields) not in (4, 6) or is_bad(fields)):
            shown = line.decode("utf-8", "replace")[:120]
            return (f"{url}, line {number}: {shown!r} is not qrels 'qid 0 docid relevance' (or TREC RAG's "
                    "'qid Q0 docid judgment confidence runid'), with an integer relevance")
    return f"{url}: not TREC qrels 'qid 0 docid relevance'"


def read_qrels(url: str, storage_options: dict | None = None) -> Qrels:
    """TREC qrels (`qid 0 docid relevance`, or TREC RAG's six columns) as ir-measures takes them."""
    table = read_qrels_table(url, storage_options)
    qrels: Qrels = {}
    for query_id, doc_id, relevance in zip(*(table[name].to_pylist() for name in QRELS_COLUMNS)):
        qrels.setdefault(query_id, {})[doc_id] = relevance
    return qrels


def metric_names(values: Iterable[str]) -> list[str]:
    """Metric names from option values that may each hold several, separated by spaces or commas."""
    return list(dict.fromkeys(name for value in values for name in _METRIC_NAME.findall(value)))


def measures(names: Iterable[str], relevance_level: int = 2) -> dict[str, ir_measures.Measure]:
    """The ir-measures measure of each name; binary ones get rel=relevance_level unless the name
    sets rel itself."""
    parsed = {}
    for name in names:
        try:
            measure = ir_measures.parse_measure(name)
        except (NameError, ValueError):
            raise ValueError(f"unknown metric {name!r} (see ir-measures' measure names)") from None
        if "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=relevance_level)
        parsed[name] = measure
    return parsed


def judged_queries(run: Run, qrels: Qrels) -> set[str]:
    """The queries a run is averaged over: those of the run that have judgments."""
    return run.keys() & qrels.keys()


def evaluate(
    run: Run,
    qrels: Qrels,
    metrics: Iterable[str] = DEFAULT_METRICS,
    relevance_level: int = 2,
    queries: Iterable[str] | None = None,
) -> dict[str, float]:
    """Mean of each metric over `queries` (by default the run's judged queries); a query the run
    lacks scores 0."""
    chosen = measures(metrics, relevance_level)
    queries = judged_queries(run, qrels) if queries is None else queries
    judged = {query_id: qrels[query_id] for query_id in queries if query_id in qrels}
    if not judged:
        raise ValueError("no query of the run has judgments in the qrels")
    values = ir_measures.calc_aggregate(set(chosen.values()), judged, run)
    return {name: float(values[measure]) for name, measure in chosen.items()}


@click.command("eval")
@click.option("--run", "run_url", required=True, metavar="OUTPUT_OR_TREC_FILE",
              help="A rank1-batch output URL (both orders) or a TREC run file.")
@click.option("--qrels", "qrels_url", required=True, metavar="FILE", help="TREC qrels.")
@click.option("--metrics", multiple=True, metavar="NAMES",
              help=f"ir-measures names, space or comma separated; repeatable [default: {' '.join(DEFAULT_METRICS)}].")
@click.option("--relevance-level", type=int, default=2, show_default=True,
              help="Lowest judgment that binary metrics count as relevant.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def eval_command(run_url, qrels_url, metrics, relevance_level, as_json):
    """Measure the reranked and first-stage orders against qrels."""
    names = metric_names(metrics) or list(DEFAULT_METRICS)
    try:
        measures(names, relevance_level)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--metrics") from None
    try:
        runs = read_run(run_url)
        qrels = read_qrels(qrels_url)
        queries = judged_queries(runs.reranked, qrels)
        reranked = evaluate(runs.reranked, qrels, names, relevance_level, queries)
        first_stage = {} if runs.first_stage is None else evaluate(runs.first_stage, qrels, names, relevance_level, queries)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"reranked": reranked, "first_stage": first_stage, "queries": len(queries)}))
        return
    columns = {"reranked": reranked, "first stage": first_stage} if first_stage else {"run": reranked}
    width = max(len(name) for name in ["metric", *names])
    click.echo(f"{'metric':<{width}}" + "".join(f"  {title:>11}" for title in columns))
    for name in names:
        click.echo(f"{name:<{width}}" + "".join(f"  {values[name]:>11.4f}" for values in columns.values()))
    click.echo(f"{len(queries)} queries (those of the run with judgments)")
