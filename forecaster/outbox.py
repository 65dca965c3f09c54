"""The outbox: forecasts to output messages, handed to the broker in order and never dropped.

A message the link refuses (disconnected, paho's queue full) waits in ``unpublished`` and is
retried in order; with ``mqtt.max_outgoing`` forecasts on their way the intake pauses
(``held``), so back-pressure reaches the broker instead of forecasts being lost. A checkpoint
that trims the journal waits until every forecast has left (``drain``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import orjson

from forecaster.combine import COMPONENTS
from forecaster.config import Config
from forecaster.engine import ForecastColumns
from forecaster.faults import RateLimitedLog
from forecaster.metrics import Metrics
from forecaster.mqtt import MqttLink, RawMessage
from forecaster.parse import TopicTemplate

Send = Callable[[str, bytes, int], bool]  # (topic, payload, forecasts in it) -> taken now


def forecast_bodies(columns: ForecastColumns) -> list[dict[str, object]]:
    """The documented forecast objects (docs/protocol.md, "Forecast messages"), one per row, built
    from the columns (no ``Forecast`` objects: they cost more than the dicts)."""
    version = columns.model_version
    bodies: list[dict[str, object]] = [
        {
            "stream": stream,
            "seq": seq,
            "ts": None if ts != ts else ts,  # NaN: not given
            "value": value,
            "prediction": prediction,
            "error": None if error != error else error,
            "lower": lower,
            "upper": upper,
            "anomaly": anomaly,
            "model_version": version,
            "warm": warm,
        }
        for stream, seq, ts, value, prediction, error, lower, upper, anomaly, warm in zip(
            columns.streams,
            columns.seq.tolist(),
            columns.ts.tolist(),
            columns.value.tolist(),
            columns.prediction.tolist(),
            columns.error.tolist(),
            columns.lower.tolist(),
            columns.upper.tolist(),
            columns.anomaly.tolist(),
            columns.warm.tolist(),
            strict=True,
        )
    ]
    if (
        columns.path is not None
        and columns.path_lower is not None
        and columns.path_upper is not None
    ):
        paths = zip(
            columns.path.tolist(),
            columns.path_lower.tolist(),
            columns.path_upper.tolist(),
            strict=True,
        )
        for body, (path, lower, upper) in zip(bodies, paths, strict=True):  # engine.horizon > 1
            body.update(horizon=path, horizon_lower=lower, horizon_upper=upper)
    if columns.weights is not None:  # which reader of the stream carries its forecast
        for body, shares in zip(bodies, columns.weights.round(3).tolist(), strict=True):
            body["weights"] = dict(zip(COMPONENTS, shares, strict=True))
    return bodies


class Outbox:
    """Forecast messages on their way to the broker: published now, or kept in order until the
    link takes them."""

    def __init__(
        self, config: Config, link: MqttLink, metrics: Metrics, rate_limited: RateLimitedLog
    ) -> None:
        self.config = config
        self.link = link
        self.metrics = metrics
        self.rate_limited = rate_limited
        self.output = TopicTemplate.compile(config.mqtt.output_topic)
        # Messages not yet handed to the broker (replayed, or refused while disconnected), with
        # how many forecasts each carries (0: counted when first sent): retried in order, never
        # dropped; a checkpoint waits until this is empty so none is lost by a crash. With
        # ``mqtt.max_outgoing`` on their way, the engine takes no more input.
        self.unpublished: deque[tuple[str, str | bytes, int, int]] = deque()

    @property
    def outgoing(self) -> int:
        """Forecasts not yet with the broker: unpublished here, or in paho and not yet settled."""
        return len(self.unpublished) + self.link.outgoing

    @property
    def settled(self) -> bool:
        """Every forecast so far is with the broker (none here, none in paho unconfirmed)."""
        return not self.unpublished and not self.link.outgoing

    def publish_unpublished(self) -> None:
        """Retry the waiting messages in order (those paho lost unwritten first)."""
        lost = [(topic, payload, qos, 0) for topic, payload, qos in self.link.settle()]
        self.unpublished.extendleft(reversed(lost))  # lost unwritten: first again
        if not self.unpublished or not self.link.is_connected.is_set():
            return
        with self.link.corked():  # a backlog after an outage leaves as one burst
            while self.unpublished and self.link.is_connected.is_set():
                topic, payload, qos, forecasts = self.unpublished[0]
                if not self.link.publish(topic, payload, qos):
                    return
                self.unpublished.popleft()
                self.metrics.forecasts_published.inc(forecasts)

    def drain(self, timeout: float) -> bool:
        """Whether every forecast so far has left for the broker (waiting up to ``timeout`` for
        paho's): what a checkpoint that trims the journal needs."""
        self.publish_unpublished()
        return not self.unpublished and self.link.flush(timeout=timeout)

    def held(self, timeout: float) -> bool:
        """Take no input while ``mqtt.max_outgoing`` forecasts are on their way to the broker.

        A forecast is data: rather than drop one, the daemon stops taking samples, so the
        back-pressure reaches the broker (unacknowledged QoS 1 samples stay there; the receive
        queue fills and ``engine.overload`` applies) until the link is back and they have left.
        Not while the MQTT reader waits for room in the queue: paho reads the broker's acks on
        that thread, so only taking input lets them in (measured: a deadlock otherwise).
        """
        deadline = time.monotonic() + timeout
        limit = self.config.mqtt.max_outgoing
        while True:
            self.publish_unpublished()
            waiting = self.outgoing
            if waiting < limit or self.link.blocked:
                return False
            if time.monotonic() >= deadline:
                self.rate_limited.warning(
                    "max_outgoing",
                    "%d forecasts waiting for the broker (mqtt.max_outgoing): input paused",
                    waiting,
                )
                return True
            time.sleep(0.002)

    def publish_tick(
        self,
        forecasts: ForecastColumns,
        origins: list[int],
        batch: list[RawMessage],
        frames: list[str | None],
    ) -> float:
        """Publish one tick's forecasts as one burst and time them from receipt; returns the
        wall-clock time they were measured at (the live page's too)."""
        with self.link.corked():
            sent, published = self.publish_forecasts(forecasts, origins, frames, self.send)
        now = time.time()  # per-tick metrics: one call each, not one per forecast
        self.metrics.latency.observe_many([max(0.0, now - batch[o].received) for o in sent])
        self.metrics.forecasts_published.inc(published)
        return now

    def publish_forecasts(
        self,
        forecasts: ForecastColumns,
        origins: list[int],
        frames: list[str | None],
        send: Send,
    ) -> tuple[list[int], int]:
        """Hand each forecast to ``send``: one message each, or with ``mqtt.output_frames`` one
        per input frame (``frames[origins[i]]``: the frame forecast ``i`` came in, None for a
        one-sample message). Returns the messages ``send`` took now (their origin) and the
        forecasts in them.

        A message's forecasts are consecutive (arrival order), so an output frame is a run of
        them; publishing run by run keeps each output topic in arrival order.
        """
        framed = self.config.mqtt.output_frames
        run: list[dict[str, object]] = []
        sent: list[int] = []
        published = 0
        bodies = zip(forecast_bodies(forecasts), forecasts.streams, origins, strict=True)
        for i, (body, stream, origin) in enumerate(bodies):
            frame = frames[origin] if framed else None
            if frame is None:
                if send(self.output.topic_for(stream), orjson.dumps(body), 1):
                    sent.append(origin)
                    published += 1
                continue
            run.append(body)
            if i + 1 == len(origins) or origins[i + 1] != origin:
                if send(self.output.topic_for(frame), orjson.dumps(run), len(run)):
                    sent.append(origin)
                    published += len(run)
                run = []
        return sent, published

    def send(self, topic: str, payload: bytes, forecasts: int) -> bool:
        """Publish one output message (one forecast, or a frame of ``forecasts``); True when the
        link took it now. One it refuses waits in order for the broker instead of being
        dropped."""
        qos = self.config.mqtt.qos_out
        if not self.unpublished and self.link.publish(topic, payload, qos):
            return True
        self.unpublished.append((topic, payload, qos, forecasts))
        return False

    def later(self, topic: str, payload: bytes, forecasts: int) -> bool:
        """Keep a replayed message for when the link is up (a ``send`` that never sends now)."""
        self.unpublished.append((topic, payload, self.config.mqtt.qos_out, forecasts))
        return False
