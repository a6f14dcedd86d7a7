"""How busy a vLLM engine was, from vLLM's own metrics: steps, generated tokens, occupancy.

Occupancy is the mean number of sequences an engine step carried. A greedy step gives each
sequence it carries one new token (a prefill step gives the sequence its first), so generated
tokens over steps is that mean, read from two of vLLM's Prometheus metrics:

- `vllm:generation_tokens` (a counter), the tokens generated;
- `vllm:iteration_tokens_total` (a histogram), one observation per engine step that produced
  output: its count is the number of steps.

It undercounts only what produces no token: a prompt chunk that does not finish its prefill in
a step (chunked prefill of a prompt longer than a step's token budget), and the step a stop-string
request may still take before the frontend's abort reaches the engine core.

vLLM records these in the process that calls the engine (the frontend's stat loggers, also when
the engine core runs in a process of its own), and only when the engine is built with
`disable_log_stats=False` (`vllm.LLM` turns stats off unless told): see `STATS_ON`. Knows
nothing of Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

GENERATED = "vllm:generation_tokens"
STEPS = "vllm:iteration_tokens_total"
# The engine argument that makes vLLM record its metrics.
STATS_ON = {"disable_log_stats": False}


class MetricsOff(RuntimeError):
    """This process holds no vLLM metrics to read."""


@dataclass(frozen=True)
class EngineTotals:
    """The two running totals at one point in time."""

    steps: int
    generated_tokens: int

    def __sub__(self, earlier: "EngineTotals") -> "EngineTotals":
        return EngineTotals(self.steps - earlier.steps, self.generated_tokens - earlier.generated_tokens)


@dataclass(frozen=True)
class EngineFigures:
    """What an engine did between two points: `occupancy` is sequences per step."""

    steps: int
    generated_tokens: int
    occupancy: float
    seconds: float
    tokens_per_second: float

    @classmethod
    def from_counts(cls, steps: int, generated_tokens: int, seconds: float) -> "EngineFigures":
        """Figures of counts, also summed over several engines (an occupancy is not averaged: it
        is their tokens over their steps). An engine that took no step carried nothing: 0."""
        return cls(
            steps=steps,
            generated_tokens=generated_tokens,
            occupancy=generated_tokens / steps if steps else 0.0,
            seconds=seconds,
            tokens_per_second=generated_tokens / seconds if seconds > 0 else 0.0,
        )


def totals(metrics) -> EngineTotals:
    """The totals in a `vllm.v1.metrics.reader.get_metrics_snapshot()` list, summed over the
    engines it labels. Stats off leave neither metric there: then `MetricsOff`."""
    steps = [metric.count for metric in metrics if metric.name == STEPS]
    generated = [metric.value for metric in metrics if metric.name == GENERATED]
    if not steps or not generated:
        raise MetricsOff(
            f"no {STEPS} or {GENERATED} in this process: build the engine here, with disable_log_stats=False"
        )
    return EngineTotals(int(sum(steps)), int(sum(generated)))


# What an engine is doing now, by vLLM's metric: a gauge's value, or a counter's total so far.
NOW = {
    "running_sequences": "vllm:num_requests_running",
    "waiting_sequences": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "generated_tokens": GENERATED,
}


def engine_state(metrics) -> dict[str, float]:
    """The figures of `NOW` and the engine steps so far, summed over the engines a
    `get_metrics_snapshot()` list labels; a metric absent from it counts 0."""
    state = {
        figure: float(sum(metric.value for metric in metrics if metric.name == name))
        for figure, name in NOW.items()
    }
    state["engine_steps"] = float(sum(metric.count for metric in metrics if metric.name == STEPS))
    return state


def read_engine_state() -> dict[str, float]:
    from vllm.v1.metrics.reader import get_metrics_snapshot

    return engine_state(get_metrics_snapshot())


def read_totals() -> EngineTotals:
    from vllm.v1.metrics.reader import get_metrics_snapshot

    return totals(get_metrics_snapshot())


class EngineMeter:
    """Measures the engines of this process between `start()` and `read()`.

    Start it once the engine is built: building one resets vLLM's metrics."""

    def __init__(self):
        self._start: EngineTotals | None = None
        self._started_at = 0.0

    def start(self) -> "EngineMeter":
        self._start, self._started_at = read_totals(), time.monotonic()
        return self

    def read(self) -> EngineFigures:
        if self._start is None:
            raise RuntimeError("EngineMeter.read() before start()")
        seconds = time.monotonic() - self._started_at
        done = read_totals() - self._start
        return EngineFigures.from_counts(done.steps, done.generated_tokens, seconds)
