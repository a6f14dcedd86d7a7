"""Engine figures from vLLM's metrics: the arithmetic, and the metric names as vLLM registers them.

No engine starts here. Against a real engine (the Rank1-shaped workload, 300 pairs) the occupancy
was checked by hand against vLLM's per-step iteration details (sequences each step scheduled):
46.9 against 47.0 with the engine core in-process, 46.9 against 47.1 in a process of its own.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from vllm.v1.metrics import reader

from rank1_batch.model import engine_metrics
from rank1_batch.model.engine_metrics import GENERATED, STEPS, EngineFigures, EngineMeter, EngineTotals, MetricsOff, totals


def snapshot(steps_by_engine: dict[str, int], generated_by_engine: dict[str, int]) -> list:
    return [
        *[reader.Histogram(STEPS, {"engine": engine}, count, 0.0, {"+Inf": count})
          for engine, count in steps_by_engine.items()],
        *[reader.Counter(GENERATED, {"engine": engine}, value) for engine, value in generated_by_engine.items()],
        reader.Gauge("vllm:num_requests_running", {"engine": "0"}, 7.0),
    ]


def test_totals_sum_over_the_engines_labelled():
    assert totals(snapshot({"0": 10, "1": 30}, {"0": 250, "1": 550})) == EngineTotals(steps=40, generated_tokens=800)


def test_no_metrics_is_an_error_that_says_how_to_turn_them_on():
    with pytest.raises(MetricsOff, match="disable_log_stats=False"):
        totals([reader.Gauge("vllm:num_requests_running", {}, 0.0)])


def test_figures_are_tokens_per_step_and_per_second():
    figures = EngineFigures.from_counts(steps=40, generated_tokens=800, seconds=4.0)
    assert (figures.occupancy, figures.tokens_per_second) == (20.0, 200.0)


def test_an_engine_that_took_no_step_carried_nothing():
    assert EngineFigures.from_counts(steps=0, generated_tokens=0, seconds=0.0) == EngineFigures(0, 0, 0.0, 0.0, 0.0)


def test_the_meter_counts_only_what_happened_after_start(monkeypatch):
    readings = iter([EngineTotals(100, 5_000), EngineTotals(160, 6_200)])
    monkeypatch.setattr(engine_metrics, "read_totals", lambda: next(readings))
    meter = EngineMeter().start()
    figures = meter.read()
    assert (figures.steps, figures.generated_tokens, figures.occupancy) == (60, 1_200, 20.0)
    assert figures.seconds > 0


def test_read_before_start_is_refused():
    with pytest.raises(RuntimeError, match="before start"):
        EngineMeter().read()


def test_the_names_match_vllms_prometheus_metrics(monkeypatch):
    """Registered as vLLM's PrometheusStatLogger registers them (a counter's sample gains `_total`),
    read back through vLLM's own snapshot, from a registry of the test's own: an engine of the
    session may hold the process's."""
    registry = CollectorRegistry()
    monkeypatch.setattr(reader, "REGISTRY", registry)
    labels = ["model_name", "engine"]
    generated = Counter(GENERATED, "generated tokens", labelnames=labels, registry=registry)
    steps = Histogram(STEPS, "tokens per engine step", labelnames=labels, buckets=[1, 8, 16], registry=registry)
    for engine, tokens in (("0", [3, 5]), ("1", [8])):
        for count in tokens:
            steps.labels("m", engine).observe(count)
            generated.labels("m", engine).inc(count)
    assert engine_metrics.read_totals() == EngineTotals(steps=3, generated_tokens=16)
