"""Nights of incremental reranking with a score store, on DL19's BM25 candidates and the tiny model.

    .venv/bin/python benchmarks/nightly.py [--top 100] [--edited 0.1] [--budget 256]

- night 1 scores every pair into an empty store;
- night 2 has the same pairs, a share of them (--edited) with an edited passage;
- night 3 is night 2 again: every pair is stored, so no engine should start;
- night 4 is night 2 with another reasoning budget: nothing should be reused.

Each night is `rank1-batch run` in a process of its own, as a scheduler starts it. For each it
prints pairs scored and reused, wall time, and the fixed start-up: from the process's start to the
engine being ready (vLLM's "init engine" line), which holds Ray's start and the engine's; the rest
is the night's work. Then it checks that reused scores are the stored ones, bit for bit, and
times the lookup of one night's keys against stores 10 and 100 times the night's size (synthetic
rows beside the real ones, compacted as `store compact` leaves them).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from score_store import batch_rows
from throughput import DEFAULT_DATA, engine_ready, run_process

from rank1_batch.config import JobConfig
from rank1_batch.ir.input_files import from_rankllm
from rank1_batch.ir.prepare import write_shards
from rank1_batch.model.encoding import PromptEncoder
from rank1_batch.store.keys import model_fingerprint, result_identity, store_keys
from rank1_batch.store.score_store import ScoreStore

JUDGEMENT = ["score", "logprob_true", "logprob_false", "outcome", "reasoning_tokens", "prompt_tokens"]


def night(work: Path, name: str, pairs: pa.Table, store: Path, budget: int, timeout: float) -> dict:
    """One night's run and what it did."""
    input_dir, output = work / name / "input", work / name / "output"
    write_shards(pairs, str(input_dir), rows_per_shard=500)
    command = [str(Path(sys.executable).parent / "rank1-batch"), "run", "--input", str(input_dir), "--output", str(output),
               "--store", str(store), "--model", "tiny", "--max-reasoning-tokens", str(budget), "--max-model-len", "2048",
               "--dtype", "bfloat16", "--enforce-eager", "--max-failed-share", "1", "--verbose"]
    started = time.time()
    wall, stdout, stderr, error = run_process(command, timeout, work / f"{name}.log")
    if error:
        raise click.ClickException(f"{name}: {error}")
    manifest = json.loads((output / "_manifest.json").read_text())
    ready = engine_ready(stdout + stderr)
    return {"name": name, "wall": wall, "startup": ready - started if ready else None, "manifest": manifest,
            "scores": pq.read_table(output / "scores"), "traces": pq.read_table(output / "traces")}


def edited(pairs: pa.Table, share: float, seed: int) -> tuple[pa.Table, np.ndarray]:
    """The pairs with a share of passages edited, and which ones."""
    chosen = np.random.default_rng(seed).random(pairs.num_rows) < share
    text = [f"{passage} (Updated.)" if edit else passage for passage, edit in zip(pairs["text"].to_pylist(), chosen)]
    return pairs.set_column(pairs.column_names.index("text"), "text", pa.array(text, pa.string())), chosen


def same_judgements(before: dict, after: dict) -> tuple[int, int]:
    """Of `after`'s reused pairs: how many carry `before`'s judgement and reasoning exactly, of how many."""
    def by_id(result: dict) -> dict:
        reasoning = dict(zip(zip(result["traces"]["query_id"].to_pylist(), result["traces"]["doc_id"].to_pylist()),
                             result["traces"]["reasoning"].to_pylist()))
        return {(row["query_id"], row["doc_id"]): ([row[c] for c in JUDGEMENT], reasoning[(row["query_id"], row["doc_id"])])
                for row in result["scores"].to_pylist()}

    earlier, reused = by_id(before), after["scores"].filter(after["scores"]["reused"])
    later = by_id(after)
    keys = list(zip(reused["query_id"].to_pylist(), reused["doc_id"].to_pylist()))
    return sum(later[key] == earlier[key] for key in keys), len(keys)


def lookup_cost(store_dir: Path, pairs: pa.Table, budget: int, multiple: int, work: Path) -> tuple[float, int]:
    """Microseconds per pair to look up the night's keys, in blocks of 500 rows as the prompt
    stage reads them, in a compacted copy of the store grown to about `multiple` times the
    night's rows; and the copy's rows."""
    job = JobConfig.from_options({"model": "tiny", "max_reasoning_tokens": budget, "max_model_len": 2048,
                                  "dtype": "bfloat16", "enforce_eager": True})
    encoder = PromptEncoder.for_model(job.engine, job.scoring)
    result = result_identity(job, model_fingerprint(job.engine))
    prompts = [encoder.encode(row["query"], row["text"], row.get("title"), row.get("instruction")).token_ids
               for row in pairs.to_pylist()]
    keys = store_keys(result, prompts)

    copy = work / f"store-x{multiple}"
    shutil.copytree(store_dir, copy)
    store = ScoreStore.open(str(copy))
    random = np.random.default_rng(multiple)
    per_query = 100
    synthetic_queries = max(0, multiple * pairs.num_rows - store.stats()["rows"]) // per_query
    for first in range(0, synthetic_queries, 50):
        store.add(batch_rows(result, 10_000_000 + first, min(50, synthetic_queries - first), per_query, 100, random), "synthetic")
    store.compact()
    times = []
    for start in range(0, pairs.num_rows, 500):
        block = slice(start, start + 500)
        began = time.perf_counter()
        found = store.lookup(pairs["query"][block], keys[block])
        times.append((time.perf_counter() - began) / len(keys[block]) * 1e6)
        assert found.num_rows == len(keys[block]), "a stored pair was not found"
    return statistics.median(times), store.stats()["rows"]


@click.command()
@click.option("--rankllm", "data", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_DATA), show_default=True)
@click.option("--top", type=int, default=100, show_default=True, help="Candidates per query (BM25 order).")
@click.option("--edited", "share", type=float, default=0.1, show_default=True, help="Share of passages edited on night 2.")
@click.option("--budget", type=int, default=256, show_default=True, help="Reasoning budget of nights 1 to 3.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds a night may take.")
def main(data, top, share, budget, seed, timeout):
    table = from_rankllm(data)
    pairs = table.filter(pc.less_equal(table["first_stage_rank"], top))
    work = Path(tempfile.mkdtemp(prefix="rank1-nightly-"))
    store = work / "store"
    changed, chosen = edited(pairs, share, seed)
    print(f"{Path(data).name} top {top}: {pairs.num_rows} pairs, {int(chosen.sum())} edited on night 2; "
          f"the tiny model, budget {budget}; logs under {work}", flush=True)

    nights = [night(work, "night-1", pairs, store, budget, timeout)]
    nights.append(night(work, "night-2", changed, store, budget, timeout))
    nights.append(night(work, "night-3", changed, store, budget, timeout))
    nights.append(night(work, "night-4", changed, store, budget + 16, timeout))

    print(f"\n{'night':<26} {'scored':>7} {'reused':>7} {'engines':>8} {'wall s':>8} {'start-up s':>11} {'work s':>8}")
    for result, what in zip(nights, ("all new, empty store", f"{share:.0%} passages edited", "the same again",
                                     f"budget {budget + 16}")):
        manifest = result["manifest"]
        work_seconds = result["wall"] - (result["startup"] or 0)
        result["work"] = work_seconds
        print(f"{result['name'] + ' (' + what + ')':<26} {manifest['store']['misses']:>7} {manifest['store']['hits']:>7} "
              f"{manifest['engine']['starts']:>8} {result['wall']:>8.1f} "
              f"{result['startup'] if result['startup'] is None else round(result['startup'], 1)!s:>11} {work_seconds:>8.1f}")
    first, second, third, fourth = nights
    identical, reused = same_judgements(first, second)
    print(f"\nnight 2 scored only the edited pairs: {second['manifest']['store']['misses'] == int(chosen.sum())} "
          f"({second['manifest']['store']['misses']} scored, {int(chosen.sum())} edited)")
    print(f"night 2's work / night 1's: {second['work'] / first['work']:.3f} (target <= 0.15)")
    print(f"reused judgements identical to night 1's (score, logprobs, outcome, tokens, reasoning): {identical} of {reused}")
    print(f"night 3 started no engine: {third['manifest']['engine']['starts'] == 0}")
    print(f"night 4 reused nothing: {fourth['manifest']['store']['hits'] == 0}")

    print("\nlookup of night 1's keys, compacted store, blocks of 500 pairs (median):")
    for multiple in (10, 100):
        per_pair, rows = lookup_cost(store, pairs, budget, multiple, work)
        print(f"  store of {rows:,} rows ({multiple}x the night): {per_pair:.0f} us per pair")


if __name__ == "__main__":
    main()
