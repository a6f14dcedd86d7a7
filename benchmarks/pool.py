"""What building a pool costs: --runs synthetic TREC runs of --queries queries at --depth each
(100 x 1,000 x 100 = 10M lines by default) are written to a temporary directory (not timed), then
two things are timed, each in a process of its own so that its peak memory is its own, in turns
over --rounds rounds:

- the floor: reading the same files with pyarrow's CSV reader alone, as the pool's first step does;
- the pool: `read_runs` and `build_pool` (parse, union, fusion, ranks), as `prepare` calls them.

    .venv/bin/python benchmarks/pool.py [--runs 100] [--queries 1000] [--depth 100] [--rounds 3]

Each query's passages are drawn from --universe candidates of Zipf-like popularity, so systems
overlap as real ones do. Figures: median wall seconds of the timed part (imports excluded),
input lines per second, and peak RSS (the process's high-water mark, imports included).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.csv as csv

from rank1_batch.config import job_logging

log = logging.getLogger("rank1_batch.benchmarks.pool")

# Run in the fresh process: the same imports either way, then only the reading or pooling is timed.
WORKER = """
import json, resource, sys, time
import pandas  # pyarrow imports it at its first to_numpy: an import, not pooling, so not timed
import pyarrow.csv as csv
from rank1_batch.ir.pool import RUN_SCHEMA, build_pool, read_runs

way, depth, paths = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
started = time.perf_counter()
if way == "floor":
    options = csv.ReadOptions(column_names=RUN_SCHEMA.names), csv.ParseOptions(delimiter=" ", quote_char=False)
    pairs = sum(csv.read_csv(path, *options).num_rows for path in paths)
else:
    pairs = build_pool(read_runs(paths), depth).num_rows
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
print(json.dumps({"seconds": seconds, "pairs": pairs, "rss_mb": peak_mb}))
"""


def write_runs(directory: Path, runs: int, queries: int, depth: int, universe: int, seed: int) -> list[str]:
    """`runs` TREC run files, `sysNNN.trec`, each system's top `depth` of every query."""
    random = np.random.default_rng(seed)
    popularity = np.log(random.pareto(1.0, (queries, universe)) + 1e-3)
    query_ids = np.repeat(np.arange(queries), depth)
    paths = []
    for system in range(runs):
        # Gumbel top-k: each system's own draw, without replacement, weighted by popularity
        picked = np.argsort(-(popularity + random.gumbel(size=popularity.shape)), axis=1)[:, :depth]
        ranks = np.tile(np.arange(1, depth + 1), queries)
        table = pa.table({
            "query_id": pa.array(query_ids + 100_000).cast(pa.string()), "q0": ["Q0"] * len(ranks),
            "doc_id": pa.array(query_ids * universe + picked.ravel()).cast(pa.string()), "rank": ranks,
            "score": (depth - ranks) / depth, "tag": [f"sys{system:03d}"] * len(ranks),
        })
        path = directory / f"sys{system:03d}.trec"
        csv.write_csv(table, path, csv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none"))
        paths.append(str(path))
    return paths


def measure(way: str, depth: int, paths: list[str]) -> dict:
    finished = subprocess.run([sys.executable, "-c", WORKER, way, str(depth), json.dumps(paths)],
                              capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--runs", type=int, default=100, show_default=True, help="Systems, one run file each.")
@click.option("--queries", type=int, default=1000, show_default=True)
@click.option("--depth", type=int, default=100, show_default=True,
              help="Lines per query in each run, and the pool's depth.")
@click.option("--universe", type=int, default=2000, show_default=True, help="Candidate passages per query.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Turns of floor and pool, each timed.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(runs, queries, depth, universe, rounds, seed):
    job_logging()
    if depth > universe:
        raise click.BadParameter(f"must be at most --universe {universe}", param_hint="--depth")
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as directory:
        paths = write_runs(Path(directory), runs, queries, depth, universe, seed)
        lines = runs * queries * depth
        size = sum(Path(path).stat().st_size for path in paths)
        log.info("wrote %d runs, %d lines, %.0f MB under %s", runs, lines, size / 1e6, directory)
        figures = {"floor": [], "pool": []}
        for _ in range(rounds):
            for way, taken in figures.items():
                taken.append(measure(way, depth, paths))
    pairs = figures["pool"][0]["pairs"]
    print(f"\n{runs} runs x {queries} queries x depth {depth} = {lines:,} lines ({size / 1e6:.0f} MB); "
          f"pool: {pairs:,} pairs; median of {rounds} rounds\n")
    print("| | wall s | lines/s | peak RSS MB |\n| --- | ---: | ---: | ---: |")
    median = {}
    for way, name in (("floor", "pyarrow.csv read alone (floor)"), ("pool", "read_runs + build_pool")):
        median[way] = statistics.median(figure["seconds"] for figure in figures[way])
        rss = max(figure["rss_mb"] for figure in figures[way])
        print(f"| {name} | {median[way]:.2f} | {lines / median[way]:,.0f} | {rss:,.0f} |")
    rounds_taken = ", ".join(f"{figure['seconds']:.2f}" for figure in figures["pool"])
    print(f"\npool / floor: {median['pool'] / median['floor']:.2f}x (pool rounds: {rounds_taken} s)")


if __name__ == "__main__":
    main()
