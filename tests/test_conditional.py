"""Ranges and conditional requests, as seeking players, resuming downloads and careful writers
use them (RFC 9110 sections 13 and 14)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from tests.conftest import EVENT, blob_files, ogg, put_head

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}
BODY = ogg(100_000, bytes(range(256)))
SIZE = len(BODY)


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
