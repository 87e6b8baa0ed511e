"""The S3 backend against a real SeaweedFS: the write protocol, retiring, gc, start-up checks,
and the store failing under uploads and downloads."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from prerec.app import create_app
from prerec.config import BucketUrl
from prerec.storage import STORAGE, StorageUnavailable, open_storage
from prerec.storage.s3 import HOLD_SECONDS, MAX_POOL_CONNECTIONS, PART_SIZE, PARTS_IN_FLIGHT, _PartBuffer
from prerec.storage_check import check
from tests.conftest import (
    EVENT,
    ROOT,
    Replica,
    Weed,
    blob_files,
    blob_names,
    free_port,
    ogg,
    put_head,
    read_answer,
    tmp_files,
    wait_for,
)

BACKENDS = ("s3",)
KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00:00"
OGG = {"Content-Type": "audio/ogg"}
MiB = 1024 * 1024


def test_a_reused_part_buffer_gives_only_what_was_written_since() -> None:
    buffer = _PartBuffer()
    buffer.write(memoryview(b"a" * 100))
    assert buffer.body().read() == b"a" * 100
    buffer.reuse().write(memoryview(b"bcdef"))
    assert len(buffer) == 5 and buffer.head(2) == b"bc"
    # Cut where a persist cuts: the first bytes go as a part, those past the cut fill on (in
    # the next buffer), and neither carries the a's the earlier part left past them.
    assert buffer.cut(2) == b"def"
    assert buffer.body().read() == b"bc"


async def test_a_large_upload_goes_in_parts_and_comes_back_whole(client, settings) -> None:
    body = ogg(2 * PART_SIZE + 5, b"\x01")  # two full parts and a short last one
    response = await client.put(KEY, data=body, headers=OGG)
    assert response.status == 201, await response.text()
    [stored] = blob_files(settings)
    assert stored.read_bytes() == body and tmp_files(settings) == []
    assert stored.key.startswith("station/blobs/")  # under the URL's prefix
    got = await client.get(KEY)
    assert got.status == 200 and await got.read() == body
    assert got.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'  # prerec's, not S3's multipart ETag
    ranged = await client.get(KEY, headers={"Range": f"bytes={PART_SIZE - 8}-{PART_SIZE + 7}"})
    assert ranged.status == 206 and await ranged.read() == body[PART_SIZE - 8 : PART_SIZE + 8]
    assert ranged.headers["Content-Range"] == f"bytes {PART_SIZE - 8}-{PART_SIZE + 7}/{len(body)}"


async def test_parts_go_without_waiting_for_a_100_continue(client) -> None:
    """A part is a file-like body, for which botocore would ask the store for "100 Continue"
    first; aiohttp would wait for it with no bound, behind a store or proxy ignoring Expect."""
    sent: list[tuple[str, str | None]] = []

    def record(request, **_) -> None:  # type: ignore[no-untyped-def]
        sent.append((request.method, request.headers.get("Expect")))

    client.app[STORAGE].client.meta.events.register("before-send.s3", record)
    assert (await client.put(KEY, data=ogg(PART_SIZE + 5), headers=OGG)).status == 201
    assert [method for method, _ in sent].count("PUT") == 2  # two parts
    assert [expect for _, expect in sent] == [None] * len(sent)


async def test_part_buffers_wait_for_the_next_upload_and_go_once_the_replica_is_idle(client) -> None:
    from prerec.storage import s3

    assert (await client.put(KEY, data=ogg(2 * PART_SIZE + 5), headers=OGG)).status == 201
    assert 1 <= len(s3._spare_parts) <= PARTS_IN_FLIGHT  # the last part's, for the next upload
    await wait_for(lambda: s3._spare_parts == [], timeout=10)


async def test_a_cut_upload_aborts_its_multipart_upload_and_keeps_the_old_version(client, settings) -> None:
    old = ogg(1000, b"o")
    assert (await client.put(KEY, data=old, headers=OGG)).status == 201
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 3 * PART_SIZE))
    writer.write(ogg(PART_SIZE + MiB))  # past the first part: a multipart upload is under way
    await writer.drain()
    await wait_for(lambda: tmp_files(settings), timeout=20)
    writer.close()  # the client goes away mid-body
    await wait_for(lambda: tmp_files(settings) == [], timeout=20)
    assert [stored.read_bytes() for stored in blob_files(settings)] == [old]
    assert await (await client.get(KEY)).read() == old


async def test_a_replaced_blob_is_retired_by_marker_and_deleted_after_the_grace_period(client, app, settings) -> None:
    await client.put(KEY, data=ogg(1000, b"o"), headers=OGG)
    [first] = blob_names(settings)
    await client.put(KEY, data=ogg(1000, b"n"), headers=OGG)
    [second] = blob_names(settings)
    storage = app[STORAGE]
    # Still there for a download under way elsewhere, but out of service.
    assert await storage.blob_size(first) == 1000 and first not in (await storage.inventory()).blobs
    assert await storage.sweep(3600) == []
    assert await storage.sweep(0) == [f"trash/{first}"]
    assert await storage.blob_size(first) is None and await storage.blob_size(second) == 1000
    assert await storage.sweep(0) == []  # the marker went too
    assert await (await client.get(KEY)).read() == ogg(1000, b"n")


async def test_gc_finds_and_repairs_orphans_stale_multipart_uploads_and_missing_objects(
    client, app, settings, database_url
) -> None:
    keys = [f"/prerecordings/{EVENT}/2024-01-0{day}T00:00" for day in (1, 2, 3)]
    for key in keys:
        assert (await client.put(key, data=ogg(1000), headers=OGG)).status == 201
    storage = app[STORAGE]
    bucket, prefix = settings.storage_url.bucket, settings.storage_url.prefix
    first, second, _ = sorted(blob_names(settings))
    s3 = storage.client
    await s3.put_object(Bucket=bucket, Key=f"{prefix}blobs/ff/ffff.ogg", Body=b"OggS...")  # a crash before commit
    crashed = await s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}blobs/fe/fefe.ogg")  # a killed PUT
    await s3.delete_object(Bucket=bucket, Key=f"{prefix}blobs/{first}")  # missing
    await s3.put_object(Bucket=bucket, Key=f"{prefix}blobs/{second}", Body=b"OggS torn")  # wrong size

    report = await check(database_url, storage, 3600, apply=False)
    assert report.orphans == [] and report.young_orphans == ["ff/ffff.ogg"]  # young: maybe committing now
    assert report.leftovers == []  # a multipart upload that young may be a PUT still arriving
    report = await check(database_url, storage, 0, apply=False)
    assert report.orphans == ["ff/ffff.ogg"]
    assert report.leftovers == [f"fe/fefe.ogg?uploadId={crashed['UploadId']}"]
    assert [row.blob for row in report.missing] == [first]
    assert [(row.size, size) for row, size in report.wrong_size] == [(1000, 9)]
    assert tmp_files(settings)  # a check alone changes nothing

    repaired = await check(database_url, storage, 0, apply=True)
    assert len(repaired.repaired) == 4, repaired.lines()
    assert tmp_files(settings) == []
    assert "ff/ffff.ogg" not in blob_names(settings)  # retired: deleted after the grace period
    listing = await (await client.get(f"/prerecordings/{EVENT}")).json()
    assert len(listing["prerecordings"]) == 1
    assert not (await check(database_url, storage, 0, apply=False)).anything_wrong


async def test_gc_command_on_a_bucket(client, settings, database_url, bucket_env) -> None:
    env = {**os.environ, **bucket_env, "PREREC_DATABASE_URL": database_url, "PREREC_LOG_FORMAT": "text"}
    command = [sys.executable, "-m", "prerec", "gc"]
    await client.put(KEY, data=ogg(1000), headers=OGG)
    clean = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    missing = {**env, "PREREC_STORAGE_URL": "s3://no-such-bucket/station"}
    refused = subprocess.run(command, env=missing, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "the bucket 'no-such-bucket' does not exist" in refused.stderr


# Start-up checks


async def test_a_missing_bucket_or_refused_credentials_stop_the_start(settings, monkeypatch) -> None:
    missing = dataclasses.replace(settings, storage_url=BucketUrl("no-such-bucket", ""))
    with pytest.raises(StorageUnavailable, match="the bucket 'no-such-bucket' does not exist"):
        await open_storage(missing).start()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageUnavailable, match="refuses these credentials"):
        await open_storage(settings).start()
    # And the secret is never said.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    try:
        await open_storage(settings).start()
    except StorageUnavailable as error:
        assert "wrong-secret-value" not in str(error)


async def test_a_store_that_drops_every_connection_is_tried_twice_and_called_unreachable(settings) -> None:
    """One retry, no more: each waits out botocore's backoff (up to 2 s for the third try), and a
    probe bounded by the timeout then read "did not answer" for a store that is plainly down."""
    tries = 0

    def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        tries += 1
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    down = dataclasses.replace(settings, s3_endpoint_url=f"http://127.0.0.1:{port}", s3_timeout_seconds=10.0)
    try:
        with pytest.raises(StorageUnavailable, match="it cannot be reached"):
            await open_storage(down).start()
    finally:
        server.close()
    # Two tries of botocore's, each of which aiohttp retries once on a fresh connection (it does
    # for an idempotent request, here HEAD, whose connection closed before an answer).
    assert tries == 2 * 2


async def test_a_replica_on_a_missing_bucket_does_not_start(tmp_path, storage_env) -> None:
    env = {**storage_env, "PREREC_STORAGE_URL": "s3://no-such-bucket/station", "PREREC_LOG_FORMAT": "text"}
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    try:
        assert replica.exited(60) == 1
    finally:
        replica.kill()
    assert "cannot start: the object store s3://no-such-bucket/station/" in replica.log.read_text()
    assert "the bucket 'no-such-bucket' does not exist" in replica.log.read_text()


# The store failing


@pytest.fixture
async def own_store(tmp_path, seaweed, settings, aiohttp_client, database_url):  # type: ignore[no-untyped-def]
    """A SeaweedFS of this test's own (it is stopped and started), and a client of an app on it
    with a short store timeout."""
    (tmp_path / "weed").mkdir()
    weed = Weed(tmp_path / "weed", secret_key=seaweed.secret_key)
    weed.start()
    bucket = weed.new_bucket()
    on_it = dataclasses.replace(
        settings, storage_url=BucketUrl(bucket, "station/"), s3_endpoint_url=weed.url, s3_timeout_seconds=2.0
    )
    client = await aiohttp_client(create_app(on_it, database_url))
    yield weed, client, on_it
    weed.kill()  # thrown away: no need to wait for a clean stop


async def test_the_store_down_mid_upload_is_503_then_uploads_work_again(own_store) -> None:
    weed, client, settings = own_store
    old = ogg(1000, b"o")
    assert (await client.put(KEY, data=old, headers=OGG)).status == 201
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 3 * PART_SIZE))
    writer.write(ogg(PART_SIZE + MiB))
    await writer.drain()
    await wait_for(lambda: tmp_files(settings), timeout=20)
    weed.kill()
    writer.write(b"\0" * (2 * PART_SIZE - MiB))  # the rest: the next part meets no store
    async with asyncio.timeout(30):  # within the store timeout (and botocore's one retry), never a hang
        status, headers, body = await read_answer(reader)
    writer.close()
    assert status == 503 and headers["Retry-After"] == "5" and b"object store" in body
    ready = await client.get("/ready")
    assert ready.status == 503 and "the object store: it cannot be reached" in (await ready.json())["detail"]
    assert (await client.get(KEY)).status == 503

    weed.start()

    async def ready() -> bool:
        return (await client.get("/ready")).status == 200

    await wait_for(ready, timeout=30)
    assert await (await client.get(KEY)).read() == old
    new = ogg(PART_SIZE + 10, b"n")
    assert (await client.put(KEY, data=new, headers=OGG)).status == 204
    assert await (await client.get(KEY)).read() == new


async def test_puts_cut_by_a_frozen_store_are_503_within_the_timeout_also_those_queued(  # type: ignore[no-untyped-def]
    own_store, aiohttp_client, database_url
) -> None:
    """More uploads than PARTS_IN_FLIGHT meet a store that stops answering: each is answered
    within about the timeout, those queued for a place among the parts in flight too. Before,
    a PUT waited out the timeout on its part and again on aborting its multipart upload, and
    those queued a third time (8 and 12 s for the 4 s timeout here: long beside the time the
    server takes to read what was sent before the freeze, which it counts in)."""
    weed, _, settings = own_store
    settings = dataclasses.replace(settings, s3_timeout_seconds=4.0)
    client = await aiohttp_client(create_app(settings, database_url))
    uploads = PARTS_IN_FLIGHT + 2
    connections = []
    for number in range(uploads):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(put_head(f"/prerecordings/{EVENT}/2024-02-{number + 1:02d}T00:00", 3 * PART_SIZE))
        writer.write(ogg(PART_SIZE + MiB))  # the first part goes while the store answers
        connections.append((reader, writer))
    for _, writer in connections:
        await writer.drain()
    await wait_for(lambda: len(tmp_files(settings)) == uploads, timeout=30)
    os.kill(weed.process.pid, signal.SIGSTOP)
    try:
        for _, writer in connections:
            writer.write(b"\0" * (2 * PART_SIZE - MiB))  # the rest: each next part meets no answer
        frozen = time.monotonic()

        async def answered_after(reader: asyncio.StreamReader) -> tuple[int, float]:
            status, headers, _ = await read_answer(reader)
            assert headers["Retry-After"] == "5"
            return status, time.monotonic() - frozen

        async with asyncio.timeout(10 * settings.s3_timeout_seconds):
            answers = await asyncio.gather(*(answered_after(reader) for reader, _ in connections))
    finally:
        os.kill(weed.process.pid, signal.SIGCONT)
        for _, writer in connections:
            writer.close()
    assert [status for status, _ in answers] == [503] * uploads
    assert max(after for _, after in answers) < 1.5 * settings.s3_timeout_seconds, answers


async def test_the_store_down_mid_download_cuts_it_then_503_then_downloads_work_again(own_store) -> None:
    weed, client, _ = own_store
    body = ogg(48 * MiB, b"d")
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    response = await client.get(KEY)
    assert response.status == 200
    first = await response.content.readexactly(MiB)
    weed.kill()
    with pytest.raises(aiohttp.ClientPayloadError):  # cut: never a short body that looks whole
        async with asyncio.timeout(30):
            await response.content.read()
    assert first == body[:MiB]
    down = await client.get(KEY)
    assert down.status == 503 and down.headers["Retry-After"] == "5"

    weed.start()
    again = await client.get(KEY)
    assert again.status == 200 and await again.read() == body


async def test_a_store_frozen_mid_download_cuts_it_within_the_timeout(own_store) -> None:
    """Headers are out, then the store stops sending: each wait for its bytes is bounded (the
    client's read timeout), so the download is cut, not left hanging with its connection."""
    weed, client, settings = own_store
    body = ogg(48 * MiB, b"f")
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    response = await client.get(KEY)
    assert response.status == 200
    first = await response.content.readexactly(MiB)
    os.kill(weed.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(10 * settings.s3_timeout_seconds):
                await response.content.read()
        assert time.monotonic() - began < 5 * settings.s3_timeout_seconds
    finally:
        os.kill(weed.process.pid, signal.SIGCONT)
    assert first == body[:MiB]
    assert await (await client.get(KEY)).read() == body


async def _paused_download(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET whose client takes its headers, then stops reading, as a browser's audio element
    does once it has buffered enough: a few kilobytes taken, the rest left waiting."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    writer.write(f"GET {KEY} HTTP/1.1\r\nHost: prerec\r\n\r\n".encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def _rest_of(reader: asyncio.StreamReader) -> bytes:
    """Read on from after the status line: the headers, then the whole body."""
    length = None
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    assert length is not None
    return await reader.readexactly(length)


async def test_listeners_that_pause_hold_no_connection_to_the_store(client) -> None:
    """More paused downloads than the store's connection pool has connections: each used to
    keep its connection while its client did not read, and every other download and upload of
    the replica then waited for one (503 after the store timeout). A download held up lets go
    of its connection and asks the store again, from where it was, once its client reads on."""
    body = ogg(16 * MiB, b"p")
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    paused = [await _paused_download(client.host, client.port) for _ in range(MAX_POOL_CONNECTIONS)]
    try:
        await asyncio.sleep(3 * HOLD_SECONDS)  # every one of them held up past HOLD_SECONDS
        paused += [await _paused_download(client.host, client.port) for _ in range(4)]
        await asyncio.sleep(3 * HOLD_SECONDS)
        got = await client.get(KEY)
        assert got.status == 200, await got.text()
        assert await got.read() == body
        assert (await client.put(KEY, data=ogg(PART_SIZE + 10, b"n"), headers=OGG)).status == 204
        # Listeners that read on get the whole blob they began (the replaced one stays readable
        # through the grace period), asked again from where each stopped.
        for reader, _ in paused[:3]:
            assert await _rest_of(reader) == body
    finally:
        for _, writer in paused:
            writer.close()


async def test_a_paused_listener_is_cut_rather_than_sent_bytes_of_another_object(client, settings) -> None:
    """The rest is asked for If-Match the first answer's ETag: should the key hold other bytes
    by then (`copy-to-bucket` keeps the folder's names, say), the download is cut, never spliced."""
    body = ogg(16 * MiB, b"a")
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    [stored] = blob_files(settings)
    reader, writer = await _paused_download(client.host, client.port)
    try:
        await asyncio.sleep(3 * HOLD_SECONDS)  # let go of by now
        await asyncio.to_thread(stored.client.put_object, Bucket=stored.bucket, Key=stored.key, Body=ogg(16 * MiB))
        with pytest.raises(asyncio.IncompleteReadError) as cut:
            await _rest_of(reader)
        assert body.startswith(cut.value.partial)
    finally:
        writer.close()


async def test_a_slow_listener_keeps_its_download_from_the_store(client, app) -> None:
    """A player reading at about the audio's bitrate holds each write up for seconds while it
    takes bytes all along: its download is not asked of the store again (which would throw
    away what the store had sent), only a paused one's is."""
    body = ogg(16 * MiB, b"s")
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    gets: list[str] = []
    app[STORAGE].client.meta.events.register("before-send.s3.GetObject", lambda **_: gets.append("GetObject"))
    reader, writer = await _paused_download(client.host, client.port)
    try:
        # Slow enough that the kernel's send buffer stays full and each write waits for
        # seconds, fast enough that it waits less than the test.
        for _ in range(int(4 * HOLD_SECONDS / 0.125)):
            await reader.readexactly(64 * 1024)  # some 500 KB/s
            await asyncio.sleep(0.125)
        assert gets == ["GetObject"]
    finally:
        writer.close()


async def test_a_frozen_store_is_503_within_the_timeout_not_a_hang(own_store) -> None:
    weed, client, settings = own_store
    body = ogg(1000)
    assert (await client.put(KEY, data=body, headers=OGG)).status == 201
    os.kill(weed.process.pid, signal.SIGSTOP)  # connections are accepted, nothing is answered
    try:
        async with asyncio.timeout(4 * settings.s3_timeout_seconds):
            frozen = await client.get(KEY)
            assert frozen.status == 503 and frozen.headers["Retry-After"] == "5"
            assert "did not answer within 2 s" in (await frozen.json())["detail"]
            refused = await client.put(KEY, data=ogg(2000), headers=OGG)
            assert refused.status == 503
    finally:
        os.kill(weed.process.pid, signal.SIGCONT)
    assert await (await client.get(KEY)).read() == body


async def test_head_and_list_never_ask_the_store(own_store) -> None:
    weed, client, _ = own_store
    assert (await client.put(KEY, data=ogg(1000), headers=OGG)).status == 201
    assert (await client.head(KEY)).status == 200  # cached or not, from PostgreSQL
    weed.kill()
    head = await client.head(KEY)
    assert head.status == 200 and head.headers["Content-Length"] == "1000"
    assert (await client.get(f"/prerecordings/{EVENT}")).status == 200
    etag = head.headers["ETag"]
    assert (await client.get(KEY, headers={"If-None-Match": etag})).status == 304  # a 304 touches no store
    weed.start()


# Moving a folder into a bucket


async def test_copy_to_bucket_moves_a_folder_idempotently(
    aiohttp_client, settings, database_url, bucket_env, tmp_path
) -> None:
    on_folder = dataclasses.replace(settings, storage_url=None)
    folder_client = await aiohttp_client(create_app(on_folder, database_url))
    keys = [f"/prerecordings/{EVENT}/2024-01-0{day}T00:00" for day in (1, 2, 3)]
    bodies = [ogg(1000, b"a"), ogg(PART_SIZE + 1000, b"b"), ogg(5000, b"c")]
    for key, body in zip(keys, bodies, strict=True):
        assert (await folder_client.put(key, data=body, headers=OGG)).status == 201
    env = {
        **os.environ,
        **bucket_env,
        "PREREC_DATABASE_URL": database_url,
        "PREREC_STORAGE_DIR": str(on_folder.blob_dir),
        "PREREC_LOG_FORMAT": "text",
    }

    def copy() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "prerec", "copy-to-bucket"]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    first = copy()
    assert first.returncode == 0 and "3 copied, 0 already in the bucket, 0 failed" in first.stdout, first.stderr
    assert blob_names(settings) == blob_names(on_folder)
    again = copy()
    assert again.returncode == 0 and "0 copied, 3 already in the bucket, 0 failed" in again.stdout

    # Resumable: what a cut run did not finish is copied the next time; and a file that does
    # not hash to its row's SHA-256 is refused, not copied.
    name = sorted(blob_names(settings))[0]
    bucket = settings.storage_url.bucket
    [stored] = [s for s in blob_files(settings) if s.key.endswith(name)]
    stored.client.delete_object(Bucket=bucket, Key=stored.key)
    torn = sorted(blob_names(on_folder))[1]
    [other] = [s for s in blob_files(settings) if s.key.endswith(torn)]
    other.client.delete_object(Bucket=bucket, Key=other.key)
    path = on_folder.blob_dir / "blobs" / torn
    path.write_bytes(b"X" * path.stat().st_size)
    third = copy()
    assert third.returncode == 1 and "1 copied, 1 already in the bucket, 1 failed" in third.stdout
    assert f"failed: {torn} does not have the SHA-256 its row records" in third.stdout
    assert torn not in blob_names(settings) and tmp_files(settings) == []

    # Replicas on the bucket serve what the folder served.
    bucket_client = await aiohttp_client(create_app(settings, database_url))
    for key, body in zip(keys, bodies, strict=True):
        response = await bucket_client.get(key)
        if response.status == 200:
            assert await response.read() == body
    served = [(await bucket_client.get(key)).status for key in keys]
    assert sorted(served) == [200, 200, 503]  # the one refused is missing, and said so


async def test_a_presigned_get_redirects_to_the_store_after_prerecs_own_checks(
    aiohttp_client, settings, database_url
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, s3_presigned_get_seconds=60), database_url))
    body = ogg(3 * MiB, b"\x02")
    put = await client.put(KEY, data=body, headers=OGG)
    assert put.status == 201
    etag = put.headers["ETag"]
    moved = await client.get(KEY, allow_redirects=False)
    assert moved.status == 307 and moved.headers["Cache-Control"] == "no-store"
    assert moved.headers["Location"].startswith(settings.s3_endpoint_url)
    # A client following the redirect gets the bytes from the store, its Range sent again.
    whole = await client.get(KEY)
    assert whole.status == 200 and whole.url.port != client.port and await whole.read() == body
    ranged = await client.get(KEY, headers={"Range": "bytes=1000-1999"})
    assert ranged.status == 206 and await ranged.read() == body[1000:2000]
    # What the metadata decides is prerec's answer, as without the redirect.
    assert (await client.get(KEY, headers={"Range": f"bytes={len(body)}-"}, allow_redirects=False)).status == 416
    assert (await client.get(KEY, headers={"If-Match": '"other"'}, allow_redirects=False)).status == 412
    assert (await client.get(f"/prerecordings/{EVENT}/2024-01-02T00:00:00", allow_redirects=False)).status == 404
    # A conditional GET is streamed: the store would compare its own ETag, not prerec's.
    assert (await client.get(KEY, headers={"If-None-Match": etag}, allow_redirects=False)).status == 304
    matched = await client.get(KEY, headers={"If-Match": etag}, allow_redirects=False)
    assert matched.status == 200 and await matched.read() == body
    head = await client.head(KEY, allow_redirects=False)
    assert head.status == 200 and head.headers["ETag"] == etag and head.headers["Content-Length"] == str(len(body))


def test_a_presigned_url_lives_at_most_seven_days() -> None:
    from prerec.config import SettingError, Settings

    assert Settings.from_env({"PREREC_S3_PRESIGNED_GET_SECONDS": "604800"}).s3_presigned_get_seconds == 604800
    with pytest.raises(SettingError, match="PREREC_S3_PRESIGNED_GET_SECONDS"):
        Settings.from_env({"PREREC_S3_PRESIGNED_GET_SECONDS": "604801"})
