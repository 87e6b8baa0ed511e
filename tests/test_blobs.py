"""The storage protocol: streamed writes, cut-off uploads, concurrent writers, leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc

from prerec import blobs
from tests.conftest import EVENT, blob_files, ogg, tmp_files, wait_for

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
    writer.write(
        f"PUT {KEY} HTTP/1.1\r\nHost: x\r\nContent-Type: audio/ogg\r\nContent-Length: 10000000\r\n\r\n".encode()
    )
    writer.write(b"OggS" + b"\x01" * (3 * 1024 * 1024))
    await writer.drain()
    await wait_for(lambda: tmp_files(settings))  # the upload is in progress
    writer.transport.abort()

    await wait_for(lambda: not tmp_files(settings))
    response = await client.get(KEY)
    assert await response.read() == old
    assert len(blob_files(settings)) == 1


async def test_concurrent_puts_to_one_key_leave_one_whole_body(client, settings) -> None:
    bodies = [ogg(200_000 + i * 1000, bytes([i + 1])) for i in range(20)]
    responses = await asyncio.gather(*(client.put(KEY, data=body, headers=OGG) for body in bodies))
    assert sorted(r.status for r in responses) == [201] + [204] * 19

    served = await (await client.get(KEY)).read()
    assert served in bodies
    response = await client.head(KEY)
    assert response.headers["ETag"] == f'"{hashlib.sha256(served).hexdigest()}"'
    files = blob_files(settings)
    assert len(files) == 1 and files[0].read_bytes() == served
    assert tmp_files(settings) == []


async def test_reader_keeps_its_blob_after_a_replace(client, settings) -> None:
    old = ogg(8 * 1024 * 1024, b"o")
    await client.put(KEY, data=old, headers=OGG)
    name = blob_files(settings)[0].relative_to(settings.blob_dir / "blobs").as_posix()
    with blobs.open_blob(settings.blob_dir, name) as opened:
        await client.put(KEY, data=ogg(100, b"n"), headers=OGG)
        assert not (settings.blob_dir / "blobs" / name).exists()
        assert opened.read() == old


def test_sweep_removes_only_stale_temporary_files(tmp_path) -> None:
    blobs.layout(tmp_path)
    stale = tmp_path / "tmp" / "stale.part"
    fresh = tmp_path / "tmp" / "fresh.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    an_hour_ago = time.time() - 3601
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert blobs.sweep_tmp(tmp_path, 3600) == [stale]
    assert not stale.exists() and fresh.exists()
