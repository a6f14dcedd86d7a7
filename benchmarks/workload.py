"""A Rank1-shaped benchmark workload: pairs whose reasoning lengths follow a long-tailed shape.

    .venv/bin/python benchmarks/workload.py --output DIR [--pairs 4000] [--seed 0] [--budget 2048] \\
        [--p10 30 --p50 120 --p90 500 --p99 1500] [--per-query 20] [--verify]

Rank1 reasons for a few hundred tokens on most pairs and for thousands on a few, and every engine
call waits for its longest chain. The bundled tiny model cannot show that: in its world it answers
after about 30 tokens, on real text it reasons to the budget. This writes pairs for the workload
model of scripts/build_workload_model.py, whose passage sets how many tokens it reasons, with
lengths drawn from the quantiles given and capped so that every pair answers within the budget.

It writes `pairs-NNNNN.parquet` shards in the input contract and prints, as its last line, the
model directory to give `--model` (built under benchmarks/.models/ when missing). `--verify` runs
the pairs through the vLLM engine as `rank1-batch run` does and prints what it measured.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPTS = [ROOT / "scripts" / "build_workload_model.py", ROOT / "scripts" / "build_tiny_model.py"]
MODELS = ROOT / "benchmarks" / ".models"
QUANTILES = (0.10, 0.50, 0.90, 0.99)
# Room for the prompt beside the budget when --verify sizes the context (prompts stay under 600).
PROMPT_ROOM = 1024


def _builder():
    """The model's build script, which also makes its world's queries and passages."""
    spec = importlib.util.spec_from_file_location("build_workload_model", BUILD_SCRIPTS[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_dir(world) -> Path:
    """The workload model, built first if missing. Its directory is named by a hash of the build
    scripts, so a changed script builds a new model rather than reusing a stale one."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in BUILD_SCRIPTS)).hexdigest()[:12]
    directory = MODELS / f"workload-rank1-{digest}"
    if not directory.exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place, so an interrupted build is never taken for a model.
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=MODELS))
        try:
            world.build(staging)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def quantile_function(targets: list[float]):
    """u -> length: log-length linear in u between the target quantiles, and beyond the first and
    last along the nearest segment."""
    logs = [math.log(target) for target in targets]

    def length(u: float) -> float:
        segment = bisect.bisect_left(QUANTILES, u, 1, len(QUANTILES) - 1)
        (u0, y0), (u1, y1) = [(QUANTILES[i], logs[i]) for i in (segment - 1, segment)]
        return math.exp(y0 + (y1 - y0) * (u - u0) / (u1 - u0))

    return length


def draw_lengths(pairs: int, rng: random.Random, targets: list[float], cap: int) -> list[int]:
    """One reasoning length per pair, in random order. The draws are stratified (one in each
    1/pairs slice of probability) so that a few hundred pairs already have the quantiles asked for."""
    length = quantile_function(targets)
    lengths = [min(cap, max(1, round(length((i + rng.random()) / pairs)))) for i in range(pairs)]
    rng.shuffle(lengths)
    return lengths


def workload_table(world, lengths: list[int], per_query: int, rng: random.Random):
    """Rows of the input contract; each query's candidates get their own lengths and verdicts."""
    import pyarrow as pa

    rows = {"query_id": [], "query": [], "doc_id": [], "text": [], "first_stage_rank": []}
    for index, count in enumerate(lengths):
        number, rank = divmod(index, per_query)
        if rank == 0:
            query = world.query(rng)
        rows["query_id"].append(f"q{number:05d}")
        rows["query"].append(query)
        rows["doc_id"].append(f"d{index:07d}")
        rows["text"].append(world.passage(rng, count, relevant=rng.random() < 0.5))
        rows["first_stage_rank"].append(rank + 1)
    return pa.table(rows)


def quantiles(values) -> list[float]:
    import numpy as np

    return [float(q) for q in np.quantile(values, QUANTILES)]


def describe(name: str, at_quantiles: list[float]) -> str:
    return f"{name:<9}" + "  ".join(f"p{round(q * 100)} {v:7.1f}" for q, v in zip(QUANTILES, at_quantiles))


def verify(model: Path, table, budget: int, lengths: list[int], targets: list[float]) -> None:
    """Greedy generation with the engine `rank1-batch run` uses, in one call over all pairs."""
    # vLLM logs to stdout, and its engine logs its shutdown at exit: after the model path, which
    # must stay the last line there.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from rank1_batch.config import EngineConfig, ScoringConfig
    from rank1_batch.model.encoding import PromptEncoder
    from rank1_batch.model.engine import Rank1Engine
    from rank1_batch.model.judgement import Outcome

    engine = EngineConfig(model=str(model), dtype="bfloat16", max_model_len=budget + PROMPT_ROOM,
                          max_reasoning_tokens=budget, enforce_eager=True)
    encoder = PromptEncoder.for_model(engine, ScoringConfig())
    prompts = [encoder.encode(q, t) for q, t in zip(table["query"].to_pylist(), table["text"].to_pylist())]
    if any(p.truncated for p in prompts):
        raise click.ClickException("a prompt was cut to fit the context, and with it perhaps its count")
    scorer = Rank1Engine(engine, encoder)
    started = time.perf_counter()
    generations = [samples[0] for samples in scorer.generate([p.token_ids for p in prompts])]
    seconds = time.perf_counter() - started
    measured = [g.reasoning_tokens for g in generations]
    answered = sum(g.judgement.outcome is Outcome.ANSWERED for g in generations)
    prompt_tokens = [len(p.token_ids) for p in prompts]
    print(f"verify: {answered / len(generations):.1%} of {len(generations)} pairs answered; "
          f"{sum(m == n for m, n in zip(measured, lengths)) / len(lengths):.1%} reasoned exactly their drawn length; "
          f"{sum(g.judgement.score > 0.5 for g in generations) / len(generations):.1%} scored true")
    print(describe("target", targets))
    print(describe("measured", quantiles(measured)))
    print(f"prompt tokens {min(prompt_tokens)} to {max(prompt_tokens)} "
          f"(median {statistics.median(prompt_tokens):.0f}); "
          f"{sum(measured):,} reasoning tokens in {seconds:.1f} s of generate (engine up)")


@click.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--pairs", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--budget", type=click.IntRange(min=3), default=2048, show_default=True,
              help="The run's --max-reasoning-tokens. Lengths are capped 2 below it, so that `</think>` and "
                   "the label still fit, and at the model's longest countdown, 4,095.")
@click.option("--p10", type=float, default=30, show_default=True, help="Target reasoning tokens, 10th percentile.")
@click.option("--p50", type=float, default=120, show_default=True)
@click.option("--p90", type=float, default=500, show_default=True)
@click.option("--p99", type=float, default=1500, show_default=True)
@click.option("--per-query", type=click.IntRange(min=1), default=20, show_default=True, help="Candidates per query.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace pairs-*.parquet shards already in --output.")
@click.option("--verify", "verify_", is_flag=True,
              help="Run the pairs through the vLLM engine and print the measured lengths.")
def main(output, pairs, seed, budget, p10, p50, p90, p99, per_query, rows_per_shard, overwrite, verify_) -> None:
    from rank1_batch.ir.prepare import write_shards

    targets = [p10, p50, p90, p99]
    if not 1 <= targets[0] < targets[1] < targets[2] < targets[3]:
        raise click.BadParameter("the targets must rise, from at least 1: --p10 < --p50 < --p90 < --p99")
    world = _builder()
    # A pair answers when its reasoning, `</think>` and the label fit the budget.
    cap = min(budget - 2, world.MAX_COUNT)
    rng = random.Random(seed)
    lengths = draw_lengths(pairs, rng, targets, cap)
    table = workload_table(world, lengths, per_query, rng)
    try:
        shards = write_shards(table, str(output), rows_per_shard, overwrite=overwrite)
    except FileExistsError as error:
        raise click.ClickException(f"{error}; give --overwrite to replace them")
    capped = sum(length == cap for length in lengths)
    print(f"{pairs} pairs in {len(shards)} shard(s) under {output}; reasoning lengths capped at {cap} "
          f"({capped} pair(s) at the cap)")
    print(describe("drawn", quantiles(lengths)))
    model = model_dir(world)
    if verify_:
        verify(model, table, budget, lengths, targets)
    print(model)


if __name__ == "__main__":
    main()
