"""Pure: ``(topic, payload) -> Sample`` or ``PayloadError(reason)``; frames give many samples.

Accepted payloads on a stream topic (``sensors/{stream}/value``): a bare number (``0.42``), a JSON
object (``{"value": 0.42, "ts": 1700000000.25, "seq": 17}``; field names configurable, ``ts`` and
``seq`` optional), or a list frame of consecutive samples of that stream (``[0.41, 0.42]`` or
``[{"value": 0.41, "seq": 16}, {"value": 0.42, "seq": 17}]``). On a device topic
(``devices/{device}/state``) a device frame carries one reading per key: ``{"temp": 21.5, "hum":
40.1, "ts": 5}`` gives streams ``device.temp`` and ``device.hum`` (``ts``/``seq`` keys apply to every
reading; a reading may also be a sample object). Every refusal carries one of the bounded
``reasons.REASONS`` so it can be counted by label; a bad element of a frame is refused alone, the good ones
are kept. ``NaN``/``Infinity`` are refused even though ``json.loads`` and ``float`` accept them: a
non-finite number must never reach a hidden state.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from forecaster.errors import PayloadError
from forecaster.records import NO_SEQ, STREAM_ID, Sample, samples_of

# ASCII digits only: ``\d`` and ``float()`` also take Arabic-Indic and full-width digits.
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
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
    def compile(cls, template: str, placeholder: str = "{stream}") -> TopicTemplate:
        levels = tuple(template.split("/"))
        return cls(levels, levels.index(placeholder))

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


# Ids seen before are not matched again (a regex per sample was ~5 % of a tick); refused ids
# raise, so they never enter the cache.
@functools.lru_cache(maxsize=1 << 16)
def check_stream_id(stream: str) -> str:
    """A stream id matches ``records.STREAM_ID`` (it becomes a topic level and a metric label).

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


def _constant_as_text(name: str) -> str:
    """JSON's ``NaN``/``Infinity`` stay text, so ``parse_number`` refuses them as ``non_finite``
    where they stand: in a frame, only their element is lost."""
    return name


def _row(sample: Sample) -> tuple[float, float, int]:
    """A sample's (value, ts, seq) as column entries: NaN / ``NO_SEQ`` where not given."""
    ts = math.nan if sample.ts is None else sample.ts
    return sample.value, ts, NO_SEQ if sample.seq is None else sample.seq


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one message gave: its readings in order, as columns, the elements refused, and
    whether a frame.

    Columns, not ``Sample`` objects: the daemon's tick is columns, and an object per reading
    (made, then taken apart again) was a fifth of a frame's cost. ``ts`` is NaN and ``seq`` is
    ``NO_SEQ`` where the sender gave none. ``frame`` names the stream (list frame) or device
    (device frame) a frame's forecasts are published under when ``mqtt.output_frames`` is on;
    None for a one-sample message.
    """

    streams: list[str]
    values: list[float]
    ts: list[float]
    seq: list[int]
    errors: list[PayloadError] = field(default_factory=list)
    frame: str | None = None

    @classmethod
    def one(cls, sample: Sample) -> Parsed:
        value, ts, seq = _row(sample)
        return cls([sample.stream], [value], [ts], [seq])

    @property
    def samples(self) -> list[Sample]:
        """The readings as ``Sample`` objects (``ts``/``seq`` None where not given)."""
        return samples_of(self.streams, self.values, self.ts, self.seq)


class PayloadParser:
    """Turns MQTT messages into samples for the configured topic templates and field names."""

    def __init__(
        self,
        templates: Sequence[str],
        *,
        frame_templates: Sequence[str] = (),
        value_field: str = "value",
        ts_field: str = "ts",
        seq_field: str = "seq",
        max_bytes: int = 4096,
    ) -> None:
        self.templates = [TopicTemplate.compile(t) for t in templates]
        self.frame_templates = [TopicTemplate.compile(t, "{device}") for t in frame_templates]
        self.value_field = value_field
        self.ts_field = ts_field
        self.seq_field = seq_field
        self.max_bytes = max_bytes
        # Topic -> stream id, for topics seen before (the split and match per message was ~7 %
        # of a tick of single-sample messages); unknown topics raise and are not kept.
        self.stream_of = functools.lru_cache(maxsize=1 << 16)(self._stream_of)

    def _stream_of(self, topic: str) -> str:
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
        return self._single(self.stream_of(topic), self._text(payload), received)

    def parse_message(self, topic: str, payload: bytes, received: float | None = None) -> Parsed:
        """Any message -> its samples; a whole-message defect raises, a bad element is listed.

        >>> parser = PayloadParser(["s/{stream}"], frame_templates=["d/{device}/state"])
        >>> parser.parse_message("s/a", b"[1, 2]", received=9.0).samples
        [Sample(stream='a', value=1.0, ts=9.0, seq=None), Sample(stream='a', value=2.0, ts=9.0, seq=None)]
        >>> got = parser.parse_message("d/k1/state", b'{"temp": 21.5, "hum": "x", "ts": 5}')
        >>> got.samples, [e.reason for e in got.errors], got.frame
        ([Sample(stream='k1.temp', value=21.5, ts=5.0, seq=None)], ['not_a_number'], 'k1')
        """
        try:
            return self._message(topic, payload, received)
        except RecursionError:  # '[[[[...' within max_bytes: orjson decodes 1,024 levels, which
            # the standard library cannot even repr (found by the fuzz test)
            raise PayloadError("invalid_json", "nested too deeply") from None

    def _message(self, topic: str, payload: bytes, received: float | None) -> Parsed:
        device = None
        for template in self.frame_templates:
            device = template.stream_of(topic)
            if device is not None:
                break
        if device is None:
            stream = self.stream_of(topic)
            text = self._text(payload)
            if not text.startswith("["):
                return Parsed.one(self._single(stream, text, received))
            document = self._json(text)
            return self._frame(((stream, e) for e in document), stream, received, None)
        device = check_stream_id(device)  # the output frame's topic level
        document = self._json(self._text(payload))
        if not isinstance(document, dict):
            raise PayloadError("invalid_json", "a device frame is an object")
        ts = self._ts(document, received)
        seq = self._seq(document)
        readings = (
            (f"{device}.{key}", element)
            for key, element in document.items()
            if key not in (self.ts_field, self.seq_field)
        )
        return self._frame(readings, device, ts, seq)

    def _single(self, stream: str, text: str, received: float | None) -> Sample:
        if not text.startswith("{"):
            return Sample(stream, parse_number(text), received, None)
        return self._element(stream, self._json(text), received, None)

    def _frame(
        self, elements: Iterable[tuple[str, object]], name: str, ts: float | None, seq: int | None
    ) -> Parsed:
        out = Parsed([], [], [], [], [], name)
        default_ts = math.nan if ts is None else ts
        default_seq = NO_SEQ if seq is None else seq
        for stream, element in elements:
            try:
                stream = check_stream_id(stream)
                if type(element) is float and math.isfinite(element):  # most readings: no calls
                    value, stamp, number = element, default_ts, default_seq
                else:
                    value, stamp, number = _row(self._element(stream, element, ts, seq))
            except PayloadError as exc:
                out.errors.append(exc)
                continue
            out.streams.append(stream)
            out.values.append(value)
            out.ts.append(stamp)
            out.seq.append(number)
        if not out.streams and not out.errors:
            raise PayloadError("empty", "a frame without readings")
        return out

    def _text(self, payload: bytes) -> str:
        """The decoded payload; the size cap is checked before any decoding."""
        if len(payload) > self.max_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PayloadError("not_utf8", f"{len(payload)} bytes") from None
        if not text:
            raise PayloadError("empty")
        return text

    @staticmethod
    def _json(text: str) -> object:
        try:
            return orjson.loads(text)  # ~5x the standard parser on the documents that are valid
        except orjson.JSONDecodeError:
            pass  # NaN/Infinity, numbers past a double, deep nesting: the standard parser decides
        try:
            return json.loads(text, parse_constant=_constant_as_text)
        except ValueError as exc:
            raise PayloadError("invalid_json", str(exc)[:80]) from None
        except RecursionError:  # '{"value": [[[[...' within max_bytes (found by the fuzz test)
            raise PayloadError("invalid_json", "nested too deeply") from None

    def _element(self, stream: str, element: object, ts: float | None, seq: int | None) -> Sample:
        """A sample object (its ``ts``/``seq`` override the defaults) or a bare number."""
        if not isinstance(element, dict):
            if isinstance(element, list):
                raise PayloadError("not_a_number", "a list where a number belongs")
            return Sample(stream, parse_number(element), ts, seq)
        if self.value_field not in element:
            raise PayloadError("missing_value", f"no field {self.value_field!r}")
        value = parse_number(element[self.value_field])
        return Sample(stream, value, self._ts(element, ts), self._seq(element, seq))

    def _ts(self, document: dict, default: float | None) -> float | None:
        if document.get(self.ts_field) is None:
            return default
        try:
            return parse_number(document[self.ts_field], self.ts_field)
        except PayloadError as exc:
            raise PayloadError("bad_timestamp", exc.detail) from None

    def _seq(self, document: dict, default: int | None = None) -> int | None:
        raw = document.get(self.seq_field)
        if raw is None:
            return default
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0 or raw >= 2**63:
            raise PayloadError("bad_seq", f"{self.seq_field}={str(raw)[:40]!r}")
        return raw
