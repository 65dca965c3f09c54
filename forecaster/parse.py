"""Pure: ``(topic, payload) -> Sample`` or ``PayloadError(reason)``.

Accepted payloads: a bare number (``0.42``) or a JSON object (``{"value": 0.42, "ts": 1700000000.25,
"seq": 17}``; field names configurable, ``ts`` and ``seq`` optional). Every refusal carries one of
the bounded ``REASONS`` so it can be counted by label. ``NaN``/``Infinity`` are refused even though
``json.loads`` and ``float`` accept them: a non-finite number must never reach a hidden state.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from forecaster.engine import STREAM_ID, Sample
from forecaster.errors import PayloadError

REASONS = (
    "too_large",
    "empty",
    "not_utf8",
    "invalid_json",
    "missing_value",
    "not_a_number",
    "non_finite",
    "out_of_range",
    "bad_timestamp",
    "bad_seq",
    "unknown_topic",
    "bad_stream",
    "duplicate",
    "queue_full",
    "internal_error",
)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
MAX_STREAM_ID = 200  # characters of a refused topic or id quoted in a log line


@dataclass(frozen=True)
class TopicTemplate:
    """``sensors/{stream}/value``: which level names the stream.

    >>> TopicTemplate.compile("sensors/{stream}/value").stream_of("sensors/boiler-1/value")
    'boiler-1'
    >>> TopicTemplate.compile("sensors/{stream}/value").stream_of("sensors/a/b/value") is None
    True
    """

    levels: tuple[str, ...]
    index: int

    @classmethod
    def compile(cls, template: str) -> TopicTemplate:
        levels = tuple(template.split("/"))
        return cls(levels, levels.index("{stream}"))

    def stream_of(self, topic: str) -> str | None:
        levels = topic.split("/")
        if len(levels) != len(self.levels):
            return None
        for i, (want, got) in enumerate(zip(self.levels, levels, strict=True)):
            if i != self.index and want != got:
                return None
        return levels[self.index]

    def topic_for(self, stream: str) -> str:
        return "/".join(stream if i == self.index else lvl for i, lvl in enumerate(self.levels))


def check_stream_id(stream: str) -> str:
    """A stream id matches ``engine.STREAM_ID`` (it becomes a topic level and a metric label).

    >>> check_stream_id("boiler-1.temp_2")
    'boiler-1.temp_2'
    >>> check_stream_id("a b")
    Traceback (most recent call last):
    ...
    forecaster.errors.PayloadError: bad_stream: 'a b'
    """
    if not STREAM_ID.fullmatch(stream):
        raise PayloadError("bad_stream", repr(stream[:MAX_STREAM_ID]))
    return stream


def parse_number(value: object, what: str = "value") -> float:
    """A finite float from a JSON number or numeric text.

    >>> parse_number(" 0.42 "), parse_number(-3), parse_number("1e3")
    (0.42, -3.0, 1000.0)
    >>> parse_number("NaN")
    Traceback (most recent call last):
    ...
    forecaster.errors.PayloadError: non_finite: value='NaN'
    """
    if isinstance(value, bool) or value is None:
        raise PayloadError("not_a_number", f"{what}={value!r}")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise PayloadError("out_of_range", f"{what} too large") from None
        if math.isnan(number):
            raise PayloadError("non_finite", f"{what}={value!r}")
        if math.isinf(number):
            raise PayloadError("out_of_range", f"{what}={value!r}")
        return number
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _NON_FINITE:
            raise PayloadError("non_finite", f"{what}={value!r}")
        if _NUMBER.fullmatch(text):
            number = float(text)
            if math.isinf(number):
                raise PayloadError("out_of_range", f"{what}={text[:40]!r}")
            return number
    raise PayloadError("not_a_number", f"{what}={str(value)[:40]!r}")


def _reject_constant(name: str) -> float:
    raise PayloadError("non_finite", f"JSON constant {name}")


class PayloadParser:
    """Turns MQTT messages into samples for the configured topic templates and field names."""

    def __init__(
        self,
        templates: Sequence[str],
        *,
        value_field: str = "value",
        ts_field: str = "ts",
        seq_field: str = "seq",
        max_bytes: int = 4096,
    ) -> None:
        self.templates = [TopicTemplate.compile(t) for t in templates]
        self.value_field = value_field
        self.ts_field = ts_field
        self.seq_field = seq_field
        self.max_bytes = max_bytes

    def stream_of(self, topic: str) -> str:
        for template in self.templates:
            stream = template.stream_of(topic)
            if stream is not None:
                return check_stream_id(stream)
        raise PayloadError("unknown_topic", topic[:MAX_STREAM_ID])

    def parse(self, topic: str, payload: bytes, received: float | None = None) -> Sample:
        """One message -> one sample; ``ts`` defaults to the receive time.

        >>> parser = PayloadParser(["sensors/{stream}/value"])
        >>> parser.parse("sensors/t1/value", b'{"value": 21.5, "ts": 5, "seq": 3}')
        Sample(stream='t1', value=21.5, ts=5.0, seq=3)
        >>> parser.parse("sensors/t1/value", b"0.42", received=9.0)
        Sample(stream='t1', value=0.42, ts=9.0, seq=None)
        """
        stream = self.stream_of(topic)
        if len(payload) > self.max_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PayloadError("not_utf8", f"{len(payload)} bytes") from None
        if not text:
            raise PayloadError("empty")
        if not text.startswith("{"):
            return Sample(stream, parse_number(text), received, None)
        try:
            document = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise PayloadError("invalid_json", str(exc)[:80]) from None
        except RecursionError:  # '{"value": [[[[...' within max_bytes (found by the fuzz test)
            raise PayloadError("invalid_json", "nested too deeply") from None
        if not isinstance(document, dict):
            raise PayloadError("invalid_json", "not an object")
        if self.value_field not in document:
            raise PayloadError("missing_value", f"no field {self.value_field!r}")
        value = parse_number(document[self.value_field])
        ts = received
        if document.get(self.ts_field) is not None:
            try:
                ts = parse_number(document[self.ts_field], self.ts_field)
            except PayloadError as exc:
                raise PayloadError("bad_timestamp", exc.detail) from None
        seq = None
        if document.get(self.seq_field) is not None:
            raw = document[self.seq_field]
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0 or raw >= 2**63:
                raise PayloadError("bad_seq", f"{self.seq_field}={str(raw)[:40]!r}")
            seq = raw
        return Sample(stream, value, ts, seq)
