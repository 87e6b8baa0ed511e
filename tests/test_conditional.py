"""Ranges and conditional requests, as seeking players, resuming downloads and careful writers
use them (RFC 9110 sections 13 and 14)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from prerec.conditional import BEYOND_ANY_FILE, ByteRange, Unsatisfiable, parse_date, parse_range
from tests.conftest import EVENT, blob_files, ogg, put_head

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}
BODY = ogg(100_000, bytes(range(256)))
SIZE = len(BODY)

# Every test that stores blobs runs on the folder and on S3 (conftest.pytest_generate_tests).
BACKENDS = ("fs", "s3")


@pytest.fixture
async def stored(client):  # type: ignore[no-untyped-def]
    response = await client.put(KEY, data=BODY, headers=OGG)
    assert response.status == 201
    head = await client.head(KEY)
    return head.headers["ETag"], head.headers["Last-Modified"]


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


# Ranges


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),  # first byte
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),  # last byte
        ("bytes=-1", SIZE - 1, SIZE - 1),  # last byte as a suffix
        ("bytes=0-", 0, SIZE - 1),  # the whole file, as a range
        ("bytes=100-199", 100, 199),
        (f"bytes=500-{SIZE + 1000}", 500, SIZE - 1),  # an end beyond the file is clamped
        (f"bytes=-{SIZE * 2}", 0, SIZE - 1),  # a suffix longer than the file is all of it
        ("BYTES=10-19", 10, 19),
    ],
)
async def test_single_range_is_206_with_exact_bytes(client, stored, header: str, start: int, end: int) -> None:
    response = await client.get(KEY, headers={"Range": header})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert response.headers["Content-Length"] == str(end - start + 1)
    assert await response.read() == BODY[start : end + 1]
    assert response.headers["ETag"] == stored[0]


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_the_size(client, stored, header: str) -> None:
    response = await client.get(KEY, headers={"Range": header})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{SIZE}"
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=abc", "items=0-1", "bytes=9-3", "bytes=-"])
async def test_multi_or_malformed_range_gets_the_whole_body(client, stored, header: str) -> None:
    response = await client.get(KEY, headers={"Range": header})
    assert response.status == 200
    assert await response.read() == BODY


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("bytes=" + "9" * 4301 + "-", 416),  # past Python's int() limit: was a 500
        ("bytes=" + "9" * 4000 + "-" + "9" * 4001, 416),  # within the 8190-byte header limit
        ("bytes=0-" + "9" * 4301, 206),  # a huge end clamps to the file
        ("bytes=-" + "9" * 4301, 206),  # a huge suffix is all of it
        ("bytes=٠-١", 200),  # Arabic-Indic digits are not a range (was 206)
        ("bytes=0-９", 200),  # nor fullwidth ones
        ("byteſ=0-1", 200),  # nor a unit spelt with a long s
    ],
)
async def test_range_positions_are_ascii_digits_of_any_length(client, stored, header: str, status: int) -> None:
    response = await client.get(KEY, headers={"Range": header})
    assert response.status == status
    body = await response.read()
    if status == 206:
        assert response.headers["Content-Range"] == f"bytes 0-{SIZE - 1}/{SIZE}" and body == BODY
    elif status == 200:
        assert body == BODY
    else:
        assert response.headers["Content-Range"] == f"bytes */{SIZE}"
        assert len((await response.json())["detail"]) < 300  # the header is not echoed whole


async def test_two_range_headers_get_the_whole_body(client, stored) -> None:
    response = await client.get(KEY, headers=[("Range", "bytes=0-0"), ("Range", "bytes=5-9")])
    assert response.status == 200 and await response.read() == BODY


async def test_a_date_spelt_in_other_digits_is_no_precondition(client, stored) -> None:
    _, modified = stored
    arabic = modified.translate({ord(d): 0x0660 + int(d) for d in "0123456789"})
    assert (await client.get(KEY, headers={"If-Modified-Since": modified})).status == 304
    assert (await client.get(KEY, headers={"If-Modified-Since": arabic})).status == 200
    assert (await client.put(KEY, data=ogg(10), headers={**OGG, "If-Unmodified-Since": arabic})).status == 204


async def test_head_and_get_advertise_ranges_and_digest(client, stored) -> None:
    for method in ("GET", "HEAD"):
        response = await client.request(method, KEY)
        assert response.headers["Accept-Ranges"] == "bytes"
        import base64

        assert (
            response.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(BODY).digest()).decode()}:"
        )


async def test_resuming_a_download_with_if_range(client, stored) -> None:
    etag, modified = stored
    same = await client.get(KEY, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert same.status == 206 and await same.read() == BODY[1000:]
    by_date = await client.get(KEY, headers={"Range": "bytes=1000-", "If-Range": modified})
    assert by_date.status == 206
    stale = await client.get(KEY, headers={"Range": "bytes=1000-", "If-Range": '"0000"'})
    assert stale.status == 200 and await stale.read() == BODY
    weak = await client.get(KEY, headers={"Range": "bytes=1000-", "If-Range": "W/" + etag})
    assert weak.status == 200
    old_date = http_date(parsedate_to_datetime(modified) - timedelta(days=1))
    assert (await client.get(KEY, headers={"Range": "bytes=1000-", "If-Range": old_date})).status == 200


# Conditional reads


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_none_match_gives_304_with_validators(client, stored, method: str) -> None:
    etag, modified = stored
    for value in (etag, f'"nope", {etag}', "*", "W/" + etag):
        response = await client.request(method, KEY, headers={"If-None-Match": value})
        assert response.status == 304, value
        assert response.headers["ETag"] == etag and response.headers["Last-Modified"] == modified
        assert await response.read() == b""
    assert (await client.request(method, KEY, headers={"If-None-Match": '"other"'})).status == 200


async def test_if_modified_since(client, stored) -> None:
    _, modified = stored
    last = parsedate_to_datetime(modified)
    assert (await client.get(KEY, headers={"If-Modified-Since": modified})).status == 304
    assert (await client.get(KEY, headers={"If-Modified-Since": http_date(last + timedelta(hours=1))})).status == 304
    earlier = await client.get(KEY, headers={"If-Modified-Since": http_date(last - timedelta(seconds=1))})
    assert earlier.status == 200 and await earlier.read() == BODY


async def test_if_none_match_outranks_if_modified_since(client, stored) -> None:
    _, modified = stored
    response = await client.get(KEY, headers={"If-None-Match": '"other"', "If-Modified-Since": modified})
    assert response.status == 200


async def test_failed_if_match_or_if_unmodified_since_is_412(client, stored) -> None:
    etag, modified = stored
    last = parsedate_to_datetime(modified)
    assert (await client.get(KEY, headers={"If-Match": '"other"'})).status == 412
    assert (await client.get(KEY, headers={"If-Match": "W/" + etag})).status == 412  # strong comparison
    assert (await client.get(KEY, headers={"If-Match": etag})).status == 200
    assert (await client.get(KEY, headers={"If-Match": "*"})).status == 200
    early = http_date(last - timedelta(seconds=1))
    response = await client.get(KEY, headers={"If-Unmodified-Since": early})
    assert response.status == 412 and response.content_type == "application/problem+json"
    assert (await client.get(KEY, headers={"If-Unmodified-Since": modified})).status == 200
    # If-Match, when present, is what counts (If-Unmodified-Since is then ignored).
    assert (await client.get(KEY, headers={"If-Match": etag, "If-Unmodified-Since": early})).status == 200


async def test_preconditions_on_an_absent_prerecording_still_404(client) -> None:
    assert (await client.get(KEY, headers={"If-Match": '"x"'})).status == 404


# Conditional writes


async def test_create_only_put(client) -> None:
    first = await client.put(KEY, data=ogg(100, b"1"), headers={**OGG, "If-None-Match": "*"})
    assert first.status == 201
    second = await client.put(KEY, data=ogg(100, b"2"), headers={**OGG, "If-None-Match": "*"})
    assert second.status == 412 and second.content_type == "application/problem+json"
    assert await (await client.get(KEY)).read() == ogg(100, b"1")


async def test_put_with_if_match(client, settings, stored) -> None:
    etag, _ = stored
    assert (await client.put(KEY, data=ogg(10, b"x"), headers={**OGG, "If-Match": '"other"'})).status == 412
    assert await (await client.get(KEY)).read() == BODY
    assert len(blob_files(settings)) == 1
    replaced = await client.put(KEY, data=ogg(10, b"y"), headers={**OGG, "If-Match": etag})
    assert replaced.status == 204
    absent = f"/prerecordings/{EVENT}/2030-01-01T00:00"
    assert (await client.put(absent, data=ogg(10), headers={**OGG, "If-Match": etag})).status == 412
    assert (await client.put(absent, data=ogg(10), headers={**OGG, "If-Match": "*"})).status == 412


async def test_delete_with_if_match(client, stored) -> None:
    etag, _ = stored
    assert (await client.delete(KEY, headers={"If-Match": '"other"'})).status == 412
    assert (await client.get(KEY)).status == 200
    assert (await client.delete(KEY, headers={"If-Match": etag})).status == 204
    assert (await client.get(KEY)).status == 404


async def test_racing_create_only_puts_have_exactly_one_winner(client, settings) -> None:
    bodies = [ogg(50_000, bytes([i + 1])) for i in range(20)]
    responses = await asyncio.gather(
        *(client.put(KEY, data=body, headers={**OGG, "If-None-Match": "*"}) for body in bodies)
    )
    statuses = sorted(response.status for response in responses)
    assert statuses == [201] + [412] * 19
    winner = next(body for body, response in zip(bodies, responses, strict=True) if response.status == 201)
    assert await (await client.get(KEY)).read() == winner
    assert len(blob_files(settings)) == 1


async def test_failed_precondition_is_answered_before_the_body(client, stored) -> None:
    """With Expect: 100-continue, a create-only upload of an existing key never sends its body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 50_000_000, "If-None-Match: *", "Expect: 100-continue"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 412"), status_line
    writer.close()


async def test_failed_precondition_without_expect_reads_no_body(client, stored, settings) -> None:
    """Without Expect the answer still comes at the headers: the body is never stored."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 50_000_000, 'If-Match: "other"') + b"OggS")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 412"), status_line
    writer.close()
    assert list((settings.blob_dir / "tmp").glob("*")) == []


# Range parsing, by the hundred


def reference_range(header: str, size: int) -> ByteRange | None | type[Unsatisfiable]:
    """RFC 9110 sections 14.1.2 and 14.2, written out independently of the parser."""
    text = header.strip(" \t")
    unit, equals, spec = text.partition("=")
    if not equals or unit.lower() != "bytes" or not unit.isascii() or spec.count("-") != 1:
        return None
    first, last = spec.split("-")
    if any(c not in "0123456789" for c in first + last) or not (first or last):
        return None

    def magnitude(digits: str) -> tuple[int, str]:
        # Digit strings compared as numbers without int(), which refuses past 4300 digits.
        digits = digits.lstrip("0") or "0"
        return len(digits), digits

    def at_most_size(digits: str) -> int:
        # The exact value where it can matter (not past the size), the size itself beyond that.
        return int(digits.lstrip("0") or "0") if magnitude(digits) <= magnitude(str(size)) else size

    if not first:  # suffix-range
        suffix = at_most_size(last)
        if suffix == 0 or size == 0:
            return Unsatisfiable
        return ByteRange(max(size - suffix, 0), size - 1)
    if last and magnitude(last) < magnitude(first):
        return None  # invalid: ignored
    if magnitude(first) >= magnitude(str(size)):
        return Unsatisfiable
    return ByteRange(int(first), min(at_most_size(last), size - 1) if last else size - 1)


def parsed(header: str, size: int) -> ByteRange | None | type[Unsatisfiable]:
    try:
        return parse_range(header, size)
    except Unsatisfiable:
        return Unsatisfiable


BIG = str(BEYOND_ANY_FILE)
MAX = str(2**63 - 1)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=0-", 10, ByteRange(0, 9)),
        ("bytes=9-", 10, ByteRange(9, 9)),
        ("bytes=10-", 10, Unsatisfiable),
        ("bytes=-1", 10, ByteRange(9, 9)),
        ("bytes=-10", 10, ByteRange(0, 9)),
        ("bytes=-11", 10, ByteRange(0, 9)),
        ("bytes=-0", 10, Unsatisfiable),
        ("bytes=-000", 10, Unsatisfiable),
        ("bytes=-1", 0, Unsatisfiable),  # nothing to take a suffix of
        ("bytes=0-", 0, Unsatisfiable),
        ("bytes=3-2", 10, None),  # reversed: invalid, ignored
        ("bytes=3-3", 10, ByteRange(3, 3)),
        ("bytes=0003-0004", 10, ByteRange(3, 4)),  # leading zeros are still decimal
        ("bytes=" + "0" * 5000 + "3-4", 10, ByteRange(3, 4)),
        ("BYTES=1-2", 10, ByteRange(1, 2)),
        ("Bytes=1-2", 10, ByteRange(1, 2)),
        (" \tbytes=1-2\t ", 10, ByteRange(1, 2)),  # optional whitespace around the value
        ("bytes = 1-2", 10, None),
        ("bytes=1 -2", 10, None),
        ("bytes=1-2,", 10, None),
        ("bytes=1-2, 4-5", 10, None),  # several ranges: answered whole
        ("bytes=-", 10, None),
        ("bytes=", 10, None),
        ("bytes", 10, None),
        ("", 10, None),
        ("items=1-2", 10, None),
        ("bytes=+1-2", 10, None),
        ("bytes=1-+2", 10, None),
        ("bytes=0x1-2", 10, None),
        ("bytes=1_0-20", 100, None),  # int() would read 1_0 as 10
        ("bytes=1.0-2", 10, None),
        ("bytes=-1-2", 10, None),
        ("bytes=\u0660-\u0661", 10, None),  # Arabic-Indic
        ("bytes=\u0967-", 10, None),  # Devanagari
        ("bytes=\uff11-", 10, None),  # fullwidth
        ("bytes=\u00b9-", 10, None),  # superscript one (isdigit() is true for it)
        ("bytes=1-\U0001d7d9", 10, None),  # mathematical double-struck one
        ("byte\u017f=1-2", 10, None),  # long s folds to s under IGNORECASE
        ("bytes=1-2\u00a0", 10, None),  # no-break space is not optional whitespace
        ("\u3000bytes=1-2", 10, None),
        (f"bytes={MAX}-", 10, Unsatisfiable),
        (f"bytes={MAX}-", 2**63 - 1, Unsatisfiable),
        (f"bytes={2**63 - 2}-", 2**63 - 1, ByteRange(2**63 - 2, 2**63 - 2)),
        (f"bytes=0-{MAX}", 10, ByteRange(0, 9)),
        (f"bytes=-{MAX}", 10, ByteRange(0, 9)),
        (f"bytes={BIG}-", 10, Unsatisfiable),
        ("bytes=" + "9" * 19 + "-", 10, Unsatisfiable),
        ("bytes=" + "9" * 20 + "-", 10, Unsatisfiable),
        ("bytes=" + "9" * 4300 + "-", 10, Unsatisfiable),
        ("bytes=" + "9" * 4301 + "-", 10, Unsatisfiable),
        ("bytes=" + "9" * 100_000 + "-", 10, Unsatisfiable),
        ("bytes=5-" + "9" * 4301, 10, ByteRange(5, 9)),
        ("bytes=-" + "9" * 4301, 10, ByteRange(0, 9)),
        ("bytes=" + "9" * 30 + "-" + "9" * 31, 10, Unsatisfiable),
        ("bytes=" + "9" * 31 + "-" + "9" * 30, 10, None),  # reversed, however large
        ("bytes=" + "2" + "0" * 30 + "-" + "1" + "9" * 30, 10, None),  # same length, reversed
        ("bytes=" + "9" * 30 + "-" + "0" * 40 + "9" * 30, 10, Unsatisfiable),  # equal once zeros go
        ("bytes=1-" + "0" * 40 + "2", 10, ByteRange(1, 2)),
    ],
)
def test_parse_range_table(header: str, size: int, expected) -> None:  # type: ignore[no-untyped-def]
    assert parsed(header, size) == expected
    if len(header) <= 4300:  # what the reference's int() can read
        assert reference_range(header, size) == expected


def _position() -> st.SearchStrategy[str]:
    numbers = st.one_of(
        st.integers(0, 40), st.integers(0, 2**64), st.sampled_from([2**63 - 2, 2**63 - 1, 2**63, 10**19 - 1, 10**19])
    )
    rendered = st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(0, 3), numbers)
    huge = st.integers(20, 4000).map(lambda digits: "9" * digits)
    return st.one_of(rendered, rendered, huge, st.just(""))


_SPACE = st.sampled_from(["", " ", "\t", "  ", "\u00a0", "\u3000"])
_UNIT = st.sampled_from(["bytes", "BYTES", "Bytes", "byte", "bits", "byte\u017f", "items"])
_SEPARATOR = st.sampled_from(["-", "-", "-", "", "--", " - ", "\u2010", ","])
_TAIL = st.sampled_from(["", "", "", ",", ", 0-1", "-", "x", "\u0661"])
_HEADERS = st.builds(
    lambda lead, unit, equals, first, separator, last, tail, trail: (
        lead + unit + equals + first + separator + last + tail + trail
    ),
    _SPACE,
    _UNIT,
    st.sampled_from(["=", "=", "=", " =", ":"]),
    _position(),
    _SEPARATOR,
    _position(),
    _TAIL,
    _SPACE,
)
_SIZES = st.one_of(st.integers(0, 50), st.integers(0, 2**63 - 1))


@hypothesis_settings(max_examples=1000, deadline=None, database=None, derandomize=True)
@given(_HEADERS, _SIZES)
def test_parse_range_agrees_with_the_rfc(header: str, size: int) -> None:
    assert parsed(header, size) == reference_range(header, size)


@hypothesis_settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(st.text(), _SIZES)
def test_parse_range_of_any_text_is_a_range_inside_the_file_or_nothing(header: str, size: int) -> None:
    result = parsed(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size
    if not header.isascii():
        assert result is None


@hypothesis_settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1), _SIZES)
def test_no_unicode_digit_is_a_position(digits: str, size: int) -> None:
    if digits.isascii():
        return
    for header in (f"bytes={digits}-", f"bytes=0-{digits}", f"bytes=-{digits}"):
        assert parsed(header, size) is None


# Dates in precondition headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mon, 01 Jan 2024 00:00:00 GMT", datetime(2024, 1, 1, tzinfo=UTC)),
        ("Monday, 01-Jan-24 00:00:00 GMT", datetime(2024, 1, 1, tzinfo=UTC)),  # RFC 850, still to be read
        ("Mon Jan  1 00:00:00 2024", datetime(2024, 1, 1, tzinfo=UTC)),  # asctime
        (None, None),
        ("", None),
        ("yesterday", None),
        ("Mon, \u0660\u0661 Jan \u0662\u0660\u0662\u0664 00:00:00 GMT", None),
        ("Mon, 01 Jan 2024 \uff10\uff10:00:00 GMT", None),
        ("Mon, 01 Jan " + "9" * 5000 + " 00:00:00 GMT", None),
        ("Mon, 01 Jan 2024 00:00:" + "9" * 5000 + " GMT", None),
    ],
)
def test_parse_date(value: str | None, expected: datetime | None) -> None:
    assert parse_date(value) == expected
