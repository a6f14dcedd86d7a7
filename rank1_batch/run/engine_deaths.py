"""Which batches were in an engine when it died, kept in the output across the actor's restart.

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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..output.storage import Output

DEATHS_DIR = "_engine_deaths"


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
