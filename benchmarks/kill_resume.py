"""How much work a driver kill at about half-way costs: kill `rank1-batch run` with SIGKILL once
half the pairs are committed, run the same command again, and count.

    .venv/bin/python benchmarks/kill_resume.py [--rankllm ../shared/data/trec-dl19/bm25_top100.json] [--top 20]

Pairs committed before the kill are never scored again (the re-run scores exactly the others);
what is lost is the work in flight at the kill: at most the batches the engine actors held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "trec-dl19" / "bm25_top100.json"
ENGINE = ["--model", "tiny", "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"]


def committed(output: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (output / "scores").glob("part-*.parquet"))


@click.command()
@click.option("--rankllm", "data", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_DATA))
@click.option("--top", type=int, default=20, show_default=True, help="Candidates per query.")
@click.option("--budget", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
def main(data: str, top: int, budget: int, batch_size: int) -> None:
    from rank1_batch.ir.input_files import from_rankllm
    from rank1_batch.ir.prepare import write_shards

    work = Path(tempfile.mkdtemp(prefix="rank1-kill-"))
    pairs = from_rankllm(data)
    pairs = pairs.filter(pc.less_equal(pairs["first_stage_rank"], top))
    write_shards(pairs, str(work / "input"), rows_per_shard=200)
    output = work / "output"
    command = [str(Path(sys.executable).parent / "rank1-batch"), "run", "--input", str(work / "input"),
               "--output", str(output), "--max-reasoning-tokens", str(budget), "--batch-size", str(batch_size), *ENGINE]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while committed(output) < pairs.num_rows / 2 if (output / "scores").exists() else True:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Ray's workers are not in the driver's process group: an engine actor may still commit the
    # batch it holds before it notices the driver is gone. Count what the re-run will find.
    time.sleep(10)
    at_kill = committed(output)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = json.loads((output / "_manifest.json").read_text())
    rescored_committed = manifest["scored_this_run"] - (pairs.num_rows - at_kill)
    print(f"{pairs.num_rows} pairs; {at_kill} committed ({at_kill / pairs.num_rows:.0%}) when the re-run starts")
    print(f"re-run scored {manifest['scored_this_run']}; committed pairs scored again: {rescored_committed}")
    print(f"work in flight at the kill, scored again: at most one batch per engine = {batch_size} pairs "
          f"({batch_size / pairs.num_rows:.1%} of the job)")
    print(f"final: scored {manifest['counts']['scored']} of {manifest['counts']['input']}")


if __name__ == "__main__":
    main()
