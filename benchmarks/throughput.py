"""Pairs per second three ways on the same pairs, engine settings and reasoning budget.

    .venv/bin/python benchmarks/throughput.py [--rankllm ../shared/data/trec-dl19/bm25_top100.json] [--repeat 3]

(a) `rank1-batch run` end to end (Parquet in, Parquet out, ranked output included),
(b) the scorer in one process without Ray,
(c) one raw `vllm.LLM.generate` call over the same prompts: the engine's own limit here.
Each figure is a whole process's wall time, engine start-up included; each process also reports
its steady-state time (engine already up), which is printed beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "trec-dl19" / "bm25_top100.json"
ENGINE = {"model": "tiny", "dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True, "seed": 0}


def engine_config(budget: int):
    from rank1_batch.config import EngineConfig

    return EngineConfig(**ENGINE, max_reasoning_tokens=budget)


def median_run(runs: list[tuple[float, dict]]) -> tuple[float, dict]:
    """The run with the median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]


def timed(command: list[str]) -> tuple[float, dict]:
    """Wall time of a whole process, and the JSON line it printed last (its own figures)."""
    started = time.monotonic()
    finished = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.monotonic() - started
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    return wall, json.loads(lines[-1]) if lines else {}


@click.group(invoke_without_command=True)
@click.option("--rankllm", "data", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_DATA))
@click.option("--top", type=int, default=100, show_default=True, help="Candidates per query (BM25 order).")
@click.option("--budget", type=int, default=256, show_default=True, help="Reasoning tokens per pair.")
@click.option("--only", type=click.Choice(["all", "scorer"]), default="all", help="`scorer`: (b) alone.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Pairs per engine call in (a).")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Rounds of (c), (b), (a); each figure is the median over the rounds, as one run's speed "
                   "drifts by several per cent on a shared machine.")
@click.pass_context
def main(context, data: str, top: int, budget: int, batch_size: int, only: str, repeat: int) -> None:
    if context.invoked_subcommand:
        return
    import pyarrow.compute as pc

    from rank1_batch.prepare import from_rankllm, write_shards

    work = Path(tempfile.mkdtemp(prefix="rank1-bench-"))
    pairs = from_rankllm(data)
    pairs = pairs.filter(pc.less_equal(pairs["first_stage_rank"], top))
    write_shards(pairs, str(work / "input"), rows_per_shard=500)
    me = [sys.executable, __file__, "--budget", str(budget)]
    n = pairs.num_rows
    if only == "scorer":
        wall, own = timed([*me, "scorer", str(work / "input")])
        print(f"{n} pairs, reasoning budget {budget}: scorer {n / wall:.1f} pairs/s whole process ({wall:.1f} s), "
              f"{n / own['generate_seconds']:.1f} pairs/s once the engine is up; outcomes {own['outcomes']}")
        return
    run = [
        str(Path(sys.executable).parent / "rank1-batch"), "run", "--input", str(work / "input"),
        "--output", str(work / "output"), "--max-reasoning-tokens", str(budget),
        "--batch-size", str(batch_size),
        *[f"--{key.replace('_', '-')}={value}" for key, value in ENGINE.items() if key != "enforce_eager"],
        "--enforce-eager",
    ]
    commands = {
        "c_raw_generate": [*me, "raw", str(work / "input")],
        "b_scorer": [*me, "scorer", str(work / "input")],
        "a_rank1_batch_run": run,
    }
    rounds: dict[str, list[tuple[float, dict]]] = {name: [] for name in commands}
    for round_number in range(repeat):
        for name, command in commands.items():
            if name == "a_rank1_batch_run":
                shutil.rmtree(work / "output", ignore_errors=True)  # a fresh run, not a resume
            rounds[name].append(timed(command))
        if repeat > 1:
            walls = {name: runs[-1][0] for name, runs in rounds.items()}
            print(f"round {round_number + 1}: " + ", ".join(f"{name} {wall:.1f} s" for name, wall in walls.items())
                  + f"; (a)/(c) {walls['c_raw_generate'] / walls['a_rank1_batch_run']:.2f}", flush=True)
    figures = {name: median_run(runs) for name, runs in rounds.items()}
    manifest = json.loads((work / "output" / "_manifest.json").read_text())

    raw_rate = n / figures["c_raw_generate"][0]
    print(f"{n} pairs, reasoning budget {budget}, engine {ENGINE}" + (f", median of {repeat} rounds" if repeat > 1 else ""))
    for name, (wall, own) in figures.items():
        steady = f", steady state {n / own['generate_seconds']:.1f} pairs/s" if "generate_seconds" in own else ""
        print(f"{name:20s} {wall:7.1f} s  {n / wall:6.1f} pairs/s  ratio to (c) {n / wall / raw_rate:.2f}{steady}")
    print(f"(a) outcomes {manifest['counts']['outcomes']} (last round, its own wall time {manifest['wall_seconds']} s)")


def _prompts(input_dir: str, budget: int):
    import pyarrow.parquet as pq

    from rank1_batch.config import ScoringConfig
    from rank1_batch.encoding import PromptEncoder

    table = pq.read_table(input_dir)
    encoder = PromptEncoder.for_model(engine_config(budget), ScoringConfig())
    return [encoder.encode(row["query"], row["text"]).token_ids for row in table.to_pylist()], table


@main.command()
@click.argument("input_dir")
@click.pass_context
def raw(context, input_dir: str) -> None:
    """(c) One `LLM.generate` call with the main pass's sampling parameters."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from rank1_batch import prompt
    from rank1_batch.engine import engine_arguments

    budget = context.parent.params["budget"]
    prompts, _ = _prompts(input_dir, budget)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # as the scorer's engine has it
    llm = LLM(**engine_arguments(engine_config(budget)))
    params = SamplingParams(temperature=0.0, max_tokens=budget, stop=list(prompt.STOP_STRINGS), skip_special_tokens=False)
    started = time.monotonic()
    llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    print(json.dumps({"generate_seconds": time.monotonic() - started}))


@main.command()
@click.argument("input_dir")
@click.pass_context
def scorer(context, input_dir: str) -> None:
    """(b) The scorer over all pairs in one call, without Ray."""
    import pyarrow.parquet as pq

    from rank1_batch.scorer import Rank1Scorer

    budget = context.parent.params["budget"]
    pairs = pq.read_table(input_dir).to_pylist()
    scorer = Rank1Scorer(engine_config(budget))
    started = time.monotonic()
    results = scorer.score(pairs)
    seconds = time.monotonic() - started
    outcomes = Counter(result.outcome for result in results)
    print(json.dumps({"generate_seconds": seconds, "outcomes": outcomes}))


if __name__ == "__main__":
    main()
