"""The daemon's HTTP port: a WSGI server with a fixed pool of worker threads, its router, and the
``HttpEndpoint`` that serves ``/metrics``, ``/healthz`` and ``/readyz`` on it.

The port serves ``/metrics``, ``/healthz``, ``/readyz`` and (opt-in) the live page; every other
path is a 404. prometheus-client's ``ThreadingWSGIServer`` starts a thread per connection with no
cap (300 slow connections made 304 threads), so the server here accepts on one thread and hands
each connection to a fixed pool through a bounded queue: a connection silent for ``timeout``
seconds is closed, one still open after three timeouts in all (a client trickling bytes) is cut,
one that finds the queue full is refused at once (counted), and the number of threads never
moves, however many clients come or how slowly they talk.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]
DEADLINE_TIMEOUTS = 3  # a connection is cut after this many idle timeouts in all


class QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every few seconds would flood it); a malformed request
    (bad request line, headers too long or too many) is answered and counted, not logged."""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        on_rejected = getattr(self.server, "on_rejected", None)
        if on_rejected is not None:
            on_rejected(code)
        super().send_error(code, message, explain)


class PooledWSGIServer(WSGIServer):
    """``WSGIServer`` whose connections are served by ``workers`` threads, queued at most
    ``pending`` deep; ``on_refused`` is called for each connection turned away."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the kernel's listen backlog

    def __init__(
        self,
        address: tuple[str, int],
        app: WsgiApp,
        *,
        workers: int = 4,
        pending: int | None = None,
        timeout: float = 10.0,
        on_refused: Callable[[], None] | None = None,
        on_rejected: Callable[[int], None] | None = None,
    ) -> None:
        self.timeout_s = timeout
        self.on_refused = on_refused
        self.on_rejected = on_rejected  # called with the status of each request answered 4xx
        self.refused = 0
        self._pending: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(
            maxsize=pending if pending is not None else 4 * workers
        )
        # Connections a worker is on, with the time they must be done by: a client trickling a
        # byte now and then never trips the idle timeout, so each connection also gets
        # ``DEADLINE_TIMEOUTS`` idle timeouts in all, enforced by one reaper thread.
        self._serving: dict[socket.socket, float] = {}
        self._serving_lock = threading.Lock()
        self._closing = threading.Event()
        self.workers: list[threading.Thread] = []
        self.reaper: threading.Thread | None = None
        # Binds (and on failure calls server_close, which needs the attributes above): after them
        super().__init__(address, QuietHandler)
        self.set_app(app)
        self.workers = [
            threading.Thread(target=self._work, name=f"http-{i}", daemon=True)
            for i in range(workers)
        ]
        self.reaper = threading.Thread(target=self._reap, name="http-reaper", daemon=True)
        for thread in (*self.workers, self.reaper):
            thread.start()

    @property
    def queue_depth(self) -> int:
        """How many accepted connections may wait for a worker before more are refused."""
        return self._pending.maxsize

    @property
    def busy_workers(self) -> int:
        """Workers on a connection now (the rest wait for one)."""
        with self._serving_lock:
            return len(self._serving)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Runs on the accepting thread: queue the connection, or refuse it when the queue is full."""
        request.settimeout(self.timeout_s)  # a slow or silent client frees its worker
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:
            self.refused += 1
            if self.on_refused is not None:
                self.on_refused()
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, address = item
            with self._serving_lock:
                self._serving[request] = time.monotonic() + DEADLINE_TIMEOUTS * self.timeout_s
            try:
                self.finish_request(request, address)
            except Exception:
                self.handle_error(request, address)
            finally:
                with self._serving_lock:
                    self._serving.pop(request, None)
                self.shutdown_request(request)

    def _reap(self) -> None:
        """Cut connections past their deadline (their worker's read or write then fails)."""
        while not self._closing.wait(min(1.0, self.timeout_s / 2)):
            now = time.monotonic()
            with self._serving_lock:
                late = [sock for sock, deadline in self._serving.items() if deadline < now]
                for sock in late:
                    self._serving[sock] = float("inf")  # once
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or hung up is routine: a debug line, not a traceback."""
        log.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()
        while True:  # connections still queued are closed unanswered
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        with self._serving_lock:  # a worker waiting on a slow client returns at once
            for request in self._serving:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
        for _ in self.workers:
            self._pending.put(None)
        for thread in self.workers:
            thread.join(self.timeout_s)
        if self.reaper is not None:
            self.reaper.join(self.timeout_s)


def not_found(environ: dict, start_response: Callable) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"not found\n"]


def router(routes: dict[str, WsgiApp]) -> WsgiApp:
    """One WSGI app over exact paths (``/live/`` and ``/live`` are different paths); others 404.

    >>> app = router({"/a": lambda environ, start: [b"a"]})
    >>> app({"PATH_INFO": "/b"}, lambda status, headers: print(status))
    404 Not Found
    [b'not found\\n']
    """

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        return routes.get(environ.get("PATH_INFO", "/"), not_found)(environ, start_response)

    return app


def counting_client_errors(app: WsgiApp, on_rejected: Callable[[int], None]) -> WsgiApp:
    """``app``, calling ``on_rejected(status)`` for each answer in 4xx (an unknown path: 404).

    >>> seen = []
    >>> counted = counting_client_errors(router({}), seen.append)
    >>> counted({"PATH_INFO": "/x"}, lambda status, headers: None), seen
    ([b'not found\\n'], [404])
    """

    def counted(environ: dict, start_response: Callable) -> Iterable[bytes]:
        def start(status: str, headers: list, *args: Any) -> Any:
            if status.startswith("4"):
                on_rejected(int(status[:3]))
            return start_response(status, headers, *args)

        return app(environ, start)

    return counted


class HttpEndpoint:
    """``/metrics`` (prometheus-client), ``/healthz`` (alive), ``/readyz`` (connected and serving),
    and any extra ``routes`` (the live page); other paths 404. A fixed pool of ``workers`` threads
    answers (``web.PooledWSGIServer``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        *,
        routes: dict[str, WsgiApp] | None = None,
        workers: int = 4,
        timeout: float = 10.0,
        on_refused: Callable[[], None] | None = None,
        on_rejected: Callable[[int], None] | None = None,
    ) -> None:
        def probe(check: Callable[[], tuple[bool, str]]) -> WsgiApp:
            def app(environ: dict, start_response: Callable) -> list[bytes]:
                ok, detail = check()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{'ok' if ok else 'not ok'}: {detail}\n".encode()]

            return app

        app = router(
            {
                "/metrics": make_wsgi_app(registry),
                "/healthz": probe(healthy),
                "/readyz": probe(ready),
                **(routes or {}),
            }
        )
        if on_rejected is not None:
            app = counting_client_errors(app, on_rejected)
        self.server = PooledWSGIServer(
            (host, port),
            app,
            workers=workers,
            timeout=timeout,
            on_refused=on_refused,
            on_rejected=on_rejected,
        )
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
