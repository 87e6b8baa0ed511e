"""Faults injected for real: a replica killed mid-upload, a full disk."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import subprocess
import sys

import aiohttp
import asyncpg
import pytest

from prerec.app import create_app
from prerec.config import Settings
from tests.conftest import EVENT, ROOT, Replica, blob_files, blob_names, free_port, ogg, tmp_files, wait_for

OGG = {"Content-Type": "audio/ogg"}


@pytest.mark.parametrize("backend", ["fs", "s3"], indirect=True)
async def test_kill_9_in_the_middle_of_ten_uploads_leaves_every_key_whole(
    tmp_path, storage_env, replicas, database_url
) -> None:
    settings = Settings.from_env(storage_env)
    replica = Replica(storage_env, free_port(), tmp_path / "first.log")
    replicas.append(replica)
    replica.wait_ready()
    keys = [f"/prerecordings/{EVENT}/2024-01-{day:02d}T00:00" for day in range(1, 11)]
    old = {key: ogg(1_000_000 + i, bytes([i + 1])) for i, key in enumerate(keys)}
    # Past S3's first part (8 MiB), so that a killed upload leaves a multipart upload behind.
    new = {key: ogg(12_000_000 + i, bytes([i + 101])) for i, key in enumerate(keys)}
    async with aiohttp.ClientSession() as session:
        for key in keys:
            assert (await session.put(replica.url + key, data=old[key], headers=OGG)).status == 201

        async def upload(index: int, key: str) -> None:
            body = new[key]
            pause = 0 if index % 3 == 0 else 0.05  # some finish before the kill, most are mid-body

            async def chunks():  # type: ignore[no-untyped-def]
                for at in range(0, len(body), 128 * 1024):
                    yield body[at : at + 128 * 1024]
                    await asyncio.sleep(pause)

            try:
                await session.put(replica.url + key, data=chunks(), headers=OGG)
            except aiohttp.ClientError:
                pass  # cut by the kill

        uploads = [asyncio.ensure_future(upload(i, key)) for i, key in enumerate(keys)]
        await asyncio.wait_for(asyncio.gather(*uploads[::3]), 30)
        await wait_for(lambda: tmp_files(settings), timeout=20)  # slow ones are under way in the store
        await asyncio.sleep(random.random() * 0.2)
        replica.process.kill()
        await asyncio.gather(*uploads)
        replica.process.wait()

    successor = Replica(storage_env, free_port(), tmp_path / "second.log")
    replicas.append(successor)
    successor.wait_ready()
    async with aiohttp.ClientSession() as session:
        outcomes = []
        for key in keys:
            body = await (await session.get(successor.url + key)).read()
            assert body in (old[key], new[key]), f"{key} serves neither version whole"
            outcomes.append(body == new[key])
    assert any(outcomes) and not all(outcomes), f"the kill was not mid-upload: {outcomes}"
    assert tmp_files(settings)  # what the killed uploads left: temporary files or multipart uploads

    env = {**os.environ, **storage_env, "PREREC_LOG_FORMAT": "text"}
    gc = subprocess.run(
        [sys.executable, "-m", "prerec", "gc", "--apply", "--grace-seconds", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gc.returncode == 1 and "leftover upload" in gc.stdout, gc.stdout + gc.stderr
    conn = await asyncpg.connect(database_url)
    try:
        rows = {row["blob"] for row in await conn.fetch("SELECT blob FROM prerecordings")}
    finally:
        await conn.close()
    assert blob_names(settings) == rows and len(rows) == len(keys)
    assert tmp_files(settings) == []


@pytest.fixture
def small_disk(settings):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    storage = settings.blob_dir
    storage.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(storage)], check=True)
    yield storage
    subprocess.run(["umount", "-l", str(storage)], check=False)


async def test_a_full_disk_is_507_and_keeps_the_old_version(aiohttp_client, settings, database_url, small_disk) -> None:
    client = await aiohttp_client(create_app(settings, database_url))
    key = f"/prerecordings/{EVENT}/2024-01-01T00:00"
    old = ogg(1_000_000, b"o")
    assert (await client.put(key, data=old, headers=OGG)).status == 201
    filler = small_disk / "filler"
    with open(filler, "wb") as out:  # leave well under 2 MB free
        out.write(b"\0" * (5 * 1024 * 1024 + 512 * 1024))

    response = await client.put(key, data=ogg(2_500_000, b"n"), headers=OGG)
    assert response.status == 507
    assert response.content_type == "application/problem+json"
    assert "full" in (await response.json())["detail"]
    assert tmp_files(settings) == []
    assert await (await client.get(key)).read() == old
    assert len(blob_files(settings)) == 1

    filler.unlink()
    assert (await client.put(key, data=ogg(2_500_000, b"n"), headers=OGG)).status == 204
    assert await (await client.get(key)).read() == ogg(2_500_000, b"n")


async def test_body_stalled_right_after_the_headers_is_cut_off(aiohttp_client, settings, database_url) -> None:
    """Slow-loris: headers, then nothing."""
    client = await aiohttp_client(create_app(dataclasses.replace(settings, read_timeout_seconds=1.0), database_url))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT /prerecordings/{EVENT}/2024-01-01T00:00 HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: audio/ogg\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    writer.close()
    assert tmp_files(settings) == []
