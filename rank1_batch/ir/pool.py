"""Pools of TREC runs, as relevance-labelling campaigns judge them (TREC DL, TREC RAG, SynDL): the
union of each query's top `depth` passages over many systems' runs, one row per (query, passage).

A pooled pair carries the systems that retrieved it within depth (`pooled_by`, sorted), its best
rank among them (`pooled_best_rank`), and the reciprocal-rank fusion of those ranks as its
first-stage score (the sum of 1/(60 + rank)), whose order is its `first_stage_rank` (ties: best
rank, then doc_id); so `run --top-k` and the cascade take a pool as they take one run.

A run file is one system: every line carries the same tag (the sixth field), no two files share
one, and ranks (the fourth field, which decides the depth) start at 1. Reading is columnar:
pyarrow's CSV reader for fields split by one space, a whitespace split of every line otherwise.
Only a file that fails to parse, or a row that is refused, is read again line by line, to name
the line as `prepare` does for one run.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from ..schema import pair_keys
from .evaluate import QrelsError, read_qrels_table
from .input_files import PrepareError, at_place, numbered_lines, parse_run_line

log = logging.getLogger(__name__)

RRF_K = 60
# A pair's fusion adds its terms exactly and rounds once: each float64 term 1/(60 + rank) splits
# exactly into integers of 2^-40 and of 2^-80 (for ranks below 10^8), which add in any order. So
# its score is the correctly rounded sum of its terms, whatever order the runs come in, and pairs
# retrieved at the same ranks tie exactly: the tie rule orders them, not a running sum's rounding.
COARSE, FINE = 2.0**40, 2.0**80
RUN_SCHEMA = pa.schema([("query_id", pa.string()), ("q0", pa.string()), ("doc_id", pa.string()),
                        ("rank", pa.int64()), ("score", pa.float64()), ("tag", pa.string())])
POOL_FIELDS = (pa.field("pooled_by", pa.list_(pa.string())), pa.field("pooled_best_rank", pa.int64()))
POOL_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("first_stage_rank", pa.int64()),
                         ("first_stage_score", pa.float64()), *POOL_FIELDS])
JUDGED_FIELD = pa.field("judged", pa.bool_())


class Run(NamedTuple):
    """One system's run file: its tag, its number of lines, and its pairs (query_id, doc_id, rank)."""

    path: str
    system: str
    lines: int
    pairs: pa.Table


def pool_runs(run_paths: Iterable[str], depth: int | None = None, qrels_path: str | None = None,
              holes_only: bool = False) -> tuple[list[Run], pa.Table, dict]:
    """The runs, their pool (see `build_pool`) and its record (see `pool_record`). With qrels,
    `judged` marks the pairs they judge, and `holes_only` keeps the others."""
    runs = read_runs(run_paths)
    pairs = build_pool(runs, depth)
    if qrels_path:
        try:
            pairs = mark_judged(pairs, read_qrels_table(qrels_path))
        except QrelsError as error:
            raise PrepareError(str(error)) from None
    record = pool_record(runs, depth, pairs, qrels_path, holes_only)
    log.info("%s", pool_summary(record))
    if holes_only:
        pairs = pairs.filter(pc.invert(pairs[JUDGED_FIELD.name]))
        if not pairs.num_rows:
            raise PrepareError(f"no holes: {qrels_path} judges every pooled pair")
    return runs, pairs, record


def read_run_table(path: str) -> pa.Table:
    """Every line of a TREC run as a RUN_SCHEMA row; a malformed line is a PrepareError naming the
    file and line."""
    with fsspec.open(path, "rb", compression="infer") as handle:
        data = handle.read()
    try:
        return _read_spaced(data)
    except pa.ArrowInvalid:
        pass  # tabs or runs of spaces between fields, or a malformed line: the slower split tells
    try:
        return _read_whitespaced(data)
    except (pa.ArrowInvalid, ValueError) as problem:
        for number, line in numbered_lines(path):
            with at_place(path, f"line {number}"):
                parse_run_line(line)
        # Every line reads as Python reads it, yet Arrow refused a value (a rank such as '+5').
        raise PrepareError(f"{path}: not a TREC run 'qid Q0 docid rank score tag' ({problem})") from None


def _read_spaced(data: bytes) -> pa.Table:
    """The lines, fields split by one space, through pyarrow's CSV reader (blank lines skipped)."""
    return csv.read_csv(
        pa.BufferReader(data),
        read_options=csv.ReadOptions(column_names=RUN_SCHEMA.names),
        parse_options=csv.ParseOptions(delimiter=" ", quote_char=False),
        # no null spellings: a rank of "NULL" is a malformed line, not a missing rank
        convert_options=csv.ConvertOptions(column_types=RUN_SCHEMA, null_values=[], strings_can_be_null=False),
    )


def _read_whitespaced(data: bytes) -> pa.Table:
    """The lines (ended by "\\n" only, as `prepare` reads them) split on any whitespace."""
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw == ord("\n"))
    bounds = np.r_[0, ends + 1, len(raw)] if len(raw) and raw[-1] != ord("\n") else np.r_[0, ends + 1]
    lines = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds.astype(np.int64)), pa.py_buffer(raw))
    lines.validate(full=True)  # UTF-8
    lines = pc.utf8_trim_whitespace(lines)
    fields = pc.utf8_split_whitespace(lines.filter(pc.greater(pc.utf8_length(lines), 0)))
    if not pc.all(pc.equal(pc.list_value_length(fields), len(RUN_SCHEMA))).as_py():
        raise ValueError(f"a line without {len(RUN_SCHEMA)} fields")
    flat = pc.list_flatten(fields)
    offsets = np.arange(0, len(flat), len(RUN_SCHEMA))
    return pa.table([pc.cast(flat.take(offsets + place), field.type) for place, field in enumerate(RUN_SCHEMA)],
                    schema=RUN_SCHEMA)


def read_run(path: str) -> Run:
    """A run file read as one system's run."""
    table = read_run_table(path)
    if table.num_rows == 0:
        raise PrepareError(f"{path}: no pairs")
    tags = pc.unique(table["tag"])
    if len(tags) > 1:
        first, other = tags[0].as_py(), tags[1].as_py()
        number = _line_where(path, lambda fields: fields[5] == other)
        raise PrepareError(f"{path} line {number}: tag {other} after tag {first}: a run file holds one system")
    if pc.min(table["rank"]).as_py() < 1:
        number = _line_where(path, lambda fields: int(fields[3]) < 1)
        raise PrepareError(f"{path} line {number}: rank below 1 (a pool's ranks start at 1)")
    return Run(path, tags[0].as_py(), table.num_rows, table.select(["query_id", "doc_id", "rank"]))


def read_runs(paths: Iterable[str]) -> list[Run]:
    """The run files, each one system: two files with the same tag are refused."""
    runs: dict[str, Run] = {}
    for path in paths:
        run = read_run(path)
        if run.system in runs:
            raise PrepareError(f"{runs[run.system].path} and {path} both have tag {run.system}: "
                               "each run file must be its own system")
        runs[run.system] = run
    log.info("read %d runs, %d lines", len(runs), sum(run.lines for run in runs.values()))
    return list(runs.values())


def _line_where(path: str, test: Callable[[list[str]], bool]) -> int:
    """The number of the first line whose fields pass `test`; only a refused row comes here."""
    return next(number for number, line in numbered_lines(path) if test(line.split()))


def where(runs: list[Run], depth: int | None, query_id: str, doc_id: str | None = None, occurrence: int = 1) -> str:
    """`path line N`: the line of the first run (in the runs' order) holding one that pools the
    query, or the pair, for the `occurrence`th time."""
    seen = 0

    def pools(fields: list[str]) -> bool:
        nonlocal seen
        seen += (fields[0] == query_id and doc_id in (None, fields[2])
                 and (depth is None or int(fields[3]) <= depth))
        return seen == occurrence

    for run in runs:
        rows = pc.equal(run.pairs["query_id"], query_id)
        if doc_id is not None:
            rows = pc.and_(rows, pc.equal(run.pairs["doc_id"], doc_id))
        if depth is not None:
            rows = pc.and_(rows, pc.less_equal(run.pairs["rank"], depth))
        if (pc.sum(rows).as_py() or 0) >= occurrence:
            return f"{run.path} line {_line_where(run.path, pools)}"
    raise LookupError(f"no run pools qid {query_id}")


def build_pool(runs: list[Run], depth: int | None = None) -> pa.Table:
    """The pool of the runs' top `depth` (all of each run when None): one POOL_SCHEMA row per
    (query, passage), ordered by query and first_stage_rank. A run that lists a pair twice within
    depth is refused."""
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    runs = sorted(runs, key=lambda run: run.system)  # a system's index is its place in pooled_by
    rows = pa.concat_tables([_pooled_rows(run.pairs, index, depth) for index, run in enumerate(runs)])
    if not rows.num_rows:
        return POOL_SCHEMA.empty_table()
    # Without threads, a group keeps its rows in input order, the runs' order: pooled_by is sorted.
    pairs = rows.group_by(["query_id", "doc_id"], use_threads=False).aggregate(
        [("rank", "min"), ("coarse", "sum"), ("fine", "sum"), ("system", "list")]).combine_chunks()
    systems = pairs["system_list"].combine_chunks()
    flat, parent = pc.list_flatten(systems).to_numpy(), pc.list_parent_indices(systems).to_numpy()
    again = np.flatnonzero((np.diff(flat) == 0) & (np.diff(parent) == 0))
    if len(again):
        query_id, doc_id = (pairs[name][parent[again[0]]].as_py() for name in ("query_id", "doc_id"))
        raise PrepareError(f"{where([runs[flat[again[0]]]], depth, query_id, doc_id, occurrence=2)}: "
                           f"docid {doc_id} listed twice for qid {query_id}")
    offsets = np.r_[0, np.cumsum(pc.list_value_length(systems).to_numpy())]
    names = pa.array([run.system for run in runs], pa.string())
    pooled_by = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), names.take(flat))
    score = pc.add(pc.divide(pc.cast(pairs["coarse_sum"], pa.float64()), COARSE),
                   pc.divide(pc.cast(pairs["fine_sum"], pa.float64()), FINE))
    keys = pa.table([pairs["query_id"], score, pairs["rank_min"], pairs["doc_id"]],
                    names=["query", "score", "best", "doc"])
    order = pc.sort_indices(keys, sort_keys=[("query", "ascending"), ("score", "descending"), ("best", "ascending"),
                                             ("doc", "ascending")])
    query_ids = pairs["query_id"].take(order).combine_chunks()
    return pa.table([query_ids, pairs["doc_id"].take(order), _places(query_ids), score.take(order),
                     pooled_by.take(order), pairs["rank_min"].take(order)], schema=POOL_SCHEMA)


def _pooled_rows(pairs: pa.Table, system: int, depth: int | None) -> pa.Table:
    """A run's rows within depth, with its system's index and each row's fusion term, split."""
    if depth is not None and pc.max(pairs["rank"]).as_py() > depth:  # else a filter would only copy
        pairs = pairs.filter(pc.less_equal(pairs["rank"], depth))
    terms = 1.0 / (RRF_K + pairs["rank"].to_numpy())
    coarse = np.floor(terms * COARSE)
    columns = {"system": np.full(pairs.num_rows, system, np.int32), "coarse": coarse.astype(np.int64),
               "fine": ((terms - coarse / COARSE) * FINE).astype(np.int64)}
    for name, values in columns.items():
        pairs = pairs.append_column(name, pa.array(values))
    return pairs


def _places(query_ids: pa.Array) -> np.ndarray:
    """1, 2, ... along each query's stretch of rows."""
    starts = np.flatnonzero(np.r_[True, pc.not_equal(query_ids[1:], query_ids[:-1]).to_numpy(zero_copy_only=False)])
    return np.arange(1, len(query_ids) + 1) - np.repeat(starts, np.diff(np.r_[starts, len(query_ids)]))


def mark_judged(pairs: pa.Table, qrels: pa.Table) -> pa.Table:
    """The pairs with `judged`: whether the qrels hold a judgment of the pair, of any relevance."""
    return pairs.append_column(JUDGED_FIELD, pc.is_in(pair_keys(pairs), value_set=pair_keys(qrels)))


def pool_record(runs: list[Run], depth: int | None, pairs: pa.Table, qrels_path: str | None = None,
                holes_only: bool = False) -> dict:
    """What `_pool.json` holds: the runs, the depth, the fusion's k, each query's pool size and,
    with qrels, how many pairs they judge, how many are holes, and whether only those are kept."""
    sizes = pairs.group_by("query_id").aggregate([("doc_id", "count")]).sort_by("query_id")
    counts = sizes["doc_id_count"].to_pylist()
    record = {
        "runs": [{"path": run.path, "system": run.system, "lines": run.lines} for run in runs],
        "depth": depth,
        "rrf_k": RRF_K,
        "queries": len(counts),
        "pairs": pairs.num_rows,
        "per_query": {"min": min(counts, default=0), "median": statistics.median(counts) if counts else 0,
                      "max": max(counts, default=0)},
        "sizes": dict(zip(sizes["query_id"].to_pylist(), counts)),
    }
    if JUDGED_FIELD.name in pairs.column_names:
        judged = pc.sum(pairs[JUDGED_FIELD.name]).as_py() or 0
        record["qrels"] = {"path": qrels_path, "judged": judged, "holes": pairs.num_rows - judged,
                           "holes_only": holes_only}
    return record


def pool_summary(record: dict) -> str:
    """One line on the pool: runs, depth, queries, pairs and their spread over queries, holes."""
    spread = record["per_query"]
    depth = "all of each run" if record["depth"] is None else f"depth {record['depth']}"
    line = (f"pool of {len(record['runs'])} runs at {depth}: {record['queries']} queries, {record['pairs']} pairs "
            f"(per query min {spread['min']}, median {spread['median']:g}, max {spread['max']})")
    if "qrels" in record:
        line += f"; {record['qrels']['judged']} judged, {record['qrels']['holes']} holes"
    return line
