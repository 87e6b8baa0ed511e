"""The /prerecordings endpoints as their users meet them: requests, answers, headers, errors."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import json
import logging
import socket
from datetime import datetime
from email.utils import parsedate_to_datetime

import aiohttp
import pytest
from multidict import MultiDict

from prerec.app import create_app
from prerec.prerecordings import ListQuery, parse_list_query
from prerec.problems import Problem
from tests import contract
from tests.conftest import (
    EVENT,
    Replica,
    blob_files,
    free_port,
    ogg,
    put_head,
    read_answer,
    sample,
    tmp_files,
    wait_for,
)

BASE = f"/prerecordings/{EVENT}"
OGG = {"Content-Type": "audio/ogg"}

# Every test that stores blobs runs on the folder and on S3 (conftest.pytest_generate_tests).
BACKENDS = ("fs", "s3")


async def put(client, start: str, body: bytes, headers=None):  # type: ignore[no-untyped-def]
    return await client.put(f"{BASE}/{start}", data=body, headers={**OGG, **(headers or {})})


async def assert_problem(response, status: int, *words: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    assert problem["title"]
    for word in words:
        assert word in problem["detail"], problem["detail"]
    return problem


# Upload and download


async def test_upload_then_download_returns_the_same_bytes_and_headers(client) -> None:
    body = ogg(300_000, b"\x01\x02")
    response = await put(client, "2024-01-01T00:00:00", body, {"Content-Type": "audio/ogg; codecs=opus"})
    assert response.status == 201
    etag = response.headers["ETag"]
    assert etag == f'"{hashlib.sha256(body).hexdigest()}"'
    created = await response.json()
    assert created["start"] == "2024-01-01T00:00:00" and created["size"] == len(body)

    response = await client.get(f"{BASE}/2024-01-01T00:00:00")
    assert response.status == 200
    assert await response.read() == body
    assert response.headers["Content-Type"] == "audio/ogg; codecs=opus"
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["ETag"] == etag
    assert parsedate_to_datetime(response.headers["Last-Modified"]).tzinfo is not None


async def test_head_sends_the_get_headers_without_body(client) -> None:
    body = ogg(5000)
    await put(client, "2024-01-01T10:00", body)
    get = await client.get(f"{BASE}/2024-01-01T10:00")
    head = await client.head(f"{BASE}/2024-01-01T10:00")
    assert head.status == 200
    assert await head.read() == b""
    for name in ("Content-Type", "Content-Length", "ETag", "Last-Modified"):
        assert head.headers[name] == get.headers[name]


async def test_replacing_answers_204_and_serves_the_new_version(client) -> None:
    assert (await put(client, "2024-01-01T00:00", ogg(1000, b"a"))).status == 201
    response = await put(client, "2024-01-01T00:00:00", ogg(2000, b"b"))
    assert response.status == 204
    assert response.headers["ETag"] == f'"{hashlib.sha256(ogg(2000, b"b")).hexdigest()}"'
    assert await (await client.get(f"{BASE}/2024-01-01T00:00:00.000")).read() == ogg(2000, b"b")


async def test_replace_leaves_exactly_one_blob_file(client, settings) -> None:
    for fill in (b"a", b"b", b"c"):
        await put(client, "2024-01-01T00:00", ogg(1000, fill))
    assert len(blob_files(settings)) == 1
    assert tmp_files(settings) == []


async def test_chunked_upload_is_stored(client) -> None:
    body = ogg(3 * 1024 * 1024 + 17, b"xyz")

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    response = await client.put(f"{BASE}/2024-02-02T02:02:02", data=chunks(), headers=OGG)
    assert response.status == 201
    assert await (await client.get(f"{BASE}/2024-02-02T02:02:02")).read() == body


async def test_fractional_starts_are_distinct_and_canonical(client) -> None:
    await put(client, "2024-01-01T00:00:00.5", ogg(10))
    await put(client, "2024-01-01T00:00:00", ogg(11))
    listing = await (await client.get(BASE)).json()
    assert [item["start"] for item in listing["prerecordings"]] == [
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00.500000",
    ]


async def test_download_of_absent_prerecording_is_404_problem(client) -> None:
    await assert_problem(await client.get(f"{BASE}/2024-01-01T00:00"), 404, EVENT, "2024-01-01T00:00:00")
    head = await client.head(f"{BASE}/2024-01-01T00:00")
    assert head.status == 404


async def test_delete_removes_row_and_file(client, settings) -> None:
    await put(client, "2024-01-01T00:00", ogg(100))
    response = await client.delete(f"{BASE}/2024-01-01T00:00")
    assert response.status == 204
    assert (await client.get(f"{BASE}/2024-01-01T00:00")).status == 404
    assert blob_files(settings) == []
    await assert_problem(await client.delete(f"{BASE}/2024-01-01T00:00"), 404)


# A player that leaves half way (seeking elsewhere): far more than the kernel buffers hold
# between the two ends, so the server is mid-transfer when it goes.
ABANDONED_SIZE = 16 * 1024 * 1024
ABANDONED_KEY = f"{BASE}/2024-01-01T00:00"


async def aborted_downloads(client) -> float:  # type: ignore[no-untyped-def]
    metrics = await (await client.get("/metrics")).text()
    return sample(
        metrics, "prerec_http_requests_total", route="/prerecordings/{event}/{start}", method="GET", status="aborted"
    )


async def test_a_client_leaving_mid_download_is_counted_as_aborted_and_harms_nothing(client, caplog) -> None:
    body = ogg(ABANDONED_SIZE, b"\x01\x02\x03")
    assert (await put(client, "2024-01-01T00:00", body)).status == 201

    caplog.set_level(logging.INFO)
    player = socket.socket()
    # A small receive window keeps the server's sendfile far from done when the player leaves.
    player.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    player.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(player, (client.host, client.port))
    await loop.sock_sendall(
        player, f"GET {ABANDONED_KEY} HTTP/1.1\r\nHost: x\r\nX-Request-ID: leaver-1\r\n\r\n".encode()
    )
    received = b""
    while len(received) < 100_000:
        received += await loop.sock_recv(player, 65536)
    assert received.startswith(b"HTTP/1.1 200")
    # Closing with unread data resets the connection, as a player seeking elsewhere does.
    player.close()

    await wait_for(lambda: aborted_downloads(client))
    assert await aborted_downloads(client) == 1
    [access] = [record for record in caplog.records if getattr(record, "request_id", None) == "leaver-1"]
    assert access.name == "prerec.access" and access.aborted is True  # type: ignore[attr-defined]
    assert access.status == 200  # type: ignore[attr-defined]
    # What went out, not the declared length: at least what the player read, far from all of it.
    assert len(received) <= access.bytes < ABANDONED_SIZE / 2  # type: ignore[attr-defined]
    metrics = await (await client.get("/metrics")).text()
    assert 0 < sample(metrics, "prerec_downloaded_bytes_total") < ABANDONED_SIZE / 2
    assert [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR] == []

    # The server is as healthy as before: it serves the whole file to the next player.
    assert (await client.get("/ready")).status == 200
    assert await (await client.get(ABANDONED_KEY)).read() == body
    assert await aborted_downloads(client) == 1


# Upload refusals


async def test_wrong_content_type_is_415(client, settings) -> None:
    response = await client.put(f"{BASE}/2024-01-01T00:00", data=ogg(100), headers={"Content-Type": "audio/mpeg"})
    await assert_problem(response, 415, "audio/ogg", "audio/mpeg")
    response = await client.put(f"{BASE}/2024-01-01T00:00", data=ogg(100), skip_auto_headers=["Content-Type"])
    await assert_problem(response, 415)
    assert blob_files(settings) == []


async def test_content_type_that_is_not_ascii_is_415(client, settings) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT {BASE}/2024-01-01T00:00 HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n".encode()
        + b"Content-Type: audio/ogg; x=\xff\r\n\r\nOggS1234"
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 415")
    writer.close()
    assert blob_files(settings) == []


async def test_empty_body_is_400(client) -> None:
    await assert_problem(await put(client, "2024-01-01T00:00", b""), 400, "empty")

    async def nothing():  # type: ignore[no-untyped-def]
        if False:
            yield b""

    response = await client.put(f"{BASE}/2024-01-01T00:00", data=nothing(), headers=OGG)
    await assert_problem(response, 400, "empty")


async def test_body_not_ogg_is_400_and_stores_nothing(client, settings) -> None:
    await assert_problem(await put(client, "2024-01-01T00:00", b"ID3\x03" + b"\0" * 5000), 400, "OggS")
    await assert_problem(await put(client, "2024-01-01T00:00", b"Og"), 400, "OggS")
    assert blob_files(settings) == [] and tmp_files(settings) == []
    assert (await client.get(f"{BASE}/2024-01-01T00:00")).status == 404


@pytest.fixture
async def limited(aiohttp_client, settings, database_url):  # type: ignore[no-untyped-def]
    """A client of a service that takes uploads of at most 1,000,000 bytes."""
    limited_settings = dataclasses.replace(settings, max_upload_bytes=1_000_000)
    return await aiohttp_client(create_app(limited_settings, database_url))


async def test_upload_at_the_limit_is_stored(limited) -> None:
    assert (await put(limited, "2024-01-01T00:00", ogg(1_000_000))).status == 201


async def test_declared_length_over_limit_is_413_before_the_body(limited, settings) -> None:
    client = limited
    response = await put(client, "2024-01-01T00:00", ogg(1_000_001))
    await assert_problem(response, 413, "1000000")
    assert tmp_files(settings) == [] and blob_files(settings) == []


async def test_chunked_body_growing_over_limit_is_413_and_leaves_nothing(limited, settings) -> None:
    client = limited
    await put(client, "2024-01-01T00:00", ogg(1000, b"o"))

    async def endless():  # type: ignore[no-untyped-def]
        yield b"OggS"
        for _ in range(100):
            yield b"\0" * 65536

    response = await client.put(f"{BASE}/2024-01-01T00:00", data=endless(), headers=OGG)
    await assert_problem(response, 413, "1000000")
    assert response.headers["Connection"] == "close"
    assert tmp_files(settings) == []
    assert len(blob_files(settings)) == 1
    assert await (await client.get(f"{BASE}/2024-01-01T00:00")).read() == ogg(1000, b"o")


async def test_expect_continue_is_refused_before_the_body(client) -> None:
    """A refused upload is answered at its headers: curl never sends the body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(f"{BASE}/2024-01-01T00:00", 100, "Expect: 100-continue", content_type="audio/mpeg"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 415"), status_line
    writer.close()

    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(f"{BASE}/2024-01-01T00:00", 8, "Expect: 100-continue"))
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100")
    await reader.readline()
    writer.write(b"OggS1234")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 201")
    writer.close()


async def test_a_partial_put_is_400_and_leaves_the_prerecording_whole(client, settings) -> None:
    """RFC 9110 §14.5: a PUT with Content-Range would otherwise store the fragment."""
    old = ogg(100_000, b"o")
    await put(client, "2024-01-01T00:00", old)
    response = await put(client, "2024-01-01T00:00", b"OggS123456", {"Content-Range": "bytes 0-9/100"})
    await assert_problem(response, 400, "Content-Range", "bytes 0-9/100", "whole file", "resumable")
    assert response.headers["Connection"] == "close"
    assert await (await client.get(f"{BASE}/2024-01-01T00:00")).read() == old
    assert len(blob_files(settings)) == 1 and tmp_files(settings) == []


async def test_curl_continue_at_is_refused_before_the_body(client, tmp_path) -> None:
    """`curl --continue-at -` on an upload sends Content-Range (and Expect: 100-continue)."""
    old = ogg(100_000, b"o")
    await put(client, "2024-01-01T00:00", old)
    upload = tmp_path / "prerecording.ogg"
    upload.write_bytes(ogg(10, b"n"))
    answer = tmp_path / "answer.json"
    curl = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--continue-at", "-", "--upload-file", str(upload),
        "--header", "Content-Type: audio/ogg", "--output", str(answer), "--write-out", "%{http_code}",
        str(client.make_url(f"{BASE}/2024-01-01T00:00")),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    status, _ = await asyncio.wait_for(curl.communicate(), 30)
    assert status == b"400", answer.read_text()
    assert "Content-Range" in json.loads(answer.read_text())["detail"]
    assert await (await client.get(f"{BASE}/2024-01-01T00:00")).read() == old


async def test_a_content_coded_body_is_415_with_accept_encoding_identity(client, settings) -> None:
    """aiohttp would store the decompressed bytes: not what was sent, nor what Content-MD5 covers."""
    body = gzip.compress(ogg(5000))
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    for coding in ("gzip", "x-unknown", "identity, deflate"):
        response = await put(client, "2024-01-01T00:00", body, {"Content-Encoding": coding, "Content-MD5": md5})
        await assert_problem(response, 415, "Content-Encoding", coding.split(", ")[-1])
        assert response.headers["Accept-Encoding"] == "identity"
    assert blob_files(settings) == [] and tmp_files(settings) == []
    # A body "coded" as identity is the body itself.
    response = await put(client, "2024-01-01T00:00", ogg(5000), {"Content-Encoding": "identity"})
    assert response.status == 201


async def test_a_content_coding_is_refused_before_100_continue(client) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(f"{BASE}/2024-01-01T00:00", 100, "Expect: 100-continue", "Content-Encoding: gzip"))
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 415")
    writer.close()


def chunked_put(path: str, transfer_encoding: str, body: bytes, *extra: str) -> bytes:
    lines = [f"PUT {path} HTTP/1.1", "Host: x", "Content-Type: audio/ogg", f"Transfer-Encoding: {transfer_encoding}"]
    head = "\r\n".join([*lines, *extra]) + "\r\n\r\n"
    return head.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("parser", ["C", "Python"])
async def test_an_unknown_transfer_coding_is_501_and_stores_nothing(tmp_path, storage_env, replicas, parser) -> None:
    """Both of aiohttp's parsers take `x, chunked` as chunked and would hand over the still coded bytes."""
    env = {**storage_env, "AIOHTTP_NO_EXTENSIONS": "1" if parser == "Python" else ""}
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    replicas.append(replica)
    replica.wait_ready()
    path = f"{BASE}/2024-01-01T00:00"
    for transfer_encoding, extra in [
        ("gzip, chunked", ()),
        ("x-custom, chunked", ()),
        ("x-custom, chunked", ("Expect: 100-continue",)),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        # The "coded" body starts like Ogg, so nothing but the coding check stands in its way.
        writer.write(chunked_put(path, transfer_encoding, ogg(1000), *extra))
        await writer.drain()
        status, _, body = await asyncio.wait_for(read_answer(reader), 5)
        problem = json.loads(body)
        assert status == 501, (transfer_encoding, extra, problem)
        assert transfer_encoding.split(",")[0] in problem["detail"]
        writer.close()
    async with aiohttp.ClientSession() as session:
        assert (await session.get(replica.url + path)).status == 404
        # Plain chunked is how curl and the web UI stream an upload.
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        writer.write(chunked_put(path, "chunked", ogg(1000)))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 201")
        writer.close()
        assert await (await session.get(replica.url + path)).read() == ogg(1000)


async def test_content_type_is_stored_normalised(client) -> None:
    response = await put(client, "2024-01-01T00:00", ogg(100), {"Content-Type": 'Audio/OGG ;Codecs="opus"'})
    assert (await response.json())["type"] == "audio/ogg; codecs=opus"
    download = await client.get(f"{BASE}/2024-01-01T00:00")
    assert download.headers["Content-Type"] == "audio/ogg; codecs=opus"
    listing = await (await client.get(BASE)).json()
    assert listing["prerecordings"][0]["type"] == "audio/ogg; codecs=opus"


@pytest.mark.parametrize(
    ("content_type", "words"),
    [
        ("audio/ogg; codecs", ["not a media type"]),
        ("audio/ogg; codecs=opus; codecs=vorbis", ["twice"]),
        ("audio/ogg; x=" + "a" * 8000, ["8013 characters", "at most 256"]),
    ],
)
async def test_malformed_or_long_content_type_is_415(client, settings, content_type: str, words: list[str]) -> None:
    response = await put(client, "2024-01-01T00:00", ogg(100), {"Content-Type": content_type})
    await assert_problem(response, 415, *words)
    assert blob_files(settings) == []


# Bad keys


@pytest.mark.parametrize(
    "start",
    [
        "2024-01-01",
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:00:00+01:00",
        "2024-01-01T00:00:60",
        "2024-02-30T00:00",
        "2024-01-01T24:00",
        "2024-01-01T00:00:00.1234567",
        "2024-01-01 00:00:00",
        "24-01-01T00:00",
        "2024-01-01T00:00:00.",
        "yesterday",
        "\u0662\u0660\u0662\u0664-01-01T00:00",
    ],
)
async def test_bad_start_is_400_naming_it(client, start: str) -> None:
    await assert_problem(await client.get(f"{BASE}/{start}"), 400, "start", start)
    await assert_problem(await put(client, start, ogg(10)), 400, "start")
    await assert_problem(await client.delete(f"{BASE}/{start}"), 400, "start")


async def test_bad_event_is_400_naming_it(client) -> None:
    await assert_problem(await client.get("/prerecordings/not-a-uuid"), 400, "event", "not-a-uuid")
    await assert_problem(await client.get("/prerecordings/not-a-uuid/2024-01-01T00:00"), 400, "event")


async def test_event_output_is_lower_case(client) -> None:
    await client.put(f"/prerecordings/{EVENT.upper()}/2024-01-01T00:00", data=ogg(10), headers=OGG)
    listing = await (await client.get(f"/prerecordings/{EVENT.upper()}")).json()
    assert listing["prerecordings"][0]["event"] == EVENT


async def test_unknown_route_is_404_and_wrong_method_405_with_allow(client) -> None:
    await assert_problem(await client.get("/nothing/here"), 404)
    response = await client.post(f"{BASE}/2024-01-01T00:00")
    await assert_problem(response, 405, "POST")
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "PUT", "DELETE"}


# Listing


async def stored(client, *starts: str) -> None:  # type: ignore[no-untyped-def]
    for start in starts:
        assert (await put(client, start, ogg(100))).status == 201


STARTS = [f"2024-01-{day:02d}T12:00:00" for day in range(1, 16)]


async def test_list_defaults_to_first_ten_ascending_with_total_count(client) -> None:
    await stored(client, *reversed(STARTS))
    listing = await (await client.get(BASE)).json()
    assert listing["count"] == 15 and listing["limit"] == 10 and listing["offset"] == 0
    assert [item["start"] for item in listing["prerecordings"]] == STARTS[:10]
    item = listing["prerecordings"][0]
    contract.check("PrerecordingList", listing)
    head = await client.head(f"{BASE}/{item['start']}")
    assert head.headers["ETag"] == item["etag"]


async def test_list_filters_pages_and_orders(client) -> None:
    await stored(client, *STARTS)
    query = {"after": "2024-01-03T12:00", "before": "2024-01-08T12:00:00", "order": "desc", "limit": "2", "offset": "1"}
    listing = await (await client.get(BASE, params=query)).json()
    assert listing["count"] == 5
    assert listing["limit"] == 2 and listing["offset"] == 1
    assert [item["start"] for item in listing["prerecordings"]] == ["2024-01-06T12:00:00", "2024-01-05T12:00:00"]


async def test_list_accepts_json_encoded_values_as_the_original_clients_send(client) -> None:
    await stored(client, *STARTS)
    query = {
        "after": json.dumps("2024-01-02T12:00:00"),
        "before": "null",
        "limit": "null",
        "offset": json.dumps(0),
        "order": json.dumps("asc"),
    }
    listing = await (await client.get(BASE, params=query)).json()
    assert listing["count"] == 14 and listing["limit"] is None
    assert len(listing["prerecordings"]) == 14


async def test_playout_paging_until_offset_reaches_count(client) -> None:
    await stored(client, *STARTS)
    seen, offset = [], 0
    while True:
        page = await (await client.get(BASE, params={"offset": str(offset)})).json()
        seen += [item["start"] for item in page["prerecordings"]]
        offset += page["limit"]
        if offset >= page["count"]:
            break
    assert seen == STARTS


async def test_list_of_an_event_with_nothing_is_empty(client) -> None:
    listing = await (await client.get("/prerecordings/00000000-0000-0000-0000-000000000000")).json()
    assert listing == {"count": 0, "limit": 10, "offset": 0, "prerecordings": []}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", ""),
        ("limit", "-1"),
        ("limit", "ten"),
        ("limit", "1.5"),
        ("offset", "-3"),
        ("offset", ""),
        ("order", "sideways"),
        ("order", '"sideways"'),
        ("after", "2024-01-01T00:00Z"),
        ("before", ""),
        ("after", '"2024-01-01'),
        ("limit", "99999999999999999999"),
        ("offset", "9" * 5000),
        ("limit", "\u0661\u0660"),
    ],
)
async def test_bad_list_query_is_400_naming_the_parameter(client, name: str, value: str) -> None:
    await assert_problem(await client.get(BASE, params={name: value}), 400, name)


async def test_limit_zero_counts_without_items(client) -> None:
    await stored(client, *STARTS[:3])
    listing = await (await client.get(BASE, params={"limit": "0"})).json()
    assert listing["count"] == 3 and listing["prerecordings"] == [] and listing["limit"] == 0


async def test_an_expectation_other_than_100_continue_is_417(client, settings) -> None:
    response = await put(client, "2024-01-01T00:00", ogg(100), {"Expect": "something-else"})
    await assert_problem(response, 417, "'something-else'", "not supported")
    assert blob_files(settings) == [] and tmp_files(settings) == []
    assert (await client.get(f"{BASE}/2024-01-01T00:00")).status == 404


# The list's query, parsed from a plain mapping


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], ListQuery()),
        ([("order", "desc")], ListQuery(descending=True)),
        ([("order", '"asc"')], ListQuery()),
        ([("limit", "null")], ListQuery(limit=None)),
        ([("limit", "0"), ("offset", "20")], ListQuery(limit=0, offset=20)),
        ([("offset", json.dumps(0)), ("before", "null")], ListQuery()),
        (
            [("after", '"2024-01-01T00:00"'), ("before", "2024-02-01T00:00:30.5")],
            ListQuery(after=datetime(2024, 1, 1), before=datetime(2024, 2, 1, 0, 0, 30, 500_000)),
        ),
        ([("unknown", "x"), ("unknown", "y")], ListQuery()),  # not ours to judge
    ],
)
def test_parse_list_query(pairs: list[tuple[str, str]], expected: ListQuery) -> None:
    assert parse_list_query(MultiDict(pairs)) == expected


@pytest.mark.parametrize("name", ["after", "before", "limit", "offset", "order"])
@pytest.mark.parametrize(
    "values",
    [
        ["2024-01-01T00:00", "garbage"],
        ["2024-01-01T00:00", "2024-01-01T00:00"],  # even the same value twice
        ["null", "null"],
        ["", ""],
        ["1", "2", "3"],
    ],
)
def test_a_list_parameter_given_twice_is_400_naming_it(name: str, values: list[str]) -> None:
    with pytest.raises(Problem) as refused:
        parse_list_query(MultiDict((name, value) for value in values))
    assert refused.value.status == 400
    assert f"query parameter {name} is given {len(values)} times" in refused.value.detail


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", "\u0661"),
        ("offset", '"\\u0661"'),  # JSON-escaped, then decoded: still not an ASCII digit
        ("limit", '"null"'),
        ("order", '""'),
        ("after", "2024-01-0\u0661T00:00"),
        ("offset", "1_000"),
        ("limit", "9" * 4301),
    ],
)
def test_parse_list_query_refuses_bad_values_naming_them(name: str, value: str) -> None:
    with pytest.raises(Problem) as refused:
        parse_list_query(MultiDict([(name, value)]))
    assert refused.value.status == 400 and name in refused.value.detail and len(refused.value.detail) < 300


async def test_duplicate_query_parameters_are_400_not_first_wins(client) -> None:
    await stored(client, *STARTS[:3])
    response = await client.get(f"{BASE}?after=2024-01-01T12:00&after=garbage")
    await assert_problem(response, 400, "after", "2 times")
    response = await client.get(f"{BASE}?limit=1&limit=1")
    await assert_problem(response, 400, "limit")


async def test_an_event_spelt_with_other_digits_is_400(client) -> None:
    await put(client, "2024-01-01T00:00", ogg(100))
    arabic_zero = "\u0660" + EVENT[1:]
    await assert_problem(await client.get(f"/prerecordings/{arabic_zero}"), 400, "UUID")
    await assert_problem(await client.get(f"/prerecordings/{arabic_zero}/2024-01-01T00:00"), 400, "UUID")


@pytest.mark.parametrize("length", ["\u0661\u0660", "+10", "1_0", "0x0a", "9" * 30])
async def test_content_length_is_ascii_digits_bounded(client, settings, length: str) -> None:
    """aiohttp's parser reads Content-Length; this checks it stays strict."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(f"{BASE}/2024-01-01T00:00", length) + ogg(10))  # type: ignore[arg-type]
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"400", status_line  # aiohttp's parser answers as HTTP/1.0
    assert blob_files(settings) == [] and tmp_files(settings) == []
