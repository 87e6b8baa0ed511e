"""The application factory: wiring and lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from prerec import connections, cors, db, storage_check, tasks
from prerec.cache import CACHE, MetadataCache
from prerec.config import SETTINGS_KEY, Settings
from prerec.events import BROADCASTER, Broadcaster
from prerec.prerecordings import UPLOADS
from prerec.problems import Problem, problems_middleware
from prerec.ready import SHUTTING_DOWN
from prerec.routes import add_routes
from prerec.storage import STORAGE, open_storage, receive
from prerec.telemetry import METRICS, Metrics, telemetry_middleware
from prerec.uploads.engine import ENGINE, Engine

log = logging.getLogger(__name__)

DATABASE_URL = web.AppKey("database_url", str)


def create_app(settings: Settings, database_url: str) -> web.Application:
    app = web.Application(middlewares=[telemetry_middleware, problems_middleware, _refuse_when_shutting_down])
    app[SETTINGS_KEY] = settings
    app[DATABASE_URL] = database_url
    app[SHUTTING_DOWN] = asyncio.Event()
    app[UPLOADS] = set()
    app[STORAGE] = open_storage(settings)
    app[METRICS] = Metrics(app[STORAGE])
    app[CACHE] = MetadataCache()
    app[ENGINE] = Engine(app)
    # The database first: the storage sweeper asks it which blobs are orphans, and must stop
    # before the pool closes.
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_broadcaster)
    app.cleanup_ctx.append(_uploads)
    app.on_shutdown.append(_end_streams)
    add_routes(app)
    cors.install(app, settings.cors_origins)
    return app


@web.middleware
async def _refuse_when_shutting_down(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # After SIGTERM the listening socket is closed, but a keep-alive connection (from a load
    # balancer's pool, say) can still bring a new request: send it elsewhere.
    if request.app[SHUTTING_DOWN].is_set() and request.path != "/ping":
        raise Problem(
            503, "This replica is shutting down; retry on another.", {"Retry-After": "1", "Connection": "close"}
        )
    return await handler(request)


async def _storage(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    await app[STORAGE].start()
    sweeper = asyncio.create_task(_sweep_forever(app))
    yield
    await tasks.stop(sweeper, settings.db_timeout_seconds, "the storage sweeper")
    await receive.finish_cleanups(settings.db_timeout_seconds)
    await app[STORAGE].close()


async def _sweep_forever(app: web.Application) -> None:
    settings = app[SETTINGS_KEY]
    storage = app[STORAGE]
    suspects: set[str] = set()  # orphans seen in the last round (storage_check.sweep_orphans)
    while True:
        try:
            for name in await storage.sweep(settings.tmp_max_age_seconds):
                log.info("removed %s", name)
            retired = await storage_check.sweep_orphans(
                app[db.POOL], storage, settings.tmp_max_age_seconds, settings.db_timeout_seconds, suspects
            )
            for name in retired:
                log.warning("retired orphan blob %s (no row pointed at it)", name)
        except OSError as error:
            log.warning("could not sweep the storage folder: %s", error)
        except Problem as problem:  # the store is down or slow: the next round tries again
            log.warning("could not sweep the store: %s", problem.detail)
        except Exception:  # one failed round must not end the sweeping for good
            log.exception("the storage sweep failed")
        await asyncio.sleep(min(settings.tmp_max_age_seconds / 2, 600))


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    pool = await db.create_pool(app[DATABASE_URL], settings.db_timeout_seconds)
    app[db.POOL] = pool
    yield
    try:
        # Waits for every connection to be given back, then for the server to hang up on each;
        # a hung handler or a frozen server would hold the shutdown for ever.
        async with asyncio.timeout(settings.db_timeout_seconds):
            await pool.close()
    except Exception as error:
        log.warning(
            "could not close the database pool in %.1f s (%r); dropped its connections",
            settings.db_timeout_seconds,
            error,
        )
        pool.terminate()


async def _broadcaster(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    broadcaster = Broadcaster(
        app[DATABASE_URL],
        app[db.POOL],
        settings.db_timeout_seconds,
        settings.events_retention_seconds,
        app[CACHE],
        on_reconnect=app[METRICS].listener_reconnects.inc,
        upload_owner=app[ENGINE].owner,
        on_upload_notice=app[ENGINE].notice,
    )
    await broadcaster.start()
    app[BROADCASTER] = broadcaster
    yield
    await broadcaster.close()


async def _uploads(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    broadcaster = app[BROADCASTER]
    engine.listener_pid = lambda: broadcaster.listener_pid
    sweeper = asyncio.create_task(engine.sweep_forever())
    yield
    await tasks.stop(sweeper, app[SETTINGS_KEY].db_timeout_seconds, "the upload sweeper")


async def _end_streams(app: web.Application) -> None:
    # Open SSE responses would hold the runner's cleanup until its timeout; end them now so
    # their clients reconnect (to another replica) at once.
    app[BROADCASTER].end_streams("the server is shutting down")


async def serve(app: web.Application, settings: Settings, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Not web.run_app: once AppRunner.cleanup() starts, aiohttp stops reading request bodies,
    so an upload still arriving would stall and be cut. Instead: stop listening, end the event
    streams (their clients reconnect to another replica), let uploads in flight finish within
    PREREC_SHUTDOWN_TIMEOUT_SECONDS, and only then clean up.
    """
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    listener = await connections.listen(runner, settings, reuse_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("shutting down: no new connections, ending event streams, finishing uploads")
    app[SHUTTING_DOWN].set()
    listener.close()
    app[ENGINE].stop_writers()
    app[BROADCASTER].end_streams("the server is shutting down")
    deadline = loop.time() + settings.shutdown_timeout_seconds
    # Uploads that began on a keep-alive connection just before the flag was set may join
    # the set late, so look again until it stays empty.
    while app[UPLOADS] and loop.time() < deadline:
        await asyncio.wait(set(app[UPLOADS]), timeout=deadline - loop.time())
    if app[UPLOADS]:
        log.warning("%d uploads still arriving at the shutdown timeout are cut", len(app[UPLOADS]))
    await runner.cleanup()
    log.info("stopped")
