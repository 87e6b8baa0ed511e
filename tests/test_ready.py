"""GET /ready: ready only with a database, a writable storage folder and a listener."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ogg


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
