"""`python -m prerec gc`: finds and repairs what a crash can leave behind."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from prerec import db
from prerec.app import create_app
from prerec.storage import STORAGE
from prerec.storage.fs import FileStorage
from prerec.storage_check import check, sweep_orphans
from tests.conftest import EVENT, ROOT, blob_files, free_port, ogg, read_events, wait_for

OGG = {"Content-Type": "audio/ogg"}
KEYS = [f"/prerecordings/{EVENT}/2024-01-0{day}T00:00" for day in (1, 2, 3)]


def age(path, seconds: float = 7200) -> None:  # type: ignore[no-untyped-def]
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_a_healthy_store_reports_nothing(client, settings, database_url) -> None:
    for key in KEYS:
        await client.put(key, data=ogg(1000), headers=OGG)
    report = await check(database_url, FileStorage(settings.blob_dir), 3600, apply=False)
    assert not report.anything_wrong and report.lines()[-1].startswith("storage and database agree")


async def test_finds_and_repairs_orphans_leftovers_missing_and_torn_blobs(client, settings, database_url) -> None:
    for key in KEYS:
        await client.put(key, data=ogg(1000), headers=OGG)
    first, second, third = sorted(blob_files(settings), key=lambda p: p.stat().st_mtime)
    conn = await asyncpg.connect(database_url)
    try:
        by_blob = {row["blob"]: row["start"] for row in await conn.fetch("SELECT blob, start FROM prerecordings")}
    finally:
        await conn.close()

    orphan = settings.blob_dir / "blobs" / "ff" / "ffff.ogg"  # as if a crash came before the commit
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"OggS...")
    age(orphan)
    young = settings.blob_dir / "blobs" / "ff" / "fffe.ogg"  # maybe an upload committing right now
    young.write_bytes(b"OggS...")
    leftover = settings.blob_dir / "tmp" / "crashed.part"
    leftover.write_bytes(b"OggS")
    age(leftover)
    first.unlink()  # missing
    second.write_bytes(b"OggS torn")  # wrong size

    stream = await client.get("/sse")
    report = await check(database_url, FileStorage(settings.blob_dir), 3600, apply=False)
    assert report.anything_wrong
    assert report.orphans == ["ff/ffff.ogg"] and report.young_orphans == ["ff/fffe.ogg"]
    assert [row.blob for row in report.missing] == [first.relative_to(settings.blob_dir / "blobs").as_posix()]
    assert [(row.size, size) for row, size in report.wrong_size] == [(1000, 9)]
    assert report.leftovers == ["crashed.part"]
    assert orphan.exists() and leftover.exists()  # a check alone changes nothing

    repaired = await check(database_url, FileStorage(settings.blob_dir), 3600, apply=True)
    assert len(repaired.repaired) == 4
    assert not orphan.exists() and not leftover.exists() and young.exists()
    listing = await (await client.get(f"/prerecordings/{EVENT}")).json()
    assert [item["start"] for item in listing["prerecordings"]] == [
        by_blob[third.relative_to(settings.blob_dir / "blobs").as_posix()].isoformat()
    ]
    # UIs hear about the rows taken out.
    events = await read_events(stream, 2)
    assert {data["type"] for _, data in events} == {"prerecording-deleted"}
    stream.close()

    again = await check(database_url, FileStorage(settings.blob_dir), 3600, apply=False)
    assert not again.anything_wrong
    await FileStorage(settings.blob_dir).sweep(0)


async def test_command_line_exit_status(client, settings, database_url) -> None:
    env = {
        **os.environ,
        "PREREC_DATABASE_URL": database_url,
        "PREREC_STORAGE_DIR": str(settings.blob_dir),
        "PREREC_LOG_FORMAT": "text",
    }
    command = [sys.executable, "-m", "prerec", "gc"]
    await client.put(KEYS[0], data=ogg(1000), headers=OGG)
    clean = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    leftover = settings.blob_dir / "tmp" / "crashed.part"
    leftover.write_bytes(b"x")
    age(leftover)
    found = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert found.returncode == 1 and "crashed.part" in found.stdout
    fixed = subprocess.run([*command, "--apply"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 1 and not leftover.exists()
    assert subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0


async def test_a_torn_blob_is_never_sent_short(client, settings) -> None:
    await client.put(KEYS[0], data=ogg(100_000), headers=OGG)
    [blob] = blob_files(settings)
    blob.write_bytes(ogg(50_000))  # torn behind our back
    response = await client.get(KEYS[0])
    assert response.status == 503 and "damaged" in (await response.json())["detail"]


# The running service's own sweep of orphans


def orphan_blob(settings, name: str, seconds_old: float = 0) -> Path:  # type: ignore[no-untyped-def]
    path = settings.blob_dir / "blobs" / "ff" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"OggS...")
    if seconds_old:
        age(path, seconds_old)
    return path


async def test_the_running_sweeper_retires_old_orphans_and_nothing_else(aiohttp_client, settings, database_url) -> None:
    # A grace period of 6 s has the sweeper run every 3 s.
    settings = dataclasses.replace(settings, tmp_max_age_seconds=6.0)
    client = await aiohttp_client(create_app(settings, database_url))
    for key in KEYS:
        assert (await client.put(key, data=ogg(1000), headers=OGG)).status == 201
    referenced = blob_files(settings)
    for path in referenced:
        age(path)  # referenced blobs far past the grace period stay all the same
    old = orphan_blob(settings, "ffff.ogg", 7200)  # as if a commit's outcome was never known
    young = orphan_blob(settings, "fffe.ogg")  # as if an upload on another replica is committing now

    await wait_for(lambda: not old.exists(), timeout=20)
    assert young.exists()
    assert (settings.blob_dir / "trash" / "ffff.ogg").exists()  # retired: recoverable for a grace period
    assert blob_files(settings) == sorted([*referenced, young])
    for key in KEYS:
        response = await client.get(key)
        assert response.status == 200 and await response.read() == ogg(1000)


async def test_the_sweeper_touches_nothing_without_the_database(client, settings, app) -> None:
    for key in KEYS[:2]:
        await client.put(key, data=ogg(1000), headers=OGG)
    orphan = orphan_blob(settings, "ffff.ogg", 7200)
    unreachable = await db.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", 1.0)
    try:
        assert await sweep_orphans(unreachable, FileStorage(settings.blob_dir), 3600, 1.0) == []
    finally:
        await unreachable.close()
    assert orphan.exists()
    # The same call with the database there: the orphan goes.
    assert await sweep_orphans(app[db.POOL], app[STORAGE], 3600, 5.0) == ["ff/ffff.ogg"]
    assert not orphan.exists()


async def test_the_sweeper_leaves_a_mostly_unreferenced_store_alone(client, settings, app, caplog) -> None:
    """Most blobs unreferenced means a wrong or restored database, not a crash's leftovers."""
    for key in KEYS:
        await client.put(key, data=ogg(1000), headers=OGG)
    orphans = [orphan_blob(settings, f"fff{i}.ogg", 7200) for i in range(4)]  # 4 of 7
    assert await sweep_orphans(app[db.POOL], app[STORAGE], 3600, 5.0) == []
    assert all(path.exists() for path in orphans)
    assert "looks like a wrong database" in caplog.text
    orphans.pop().unlink()  # 3 of 6: no longer most of them
    assert await sweep_orphans(app[db.POOL], app[STORAGE], 3600, 5.0) == [
        "ff/fff0.ogg",
        "ff/fff1.ogg",
        "ff/fff2.ogg",
    ]
    assert not any(path.exists() for path in orphans)


async def test_the_running_sweeper_retires_an_orphan_only_when_two_rounds_find_it(client, settings, app) -> None:
    """On S3 an object from a long multipart upload carries the time the upload began, so a
    blob between its completion and its commit can look old: one sighting is not enough."""
    for key in KEYS:
        await client.put(key, data=ogg(1000), headers=OGG)
    orphan = orphan_blob(settings, "ffff.ogg", 7200)
    suspects: set[str] = set()
    assert await sweep_orphans(app[db.POOL], app[STORAGE], 3600, 5.0, suspects) == []
    assert orphan.exists() and suspects == {"ff/ffff.ogg"}
    assert await sweep_orphans(app[db.POOL], app[STORAGE], 3600, 5.0, suspects) == ["ff/ffff.ogg"]
    assert not orphan.exists() and suspects == set()
