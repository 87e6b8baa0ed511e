"""GET /ready: may this replica take traffic? (/ping only says the process is alive.)"""

from __future__ import annotations

import asyncio
import os
import tempfile

from aiohttp import web

from prerec import blobs, db
from prerec.config import SETTINGS_KEY
from prerec.events import BROADCASTER
from prerec.problems import Problem


def _probe_storage(tmp: str) -> None:
    # A real write: os.access() says yes to root whatever the mount allows.
    with tempfile.NamedTemporaryFile(dir=tmp, prefix="ready-", suffix=".probe") as probe:
        probe.write(b"ok")
        probe.flush()
        os.fsync(probe.fileno())


# Set when SIGTERM arrives (app.serve): from then on the replica is not ready.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)


async def ready(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if request.app[SHUTTING_DOWN].is_set():
        raise Problem(503, "Not ready: the replica is shutting down.", {"Retry-After": "1"})
    wrong = []
    try:
        async with db.connection(request.app[db.POOL], settings.db_timeout_seconds) as conn:
            await db.ping(conn, settings.db_timeout_seconds)
    except Problem:
        wrong.append("the database does not answer")
    try:
        await asyncio.get_running_loop().run_in_executor(blobs.DISK, _probe_storage, str(settings.blob_dir / "tmp"))
    except OSError as error:
        wrong.append(f"the storage folder is not writable ({error.strerror})")
    if not request.app[BROADCASTER].connected.is_set():
        wrong.append("the event listener is not connected")
    if wrong:
        raise Problem(503, "Not ready: " + "; ".join(wrong) + ".", {"Retry-After": "5"})
    return web.json_response({"status": "ready"})
