"""The metadata cache behind HEAD and GET: fast, and never serving a replaced version."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from datetime import UTC, datetime

import asyncpg

from prerec import db
from prerec.app import create_app
from prerec.cache import MetadataCache
from prerec.model import Prerecording
from tests.conftest import EVENT, blob_files, ogg, wait_for

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


def etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()}"'


async def test_a_change_through_another_replica_is_seen_at_once(aiohttp_client, client, settings, database_url) -> None:
    other = await aiohttp_client(create_app(settings, database_url))
    await client.put(KEY, data=ogg(100, b"a"), headers=OGG)
    assert (await client.head(KEY)).headers["ETag"] == etag(ogg(100, b"a"))  # now cached here

    await other.put(KEY, data=ogg(100, b"b"), headers=OGG)
    # No wait for the event: the cached entry's blob is already retired, so it is re-read.
    assert (await client.head(KEY)).headers["ETag"] == etag(ogg(100, b"b"))
    assert await (await client.get(KEY)).read() == ogg(100, b"b")
    await other.delete(KEY)
    assert (await client.head(KEY)).status == 404
    assert (await client.get(KEY)).status == 404


async def test_an_event_evicts_even_when_the_old_blob_was_never_retired(client, settings, database_url) -> None:
    """As after a crash between a commit and the retirement of the replaced blob."""
    await client.put(KEY, data=ogg(100, b"a"), headers=OGG)
    assert (await client.head(KEY)).headers["ETag"] == etag(ogg(100, b"a"))
    [old] = blob_files(settings)
    new_body = ogg(200, b"b")
    copy = old.with_name("copy.ogg")
    shutil.copy(old, copy)
    copy.write_bytes(new_body)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE prerecordings SET blob = $1, size = $2, sha256 = $3",
                f"{old.parent.name}/copy.ogg",
                len(new_body),
                hashlib.sha256(new_body).digest(),
            )
            await db._append_event(
                conn,
                "prerecording-updated",
                {"prerecording": {"event": EVENT, "start": "2024-01-01T00:00:00"}},
            )
    finally:
        await conn.close()

    async def fresh() -> bool:
        return (await client.head(KEY)).headers["ETag"] == etag(new_body)

    await wait_for(fresh, timeout=5)


def _item(blob: str) -> Prerecording:
    return Prerecording(
        event=uuid.UUID(EVENT),
        start=datetime(2024, 1, 1),
        type="audio/ogg",
        size=1,
        sha256=b"\0" * 32,
        modified=datetime.now(UTC),
        blob=blob,
    )


def test_a_read_that_raced_an_event_is_not_stored() -> None:
    cache = MetadataCache()
    cache.enable()
    key = (EVENT, "2024-01-01T00:00:00")
    token = cache.token()
    cache.evict(key)  # an event arrived while the row was being read
    cache.put(key, _item("old"), token)
    assert cache.get(key) is None
    cache.put(key, _item("new"), cache.token())
    assert cache.get(key).blob == "new"  # type: ignore[union-attr]


def test_nothing_is_cached_while_events_may_be_missed() -> None:
    cache = MetadataCache()
    key = (EVENT, "2024-01-01T00:00:00")
    cache.put(key, _item("x"), cache.token())
    assert cache.get(key) is None  # not enabled before the listener connects
    cache.enable()
    cache.put(key, _item("x"), cache.token())
    cache.disable()  # the listener is lost
    assert cache.get(key) is None
    cache.enable()
    assert cache.get(key) is None
