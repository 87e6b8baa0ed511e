"""The folder backend's write protocol: concurrent writers, replaced blobs, leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from prerec.storage.fs import FileStorage
from tests.conftest import EVENT, blob_files, ogg, tmp_files

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00:00"
OGG = {"Content-Type": "audio/ogg"}


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
    storage = FileStorage(settings.blob_dir)
    opened = await storage.open(name, len(old), 0, len(old))
    assert opened is not None and opened.file is not None
    try:
        await client.put(KEY, data=ogg(100, b"n"), headers=OGG)
        assert not (settings.blob_dir / "blobs" / name).exists()
        await storage.sweep(0)  # even once the grace period is over
        assert opened.file.read() == old
    finally:
        opened.close()


async def test_sweep_removes_only_stale_temporary_and_retired_files(tmp_path) -> None:
    storage = FileStorage(tmp_path)
    await storage.start()
    stale = tmp_path / "tmp" / "stale.part"
    fresh = tmp_path / "tmp" / "fresh.part"
    retired = tmp_path / "trash" / "old.ogg"
    for path in (stale, fresh, retired):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3601
    os.utime(stale, (an_hour_ago, an_hour_ago))
    os.utime(retired, (an_hour_ago, an_hour_ago))
    assert sorted(await storage.sweep(3600)) == ["tmp/stale.part", "trash/old.ogg"]
    assert not stale.exists() and not retired.exists() and fresh.exists()


async def test_a_replaced_blob_stays_readable_for_the_grace_period(client, settings) -> None:
    """Another replica may still be sending it (on NFS an unlink would cut that reader)."""
    await client.put(KEY, data=ogg(1000, b"o"), headers=OGG)
    await client.put(KEY, data=ogg(1000, b"n"), headers=OGG)
    await client.delete(KEY)
    trash = sorted((settings.blob_dir / "trash").iterdir())
    assert sorted(path.read_bytes() for path in trash) == [ogg(1000, b"n"), ogg(1000, b"o")]
    assert await FileStorage(settings.blob_dir).sweep(3600) == []


async def test_inventory_lists_blobs_in_service_and_leftovers_not_the_trash(client, settings) -> None:
    await client.put(KEY, data=ogg(1000, b"o"), headers=OGG)
    await client.put(KEY, data=ogg(2000, b"n"), headers=OGG)  # the first goes to the trash
    leftover = settings.blob_dir / "tmp" / "crashed.part"
    leftover.write_bytes(b"OggS")
    storage = FileStorage(settings.blob_dir)
    inventory = await storage.inventory()
    [(name, stored)] = inventory.blobs.items()
    assert stored.size == 2000 and await storage.blob_size(name) == 2000
    assert list(inventory.leftovers) == ["crashed.part"] and inventory.leftovers["crashed.part"].size == 4
    await storage.drop_leftover("crashed.part")
    assert not leftover.exists() and (await storage.inventory()).leftovers == {}
    assert await storage.blob_size("00/gone.ogg") is None
