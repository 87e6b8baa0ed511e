"""GET /ready: ready only with a database, a writable storage folder and a listener."""

from __future__ import annotations

import os
import subprocess
import urllib.parse

import asyncpg
import pytest

from prerec import db
from prerec.events import BROADCASTER
from tests.conftest import EVENT, ogg, read_events, sample, wait_for, with_database

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


async def test_ready_when_everything_works(client) -> None:
    response = await client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


@pytest.fixture
def read_only_storage(settings):  # type: ignore[no-untyped-def]
    """The storage folder, made unwritable: a read-only tmpfs for root (whom permissions do not
    stop), plain permissions otherwise."""
    storage = settings.blob_dir
    storage.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(storage)], check=True)
    yield storage
    if os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(storage)], check=False)
    else:
        for folder in (storage, *storage.iterdir()):
            folder.chmod(0o755)


def make_unwritable(storage) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(storage)], check=True)
    else:
        for folder in (*storage.iterdir(), storage):
            folder.chmod(0o555)


async def test_unwritable_storage_is_not_ready_and_uploads_get_503(aiohttp_client, app, read_only_storage) -> None:
    client = await aiohttp_client(app)  # lays out the storage folder on the tmpfs
    make_unwritable(read_only_storage)
    response = await client.get("/ready")
    assert response.status == 503
    assert "storage folder is not writable" in (await response.json())["detail"]
    upload = await client.put(
        "/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-01T00:00",
        data=ogg(1000),
        headers={"Content-Type": "audio/ogg"},
    )
    assert upload.status in (503, 507)
    assert "storage folder" in (await upload.json())["detail"]


async def test_the_listener_alone_lost_is_not_ready_until_it_is_back_and_no_event_is_lost(
    client, app, database_url
) -> None:
    broadcaster = app[BROADCASTER]
    stream = await client.get("/sse")
    # Connections for the requests below, made now: the database refuses new ones meanwhile.
    pool = app[db.POOL]
    for conn in [await pool.acquire() for _ in range(3)]:
        await pool.release(conn)

    admin = await asyncpg.connect(with_database(database_url, "postgres"))
    name = urllib.parse.urlsplit(database_url).path.lstrip("/")
    try:
        # The listener cannot come back until allowed, so /ready is seen not ready for sure.
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", broadcaster._listener.get_server_pid())
        await wait_for(lambda: ready_status(client, 503))
        response = await client.get("/ready")
        assert response.content_type == "application/problem+json"
        assert (await response.json())["detail"] == "Not ready: the event listener is not connected."
        # The rest still works, and a change made meanwhile is in the log though no one listens.
        assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 201
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()

    await wait_for(lambda: ready_status(client, 200), timeout=20)
    [(_, missed)] = await read_events(stream, 1)
    assert missed["type"] == "prerecording-created"
    assert (await client.delete(KEY)).status == 204
    [(_, live)] = await read_events(stream, 1)
    assert live["type"] == "prerecording-deleted"
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "prerec_listener_reconnects_total") == 1
    stream.close()


async def ready_status(client, status: int) -> bool:  # type: ignore[no-untyped-def]
    return (await client.get("/ready")).status == status
