"""A cascade: a cross-encoder in front of Rank1, as two committed runs into one output.

The cross-encoder's run scores each query's top K first-stage candidates into OUTPUT/cascade/, a
run of its own (lease, resume, store); its ranked/ then stands in for the first stage of the
Rank1 run, which judges each query's top k of that order. Rank1 starts only once every candidate
has its cross-encoder score, so each query's k are known; a re-run resumes the cross-encoder's
run (finished: nothing to score) and then Rank1's.
"""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa

from ..config import GREEDY, EngineConfig, JobConfig, ScoringConfig
from ..output.layout import CASCADE_DIR
from ..output.storage import Output
from ..schema import RANKED_SCHEMA

log = logging.getLogger(__name__)

FIRST_STAGE_COLUMNS = ["query_id", "doc_id", "rank", "score"]


def cross_encoder_job(job: JobConfig) -> JobConfig:
    """The cascade's first run: the cross-encoder over the top K of the input's first stage, on
    the job's engine options but for its own model, dtype and context, into OUTPUT/cascade/.
    Rank1's sampling and engine arguments stay with Rank1; labels and traces are Rank1's to write.
    The score store is Rank1's too: the Rank1 run holds it while this run runs, and it keeps the
    judgements that cost most."""
    cascade = job.cascade
    engine = dataclasses.replace(
        job.engine, model=cascade.model, revision=None, dtype=cascade.dtype or job.engine.dtype,
        max_model_len=cascade.max_model_len, max_reasoning_tokens=EngineConfig.max_reasoning_tokens, fit=None,
        engine_args={}, **GREEDY)
    scoring = ScoringConfig(scorer="cross-encoder", cross_encoder_template=cascade.template)
    run = dataclasses.replace(
        job.run, output=cascade_url(job), top_k=cascade.top_k, write_traces=False, labels=False,
        labels_answered_only=False, trec_run=False, store=None)
    return JobConfig(engine, scoring, run)


def cascade_url(job: JobConfig) -> str:
    return f"{job.run.output.rstrip('/')}/{CASCADE_DIR}"


def cross_encoder_ranking(job: JobConfig) -> pa.Table:
    """The cross-encoder's finished ranking, as the Rank1 run's first stage: each candidate's rank
    and score (null for those beyond K, which follow in the input's first-stage order)."""
    output = Output(cascade_url(job), job.run)
    return output.read("ranked", FIRST_STAGE_COLUMNS, RANKED_SCHEMA)


def stage_summary(manifest: dict) -> dict:
    """What the Rank1 run's manifest records of the cross-encoder's run."""
    return {
        "output": CASCADE_DIR,
        "model": manifest["model"],
        "scorer": manifest["scorer"],
        "top_k": manifest["job"]["run"]["top_k"],
        "counts": manifest["counts"],
        "scored_this_run": manifest["scored_this_run"],
        "wall_seconds": manifest["wall_seconds"],
        "pairs_per_second": manifest["pairs_per_second"],
    }
