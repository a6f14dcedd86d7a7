"""What a cascade saves, engines only: the cross-encoder alone over each query's top K first-stage
candidates, Rank1 alone over the same top K, and the cascade (the cross-encoder over the top K,
then Rank1 over the cross-encoder's top k), on the same input, each engine started once and timed
apart from its start.

    .venv/bin/python benchmarks/cascade.py --rankllm ../shared/data/trec-dl19/bm25_top100.json \
        [--queries 5] [--depth 100] [--top-k 20]

It drives the Ray-free scorers (`Rank1Scorer`, `CrossEncoderScorer`) with the bundled tiny models,
as one blocking call per stage, so the figures are the engines' own: no Ray, no Parquet, no
commits. Rows are pairs of the first-stage top K per second, so the three rows are comparable.
"""

from __future__ import annotations

import logging
import time

import click
import pyarrow as pa
import pyarrow.compute as pc

from rank1_batch.config import TINY_CROSS_ENCODER_DIR, EngineConfig, job_logging
from rank1_batch.ir.input_files import from_rankllm
from rank1_batch.model.cross_encoder import CrossEncoderScorer
from rank1_batch.model.scorer import Rank1Scorer
from rank1_batch.run.ranking import rank

log = logging.getLogger("rank1_batch.benchmarks.cascade")


def pairs_of(table: pa.Table) -> list[dict]:
    """The candidates as the scorers take them: mappings of query, text and title."""
    return table.select(["query", "text", "title"]).to_pylist()


def timed(scorer, pairs: list[dict]) -> tuple[list, float]:
    """The scorer's results and its engine's seconds, from an empty prefix cache: a pass must not
    reuse the prefill of the same prompts in an earlier pass."""
    scorer.engine.llm.reset_prefix_cache()
    started = time.monotonic()
    results = scorer.score(pairs)
    return results, time.monotonic() - started


def cross_encoder_top(candidates: pa.Table, scores: list[float], k: int) -> pa.Table:
    """Each query's k candidates of highest cross-encoder score, in the job's own ranking order."""
    ranked = rank(candidates.append_column("score", pa.array(scores, pa.float64())))
    return ranked.filter(pc.less_equal(ranked["rank"], k))


@click.command()
@click.option("--rankllm", required=True, help="RankLLM retrieve results (JSON list or JSONL requests).")
@click.option("--queries", type=int, default=5, show_default=True, help="First queries of the file to use.")
@click.option("--depth", type=int, default=100, show_default=True, help="K: first-stage candidates per query.")
@click.option("--top-k", type=int, default=20, show_default=True, help="k: the cross-encoder's top that Rank1 judges.")
@click.option("--max-reasoning-tokens", type=int, default=64, show_default=True)
def main(rankllm, queries, depth, top_k, max_reasoning_tokens):
    job_logging()
    if not 1 <= top_k <= depth:
        raise click.BadParameter(f"must be in [1, --depth {depth}], not {top_k}", param_hint="--top-k")
    table = from_rankllm(rankllm)
    wanted = pc.unique(table["query_id"])[:queries]
    candidates = table.filter(pc.and_(pc.is_in(table["query_id"], value_set=wanted),
                                      pc.less_equal(table["first_stage_rank"], depth)))
    pairs = pairs_of(candidates)
    log.info("%d queries, %d candidates", len(wanted), len(pairs))

    cross_encoder = CrossEncoderScorer(EngineConfig(model=str(TINY_CROSS_ENCODER_DIR), dtype="bfloat16",
                                                    max_model_len=256, enforce_eager=True))
    cross_encoder.score(pairs[:8])  # warm-up: the first call pays one-off costs
    ce_scores, ce_seconds = timed(cross_encoder, pairs)

    rank1 = Rank1Scorer(EngineConfig(model="tiny", dtype="bfloat16", max_model_len=1024, enforce_eager=True,
                                     max_reasoning_tokens=max_reasoning_tokens, fit="budget"))
    rank1.score(pairs[:8])
    _, rank1_seconds = timed(rank1, pairs)
    cascade_pairs = pairs_of(cross_encoder_top(candidates, ce_scores, top_k))
    _, rank1_top_seconds = timed(rank1, cascade_pairs)

    cascade_seconds = ce_seconds + rank1_top_seconds
    rows = [
        ("cross-encoder alone, top K", len(pairs), ce_seconds),
        ("Rank1 alone, top K", len(pairs), rank1_seconds),
        (f"cascade: cross-encoder top K, Rank1 its top {top_k}", len(pairs), cascade_seconds),
    ]
    click.echo(f"\n{len(wanted)} queries, K = {depth} ({len(pairs)} candidates), k = {top_k} "
               f"({len(cascade_pairs)} judged by Rank1 in the cascade), Rank1 budget {max_reasoning_tokens} tokens\n")
    click.echo("| | candidates | engine s | candidates/s |\n| --- | ---: | ---: | ---: |")
    for name, count, seconds in rows:
        click.echo(f"| {name} | {count} | {seconds:.2f} | {count / seconds:.1f} |")
    click.echo(f"\nRank1 engine time saved by the cascade: {1 - rank1_top_seconds / rank1_seconds:.1%}; "
               f"the cascade's speed-up over Rank1 alone: {rank1_seconds / cascade_seconds:.2f}x")


if __name__ == "__main__":
    main()
