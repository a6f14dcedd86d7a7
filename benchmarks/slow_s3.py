"""moto's S3 server that counts the requests it receives and can answer each one late.

    .venv/bin/python benchmarks/slow_s3.py --port 5000 [--latency-ms 100]

Started in a process of its own by `serve()`. Every request is counted by HTTP method, from any
client (a driver, Ray workers), and waits `--latency-ms` before moto sees it, as a distant object
store would. GET /_bench/requests answers the counts as JSON, without counting or waiting.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import click

COUNTS_PATH = "/_bench/requests"  # bucket names cannot start with "_": no S3 request has this path
# Credentials of the benchmark's server only; s3fs and the Ray workers read them from the environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rank1-bench-key", "AWS_SECRET_ACCESS_KEY": "rank1-bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
START_SECONDS = 30
# The counter is read on 127.0.0.1, never through a proxy the environment may name.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CountingLatency:
    """WSGI middleware: counts each request by method and sleeps before passing it on."""

    def __init__(self, app, latency_ms: float):
        self.app, self.latency_seconds = app, latency_ms / 1000
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == COUNTS_PATH:
            with self.lock:
                body = json.dumps(self.counts).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with self.lock:
            self.counts[environ["REQUEST_METHOD"]] += 1
        if self.latency_seconds:
            time.sleep(self.latency_seconds)  # werkzeug serves each request in a thread: they wait in parallel
        return self.app(environ, start_response)


@dataclass(frozen=True)
class Server:
    endpoint: str

    def requests(self) -> Counter:
        """The requests received so far, by HTTP method."""
        with LOCAL.open(self.endpoint + COUNTS_PATH, timeout=10) as answer:
            return Counter(json.load(answer))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve(latency_ms: float):
    """The server in a process of its own on 127.0.0.1, stopped on leaving."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--latency-ms", str(latency_ms)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(f"http://127.0.0.1:{port}")
    try:
        wait_until_up(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(server: Server, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            server.requests()
            return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the S3 server on {server.endpoint} did not start")
            time.sleep(0.2)


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--latency-ms", type=float, default=0, show_default=True, help="Added before every request.")
def main(port: int, latency_ms: float) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request would cost the server more than moto
    app = CountingLatency(DomainDispatcherApplication(create_backend_app), latency_ms)
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
