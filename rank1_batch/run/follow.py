"""The driver's watch over a running job: it follows the committed batches (progress, outcomes,
the stall limit) and the run's lease, and drains the run on SIGTERM.

Pre-emption: on SIGTERM (a spot node reclaimed, a pod evicted, `ray job stop`) a run stops
starting batches, lets its engines commit the batches they hold within a grace period, then
releases its output and exits non-zero. A re-run resumes with whatever was not committed.

The engine actors ask a small shared `BatchGate` before each batch whether to start it, and tell
it when the batch is committed (or failed), so the driver knows when nothing is left in flight.
The gate also watches the run's lease, which every write of the run's workers asks it about."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm import tqdm

from ..config import JobError, RunConfig
from ..model.engine_metrics import EngineFigures
from ..model.judgement import OUTCOMES
from ..output.lease import LeaseWatch, OutputInUse
from ..output.storage import Output
from .finish import ThisRun

log = logging.getLogger(__name__)


class Stalled(JobError):
    """No batch was committed within the stall limit."""


# How often the driver looks up from waiting for commits (for SIGTERM and the stall limit).
POLL_SECONDS = 1.0
NOTHING = object()  # no commit arrived within a poll


def commits_of(committed) -> queue.Queue:
    """The committed batches' counts as Ray Data yields them, through a queue that the driver's
    thread polls (so that it can look up for SIGTERM and the stall limit); then None, or the error
    that ended the dataset."""
    commits: queue.Queue = queue.Queue()

    def pass_on():
        try:
            for batch in committed.iter_batches(batch_format="pyarrow", batch_size=None):
                commits.put(batch)
            commits.put(None)
        except BaseException as error:  # handed to the driver's thread, which raises it
            commits.put(error)

    threading.Thread(target=pass_on, name="commits", daemon=True).start()
    return commits


@dataclass
class Tally:
    """What the committed batches add up to so far, shown on the progress bar as they come."""

    outcomes: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    scored: int = 0
    steps: int = 0
    generated: int = 0
    engine_starts: int = 0

    def add(self, batch: pa.Table, bar: tqdm) -> None:
        for row in batch.to_pylist():
            bar.update(row["pairs"])
            for outcome in self.outcomes:
                self.outcomes[outcome] += row[outcome]
            self.scored += row["scored"]
            self.steps, self.generated = self.steps + row["engine_steps"], self.generated + row["generated_tokens"]
            self.engine_starts += row["engine_starts"]
            bar.set_postfix(self.outcomes, refresh=False)


def follow(committed, total: int, show_progress: bool, run: RunConfig, gate, lease_lost: threading.Event) -> ThisRun:
    """Drive the dataset to the end, showing pairs done and outcomes as batches are committed;
    return what this run scored and its engines did. No commit for `run.stall_timeout` seconds
    fails the run, as does the loss of its lease (`lease_lost`: another run took the output over).
    SIGTERM drains it: no batch starts after it, and the run stops once the batches in flight are
    committed or `run.grace_period` has passed."""
    import ray

    commits, tally = commits_of(committed), Tally()
    started = last_commit = time.monotonic()
    stop, drain_ends = threading.Event(), None
    with (sigterm_requests_drain(stop),
          tqdm(total=total, unit="pair", desc="scoring", disable=not show_progress, dynamic_ncols=True) as bar):
        while True:
            try:
                batch = commits.get(timeout=POLL_SECONDS)
            except queue.Empty:
                batch = NOTHING
            now = time.monotonic()
            if lease_lost.is_set():
                raise OutputInUse(f"another run took over {run.output} after {bar.n} of {total} pairs (this run's "
                                  f"heartbeat was not renewed for --lease-timeout {run.lease_timeout:g} s); "
                                  "this run stops, and what it committed is kept")
            if stop.is_set() and drain_ends is None:
                drain_ends = now + run.grace_period
                log.warning("SIGTERM: starting no more batches; waiting up to %g s (--grace-period) for the %d "
                            "batch(es) in flight to commit", run.grace_period, ray.get(gate.drain.remote()))
            elif drain_ends is not None:
                held = ray.get(gate.held.remote())
                if held == 0 or now > drain_ends:
                    raise Preempted(preempted_message(bar.n, total, held, run.grace_period))
            if batch is NOTHING:
                if now - last_commit > run.stall_timeout:
                    raise Stalled(stall_message(run.stall_timeout, bar.n, total, engine_actor_states(),
                                                ray.get(gate.held.remote())))
                continue
            last_commit = now
            if batch is None:
                if drain_ends is not None:  # every batch left was turned away: the run is not finished
                    raise Preempted(preempted_message(bar.n, total, 0, run.grace_period))
                break
            if isinstance(batch, BaseException):
                # Ray Data reports a stage's error without its cause: a lost lease is named here
                stop_if_lease_lost(ray.get(gate.lease_lost.remote()))
                raise batch
            tally.add(batch, bar)
    figures = EngineFigures.from_counts(tally.steps, tally.generated, time.monotonic() - started)
    return ThisRun(tally.scored, figures, tally.engine_starts)


def preempted_message(done: int, total: int, dropped: int, grace_period: float) -> str:
    dropped_text = (f"{dropped} batch(es) still in flight after --grace-period {grace_period:g} s were dropped"
                    if dropped else "every batch in flight was committed")
    return (f"stopped by SIGTERM after {done} of {total} pairs: {dropped_text}; committed outputs are kept, "
            "and a re-run resumes")


def stall_message(seconds: float, done: int, total: int, states: Counter, in_flight: int) -> str:
    """What holds the work when nothing is committed, from the states of this job's engine actors
    (see `engine_actor_states`) and the number of batches they hold (`in_flight`)."""
    alive, starting = states.get("ALIVE", 0), states.get("PENDING_CREATION", 0) + states.get("RESTARTING", 0)
    if starting:
        stage = f"{starting} engine actor(s) still starting, {alive} ready"
    elif alive and in_flight:
        stage = (f"{alive} engine actor(s) scoring {in_flight} batch(es), none finished in time (an engine still "
                 "loading its model, which it does with its first pair to judge; a batch too slow; or a hung engine)")
    elif alive:
        stage = (f"{alive} engine actor(s) ready and given no batch: the prepare stage (reading the input, building "
                 "prompts) has not produced one in time")
    else:
        stage = "no engine actor has been placed (the cluster may lack the resources the pool asks for)"
    first = "its first batch" if done == 0 else "a batch since"
    return (f"no batch committed for {seconds:g} s (--stall-timeout) after {done} of {total} pairs: the score "
            f"stage has not committed {first}: {stage}; committed outputs are kept, and a re-run resumes")


def engine_actor_states() -> Counter:
    """How many of this job's engine actors are in each state, from the cluster's actor table."""
    import ray
    from ray._private.state import actors

    from .scoring import ScorePairs  # here: the engine actors' module asks this one about the lease

    job = ray.get_runtime_context().get_job_id()
    engines = [actor for actor in actors().values()
               if actor["JobID"] == job and ScorePairs.__name__ in actor["ActorClassName"]]
    return Counter(actor["State"] for actor in engines)


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
