from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.engine import Sample
from forecaster.errors import PayloadError
from forecaster.parse import REASONS, PayloadParser

PARSER = PayloadParser(["sensors/{stream}/value", "plant/{stream}"], max_bytes=64)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/a/value", b"abc", "not_a_number"),
        ("sensors/a/value", b"nan", "non_finite"),
        ("sensors/a/value", b"-Infinity", "non_finite"),
        ("sensors/a/value", b'{"value": Infinity}', "non_finite"),
        ("sensors/a/value", b'{"value": "NaN"}', "non_finite"),
        ("sensors/a/value", b"1e400", "out_of_range"),
        ("sensors/a/value", b'{"value": 1e400}', "out_of_range"),
        ("sensors/a/value", b"", "empty"),
        ("sensors/a/value", b"   ", "empty"),
        ("sensors/a/value", b"1" * 65, "too_large"),
        ("sensors/a/value", b'{"value": ', "invalid_json"),
        ("sensors/a/value", b"[1, 2]", "not_a_number"),
        ("sensors/a/value", b'{"v": 1}', "missing_value"),
        ("sensors/a/value", b'{"value": null}', "not_a_number"),
        ("sensors/a/value", b'{"value": [1]}', "not_a_number"),
        ("sensors/a/value", b'{"value": 1, "ts": "x"}', "bad_timestamp"),
        ("sensors/a/value", b'{"value": 1, "seq": -1}', "bad_seq"),
        ("sensors/a/value", b'{"value": 1, "seq": 1.5}', "bad_seq"),
        ("sensors/a/value", b"\xff", "not_utf8"),
        ("other/a", b"1", "unknown_topic"),
        ("sensors/a/b/value", b"1", "unknown_topic"),
        ("sensors//value", b"1", "bad_stream"),
        ("sensors/a#/value", b"1", "bad_stream"),
        ("sensors/a+b/value", b"1", "bad_stream"),
        ("sensors/" + "x" * 300 + "/value", b"1", "bad_stream"),
    ],
)
def test_bad_messages_get_a_bounded_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        PARSER.parse(topic, payload)
    assert info.value.reason == reason
    assert reason in REASONS


def test_good_messages() -> None:
    assert PARSER.parse("plant/p1", b" -2.5e1\n", received=3.0) == Sample("p1", -25.0, 3.0, None)
    assert PARSER.parse("sensors/x/value", b'{"value": "4", "seq": 9}', 1.0) == Sample(
        "x", 4.0, 1.0, 9
    )


def test_field_names_are_configurable() -> None:
    parser = PayloadParser(["s/{stream}"], value_field="temp", ts_field="time")
    assert parser.parse("s/k", b'{"temp": 21.5, "time": 7}') == Sample("k", 21.5, 7.0, None)


@given(st.binary(max_size=80), st.text(max_size=20))
def test_any_bytes_either_parse_to_a_finite_sample_or_raise_a_known_reason(
    payload: bytes, stream: str
) -> None:
    import math

    try:
        sample = PARSER.parse(f"sensors/{stream}/value", payload)
    except PayloadError as exc:
        assert exc.reason in REASONS
    else:
        assert math.isfinite(sample.value)
