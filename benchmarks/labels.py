"""What `agreement`, `calibrate` and `export` cost on a large output: build a synthetic output of
--pairs scored pairs (scores/ and traces/ in part files of a batch each, its input, `_job.json`,
qrels judging a share of the pairs, and TREC runs of a few systems) with pyarrow, then time each
command as a user runs it, in a process of its own (Python's start and the imports included).

    .venv/bin/python benchmarks/labels.py [--pairs 100000] [--per-query 100] [--judged 0.5] [--systems 5]

The traces carry about --reasoning-words words of random vocabulary (so that they do not
compress away), as Rank1's do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rank1_batch.config import JobConfig
from rank1_batch.output.checkpoint import identity
from rank1_batch.schema import SCORES_SCHEMA, TRACES_SCHEMA, conform, grades

VOCABULARY = [f"w{number}" for number in range(5000)]
CUTS = (0.1, 0.5, 0.9)


def words(random, rows: int, count: int) -> list[str]:
    picks = random.integers(0, len(VOCABULARY), (rows, count))
    return [" ".join(VOCABULARY[i] for i in row) for row in picks]


def build(root: Path, pairs: int, per_query: int, judged: float, systems: int, reasoning_words: int,
          batch_size: int) -> None:
    random = np.random.default_rng(0)
    query_ids = [f"q{number}" for number in np.repeat(np.arange(pairs // per_query), per_query)]
    doc_ids = [f"d{number}" for number in range(len(query_ids))]
    rows = len(query_ids)
    relevance = random.choice(4, rows, p=[0.6, 0.2, 0.12, 0.08])
    score = np.clip(relevance / 4 + random.normal(0.1, 0.2, rows), 0, 1)

    (root / "input").mkdir(parents=True)
    pq.write_table(pa.table({"query_id": query_ids, "query": [f"query {q}" for q in query_ids], "doc_id": doc_ids,
                             "text": words(random, rows, 60)}), root / "input" / "pairs-0.parquet")
    output = root / "out"
    job = JobConfig.from_options({"input": [str(root / "input")], "output": str(output), "model": "tiny",
                                  "grades": CUTS})
    output.mkdir()
    (output / "_job.json").write_text(json.dumps(identity(job)))
    scores = conform(pa.table({
        "query_id": query_ids, "doc_id": doc_ids, "score": score, "label": score >= 0.5, "grade": grades(score, CUTS),
        "outcome": ["answered"] * rows, "truncated": [False] * rows,
    }), SCORES_SCHEMA)
    traces = pa.table({"query_id": query_ids, "doc_id": doc_ids,
                       "reasoning": words(random, rows, reasoning_words)}).cast(TRACES_SCHEMA)
    for directory, table in (("scores", scores), ("traces", traces)):
        (output / directory).mkdir()
        for start in range(0, rows, batch_size):
            pq.write_table(table.slice(start, batch_size), output / directory / f"part-{start:09d}.parquet")

    chosen = random.random(rows) < judged
    (root / "qrels.txt").write_text("".join(f"{q} 0 {d} {r}\n" for q, d, r, keep in
                                            zip(query_ids, doc_ids, relevance, chosen) if keep))
    for system in range(systems):
        # systems of growing quality: the score with less noise
        noisy = score + random.normal(0, 0.5 / (system + 1), rows)
        order = np.lexsort((-noisy, np.array(query_ids)))
        ranks = np.arange(rows) % per_query + 1
        (root / f"system-{system}.trec").write_text("".join(
            f"{query_ids[i]} Q0 {doc_ids[i]} {rank} {per_query - rank + 1} s{system}\n" for i, rank in zip(order, ranks)))


def timed(arguments: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rank1_batch.cli", *arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"rank1-batch {' '.join(arguments)} failed:\n{done.stdout}{done.stderr}")
    return seconds, done.stdout


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where to build (default: a new temporary directory).")
@click.option("--pairs", type=int, default=100_000, show_default=True)
@click.option("--per-query", type=int, default=100, show_default=True, help="Candidates per query.")
@click.option("--judged", type=float, default=0.5, show_default=True, help="Share of the pairs the qrels judge.")
@click.option("--systems", type=int, default=5, show_default=True, help="TREC runs given to `agreement --system`.")
@click.option("--reasoning-words", type=int, default=150, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Pairs per part file.")
def main(directory, pairs, per_query, judged, systems, reasoning_words, batch_size):
    root = Path(directory or tempfile.mkdtemp(prefix="labels-bench-"))
    started = time.perf_counter()
    build(root, pairs, per_query, judged, systems, reasoning_words, batch_size)
    print(f"built {pairs:,} pairs under {root} in {time.perf_counter() - started:.1f} s", flush=True)
    out, qrels = str(root / "out"), str(root / "qrels.txt")
    system_options = [word for system in range(systems) for word in ("--system", str(root / f"system-{system}.trec"))]
    commands = {
        "agreement": ["agreement", "--run", out, "--qrels", qrels],
        f"agreement, {systems} systems": ["agreement", "--run", out, "--qrels", qrels, *system_options],
        "calibrate": ["calibrate", "--run", out, "--qrels", qrels],
        "export": ["export", out, "--to", str(root / "train.jsonl")],
        "export --qrels --balance": ["export", out, "--to", str(root / "agreeing.jsonl"), "--qrels", qrels, "--balance"],
        "--version (Python and imports alone)": ["--version"],
    }
    print("| command | seconds |\n| --- | ---: |")
    for name, arguments in commands.items():
        seconds, printed = timed(arguments)
        print(f"| `{name}` | {seconds:.2f} |", flush=True)
        if name.startswith(("export", "calibrate")) or "systems" in name:
            print("    " + printed.strip().replace("\n", "\n    "), flush=True)


if __name__ == "__main__":
    main()
