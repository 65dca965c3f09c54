"""The HTTP port: known paths answer, others 404; a fixed pool of workers however many clients."""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from forecaster.metrics import Metrics
from forecaster.web import HttpEndpoint
from tests.helpers import wait_until


def endpoint(workers: int = 2, timeout: float = 10.0) -> tuple[HttpEndpoint, Metrics]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    http = HttpEndpoint(
        registry,
        "127.0.0.1",
        0,
        lambda: (True, "alive"),
        lambda: (False, "broker not connected"),
        workers=workers,
        timeout=timeout,
        on_refused=metrics.http_refused.inc,
        on_rejected=lambda code: metrics.http_rejected.labels(str(code)).inc(),
    )
    http.start()
    return http, metrics


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def answers(port: int, path: str) -> int | None:
    """``status``, or None while the server still refuses (closes) new connections: the pool is
    busy with the slow ones being closed (a loaded machine took longer: loaded round 23)."""
    try:
        return status(port, path)
    except OSError:
        return None


def test_known_paths_answer_and_others_are_404() -> None:
    http, _ = endpoint()
    try:
        assert status(http.port, "/metrics") == 200
        assert status(http.port, "/healthz") == 200
        assert status(http.port, "/readyz") == 503  # its reason: see the body
        for path in ("/", "/metrics/", "/metricsx", "/favicon.ico", "/live/", "/../etc/passwd"):
            assert status(http.port, path) == 404, path
    finally:
        http.close()


def test_many_slow_connections_do_not_grow_threads() -> None:
    """300 clients that send half a request line and wait: the threads stay the pool's, the
    ones beyond the queue are refused and counted, and once they leave the port answers again."""
    http, metrics = endpoint(workers=2, timeout=30.0)
    try:
        assert status(http.port, "/metrics") == 200
        threads = threading.active_count()
        server = http.server
        slow = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", http.port))
            sock.sendall(b"GET /metr")  # and nothing more
            slow.append(sock)
        # every connection is with a worker, queued, or refused
        held = len(server.workers) + server.queue_depth
        wait_until(lambda: server.refused >= 300 - held, "the connections beyond the pool refused")
        assert threading.active_count() == threads
        assert metrics.registry.get_sample_value("forecaster_http_refused_total") == server.refused
        for sock in slow:
            sock.close()
        wait_until(lambda: answers(http.port, "/healthz") == 200, "the port answering again", 20)
        assert threading.active_count() == threads
    finally:
        http.close()


def test_a_silent_connection_is_closed_after_the_timeout() -> None:
    http, _ = endpoint(workers=1, timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", http.port)) as sock:
            sock.settimeout(10)
            assert sock.recv(1024) == b""  # closed by the server, its worker free again
        assert status(http.port, "/healthz") == 200
    finally:
        http.close()


def test_a_trickling_client_is_cut_at_its_deadline() -> None:
    """One byte every 0.2 s never trips the 1 s idle timeout; the deadline (3 timeouts) cuts it."""
    http, _ = endpoint(workers=1, timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", http.port)) as sock:
            sock.settimeout(0.2)
            cut = False
            for byte in itertools.cycle(b"GET /metrics HTTP/1.0\r\nX-Slow: "):
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(1024) == b"":
                        cut = True
                        break
                except TimeoutError:
                    continue  # nothing from the server yet: keep trickling
                except OSError:
                    cut = True
                    break
            assert cut
        assert status(http.port, "/healthz") == 200  # its worker free again
    finally:
        http.close()


def test_close_does_not_wait_for_slow_clients() -> None:
    http, _ = endpoint(workers=2, timeout=3600.0)
    slow = [socket.create_connection(("127.0.0.1", http.port)) for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(b"GET /met")
        wait_until(lambda: http.server.busy_workers == 2, "both workers on a slow client")
        http.close()  # would wait an hour per worker if it waited for them
        assert not any(thread.is_alive() for thread in http.server.workers)
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_do_not_break_the_server(method: str) -> None:
    http, _ = endpoint()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{http.port}/nothing", data=b"x", method=method
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 404
        assert status(http.port, "/healthz") == 200
    finally:
        http.close()


def garbage_requests(count: int, seed: int = 0) -> list[bytes]:
    """Request lines and headers a fuzzer would send: random bytes, huge lines, odd methods,
    paths with dots and escapes, truncated requests."""
    rng = random.Random(seed)
    paths = [
        "/",
        "/metrics",
        "/live/",
        "/live/stream.json?name=%00",
        "/%2e%2e/",
        "/" + "a" * 70_000,
    ]
    methods = ["GET", "HEAD", "POST", "BREW", "", "G\x00ET", "GET " * 50]
    requests = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            requests.append(rng.randbytes(rng.randrange(1, 2048)))
        elif kind == 1:
            line = f"{rng.choice(methods)} {rng.choice(paths)} HTTP/1.{rng.randrange(3)}\r\n"
            headers = "".join(
                f"X-{i}: {'v' * rng.randrange(100)}\r\n" for i in range(rng.randrange(50))
            )
            requests.append((line + headers + "\r\n").encode("latin-1"))
        elif kind == 2:
            requests.append(f"GET {rng.choice(paths)}".encode()[: rng.randrange(1, 20)])
        else:
            requests.append(
                b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n" + rng.randbytes(64)
            )
    return requests


@pytest.mark.parametrize(
    "count", [pytest.param(100, id="100"), pytest.param(1000, id="1000", marks=pytest.mark.fuzz)]
)
def test_fuzzed_requests_never_break_the_server(count: int) -> None:
    """Whatever arrives, the server answers or closes, keeps its threads, and every request it
    answers 4xx is counted in ``forecaster_http_rejected_total`` under its status. (A request
    without a version is HTTP/0.9: its answer has no status line, so the client sees fewer codes
    than the server counts.)"""
    http, metrics = endpoint(workers=2, timeout=0.5)
    try:
        threads = threading.active_count()
        seen: Counter[str] = Counter()  # status -> requests the client saw it for
        for payload in garbage_requests(count):
            received = b""
            with socket.create_connection(("127.0.0.1", http.port)) as sock:
                sock.settimeout(10)
                with contextlib.suppress(OSError):
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    while chunk := sock.recv(65536):  # until the server closes
                        received += chunk
            if received.startswith(b"HTTP/"):
                seen[received[9:12].decode("latin-1")] += 1
        refused = {code: n for code, n in seen.items() if code.startswith("4")}
        assert refused, "no fuzzed request was refused: the fuzzer sent nothing malformed"

        def counted() -> dict[str, float]:
            return {
                sample.labels["code"]: sample.value
                for sample in metrics.http_rejected.collect()[0].samples
                if sample.name.endswith("_total")
            }

        wait_until(
            lambda: all(counted().get(code, 0) >= n for code, n in refused.items()),
            "every 4xx answer counted",
        )
        assert sum(counted().values()) + seen["200"] <= count
        assert status(http.port, "/healthz") == 200
        assert status(http.port, "/metrics") == 200
        assert threading.active_count() == threads
    finally:
        http.close()
