"""Streaming a body into a new blob: memory, cut-off and stalled clients, the pace watchdog."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import time
import tracemalloc
import uuid

import pytest

from prerec.app import create_app
from prerec.storage import receive
from prerec.storage.fs import FileStorage
from prerec.storage.receive import WRITE_PIECE, Pipeline, _Progress
from tests.conftest import EVENT, blob_files, ogg, put_head, tmp_files, wait_for

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00:00"
OGG = {"Content-Type": "audio/ogg"}


async def test_chunked_upload_is_not_held_in_memory(client, settings) -> None:
    size = 48 * 1024 * 1024
    piece = b"\x55" * 65536

    async def body():  # type: ignore[no-untyped-def]
        yield b"OggS" + piece[4:]
        for _ in range(size // len(piece) - 1):
            yield piece

    tracemalloc.start()
    try:
        response = await client.put(KEY, data=body(), headers=OGG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 201
    assert (await client.head(KEY)).headers["Content-Length"] == str(size)
    # Client and server share this process; both together stay a small fraction of the body.
    assert peak < size / 8, f"peak Python memory {peak} bytes for a {size}-byte body"


async def test_client_cut_off_mid_upload_keeps_the_old_version_and_no_leftover(client, settings) -> None:
    old = ogg(10_000, b"o")
    assert (await client.put(KEY, data=old, headers=OGG)).status == 201

    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 10_000_000))
    writer.write(b"OggS" + b"\x01" * (3 * 1024 * 1024))
    await writer.drain()
    await wait_for(lambda: tmp_files(settings))  # the upload is in progress
    writer.transport.abort()

    await wait_for(lambda: not tmp_files(settings))
    response = await client.get(KEY)
    assert await response.read() == old
    assert len(blob_files(settings)) == 1


async def test_cut_off_upload_is_not_logged_as_a_server_error(client, settings, caplog) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 9_000_000))
    writer.write(b"OggS" + b"\0" * 2_000_000)
    await writer.drain()
    await wait_for(lambda: tmp_files(settings))
    writer.transport.abort()
    await wait_for(lambda: not tmp_files(settings))
    assert [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")] == []


@pytest.fixture
async def impatient(aiohttp_client, settings, database_url):  # type: ignore[no-untyped-def]
    """A service that waits at most one second for the next body bytes."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, read_timeout_seconds=1.0), database_url))


async def test_stalled_upload_is_cut_off_with_408_and_leaves_nothing(impatient, settings) -> None:
    assert (await impatient.put(KEY, data=ogg(100, b"o"), headers=OGG)).status == 201
    reader, writer = await asyncio.open_connection(impatient.host, impatient.port)
    writer.write(put_head(KEY, 1000) + b"OggS")
    await writer.drain()
    began = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert 1.0 <= time.monotonic() - began < 4
    writer.close()
    assert tmp_files(settings) == []
    assert await (await impatient.get(KEY)).read() == ogg(100, b"o")


async def test_an_upload_trickling_in_is_never_swept(aiohttp_client, settings, database_url) -> None:
    """Bytes arriving slower than a write piece fills must still keep the temporary file alive
    for this replica's sweeper and for another's sharing the folder."""
    settings = dataclasses.replace(settings, tmp_max_age_seconds=2.0)
    client = await aiohttp_client(create_app(settings, database_url))
    body = ogg(21_000, b"t")

    async def trickle():  # type: ignore[no-untyped-def]
        for at in range(0, len(body), 1000):
            yield body[at : at + 1000]
            await asyncio.sleep(0.25)  # 5 s in all: more than twice the age limit

    swept: list = []
    sweeping = True
    other_replica = FileStorage(settings.blob_dir)

    async def sweep() -> None:
        while sweeping:
            swept.extend(await other_replica.sweep(settings.tmp_max_age_seconds))
            await asyncio.sleep(0.05)

    sweeper = asyncio.create_task(sweep())
    try:
        response = await client.put(KEY, data=trickle(), headers=OGG)
    finally:
        sweeping = False
        await sweeper
    assert response.status == 201, await response.text()
    assert swept == []
    assert await (await client.get(KEY)).read() == body


@pytest.fixture
async def demanding(aiohttp_client, settings, database_url):  # type: ignore[no-untyped-def]
    """A service that wants at least 1000 body bytes a second, averaged over two seconds."""
    demanding_settings = dataclasses.replace(settings, read_timeout_seconds=2.0, min_upload_rate_bytes=1000)
    return await aiohttp_client(create_app(demanding_settings, database_url))


async def drip(writer: asyncio.StreamWriter, piece: int, every: float) -> None:
    while True:
        writer.write(b"\x01" * piece)
        await writer.drain()
        await asyncio.sleep(every)


async def test_an_upload_dripping_below_the_minimum_rate_is_cut_off_with_408(demanding, settings) -> None:
    """Never a full stall (a few bytes every 0.1 s), but a tenth of the minimum rate."""
    assert (await demanding.put(KEY, data=ogg(100, b"o"), headers=OGG)).status == 201
    reader, writer = await asyncio.open_connection(demanding.host, demanding.port)
    writer.write(put_head(KEY, 1_000_000) + b"OggS")
    dripping = asyncio.create_task(drip(writer, 10, 0.1))
    try:
        status_line = await asyncio.wait_for(reader.readline(), 15)
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"].startswith("application/problem+json")
        detail = json.loads(await reader.readexactly(int(headers["content-length"])))["detail"]
        assert "bytes per second" in detail, detail
    finally:
        dripping.cancel()
        writer.close()
    assert tmp_files(settings) == []
    assert await (await demanding.get(KEY)).read() == ogg(100, b"o")


async def test_an_upload_above_the_minimum_rate_is_not_cut_off(demanding) -> None:
    """The negative control: the same trickle, only faster than the minimum, is stored."""
    body = ogg(24_000, b"f")

    async def steady():  # type: ignore[no-untyped-def]
        for at in range(0, len(body), 500):
            yield body[at : at + 500]
            await asyncio.sleep(0.1)  # 5000 bytes a second for 4.8 s, past two windows

    response = await demanding.put(KEY, data=steady(), headers=OGG)
    assert response.status == 201, await response.text()
    assert await (await demanding.get(KEY)).read() == body


def test_time_spent_waiting_on_our_disk_is_not_counted_against_the_client() -> None:
    class Clock:
        now = 100.0

        def time(self) -> float:
            return self.now

    clock = Clock()
    progress = _Progress(clock)  # type: ignore[arg-type]
    start = progress.clock()
    clock.now += 2
    with progress.waiting_on_disk():
        clock.now += 30
        assert progress.clock() == start + 2  # the watchdog looking in during the wait
    clock.now += 1
    assert progress.clock() == start + 3


async def test_memory_goes_back_after_a_burst_of_concurrent_uploads(tmp_path, storage_env, replicas) -> None:
    import aiohttp
    import psutil

    from tests.conftest import Replica, free_port

    replica = Replica(storage_env, free_port(), tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready()
    process = psutil.Process(replica.process.pid)
    before = process.memory_info().rss
    body = ogg(1 << 20, b"\x5a")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def upload(n: int) -> int:
            url = f"{replica.url}/prerecordings/{EVENT}/2024-01-01T00:{n // 60:02d}:{n % 60:02d}"
            async with session.put(url, data=body, headers=OGG) as response:
                return response.status

        assert set(await asyncio.gather(*(upload(n) for n in range(200)))) == {201}

    def settled() -> bool:
        return process.memory_info().rss - before < 25_000_000

    # 200 MB went through; what stays resident once idle is near what the idle server had.
    await wait_for(settled, timeout=5.0, interval=0.2)


async def test_pipeline_continues_a_resumable_segment_from_its_offset(tmp_path) -> None:
    """The upload engine's use of the pipeline: pieces land at their upload offsets in a
    segment that began earlier, the hashes carried over go on over the new bytes in order, and
    `written` says how far every piece is written and hashed."""
    storage = FileStorage(tmp_path)
    await storage.start()
    upload_id = uuid.uuid4()
    before = os.urandom(1000)
    after = os.urandom(3 * WRITE_PIECE + 12345)
    # A segment that starts at offset 500 of the upload and already holds [500, 1000).
    segment = await storage.segment(upload_id, 1, 500)
    segment.write(memoryview(before[500:]), 500)
    carried = hashlib.sha256(before)
    pipeline = Pipeline(segment, frozenset(), hashers={"sha256": carried}, offset=1000)
    try:
        view = memoryview(after)
        while view:
            if pipeline.add(view[:70000]):
                await pipeline.flush()
                assert pipeline.written <= pipeline.offset
            view = view[pipeline.taken :]
        await pipeline.finish()
    finally:
        pipeline.close()
        segment.close()
    assert pipeline.written == pipeline.offset == 1000 + len(after)
    assert carried.digest() == hashlib.sha256(before + after).digest()
    assert storage.segment_path(upload_id, 1).read_bytes() == before[500:] + after


async def test_buffers_go_to_the_next_upload_but_never_one_a_write_still_reads(tmp_path) -> None:
    """Pipelines hand their buffers on (a resumable upload opens one per PATCH), except a
    buffer whose write is still running when its pipeline closes (an upload cut while the disk
    hangs): filled by the next upload under that write, it would put the next upload's bytes
    into the first one's file."""
    receive._spare.clear()
    storage = FileStorage(tmp_path)
    await storage.start()
    held_segment = await storage.segment(uuid.uuid4(), 1, 0)
    other_segment = await storage.segment(uuid.uuid4(), 1, 0)
    gate = threading.Event()
    writes = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    class HangingDisk:
        def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
            def write() -> None:
                assert gate.wait(10)
                held_segment.write(piece, offset)

            return writes.submit(write)

    first = Pipeline(HangingDisk(), frozenset())
    sent = os.urandom(WRITE_PIECE)
    assert first.add(memoryview(sent))
    await first.flush()  # its write now waits for the disk
    in_flight, idle = first.buffers
    first.close()
    assert receive._spare == [idle]
    second = Pipeline(other_segment, frozenset())
    try:
        for _ in range(3):
            if second.add(memoryview(b"x" * WRITE_PIECE)):
                await second.flush()
        await second.finish()
        assert any(buffer is idle for buffer in second.buffers)
        assert not any(buffer is in_flight for buffer in second.buffers)
    finally:
        second.close()
        gate.set()
        writes.shutdown(wait=True)
        held_segment.close()
        other_segment.close()
    assert held_segment.path.read_bytes() == sent


class _ThreadProbe:
    """A hasher that notes the thread it runs on (and may wait for a gate first)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.threads: list[threading.Thread] = []
        self.gate = gate

    def update(self, piece: memoryview) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.threads.append(threading.current_thread())


async def _one_piece(pipeline: Pipeline) -> None:
    assert pipeline.add(memoryview(b"x" * WRITE_PIECE))
    await pipeline.flush()


async def test_pipelines_one_after_another_hash_on_one_thread(tmp_path) -> None:
    """A resumable upload in 5 MiB PATCHes opens a pipeline a PATCH. Starting a hashing thread
    for each blocked the event loop until the new thread ran (milliseconds on a busy machine,
    every few PATCHes); a closed pipeline's idle thread hashes the next one's pieces. One whose
    hashing still runs when it closes is not handed on."""
    for spare in receive._spare_hashing:
        spare.shutdown(wait=False)
    receive._spare_hashing.clear()
    storage = FileStorage(tmp_path)
    await storage.start()
    probe = _ThreadProbe()
    for _ in range(5):
        segment = await storage.segment(uuid.uuid4(), 1, 0)
        pipeline = Pipeline(segment, frozenset(), hashers={"probe": probe})
        try:
            await _one_piece(pipeline)
            await pipeline.finish()
        finally:
            pipeline.close()
            segment.close()
    assert len(probe.threads) == 5
    assert all(thread is probe.threads[0] for thread in probe.threads)

    # Hashing held up (a hash thread starved): that pipeline's thread is not handed on, and
    # the next upload's hashing does not queue behind it.
    gate = threading.Event()
    segment = await storage.segment(uuid.uuid4(), 1, 0)
    stuck = Pipeline(segment, frozenset(), hashers={"probe": _ThreadProbe(gate)})
    await _one_piece(stuck)
    stuck.close()
    assert receive._spare_hashing == []
    follower = Pipeline(segment, frozenset(), hashers={"probe": _ThreadProbe()}, offset=WRITE_PIECE)
    try:
        await _one_piece(follower)
        await asyncio.wait_for(follower.finish(), 5)
    finally:
        follower.close()
        gate.set()
        await asyncio.wait([asyncio.wrap_future(future) for future in stuck.busy[0]])
        segment.close()
