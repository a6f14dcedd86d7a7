"""`export`: a run's reasoning traces as training examples, in the chat-messages shape that
fine-tuning tools read, one JSON object a line:

    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "content": "<think>REASONING</think> true"}],
     "query_id": ..., "doc_id": ..., "score": ...}

PROMPT is the Rank1 prompt as the scorer built it (task template and instruction included), up to
the `<think>` that opens the answer. traces/ holds the reasoning only and labels/ lacks title and
instruction, so the texts come from the run's input, as recorded in `_job.json`, joined by
query_id and doc_id. Rank1's own recipe keeps only the traces whose label agrees with the qrels
(`--qrels`).
"""

from __future__ import annotations

import json

import click
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..cli_options import s3_options
from ..config import RunConfig
from ..model.prompt import LABEL_FALSE, LABEL_TRUE, THINK_CLOSE, THINK_OPEN, passage_text, prompt_body, query_text
from ..output.checkpoint import NotAnOutput, recorded_identity
from ..output.parallel_reads import in_parallel
from ..output.storage import Output, list_input_files, read_footer, storage_options
from ..schema import SCORES_SCHEMA, TRACES_SCHEMA, source_columns, to_contract
from .agreement import DEFAULT_RELEVANCE_CUT, qrels_table
from .evaluate import read_qrels

KEY = ["query_id", "doc_id"]
TEXTS = ["query", "text", "title", "instruction"]


def input_texts(run: RunConfig) -> tuple[pa.Table, pa.Table]:
    """Each input pair's texts, and the pairs the input repeats: those are left out, as the run
    scored only one of their rows and which one is not known here."""
    fs, paths = list_input_files(run)

    def read(path: str) -> pa.Table:
        columns = source_columns(read_footer(fs, path).columns, run.columns)
        return to_contract(pq.read_table(path, filesystem=fs, columns=columns), run.columns).select([*KEY, *TEXTS])

    texts = pa.concat_tables(in_parallel(read, paths))
    counts = texts.group_by(KEY).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1)).select(KEY)
    return texts.join(repeated, KEY, join_type="left anti"), repeated


def user_prompt(row: dict, task_template: str | None) -> str:
    """The Rank1 prompt of a pair, as `PromptEncoder.encode` builds it before its `<think>`."""
    return prompt_body(query_text(row["query"], row["instruction"], task_template), passage_text(row["text"], row["title"]))


def example(row: dict, task_template: str | None) -> dict:
    answer = LABEL_TRUE if row["label"] else LABEL_FALSE
    return {
        "messages": [{"role": "user", "content": user_prompt(row, task_template)},
                     {"role": "assistant", "content": f"{THINK_OPEN}{row['reasoning']}{THINK_CLOSE}{answer}"}],
        "query_id": row["query_id"],
        "doc_id": row["doc_id"],
        "score": row["score"],
    }


def balanced(pairs: pa.Table, seed: int) -> pa.Table:
    """As many positives as negatives: the larger class drawn down at random, by `seed`."""
    label = pairs["label"].to_numpy(zero_copy_only=False)
    positives, negatives = np.flatnonzero(label), np.flatnonzero(~label)
    keep = min(len(positives), len(negatives))
    chosen = [side if len(side) == keep else np.random.default_rng(seed).choice(side, keep, replace=False)
              for side in (positives, negatives)]
    return pairs.take(np.sort(np.concatenate(chosen)))


@click.command("export")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--to", "target", required=True, metavar="URL",
              help="The JSONL file to write (any fsspec URL; a .gz name is compressed).")
@click.option("--input", "inputs", multiple=True, metavar="URL",
              help="The run's input where it is now; repeatable (default: the input recorded in OUTPUT/_job.json).")
@click.option("--qrels", "qrels_url", metavar="FILE",
              help="Keep only the pairs whose label agrees with these qrels (pairs they do not judge are dropped).")
@click.option("--relevance-cut", type=int, default=DEFAULT_RELEVANCE_CUT, show_default=True,
              help="Lowest qrels relevance that agrees with a true label.")
@click.option("--answered-only", is_flag=True, help="Keep only the pairs whose outcome is `answered`.")
@click.option("--balance", is_flag=True, help="Keep as many positives as negatives, drawing the larger class down at random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --balance's draw.")
@s3_options
def export_command(output_url, target, inputs, qrels_url, relevance_cut, answered_only, balance, seed,
                   s3_endpoint_url, s3_profile):
    """Write a run's traces as chat-messages training examples (JSONL) to --to."""
    storage = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    output = Output(output_url, storage)
    try:
        recorded = recorded_identity(output)
    except NotAnOutput as error:
        raise click.ClickException(str(error)) from None
    if recorded["scoring"]["scorer"] != "rank1":
        raise click.ClickException(f"{output_url} was scored by a {recorded['scoring']['scorer']}, which writes no "
                                   "reasoning to export")
    dropped: dict[str, int] = {}

    def counted(reason: str, before: pa.Table, after: pa.Table) -> pa.Table:
        dropped[reason] = before.num_rows - after.num_rows
        return after

    try:
        scores = output.read("scores", [*KEY, "score", "label", "outcome", "truncated"], SCORES_SCHEMA)
        traces = output.read("traces", TRACES_SCHEMA.names, TRACES_SCHEMA)
        if scores.num_rows and not traces.num_rows:
            raise ValueError(f"{output_url}: no traces/ to export (was it run with --no-traces?)")
        run = RunConfig(input=tuple(inputs or recorded["run"]["input"]), columns=recorded["run"]["columns"],
                        s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
        texts, repeated = input_texts(run)
        qrels = read_qrels(qrels_url, storage_options(qrels_url, storage)) if qrels_url else None
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None

    pairs = scores.join(traces, KEY, join_type="inner")
    pairs = counted("without a trace", scores, pairs)
    pairs = counted("repeated in the input", pairs, pairs.join(repeated, KEY, join_type="left anti"))
    pairs = counted("not in the input", pairs, pairs.join(texts, KEY, join_type="inner"))
    # the scorer saw a cut passage, which the input's text is not
    pairs = counted("truncated", pairs, pairs.filter(pc.invert(pairs["truncated"])))
    if answered_only:
        pairs = counted("not answered", pairs, pairs.filter(pc.equal(pairs["outcome"], "answered")))
    if qrels is not None:
        pairs = counted("not judged in the qrels", pairs, pairs.join(qrels_table(qrels), KEY, join_type="inner"))
        agrees = pc.equal(pairs["label"], pc.greater_equal(pairs["relevance"], relevance_cut))
        pairs = counted("label disagrees with the qrels", pairs, pairs.filter(agrees))
    pairs = pairs.sort_by([(name, "ascending") for name in KEY])  # joins keep no order; the draw needs one
    if balance:
        pairs = counted("to balance", pairs, balanced(pairs, seed))

    task_template = recorded["scoring"].get("task_template")
    try:
        with fsspec.open(target, "wt", encoding="utf-8", compression="infer", **storage_options(target, storage)) as out:
            for row in pairs.select([*KEY, "score", "label", "reasoning", *TEXTS]).to_pylist():
                out.write(json.dumps(example(row, task_template), ensure_ascii=False) + "\n")
    except OSError as error:
        raise click.ClickException(f"{target}: {error}") from None
    click.echo(f"{pairs.num_rows:,} examples of {scores.num_rows:,} scored pairs written to {target}; dropped: "
               + ", ".join(f"{reason} {count:,}" for reason, count in dropped.items()))
