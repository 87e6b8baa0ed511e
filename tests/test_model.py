"""The rules of what a request may say, over plain strings: an upload's Content-Type, and the
numbers and ids read from requests (ASCII only, bounded)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from prerec.model import MAX_BIGINT, MAX_CONTENT_TYPE, parse_content_type, parse_count, parse_event
from prerec.problems import Problem
from tests.conftest import EVENT


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("audio/ogg", "audio/ogg"),
        ("Audio/OGG", "audio/ogg"),
        ("audio/ogg; codecs=opus", "audio/ogg; codecs=opus"),
        ("audio/ogg;codecs=opus", "audio/ogg; codecs=opus"),
        ("audio/ogg \t;\t Codecs=Opus", "audio/ogg; codecs=Opus"),
        ('audio/ogg; codecs="opus"', "audio/ogg; codecs=opus"),
        ('audio/ogg; codecs="opus, vorbis"', 'audio/ogg; codecs="opus, vorbis"'),
        ('audio/ogg; x="a\\"b\\\\c"', 'audio/ogg; x="a\\"b\\\\c"'),
        ('audio/ogg; x="\\a"', "audio/ogg; x=a"),
        ('audio/ogg; x=""', 'audio/ogg; x=""'),
        ("audio/ogg;", "audio/ogg"),
        ("audio/ogg;;codecs=opus; ;", "audio/ogg; codecs=opus"),
        ("audio/ogg; b=2; a=1", "audio/ogg; b=2; a=1"),
        ("audio/ogg; x=!#$%&'*+.^_`|~-", "audio/ogg; x=!#$%&'*+.^_`|~-"),
        # An RFC 8187 extended value is two tokens to HTTP's grammar: kept, not decoded.
        ("audio/ogg; x*=utf-8''%e2%82%ac", "audio/ogg; x*=utf-8''%e2%82%ac"),
        ("audio/ogg; x=" + "a" * (MAX_CONTENT_TYPE - 13), "audio/ogg; x=" + "a" * (MAX_CONTENT_TYPE - 13)),
    ],
)
def test_a_valid_content_type_is_stored_normalised(sent: str, stored: str) -> None:
    assert parse_content_type(sent) == stored
    assert parse_content_type(stored) == stored


@pytest.mark.parametrize(
    ("sent", "words"),
    [
        (None, ["audio/ogg", "none was sent"]),
        ("", ["not a media type"]),
        ("audio", ["'audio'", "not a media type"]),
        ("audio/", ["not a media type"]),
        ("/ogg", ["not a media type"]),
        ("audio /ogg", ["not a media type"]),
        ("audio/ogg codecs=opus", ["not a media type"]),
        ("audio/ogg; codecs", ["not a media type"]),
        ("audio/ogg; =opus", ["not a media type"]),
        ("audio/ogg; codecs=opus,vorbis", ["not a media type"]),
        ("audio/ogg; codecs = opus", ["not a media type"]),
        ('audio/ogg; codecs="opus', ["not a media type"]),
        ('audio/ogg; codecs="op"us', ["not a media type"]),
        ('audio/ogg; x="a\nb"', ["not a media type"]),
        ("audio/ogg\r\nX-Injected: 1", ["not a media type"]),
        ("audio/ogg (a comment)", ["not a media type"]),
        ("audio/ogg; codecs=opus; codecs=vorbis", ["'codecs' twice"]),
        ("audio/ogg; Codecs=opus; codecs=opus", ["'codecs' twice"]),
        ("audio/mpeg", ["must be audio/ogg", "'audio/mpeg'"]),
        ("application/ogg; codecs=opus", ["must be audio/ogg"]),
        ("audio/ogg; x=\u00e9", ["not ASCII"]),
        ("audio/ogg; x=\udcff", ["not ASCII"]),
        ("audio/ogg; x=" + "a" * (MAX_CONTENT_TYPE - 12), [f"{MAX_CONTENT_TYPE + 1} characters", "at most 256"]),
        ("audio/ogg; x=" + "a" * 8000, ["8013 characters"]),
    ],
)
def test_an_unusable_content_type_is_415_naming_what_is_wrong(sent: str | None, words: list[str]) -> None:
    with pytest.raises(Problem) as raised:
        parse_content_type(sent)
    assert raised.value.status == 415
    for word in words:
        assert word in raised.value.detail


# Numbers and ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("7", 7),
        ("007", 7),
        (str(MAX_BIGINT), MAX_BIGINT),
        ("0" * 18 + "1", 1),  # 19 characters
    ],
)
def test_parse_count_reads_ascii_digits(text: str, expected: int) -> None:
    assert parse_count(text, "limit") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "+1",
        "-1",
        "1_0",  # int() reads this as 10
        "1.0",
        "1e3",
        "0x10",
        "\u0661\u0660",  # Arabic-Indic 10
        "\u00b2",  # superscript two: isdigit() says yes
        "\uff11",  # fullwidth 1
        "\U0001d7d9",  # mathematical double-struck 1
        "1\u0660",
        str(MAX_BIGINT + 1),
        "0" * 19 + "1",  # 20 characters, however small
        "9" * 4301,  # past Python's int() limit
        "9" * 100_000,
    ],
)
def test_parse_count_refuses_anything_else_with_a_400_naming_it(text: str) -> None:
    with pytest.raises(Problem) as refused:
        parse_count(text, "query parameter offset")
    assert refused.value.status == 400 and "query parameter offset" in refused.value.detail
    assert len(refused.value.detail) < 200


@hypothesis_settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(st.one_of(st.text(), st.integers(-(2**70), 2**70).map(str), st.text("0123456789", min_size=15, max_size=25)))
def test_parse_count_is_an_ascii_decimal_in_bigint_range_or_a_400(text: str) -> None:
    try:
        value = parse_count(text, "n")
    except Problem as problem:
        assert problem.status == 400
        assert not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= MAX_BIGINT)
    else:
        assert all(c in "0123456789" for c in text) and 0 <= value <= MAX_BIGINT and value == int(text)


def test_parse_event_reads_ascii_uuids() -> None:
    assert parse_event(EVENT) == uuid.UUID(EVENT)
    assert parse_event(EVENT.upper()) == uuid.UUID(EVENT)


@pytest.mark.parametrize(
    "text",
    [
        "\u0660" + EVENT[1:],  # Arabic-Indic zero: uuid.UUID alone takes it for 0
        EVENT[:-1] + "\uff10",  # fullwidth zero
        "x" * 10_000,
        "",
    ],
)
def test_parse_event_refuses_other_digits(text: str) -> None:
    with pytest.raises(Problem) as refused:
        parse_event(text)
    assert refused.value.status == 400 and len(refused.value.detail) < 200
