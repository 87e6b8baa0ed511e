"""Committing a received blob: the one way a stored body becomes the prerecording at its key.

A PUT's body comes this way, and so will a finished resumable upload's. The blob is already
durable under a fresh name (prerec.storage); here its digests are checked, one transaction
points the key at it, and the blob it replaced is retired. Whatever fails before the commit
removes the new blob, so a refused or failed upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

from aiohttp import web

from prerec import db, digests
from prerec.cache import CACHE
from prerec.config import SETTINGS_KEY
from prerec.model import format_start
from prerec.problems import CommitUncertain
from prerec.storage import STORAGE, StoredBlob

log = logging.getLogger(__name__)


async def commit_blob(
    app: web.Application,
    event: uuid.UUID,
    start: datetime,
    type_: str,
    blob: StoredBlob,
    claims: list[digests.Claim],
    check: db.Check,
    also: db.Also | None = None,
    keep: bool = False,
) -> db.Saved:
    """Record `blob` as the prerecording at (event, start), or remove it.

    `check` decides preconditions against the row stored now, under the key's lock; `also`
    writes what must commit with the save or not at all (see db.Also). `keep`: the caller
    decides what happens to a blob that was not recorded (a resumable upload's finish: the
    blob is named after the upload, and a finisher that took over may be recording it).
    """
    settings = app[SETTINGS_KEY]
    storage = app[STORAGE]
    try:
        digests.verify(claims, blob.digests)
        async with db.connection(app[db.POOL], settings.db_timeout_seconds) as conn:
            saved = await db.save_prerecording(
                conn, event, start, type_, blob.size, blob.sha256, blob.name, check=check, also=also
            )
    except (CommitUncertain, asyncio.CancelledError):
        # The commit may have happened before the connection broke (or before we were
        # cancelled at shutdown): keep the blob rather than risk a row pointing at nothing. If
        # no row points at it, the running sweeper retires it once it is past the grace period.
        log.warning(
            "blob %s may or may not be recorded; kept, and retired by the sweeper once it is old if no row "
            "points at it",
            blob.name,
        )
        raise
    except BaseException:
        if not keep:
            await asyncio.shield(storage.remove(blob.name))
        raise
    # This replica's own cache is told at once, not when the event comes back: a client that
    # reads right after its write must see it, and a retired blob stays readable in a bucket.
    app[CACHE].evict((str(event), format_start(start)))
    if saved.replaced_blob is not None:
        await storage.retire(saved.replaced_blob)
    return saved
