"""Pre-emption: on SIGTERM (a spot node reclaimed, a pod evicted, `ray job stop`) a run stops
starting batches, lets its engines commit the batches they hold within a grace period, then
releases its output and exits non-zero. A re-run resumes with whatever was not committed.

The engine actors ask a small shared `BatchGate` before each batch whether to start it, and tell
it when the batch is committed (or failed), so the driver knows when nothing is left in flight.
The gate also watches the run's lease, which every write of the run's workers asks it about."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ..config import JobError
from ..output.lease import LeaseWatch, OutputInUse
from ..output.storage import Output


class Preempted(JobError):
    """The run was asked to stop (SIGTERM) and stopped after draining what it could."""


class BatchGate:
    """Which batches may start, how many started ones are not yet committed, and whether the run
    may still write its output. Held by one Ray actor per run; its methods are what the engine
    actors, the prepare tasks and the driver call."""

    def __init__(self, output: Output, run_id: str, lease_timeout: float):
        self.draining = False
        self.in_flight = 0
        self.lease = LeaseWatch(output, run_id, lease_timeout)

    def lease_lost(self) -> str | None:
        """Why the run may no longer write its output (its lease was lost), or None."""
        return self.lease.lost()

    def admit(self) -> bool:
        """Whether a batch may start; one that may is counted until `done`."""
        if self.draining:
            return False
        self.in_flight += 1
        return True

    def done(self) -> None:
        self.in_flight -= 1

    def drain(self) -> int:
        """Start no more batches; the number still in flight."""
        self.draining = True
        return self.in_flight

    def held(self) -> int:
        return self.in_flight


def start_gate(output: Output, run_id: str, lease_timeout: float):
    """The run's gate as a Ray actor on the driver's node, which a lost worker node does not take
    along; restarted (with a fresh count) and its calls retried if it is lost all the same."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    gate = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BatchGate)
    return gate.options(scheduling_strategy=here).remote(output, run_id, lease_timeout)


class OutputLost(OutputInUse):
    """A worker was about to write into an output its run no longer holds."""


def stop_if_lease_lost(lost: str | None) -> None:
    """Raise `OutputLost` with the gate's reason (`BatchGate.lease_lost`), if there is one, before
    a worker writes: nothing is written by a run that another may have taken over."""
    if lost is not None:
        raise OutputLost(f"{lost}; this run stops writing, and what it committed is kept")


@contextmanager
def sigterm_requests_drain(requested: threading.Event):
    """Within: a first SIGTERM sets `requested` (the caller drains); a second one exits at once.
    Outside the main thread, where Python cannot take signals, SIGTERM keeps its handler."""
    def request(signum, frame):
        if requested.is_set():
            raise SystemExit(128 + signum)
        requested.set()

    try:
        previous = signal.signal(signal.SIGTERM, request)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
