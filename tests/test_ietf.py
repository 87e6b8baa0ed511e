"""The IETF resumable-upload draft against a real server: the README-style curl session with a
PATCH cut short on a raw socket, tus-js-client's ietf-draft-05 mode run with Node, and the
header parsers as pure functions."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from prerec.config import SETTINGS_KEY, Settings
from prerec.problems import Problem
from prerec.uploads import ietf, tus
from tests.conftest import EVENT, blob_files, created_events, ogg, upload_files, wait_for

START = "2026-12-01T20:00"
KEY = f"/prerecordings/{EVENT}/{START}"
V8 = {"Upload-Draft-Interop-Version": "8"}
PARTIAL = {**V8, "Content-Type": "application/partial-upload"}
MISMATCH = "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"
NODE = shutil.which("node")

# Every test that keeps bytes runs on a folder and on a bucket (SeaweedFS), with the same assertions.
BACKENDS = ("fs", "s3")


def audio(size: int) -> bytes:
    return b"OggS" + os.urandom(size - 4)


async def create(client: TestClient, length: int, method: str = "PUT", **headers: str) -> str:
    response = await client.request(
        method,
        KEY,
        data=b"",
        headers={**V8, "Upload-Complete": "?0", "Upload-Length": str(length), "Content-Type": "audio/ogg", **headers},
    )
    assert response.status == 201, await response.text()
    assert response.headers["Upload-Complete"] == "?0"
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Draft-Interop-Version"] == "8"
    return response.headers["Location"]


async def answer_to_expect(client: TestClient, headers: str) -> bytes:
    """The status line a careful creation with Expect: 100-continue and `headers` (lines, each
    ended by CRLF) is answered before it sends its body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT {KEY} HTTP/1.1\r\nHost: x\r\nUpload-Draft-Interop-Version: 8\r\nUpload-Complete: ?0\r\n"
        f"Upload-Length: 1000\r\nContent-Length: 100\r\n{headers}Expect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return line


async def offset_of(client: TestClient, location: str) -> int:
    response = await client.head(location, headers=V8)
    assert response.status == 204, response.headers
    return int(response.headers["Upload-Offset"])


async def lease_taken(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(await conn.fetchval("SELECT lease_owner IS NOT NULL FROM uploads"))
    finally:
        await conn.close()


async def cut_patch(client: TestClient, location: str, data: bytes, sent: int, database_url: str) -> None:
    """A PATCH of all of `data` that sends `sent` bytes of it, then closes (a dropped link)
    once the server is reading the body (it holds the upload's lease)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {client.host}\r\nUpload-Draft-Interop-Version: 8\r\n"
        f"Content-Type: application/partial-upload\r\nUpload-Offset: 0\r\nUpload-Complete: ?1\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data[:sent])
    await writer.drain()
    await wait_for(lambda: lease_taken(database_url))
    writer.close()
    await writer.wait_closed()


# The session as a user types it


async def test_careful_creation_cut_patch_head_and_resume(client: TestClient, database_url: str) -> None:
    data = audio(300_000)
    before = await created_events(database_url)
    location = await create(client, len(data))
    assert location.startswith("/uploads/")
    assert (await client.get(KEY)).status == 404  # nothing visible until finished

    await cut_patch(client, location, data, 120_000, database_url)
    # Every byte that reached the server counts: HEAD gives them as the durable offset.
    await wait_for(lambda: offset_of_equals(client, location, 120_000))
    head = await client.head(location, headers=V8)
    assert head.headers["Upload-Complete"] == "?0"
    assert head.headers["Upload-Length"] == str(len(data))
    assert head.headers["Cache-Control"] == "no-store"

    response = await client.patch(
        location, data=data[120_000:], headers={**PARTIAL, "Upload-Offset": "120000", "Upload-Complete": "?1"}
    )
    assert response.status == 201, await response.text()
    item = await response.json()
    assert item["size"] == len(data)
    assert response.headers["ETag"]
    assert response.headers["Upload-Complete"] == "?1"
    assert response.headers["Upload-Offset"] == str(len(data))
    stored = await client.get(KEY)
    assert await stored.read() == data
    assert stored.headers["ETag"] == response.headers["ETag"]
    assert await created_events(database_url) == before + 1
    # The finished upload says so on HEAD.
    assert (await client.head(location, headers=V8)).headers["Upload-Complete"] == "?1"


async def offset_of_equals(client: TestClient, location: str, expected: int) -> bool:
    return await offset_of(client, location) == expected


async def test_post_creates_too_and_options_tells_the_limits(client: TestClient, settings: Settings) -> None:
    location = await create(client, 1000, method="POST")
    assert await offset_of(client, location) == 0
    options = await client.options(KEY, headers=V8)
    assert options.status == 204
    expiry = int(settings.upload_expiry_seconds)
    assert options.headers["Upload-Limit"] == f"max-size={settings.max_upload_bytes}, max-age={expiry}"
    v6 = await client.options(KEY, headers={"Upload-Draft-Interop-Version": "6"})
    assert v6.headers["Upload-Limit"] == f"max-size={settings.max_upload_bytes}, expires={expiry}"
    assert "Upload-Limit" not in (await client.options(KEY, headers={"Upload-Draft-Interop-Version": "5"})).headers


async def test_mismatching_offset_is_409_with_the_registered_problem(client: TestClient) -> None:
    location = await create(client, 1000)
    response = await client.patch(
        location, data=ogg(100), headers={**PARTIAL, "Upload-Offset": "50", "Upload-Complete": "?0"}
    )
    assert response.status == 409
    problem = await response.json()
    assert problem["type"] == MISMATCH
    assert (problem["expected-offset"], problem["provided-offset"]) == (0, 50)
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Complete"] == "?0"
    assert await offset_of(client, location) == 0


async def test_interop_3_is_400_naming_the_versions(client: TestClient, database_url: str) -> None:
    response = await client.put(
        KEY,
        data=b"",
        headers={
            "Upload-Draft-Interop-Version": "3",
            "Upload-Complete": "?0",
            "Upload-Length": "100",
            "Content-Type": "audio/ogg",
        },
    )
    assert response.status == 400
    assert "5, 6, 7, 8" in (await response.json())["detail"]
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uploads") == 0
    finally:
        await conn.close()


async def test_interop_3_whole_file_is_a_plain_put_and_its_resumable_creation_400(
    client: TestClient, database_url: str
) -> None:
    """iOS 17's URLSession sends interop 3 and the whole file with `Upload-Incomplete: ?0`,
    expecting a 104 for resumption; without one that is an ordinary upload (the draft asks a
    server that does not speak the version to treat it so). A creation for later parts is not."""
    data = audio(5000)
    v3 = {"Upload-Draft-Interop-Version": "3", "Content-Type": "audio/ogg"}
    whole = await client.put(KEY, data=data, headers={**v3, "Upload-Incomplete": "?0"})
    assert whole.status == 201, await whole.text()
    assert "Location" not in whole.headers
    assert await (await client.get(KEY)).read() == data
    part = await client.put(KEY, data=data[:100], headers={**v3, "Upload-Incomplete": "?1", "Upload-Length": "5000"})
    assert part.status == 400
    assert "5, 6, 7, 8" in (await part.json())["detail"]
    assert await (await client.get(KEY)).read() == data
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uploads") == 0
    finally:
        await conn.close()


async def test_upload_limit_tells_the_time_the_upload_has_left(client: TestClient, database_url: str) -> None:
    location = await create(client, 1000)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE uploads SET expires_at = now() + interval '100 seconds'")
    finally:
        await conn.close()
    for version, name in (("8", "max-age"), ("6", "expires")):
        response = await client.head(location, headers={"Upload-Draft-Interop-Version": version})
        assert response.status == 204
        limit = dict(item.strip().split("=") for item in response.headers["Upload-Limit"].split(","))
        assert 95 <= int(limit[name]) <= 100, limit


@pytest.mark.parametrize("coding", ["gzip", "deflate", "x-unknown"])
async def test_a_content_coding_is_415_on_creation_and_patch(client: TestClient, coding: str) -> None:
    """A coded body is not the bytes to store (aiohttp would decode gzip, and a body that does
    not decode was a 500): refused as on PUT."""
    creation = await client.put(
        KEY,
        data=b"OggSxxxx",
        headers={
            **V8,
            "Upload-Complete": "?0",
            "Upload-Length": "100",
            "Content-Type": "audio/ogg",
            "Content-Encoding": coding,
        },
    )
    assert creation.status == 415, await creation.text()
    location = await create(client, 100)
    patch = await client.patch(
        location,
        data=b"OggSxxxx",
        headers={**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?0", "Content-Encoding": coding},
    )
    assert patch.status == 415, await patch.text()
    assert patch.content_type == "application/problem+json"
    assert await offset_of(client, location) == 0


async def test_v5_patch_needs_no_type_v6_needs_partial_upload(client: TestClient) -> None:
    location = await create(client, 1000)
    v6 = {"Upload-Draft-Interop-Version": "6", "Content-Type": "application/octet-stream"}
    refused = await client.patch(location, data=ogg(100), headers={**v6, "Upload-Offset": "0", "Upload-Complete": "?0"})
    assert refused.status == 415
    assert refused.headers["Upload-Draft-Interop-Version"] == "6"
    v5 = {"Upload-Draft-Interop-Version": "5", "Content-Type": "application/octet-stream"}
    taken = await client.patch(location, data=ogg(100), headers={**v5, "Upload-Offset": "0", "Upload-Complete": "?0"})
    assert taken.status == 204, await taken.text()
    assert taken.headers["Upload-Offset"] == "100"
    assert taken.headers["Upload-Complete"] == "?0"


async def test_complete_that_does_not_reach_the_length_is_400(client: TestClient) -> None:
    location = await create(client, 1000)
    response = await client.patch(
        location, data=ogg(100), headers={**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?1"}
    )
    assert response.status == 400
    assert (await response.json())["type"].endswith("#inconsistent-upload-length")
    # The bytes are good ones at the right place: kept, and the answer says where to go on.
    assert response.headers["Upload-Offset"] == "100"
    assert await offset_of(client, location) == 100


async def test_appending_to_a_completed_upload_is_refused(client: TestClient) -> None:
    # Draft §Upload Append: a completed upload is never modified; a non-empty append is an
    # inconsistent length (400), an empty one may be 410 completed-upload. An empty `?1` at the
    # end is the lost answer asked again (the upload table keeps it).
    data = audio(100)
    location = await create(client, len(data))
    done = await client.patch(location, data=data, headers={**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?1"})
    assert done.status == 201
    for offset in ("100", "40"):
        more = await client.patch(
            location, data=b"more", headers={**PARTIAL, "Upload-Offset": offset, "Upload-Complete": "?1"}
        )
        assert more.status == 400, await more.text()
        assert (await more.json())["type"].endswith("#inconsistent-upload-length")
    empty = await client.patch(location, data=b"", headers={**PARTIAL, "Upload-Offset": "40", "Upload-Complete": "?1"})
    assert empty.status == 410
    assert (await empty.json())["type"] == "https://iana.org/assignments/http-problem-types#completed-upload"
    again = await client.patch(location, data=b"", headers={**PARTIAL, "Upload-Offset": "100", "Upload-Complete": "?1"})
    assert again.status == 201 and again.headers["ETag"] == done.headers["ETag"]
    assert await (await client.get(KEY)).read() == data


async def test_upload_complete_or_no_interop_header_is_the_plain_put(client: TestClient, database_url: str) -> None:
    data = ogg(5000)
    response = await client.put(KEY, data=data, headers={**V8, "Upload-Complete": "?1", "Content-Type": "audio/ogg"})
    assert response.status == 201
    assert "Location" not in response.headers and "Upload-Complete" not in response.headers
    plain = await client.put(KEY, data=ogg(6000), headers={"Content-Type": "audio/ogg"})
    assert plain.status == 204
    assert "Upload-Draft-Interop-Version" not in plain.headers
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uploads") == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize(
    ("preconditions", "stored_first"),
    [({"If-None-Match": "*"}, True), ({"If-Match": '"' + "0" * 64 + '"'}, True), ({"If-Match": "*"}, False)],
)
async def test_a_precondition_failing_at_creation_is_412_as_on_put_and_makes_no_upload(
    client: TestClient, database_url: str, method: str, preconditions: dict[str, str], stored_first: bool
) -> None:
    if stored_first:
        assert (await client.put(KEY, data=ogg(50), headers={"Content-Type": "audio/ogg"})).status == 201
    put = await client.put(KEY, data=ogg(60), headers={"Content-Type": "audio/ogg", **preconditions})
    assert put.status == 412
    response = await client.request(
        method,
        KEY,
        data=b"",
        headers={**V8, "Upload-Complete": "?0", "Upload-Length": "1000", "Content-Type": "audio/ogg", **preconditions},
    )
    assert response.status == 412, await response.text()
    assert response.headers["Upload-Draft-Interop-Version"] == "8" and "Location" not in response.headers
    assert await response.json() == await put.json()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uploads") == 0
    finally:
        await conn.close()


async def test_expect_continue_refuses_a_creation_whose_precondition_fails_before_the_body(
    client: TestClient,
) -> None:
    assert (await client.put(KEY, data=ogg(50), headers={"Content-Type": "audio/ogg"})).status == 201
    ogg_type = "Content-Type: audio/ogg\r\n"
    assert b" 412 " in await answer_to_expect(client, f"{ogg_type}If-None-Match: *\r\n")
    # The negative control: it holds, the body is asked for.
    assert b" 100 " in await answer_to_expect(client, f"{ogg_type}If-Match: *\r\n")


async def test_if_unmodified_since_on_a_creation_is_refused_not_ignored(client: TestClient) -> None:
    # The upload's preconditions are decided when it completes, and only If-Match and
    # If-None-Match: * are kept: a date ignored would let the upload replace a newer version.
    stored = ogg(50)
    assert (await client.put(KEY, data=stored, headers={"Content-Type": "audio/ogg"})).status == 201
    before = "Mon, 01 Jan 2024 00:00:00 GMT"
    data = ogg(100)
    headers = {**V8, "Upload-Complete": "?0", "Upload-Length": "100", "Content-Type": "audio/ogg"}
    response = await client.put(KEY, data=data, headers={**headers, "If-Unmodified-Since": before})
    assert response.status == 400
    assert "If-Unmodified-Since" in (await response.json())["detail"]
    assert await (await client.get(KEY)).read() == stored
    # A plain PUT decides it: 412.
    plain = await client.put(KEY, data=data, headers={"Content-Type": "audio/ogg", "If-Unmodified-Since": before})
    assert plain.status == 412
    # With If-Match it is not read (RFC 9110 §13.1.4), so the creation goes on.
    etag = (await client.head(KEY)).headers["ETag"]
    taken = await client.put(KEY, data=data, headers={**headers, "If-Unmodified-Since": before, "If-Match": etag})
    assert taken.status == 204, await taken.text()
    assert await (await client.get(KEY)).read() == data


async def test_expect_continue_refuses_an_if_none_match_other_than_star_before_the_body(client: TestClient) -> None:
    # Nothing stored, so no precondition fails: the tag is refused as one an upload cannot keep.
    ogg_type = "Content-Type: audio/ogg\r\n"
    assert b" 400 " in await answer_to_expect(client, f'{ogg_type}If-None-Match: "abc"\r\n')
    # The negative control: `*` is kept, the body is asked for.
    assert b" 100 " in await answer_to_expect(client, f"{ogg_type}If-None-Match: *\r\n")
    # Without Expect, the body is left unread: the connection is not kept for another request.
    headers = {**V8, "Upload-Complete": "?0", "Upload-Length": "1000", "Content-Type": "audio/ogg"}
    response = await client.put(KEY, data=ogg(100), headers={**headers, "If-None-Match": '"abc"'})
    assert response.status == 400 and "If-None-Match may only be '*'" in (await response.json())["detail"]
    assert response.headers["Connection"] == "close"


async def test_expect_continue_refuses_a_bad_creation_before_the_body(client: TestClient) -> None:
    assert b" 415 " in await answer_to_expect(client, "Content-Type: text/plain\r\n")
    assert b" 100 " in await answer_to_expect(client, "Content-Type: audio/ogg\r\n")


async def test_write_token_guards_creation_patch_delete(app, aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    app[SETTINGS_KEY] = dataclasses.replace(settings, write_token="secret")
    client = await aiohttp_client(app)
    headers = {**V8, "Upload-Complete": "?0", "Upload-Length": "100", "Content-Type": "audio/ogg"}
    assert (await client.put(KEY, data=b"", headers=headers)).status == 401
    assert (await client.post(KEY, data=b"", headers=headers)).status == 401
    response = await client.put(KEY, data=b"", headers={**headers, "Authorization": "Bearer secret"})
    assert response.status == 201
    location = response.headers["Location"]
    patch = {**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?0"}
    assert (await client.patch(location, data=ogg(10), headers=patch)).status == 401
    assert (await client.delete(location, headers=V8)).status == 401
    assert (await client.head(location, headers=V8)).status == 204
    assert (await client.delete(location, headers={**V8, "Authorization": "Bearer secret"})).status == 204
    assert (await client.head(location, headers=V8)).status == 410


async def test_precondition_failing_at_the_end_is_412_complete_and_discards_the_bytes(
    client: TestClient, settings: Settings
) -> None:
    data = audio(1000)
    location = await create(client, len(data), **{"If-None-Match": "*"})
    # Meanwhile a plain PUT creates the prerecording.
    put = await client.put(KEY, data=ogg(50), headers={"Content-Type": "audio/ogg"})
    assert put.status == 201
    response = await client.patch(
        location, data=data, headers={**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?1"}
    )
    # What the PUT would have answered, and the upload is over: the client must not resume it.
    assert response.status == 412, await response.text()
    assert response.content_type == "application/problem+json"
    assert response.headers["Upload-Complete"] == "?1"
    assert upload_files(settings) == []
    assert len(blob_files(settings)) == 1  # the PUT's only
    async with client.get(KEY) as stored:
        assert await stored.read() == ogg(50)


# tus-js-client, a client nobody here wrote, in its IETF mode

UPLOAD_MJS = """
import fs from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path] = process.argv.slice(2);
// Its default retries would hide a bad answer (a retry's HEAD finds the upload complete).
const retried = [];
const upload = new tus.Upload(fs.createReadStream(path), {
  endpoint,
  protocol: "ietf-draft-05",
  uploadSize: fs.statSync(path).size,
  metadata: { filetype: "audio/ogg" },
  onShouldRetry(error) { retried.push(String(error)); return true; },
  onError(error) { console.error(String(error)); process.exit(1); },
  onSuccess() { console.log(JSON.stringify({ url: upload.url, retried })); },
});
upload.start();
"""


async def test_tus_js_client_ietf_draft_05_uploads_a_file_whole(  # type: ignore[no-untyped-def]
    aiohttp_server, app, tmp_path: Path, database_url: str, tus_js_client: Path
) -> None:
    assert NODE is not None
    (tmp_path / "node_modules").symlink_to(tus_js_client / "node_modules")
    (tmp_path / "upload.mjs").write_text(UPLOAD_MJS)
    data = audio(6 * 1024 * 1024 + 5)
    (tmp_path / "show.ogg").write_bytes(data)
    server = await aiohttp_server(app)
    before = await created_events(database_url)
    node = await asyncio.create_subprocess_exec(
        NODE, "upload.mjs", str(server.make_url(KEY)), str(tmp_path / "show.ogg"), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(node.communicate(), 120)
    assert node.returncode == 0, err.decode()
    result = json.loads(out)
    assert "/uploads/" in result["url"]
    assert result["retried"] == []
    url = server.make_url(KEY)
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await created_events(database_url) == before + 1


# Parsing (pure)


def test_interop_versions_5_to_8_only() -> None:
    assert ietf.parse_version({}) is None
    for version in (5, 6, 7, 8):
        assert ietf.parse_version({"Upload-Draft-Interop-Version": f" {version}"}) == version
    for bad in ("3", "4", "9", "x", "", "٥", "0008"):
        with pytest.raises(Problem) as refused:
            ietf.parse_version({"Upload-Draft-Interop-Version": bad})
        assert refused.value.status == 400 and "5, 6, 7, 8" in refused.value.detail


def test_upload_complete_is_a_structured_boolean() -> None:
    assert ietf.parse_complete({}) is None
    assert ietf.parse_complete({"Upload-Complete": "?0"}) is False
    assert ietf.parse_complete({"Upload-Complete": "?1"}) is True
    for bad in ("1", "true", "?2", "?", ""):
        with pytest.raises(Problem) as refused:
            ietf.parse_complete({"Upload-Complete": bad})
        assert refused.value.status == 400
    with pytest.raises(Problem):
        ietf.require_complete({})


def test_careful_creation_needs_the_interop_header_and_not_complete() -> None:
    assert not ietf.is_careful_creation({"Upload-Complete": "?0"})
    assert not ietf.is_careful_creation({**V8, "Upload-Complete": "?1"})
    assert ietf.is_careful_creation({**V8, "Upload-Complete": "?0"})
    assert ietf.is_careful_creation({**V8})  # the creation handler names the missing header
    assert ietf.is_careful_creation({**V8, "Upload-Complete": "yes"})
    v3 = {"Upload-Draft-Interop-Version": "3"}
    assert not ietf.is_careful_creation({**v3, "Upload-Incomplete": "?0"})
    assert ietf.is_careful_creation({**v3, "Upload-Incomplete": "?1"})
    assert ietf.is_careful_creation({**V8, "Upload-Incomplete": "?0"})  # not read from 5 on: 400 there


def test_offset_length_type_and_limit() -> None:
    assert tus.parse_offset({"Upload-Offset": "12"}) == 12
    assert ietf.parse_length({"Upload-Length": "34"}) == 34
    for parse, name in ((tus.parse_offset, "Upload-Offset"), (ietf.parse_length, "Upload-Length")):
        with pytest.raises(Problem):
            parse({})
        with pytest.raises(Problem):
            parse({name: "-1"})
    assert ietf.creation_type({"Content-Type": "audio/ogg"}) == "audio/ogg"
    assert (
        ietf.creation_type({"Content-Type": "application/partial-upload", "Upload-Metadata": "filetype YXVkaW8vb2dn"})
        == "audio/ogg"
    )
    with pytest.raises(Problem) as refused:
        ietf.creation_type({})
    assert refused.value.status == 415
    ietf.check_patch_type(5, {})
    with pytest.raises(Problem):
        ietf.check_patch_type(6, {"Content-Type": "application/offset+octet-stream"})
    ietf.check_patch_type(7, {"Content-Type": "application/partial-upload"})
    assert ietf.upload_limit(5, 10, 20) is None
    assert ietf.upload_limit(6, 10, 20) == "max-size=10, expires=20"
    assert ietf.upload_limit(8, 10, 20) == "max-size=10, max-age=20"


def test_a_date_precondition_is_refused_only_where_rfc_9110_reads_it() -> None:
    date = "Mon, 01 Jan 2024 00:00:00 GMT"
    with pytest.raises(Problem) as refused:
        ietf.check_no_date_precondition({"If-Unmodified-Since": date})
    assert refused.value.status == 400
    ietf.check_no_date_precondition({"If-Unmodified-Since": date, "If-Match": '"a"'})  # not read beside If-Match
    ietf.check_no_date_precondition({"If-Unmodified-Since": "yesterday"})  # no date: ignored, as by PUT
    ietf.check_no_date_precondition({})
