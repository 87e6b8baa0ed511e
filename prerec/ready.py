"""GET /ready: may this replica take traffic? (/ping only says the process is alive.)"""

from __future__ import annotations

import asyncio

from aiohttp import web

from prerec import db
from prerec.config import SETTINGS_KEY
from prerec.events import BROADCASTER
from prerec.problems import Problem
from prerec.storage import STORAGE

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
    storage_wrong = await request.app[STORAGE].ready()
    if storage_wrong is not None:
        wrong.append(storage_wrong)
    if not request.app[BROADCASTER].connected.is_set():
        wrong.append("the event listener is not connected")
    if wrong:
        raise Problem(503, "Not ready: " + "; ".join(wrong) + ".", {"Retry-After": "5"})
    return web.json_response({"status": "ready"})
