"""The server tests' helpers: the app on 127.0.0.1 on a free port in a thread (``Running``), and what an engine still
holds (``held``: all zero when idle)."""

import socket
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from jkv.server import ServerOptions, create_app, make_server

MAX_LEN = 64
NUM_SLOTS = 8


def held(engine) -> dict:
    """What the engine still holds: requests, slots, cache positions, pages and pins (all zero when idle)."""
    cache = engine.cache
    return {
        "pending": engine.num_pending,
        "active": engine.num_active,
        "work": engine.has_work(),
        "lengths": int(cache.lengths.sum()),
        "pages": int((cache.refcounts > 0).sum()),
        "pins": int(cache.pins.sum()),
    }


IDLE = {"pending": 0, "active": 0, "work": False, "lengths": 0, "pages": 0, "pins": 0}


def metric_values(url) -> dict:
    """``{(sample name, sorted labels): value}`` of the server's /metrics, through prometheus_client's parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Running:
    """A server in a thread: ``url`` (``http://127.0.0.1:PORT``), ``app``, ``server`` (a ``DrainingServer``)."""

    def __init__(self, engine, tokenizer, options: ServerOptions, drain_s: float = 10.0):
        self.app = create_app(engine, tokenizer, options)
        sock = free_port_socket()
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server(
            self.app, "127.0.0.1", port, drain_s=drain_s, log_level="warning", configure_logging=False
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def worker(self):
        return self.app.state.worker

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Poll (on the engine's thread) until no request is outstanding; what the engine then holds."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.worker.call(held)
            if (self.worker.outstanding == 0 and not state["work"]) or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")
