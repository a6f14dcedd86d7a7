"""The files a first stage hands over, read line by line with every error naming its file and
line: TREC runs, topics (TSV), corpora (JSONL or TSV), and RankLLM's JSON of ranked candidates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing, contextmanager

import fsspec
import pyarrow as pa

from ..schema import INPUT_SCHEMA

# The contract's columns that these formats can fill (none carries an instruction).
PREPARED_SCHEMA = pa.schema([field for field in INPUT_SCHEMA if field.name != "instruction"])
DOC_ID_KEYS = ("docid", "_id", "id")
TEXT_KEYS = ("text", "contents", "segment")
JSON_SUFFIXES = (".jsonl", ".json")
TSV_SUFFIXES = (".tsv", ".txt")


class PrepareError(ValueError):
    """A problem in an input file, named by file and 1-based line."""


@contextmanager
def at_place(path: str, where: str):
    """Turn a record parser's ValueError into a PrepareError that names the place."""
    try:
        yield
    except PrepareError:
        raise
    except ValueError as problem:
        raise PrepareError(f"{path} {where}: {problem}") from None


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers. Lines end at "\\n" only, so a stray "\\r"
    inside a passage cannot split it."""
    with fsspec.open(path, "rb", compression="infer") as handle:
        for number, raw in enumerate(handle, 1):
            with at_place(path, f"line {number}"):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    raise ValueError(f"not UTF-8 ({error.reason})") from None
            if line.strip():
                yield number, line


def parse_run_line(line: str) -> tuple[str, str, int, float]:
    """(qid, docid, rank, score) of a TREC run line."""
    fields = line.split()
    if len(fields) != 6:
        raise ValueError(f"expected 'qid Q0 docid rank score tag', got {len(fields)} fields")
    query_id, _, doc_id, rank, score, _ = fields
    return query_id, doc_id, _integer(rank, "rank"), _number(score, "score")


def parse_tsv_line(line: str, layout: str) -> tuple[str, str]:
    """(id, text) of a `id<TAB>text` line; the text keeps any further tabs."""
    key, tab, text = line.partition("\t")
    if not tab or not key:
        raise ValueError(f"expected '{layout}'")
    return key, text


def parse_json(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    return record


def passage_record(record: dict) -> tuple[str, str, str | None]:
    """(docid, text, title) of a JSONL corpus record."""
    doc_id = _identifier(_first(record, DOC_ID_KEYS))
    text, title = passage_fields(record)
    return doc_id, text, title


def passage_fields(doc: str | dict) -> tuple[str, str | None]:
    """(text, title) of a passage given as a string or as an object with a text key."""
    if isinstance(doc, str):
        return doc, None
    if not isinstance(doc, dict):
        raise ValueError("passage is neither a string nor an object")
    text = _string(_first(doc, TEXT_KEYS), TEXT_KEYS[0])
    title = doc.get("title")
    return text, None if title is None else _string(title, "title")


def _first(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    raise ValueError(f"no {' / '.join(keys)}")


def _identifier(value) -> str:
    # Ids are often written as JSON integers (RankLLM's qid); the contract holds strings.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"id {value!r} is neither a string nor an integer")
    return str(value)


def _string(value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a list")
    return value


def _integer(value, name: str) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not an integer") from None


def _number(value, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None


class Pairs:
    """The prepared table's columns, filled pair by pair."""

    def __init__(self):
        self.columns = {name: [] for name in PREPARED_SCHEMA.names}
        self.seen: set[tuple[str, str]] = set()

    def add(self, query_id, query, doc_id, text, title, rank, score) -> None:
        if (query_id, doc_id) in self.seen:
            raise ValueError(f"docid {doc_id} listed twice for qid {query_id}")
        self.seen.add((query_id, doc_id))
        for name, value in zip(PREPARED_SCHEMA.names, (query_id, query, doc_id, text, title, rank, score)):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=PREPARED_SCHEMA)


def read_topics(path: str, wanted: set[str] | None = None) -> dict[str, str]:
    """Query texts by qid from a `qid<TAB>text` file (only the `wanted` qids, when given, each of
    which must appear once)."""
    topics: dict[str, str] = {}
    for number, line in numbered_lines(path):
        with at_place(path, f"line {number}"):
            query_id, text = parse_tsv_line(line, "qid<TAB>text")
            if query_id in topics:
                raise ValueError(f"qid {query_id} repeated")
        if wanted is None or query_id in wanted:
            topics[query_id] = text
    return topics


def read_corpus(path: str, wanted: set[str] | None = None) -> dict[str, tuple[str, str | None]]:
    """(text, title) by docid from a TSV or JSONL corpus (only the `wanted` docids, when given,
    each of which must appear once). Every line is parsed, kept or not, so a broken corpus is
    noticed whichever run uses it."""
    passages: dict[str, tuple[str, str | None]] = {}
    is_json = None
    for number, line in numbered_lines(path):
        if is_json is None:
            is_json = _is_json_corpus(path, line)
        with at_place(path, f"line {number}"):
            if is_json:
                doc_id, text, title = passage_record(parse_json(line))
            else:
                doc_id, text = parse_tsv_line(line, "docid<TAB>text")
                title = None
            if doc_id in passages:
                raise ValueError(f"docid {doc_id} repeated")
        if wanted is None or doc_id in wanted:
            passages[doc_id] = (text, title)
    return passages


def _is_json_corpus(path: str, first_line: str) -> bool:
    name = path.lower()
    if fsspec.utils.infer_compression(name):
        name = name.rsplit(".", 1)[0]
    if name.endswith(JSON_SUFFIXES):
        return True
    if name.endswith(TSV_SUFFIXES):
        return False
    return first_line.lstrip().startswith("{")


def from_rankllm(path: str) -> pa.Table:
    """The pairs of RankLLM retrieve results, a JSON list or JSONL requests (told apart by the
    first character). A candidate without a rank takes its 1-based position in the list."""
    with closing(numbered_lines(path)) as lines:
        _, first_line = next(lines, (0, ""))
    return _from_rankllm_list(path) if first_line.lstrip().startswith("[") else _from_rankllm_requests(path)


def _from_rankllm_list(path: str) -> pa.Table:
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as handle:
        try:
            entries = json.load(handle)
        except json.JSONDecodeError as error:
            raise PrepareError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    pairs = Pairs()
    for number, entry in enumerate(entries, 1):
        with at_place(path, f"query {number}"):
            if not isinstance(entry, dict):
                raise ValueError("expected a JSON object")
            query = _string(_first(entry, ("query",)), "query")
            hits = _list(_first(entry, ("hits",)), "hits")
        for position, hit in enumerate(hits, 1):
            with at_place(path, f"query {number} hit {position}"):
                if not isinstance(hit, dict):
                    raise ValueError("expected a JSON object")
                pairs.add(
                    _identifier(_first(hit, ("qid",))),
                    query,
                    _identifier(_first(hit, ("docid",))),
                    _string(_first(hit, ("content",)), "content"),
                    None,
                    _integer(hit.get("rank", position), "rank"),
                    _optional_number(hit.get("score")),
                )
    return pairs.table()


def _from_rankllm_requests(path: str) -> pa.Table:
    pairs = Pairs()
    for number, line in numbered_lines(path):
        with at_place(path, f"line {number}"):
            request = parse_json(line)
            query = _first(request, ("query",))
            if not isinstance(query, dict):
                raise ValueError("query is not an object with text and qid")
            query_id = _identifier(_first(query, ("qid",)))
            query_text = _string(_first(query, ("text",)), "query text")
            for position, candidate in enumerate(_list(_first(request, ("candidates",)), "candidates"), 1):
                try:
                    if not isinstance(candidate, dict):
                        raise ValueError("expected a JSON object")
                    doc_id = _identifier(_first(candidate, ("docid",)))
                    text, title = passage_fields(_first(candidate, ("doc",)))
                    rank = _integer(candidate.get("rank", position), "rank")
                    score = _optional_number(candidate.get("score"))
                except ValueError as problem:
                    raise ValueError(f"candidate {position}: {problem}") from None
                pairs.add(query_id, query_text, doc_id, text, title, rank, score)
    return pairs.table()


def _optional_number(value) -> float | None:
    return None if value is None else _number(value, "score")
