"""The upload engine under cuts, races, cancels, expiry and the death of a replica.

Real server, real sockets (a raw socket sends part of a body and stops or closes), real
database; the replica test runs two `python -m prerec` processes on one database and folder.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from prerec import db
from prerec.config import Settings
from prerec.model import Piece
from prerec.storage import STORAGE, fs
from prerec.storage_check import check
from prerec.uploads import engine
from tests.conftest import EVENT, Replica, created_events, free_port, upload_files, wait_for
from tests.conftest import _bucket as bucket_of

# The same assertions on a folder and on a bucket (SeaweedFS); the few about one backend's own
# mechanics name it.
BACKENDS = ("fs", "s3")

START = "2026-12-01T20:00"
TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


def metadata() -> str:
    pairs = {"event": EVENT, "start": START, "filetype": "audio/ogg"}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


def audio(size: int) -> bytes:
    return b"OggS" + os.urandom(size - 4)


def patch_head(path: str, offset: int, length: int) -> bytes:
    lines = [
        f"PATCH {path} HTTP/1.1",
        "Host: x",
        "Tus-Resumable: 1.0.0",
        "Content-Type: application/offset+octet-stream",
        f"Upload-Offset: {offset}",
        f"Content-Length: {length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def create(session: aiohttp.ClientSession, base: str, length: int) -> str:
    async with session.post(
        f"{base}/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata()}
    ) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


async def offset_of(session: aiohttp.ClientSession, base: str, location: str) -> int:
    async with session.head(f"{base}{location}", headers=TUS) as response:
        assert response.status == 200, response.status
        return int(response.headers["Upload-Offset"])


async def row(database_url: str, location: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(
            "SELECT durable, state, lease_owner, generation FROM uploads WHERE id = $1",
            uuid.UUID(location.rsplit("/", 1)[1]),
        )
    finally:
        await conn.close()


async def read_to_close(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Status and the rest of a raw HTTP answer (the server closes after it)."""
    raw = await asyncio.wait_for(reader.read(), 10)
    status_line, _, rest = raw.decode(errors="replace").partition("\r\n")
    return int(status_line.split(" ")[1]), rest


def segments(settings: Settings) -> list[Any]:
    """The bytes uploads in progress hold: segment files, or multipart uploads."""
    return upload_files(settings)


def upload_ids(settings: Settings) -> set[uuid.UUID]:
    """The uploads that have bytes in the store."""
    if settings.storage_url is None:
        return {uuid.UUID(path.name.split(".", 1)[0]) for path in segments(settings)}
    return {uuid.UUID(upload["Key"].rsplit("/", 1)[1].removesuffix(".ogg")) for upload in segments(settings)}


def leave_stray(settings: Settings, upload_id: uuid.UUID) -> None:
    """Bytes of an upload the database does not know, as a crash leaves them."""
    if settings.storage_url is None:
        (settings.blob_dir / "uploads" / f"{upload_id}.1.part").write_bytes(b"left by a crash")
        return
    client, bucket, prefix = bucket_of(settings)
    client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}blobs/uploads/{upload_id}.ogg")


def base_of(client: TestClient) -> str:
    return str(client.make_url("")).rstrip("/")


async def send_slowly(writer: asyncio.StreamWriter, data: bytes, pieces: int, pause: float) -> None:
    step = len(data) // pieces
    for index in range(pieces):
        end = len(data) if index == pieces - 1 else (index + 1) * step
        writer.write(data[index * step : end])
        await writer.drain()
        await asyncio.sleep(pause)


async def let_go(database_url: str, location: str) -> None:
    """Until the upload's lease, once taken, is let go: the server has seen a cut (watched in
    the database, as a HEAD would ask the request still reading to stop early)."""

    async def free() -> bool:
        current = await row(database_url, location)
        return current["lease_owner"] is None and current["generation"] > 0

    await wait_for(free, timeout=10)


async def test_a_cut_patch_counts_every_byte_that_arrived_then_resumes(
    client: TestClient, settings: Settings, database_url: str
) -> None:
    # Past one 8 MiB part on S3, so the cut leaves a part and a tail below 5 MiB.
    data = audio(22 * 1024 * 1024 + 5)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    half = len(data) // 2 + 12345  # not on a buffer boundary
    writer.write(patch_head(location, 0, len(data)) + data[:half])
    await writer.drain()
    writer.close()  # cut mid-body
    # Everything that reached the process counts, once the server has seen the cut (watched in
    # the database: a HEAD would ask the request still reading to stop early).

    await let_go(database_url, location)
    assert await offset_of(client.session, base, location) == half
    async with client.session.patch(
        f"{base}{location}", data=data[half:], headers={**PATCH, "Upload-Offset": str(half)}
    ) as response:
        assert response.status == 204, await response.text()
    async with client.session.get(f"{base}/prerecordings/{EVENT}/{START}") as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(data).digest()
    assert await created_events(database_url) == 1
    assert segments(settings) == []


async def test_bytes_read_while_the_lease_is_held_up_count_in_order_when_the_body_is_cut(
    client: TestClient, database_url: str
) -> None:
    """The body is read on while the lease is taken (engine._ReadAhead): held up on the row's
    lock, a PATCH gets its first bytes, then the cut; once it holds the lease, the bytes count
    before the cut is answered, and nothing read ahead stays counted against the process."""
    data = audio(3_000_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    locker = await asyncpg.connect(database_url)
    try:
        holding = locker.transaction()
        await holding.start()
        await locker.execute("SELECT FROM uploads WHERE id = $1 FOR UPDATE", upload_id)
        reader, writer = await asyncio.open_connection(client.host, client.port)
        sent = 600_000
        writer.write(patch_head(location, 0, len(data)) + data[:sent])
        await writer.drain()
        await asyncio.sleep(0.3)  # read ahead while the take waits for the lock
        writer.close()
        await asyncio.sleep(0.2)
        await holding.rollback()
    finally:
        await locker.close()

    await let_go(database_url, location)
    assert await offset_of(client.session, base, location) == sent
    # A PATCH refused at its offset drops what it read ahead.
    async with client.session.patch(
        f"{base}{location}", data=data[:1000], headers={**PATCH, "Upload-Offset": "0"}
    ) as response:
        assert response.status == 409
    assert engine._ReadAhead.held == 0


@pytest.mark.parametrize("backend", ["fs"], indirect=True)  # the folder's fdatasync
async def test_the_body_is_read_on_while_a_progress_commit_syncs(
    client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fdatasync can take a good part of a second; a body stalled for each one loses that
    much throughput. The body goes on being read while it runs, and nothing is recorded until
    it is done. The fdatasync is made to wait here (then it runs for real)."""
    syncing, release = threading.Event(), threading.Event()
    real_sync = fs.Segment.sync

    def held_sync(segment: fs.Segment) -> None:
        syncing.set()
        release.wait(30)
        real_sync(segment)

    monkeypatch.setattr(fs.Segment, "sync", held_sync)
    data = audio(40 * 1024 * 1024)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(patch_head(location, 0, len(data)))
        sent = 0
        # A steady body (no pause the server would take for an idle client) until the first
        # progress commit, due after COMMIT_SECONDS, is syncing.
        while not syncing.is_set():
            assert sent < len(data) // 2, "no progress commit began"
            writer.write(data[sent : sent + 65536])
            sent += 65536
            await writer.drain()
            await asyncio.sleep(0.01)
        # Far more than the socket buffers hold: it gets through only if the server reads on.
        writer.write(data[sent:])
        await asyncio.wait_for(writer.drain(), 30)
        assert (await row(database_url, location))["durable"] == 0
    finally:
        release.set()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert head.startswith(b"HTTP/1.1 204 "), head
    assert (await row(database_url, location))["state"] == "finished"
    async with client.session.get(f"{base}/prerecordings/{EVENT}/{START}") as response:
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(data).digest()


async def test_a_second_patch_takes_over_from_a_live_holder(client: TestClient, database_url: str) -> None:
    data = audio(200_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(patch_head(location, 0, len(data)) + data[:50_000])
    await writer.drain()

    async def held() -> bool:
        return (await row(database_url, location))["lease_owner"] is not None

    await wait_for(held)
    # The first request still holds the lease and 50 000 bytes not yet recorded. A HEAD asks it
    # to let go; the holder makes them durable, records them and stops.
    began = time.monotonic()
    assert await offset_of(client.session, base, location) == 50_000
    took = time.monotonic() - began
    status, rest = await read_to_close(reader)
    assert status == 400 and "took this upload over" in rest
    assert took < 2.0, f"the holder let go only after {took:.2f} s, so the lease was forced, not released"
    # The first request's later bytes change nothing: it no longer holds the upload.
    writer.write(data[50_000:60_000])
    writer.close()
    async with client.session.patch(
        f"{base}{location}", data=data[50_000:], headers={**PATCH, "Upload-Offset": "50000"}
    ) as response:
        assert response.status == 204, await response.text()
    async with client.session.get(f"{base}/prerecordings/{EVENT}/{START}") as response:
        assert await response.read() == data
    assert await created_events(database_url) == 1


async def test_a_holder_that_does_not_answer_is_forced_and_fenced(client: TestClient, database_url: str) -> None:
    """A zombie: it holds the lease on a live connection and never answers the request to let
    go. The next PATCH forces the lease after the wait, and the zombie can move nothing."""
    data = audio(10_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    zombie = await asyncpg.connect(database_url)
    try:
        held = await db.acquire_lease(zombie, upload_id, "elsewhere/1/zombie", zombie.get_server_pid())
        assert held is not None
        began = time.monotonic()
        async with client.session.patch(
            f"{base}{location}", data=data, headers={**PATCH, "Upload-Offset": "0"}
        ) as response:
            assert response.status == 204, await response.text()
        # Never an endless 423: taken within the wait, not at the lease's 10 s expiry.
        assert time.monotonic() - began < db.LEASE_SECONDS
        with pytest.raises(db.Fenced):
            await db.advance(zombie, upload_id, held.generation, 0, 5000, 86400)
    finally:
        await zombie.close()
    async with client.session.get(f"{base}/prerecordings/{EVENT}/{START}") as response:
        assert await response.read() == data


async def test_cancel_stops_a_patch_in_flight_and_removes_the_bytes(
    client: TestClient, settings: Settings, database_url: str
) -> None:
    data = audio(100_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(patch_head(location, 0, len(data)) + data[:30_000])
    await writer.drain()

    async def held() -> bool:
        return (await row(database_url, location))["lease_owner"] is not None

    await wait_for(held)
    async with client.session.delete(f"{base}{location}", headers=TUS) as response:
        assert response.status == 204
    status, _ = await read_to_close(reader)
    assert status == 410
    writer.close()
    assert segments(settings) == []
    assert (await row(database_url, location))["state"] == "cancelled"
    async with client.session.head(f"{base}{location}", headers=TUS) as response:
        assert response.status == 410


@pytest.fixture
def short_expiry(settings: Settings) -> Settings:
    return dataclasses.replace(settings, upload_expiry_seconds=1.0)


async def test_an_upload_without_progress_expires_and_its_bytes_go(
    short_expiry: Settings, database_url: str, aiohttp_client
) -> None:  # type: ignore[no-untyped-def]
    from prerec.app import create_app

    client = await aiohttp_client(create_app(short_expiry, database_url))
    base = base_of(client)
    location = await create(client.session, base, 1000)
    async with client.session.patch(
        f"{base}{location}", data=audio(400), headers={**PATCH, "Upload-Offset": "0"}
    ) as response:
        assert response.status == 204
    assert segments(short_expiry) != []

    async def gone() -> bool:
        async with client.session.head(f"{base}{location}", headers=TUS) as response:
            return response.status == 410

    await wait_for(gone, timeout=10)
    # At once: the tombstone that answers 410 is kept for the expiry (a second here) only.
    async with client.session.patch(
        f"{base}{location}", data=audio(600), headers={**PATCH, "Upload-Offset": "400"}
    ) as response:
        assert response.status == 410
    # The sweeper (every replica runs one) removes the bytes.
    await wait_for(lambda: segments(short_expiry) == [], timeout=10)

    async def forgotten() -> bool:
        async with client.session.head(f"{base}{location}", headers=TUS) as response:
            return response.status == 404

    await wait_for(forgotten, timeout=10)


async def test_resume_on_another_replica_after_kill_9(
    replicas: list[Replica], storage_env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    first = Replica(storage_env, free_port(), tmp_path / "first.log")
    second = Replica(storage_env, free_port(), tmp_path / "second.log")
    replicas.extend([first, second])
    first.wait_ready()
    second.wait_ready()
    # On S3 the bytes sent before the kill fill a part and leave a tail in the database.
    data = audio(14 * 1024 * 1024 + 7)
    async with aiohttp.ClientSession() as session:
        location = await create(session, first.url, len(data))
        reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
        writer.write(patch_head(location, 0, len(data)))
        sent = len(data) * 2 // 3
        await send_slowly(writer, data[:sent], pieces=6, pause=0.3)

        async def recorded() -> bool:
            return (await row(database_url, location))["durable"] > 0

        await wait_for(recorded)
        first.kill()  # holding the lease, mid-body
        writer.close()
        # The other replica takes over at once: the holder's database session is gone, so
        # neither its lease's expiry nor the wait for a live holder applies.
        began = time.monotonic()
        offset = await offset_of(session, second.url, location)
        assert time.monotonic() - began < engine.TAKEOVER_SECONDS
        assert 0 < offset <= sent
        async with session.patch(
            f"{second.url}{location}", data=data[offset:], headers={**PATCH, "Upload-Offset": str(offset)}
        ) as response:
            assert response.status == 204, await response.text()
        async with session.get(f"{second.url}/prerecordings/{EVENT}/{START}") as response:
            assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(data).digest()
            # Hashed by reading the first replica's bytes back: the stored digest is the file's.
            assert response.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert await created_events(database_url) == 1
    assert segments(Settings.from_env(storage_env)) == []


_ = web


async def test_shutdown_stops_a_patch_keeps_its_bytes_and_sends_it_elsewhere(
    replicas: list[Replica], storage_env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    env = {**storage_env, "PREREC_SHUTDOWN_TIMEOUT_SECONDS": "60"}
    first = Replica(env, free_port(), tmp_path / "first.log")
    second = Replica(env, free_port(), tmp_path / "second.log")
    replicas.extend([first, second])
    first.wait_ready()
    second.wait_ready()
    data = audio(300_000)
    async with aiohttp.ClientSession() as session:
        location = await create(session, first.url, len(data))
        reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
        writer.write(patch_head(location, 0, len(data)) + data[:120_000])
        await writer.drain()

        async def held() -> bool:
            return (await row(database_url, location))["lease_owner"] is not None

        await wait_for(held)
        first.process.terminate()
        # Answered at once, not at the shutdown timeout: the client resumes elsewhere.
        status, rest = await read_to_close(reader)
        assert status == 503 and "retry-after: 1" in rest.lower()
        writer.close()
        assert first.process.wait(10) == 0
        assert await offset_of(session, second.url, location) == 120_000
        async with session.patch(
            f"{second.url}{location}", data=data[120_000:], headers={**PATCH, "Upload-Offset": "120000"}
        ) as response:
            assert response.status == 204, await response.text()
        async with session.get(f"{second.url}/prerecordings/{EVENT}/{START}") as response:
            assert await response.read() == data


async def test_the_sweeper_removes_old_bytes_of_ended_or_unknown_uploads_only(
    settings: Settings, database_url: str, aiohttp_client
) -> None:  # type: ignore[no-untyped-def]
    from prerec.app import create_app
    from prerec.uploads.engine import ENGINE

    quick = dataclasses.replace(settings, tmp_max_age_seconds=1.0)
    app = create_app(quick, database_url)
    client = await aiohttp_client(app)
    base = base_of(client)
    location = await create(client.session, base, 1000)
    live = uuid.UUID(location.rsplit("/", 1)[1])
    async with client.session.patch(
        f"{base}{location}", data=audio(400), headers={**PATCH, "Upload-Offset": "0"}
    ) as response:
        assert response.status == 204
    stray = uuid.uuid4()
    leave_stray(quick, stray)
    assert upload_ids(quick) == {live, stray}
    await asyncio.sleep(1.5)  # both old now
    await app[ENGINE].sweep()
    assert upload_ids(quick) == {live}


async def written_elsewhere(
    app: web.Application, database_url: str, upload_id: uuid.UUID, data: bytes
) -> asyncpg.Connection:
    """All of `data` written and recorded through the storage interface as another replica's
    engine would, under a lease of that replica's; its connection, still holding the lease."""
    writer = await asyncpg.connect(database_url)
    held = await db.acquire_lease(writer, upload_id, "elsewhere/1/dead", writer.get_server_pid())
    assert held is not None

    async def allocate(count: int) -> int:
        return await db.allocate_parts(writer, upload_id, held.generation, count)

    appender = await app[STORAGE].appender(held, [], None, allocate)
    await asyncio.wrap_future(appender.submit(memoryview(data), 0))
    progress = await appender.persist(len(data))
    await appender.stop()
    await db.advance(
        writer, upload_id, held.generation, 0, progress.offset, 86400, pieces=progress.pieces, tail=progress.tail
    )
    return writer


async def saved_once(client: TestClient, database_url: str, data: bytes) -> None:
    """The upload is the prerecording at START, whole, announced by exactly one event."""
    async with client.session.get(f"{base_of(client)}/prerecordings/{EVENT}/{START}") as response:
        assert response.status == 200
        assert await response.read() == data
    assert await created_events(database_url) == 1


def after_assembling(
    monkeypatch: pytest.MonkeyPatch, app: web.Application, then: Callable[[], Awaitable[None]]
) -> None:
    """Have every finisher run `then` between its assembly (the store's own) and its commit."""
    backend = type(app[STORAGE])
    assemble = backend.assemble

    async def assemble_then(storage: Any, upload: Any, pieces: list[Piece]) -> str:
        name = await assemble(storage, upload, pieces)
        await then()
        return name

    monkeypatch.setattr(backend, "assemble", assemble_then)


async def test_an_upload_complete_but_unfinished_is_finished_by_the_next_head(
    client: TestClient, app: web.Application, settings: Settings, database_url: str
) -> None:
    """Its writer recorded the last byte and died before finishing: a tus client seeing
    offset == length never sends another request, so asking for the offset must finish it."""
    data = audio(5000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    writer = await written_elsewhere(app, database_url, uuid.UUID(location.rsplit("/", 1)[1]), data)
    await writer.close()  # dies before finishing
    assert await offset_of(client.session, base, location) == len(data)
    await saved_once(client, database_url, data)
    assert segments(settings) == []


async def test_a_finisher_that_died_after_assembling_is_finished_by_the_next_head(
    client: TestClient, app: web.Application, settings: Settings, database_url: str
) -> None:
    """kill -9 between the assembly (segments joined into the blob and removed; S3: Complete)
    and the commit: the next finisher finds no segments, yet the blob is whole in the store and
    must be the one saved, not a 5xx on every HEAD from then on. Nor is that blob an orphan to
    gc meanwhile, though no prerecording points at it yet."""
    data = audio(300_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    writer = await written_elsewhere(app, database_url, upload_id, data)
    finishing = await db.begin_finishing(writer, upload_id, (await db.get_upload(writer, upload_id)).generation)
    await app[STORAGE].assemble(finishing, await db.upload_pieces(writer, upload_id))
    await writer.close()  # dies before the commit
    report = await check(database_url, app[STORAGE], grace_seconds=0, apply=True)
    assert report.orphans == []
    assert await offset_of(client.session, base, location) == len(data)
    await saved_once(client, database_url, data)
    assert segments(settings) == []


async def test_a_finisher_taken_over_after_assembling_leaves_the_blob_to_the_one_that_took_over(
    client: TestClient, app: web.Application, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finisher stalls after assembling until its lease looks dead; the HEAD that takes over
    records the same blob (it is named after the upload). The first finisher's commit is then
    fenced, and must not remove that blob from under the prerecording now pointing at it; its
    PATCH gets the answer the upload finished with."""
    stalled, go_on = asyncio.Event(), asyncio.Event()

    async def stall() -> None:
        if not stalled.is_set():  # the first finisher only
            stalled.set()
            await go_on.wait()

    after_assembling(monkeypatch, app, stall)
    data = audio(300_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    first = asyncio.ensure_future(
        client.session.patch(f"{base}{location}", data=data, headers={**PATCH, "Upload-Offset": "0"})
    )
    await asyncio.wait_for(stalled.wait(), timeout=10)
    conn = await asyncpg.connect(database_url)
    try:  # a process stalled past its lease
        await conn.execute("UPDATE uploads SET lease_expires = now() - interval '1 second' WHERE id = $1", upload_id)
    finally:
        await conn.close()
    assert await offset_of(client.session, base, location) == len(data)  # taken over and finished
    go_on.set()
    answer = await first
    answer.release()
    assert answer.status == 204  # the answer of the finish that took over: its bytes are in it
    await saved_once(client, database_url, data)


async def test_a_database_failing_at_the_finish_leaves_the_upload_to_the_next_finisher(
    client: TestClient, app: web.Application, settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No connection for the commit (every pooled one busy past the database timeout): the
    last PATCH answers 503, and the upload stays finishing with its blob, so the next HEAD
    finishes it; not a complete upload refused for good, its bytes thrown away."""
    pool = app[db.POOL]
    held: list[asyncpg.Connection] = []

    async def give_back() -> None:
        for conn in held:
            await pool.release(conn)

    async def starve() -> None:
        if not held:
            while len(held) < pool.get_max_size():
                held.append(await asyncio.wait_for(pool.acquire(), timeout=5))
            asyncio.get_running_loop().call_later(
                settings.db_timeout_seconds + 0.5, lambda: asyncio.ensure_future(give_back())
            )

    after_assembling(monkeypatch, app, starve)
    data = audio(300_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    async with client.session.patch(f"{base}{location}", data=data, headers={**PATCH, "Upload-Offset": "0"}) as answer:
        assert answer.status == 503, await answer.text()
    await wait_for(lambda: pool.get_idle_size() > 0, timeout=settings.db_timeout_seconds + 5)
    assert await offset_of(client.session, base, location) == len(data)
    await saved_once(client, database_url, data)


async def test_the_finisher_keeps_its_lease_alive_through_a_long_assembly(
    client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assembling gigabytes on a slow disk may outlast a lease: the finisher renews it, or
    another replica would take the upload as abandoned and finish it a second time."""
    monkeypatch.setattr(engine, "RENEW_SECONDS", 0.05)
    backend = type(client.app[STORAGE])
    assemble = backend.assemble
    leases: list[tuple[str, object]] = []

    async def slow_assemble(storage: Any, upload: Any, pieces: list[Piece]) -> str:
        # The store's own pace, slowed: the same assembly, begun later.
        conn = await asyncpg.connect(database_url)
        try:
            query = "SELECT state, lease_expires FROM uploads WHERE id = $1"
            leases.append(tuple(await conn.fetchrow(query, upload.id)))
            await asyncio.sleep(0.5)
            leases.append(tuple(await conn.fetchrow(query, upload.id)))
        finally:
            await conn.close()
        return await assemble(storage, upload, pieces)

    monkeypatch.setattr(backend, "assemble", slow_assemble)
    data = audio(100_000)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    async with client.session.patch(f"{base}{location}", data=data, headers={**PATCH, "Upload-Offset": "0"}) as answer:
        assert answer.status == 204, await answer.text()
    (state, before), (_, after) = leases
    assert state == "finishing"
    assert after > before  # type: ignore[operator]
    assert await created_events(database_url) == 1


@pytest.mark.parametrize("backend", ["s3"], indirect=True)  # part numbers are S3's
async def test_a_zombies_part_is_never_assembled(client: TestClient, settings: Settings, database_url: str) -> None:
    """A writer that lost its lease may still send a part (a frozen process waking up). Its
    number was handed out under its own generation, the taker's numbers come after it, and
    Complete lists the recorded parts only: the file is the taker's bytes, whatever the store
    lists (SeaweedFS's ListParts would show the zombie's part)."""
    data = audio(12 * 1024 * 1024)
    base = base_of(client)
    location = await create(client.session, base, len(data))
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    zombie = await asyncpg.connect(database_url)
    try:
        held = await db.acquire_lease(zombie, upload_id, "elsewhere/1/zombie", zombie.get_server_pid())
        assert held is not None and held.store_ref is not None
        number = await db.allocate_parts(zombie, upload_id, held.generation, 1)
        store, bucket, prefix = bucket_of(settings)
        name, _, multipart_id = held.store_ref.partition("?uploadId=")
        store.upload_part(
            Bucket=bucket,
            Key=f"{prefix}blobs/{name}",
            UploadId=multipart_id,
            PartNumber=number,
            Body=b"OggS" + b"z" * (6 * 1024 * 1024),
        )
        async with client.session.patch(
            f"{base}{location}", data=data, headers={**PATCH, "Upload-Offset": "0"}
        ) as response:
            assert response.status == 204, await response.text()
        with pytest.raises(db.Fenced):
            await db.allocate_parts(zombie, upload_id, held.generation, 1)
    finally:
        await zombie.close()
    async with client.session.get(f"{base}/prerecordings/{EVENT}/{START}") as response:
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(data).digest()
    assert segments(settings) == []
