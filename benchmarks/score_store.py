"""What a score store lookup costs as the store grows: fill a store the way a run would (one add
per batch of a few queries' candidates), then time lookups of one batch's keys before and after
`compact`.

    .venv/bin/python benchmarks/score_store.py [--rows 200000] [--per-query 100] [--batch-size 256]
    .venv/bin/python benchmarks/score_store.py --url s3://bucket/bench-store --s3-endpoint-url http://...

The rows carry reasoning of about --reasoning-words words of random vocabulary (so that it does
not compress away), as Rank1's traces do.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import click
import numpy as np
import pyarrow as pa

from rank1_batch.config import JobConfig, RunConfig
from rank1_batch.store.keys import result_identity, store_keys
from rank1_batch.store.score_store import ScoreStore

VOCABULARY = [f"w{number}" for number in range(5000)]


def batch_rows(result: dict, first_query: int, queries: int, per_query: int, words: int, random) -> pa.Table:
    rows = queries * per_query
    query_numbers = np.repeat(np.arange(first_query, first_query + queries), per_query)
    prompts = [[int(q), d, 7, 11] for q, d in zip(query_numbers, np.tile(np.arange(per_query), queries))]
    picks = random.integers(0, len(VOCABULARY), (rows, words))
    return pa.table({
        "key": store_keys(result, prompts), "query": [f"query {q}" for q in query_numbers],
        "score": random.random(rows), "logprob_true": -random.random(rows), "logprob_false": -random.random(rows),
        "outcome": ["answered"] * rows, "reasoning_tokens": pa.array([words] * rows, pa.int32()),
        "prompt_tokens": pa.array([300] * rows, pa.int32()), "truncated": [False] * rows,
        "reasoning": [" ".join(VOCABULARY[i] for i in row) for row in picks], "model": ["bench"] * rows,
    })


def time_lookups(store: ScoreStore, batches: list[pa.Table]) -> tuple[float, int]:
    """Median milliseconds of one lookup per batch, and the rows found in all."""
    times, found = [], 0
    for batch in batches:
        started = time.perf_counter()
        found += store.lookup(batch["query"], batch["key"]).num_rows
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), found


@click.command()
@click.option("--url", help="Store URL (default: a new temporary directory).")
@click.option("--rows", type=int, default=200_000, show_default=True)
@click.option("--per-query", type=int, default=100, show_default=True, help="Candidates per query.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Rows per add, whole queries.")
@click.option("--partitions", type=int, default=256, show_default=True)
@click.option("--reasoning-words", type=int, default=250, show_default=True)
@click.option("--lookups", type=int, default=20, show_default=True, help="Batches looked up, each timed.")
@click.option("--s3-endpoint-url")
def main(url, rows, per_query, batch_size, partitions, reasoning_words, lookups, s3_endpoint_url):
    url = url or tempfile.mkdtemp(prefix="score-store-bench-")
    store = ScoreStore.open(url, RunConfig(s3_endpoint_url=s3_endpoint_url), create=True, partitions=partitions)
    result = result_identity(JobConfig.from_options({"model": "tiny"}), "bench")
    random = np.random.default_rng(0)
    per_batch = max(1, batch_size // per_query)
    started = time.perf_counter()
    adds = 0
    for first in range(0, rows // per_query, per_batch):
        store.add(batch_rows(result, first, per_batch, per_query, reasoning_words, random), "bench")
        adds += 1
    filled = time.perf_counter() - started
    stats = store.stats()
    print(f"store {url}: {stats['rows']:,} rows in {stats['files']:,} files ({stats['bytes'] / 1e6:,.0f} MB), "
          f"{partitions} partitions; {adds:,} adds in {filled:.1f} s")
    known = [batch_rows(result, int(q), per_batch, per_query, reasoning_words, random)
             for q in random.integers(0, rows // per_query - per_batch, lookups)]
    unknown = [batch_rows(result, rows // per_query + 10 * n, per_batch, per_query, reasoning_words, random)
               for n in range(lookups)]
    for label in ("before compact", "after compact"):
        if label == "after compact":
            started = time.perf_counter()
            store.compact()
            compacted = time.perf_counter() - started
            print(f"compact: {compacted:.1f} s, {store.stats()['files']:,} files")
        hit, found = time_lookups(store, known)
        miss, _ = time_lookups(store, unknown)
        print(f"{label}: lookup of {per_batch * per_query} keys ({per_batch} queries): {hit:.1f} ms median "
              f"({found:,} of {lookups * per_batch * per_query:,} found), {miss:.1f} ms for keys not stored")


if __name__ == "__main__":
    main()
