"""One writer per output: who may take a lease, on a local filesystem and on S3 (moto's server),
where the store itself checks the conditions of every write."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace

import boto3
import pytest

from rank1_batch.config import RunConfig
from rank1_batch.output.layout import LEASE_FILE
from rank1_batch.output.lease import Heartbeat, Lease, LeaseWatch, OutputInUse, new_holder, read_holder
from rank1_batch.output.storage import ABSENT, Changed, Output


def elsewhere(run_id: str, heartbeat_age: float = 0.0):
    """A holder on another host, whose process this host cannot see."""
    now = time.time()
    return replace(new_holder(run_id), host="another-head", pid=1, heartbeat=now - heartbeat_age)


def place(output: Output, holder) -> None:
    output.write_bytes(LEASE_FILE, json.dumps(asdict(holder)).encode())


@pytest.fixture
def s3_output(s3_endpoint, request):
    bucket = f"lease-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return Output(f"s3://{bucket}/out", RunConfig(s3_endpoint_url=s3_endpoint))


def test_a_live_run_on_this_host_is_refused_at_once_and_a_dead_one_taken_over_at_once(tmp_path):
    output = Output(str(tmp_path), RunConfig())
    with Lease(output):
        started = time.monotonic()
        with pytest.raises(OutputInUse, match=f"held by run .* \\(process {os.getpid()}"):
            Lease(output).acquire()
        assert time.monotonic() - started < 1
    place(output, replace(new_holder("dead0run"), pid=2**22 + 1))  # no such process
    with Lease(output) as lease:
        assert read_holder(output, LEASE_FILE).run_id == lease.holder.run_id
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_holder_on_another_host_is_watched_until_its_heartbeat_decides(tmp_path):
    output = Output(str(tmp_path), RunConfig())
    # alive: its heartbeat advances while it is watched
    with Heartbeat(output, LEASE_FILE, elsewhere("live0run"), stale_after=2.0):
        with pytest.raises(OutputInUse, match="held by run live0run"):
            Lease(output, stale_after=2.0).acquire()
    # dead: its heartbeat stops; taken over once the heartbeat is older than the limit, not before
    place(output, elsewhere("dead0run", heartbeat_age=1.0))
    started = time.monotonic()
    with Lease(output, stale_after=2.0) as lease:
        assert 0.8 < time.monotonic() - started < 3
        assert read_holder(output, LEASE_FILE).run_id == lease.holder.run_id


def test_a_local_lease_is_created_only_where_there_is_none(tmp_path):
    output = Output(str(tmp_path), RunConfig())
    assert output.version(LEASE_FILE) == ABSENT
    output.write_bytes_if(LEASE_FILE, b"first", ABSENT)
    with pytest.raises(Changed):
        output.write_bytes_if(LEASE_FILE, b"second", ABSENT)
    assert (tmp_path / LEASE_FILE).read_bytes() == b"first"
    assert [path.name for path in tmp_path.iterdir()] == [LEASE_FILE]  # no staging file left


def test_on_s3_every_write_of_the_lease_is_conditional(s3_output):
    output = s3_output
    first = output.write_bytes_if("probe", b"first", ABSENT)
    with pytest.raises(Changed):
        output.write_bytes_if("probe", b"second", ABSENT)
    second = output.write_bytes_if("probe", b"second", first)
    with pytest.raises(Changed):  # a writer that read the first version is too late
        output.write_bytes_if("probe", b"third", first)
    with pytest.raises(Changed):
        output.remove_if("probe", first)
    output.remove_if("probe", second)
    assert not output.exists("probe")

    with Lease(output) as lease:
        assert lease.heartbeat.version  # the store checked the write: no read back was needed
        with pytest.raises(OutputInUse, match=f"held by run {lease.holder.run_id}"):
            Lease(output).acquire()
    assert not output.exists(LEASE_FILE)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_run_whose_lease_was_taken_over_leaves_its_successor_alone(store, tmp_path, request):
    """S3 refuses the renewal itself; on local disk the renewal reads the lease first."""
    output = request.getfixturevalue("s3_output") if store == "s3" else Output(str(tmp_path), RunConfig())
    lease = Lease(output, stale_after=0.4)  # renewed every 0.1 s
    lease.acquire()
    successor = elsewhere("next0run")
    place(output, successor)  # as a run that found this one's heartbeat stale would
    deadline = time.monotonic() + 10
    while not lease.heartbeat.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.heartbeat.lost.is_set()
    lease.release()
    assert read_holder(output, LEASE_FILE) == successor


def test_a_runs_workers_stop_writing_once_its_lease_is_taken_or_no_longer_renewed(tmp_path):
    output = Output(str(tmp_path), RunConfig())
    with Lease(output, stale_after=2.0) as lease:  # renewed every 0.5 s
        watch = LeaseWatch(output, lease.holder.run_id, stale_after=2.0)  # reads every 0.17 s
        time.sleep(1.2)  # past half the limit: the renewals keep the lease held
        assert watch.lost() is None
        place(output, elsewhere("next0run"))
        deadline = time.monotonic() + 5
        while watch.lost() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "held by run next0run" in watch.lost()
    # a driver that stalls: its workers stop at half the limit, before any successor may take over
    place(output, new_holder("stalled0run"))
    watch = LeaseWatch(output, "stalled0run", stale_after=2.0)
    assert watch.lost() is None
    time.sleep(1.1)
    assert "was last renewed 1 s ago" in watch.lost()


def test_a_driver_that_lost_its_lease_writes_nothing_more(tmp_path):
    """Its last batches may commit before the workers' watch reads the lease again: the driver
    reads it itself before each of its own writes, and is refused at once."""
    output = Output(str(tmp_path), RunConfig())
    lease = Lease(output)  # renewed every 10 s: the renewal has not noticed by the time of the check
    lease.acquire()
    lease.ensure_held("ranked/ and run.trec")
    place(output, elsewhere("next0run"))
    with pytest.raises(OutputInUse, match="held by run next0run .*; this run stops before writing ranked/"):
        lease.ensure_held("ranked/ and run.trec")
    lease.release()
    assert read_holder(output, LEASE_FILE).run_id == "next0run"
