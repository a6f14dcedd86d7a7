"""One writer per output: a run holds `_lease.json` in its output while it runs.

The lease names its holder (run id, host, process id and that process's start time) and carries a
heartbeat that a thread renews. Another run is refused while the holder is alive. A holder is
known to be gone when its heartbeat is older than the stale limit (`--lease-timeout`), or at once
when it ran on this host and its process no longer exists (or the id now belongs to a younger
process), so a re-run after a kill does not wait. A holder on another host (a RayJob retry runs
on a new head) is watched: a heartbeat that advances is a live run, refused; one that ages past
the limit is a dead one, taken over. So a retry waits at most the stale limit, and fails none of
its attempts on a lease its predecessor left.

The run's workers stop writing once its lease is lost. A `LeaseWatch` (in the run's batch gate)
reads the lease every few seconds; a batch or set-aside rows are written only while it names this
run with a heartbeat younger than half the stale limit. A successor takes over only past the whole
limit, so a run whose driver stalls stops committing before another run can start.

Taking a lease reads its version, then the holder, then writes on condition of that version. On
S3 (and stores that honour its If-None-Match and If-Match headers, as MinIO does) the store checks
the condition itself: of two runs that start within the same instant exactly one writes, and the
other is refused. Renewals and the release are conditional on the version last written, so a run
whose lease was taken over (a heartbeat that stalled past the stale limit) never overwrites or
removes its successor's, and says so. A local filesystem checks only creation (a hard link fails
on an existing name); taking over a dead holder's lease there, and any write on a store without
conditions, is followed by a read back after a short settle, which catches all but a write that
lands in between.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from ..config import JobError, RunConfig
from .layout import LEASE_FILE
from .storage import Changed, Output

# A heartbeat renewed this often stays well inside any sensible stale limit.
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = RunConfig.lease_timeout
SETTLE_SECONDS = 0.2

log = logging.getLogger(__name__)


class OutputInUse(JobError):
    """Another run holds the output."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    process_started: float
    started: float
    heartbeat: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"run {self.run_id} (process {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
                f"last heartbeat {age:.0f} s ago)")

    def is_same_process(self, other: "Holder") -> bool:
        """Whether both records come from one holder (heartbeats apart)."""
        return (self.run_id, self.host, self.pid, self.started) == (other.run_id, other.host, other.pid, other.started)


def process_started(pid: int) -> float | None:
    """The start time of a process on this host, or None if there is none with that id."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_gone(holder: Holder, stale_after: float) -> bool:
    """Whether the holder's run has ended without releasing its lease."""
    if time.time() - holder.heartbeat > stale_after:
        return True
    if holder.host == socket.gethostname():
        started = process_started(holder.pid)
        return started is None or abs(started - holder.process_started) > 1.0
    return False


def renewal_seconds(stale_after: float) -> float:
    """How often a heartbeat is renewed: several times within the stale limit."""
    return min(HEARTBEAT_SECONDS, stale_after / 4)


def watch_seconds(stale_after: float) -> float:
    """How often a lease is read by those who watch it: several times per renewal."""
    return renewal_seconds(stale_after) / 3


def new_holder(run_id: str) -> Holder:
    """This process as the holder of a record, for the run `run_id`."""
    now = time.time()
    pid = os.getpid()
    return Holder(run_id, socket.gethostname(), pid, process_started(pid) or now, now, now)


def read_holder(output: Output, relative: str) -> Holder | None:
    """The holder recorded at `relative` under the output, or None if there is none."""
    try:
        return Holder(**json.loads(output.fs.cat_file(output.path(relative))))
    except (ValueError, TypeError, FileNotFoundError):
        return None  # half-written or removed meanwhile: nobody holds it


class Heartbeat:
    """A holder's record at one path of an output, renewed by a thread from `start` to `stop`;
    `stop` removes it if it still names this holder. Used as a context manager it does all three."""

    def __init__(self, output: Output, relative: str, holder: Holder, stale_after: float = STALE_AFTER_SECONDS):
        self.output = output
        self.relative = relative
        self.holder = holder
        self.stale_after = stale_after
        self.version: str | None = None  # of the record last written, where the store checks versions
        self.lost = threading.Event()  # set when another holder replaced the record
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def write(self, version: str | None = None) -> None:
        """Write the record: on condition that it is at `version` (see `Output.write_bytes_if`),
        else on condition that it is still the one last written."""
        expected = version if version is not None else self.version
        self.version = self.output.write_bytes_if(self.relative, json.dumps(asdict(self.holder)).encode(), expected)

    def start(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="heartbeat", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(renewal_seconds(self.stale_after)):
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                if self.version is None:  # the store cannot check the write: see that it is still ours first
                    held = read_holder(self.output, self.relative)
                    if held is None or not held.is_same_process(self.holder):
                        raise Changed(self.relative)
                self.write()
            except Changed:
                version, held = self.output.version(self.relative), read_holder(self.output, self.relative)
                if held is not None and held.is_same_process(self.holder):
                    self.version = version  # our own write, retried after the store had taken it
                    continue
                self.lost.set()
                log.error("%s in %s was taken over by %s; no longer renewed", self.relative, self.output.url,
                          held.describe() if held else "another writer")
                return
            except OSError as error:  # a missed beat is not fatal; the stale limit allows several
                log.warning("could not renew %s in %s: %s", self.relative, self.output.url, error)

    def stop(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost.is_set():
            return
        if self.version:  # the store removes it only if it is still ours
            try:
                self.output.remove_if(self.relative, self.version)
            except (Changed, FileNotFoundError):
                pass
            return
        held = read_holder(self.output, self.relative)
        if held is not None and held.is_same_process(self.holder):
            self.output.fs.rm(self.output.path(self.relative))

    def __enter__(self) -> "Heartbeat":
        self.write()
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Lease:
    """Hold an output for one run: `with Lease(output):` takes, renews and releases it."""

    def __init__(self, output: Output, stale_after: float = STALE_AFTER_SECONDS):
        self.output = output
        self.stale_after = stale_after
        self.heartbeat = Heartbeat(output, LEASE_FILE, new_holder(uuid.uuid4().hex[:12]), stale_after)

    @property
    def holder(self) -> Holder:
        return self.heartbeat.holder

    def current(self) -> Holder | None:
        return read_holder(self.output, LEASE_FILE)

    def _read(self) -> tuple[str | None, Holder | None]:
        # the version before the holder: a write conditional on it fails if the holder read is not the latest
        return self.output.version(LEASE_FILE), self.current()

    def acquire(self) -> None:
        version, held = self._read()
        if held is not None and not is_gone(held, self.stale_after):
            if held.host == socket.gethostname():
                raise self._in_use(held)
            version, held = self._watch(held)
        if held is not None:
            log.warning("taking over %s from %s, which has ended", self.output.url, held.describe())
        try:
            self.heartbeat.write(version)
        except Changed:
            raise self._taken(self.current()) from None
        try:
            if version is None:  # the store could not check the write: read it back
                time.sleep(SETTLE_SECONDS)
                held = self.current()
                if held is None or held.run_id != self.holder.run_id:
                    raise self._taken(held)
            self.heartbeat.start()
        except BaseException:  # a signal or a lost race: leave nothing of ours behind
            self.release()
            raise

    def _watch(self, held: Holder) -> tuple[str | None, Holder | None]:
        """Watch a holder on another host until its heartbeat advances (refused) or ages past the
        stale limit, or it releases the lease; return what was read last."""
        log.warning("%s is held by %s on another host: watching its heartbeat for up to %.0f s", self.output.url,
                    held.describe(), self.stale_after - (time.time() - held.heartbeat))
        while True:
            time.sleep(watch_seconds(self.stale_after))
            version, now = self._read()
            if now is None or is_gone(now, self.stale_after):
                return version, now
            if not now.is_same_process(held) or now.heartbeat != held.heartbeat:
                raise self._in_use(now)

    def _in_use(self, held: Holder) -> OutputInUse:
        return OutputInUse(f"{self.output.url} is held by {held.describe()}; wait for it to end, or choose "
                           "another --output")

    def _taken(self, held: Holder | None) -> OutputInUse:
        return OutputInUse(f"{self.output.url} was taken by {held.describe() if held else 'another run'} at the "
                           "same moment; choose another --output")

    def ensure_held(self, writing: str) -> None:
        """Raise `OutputInUse` unless this run may still write its output (`why_not_held`), by the
        lease read now: the driver's writes after the stream (`writing` says which) are not gated
        by the workers' watch, whose last read may be seconds old, so a run whose last batches
        beat that read stops here."""
        lost = why_not_held(self.output, self.holder.run_id, self.current(), self.stale_after)
        if lost is not None:
            raise OutputInUse(f"{lost}; this run stops before writing {writing}, and what it committed is kept")

    def release(self) -> None:
        self.heartbeat.stop()

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class LeaseWatch:
    """Whether a run still holds its output, as its workers must know before each write: the
    lease, read by a thread every few seconds, names the run, with a heartbeat younger than half
    the stale limit (a read that fails leaves the last record read, which ages)."""

    def __init__(self, output: Output, run_id: str, stale_after: float = STALE_AFTER_SECONDS):
        self.output, self.run_id, self.stale_after = output, run_id, stale_after
        self.held: Holder | None = read_holder(output, LEASE_FILE)
        threading.Thread(target=self._read, name="lease-watch", daemon=True).start()

    def _read(self) -> None:
        while True:
            time.sleep(watch_seconds(self.stale_after))
            try:
                self.held = read_holder(self.output, LEASE_FILE)
            except OSError as error:
                log.warning("could not read %s in %s: %s", LEASE_FILE, self.output.url, error)

    def lost(self) -> str | None:
        """Why the run may no longer write its output, or None while it holds it."""
        return why_not_held(self.output, self.run_id, self.held, self.stale_after)


def why_not_held(output: Output, run_id: str, held: Holder | None, stale_after: float) -> str | None:
    """Why the run `run_id` may no longer write its output, given the lease's record `held`, or
    None while it may: the record names the run, with a heartbeat younger than half the stale
    limit, so the run stops before any successor may take over."""
    if held is None or held.run_id != run_id:
        return f"{output.url} is now held by {held.describe() if held else 'no run'}"
    age = time.time() - held.heartbeat
    if age >= stale_after / 2:
        return (f"this run's lease on {output.url} was last renewed {age:.0f} s ago, and another run may take it "
                f"over after --lease-timeout {stale_after:g} s")
    return None
