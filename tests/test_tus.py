"""tus 1.0.0 against a real server: tuspy (a client nobody here wrote), raw sockets for cuts,
and the header parsers as pure functions."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from tusclient.client import TusClient

from prerec.config import Settings
from prerec.problems import Problem
from prerec.uploads import engine, tus
from tests.conftest import EVENT, blob_files, created_events, ogg, upload_files, wait_for
from tests.cutproxy import Cut, CuttingProxy

START = "2026-12-01T20:00"
TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}

# Every test that keeps bytes runs on a folder and on a bucket (SeaweedFS), with the same assertions.
BACKENDS = ("fs", "s3")


def metadata(event: str = EVENT, start: str = START, filetype: str = "audio/ogg") -> str:
    pairs = {"event": event, "start": start, "filetype": filetype}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


def audio(size: int) -> bytes:
    return b"OggS" + os.urandom(size - 4)


async def create(client: TestClient, length: int, **headers: str) -> str:
    response = await client.post(
        "/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(), **headers}
    )
    assert response.status == 201, await response.text()
    return response.headers["Location"]


async def offset_of(client: TestClient, location: str) -> int:
    response = await client.head(location, headers=TUS)
    assert response.status == 200
    return int(response.headers["Upload-Offset"])


async def stored(client: TestClient) -> bytes:
    response = await client.get(f"/prerecordings/{EVENT}/{START}")
    assert response.status == 200, await response.text()
    return await response.read()


def segments(settings: Settings) -> list[Any]:
    return upload_files(settings)


# tuspy


@pytest.mark.parametrize("chunk_size", [None, 1024 * 1024 + 17])
async def test_tuspy_uploads_a_file_whole_and_in_chunks(
    client: TestClient, settings: Settings, database_url: str, tmp_path: Path, chunk_size: int | None
) -> None:
    data = audio(5 * 1024 * 1024 + 3)
    path = tmp_path / "show.ogg"
    path.write_bytes(data)
    tus_client = TusClient(str(client.make_url("/uploads")))
    options = {} if chunk_size is None else {"chunk_size": chunk_size}
    uploader = tus_client.async_uploader(
        file_path=str(path),
        metadata={"event": EVENT, "start": START, "filetype": "audio/ogg"},
        retries=3,
        retry_delay=0,
        upload_checksum=True,
        **options,
    )
    await uploader.upload()
    body = await stored(client)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert await created_events(database_url) == 1
    assert segments(settings) == []
    assert len(blob_files(settings)) == 1


# The protocol, request by request


async def test_options_tells_the_version_extensions_and_limits(client: TestClient, settings: Settings) -> None:
    response = await client.options("/uploads")
    assert response.status == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "expiration",
        "checksum",
    }
    assert response.headers["Tus-Max-Size"] == str(settings.max_upload_bytes)
    assert response.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"


async def test_head_tells_offset_length_and_expiry(client: TestClient) -> None:
    location = await create(client, 100)
    response = await client.head(location, headers=TUS)
    assert response.status == 200
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Length"] == "100"
    assert response.headers["Cache-Control"] == "no-store"
    assert "GMT" in response.headers["Upload-Expires"]
    assert response.headers["Tus-Resumable"] == "1.0.0"


async def test_patches_append_and_the_last_one_finishes(client: TestClient, database_url: str) -> None:
    data = audio(3000)
    location = await create(client, len(data))
    response = await client.patch(location, data=data[:1000], headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 204, await response.text()
    assert response.headers["Upload-Offset"] == "1000"
    # Not visible before it is finished.
    assert (await client.get(f"/prerecordings/{EVENT}/{START}")).status == 404
    response = await client.patch(location, data=data[1000:], headers={**PATCH, "Upload-Offset": "1000"})
    assert response.status == 204, await response.text()
    assert response.headers["Upload-Offset"] == "3000"
    assert response.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert await stored(client) == data
    # The client lost that answer and asks again: the same answer, no second save.
    again = await client.patch(location, data=b"", headers={**PATCH, "Upload-Offset": "3000"})
    assert again.status == 204
    assert again.headers["ETag"] == response.headers["ETag"]
    assert await created_events(database_url) == 1


async def test_bytes_sent_to_a_finished_upload_are_refused_not_taken_for_its_answer(client: TestClient) -> None:
    data = audio(100)
    location = await create(client, len(data))
    done = await client.patch(location, data=data, headers={**PATCH, "Upload-Offset": "0"})
    assert done.status == 204
    # At its end, with bytes: they go past the length. Only an empty body asks for the answer again.
    response = await client.patch(location, data=b"more", headers={**PATCH, "Upload-Offset": "100"})
    assert response.status == 410, await response.text()
    assert "finished" in (await response.json())["detail"]
    assert await stored(client) == data


async def test_creation_with_upload(client: TestClient) -> None:
    data = audio(2000)
    response = await client.post(
        "/uploads",
        data=data[:500],
        headers={**PATCH, "Upload-Length": "2000", "Upload-Metadata": metadata()},
    )
    assert response.status == 201, await response.text()
    assert response.headers["Upload-Offset"] == "500"
    location = response.headers["Location"]
    response = await client.patch(location, data=data[500:], headers={**PATCH, "Upload-Offset": "500"})
    assert response.status == 204
    assert await stored(client) == data


async def test_offset_mismatch_is_409_with_the_offset(client: TestClient) -> None:
    location = await create(client, 100)
    response = await client.patch(location, data=ogg(10), headers={**PATCH, "Upload-Offset": "5"})
    assert response.status == 409
    assert response.headers["Upload-Offset"] == "0"
    assert response.content_type == "application/problem+json"


async def test_wrong_content_type_is_415(client: TestClient) -> None:
    location = await create(client, 100)
    response = await client.patch(
        location, data=ogg(10), headers={**TUS, "Content-Type": "audio/ogg", "Upload-Offset": "0"}
    )
    assert response.status == 415


@pytest.mark.parametrize("version", [None, "0.2.2"])
async def test_missing_or_other_tus_version_is_412(client: TestClient, version: str | None) -> None:
    headers = {"Upload-Length": "100", "Upload-Metadata": metadata()}
    if version is not None:
        headers["Tus-Resumable"] = version
    response = await client.post("/uploads", headers=headers)
    assert response.status == 412
    assert response.headers["Tus-Version"] == "1.0.0"


async def test_filetype_other_than_ogg_is_415(client: TestClient) -> None:
    response = await client.post(
        "/uploads", headers={**TUS, "Upload-Length": "100", "Upload-Metadata": metadata(filetype="audio/mpeg")}
    )
    assert response.status == 415


async def test_bad_key_in_metadata_is_400_as_on_put(client: TestClient) -> None:
    response = await client.post(
        "/uploads", headers={**TUS, "Upload-Length": "100", "Upload-Metadata": metadata(event="nope")}
    )
    assert response.status == 400
    assert "not a UUID" in (await response.json())["detail"]


async def test_declared_length_over_the_limit_is_413(client: TestClient, settings: Settings) -> None:
    response = await client.post(
        "/uploads",
        headers={**TUS, "Upload-Length": str(settings.max_upload_bytes + 1), "Upload-Metadata": metadata()},
    )
    assert response.status == 413


async def test_bytes_past_the_length_are_400_after_keeping_what_fit(client: TestClient) -> None:
    location = await create(client, 100)
    response = await client.patch(location, data=ogg(150), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 400
    # Content-Length said so: refused before a byte was read.
    assert await offset_of(client, location) == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_chunked_body_past_the_length_is_400_and_never_finishes_the_upload(client: TestClient) -> None:
    """Without a Content-Length the overflow shows only as it arrives: none of that body counts,
    so the upload is not complete, and no later HEAD publishes a file its client was told was
    refused. The upload goes on from its offset with the right bytes."""
    location = await create(client, 1000)
    data = audio(1000)

    async def too_long() -> AsyncIterator[bytes]:
        yield data
        yield b"extra"

    response = await client.patch(location, data=too_long(), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 400
    assert "past the declared length" in (await response.json())["detail"]
    assert response.headers["Upload-Offset"] == "0"
    assert await offset_of(client, location) == 0
    assert (await client.get(f"/prerecordings/{EVENT}/{START}")).status == 404
    finish = await client.patch(location, data=data, headers={**PATCH, "Upload-Offset": "0"})
    assert finish.status == 204
    assert await stored(client) == data


async def test_a_body_that_pauses_at_the_length_then_goes_past_it_never_finishes_the_upload(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause makes what arrived durable, but never the whole length: a body that then goes
    on past it is refused with nothing of it counted, not published after a 400."""
    monkeypatch.setattr(engine, "COMMIT_SECONDS", 0.1)
    location = await create(client, 1000)
    data = audio(1000)

    async def pausing() -> AsyncIterator[bytes]:
        yield data
        await asyncio.sleep(1)
        yield b"extra"

    response = await client.patch(location, data=pausing(), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 400
    assert await offset_of(client, location) == 0
    assert (await client.get(f"/prerecordings/{EVENT}/{START}")).status == 404


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_the_ogg_pattern_is_checked_where_it_lies_across_patches(client: TestClient) -> None:
    """Each PATCH's bytes are checked at their place in the file, not as if they began it: a
    first append of 'MZ' is refused, and a valid file whose first append brought 3 bytes goes on."""
    location = await create(client, 1006)
    refused = await client.patch(location, data=b"MZ", headers={**PATCH, "Upload-Offset": "0"})
    assert refused.status == 400
    assert "Ogg" in (await refused.json())["detail"]
    assert await offset_of(client, location) == 0
    data = audio(1006)
    for start, end in ((0, 3), (3, 5), (5, 1006)):
        response = await client.patch(location, data=data[start:end], headers={**PATCH, "Upload-Offset": str(start)})
        assert response.status == 204, await response.text()
    assert await stored(client) == data


async def test_a_declared_length_below_the_ogg_capture_pattern_is_400(client: TestClient) -> None:
    response = await client.post("/uploads", headers={**TUS, "Upload-Length": "3", "Upload-Metadata": metadata()})
    assert response.status == 400
    assert "OggS" in (await response.json())["detail"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "x-unknown"])
async def test_a_content_coding_is_415_before_the_upload_is_made(
    client: TestClient, database_url: str, coding: str
) -> None:
    """A gzip body that does not decode was a 500; one that does was stored decoded, its offset
    counting other bytes than were sent. Refused as on PUT, and a creation with such a body
    makes no upload (nobody would know its URL)."""
    creation = await client.post(
        "/uploads",
        data=b"OggSxxxx",
        headers={
            **PATCH,
            "Upload-Length": "100",
            "Upload-Metadata": metadata(),
            "Content-Encoding": coding,
        },
    )
    assert creation.status == 415, await creation.text()
    assert await uploads_made(database_url) == 0
    location = await create(client, 100)
    patch = await client.patch(
        location, data=b"OggSxxxx", headers={**PATCH, "Upload-Offset": "0", "Content-Encoding": coding}
    )
    assert patch.status == 415, await patch.text()
    assert patch.content_type == "application/problem+json"
    assert await offset_of(client, location) == 0


async def test_a_creation_with_a_body_of_the_wrong_type_makes_no_upload(client: TestClient, database_url: str) -> None:
    response = await client.post(
        "/uploads",
        data=audio(100),
        headers={
            **TUS,
            "Upload-Length": "100",
            "Upload-Metadata": metadata(),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status == 415
    assert "Location" not in response.headers
    assert await uploads_made(database_url) == 0


async def test_head_with_another_tus_version_is_412_without_one_answered(client: TestClient) -> None:
    """As tusd: a HEAD without Tus-Resumable (a browser, curl -I) is answered; one naming a
    version this server does not speak is told so."""
    location = await create(client, 100)
    other = await client.head(location, headers={"Tus-Resumable": "0.2.2"})
    assert other.status == 412
    assert other.headers["Tus-Version"] == "1.0.0"
    plain = await client.head(location)
    assert plain.status == 200
    assert plain.headers["Upload-Offset"] == "0"


async def test_an_empty_patch_to_a_cancelled_upload_is_410(client: TestClient) -> None:
    location = await create(client, 100)
    assert (await client.delete(location, headers=TUS)).status == 204
    response = await client.patch(location, data=b"", headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 410
    assert "cancelled" in (await response.json())["detail"]


async def test_not_ogg_is_400(client: TestClient) -> None:
    location = await create(client, 100)
    response = await client.patch(location, data=b"ID3" + bytes(97), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 400
    assert "Ogg" in (await response.json())["detail"]
    assert await offset_of(client, location) == 0


async def test_checksum_mismatch_is_460_and_no_byte_counts(client: TestClient) -> None:
    # The refused PATCH is long enough to send S3 parts: unrecorded, they are never assembled.
    data = audio(1000 + 18 * 1024 * 1024)
    location = await create(client, len(data))
    good = base64.b64encode(hashlib.sha1(data[:1000]).digest()).decode()
    response = await client.patch(
        location,
        data=data[:1000],
        headers={**PATCH, "Upload-Offset": "0", "Upload-Checksum": f"sha1 {good}"},
    )
    assert response.status == 204
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    response = await client.patch(
        location,
        data=data[1000:],
        headers={**PATCH, "Upload-Offset": "1000", "Upload-Checksum": f"sha256 {wrong}"},
    )
    assert response.status == 460
    assert await offset_of(client, location) == 1000
    right = base64.b64encode(hashlib.sha256(data[1000:]).digest()).decode()
    response = await client.patch(
        location,
        data=data[1000:],
        headers={**PATCH, "Upload-Offset": "1000", "Upload-Checksum": f"sha256 {right}"},
    )
    assert response.status == 204
    assert await stored(client) == data


async def test_delete_cancels_and_removes_the_bytes(client: TestClient, settings: Settings) -> None:
    location = await create(client, 1000)
    response = await client.patch(location, data=ogg(400), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 204
    assert segments(settings) != []
    response = await client.delete(location, headers=TUS)
    assert response.status == 204
    assert segments(settings) == []
    assert (await client.head(location, headers=TUS)).status == 410
    response = await client.patch(location, data=ogg(10), headers={**PATCH, "Upload-Offset": "400"})
    assert response.status == 410


async def test_unknown_upload_is_404(client: TestClient) -> None:
    assert (await client.head(f"/uploads/{uuid.uuid4()}", headers=TUS)).status == 404
    response = await client.patch(f"/uploads/{uuid.uuid4()}", data=ogg(10), headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 404
    assert (await client.head("/uploads/not-an-id", headers=TUS)).status == 404


async def test_precondition_failing_at_the_end_is_412_and_discards_the_bytes(
    client: TestClient, settings: Settings, database_url: str
) -> None:
    data = audio(1000)
    location = await create(client, len(data), **{"If-None-Match": "*"})
    # Meanwhile a plain PUT creates the prerecording.
    put = await client.put(f"/prerecordings/{EVENT}/{START}", data=ogg(50), headers={"Content-Type": "audio/ogg"})
    assert put.status == 201
    response = await client.patch(location, data=data, headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 412, await response.text()
    assert segments(settings) == []
    assert len(blob_files(settings)) == 1  # the PUT's only
    assert await stored(client) == ogg(50)
    assert (await client.head(location, headers=TUS)).status == 410


# Preconditions at creation: refused as a PUT would be, before the upload exists.
NO_TAG = '"' + "0" * 64 + '"'


async def uploads_made(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM uploads"))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("preconditions", "stored_first"),
    [({"If-None-Match": "*"}, True), ({"If-Match": NO_TAG}, True), ({"If-Match": "*"}, False)],
)
async def test_a_precondition_failing_at_creation_is_412_as_on_put_and_makes_no_upload(
    client: TestClient, database_url: str, preconditions: dict[str, str], stored_first: bool
) -> None:
    key = f"/prerecordings/{EVENT}/{START}"
    if stored_first:
        assert (await client.put(key, data=ogg(50), headers={"Content-Type": "audio/ogg"})).status == 201
    put = await client.put(key, data=ogg(60), headers={"Content-Type": "audio/ogg", **preconditions})
    assert put.status == 412
    # With the whole file as its first bytes too (creation-with-upload): nothing is read or kept.
    for body in (None, audio(1000)):
        extra = {} if body is None else {"Content-Type": tus.OFFSET_OCTET_STREAM}
        response = await client.post(
            "/uploads",
            data=body,
            headers={**TUS, "Upload-Length": "1000", "Upload-Metadata": metadata(), **preconditions, **extra},
        )
        assert response.status == 412, await response.text()
        assert response.headers["Tus-Resumable"] == "1.0.0" and "Location" not in response.headers
        assert await response.json() == await put.json()
    assert await uploads_made(database_url) == 0


async def test_a_precondition_that_holds_at_creation_lets_the_upload_begin(client: TestClient) -> None:
    key = f"/prerecordings/{EVENT}/{START}"
    etag = (await client.put(key, data=ogg(50), headers={"Content-Type": "audio/ogg"})).headers["ETag"]
    data = audio(1000)
    location = await create(client, len(data), **{"If-Match": etag})
    response = await client.patch(location, data=data, headers={**PATCH, "Upload-Offset": "0"})
    assert response.status == 204, await response.text()
    assert await stored(client) == data


async def test_write_token_guards_post_patch_delete(app, aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from prerec.config import SETTINGS_KEY

    app[SETTINGS_KEY] = dataclasses.replace(settings, write_token="secret")
    client = await aiohttp_client(app)
    headers = {**TUS, "Upload-Length": "100", "Upload-Metadata": metadata()}
    assert (await client.post("/uploads", headers=headers)).status == 401
    response = await client.post("/uploads", headers={**headers, "Authorization": "Bearer secret"})
    assert response.status == 201
    location = response.headers["Location"]
    assert (await client.patch(location, data=ogg(10), headers={**PATCH, "Upload-Offset": "0"})).status == 401
    assert (await client.delete(location, headers=TUS)).status == 401
    assert (await client.head(location, headers=TUS)).status == 200


# Parsing (pure)


def test_metadata_parses_pairs_and_bare_keys() -> None:
    assert tus.parse_metadata("a aGk=,b") == {"a": "hi", "b": ""}
    with pytest.raises(Problem):
        tus.parse_metadata("a !!!")
    with pytest.raises(Problem):
        tus.parse_metadata("a aGk=,a aGk=")


def test_checksum_parses_known_algorithms_only() -> None:
    digest = hashlib.sha1(b"x").digest()
    parsed = tus.parse_checksum({"Upload-Checksum": f"sha1 {base64.b64encode(digest).decode()}"})
    assert parsed is not None and parsed.algorithm == "sha1" and parsed.digest == digest
    with pytest.raises(Problem) as raised:
        tus.parse_checksum({"Upload-Checksum": "md5 AAAA"})
    assert raised.value.status == 400
    assert tus.parse_checksum({}) is None


def test_offset_and_length_are_bounded_ascii_numbers() -> None:
    assert tus.parse_offset({"Upload-Offset": "12"}) == 12
    for bad in ("-1", "1e3", "١"):
        with pytest.raises(Problem):
            tus.parse_offset({"Upload-Offset": bad})
    with pytest.raises(Problem):
        tus.parse_length({"Upload-Defer-Length": "1"})


def test_resumable_version_is_required() -> None:
    tus.check_resumable({"Tus-Resumable": "1.0.0"})
    with pytest.raises(Problem) as raised:
        tus.check_resumable({})
    assert raised.value.status == 412 and raised.value.headers["Tus-Version"] == "1.0.0"


def test_a_creation_keeps_if_match_and_only_a_star_if_none_match() -> None:
    assert tus.parse_conditions({}) == (None, False)
    assert tus.parse_conditions({"If-None-Match": " * "}) == (None, True)
    assert tus.parse_conditions({"If-Match": '"a", "b"'}) == ('"a", "b"', False)
    with pytest.raises(Problem) as raised:
        tus.parse_conditions({"If-None-Match": '"a"'})
    assert raised.value.status == 400 and "If-None-Match may only be '*'" in raised.value.detail


_ = (asyncio, wait_for)


def test_preconditions_at_the_end_are_decided_on_what_is_stored() -> None:
    from datetime import datetime

    from prerec.model import Prerecording
    from prerec.uploads.engine import check_preconditions

    stored = Prerecording(
        uuid.UUID(EVENT), datetime(2026, 12, 1, 20), "audio/ogg", 10, bytes(32), datetime(2026, 12, 1), "aa/x.ogg"
    )
    check_preconditions(None, False, stored)
    check_preconditions(None, True, None)
    check_preconditions(stored.etag, False, stored)
    check_preconditions(f'"other", {stored.etag}', False, stored)
    check_preconditions("*", False, stored)
    for if_match, if_none_match, current in (('"other"', False, stored), ("*", False, None), (None, True, stored)):
        with pytest.raises(Problem) as raised:
            check_preconditions(if_match, if_none_match, current)
        assert raised.value.status == 412


@pytest.mark.parametrize("matches", [True, False])
async def test_a_digest_given_at_creation_is_verified_at_the_end(
    client: TestClient, settings: Settings, matches: bool
) -> None:
    data = audio(3000)
    claimed = hashlib.sha256(data if matches else b"something else").digest()
    location = await create(client, len(data), **{"Repr-Digest": f"sha-256=:{base64.b64encode(claimed).decode()}:"})
    await client.patch(location, data=data[:1000], headers={**PATCH, "Upload-Offset": "0"})
    response = await client.patch(location, data=data[1000:], headers={**PATCH, "Upload-Offset": "1000"})
    if matches:
        assert response.status == 204
        assert await stored(client) == data
    else:
        assert response.status == 400
        assert "digest does not match" in (await response.json())["detail"]
        assert (await client.get(f"/prerecordings/{EVENT}/{START}")).status == 404
        assert blob_files(settings) == [] and segments(settings) == []
        assert (await client.head(location, headers=TUS)).status == 410


async def test_tuspy_survives_cuts_mid_patch_and_resumes_from_what_arrived(
    client: TestClient, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    data = audio(4 * 1024 * 1024 + 11)
    path = tmp_path / "show.ogg"
    path.write_bytes(data)
    async with CuttingProxy((client.host, client.port), [Cut(after=1_500_000), Cut(after=1_200_000)]) as proxy:
        uploader = TusClient(f"http://127.0.0.1:{proxy.port}/uploads").uploader(
            file_path=str(path),
            metadata={"event": EVENT, "start": START, "filetype": "audio/ogg"},
            retries=5,
            retry_delay=0,
        )
        # tuspy's own retry loop: after each cut it asks for the offset and sends the rest.
        await asyncio.to_thread(uploader.upload)
    assert len(proxy.cuts) == 2
    # Offsets never went back, and what the cut PATCHes brought was kept: the client did not
    # start over. (Not every cut's bytes are counted by the next HEAD: one that arrives while the
    # cut PATCH is still taking its lease reports the offset before it, and the client sends
    # those bytes again; the fencing keeps that a re-send, never a tear, as the SHA-256 shows.)
    offsets = proxy.patch_offsets
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] > 0, offsets
    assert hashlib.sha256(await stored(client)).digest() == hashlib.sha256(data).digest()
    assert await created_events(database_url) == 1
    assert segments(settings) == []
