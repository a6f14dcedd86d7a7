"""What an engine actor keeps watch of beside its batches: the batches in flight when its engine
died, and its engine's figures as Ray metrics.

Engine deaths: which batches were in an engine when it died, kept in the output across the
actor's restart.

A request that crashes the engine (vLLM's `EngineDeadError`) ends its actor; Ray starts another
and retries the batches that were in flight, without limit. So that one bad pair cannot crash
engines for ever:

- the dying actor records, for each batch it held, that the engine died with it in flight, and
  which of its pairs was alone in the engine at the time, if the batch was running one pair at a
  time;
- a batch retried after a death runs its pairs one at a time, so a second death names its pair;
- a pair named so has taken the engine down twice (once in its batch, once alone): it is recorded
  as a row error, which a later run scores again, and the rest of its batch is scored.

A death caused by another batch's pair while a batch runs one at a time is blamed on that batch's
pair too: the cost is one row error, which a re-run clears. The record of a batch is removed once
the batch is committed. Records are read only by an actor that Ray restarted.

Engine metrics: an engine actor's vLLM figures as Ray metrics, so that a cluster's Prometheus
(and a team's Grafana) shows what every engine is doing: running and waiting sequences, KV-cache
use, prefix-cache queries and hits, generated tokens and engine steps (their ratio is the occupancy
the manifest reports).

vLLM's own Ray exporter (`RayPrometheusStatLogger`, which `ray.data.llm` installs) needs Ray Serve;
these few gauges need only `ray.util.metrics`. Each is tagged with the actor's id.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass

from ..model.engine_metrics import NOW, read_engine_state
from ..output.layout import DEATHS_DIR
from ..output.storage import Output


@dataclass(frozen=True)
class Death:
    """What the engine deaths so far say of one batch."""

    deaths: int
    alone: tuple[str, str] | None  # (query_id, doc_id) alone in the engine at the last death


class EngineDeaths:
    """The record of engine deaths in an output, one small JSON file per batch."""

    def __init__(self, output: Output):
        self.output = output

    def _relative(self, batch: str) -> str:
        return f"{DEATHS_DIR}/{batch}.json"

    def recorded(self, batch: str) -> Death | None:
        if not self.output.exists(self._relative(batch)):
            return None
        found = json.loads(self.output.fs.cat_file(self.output.path(self._relative(batch))))
        return Death(found["deaths"], tuple(found["alone"]) if found["alone"] else None)

    def record(self, in_flight: dict[str, tuple[str, str] | None]) -> None:
        """One more death for each batch in flight, with the pair each one had alone in the engine."""
        for batch, alone in in_flight.items():
            before = self.recorded(batch)
            death = Death((before.deaths if before else 0) + 1, alone)
            self.output.write_bytes(self._relative(batch), json.dumps(asdict(death)).encode())

    def clear(self, batch: str) -> None:
        self.output.remove_file(self._relative(batch))


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
