"""The application factory: wiring and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from prerec import blobs, db
from prerec.config import SETTINGS_KEY, Settings
from prerec.events import BROADCASTER, Broadcaster
from prerec.problems import problems_middleware
from prerec.routes import add_routes

log = logging.getLogger(__name__)

DATABASE_URL = web.AppKey("database_url", str)


def create_app(settings: Settings, database_url: str) -> web.Application:
    app = web.Application(middlewares=[problems_middleware])
    app[SETTINGS_KEY] = settings
    app[DATABASE_URL] = database_url
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_broadcaster)
    app.on_shutdown.append(_end_streams)
    add_routes(app)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    blobs.layout(settings.blob_dir)
    sweeper = asyncio.create_task(_sweep_tmp_forever(settings))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def _sweep_tmp_forever(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            removed = await loop.run_in_executor(
                None, blobs.sweep_tmp, settings.blob_dir, settings.tmp_max_age_seconds
            )
            for path in removed:
                log.info("removed stale temporary file %s", path.name)
        except OSError as error:
            log.warning("could not sweep temporary files: %s", error)
        await asyncio.sleep(min(settings.tmp_max_age_seconds / 2, 600))


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    pool = await db.create_pool(app[DATABASE_URL], settings.db_timeout_seconds)
    app[db.POOL] = pool
    yield
    await pool.close()


async def _broadcaster(app: web.Application) -> AsyncIterator[None]:
    broadcaster = Broadcaster(app[DATABASE_URL], app[db.POOL], app[SETTINGS_KEY].db_timeout_seconds)
    await broadcaster.start()
    app[BROADCASTER] = broadcaster
    yield
    await broadcaster.close()


async def _end_streams(app: web.Application) -> None:
    # Open SSE responses would hold the runner's cleanup until its timeout; end them now so
    # their clients reconnect (to another replica) at once.
    app[BROADCASTER].end_streams("the server is shutting down")
