"""An engine actor's vLLM figures as Ray metrics, so that a cluster's Prometheus (and a team's
Grafana) shows what every engine is doing: running and waiting sequences, KV-cache use, prefix-cache
queries and hits, generated tokens and engine steps (their ratio is the occupancy the manifest
reports).

vLLM's own Ray exporter (`RayPrometheusStatLogger`, which `ray.data.llm` installs) needs Ray Serve;
these few gauges need only `ray.util.metrics`. Each is tagged with the actor's id.
"""

from __future__ import annotations

import asyncio

from ..model.engine_metrics import NOW, read_engine_state

PREFIX = "rank1_engine_"
# How often the figures are published: about Prometheus's usual scrape interval.
INTERVAL_SECONDS = 10.0


class EngineMonitor:
    """Publishes this process's engine figures to Ray's metrics, now and at intervals."""

    def __init__(self):
        import ray
        from ray.util.metrics import Gauge

        self.tags = {"actor": ray.get_runtime_context().get_actor_id() or "driver"}
        self.gauges = {
            figure: Gauge(PREFIX + figure, description=f"vLLM's {name}, as this engine actor last read it",
                          tag_keys=("actor",))
            for figure, name in {**NOW, "engine_steps": "engine steps"}.items()
        }
        self.task: asyncio.Task | None = None

    def publish(self) -> None:
        for figure, value in read_engine_state().items():
            self.gauges[figure].set(value, tags=self.tags)

    def start(self) -> None:
        """Publish at intervals on the running event loop (the actor's), from now on."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._every_interval())

    async def _every_interval(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(INTERVAL_SECONDS)
