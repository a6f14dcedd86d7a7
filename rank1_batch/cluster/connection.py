"""Which Ray a run joins, and the authentication token its clients send.

A run joins the cluster of `--ray-address`, else of `RAY_ADDRESS` (set for submitted jobs and
by the RayJob), else starts a Ray of its own: never the cluster that some earlier `ray start`
recorded on this machine, which may be long dead. A cluster that does not answer fails the run
within CONNECT_TIMEOUT_SECONDS, naming the address.

Ray 2.60 heads may require a token (token authentication). Ray's clients send one only with
RAY_AUTH_MODE=token, and take it, in this order, from RAY_AUTH_TOKEN, from the file that
RAY_AUTH_TOKEN_PATH names, or from ~/.ray/auth_token. The Jobs API client always sends a token
when there is one (a head without authentication ignores it). A driver sends one only to a head
that requires it: a driver in token mode on a head without authentication connects and runs
tasks, but its actors never start.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ..config import JobConfig, JobError, RunConfig

log = logging.getLogger(__name__)

# Seconds a cluster has to answer a first call; past it the run fails rather than retry for minutes.
CONNECT_TIMEOUT_SECONDS = 10.0
TOKEN_PLACES = "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token"


class ClusterError(JobError):
    """A Ray cluster that cannot be joined or used; the message names it and says why."""


def ray_address(run: RunConfig) -> str:
    """The address ray.init is given: --ray-address, else RAY_ADDRESS, else "local", a Ray of the
    run's own (ray.init without an address would join whatever /tmp/ray/ray_current_cluster names)."""
    return run.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def is_own_cluster(run: RunConfig) -> bool:
    """Whether the run starts the Ray it runs on (which cannot grow), rather than joining a cluster."""
    return ray_address(run) == "local"


def token_source(environ: Mapping[str, str]) -> str | None:
    """Where Ray would take the authentication token from, as Ray 2.60's token loader looks for
    it (RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, the first that is set
    deciding), or None when there is no token."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN" if environ["RAY_AUTH_TOKEN"].strip() else None
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = environ["RAY_AUTH_TOKEN_PATH"]
        if not _first_line(path):
            # Ray fails on it too, but with its whole token-auth help text.
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH is {path}, which cannot be read or is empty")
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path(environ.get("HOME") or ".") / ".ray" / "auth_token"
    return str(default) if _first_line(default) else None


def _first_line(path) -> str:
    """The token in a file as Ray reads it: the first line, without surrounding whitespace."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def use_auth_token() -> str | None:
    """Have Ray's clients in this process send the authentication token, if there is one and
    RAY_AUTH_MODE does not say otherwise; returns where the token comes from, None when none is
    sent. Sets RAY_AUTH_MODE=token when it is unset, as Ray's own CLI needs."""
    mode = os.environ.get("RAY_AUTH_MODE")
    source = token_source(os.environ)
    if source is None or (mode is not None and mode.lower() != "token"):
        return None
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:
            # Ray reads the mode once, at import: re-read it, as Ray does when it turns token mode on.
            from ray._raylet import Config

            Config.initialize("")
        log.debug("sending the Ray authentication token from %s", source)
    return source


def token_refused(address: str | None, source: str | None) -> str:
    """One line on a cluster that refused this client's token, or its lack of one."""
    cluster = f"the Ray cluster at {address}" if address else "the Ray cluster"
    if source is not None:
        return f"{cluster} refused the authentication token from {source}"
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode and mode.lower() != "token":
        return f"{cluster} requires an authentication token, and RAY_AUTH_MODE={mode} keeps Ray from sending one"
    return f"{cluster} requires an authentication token: {TOKEN_PLACES}"


def connect(job: JobConfig) -> None:
    """Join the cluster of ray_address(job.run), or start a Ray of the run's own. A cluster that
    does not answer, or wants a token that is not there, fails it with a ClusterError."""
    import ray

    if not job.run.verbose:
        quiet_ray()
    if not ray.is_initialized():
        address = ray_address(job.run)
        if address == "local":
            log.info("starting a Ray of the run's own")
        else:
            log.info("joining the Ray cluster at %s", address)
            address = reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=job.run.verbose)
        except ConnectionError as error:  # a Ray Client server that wants a token times out after 30 s
            sent = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            hint = "" if sent else f" (no authentication token was sent: if it requires one, {TOKEN_PLACES})"
            raise ClusterError(f"cannot join the Ray cluster at {address}: {error}{hint}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = job.run.verbose


class RayNotices(logging.Filter):
    """Ray's lines that say nothing a run's user acts on: Ray Data's own progress (the run shows its
    own bar), that its progress bars are off, and that the Ray a run starts for itself uses token
    authentication (as Ray's own default: nothing to set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ray.data") and record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not (message.startswith("Progress bars disabled")
                    or record.name.endswith("authentication_token_setup"))


def quiet_ray() -> None:
    """Without --verbose, leave Ray's notices (`RayNotices`) off the terminal (Ray's own log files
    keep them), and its C++ components' log lines below fatal: among them an error-level line, at
    every engine actor's creation, that its constructor's arguments are in the object store while
    it may be restarted, which holds for every Ray Data actor pool (Ray Data puts its stage there)
    and is no fault. An explicit RAY_BACKEND_LOG_LEVEL is kept."""
    import ray.data  # noqa: F401  (sets up the ray.data logger's handlers)

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            on_terminal = getattr(handler, "stream", None) in (sys.stderr, sys.stdout)
            if on_terminal and not any(isinstance(each, RayNotices) for each in handler.filters):
                handler.addFilter(RayNotices())


def reachable(address: str) -> str:
    """The address to join, once a cluster answered there (with the token set up if it needs one).
    "auto" is the cluster that `ray start` recorded on this machine (in Ray's temp dir)."""
    if address == "auto":
        from ray._private.utils import read_ray_address

        # Not, as Ray's own "auto" may, any GCS process found running here: it may be anyone's.
        address = read_ray_address()
        if not address:
            raise ClusterError("--ray-address auto: no Ray cluster was started on this machine (ray start)")
    if address.startswith(("http://", "https://")):  # RAY_ADDRESS set for `submit` (and `ray job`)
        raise ClusterError(f"{address} is a dashboard's address: `run` joins a cluster at its GCS, host:6379")
    if "://" in address:  # a Ray Client server (ray://): its client runs no workers, a token does no harm
        _probe_port(address)
        use_auth_token()
    else:
        _check_gcs(address)
    return address


def _probe_port(address: str) -> None:
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ClusterError(f"Ray address {address}: expected scheme://host:port, e.g. ray://head:10001")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise ClusterError(f"no Ray cluster answers at {address}: {error}") from None


def _check_gcs(address: str) -> None:
    """Ask the cluster's GCS at host:port for its id, as ray.init does first: an unreachable GCS
    fails here at once instead of after minutes of retries, and the answer tells whether the
    cluster requires a token."""
    import grpc

    status = _gcs_status(address)
    if status == grpc.StatusCode.UNAUTHENTICATED and os.environ.get("RAY_AUTH_MODE") is None and use_auth_token():
        status = _gcs_status(address)
    if status == grpc.StatusCode.UNAUTHENTICATED:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        raise ClusterError(token_refused(address, token_source(os.environ) if mode.lower() == "token" else None))
    if status != grpc.StatusCode.OK:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({status.name}, after at most {CONNECT_TIMEOUT_SECONDS:g} s): "
            "--ray-address and RAY_ADDRESS take the address of the head's GCS, host:6379"
        )


def _gcs_status(address: str):
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    # Ray's own channel: TLS when RAY_USE_TLS is set, the token when this process is in token mode.
    with init_grpc_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK
