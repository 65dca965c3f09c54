"""The live page: a reader of each tick's forecast columns, served on the metrics port.

Beside ``metrics`` on the data flow: the engine thread folds a tick's ``ForecastColumns`` into
per-stream rows with a few NumPy calls (no Python work per sample), and the HTTP workers read
them as JSON. Each stream keeps a ring of its last ``history`` samples (value, the forecast and
interval published with it for the next one, anomaly score, time) and the same rolling numbers
as its ``forecaster_stream_*`` series (rolling MAE, skill against the last value, interval
coverage, anomaly count), for at most ``max_streams`` streams (later ones are not shown). The
page itself (``forecaster/static/``) is plain HTML, CSS and JavaScript shipped in the package: no
build step, no CDN; it polls the JSON every half second.

Paths: ``/live/`` (the page; ``/live`` redirects there), ``/live/live.js``, ``/live/live.css``,
``/live/streams.json`` (one row per stream, as columns), ``/live/stream.json?name=S`` (one
stream's ring, oldest first; without ``name``, the first stream by name).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from itertools import repeat
from urllib.parse import parse_qs

import numpy as np
import orjson

from forecaster import __version__
from forecaster.engine import ForecastColumns
from forecaster.metrics import _LabelTable
from forecaster.web import WsgiApp, not_found

# Ring fields, per sample: the value, the forecast and interval made with it for the next value,
# its anomaly score. float32 halves the ring (display only; metrics keep float64).
FIELDS = ("value", "prediction", "lower", "upper", "anomaly")
# The columns of a tick the page reads, in the order ``_fold`` unpacks them.
COLUMNS = (
    "value",
    "prediction",
    "error",
    "naive_error",
    "lower",
    "upper",
    "anomaly",
    "covered",
    "seq",
)
# Ticks kept for the page before the engine thread folds them itself (nobody reading): a fold's
# cost is mostly per NumPy call, so many ticks at once cost about what one does.
FOLD_TICKS, FOLD_ROWS = 64, 16_384
ASSETS = {
    "/live/": ("index.html", "text/html; charset=utf-8"),
    "/live/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live/live.css": ("live.css", "text/css; charset=utf-8"),
}


class LiveView:
    """Recent samples and rolling numbers of the first ``max_streams`` streams.

    >>> import numpy as np
    >>> from forecaster.engine import ForecastColumns
    >>> view = LiveView(max_streams=1, history=2)
    >>> ones = np.ones(3)
    >>> cols = ForecastColumns(["a", "b", "a"], np.arange(3), np.arange(3), np.full(3, np.nan),
    ...     np.array([1.0, 2.0, 3.0]), ones, ones, ones, ones, ones, ones, ones > 0, ones > 0, 0)
    >>> view.observe(cols)  # "b" is beyond max_streams: not kept
    >>> view.stream("a")["points"]["value"], view.names
    ([1.0, 3.0], ['a'])
    """

    def __init__(
        self,
        *,
        max_streams: int = 1000,
        history: int = 300,
        error_halflife: float = 100.0,
        coverage_halflife: float = 1000.0,
        anomaly_threshold: float = 0.9995,
        coverage_target: float = 0.9,
    ) -> None:
        self.max_streams = max_streams
        self.history = history
        self.alpha = 1.0 - 0.5 ** (1.0 / error_halflife)
        self.coverage_alpha = 1.0 - 0.5 ** (1.0 / coverage_halflife)
        self.anomaly_threshold = anomaly_threshold
        self.coverage_target = coverage_target
        self.table = _LabelTable(max_streams)
        self.names = self.table.names  # row -> stream
        self.index = self.table.index  # stream -> row
        # np.zeros: pages are only touched as streams arrive (rows fill from the front)
        self.ring = np.zeros((max_streams, history, len(FIELDS)), dtype=np.float32)
        self.ts = np.zeros((max_streams, history))  # the sample's ts, else the time it was ticked
        self.seq = np.zeros((max_streams, history), dtype=np.int64)
        self.written = np.zeros(max_streams, dtype=np.int64)  # samples ever written per row
        self.ticks = 0
        self._pending: deque[tuple[ForecastColumns, float]] = deque()  # ticks not folded yet
        self._pending_rows = 0  # rows in them (engine thread's count)
        self._lock = threading.Lock()  # folds and reads, from the engine thread or HTTP workers

    # -- engine side ------------------------------------------------------------------------
    def observe(self, f: ForecastColumns, now: float | None = None) -> None:
        """Keep a tick's forecasts for the page: on the engine thread only a reference is kept
        (the columns are the tick's own arrays, never written again); they are folded in when
        the page reads, or every ``FOLD_TICKS`` ticks or ``FOLD_ROWS`` rows when nobody does,
        many ticks in one set of NumPy calls."""
        if not len(f):
            return
        self._pending.append((f, time.time() if now is None else now))
        self._pending_rows += len(f)
        if len(self._pending) >= FOLD_TICKS or self._pending_rows >= FOLD_ROWS:
            self._pending_rows = 0
            self.fold_pending()

    def fold_pending(self) -> None:
        """Fold the kept ticks into the rows and rings, in tick order (either thread)."""
        with self._lock:
            ticks = []
            while self._pending:
                ticks.append(self._pending.popleft())
            if ticks:
                self._fold(ticks)

    def _fold(self, ticks: list[tuple[ForecastColumns, float]]) -> None:
        """A dict lookup per stream in C (``map``), the rest NumPy over all the ticks at once."""
        if len(ticks) == 1:
            f, now = ticks[0]
            streams = f.streams
            ts = np.where(np.isnan(f.ts), now, f.ts)
            cols = [getattr(f, name) for name in COLUMNS]
        else:
            streams = [s for f, _ in ticks for s in f.streams]
            ts = np.concatenate([np.where(np.isnan(f.ts), now, f.ts) for f, now in ticks])
            cols = [np.concatenate([getattr(f, name) for f, _ in ticks]) for name in COLUMNS]
        index = self.index
        rows = np.fromiter(map(index.get, streams, repeat(-1)), np.int64, len(streams))
        if len(self.names) < self.max_streams and (rows < 0).any():
            for i in np.flatnonzero(rows < 0).tolist():
                stream = streams[i]
                row = index.get(stream)
                if row is None:
                    if len(self.names) >= self.max_streams:
                        break
                    row = index[stream] = len(self.names)
                    self.names.append(stream)
                rows[i] = row
            unknown = np.flatnonzero(rows < 0)  # beyond max_streams, or given a row just now
            found = map(index.get, [streams[i] for i in unknown.tolist()], repeat(-1))
            rows[unknown] = np.fromiter(found, np.int64, len(unknown))
        keep = np.flatnonzero(rows >= 0)
        if not len(keep):
            return
        if len(keep) < len(rows):
            rows, ts, cols = rows[keep], ts[keep], [c[keep] for c in cols]
        value, prediction, error, naive, lower, upper, anomaly, covered, seq = cols
        self.table.fold(
            rows,
            value,
            prediction,
            error,
            naive,
            lower,
            upper,
            anomaly,
            np.where(np.isnan(error), np.nan, covered),  # covered means nothing without an error
            alpha=self.alpha,
            coverage_alpha=self.coverage_alpha,
            threshold=self.anomaly_threshold,
        )
        # A stream's samples take consecutive places in its ring, in order.
        place = (self.written[rows] + _rank_within(rows)) % self.history
        self.ring[rows, place] = np.stack([value, prediction, lower, upper, anomaly], axis=1)
        self.ts[rows, place] = ts
        self.seq[rows, place] = seq
        self.written += np.bincount(rows, minlength=self.max_streams)
        self.ticks += len(ticks)

    # -- readers (HTTP workers) ---------------------------------------------------------------
    def streams(self) -> dict[str, object]:
        """Every kept stream's numbers, as columns (NaN becomes null in JSON)."""
        self.fold_pending()
        with self._lock:
            n = len(self.names)
            t = self.table
            rolling, has_error = t.rolling[:n].copy(), t.rolling_n[:n] > 0
            interval, has_interval = t.interval[:n].copy(), t.interval_n[:n] > 0
            samples, anomalies = t.samples[:n].tolist(), t.anomalies[:n].tolist()
            last = t.last[:n].copy()
            names, ticks = list(self.names), self.ticks
        with np.errstate(divide="ignore", invalid="ignore"):
            skill = np.where(rolling[:, 3] > 0, 1.0 - rolling[:, 1] / rolling[:, 3], np.nan)
        return {
            "version": __version__,
            "ticks": ticks,
            "max_streams": self.max_streams,
            "coverage_target": self.coverage_target,
            "names": names,
            "samples": samples,
            "anomalies": anomalies,
            "mae": np.where(has_error, rolling[:, 0], np.nan).tolist(),
            "naive_mae": np.where(has_error, rolling[:, 2], np.nan).tolist(),
            "skill": np.where(has_error, skill, np.nan).tolist(),
            "coverage": np.where(has_interval, interval[:, 0], np.nan).tolist(),
            "last_value": last[:, 0].tolist(),
            "anomaly": last[:, 4].tolist(),
        }

    def stream(self, name: str) -> dict[str, object] | None:
        """One stream's ring, oldest first; None for a stream not kept. No name: the first
        stream by name (the page's first row), so the page need not wait for the table."""
        self.fold_pending()
        with self._lock:
            if not name:
                if not self.names:  # nothing yet: an empty chart, not an error
                    return {"name": "", "samples": 0, "anomalies": 0,
                            "threshold": self.anomaly_threshold,
                            "points": {key: [] for key in (*FIELDS, "ts", "seq")}}  # fmt: skip
                name = min(self.names)
            row = self.index.get(name)
            if row is None:
                return None
            written = int(self.written[row])
            count = min(written, self.history)
            order = (written - count + np.arange(count)) % self.history
            ring = self.ring[row, order].astype(np.float64)
            ts, seq = self.ts[row, order], self.seq[row, order]
            samples, anomalies = int(self.table.samples[row]), int(self.table.anomalies[row])
        points: dict[str, list] = {key: ring[:, i].tolist() for i, key in enumerate(FIELDS)}
        points["ts"] = ts.tolist()
        points["seq"] = seq.tolist()
        return {
            "name": name,
            "samples": samples,
            "anomalies": anomalies,
            "threshold": self.anomaly_threshold,
            "points": points,
        }

    # -- HTTP -----------------------------------------------------------------------------------
    def routes(self) -> dict[str, WsgiApp]:
        """The page's paths, for ``metrics.HttpEndpoint``."""
        routes: dict[str, WsgiApp] = {path: _asset(*asset) for path, asset in ASSETS.items()}
        routes["/live"] = _redirect("/live/")
        routes["/live/streams.json"] = self._streams_app
        routes["/live/stream.json"] = self._stream_app
        return routes

    def _streams_app(self, environ: dict, start_response: Callable) -> list[bytes]:
        return _json(start_response, self.streams())

    def _stream_app(self, environ: dict, start_response: Callable) -> list[bytes]:
        name = parse_qs(environ.get("QUERY_STRING", "")).get("name", [""])[0]
        body = self.stream(name)
        if body is None:
            return not_found(environ, start_response)
        return _json(start_response, body)


def _rank_within(rows: np.ndarray) -> np.ndarray:
    """Each entry's rank among the equal entries before it (0 when all distinct).

    >>> _rank_within(np.array([4, 2, 4, 4, 2])).tolist()
    [0, 0, 1, 2, 1]
    """
    if len(rows) < 2 or np.bincount(rows).max() <= 1:
        return np.zeros(len(rows), dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.diff(sorted_rows, prepend=-1))
    sizes = np.diff(starts, append=len(rows))
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - np.repeat(starts, sizes)
    return rank


def _json(start_response: Callable, body: object) -> list[bytes]:
    data = orjson.dumps(body)  # NaN -> null
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


def _asset(name: str, content_type: str) -> WsgiApp:
    """A file of ``forecaster/static``, read once (it ships in the package)."""
    data = resources.files("forecaster").joinpath("static", name).read_bytes()
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        # Only our own files, no inline script: a stream name can never become markup that runs.
        ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:"),
    ]

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        start_response("200 OK", headers)
        return [data]

    return app


def _redirect(location: str) -> WsgiApp:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        start_response("301 Moved Permanently", [("Location", location)])
        return [b""]

    return app
