from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.errors import PayloadError
from forecaster.parse import PayloadParser
from forecaster.reasons import REASONS
from forecaster.records import Sample

PARSER = PayloadParser(["sensors/{stream}/value", "plant/{stream}"], max_bytes=64)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/a/value", b"abc", "not_a_number"),
        ("sensors/a/value", "١٢٣".encode(), "not_a_number"),  # Arabic-Indic digits
        ("sensors/a/value", "１２３".encode(), "not_a_number"),  # full-width digits
        ("sensors/a/value", '{"value": "١٢٣"}'.encode(), "not_a_number"),
        ("sensors/a/value", "1e٣".encode(), "not_a_number"),
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


FRAMES = PayloadParser(["sensors/{stream}/value"], frame_templates=["devices/{device}/state"])


def test_a_list_frame_is_consecutive_samples_of_its_stream() -> None:
    payload = b'[1.5, "2", {"value": 3, "seq": 9}, {"value": 4, "ts": 8.5}]'
    got = FRAMES.parse_message("sensors/a/value", payload, received=7.0)
    assert got.samples == [
        Sample("a", 1.5, 7.0, None),
        Sample("a", 2.0, 7.0, None),
        Sample("a", 3.0, 7.0, 9),
        Sample("a", 4.0, 8.5, None),
    ]
    assert got.errors == [] and got.frame == "a"


def test_a_device_frame_names_one_stream_per_key() -> None:
    payload = b'{"temp": 21.5, "hum": {"value": 40.1, "seq": 4}, "ts": 5, "seq": 2}'
    got = FRAMES.parse_message("devices/d-1/state", payload, received=7.0)
    assert got.samples == [Sample("d-1.temp", 21.5, 5.0, 2), Sample("d-1.hum", 40.1, 5.0, 4)]
    assert got.frame == "d-1"


def test_a_one_sample_message_is_no_frame() -> None:
    got = FRAMES.parse_message("sensors/a/value", b'{"value": 1}', received=7.0)
    assert got.samples == [Sample("a", 1.0, 7.0, None)] and got.frame is None


def test_bad_elements_are_refused_alone() -> None:
    listed = b'[1, "x", null, NaN, Infinity, 1e400, [2], {"v": 1}, {"value": 1, "ts": "t"}, 2]'
    got = FRAMES.parse_message("sensors/a/value", listed)
    assert [s.value for s in got.samples] == [1.0, 2.0]
    assert [e.reason for e in got.errors] == [
        "not_a_number",
        "not_a_number",
        "non_finite",
        "non_finite",
        "out_of_range",
        "not_a_number",
        "missing_value",
        "bad_timestamp",
    ]
    device = b'{"ok": 1, "a b": 2, "bad": true, "seq_": {"value": 1, "seq": -3}}'
    got = FRAMES.parse_message("devices/d/state", device)
    assert [s.stream for s in got.samples] == ["d.ok"]
    assert [e.reason for e in got.errors] == ["bad_stream", "not_a_number", "bad_seq"]
    assert all(e.reason in REASONS for e in got.errors)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/a/value", b"[]", "empty"),
        ("devices/d/state", b"{}", "empty"),
        ("devices/d/state", b'{"ts": 5}', "empty"),
        ("devices/d/state", b"[1, 2]", "invalid_json"),
        ("devices/d/state", b"1.5", "invalid_json"),
        ("devices/d/state", b'{"t": 1, "ts": "x"}', "bad_timestamp"),
        ("devices/d/state", b'{"t": 1, "seq": 1.5}', "bad_seq"),
        ("devices/d#/state", b'{"t": 1}', "bad_stream"),
        ("sensors/a/value", b"[1, 2", "invalid_json"),
        ("sensors/a/value", b"[" + b"1," * 2100 + b"1]", "too_large"),
    ],
)
def test_whole_frame_defects(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        FRAMES.parse_message(topic, payload)
    assert info.value.reason == reason and reason in REASONS


@given(st.binary(max_size=120))
def test_any_frame_bytes_give_finite_samples_or_known_reasons(payload: bytes) -> None:
    import math

    for topic in ("sensors/a/value", "devices/d/state"):
        try:
            got = FRAMES.parse_message(topic, payload)
        except PayloadError as exc:
            assert exc.reason in REASONS
            continue
        assert all(math.isfinite(s.value) for s in got.samples)
        assert all(e.reason in REASONS for e in got.errors)
