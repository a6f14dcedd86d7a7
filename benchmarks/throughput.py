"""Pairs per second several ways on the same pairs, engine settings and reasoning budget.

    .venv/bin/python benchmarks/throughput.py                     # DL19 BM25 top 100, the tiny model
    .venv/bin/python benchmarks/throughput.py --workload [--pairs 4000]       # the Rank1-shaped workload
    .venv/bin/python benchmarks/throughput.py --input DIR --model PATH [--budget 2048]

(c) the engine's limit: one raw `vllm.LLM.generate` over all main passes, then one over all label
    passes, as the engine reads labels;
(a) `rank1-batch run` end to end (Parquet in, Parquet out, ranked output included), at the run's
    default --max-concurrent-batches (or the one given here);
(a1) the same run with --max-concurrent-batches 1: one batch at a time per engine;
(b) the scorer in one process without Ray;
(d) Ray's own `ray.data.llm` vLLM processor over the same prompts, main pass only.
Each row runs in a process of its own; a row that fails is reported with its error and the others
go on. The figures and their definitions are printed as a table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "trec-dl19" / "bm25_top100.json"
# What a child process prints before its figures, so that they stand out from vLLM's logs.
MARK = "throughput-figures: "
ROWS = {
    "raw": "(c) raw vLLM, 2 generate calls",
    "run": "(a) rank1-batch run",
    "run1": "(a1) run, 1 batch in flight",
    "scorer": "(b) scorer, no Ray",
    "ray-llm": "(d) ray.data.llm, main pass",
}
DEFINITIONS = """\
whole process: pairs / the process's wall time: Python, engine start-up (and Ray's start and stop
  for (a), (a1), (d)) included.
steady state: pairs / time from the engine being ready to the last result. (c), (b) time it in
  their process; (a), (a1), (d) from vLLM's log line of the engine initialised ("init engine ...
  took") to the last scores/ file written (a, a1) or the last output block (d).
occupancy: mean sequences per engine step, vLLM's generated tokens / its engine steps
  (rank1_batch.model.engine_metrics), over the steady window; for (a), (a1) as the run's _manifest.json
  "engine" key gives it. gen tok/s: vLLM's generated tokens / the steady time.
x(c): the row's pairs/s over (c)'s, whole process and steady state."""
# vLLM's line when an engine is ready, with its local time (second resolution).
ENGINE_READY = re.compile(r"INFO (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) \[core\.py:\d+\] init engine ")


def engine_config(params: dict):
    """The engine every row uses, with vLLM's stats on for the occupancy figures."""
    from rank1_batch.config import EngineConfig
    from rank1_batch.model.engine_metrics import STATS_ON

    return EngineConfig(
        model=params["model"], dtype=params["dtype"], max_model_len=params["max_model_len"],
        max_reasoning_tokens=params["budget"], enforce_eager=params["eager"], seed=0, engine_args=dict(STATS_ON),
    )


@dataclass
class Row:
    """One process's figures."""

    wall: float
    steady_seconds: float | None = None
    engine: dict | None = None  # occupancy, generated_tokens_per_second
    outcomes: dict = field(default_factory=dict)
    error: str | None = None


def run_process(command: list[str], timeout: float, log: Path) -> tuple[float, str, str, str | None]:
    """Wall time, stdout, stderr, and the error if it failed. The process runs in a session of its own,
    ended afterwards: a vLLM worker can outlive the Ray actor that started it."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        error = None if process.returncode == 0 else error_line(stdout + stderr)
    except subprocess.TimeoutExpired:
        end_session(process.pid)
        stdout, stderr = process.communicate()
        error = f"timed out after {timeout:g} s"
    wall = time.monotonic() - started
    end_session(process.pid)
    log.write_text(stdout + stderr)
    return wall, stdout, stderr, error and f"{error} (log: {log})"


def end_session(session: int) -> None:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def error_line(output: str) -> str:
    """The line that names the error: a click error, else the last exception raised, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    clicks = [line for line in lines if line.startswith("Error: ")]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)[(:]", line)]
    return (clicks or raised or lines or ["no output"])[-1][:400]


def child_figures(stdout: str) -> dict:
    lines = [line[len(MARK):] for line in stdout.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1]) if lines else {}


def report(**figures) -> None:
    print(MARK + json.dumps(figures), flush=True)


def engine_ready(output: str) -> float | None:
    """When the first engine a process's log shows was ready (epoch seconds), from vLLM's line."""
    found = ENGINE_READY.search(output)
    if not found:
        return None
    month, day, hour, minute, second = map(int, found.groups())
    return time.mktime((time.localtime().tm_year, month, day, hour, minute, second, 0, 0, -1))


def run_row(command: list[str], output: Path, timeout: float, log: Path) -> Row:
    """(a) or (a1): the CLI, then its output: the last commit from scores/, engine figures from the manifest."""
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, not a resume
    wall, stdout, stderr, error = run_process(command, timeout, log)
    if error:
        return Row(wall, error=error)
    ready = engine_ready(stdout + stderr)
    steady_seconds = ready and max(path.stat().st_mtime for path in (output / "scores").glob("*.parquet")) - ready
    manifest = json.loads((output / "_manifest.json").read_text())
    engine = manifest.get("engine")
    if engine and steady_seconds:  # tokens per second over the same window as the other rows
        engine = {**engine, "generated_tokens_per_second": engine["generated_tokens"] / steady_seconds}
    return Row(wall, steady_seconds, engine, manifest["counts"]["outcomes"])


def child_row(command: list[str], timeout: float, log: Path) -> Row:
    """A row of this script's own: it reports its steady time, or when its last result came."""
    wall, stdout, stderr, error = run_process(command, timeout, log)
    if error:
        return Row(wall, error=error)
    own = child_figures(stdout)
    ready = engine_ready(stdout + stderr)
    steady_seconds = own.get("steady_seconds") or (ready and own["last_result_at"] - ready)
    return Row(wall, steady_seconds, own.get("engine"), own.get("outcomes", {}))


def median_row(rows: list[Row]) -> Row:
    """The round with the median wall time (the lower middle one of an even count)."""
    return sorted(rows, key=lambda row: row.wall)[(len(rows) - 1) // 2]


def rate(pairs: int, seconds: float | None) -> float | None:
    return pairs / seconds if seconds else None


def shown(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(rows: dict[str, Row], n: int) -> None:
    base = rows.get("raw")
    base_whole = n / base.wall if base and not base.error else None
    base_steady = rate(n, base.steady_seconds) if base and not base.error else None
    print(f"{'row':32s} {'wall s':>7s} {'pairs/s':>8s} {'x(c)':>5s} {'steady/s':>9s} {'x(c)':>5s} "
          f"{'occupancy':>9s} {'gen tok/s':>9s}")
    for key, row in rows.items():
        if row.error:
            print(f"{ROWS[key]:32s} failed: {row.error}")
            continue
        whole, steady_rate = n / row.wall, rate(n, row.steady_seconds)
        engine = row.engine or {}
        print(f"{ROWS[key]:32s} {row.wall:7.1f} {whole:8.1f} {shown(base_whole and whole / base_whole, 2):>5s} "
              f"{shown(steady_rate):>9s} {shown(steady_rate and base_steady and steady_rate / base_steady, 2):>5s} "
              f"{shown(engine.get('occupancy')):>9s} {shown(engine.get('generated_tokens_per_second'), 0):>9s}")
    for key, row in rows.items():
        if row.outcomes and not row.error:
            print(f"{ROWS[key]} outcomes: {row.outcomes}")
    print(DEFINITIONS)


def make_workload(directory: Path, pairs: int, seed: int, budget: int) -> str:
    """The Rank1-shaped pairs under `directory`; returns the workload model's path."""
    made = subprocess.run(
        [sys.executable, str(HERE / "workload.py"), "--output", str(directory), "--pairs", str(pairs),
         "--seed", str(seed), "--budget", str(budget)],
        check=True, capture_output=True, text=True,
    )
    lines = made.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    return lines[-1]


@click.group(invoke_without_command=True)
@click.option("--rankllm", "data", type=click.Path(exists=True, dir_okay=False),
              help=f"RankLLM retrieve results, the pairs unless --input or --workload (default: {DEFAULT_DATA}).")
@click.option("--top", type=int, default=100, show_default=True, help="Candidates per query of --rankllm (BM25 order).")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="Parquet pairs in the input contract (give --model).")
@click.option("--workload", is_flag=True, help="Make the Rank1-shaped workload (benchmarks/workload.py) and use its model.")
@click.option("--pairs", type=int, default=4000, show_default=True, help="Pairs of --workload.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --workload.")
@click.option("--model", help="Model of every row (default: `tiny` on --rankllm, the workload's model on --workload).")
@click.option("--budget", type=int, help="Reasoning tokens per pair (default: 256 on --rankllm, else 2048).")
@click.option("--max-model-len", type=int, help="Context (default: 2048 on --rankllm, else the budget + 1024).")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--eager/--no-eager", default=True, show_default=True, help="enforce_eager: eager starts fast on a CPU.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Pairs per engine call in (a), (a1), (d).")
@click.option("--max-concurrent-batches", type=int, help="Batches in flight per engine in (a) (default: the run's).")
@click.option("--only", multiple=True, type=click.Choice(list(ROWS)), help="Run only these rows; repeatable.")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Rounds of every row; each figure is the median over the rounds, as one run's speed "
                   "drifts by several per cent on a shared machine.")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds a row may take before it is stopped.")
@click.pass_context
def main(context, data, top, input_dir, workload, pairs, seed, model, budget, max_model_len, dtype, eager,
         batch_size, max_concurrent_batches, only, repeat, timeout) -> None:
    if context.invoked_subcommand:
        return
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rank1_batch.ir.input_files import from_rankllm
    from rank1_batch.ir.prepare import write_shards
    from rank1_batch.model.engine import set_cpu_cache_space

    if input_dir and workload:
        raise click.UsageError("--input and --workload are two sources of pairs: give one")
    if input_dir and not model:
        raise click.UsageError("--input needs --model")
    data = data or str(DEFAULT_DATA)
    on_dl19 = not (input_dir or workload)
    if on_dl19 and not Path(data).exists():
        raise click.UsageError(f"no {data}: give --rankllm FILE, --workload, or --input DIR --model PATH")
    # Every engine below, Ray's actors included (they inherit it), gets the same KV-cache space on
    # a CPU build; a GPU build ignores it.
    set_cpu_cache_space()
    work = Path(tempfile.mkdtemp(prefix="rank1-bench-"))
    budget = budget or (256 if on_dl19 else 2048)
    if workload:
        input_dir = str(work / "input")
        workload_model = make_workload(Path(input_dir), pairs, seed, budget)
        model, name = model or workload_model, "Rank1-shaped workload"
    elif input_dir:
        name = input_dir
    else:
        table = from_rankllm(data)
        write_shards(table.filter(pc.less_equal(table["first_stage_rank"], top)), str(work / "input"), rows_per_shard=500)
        input_dir, model, name = str(work / "input"), model or "tiny", f"{Path(data).name} top {top}"
    if not max_model_len:
        from workload import PROMPT_ROOM

        max_model_len = 2048 if on_dl19 else budget + PROMPT_ROOM
    n = pq.ParquetDataset(input_dir).read(columns=["query_id"]).num_rows

    settings = ["--model", model, "--budget", str(budget), "--max-model-len", str(max_model_len), "--dtype", dtype,
                "--eager" if eager else "--no-eager", "--batch-size", str(batch_size)]
    me = [sys.executable, __file__, *settings]
    run = [
        str(Path(sys.executable).parent / "rank1-batch"), "run", "--input", input_dir, "--model", model,
        "--max-reasoning-tokens", str(budget), "--max-model-len", str(max_model_len), "--dtype", dtype,
        "--enforce-eager" if eager else "--no-enforce-eager", "--seed", "0", "--batch-size", str(batch_size),
        "--verbose",  # the engine actors' logs, where vLLM says when its engine is ready
    ]
    in_flight = ["--max-concurrent-batches", str(max_concurrent_batches)] if max_concurrent_batches else []
    measure = {
        "raw": lambda log: child_row([*me, "raw", input_dir], timeout, log),
        "run": lambda log: run_row([*run, "--output", str(work / "output-a"), *in_flight], work / "output-a", timeout, log),
        "run1": lambda log: run_row([*run, "--output", str(work / "output-a1"), "--max-concurrent-batches", "1"],
                                    work / "output-a1", timeout, log),
        "scorer": lambda log: child_row([*me, "scorer", input_dir], timeout, log),
        "ray-llm": lambda log: child_row([*me, "ray-llm", input_dir], timeout, log),
    }
    chosen = [key for key in ROWS if not only or key in only]
    print(f"{name}: {n} pairs, reasoning budget {budget}, context {max_model_len}, model {model}, {dtype}, "
          f"{'eager' if eager else 'compiled'}, the engine's default block size (32 on a CPU build), "
          f"KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB on a CPU build, batch size {batch_size}; "
          f"logs under {work}", flush=True)
    rounds: dict[str, list[Row]] = {key: [] for key in chosen}
    for round_number in range(repeat):
        for key in chosen:
            if rounds[key] and rounds[key][-1].error:
                continue  # failed once: its error stands
            rounds[key].append(measure[key](work / f"{key}-{round_number + 1}.log"))
            row = rounds[key][-1]
            print(f"round {round_number + 1}: {ROWS[key]}: " + (f"failed: {row.error}" if row.error else f"{row.wall:.1f} s"),
                  flush=True)
    print(f"\n{name}: {n} pairs" + (f", median of {repeat} rounds" if repeat > 1 else ""))
    print_table({key: median_row(rows) for key, rows in rounds.items()}, n)


def _prompts(input_dir: str, engine):
    """The encoder, and the prompt token ids of every pair it does not reject."""
    import pyarrow.parquet as pq

    from rank1_batch.config import ScoringConfig
    from rank1_batch.model.encoding import EncodedPrompt, PromptEncoder
    from rank1_batch.model.scorer import _as_pair, encode_pair

    encoder = PromptEncoder.for_model(engine, ScoringConfig())
    encoded = [encode_pair(encoder, _as_pair(row)) for row in pq.read_table(input_dir).to_pylist()]
    return encoder, [item.token_ids for item in encoded if isinstance(item, EncodedPrompt)]


@main.command()
@click.argument("input_dir")
@click.pass_context
def raw(context, input_dir: str) -> None:
    """(c) One `LLM.generate` over all main passes, then one over all label passes."""
    from vllm import LLM, TokensPrompt

    from rank1_batch.model.engine import Rank1Passes, engine_arguments
    from rank1_batch.model.engine_metrics import EngineMeter
    from rank1_batch.model.judgement import Outcome

    engine = engine_config(context.parent.params)
    encoder, prompts = _prompts(input_dir, engine)
    llm = LLM(**engine_arguments(engine))
    passes = Rank1Passes(encoder, engine)
    meter = EngineMeter().start()
    started = time.monotonic()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           [passes.main_pass(ids) for ids in prompts], use_tqdm=False)
    reads = [passes.label_read(ids, output.outputs[0]) for ids, output in zip(prompts, outputs)]
    # A forced prefix longer than the context is not read: the pair falls back, as in the engine.
    llm.generate([TokensPrompt(prompt_token_ids=prefix) for _, prefix in reads if prefix is not None],
                 passes.label_pass, use_tqdm=False)
    seconds = time.monotonic() - started
    outcomes = Counter((outcome if prefix is not None else Outcome.FALLBACK).value for outcome, prefix in reads)
    report(steady_seconds=seconds, engine=engine_figures(meter), outcomes=outcomes)


def engine_figures(meter) -> dict:
    figures = meter.read()
    return {"occupancy": figures.occupancy, "generated_tokens_per_second": figures.tokens_per_second,
            "steps": figures.steps, "generated_tokens": figures.generated_tokens}


@main.command()
@click.argument("input_dir")
@click.pass_context
def scorer(context, input_dir: str) -> None:
    """(b) The scorer over all pairs in one call, without Ray."""
    import pyarrow.parquet as pq

    from rank1_batch.model.engine_metrics import EngineMeter
    from rank1_batch.model.scorer import Rank1Scorer

    pairs = pq.read_table(input_dir).to_pylist()
    scorer = Rank1Scorer(engine_config(context.parent.params))
    meter = EngineMeter().start()
    started = time.monotonic()
    results = scorer.score(pairs)
    seconds = time.monotonic() - started
    report(steady_seconds=seconds, engine=engine_figures(meter), outcomes=Counter(result.outcome for result in results))


@main.command("ray-llm")
@click.argument("input_dir")
@click.pass_context
def ray_llm(context, input_dir: str) -> None:
    """(d) Ray's `ray.data.llm` vLLM processor over the same prompts, main pass only, one engine."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from vllm.platforms import current_platform

    from rank1_batch.model.engine import Rank1Passes, engine_arguments

    params = context.parent.params
    engine = engine_config(params)
    encoder, prompts = _prompts(input_dir, engine)
    passes = Rank1Passes(encoder, engine)
    # The engine's main pass, as the plain values a Ray Data row can carry.
    rows = [{"tokenized_prompt": ids,
             "sampling_params": {name: getattr(passes.main_pass(ids), name)
                                 for name in ("temperature", "max_tokens", "stop", "skip_special_tokens")}}
            for ids in prompts]
    ray.init(address="local", include_dashboard=False)  # a Ray of its own, as `rank1-batch run` starts
    config = vLLMEngineProcessorConfig(
        model_source=engine.model_path,
        engine_kwargs=engine_arguments(engine),
        batch_size=params["batch_size"],
        concurrency=1,
        # Without GPUs the engine actor holds a CPU, as the run's engine does; Ray's default asks for a GPU.
        placement_group_config=None if not current_platform.is_cpu() else {"bundles": [{"CPU": 1}]},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    processor = build_processor(config)
    for _ in processor(ray.data.from_items(rows)).iter_batches(batch_size=None, batch_format="pyarrow"):
        pass
    # The engine is ready in a Ray actor: its time comes from the log, read by the parent.
    report(last_result_at=time.time())


if __name__ == "__main__":
    main()
