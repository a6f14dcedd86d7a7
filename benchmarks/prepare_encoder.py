"""What a fresh prepare worker spends on its pair encoder: loading the model's tokenizer itself, as
the prompt stage once did, or unpickling the driver's encoder, as it does now. Each way runs in a
fresh Python process (as a new Ray worker is), after the stage's own imports, in turns over
several rounds; the figure is that process's CPU seconds for the encoder alone.

    .venv/bin/python benchmarks/prepare_encoder.py [--model tiny] [--scorer rank1] [--rounds 3]
"""

from __future__ import annotations

import json
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from rank1_batch.config import JobConfig
from rank1_batch.run.prompts import scorer_of

# Run in the fresh process: the stage's imports first, then only the encoder is timed.
WORKER = """
import json, pickle, sys, time
from rank1_batch.config import JobConfig
from rank1_batch.run.prompts import scorer_of

job = JobConfig.from_options(json.loads(sys.argv[1]))
shipped = open(sys.argv[3], "rb").read()
started = time.process_time()
scorer_of(job) if sys.argv[2] == "loaded" else scorer_of(job, pickle.loads(shipped))
print(time.process_time() - started)
"""


def worker_seconds(options: str, way: str, shipped: Path) -> float:
    finished = subprocess.run([sys.executable, "-c", WORKER, options, way, str(shipped)], capture_output=True,
                              text=True, check=True)
    return float(finished.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--scorer", type=click.Choice(["rank1", "cross-encoder"]), default="rank1", show_default=True)
@click.option("--rounds", default=3, show_default=True)
def main(model: str, scorer: str, rounds: int) -> None:
    options = {"input": ["unused"], "output": "unused", "model": model, "scorer": scorer}
    job = JobConfig.from_options(options)
    with tempfile.TemporaryDirectory() as directory:
        shipped = Path(directory) / "encoder.pickle"
        shipped.write_bytes(pickle.dumps(scorer_of(job)[1]))
        print(f"the driver's encoder, pickled: {shipped.stat().st_size / 1e3:.1f} kB")
        seconds = {"loaded": [], "unpickled": []}
        for _ in range(rounds):
            for way, taken in seconds.items():
                taken.append(worker_seconds(json.dumps(options), way, shipped))
    median = {way: statistics.median(taken) for way, taken in seconds.items()}
    for way, taken in seconds.items():
        print(f"{way:>9}: median {median[way]:.2f} CPU-s  ({', '.join(f'{t:.2f}' for t in taken)})")
    print(f"unpickled / loaded: {median['unpickled'] / median['loaded']:.2f}; "
          f"{median['loaded'] - median['unpickled']:.2f} CPU-s saved per fresh worker")


if __name__ == "__main__":
    main()
