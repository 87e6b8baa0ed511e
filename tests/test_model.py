"""The rules of what an upload's Content-Type may be, over plain strings."""

from __future__ import annotations

import pytest

from prerec.model import MAX_CONTENT_TYPE, parse_content_type
from prerec.problems import Problem


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
