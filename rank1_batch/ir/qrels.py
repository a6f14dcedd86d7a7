"""Qrels as Arrow tables: read (TREC's four columns, or TREC RAG's six), merged with one source
winning over another, and written with a provenance file beside them that says where each label
came from. Columnar throughout, as an LLM's qrels of a whole pool run to millions of lines."""

from __future__ import annotations

import hashlib
import json

import click
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..cli_options import s3_options
from ..config import GREEDY, RunConfig
from ..model.prompt import prompt_body, query_text
from ..output.checkpoint import NotAnOutput, recorded_identity
from ..output.layout import MANIFEST
from ..output.storage import Output, storage_options
from ..schema import pair_keys, run_relevance
from .evaluate import QRELS_COLUMNS, QRELS_SCHEMA, QrelsError, read_qrels_table
from .labels import read_labels

KEY = ["query_id", "doc_id"]
# Where each pair's relevance came from: `human` (given qrels), `model` (a run's label or grade) or
# `human-review` (a reviewer's decision on a model's label). The model's columns are null for a
# human judgment; `annotators` and the model's own verdict are set for a reviewed one.
PROVENANCE_SCHEMA = pa.schema([
    *QRELS_SCHEMA,
    ("source", pa.string()),
    ("model", pa.string()),
    ("template", pa.string()),  # the prompt with {query} and {passage} in place of the pair's texts
    ("template_sha256", pa.string()),
    ("sampling", pa.string()),  # JSON: samples, temperature, top_p
    ("aggregate", pa.string()),  # how samples became one label
    ("output", pa.string()),  # the rank1-batch output, or the qrels file, the label came from
    ("annotators", pa.list_(pa.string())),
    ("model_relevance", pa.int64()),
    ("model_score", pa.float64()),  # P(true)
])
SOURCES = ("human", "model", "human-review")
FORMS = ("trec", "rag")
PROVENANCE_SUFFIX = ".provenance.parquet"
LINES_AT_ONCE = 1_000_000
# TREC RAG's confidence of a person's judgment.
HUMAN_CONFIDENCE = 1.0


def provenance_url(qrels_url: str) -> str:
    return qrels_url + PROVENANCE_SUFFIX


def read_provenance(qrels_url: str, storage_options: dict | None = None) -> pa.Table | None:
    """The provenance written beside qrels, or None when they have none (qrels made elsewhere)."""
    fs, path = fsspec.core.url_to_fs(provenance_url(qrels_url), **(storage_options or {}))
    if not fs.exists(path):
        return None
    return pq.read_table(path, filesystem=fs, schema=PROVENANCE_SCHEMA)


def with_provenance(qrels: pa.Table, source: str, **columns) -> pa.Table:
    """Qrels rows with PROVENANCE_SCHEMA's columns: `source`, each of `columns` (one value for
    every row, or an array), and nulls for the rest."""
    assert source in SOURCES, source
    given = {"source": source, **columns}
    arrays = []
    for field in PROVENANCE_SCHEMA:
        if field.name in QRELS_COLUMNS:
            arrays.append(qrels[field.name].cast(field.type))
            continue
        value = given.get(field.name)
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            arrays.append(value.cast(field.type))
        else:
            arrays.append(pa.array([value] * qrels.num_rows, field.type))
    return pa.table(arrays, schema=PROVENANCE_SCHEMA)


def merge(preferred: pa.Table, rest: pa.Table, preferred_name: str, rest_name: str) -> pa.Table:
    """`preferred`'s rows, and `rest`'s rows for the pairs `preferred` does not judge. Both share
    one schema; qrels of no shared query are of another collection, an error naming both."""
    if not pc.any(pc.is_in(rest["query_id"], preferred["query_id"].unique())).as_py():
        raise QrelsError(f"{preferred_name} and {rest_name} share no query: are they qrels of the same collection "
                         "and topics?")
    holes = rest.filter(pc.invert(pc.is_in(pair_keys(rest), pair_keys(preferred))))
    return pa.concat_tables([preferred, holes.select(preferred.column_names).cast(preferred.schema)])


def qrels_text(qrels: pa.Table, form: str = "trec", run_tag: str = "rank1") -> bytes:
    """The lines of qrels, sorted by query and passage: `qid 0 docid rel`, or for `rag` TREC RAG's
    `qid Q0 docid judgment confidence runid` from their provenance: a model's label has P(true) as
    its confidence and `run_tag` as its run; a person's, confidence 1 and its source as its run."""
    if form not in FORMS:
        raise QrelsError(f"--format {form!r}: expected {' or '.join(FORMS)}")
    qrels = qrels.sort_by([(name, "ascending") for name in KEY])
    relevance = pc.cast(qrels["relevance"], pa.string())
    if form == "trec":
        fields = [qrels["query_id"], "0", qrels["doc_id"], relevance]
    else:
        by_model = pc.equal(qrels["source"], "model")
        confidence = pc.if_else(by_model, qrels["model_score"], HUMAN_CONFIDENCE)
        fields = [qrels["query_id"], "Q0", qrels["doc_id"], relevance, pc.cast(confidence, pa.string()),
                  pc.if_else(by_model, run_tag, qrels["source"])]
    lines = pc.binary_join_element_wise(*fields, " ")
    if lines.null_count:
        raise QrelsError("a pair without a relevance (or, in TREC RAG's form, a confidence) cannot be written")
    return b"".join(_text_of(lines))


def _text_of(lines: pa.ChunkedArray) -> list[bytes]:
    """Lines as text, each ended by a newline, joined in Arrow a slice at a time rather than as
    Python strings one by one."""
    texts = []
    for start in range(0, len(lines), LINES_AT_ONCE):
        chunk = lines.slice(start, LINES_AT_ONCE).combine_chunks()
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(chunk)], pa.int32()), chunk), "\n")
        texts.append(joined[0].as_py().encode() + b"\n")
    return texts


def write_qrels(qrels: pa.Table, url: str, storage_options: dict | None = None, form: str = "trec",
                run_tag: str = "rank1") -> None:
    """Qrels to `url` (see `qrels_text`), and when `qrels` has PROVENANCE_SCHEMA's columns, their
    provenance beside it (`provenance_url`), as Parquet. Both are made before either is written."""
    text = qrels_text(qrels, form, run_tag)
    provenance = None
    if set(PROVENANCE_SCHEMA.names) <= set(qrels.column_names):
        provenance = qrels.select(PROVENANCE_SCHEMA.names).cast(PROVENANCE_SCHEMA)
        provenance = provenance.sort_by([(name, "ascending") for name in KEY])
    with fsspec.open(url, "wb", compression="infer", **(storage_options or {})) as handle:
        handle.write(text)
    if provenance is not None:
        fs, path = fsspec.core.url_to_fs(provenance_url(url), **(storage_options or {}))
        pq.write_table(provenance, path, filesystem=fs)


def model_qrels(scores: pa.Table, recorded: dict, output_url: str) -> pa.Table:
    """A run's labels as qrels with their provenance (from `recorded`, the run's recorded identity):
    the grade where the run has grades, else the label as 0/1."""
    graded = recorded["scoring"]["grades"] is not None
    relevance = run_relevance(scores, graded)
    if relevance.null_count:
        raise QrelsError(f"{output_url}: {relevance.null_count} scored pairs have no "
                         f"{'grade' if graded else 'label'} to write as a relevance")
    engine, scoring = recorded["engine"], recorded["scoring"]
    template = prompt_body(query_text("{query}", None, scoring["task_template"]), "{passage}")
    sampling = {name: engine[name] for name in GREEDY}
    qrels = pa.table({"query_id": scores["query_id"], "doc_id": scores["doc_id"], "relevance": relevance})
    return with_provenance(
        qrels, "model", model=engine["model"], template=template,
        template_sha256=hashlib.sha256(template.encode()).hexdigest(), sampling=json.dumps(sampling, sort_keys=True),
        aggregate=scoring["aggregate"], output=output_url, model_relevance=relevance,
        model_score=scores["score"],
    )


def read_with_provenance(url: str, storage_options: dict | None) -> pa.Table:
    """Given qrels with PROVENANCE_SCHEMA's columns: each judgment's own from the provenance file
    beside them (qrels rank1-batch wrote), else as a person's (`human`) judgments of that file."""
    qrels = read_qrels_table(url, storage_options)
    written = read_provenance(url, storage_options)
    if written is None:
        return with_provenance(qrels, "human", output=url)
    described = written.take(pc.index_in(pair_keys(qrels), value_set=pair_keys(written)))
    return pa.table([qrels[name] if name in QRELS_COLUMNS else described[name] for name in PROVENANCE_SCHEMA.names],
                    schema=PROVENANCE_SCHEMA)


def run_tag_of(output: Output) -> str:
    """The run's TREC tag, from its manifest: `_job.json` keeps only the options that decide
    results, which the tag does not. A run not yet finished has no manifest: the default tag."""
    if not output.exists(MANIFEST):
        return RunConfig.run_tag
    return json.loads(output.fs.cat_file(output.path(MANIFEST)))["job"]["run"]["run_tag"]


@click.command("qrels")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--to", "target", required=True, metavar="FILE", help="The qrels file to write (any fsspec URL).")
@click.option("--format", "form", type=click.Choice(FORMS), default="trec", show_default=True,
              help="`trec`: `qid 0 docid rel`; `rag`: TREC RAG's `qid Q0 docid judgment confidence runid`, with "
                   "P(true) as the confidence and the run's tag as its run (for a person's judgment, 1 and `human` "
                   "or `human-review`).")
@click.option("--merge", "merge_url", metavar="HUMAN_QRELS",
              help="Human qrels to merge with: a human judgment wins, the run's labels fill the holes. Qrels "
                   "rank1-batch wrote keep the provenance beside them.")
@s3_options
def qrels_command(output_url, target, form, merge_url, s3_endpoint_url, s3_profile):
    """Write a run's labels as TREC qrels (its grades when it has them, else its labels as 0/1),
    with a provenance file beside them (FILE.provenance.parquet) saying where each label came from."""
    storage = RunConfig(s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    output = Output(output_url, storage)
    try:
        recorded = recorded_identity(output)
        qrels = model_qrels(read_labels(output), recorded, output_url)
        from_model = qrels.num_rows
        if merge_url:
            qrels = merge(read_with_provenance(merge_url, storage_options(merge_url, storage)), qrels, merge_url, output_url)
        write_qrels(qrels, target, storage_options(target, storage), form, run_tag_of(output))
    except (ValueError, OSError, NotAnOutput) as error:
        raise click.ClickException(str(error)) from None
    filled = pc.sum(pc.equal(qrels["source"], "model")).as_py() or 0
    merged = f" ({qrels.num_rows - filled:,} human judgments, {filled:,} of the run's labels filling holes)" \
        if merge_url else ""
    click.echo(f"{qrels.num_rows:,} qrels{merged} of {from_model:,} scored pairs written to {target}; "
               f"provenance in {provenance_url(target)}")
