"""How the path around the engine of `rank1-batch run` grows with the pairs, on local disk and on S3.

    .venv/bin/python benchmarks/scale.py                       # 100k, 1M, 10M pairs; on S3 too at 100k and 1M
    .venv/bin/python benchmarks/scale.py --sizes 100000,1000000 --s3-sizes 100000 [--latency-ms 20] [--json FILE]
    .venv/bin/python benchmarks/scale.py --sizes 100000 --written-sizes 1000000,10000000
    .venv/bin/python benchmarks/scale.py --latency-compare [--pairs 300 --batch-size 4 --latency-ms 100]

The engine is a stand-in that answers every pair at once with one fixed generation (a benchmark
fixture, installed in every Ray worker by a setup hook; never an option of the package), so what
is measured is the rest: reading the input, building prompts, committing batches, ranking, the
manifest. Each size runs in a process of its own (a fresh driver, a fresh Ray), twice into one
output: run 1 on an empty output, run 2 a re-run of the finished output, which reads every
committed key and scores nothing. For each phase it prints the wall seconds, the driver's peak
RSS and its growth over the RSS at the phase's start, and on S3 the requests the server received
from every client (driver and workers):

    inspect   the input files' footers, and their keys read in Ray tasks for the duplicate check
              and the resume's partitions
    resume    opening the output, every committed key read in Ray tasks into those partitions
    stream    prepare -> stand-in engine -> commit, overlapping (run 1 only); within it, in seconds
              summed over the Ray workers: prepare (build_prompts) and commit (write_results)
    rank      the committed scores read, ranked/ and run.trec written
    manifest  _manifest.json written
    other     the rest of the run: checks, the tokenizer, placement, the lease

A size in --written-sizes is measured as a re-run only, of an output the benchmark writes itself
first: each input shard cut into batches and each batch committed through the run's own commit
(`commits.write_results`, in one process per core) with the stand-in's generation, so with the files
a first run leaves, without building prompts (about 1 ms a pair here: 10M pairs would take hours).

Then, between consecutive sizes, each phase's time ratio and that ratio over the pairs' ratio
(at most 1: at most linear), and the same for the driver's memory growth. The S3 server is
moto's in a process of its own (benchmarks/slow_s3.py); --latency-ms delays each of its requests.
--latency-compare runs a small job on S3 with no added latency and with --latency-ms, and prints
what each phase's round trips cost. The input is synthetic (100 candidates per query, ~40 random
words a passage) and kept under benchmarks/.scale-data/ for later runs of the same size and seed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import slow_s3

# The driver's phases: the functions of rank1_batch.run.pipeline whose calls make each, looked up
# there by name (the pipeline's names change: keep them here, in one place).
PHASES = {
    "inspect": ("inspect_inputs", "index_inputs", "find_duplicates"),
    "resume": ("open_output", "done_in"),
    "stream": ("follow",),
    "rank": ("write_ranked_outputs",),
    "manifest": ("write_manifest",),
}
RUN = "run"  # the pipeline's whole run, the total
# Stages inside `stream` that the Ray workers run: the module of rank1_batch.run that calls each, and its name.
WORKER_STAGES = {"prepare": ("prompts", "build_prompts"), "commit": ("scoring", "write_results")}

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".scale-data"
MARK = "scale-figures: "  # what a size's process prints before its figures
TIMINGS = "RANK1_SCALE_TIMINGS"  # the directory where each process appends its stages' seconds
SAMPLE_SECONDS = 0.02
MIB = 2**20
BUCKET = "rank1-scale"

CANDIDATES = 100
ROWS_PER_SHARD = 100_000  # a multiple of CANDIDATES: no query spans two shards
VOCABULARY = 20_000
PASSAGE_WORDS = (30, 50)
QUERY_WORDS = (6, 10)

# What the stand-in engine answers for every pair.
REASONING = "The passage names what the query asks for, so it is relevant."
REASONING_TOKENS = 14
PROMPT_TOKENS = 350  # about what the synthetic pairs' prompts take (a written output's prompt_tokens)


# The stand-ins, in every Ray worker (the setup hook) and in the driver.

class StandInEngine:
    """`AsyncRank1Engine`'s interface, answering every prompt at once with one fixed generation."""

    def __init__(self, engine_config, encoder):
        from rank1_batch.model.engine import Generation
        from rank1_batch.model.judgement import Outcome, judge

        self.generation = Generation(judgement=judge(Outcome.ANSWERED, -0.1, -2.3), reasoning=REASONING,
                                     reasoning_tokens=REASONING_TOKENS)

    async def generate(self, prompt_ids):
        return [self.generation]

    def shutdown(self) -> None:
        pass


def no_engine_totals():
    """vLLM's metrics as an engine that never ran reads them."""
    from rank1_batch.model.engine_metrics import EngineTotals

    return EngineTotals(steps=0, generated_tokens=0)


def timed_stage(stage: str, function):
    """`function`, appending its seconds to this process's file in $RANK1_SCALE_TIMINGS."""
    @functools.wraps(function)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with open(Path(os.environ[TIMINGS]) / f"{os.getpid()}.tsv", "a") as timings:
                timings.write(f"{stage}\t{time.perf_counter() - started}\n")
    return timed


def install_stand_ins() -> None:
    """Ray's worker_process_setup_hook: the stand-in engine, no vLLM metrics, timed worker stages.
    The driver installs them too, so that a function pickled by reference resolves alike."""
    from rank1_batch.model import engine
    from rank1_batch.run import prompts, scoring

    engine.AsyncRank1Engine = StandInEngine
    scoring.read_totals = no_engine_totals
    modules = {"prompts": prompts, "scoring": scoring}
    for stage, (module, name) in WORKER_STAGES.items():
        setattr(modules[module], name, timed_stage(stage, getattr(modules[module], name)))


def worker_seconds(timings: Path) -> dict:
    """Each worker stage's seconds and calls since the last read, summed over processes."""
    totals = {stage: {"seconds": 0.0, "calls": 0} for stage in WORKER_STAGES}
    for path in timings.glob("*.tsv"):
        for line in path.read_text().splitlines():
            stage, seconds = line.split("\t")
            totals[stage]["seconds"] += float(seconds)
            totals[stage]["calls"] += 1
        path.unlink()  # the next run starts from none
    return totals


# The driver's phases.

def attribute_owner(module, name: str):
    """The module holding `name`, and the name; stops the benchmark if it is absent."""
    if not hasattr(module, name):
        raise click.ClickException(f"{module.__name__} has no {name}: rename it in the tables at the top of "
                                   f"{Path(__file__).name}")
    return module, name


def check_names() -> None:
    """Every name the benchmark times or replaces is there, before any run starts."""
    from rank1_batch.model import engine
    from rank1_batch.run import pipeline, prompts, scoring

    for entry in [RUN, *(entry for entries in PHASES.values() for entry in entries)]:
        attribute_owner(pipeline, entry)
    modules = {"prompts": prompts, "scoring": scoring}
    for module, name in [*WORKER_STAGES.values(), ("scoring", "read_totals")]:
        attribute_owner(modules[module], name)
    attribute_owner(engine, "AsyncRank1Engine")


@dataclass(eq=False)  # windows are told apart by identity: two may hold the same figures
class Window:
    start: int
    peak: int
    private_start: int
    private_peak: int

    def add(self, rss: int, private: int) -> None:
        self.peak, self.private_peak = max(self.peak, rss), max(self.private_peak, private)


class RssSampler:
    """The driver's RSS every SAMPLE_SECONDS, kept as the peak of each window open; and its private
    part (RSS less shared pages), which leaves out the pages of Ray's object store that the driver
    maps while it reads objects: they are the object store's memory, not the driver's."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.windows: list[Window] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.sample, name="rss", daemon=True).start()

    def rss(self) -> tuple[int, int]:
        """The RSS, and its private part."""
        memory = self.process.memory_info()
        return memory.rss, memory.rss - memory.shared

    def sample(self) -> None:
        while True:
            rss = self.rss()
            with self.lock:
                for window in self.windows:
                    window.add(*rss)
            time.sleep(SAMPLE_SECONDS)

    @contextmanager
    def window(self):
        rss, private = self.rss()
        window = Window(rss, rss, private, private)
        with self.lock:
            self.windows.append(window)
        yield window
        with self.lock:
            self.windows.remove(window)
        window.add(*self.rss())  # a call shorter than a sample


@dataclass(frozen=True)
class Call:
    phase: str
    seconds: float
    start_rss: int
    peak_rss: int
    private_growth: int
    requests: Counter | None  # None off S3


class Meter:
    """Times the phases' functions where the pipeline looks them up, with memory and S3 requests."""

    def __init__(self, server: slow_s3.Server | None):
        self.server, self.sampler, self.calls = server, RssSampler(), []

    def requests(self) -> Counter | None:
        return self.server.requests() if self.server else None

    @contextmanager
    def phase(self, name: str):
        before = self.requests()
        with self.sampler.window() as window:
            started = time.perf_counter()
            yield
            seconds = time.perf_counter() - started
        requests = None if before is None else self.requests() - before
        self.calls.append(Call(name, seconds, window.start, window.peak, window.private_peak - window.private_start,
                               requests))

    def timed(self, phase: str, function):
        @functools.wraps(function)
        def measured(*args, **kwargs):
            with self.phase(phase):
                return function(*args, **kwargs)
        return measured

    def install(self) -> None:
        from rank1_batch.run import pipeline

        for phase, entries in PHASES.items():
            for entry in entries:
                owner, name = attribute_owner(pipeline, entry)
                setattr(owner, name, self.timed(phase, getattr(owner, name)))

    def run(self, job, timings: Path) -> dict:
        from rank1_batch.run import pipeline

        self.calls = []
        with self.phase("total"):
            manifest = getattr(pipeline, RUN)(job, show_progress=False)
        return {"phases": summed(self.calls), "workers": worker_seconds(timings), "counts": manifest["counts"]}


def summed(calls: list[Call]) -> dict:
    """Per phase: its calls' seconds added up, the driver's highest RSS, its largest growth over a
    call's start, and the requests."""
    phases: dict[str, dict] = {}
    for call in calls:
        phase = phases.setdefault(call.phase, {"seconds": 0.0, "calls": 0, "peak_mib": 0.0, "growth_mib": 0.0,
                                               "private_growth_mib": 0.0, "requests": None})
        phase["seconds"] += call.seconds
        phase["calls"] += 1
        phase["peak_mib"] = max(phase["peak_mib"], call.peak_rss / MIB)
        phase["growth_mib"] = max(phase["growth_mib"], (call.peak_rss - call.start_rss) / MIB)
        phase["private_growth_mib"] = max(phase["private_growth_mib"], call.private_growth / MIB)
        if call.requests is not None:
            phase["requests"] = dict(Counter(phase["requests"] or {}) + call.requests)
    return phases


# One size, in a process of its own.

def job_config(input_url: str, output_url: str, batch_size: int, endpoint: str | None):
    """The tests' tiny-model job (tests/conftest.py), one engine, traces and run.trec on, every pair reranked."""
    from rank1_batch.config import JobConfig

    return JobConfig.from_options({
        "model": "tiny", "dtype": "bfloat16", "max_model_len": 1024, "max_reasoning_tokens": 64,
        "enforce_eager": True, "input": input_url, "output": output_url, "batch_size": batch_size, "top_k": None,
        "write_traces": True, "trec_run": True, "engines": 1, "s3_endpoint_url": endpoint,
    })


def upload(input_dir: Path, server: slow_s3.Server) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    fs.mkdir(BUCKET)
    fs.put([str(path) for path in sorted(input_dir.glob("*.parquet"))], f"{BUCKET}/input/")
    return f"s3://{BUCKET}/input/"


def start_ray() -> None:
    """The run's own local Ray, started here so that its workers install the stand-ins first.
    They import this module: benchmarks/ goes on the PYTHONPATH they inherit."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": f"{Path(__file__).stem}.{install_stand_ins.__name__}"})


@click.group(invoke_without_command=True)
@click.option("--sizes", default="100000,1000000,10000000", show_default=True, help="Pairs of each size, comma-separated.")
@click.option("--s3-sizes", help="Sizes also run on S3 (default: the first two --sizes; \"\" for none).")
@click.option("--written-sizes", default="", help="Sizes measured on local disk as a re-run only, of an output "
              "the benchmark commits itself (see above), comma-separated.")
@click.option("--batch-size", type=click.IntRange(min=1), help="The run's --batch-size (default 256; 4 with --latency-compare).")
@click.option("--latency-ms", type=click.FloatRange(min=0),
              help="Added before each S3 request (default 0; 100 with --latency-compare).")
@click.option("--latency-compare", is_flag=True, help="A small job on S3 with no added latency and with --latency-ms.")
@click.option("--pairs", type=click.IntRange(min=1), default=300, show_default=True, help="Pairs of --latency-compare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic input.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure here.")
@click.pass_context
def main(context, sizes, s3_sizes, written_sizes, batch_size, latency_ms, latency_compare, pairs, seed,
         json_file) -> None:
    if context.invoked_subcommand:
        return
    check_names()
    if latency_compare:
        figures = compare_latency(pairs, batch_size or 4, 100 if latency_ms is None else latency_ms, seed)
    else:
        local = size_list(sizes)
        s3 = local[:2] if s3_sizes is None else size_list(s3_sizes)
        figures = scale(local, s3, size_list(written_sizes), batch_size or 256, latency_ms or 0, seed)
    if json_file:
        json_file.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {json_file}")


def size_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected pairs as integers, comma-separated") from None
    if any(size < 1 for size in sizes):
        raise click.BadParameter(f"{text!r}: a size is at least 1 pair")
    return sizes


@main.command(hidden=True)
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--storage", type=click.Choice(["local", "s3"]), required=True)
@click.option("--batch-size", type=int, required=True)
@click.option("--latency-ms", type=float, default=0)
@click.option("--written", is_flag=True, help="Measure a re-run of an output committed here first.")
def measure(input_dir: Path, storage: str, batch_size: int, latency_ms: float, written: bool) -> None:
    """Two runs of one size into one output (or a re-run of a written one), here; the figures
    printed as one JSON line."""
    import ray

    with (tempfile.TemporaryDirectory(prefix="rank1-scale-") as work,
          slow_s3.serve(latency_ms) if storage == "s3" else nullcontext() as server):
        timings = Path(work) / "timings"
        timings.mkdir()
        os.environ[TIMINGS] = str(timings)  # before Ray starts: its workers inherit it
        if server:
            os.environ.update(slow_s3.CREDENTIALS)
            job = job_config(upload(input_dir, server), f"s3://{BUCKET}/output", batch_size, server.endpoint)
        else:
            job = job_config(str(input_dir), str(Path(work) / "output"), batch_size, None)
        written_seconds = write_committed(job, input_dir, batch_size) if written else None
        start_ray()
        try:
            install_stand_ins()
            meter = Meter(server)
            meter.install()
            runs = [None, meter.run(job, timings)] if written else [meter.run(job, timings) for _ in range(2)]
        finally:
            ray.shutdown()
    print(MARK + json.dumps({"pairs": runs[1]["counts"]["input"], "storage": storage, "batch_size": batch_size,
                             "latency_ms": latency_ms, "written": written, "written_seconds": written_seconds,
                             "runs": runs}), flush=True)


def write_committed(job, input_dir: Path, batch_size: int) -> float:
    """The output a first run leaves, written without the run: the output opened for the job,
    then each input shard's batches committed through the run's commit, a process per core.
    Returns the seconds it took."""
    from rank1_batch.output.checkpoint import open_output, with_fit_settled
    from rank1_batch.output.storage import Output

    started = time.perf_counter()
    output = Output(job.run.output, job.run)
    open_output(output, with_fit_settled(output, job))
    shards = sorted(input_dir.glob("*.parquet"))
    print(f"committing {len(shards)} shards' batches ...", flush=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(functools.partial(commit_shard, job, batch_size), shards))
    return time.perf_counter() - started


def commit_shard(job, batch_size: int, shard: Path) -> None:
    """A shard's pairs committed in batches of `batch_size`, each scored with the stand-in's
    generation and written by `commits.write_results`, as a run's engine actor writes it."""
    import pyarrow.parquet as pq

    from rank1_batch.model.encoding import EncodedPrompt
    from rank1_batch.model.scorer import pair_score
    from rank1_batch.output import commits
    from rank1_batch.output.storage import Output, content_name
    from rank1_batch.run import prompts, scoring
    from rank1_batch.schema import conform, to_contract

    output = Output(job.run.output, job.run)
    generation = StandInEngine(job.engine, None).generation
    pairs = to_contract(pq.read_table(shard), job.run.columns)
    encoded = EncodedPrompt([0] * PROMPT_TOKENS, truncated=False)
    for start in range(0, pairs.num_rows, batch_size):
        batch = conform(pairs.slice(start, batch_size), prompts.PROMPTS_SCHEMA)
        judged = pair_score([generation], encoded, job.scoring.threshold)
        scored, errors = scoring.score_table(batch, [judged] * batch.num_rows, job.scoring)
        commits.write_results(scored, errors, content_name(batch["query_id"], batch["doc_id"]), job, output, True)


def measure_in_process(input_dir: Path, storage: str, batch_size: int, latency_ms: float, written: bool = False) -> dict:
    """One size's figures from a process of its own, so that the driver's memory and Ray start clean."""
    print(f"{input_dir.name} on {storage}{' (written, then re-run)' if written else ''}"
          f"{f' (+{latency_ms:g} ms a request)' if latency_ms else ''} ...", flush=True)
    command = [sys.executable, __file__, "measure", "--input", str(input_dir), "--storage", storage,
               "--batch-size", str(batch_size), "--latency-ms", str(latency_ms), *(["--written"] if written else [])]
    with tempfile.NamedTemporaryFile("w+", prefix="rank1-scale-", suffix=".log", delete=False) as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        lines = [line[len(MARK):] for line in log if line.startswith(MARK)]
    if done.returncode or not lines:
        raise click.ClickException(f"the {storage} run of {input_dir.name} failed (exit {done.returncode}): see {log.name}")
    os.unlink(log.name)
    return json.loads(lines[-1])


# The synthetic input.

def input_pairs(pairs: int, seed: int) -> Path:
    """The input of this size and seed under .scale-data/, written unless it is there, complete."""
    import numpy as np
    import pyarrow.parquet as pq

    directory = CACHE / f"{pairs}-pairs-seed-{seed}"
    complete = directory / "_complete"  # hidden from the run by its leading underscore
    if complete.exists():
        return directory
    print(f"writing {pairs:,} synthetic pairs to {directory} ...", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    vocabulary = random_words(np.random.default_rng(seed))
    for number, start in enumerate(range(0, pairs, ROWS_PER_SHARD)):
        rows = min(ROWS_PER_SHARD, pairs - start)
        table = shard(vocabulary, start, rows, np.random.default_rng([seed, number]))
        pq.write_table(table, directory / f"pairs-{number:05d}.parquet")
    complete.touch()
    return directory


def random_words(rng):
    """VOCABULARY random lowercase words of 3 to 10 letters, built from one buffer of letters."""
    import numpy as np
    import pyarrow as pa

    lengths = rng.integers(3, 11, VOCABULARY)
    letters = rng.integers(ord("a"), ord("z") + 1, lengths.sum(), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.StringArray.from_buffers(VOCABULARY, pa.py_buffer(offsets), pa.py_buffer(letters.tobytes()))


def texts(vocabulary, count: int, words: tuple[int, int], rng):
    """`count` texts of words[0] to words[1] words drawn from the vocabulary."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets = np.concatenate([[0], np.cumsum(rng.integers(words[0], words[1] + 1, count))]).astype(np.int32)
    drawn = vocabulary.take(pa.array(rng.integers(0, len(vocabulary), offsets[-1])))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), drawn), " ")


def numbered(prefix: str, numbers):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def shard(vocabulary, start: int, rows: int, rng):
    """Input rows start to start + rows: each query has CANDIDATES candidates, ranked from 1."""
    import numpy as np
    import pyarrow as pa

    row = np.arange(start, start + rows)
    query, rank = row // CANDIDATES, row % CANDIDATES + 1
    queries = texts(vocabulary, query[-1] - query[0] + 1, QUERY_WORDS, rng)
    return pa.table({
        "query_id": numbered("q", query),
        "query": queries.take(pa.array(query - query[0])),
        "doc_id": numbered("d", row),
        "text": texts(vocabulary, rows, PASSAGE_WORDS, rng),
        "first_stage_rank": rank,
        "first_stage_score": (CANDIDATES - rank).astype(np.float64),
    })


# Reports.

def scale(local: list[int], s3: list[int], written: list[int], batch_size: int, latency_ms: float, seed: int) -> dict:
    results = []
    for pairs in sorted(set(local) | set(s3) | set(written)):
        directory = input_pairs(pairs, seed)
        results += [measure_in_process(directory, storage, batch_size, latency_ms)
                    for storage, sizes in (("local", local), ("s3", s3)) if pairs in sizes]
        if pairs in written:
            results.append(measure_in_process(directory, "local", batch_size, latency_ms, written=True))
    for result in results:
        print_size(result)
    growth = growth_factors(results)
    print_growth(growth)
    return {"settings": {"batch_size": batch_size, "latency_ms": latency_ms, "seed": seed}, "sizes": results,
            "growth": growth}


def phase_rows(run: dict) -> dict[str, dict | None]:
    """The rows of a run's table: the driver's phases with the worker stages inside stream, the time
    outside every phase, and the total."""
    phases, total = run["phases"], run["phases"]["total"]
    rows = {}
    for phase in PHASES:
        rows[phase] = phases.get(phase)
        if phase == "stream":
            rows.update({f"  {stage} (workers)": {"seconds": figures["seconds"], "calls": figures["calls"]}
                         for stage, figures in run["workers"].items()})
    timed = [phases[phase] for phase in PHASES if phase in phases]
    rows["other"] = {"seconds": total["seconds"] - sum(phase["seconds"] for phase in timed)}
    if total["requests"] is not None:
        rows["other"]["requests"] = Counter(total["requests"]) - sum((Counter(phase["requests"]) for phase in timed), Counter())
    rows["total"] = total
    return rows


def cells(row: dict | None, s3: bool) -> str:
    if row is None:
        return f"{'-':>8} {'-':>9} {'-':>10} {'-':>8}" + (f" {'-':>7}" if s3 else "")
    memory = [f"{row[name]:.0f}" if name in row else "-" for name in ("peak_mib", "growth_mib", "private_growth_mib")]
    text = f"{row['seconds']:8.2f} {memory[0]:>9} {memory[1]:>10} {memory[2]:>8}"
    requests = row.get("requests")
    return text + (f" {sum(requests.values()) if requests is not None else '-':>7}" if s3 else "")


def series(result: dict) -> str:
    """The sizes a result is compared with: those of its storage, or the other written ones."""
    return "local, written" if result.get("written") else result["storage"]


def print_size(result: dict) -> None:
    s3 = result["storage"] == "s3"
    where = f"S3 (moto, +{result['latency_ms']:g} ms a request)" if s3 else "local disk"
    print(f"\n{result['pairs']:,} pairs on {where}, batch size {result['batch_size']}")
    if result.get("written"):
        print(f"  run 1: not run; its output written through the run's commit in {result['written_seconds']:.0f} s")
    for number, run in enumerate(result["runs"], 1):
        if run is not None:
            counts = run["counts"]
            print(f"  run {number}: {counts['scored']:,} scored, {counts['unscored']:,} unscored, "
                  f"{counts['rejected']:,} rejected, {counts['errors']:,} errors")
    width = len(cells(None, s3))
    print(f"{'':26s} {'run 1: empty output':<{width}s} | run 2: re-run of the finished output")
    heading = f"{'wall s':>8} {'peak MiB':>9} {'growth MiB':>10} {'private':>8}" + (f" {'S3 req':>7}" if s3 else "")
    print(f"{'phase':26s} {heading} | {heading}")
    rows = [phase_rows(run) if run is not None else {} for run in result["runs"]]
    for name in rows[0] or rows[1]:
        print(f"{name:26s} {cells(rows[0].get(name), s3)} | {cells(rows[1].get(name), s3)}")
    print("(workers): seconds summed over the Ray workers' calls, within stream; other: the run outside the phases;\n"
          "private: the growth of the RSS less its shared pages (Ray's object store, mapped while the driver reads)")


def ratio(larger: float | None, smaller: float | None, floor: float) -> float | None:
    """larger / smaller, or None when the smaller is too small to divide by."""
    return None if larger is None or smaller is None or smaller < floor else larger / smaller


def growth_factors(results: list[dict]) -> list[dict]:
    """Per series (see `series`) and run, between consecutive sizes: each phase's time and memory
    growth ratios."""
    found = []
    for name in dict.fromkeys(series(result) for result in results):
        ordered = sorted((result for result in results if series(result) == name), key=lambda r: r["pairs"])
        for smaller, larger in zip(ordered, ordered[1:]):
            pairs = larger["pairs"] / smaller["pairs"]
            for number, (before, after) in enumerate(zip(smaller["runs"], larger["runs"]), 1):
                if before is None or after is None:
                    continue
                rows_before, rows_after = phase_rows(before), phase_rows(after)
                phases = {}
                for phase in rows_before:
                    old, new = rows_before[phase] or {}, rows_after[phase] or {}
                    time_ratio = ratio(new.get("seconds"), old.get("seconds"), 0.001)
                    memory_ratio = ratio(new.get("growth_mib"), old.get("growth_mib"), 1)  # below 1 MiB: noise
                    phases[phase.strip()] = {
                        "time": time_ratio, "time_per_pairs": time_ratio and time_ratio / pairs,
                        "memory": memory_ratio, "memory_per_pairs": memory_ratio and memory_ratio / pairs,
                    }
                found.append({"storage": name, "run": number, "from": smaller["pairs"], "to": larger["pairs"],
                              "phases": phases})
    return found


def print_growth(growth: list[dict]) -> None:
    def shown(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    for step in growth:
        print(f"\ngrowth on {step['storage']}, run {step['run']}: {step['from']:,} -> {step['to']:,} pairs "
              f"(x{step['to'] / step['from']:g})")
        print(f"{'phase':26s} {'time x':>8} {'/ pairs x':>9} {'memory x':>9} {'/ pairs x':>9}")
        for name, figures in step["phases"].items():
            print(f"{name:26s} {shown(figures['time']):>8} {shown(figures['time_per_pairs']):>9} "
                  f"{shown(figures['memory']):>9} {shown(figures['memory_per_pairs']):>9}")
    if growth:
        print("/ pairs x: the ratio over the pairs' ratio, at most 1 when a phase grows at most linearly; "
              "memory x: of the driver's growth within the phase (n/a below 1 MiB)")


def compare_latency(pairs: int, batch_size: int, latency_ms: float, seed: int) -> dict:
    directory = input_pairs(pairs, seed)
    plain, slow = (measure_in_process(directory, "s3", batch_size, latency) for latency in (0, latency_ms))
    print(f"\n{plain['pairs']:,} pairs on S3 with batch size {batch_size}: no added latency against "
          f"+{latency_ms:g} ms a request")
    for number, (fast_run, slow_run) in enumerate(zip(plain["runs"], slow["runs"]), 1):
        print(f"\nrun {number}: {'empty output' if number == 1 else 're-run of the finished output'}")
        print(f"{'phase':26s} {'0 ms s':>8} {f'+{latency_ms:g} ms s':>10} {'diff s':>8} {'diff/latency':>12}  "
              "requests at 0 ms | at +latency")
        fast_rows, slow_rows = phase_rows(fast_run), phase_rows(slow_run)
        for name, fast in fast_rows.items():
            slower = slow_rows[name]
            if fast is None or slower is None:
                print(f"{name:26s} {'-':>8}")
                continue
            difference = slower["seconds"] - fast["seconds"]
            serial = f"{difference / (latency_ms / 1000):.0f}" if latency_ms else "-"
            print(f"{name:26s} {fast['seconds']:8.2f} {slower['seconds']:10.2f} {difference:8.2f} {serial:>12}  "
                  f"{by_method(fast.get('requests'))} | {by_method(slower.get('requests'))}")
    print("\ndiff/latency: the added seconds over the added latency, the requests a phase waited for one after "
          "another; (workers) rows are summed over calls, which overlap")
    return {"settings": {"pairs": pairs, "batch_size": batch_size, "latency_ms": latency_ms, "seed": seed},
            "no_latency": plain, "latency": slow}


def by_method(requests: dict | None) -> str:
    if requests is None:
        return "-"
    return " ".join(f"{method} {count}" for method, count in sorted(requests.items()) if count) or "none"


if __name__ == "__main__":
    main()
