"""The live page: a reader of each tick's forecast columns, served on the metrics port.

Beside ``metrics`` on the data flow. Each stream keeps a ring of its last ``history`` samples:
the value, the forecast and interval published with it (for the next value), its anomaly score,
its error against the forecast made before it and the naive (last value) error, and whether it
fell inside the interval published before it. The engine thread only keeps a reference to each
tick's columns; they are written into the rings, many ticks in one set of NumPy calls, when the
page reads (or every ``FOLD_TICKS`` ticks when nobody does). The table's numbers are computed
when it is read, over the same window as the chart: rolling MAE and the naive MAE, skill
(1 - MSE / naive MSE), interval coverage, and the anomalies counted since start. (The
``forecaster_stream_*`` series are EWMAs with ``metrics.error_halflife``; close, not equal.) At
most ``max_streams`` streams are kept, the first seen. The page (``forecaster/static/``) is plain
HTML, CSS and JavaScript shipped in the package: no build step, no CDN; it polls the JSON.

Paths: ``/live/`` (the page; ``/live`` redirects there), ``/live/live.js``, ``/live/live.css``,
``/live/streams.json`` (one row per stream, as columns), ``/live/stream.json?name=S`` (one
stream's ring, oldest first; without ``name``, the first stream by name; ``kept`` false for a
stream not kept or not seen yet).
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
from forecaster.config import AnomalyConfig, IntervalsConfig, LiveConfig
from forecaster.records import ForecastColumns
from forecaster.web import WsgiApp

# Defaults: the config models' (one source; the daemon passes the configured values).
_LIVE, _ANOMALY, _INTERVALS = LiveConfig(), AnomalyConfig(), IntervalsConfig()
# Ring fields, per sample (float32: display only). ``covered`` is NaN where there was no error
# (the stream's first sample) and so nothing to cover.
FIELDS = ("value", "prediction", "lower", "upper", "anomaly", "error", "naive_error", "covered")
# Ticks kept by reference before the engine thread writes them itself (nobody reading): the cost
# is mostly per NumPy call, so many ticks at once cost about what one does.
FOLD_TICKS, FOLD_ROWS = 64, 16_384
ASSETS = {
    "/live/": ("index.html", "text/html; charset=utf-8"),
    "/live/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live/live.css": ("live.css", "text/css; charset=utf-8"),
}


class LiveView:
    """Recent samples and rolling numbers of the first ``max_streams`` streams.

    >>> import numpy as np
    >>> from forecaster.records import ForecastColumns
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
        max_streams: int = _LIVE.max_streams,
        history: int = _LIVE.history,
        anomaly_threshold: float = _ANOMALY.threshold,
        coverage_target: float = _INTERVALS.coverage,
    ) -> None:
        self.max_streams = max_streams
        self.history = history
        self.anomaly_threshold = anomaly_threshold
        self.coverage_target = coverage_target
        self.names: list[str] = []  # row -> stream
        self.index: dict[str, int] = {}  # stream -> row
        # np.zeros: pages are only touched as streams arrive (rows fill from the front)
        self.ring = np.zeros((max_streams, history, len(FIELDS)), dtype=np.float32)
        self.ts = np.zeros((max_streams, history))  # the sample's ts, else the time it was ticked
        self.seq = np.zeros((max_streams, history), dtype=np.int64)
        self.written = np.zeros(max_streams, dtype=np.int64)  # samples ever written per row
        self.anomalies = np.zeros(max_streams, dtype=np.int64)  # scores above the threshold
        self.ticks = 0
        self._pending: deque[tuple[ForecastColumns, float]] = deque()  # ticks not written yet
        self._pending_rows = 0  # rows in them (engine thread's count)
        self._lock = threading.Lock()  # writes and reads, from the engine thread or HTTP workers

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
        names = ("value", "prediction", "lower", "upper", "anomaly", "error", "naive_error")
        if len(ticks) == 1:
            f, now = ticks[0]
            streams = f.streams
            ts = np.where(np.isnan(f.ts), now, f.ts)
            cols = [getattr(f, name) for name in names]
            covered, seq = f.covered, f.seq
        else:
            streams = [s for f, _ in ticks for s in f.streams]
            ts = np.concatenate([np.where(np.isnan(f.ts), now, f.ts) for f, now in ticks])
            cols = [np.concatenate([getattr(f, name) for f, _ in ticks]) for name in names]
            covered = np.concatenate([f.covered for f, _ in ticks])
            seq = np.concatenate([f.seq for f, _ in ticks])
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
        block = np.empty((len(rows), len(FIELDS)), dtype=np.float32)  # (samples, fields)
        for i, column in enumerate(cols):
            block[:, i] = column
        block[:, 7] = np.where(np.isnan(cols[5]), np.nan, covered)  # error NaN: nothing covered
        if len(keep) < len(rows):
            rows, ts, seq, block = rows[keep], ts[keep], seq[keep], block[keep]
        counts = np.bincount(rows, minlength=self.max_streams)
        anomalies = np.bincount(rows, block[:, 4] > self.anomaly_threshold, self.max_streams)
        # A stream's samples take consecutive places in its ring, in order.
        rank = _rank_within(rows)
        if len(rank) and rank.max() >= self.history:  # a stream's ring filled more than once
            newest = rank >= counts[rows] - self.history  # only the last ones
            rows, ts, seq, block, rank = (x[newest] for x in (rows, ts, seq, block, rank))
        place = (self.written[rows] + rank) % self.history
        place += rows * self.history  # flat places: half the time of (rows, place) indexing
        self.ring.reshape(-1, len(FIELDS))[place] = block
        self.ts.reshape(-1)[place] = ts
        self.seq.reshape(-1)[place] = seq
        self.written += counts
        self.anomalies += anomalies.astype(np.int64)
        self.ticks += len(ticks)

    # -- readers (HTTP workers) ---------------------------------------------------------------
    def streams(self) -> dict[str, object]:
        """Every kept stream's numbers over its ring, as columns (NaN becomes null in JSON)."""
        self.fold_pending()
        with self._lock:
            n = len(self.names)
            names, ticks = list(self.names), self.ticks
            written = self.written[:n].copy()
            anomalies = self.anomalies[:n].tolist()
            errors = self.ring[:n, :, 5:8].astype(np.float64)  # (n, history, 3) copies
            newest = self.ring[np.arange(n), (written - 1) % self.history]
        valid = np.arange(self.history) < written[:, None]  # (n, history) filled places
        error, naive, covered = errors[..., 0], errors[..., 1], errors[..., 2]
        scored = valid & ~np.isnan(error) & ~np.isnan(naive)
        counted = valid & ~np.isnan(covered)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):

            def mean(x: np.ndarray, where: np.ndarray) -> np.ndarray:
                return np.where(where, x, 0.0).sum(axis=1) / where.sum(axis=1)

            mse, naive_mse = mean(error * error, scored), mean(naive * naive, scored)
            skill = np.where(naive_mse > 0, 1.0 - mse / naive_mse, np.nan)
            return {
                "version": __version__,
                "ticks": ticks,
                "max_streams": self.max_streams,
                "history": self.history,
                "coverage_target": self.coverage_target,
                "names": names,
                "samples": written.tolist(),
                "anomalies": anomalies,
                "mae": mean(np.abs(error), scored).tolist(),
                "naive_mae": mean(np.abs(naive), scored).tolist(),
                "skill": skill.tolist(),
                "coverage": mean(covered, counted).tolist(),
                "last_value": newest[:, 0].astype(np.float64).tolist(),
                "anomaly": newest[:, 4].astype(np.float64).tolist(),
            }

    def stream(self, name: str) -> dict[str, object]:
        """One stream's ring, oldest first (``kept`` false and no points for a stream not kept,
        or not seen yet: the page waits for it). No name: the first stream by name (the page's
        first row), so the page need not wait for the table."""
        self.fold_pending()
        with self._lock:
            if not name and self.names:
                name = min(self.names)
            row = self.index.get(name)
            if row is None:
                return {"name": name, "kept": False, "samples": 0, "anomalies": 0,
                        "threshold": self.anomaly_threshold,
                        "points": {key: [] for key in (*FIELDS[:5], "ts", "seq")}}  # fmt: skip
            written = int(self.written[row])
            count = min(written, self.history)
            order = (written - count + np.arange(count)) % self.history
            ring = self.ring[row, order].astype(np.float64)
            ts, seq = self.ts[row, order], self.seq[row, order]
            anomalies = int(self.anomalies[row])
        points: dict[str, list] = {key: ring[:, i].tolist() for i, key in enumerate(FIELDS[:5])}
        points["ts"] = ts.tolist()
        points["seq"] = seq.tolist()
        return {
            "name": name,
            "kept": True,
            "samples": written,
            "anomalies": anomalies,
            "threshold": self.anomaly_threshold,
            "points": points,
        }

    # -- HTTP -----------------------------------------------------------------------------------
    def routes(self) -> dict[str, WsgiApp]:
        """The page's paths, for ``web.HttpEndpoint``."""
        routes: dict[str, WsgiApp] = {path: _asset(*asset) for path, asset in ASSETS.items()}
        routes["/live"] = _redirect("/live/")
        routes["/live/streams.json"] = self._streams_app
        routes["/live/stream.json"] = self._stream_app
        return routes

    def _streams_app(self, environ: dict, start_response: Callable) -> list[bytes]:
        return _json(start_response, self.streams())

    def _stream_app(self, environ: dict, start_response: Callable) -> list[bytes]:
        name = parse_qs(environ.get("QUERY_STRING", "")).get("name", [""])[0]
        return _json(start_response, self.stream(name))


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
