"""Build the demo sample bundled with the package: candidate lists in the tiny model's world.

    python scripts/build_sample.py        # writes rank1_batch/assets/sample/*.parquet

Each query asks for one attribute of one town; its candidates state that attribute of that
town (relevant) or something else, in a shuffled first-stage order with BM25-like scores.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE.parent / "rank1_batch" / "assets" / "sample"


def _world():
    spec = importlib.util.spec_from_file_location("build_tiny_model", HERE / "build_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _passage(world, rng: random.Random, town: str, attribute: str) -> str:
    fact = rng.choice(world.FACT_TEMPLATES).format(
        attribute=attribute, town=town, value=rng.choice(world.ATTRIBUTES[attribute])
    )
    sentences = rng.sample(world.FILLERS, rng.randrange(3)) + [fact]
    rng.shuffle(sentences)
    return " ".join(sentences)


def candidate_lists(queries: int, per_query: int, seed: int) -> pa.Table:
    """Rows of the input contract: `queries` queries with `per_query` candidates each."""
    world = _world()
    rng = random.Random(seed)
    rows = []
    for number in range(queries):
        town, attribute = rng.choice(world.TOWNS), rng.choice(list(world.ATTRIBUTES))
        query = rng.choice(world.QUERY_TEMPLATES).format(attribute=attribute, town=town)
        candidates = []
        for _ in range(per_query):
            relevant = rng.random() < 0.3
            # A non-relevant candidate is about another town, another attribute, or both.
            wrong = rng.randrange(3)
            candidate_town = town if relevant or wrong == 1 else world._other_town(rng, town)
            candidate_attribute = attribute if relevant or wrong == 0 else rng.choice(
                [a for a in world.ATTRIBUTES if a != attribute]
            )
            candidates.append((relevant, _passage(world, rng, candidate_town, candidate_attribute)))
        rng.shuffle(candidates)
        for position, (relevant, text) in enumerate(candidates, start=1):
            rows.append(
                {
                    "query_id": f"q{number:03d}",
                    "query": query,
                    "doc_id": f"q{number:03d}-d{position:03d}",
                    "text": text,
                    "first_stage_rank": position,
                    "first_stage_score": round(30.0 - position * rng.uniform(0.5, 1.5), 3),
                    "relevant": relevant,
                }
            )
    return pa.Table.from_pylist(rows)


@click.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUTPUT)
@click.option("--queries", type=int, default=8, show_default=True)
@click.option("--per-query", type=int, default=20, show_default=True)
@click.option("--shards", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(output: Path, queries: int, per_query: int, shards: int, seed: int) -> None:
    table = candidate_lists(queries, per_query, seed)
    output.mkdir(parents=True, exist_ok=True)
    rows_per_shard = -(-table.num_rows // shards)
    for shard in range(shards):
        pq.write_table(table.slice(shard * rows_per_shard, rows_per_shard), output / f"pairs-{shard:05d}.parquet")
    click.echo(f"{table.num_rows} pairs of {queries} queries in {shards} shards under {output}")


if __name__ == "__main__":
    main()
