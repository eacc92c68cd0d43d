"""Scalar parsers: durations, quantities, addresses, service references."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from meshlib.config.loader import parse_duration
from meshlib.config.values import (
    MAX_NUMBER_DIGITS,
    check_duration_range,
    format_duration,
    parse_address,
    parse_json,
    parse_quantity_milli,
    parse_seconds_or_duration,
    service_key,
    shown,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h0m1s", 3601.0),
        ("1.001s", 1.001),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1s", "negative"),
        ("0.5ms", "1ms precision"),
        ("1.0001s", "1ms precision"),
        ("100us", "unit"),
        ("2", "unit"),
        ("", "unit"),
        ("s", "unit"),
        ("1 s", "unit"),
        ("1d", "unit"),
        ("1s2", "unit"),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


def test_duration_range_messages() -> None:
    with pytest.raises(ValueError, match="at least 1ms"):
        check_duration_range(0.0)
    with pytest.raises(ValueError, match="at most 24h"):
        check_duration_range(10 * 86400.0)
    with pytest.raises(ValueError, match="at most 1m"):
        check_duration_range(1000.0, minimum=1.0, maximum=60.0)
    check_duration_range(0.001)


@given(st.integers(min_value=1, max_value=86_400_000))
def test_format_and_parse_round_trip(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@pytest.mark.parametrize(
    ("value", "milli"),
    [
        ("500m", 500),
        ("100m", 100),
        ("1", 1000),
        (1, 1000),
        ("0.5", 500),
        (0.25, 250),
        ("1k", 10**6),
    ],
)
def test_quantities(value: object, milli: int) -> None:
    assert parse_quantity_milli(value) == milli


@pytest.mark.parametrize("value", ["-1", -1, "0.0001", "5x", True, None, "1.5m"])
def test_bad_quantities(value: object) -> None:
    with pytest.raises(ValueError):
        parse_quantity_milli(value)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("reviews.shop.svc.cluster.local:9080", ("reviews.shop.svc.cluster.local", 9080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    "address",
    [
        "localhost",
        ":80",
        "h:0",
        "h:65536",
        "h:-1",
        "[::1:80",
        "::1:80",
        "a b:80",
        "h:\u0668\u0660",  # Arabic-Indic "80": str.isdigit() says yes, a port it is not
        "h:\u00b2",  # superscript two: isdigit() too, and int() refuses it
        "h:" + "0" * 4000 + "80",
    ],
)
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("reviews", "reviews.default"),
        ("reviews.shop", "reviews.shop"),
        ("reviews.shop.svc", "reviews.shop"),
        ("reviews.shop.svc.cluster.local", "reviews.shop"),
    ],
)
def test_service_key(ref: str, key: str) -> None:
    assert service_key(ref, "default") == key


@pytest.mark.parametrize("ref", ["Reviews", "a.b.c", "a..b", "-a", "a_b"])
def test_bad_service_refs(ref: str) -> None:
    with pytest.raises(ValueError):
        service_key(ref, "default")


def test_numbers_in_durations_and_quantities_are_bounded_in_digits() -> None:
    """Decimal arithmetic keeps 28 digits by default: 400 digits raised InvalidOperation."""
    longest = "1" * MAX_NUMBER_DIGITS
    assert parse_duration(longest + "ms") == pytest.approx(int(longest) / 1000)
    for text in (longest + "1s", "1." + "0" * MAX_NUMBER_DIGITS + "s", "9" * 400 + "h"):
        with pytest.raises(ValueError, match=f"at most {MAX_NUMBER_DIGITS} are allowed"):
            parse_duration(text)
    with pytest.raises(ValueError, match="digits"):
        parse_quantity_milli("9" * 400 + "m")
    # long sums of parts stay exact: the 1 ms precision check never sees a rounded total
    assert parse_duration("1h" * 1000 + "1ms") == pytest.approx(3_600_000.001)


def test_parse_json_bounds_nesting_without_recursing() -> None:
    assert parse_json('{"keys": [{"n": "[[[[{{"}]}') == {"keys": [{"n": "[[[[{{"}]}
    assert parse_json("[" * 32 + "]" * 32) is not None
    for text in ("[" * 33 + "]" * 33, "[" * 100_000, '{"a": ' * 1000):
        with pytest.raises(ValueError, match="nested deeper than 32"):
            parse_json(text)
    with pytest.raises(ValueError):
        parse_json('"unterminated [[[[')


def test_shown_names_long_values_by_their_start_and_length() -> None:
    assert shown("short") == "'short'"
    long = shown("9" * 400)
    assert long.startswith("'999") and long.endswith("(402 characters)") and len(long) < 60


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20", 20.0), ("1.5", 1.5), (" 90s ", 90.0), ("15m", 900.0), ("1m30s", 90.0)],
)
def test_bare_seconds_or_a_duration(text: str, seconds: float) -> None:
    assert parse_seconds_or_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5", "1e3", "nan", "", "5d"])
def test_neither_bare_seconds_nor_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_seconds_or_duration(text)
