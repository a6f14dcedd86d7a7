"""One writer per output: a run holds `_lease.json` in its output while it runs.

The lease names its holder (run id, host, process id and that process's start time) and carries a
heartbeat that a thread renews. Another run is refused while the holder is alive. A holder is
known to be gone when its heartbeat is older than the stale limit, or at once when it ran on this
host and its process no longer exists (or the id now belongs to a younger process), so a re-run
after a kill does not wait.

Taking a lease is a read, then a write, then a read back. On a local filesystem or any store
without conditional writes, two runs that start within the same instant can both read "free";
the read back, after a short settle, catches all but a write that lands in between. Object stores
that offer conditional writes could close that gap; the lease does not rely on one.
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

from ..config import JobError
from .storage import Output

LEASE_FILE = "_lease.json"
# A heartbeat renewed this often stays well inside any sensible stale limit.
HEARTBEAT_SECONDS = 15.0
# Long enough to outlast a slow object store's pauses; short enough that a RayJob retry on a new
# head (which cannot see the old head's processes) waits a couple of minutes, not its retries.
STALE_AFTER_SECONDS = 120.0
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
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def write(self) -> None:
        self.output.write_bytes(self.relative, json.dumps(asdict(self.holder)).encode())

    def start(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="heartbeat", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(min(HEARTBEAT_SECONDS, self.stale_after / 4)):
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                self.write()
            except OSError as error:  # a missed beat is not fatal; the stale limit allows several
                log.warning("could not renew %s in %s: %s", self.relative, self.output.url, error)

    def stop(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
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

    def acquire(self) -> None:
        held = self.current()
        if held is not None and held.run_id != self.holder.run_id:
            if not is_gone(held, self.stale_after):
                raise OutputInUse(f"{self.output.url} is held by {held.describe()}; wait for it to end, or "
                                  "choose another --output")
            log.warning("taking over %s from %s, which has ended", self.output.url, held.describe())
        self.heartbeat.write()
        try:
            time.sleep(SETTLE_SECONDS)
            held = self.current()
            if held is None or held.run_id != self.holder.run_id:
                raise OutputInUse(f"{self.output.url} was taken by {held.describe() if held else 'another run'} "
                                  "at the same moment; choose another --output")
            self.heartbeat.start()
        except BaseException:  # a signal or a lost race: leave nothing of ours behind
            self.release()
            raise

    def release(self) -> None:
        self.heartbeat.stop()

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
