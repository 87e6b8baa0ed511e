"""The one commit path: a stored blob becomes the prerecording, or is removed.

The `also` hook is what a finished resumable upload will pass to mark itself finished: it must
commit with the save or not at all. Real database, real files; the hook used is the upload
engine's own statement (db.finish_upload), fenced.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import datetime

import asyncpg
import pytest
from aiohttp import web

from prerec import db
from prerec.commit import commit_blob
from prerec.model import NewUpload, Upload
from prerec.storage import STORAGE, StoredBlob
from tests.conftest import EVENT, ogg

EVENT_ID = uuid.UUID(EVENT)
START = datetime(2026, 12, 1, 20, 0)
KEY = f"/prerecordings/{EVENT}/2026-12-01T20:00:00"
DAY = 86400.0


async def stored(app: web.Application, body: bytes) -> StoredBlob:
    """A blob written and finished the way an upload's body is, not yet recorded."""
    staged = await app[STORAGE].stage()
    await asyncio.wrap_future(staged.submit(memoryview(body), 0))
    name = await staged.finish()
    return StoredBlob(name, len(body), {"sha256": hashlib.sha256(body).digest()})


async def received_upload(conn: asyncpg.Connection) -> Upload:
    """An upload whose 1000 bytes all arrived, held by a replica that is finishing it."""
    created = await db.create_upload(conn, uuid.uuid4(), NewUpload(EVENT_ID, START, "audio/ogg", 1000, "tus"), DAY)
    held = await db.acquire_lease(conn, created.id, "replica", None)
    assert held is not None
    await db.advance(conn, held.id, held.generation, 0, 1000, DAY)
    return await db.begin_finishing(conn, held.id, held.generation)


def no_check(current: object) -> None:
    pass


async def test_the_hook_commits_with_the_save_inside_its_transaction(client, database_url) -> None:
    app = client.app
    blob = await stored(app, ogg(1000, b"a"))
    outside = await asyncpg.connect(database_url)
    try:
        upload = await received_upload(outside)
        events_before = await db.latest_event_id(outside)
        seen: list[tuple[bool, object, object, str]] = []

        async def finish(conn: asyncpg.Connection, saved: db.Saved) -> None:
            await db.finish_upload(conn, upload.id, upload.generation, {"status": 201}, DAY)
            # Another connection sees neither the new row nor the finished upload yet.
            seen.append(
                (
                    conn.is_in_transaction(),
                    await db.get_prerecording(outside, EVENT_ID, START),
                    (await db.get_upload(outside, upload.id)).state,
                    saved.prerecording.blob,
                )
            )

        saved = await commit_blob(app, EVENT_ID, START, "audio/ogg", blob, [], no_check, also=finish)

        assert seen == [(True, None, "finishing", blob.name)]
        assert saved.created and saved.prerecording.blob == blob.name
        assert (await db.get_upload(outside, upload.id)).state == "finished"
        assert await db.latest_event_id(outside) == events_before + 1
    finally:
        await outside.close()
    assert await (await client.get(KEY)).read() == ogg(1000, b"a")


async def test_a_failing_hook_rolls_the_save_back_and_removes_the_blob(client, database_url) -> None:
    """A cancel came first: the upload is no longer finishable, so nothing of it may show."""
    app = client.app
    blob = await stored(app, ogg(1000, b"a"))
    outside = await asyncpg.connect(database_url)
    try:
        upload = await received_upload(outside)
        assert await db.cancel_upload(outside, upload.id, DAY) is not None
        events_before = await db.latest_event_id(outside)

        async def finish(conn: asyncpg.Connection, saved: db.Saved) -> None:
            await db.finish_upload(conn, upload.id, upload.generation, {"status": 201}, DAY)

        with pytest.raises(db.Fenced):
            await commit_blob(app, EVENT_ID, START, "audio/ogg", blob, [], no_check, also=finish)

        assert await db.get_prerecording(outside, EVENT_ID, START) is None
        assert await db.latest_event_id(outside) == events_before
        assert (await db.get_upload(outside, upload.id)).state == "cancelled"
    finally:
        await outside.close()
    assert not app[STORAGE].exists(blob.name)
    assert (await client.get(KEY)).status == 404


async def test_a_failing_hook_keeps_the_version_it_would_have_replaced(client, settings) -> None:
    app = client.app
    assert (await client.put(KEY, data=ogg(1000, b"o"), headers={"Content-Type": "audio/ogg"})).status == 201
    blob = await stored(app, ogg(2000, b"n"))

    async def refuse(conn: asyncpg.Connection, saved: db.Saved) -> None:
        raise RuntimeError("the upload engine refused")

    with pytest.raises(RuntimeError):
        await commit_blob(app, EVENT_ID, START, "audio/ogg", blob, [], no_check, also=refuse)

    assert await (await client.get(KEY)).read() == ogg(1000, b"o")
    assert not app[STORAGE].exists(blob.name)
    assert list((settings.blob_dir / "trash").iterdir()) == []  # the old blob was not retired
