"""The broadcaster's lifecycle: its health check and its close, which shutdown waits on."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from prerec import db
from prerec.cache import MetadataCache
from prerec.events import Broadcaster

TIMEOUT = 0.5


class CancelledAsItAnswers(asyncpg.Connection):
    """A real connection that has `victim` cancelled the moment a query's answer is in: the
    instant at which Python 3.11's asyncio.wait_for swallows a cancellation."""

    victim: asyncio.Task[None] | None = None

    async def fetchval(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        value = await super().fetchval(*args, **kwargs)
        if self.victim is not None:
            asyncio.get_running_loop().call_soon(self.victim.cancel)
            self.victim = None
        return value


async def test_a_health_check_cancelled_as_its_answer_arrives_still_ends_the_watcher(database_url) -> None:
    conn = await asyncpg.connect(database_url, connection_class=CancelledAsItAnswers)
    try:

        async def watch() -> None:  # the shape of Broadcaster._watch
            while True:
                await db.ping(conn, 5)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        conn.victim = watcher
        done, _ = await asyncio.wait({watcher}, timeout=2)
        assert done and watcher.cancelled(), "the cancellation was swallowed: the watcher runs on"
    finally:
        watcher.cancel()
        await conn.close()


@pytest.fixture
async def broadcaster(database_url):  # type: ignore[no-untyped-def]
    pool = await db.create_pool(database_url, TIMEOUT)
    broadcaster = Broadcaster(database_url, pool, TIMEOUT, 3600, MetadataCache())
    await broadcaster.start()
    yield broadcaster
    await pool.close()


async def closed_within_its_bound(broadcaster: Broadcaster) -> bool:
    # Its bound: two waits for the tasks, one for the listener; plus slack for a busy machine.
    closing = asyncio.create_task(broadcaster.close())
    done, _ = await asyncio.wait({closing}, timeout=3 * TIMEOUT + 2)
    return bool(done)


async def test_close_stops_a_task_that_swallowed_its_cancellation(broadcaster, caplog) -> None:
    async def swallows_one_cancellation() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # what asyncio.wait_for does on Python 3.11 when the answer was already in
        await asyncio.sleep(3600)

    stubborn = asyncio.create_task(swallows_one_cancellation())
    broadcaster._tasks.append(stubborn)
    await asyncio.sleep(0)  # let it start
    try:
        assert await closed_within_its_bound(broadcaster)
    finally:
        stubborn.cancel()
    assert all(task.done() for task in broadcaster._tasks)
    assert broadcaster._listener is not None and broadcaster._listener.is_closed()
    assert "did not stop" not in caplog.text


async def test_close_gives_up_on_a_task_that_never_stops_and_says_which(broadcaster, caplog) -> None:
    release = asyncio.Event()

    async def never_stops() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    stubborn = asyncio.create_task(never_stops(), name="stubborn")
    broadcaster._tasks.append(stubborn)
    await asyncio.sleep(0)
    try:
        with caplog.at_level(logging.WARNING):
            assert await closed_within_its_bound(broadcaster)
        assert not stubborn.done()
        assert "the broadcaster's stubborn did not stop within 1.0 s" in caplog.text
        assert all(task.done() for task in broadcaster._tasks if task is not stubborn)
        assert broadcaster._listener is not None and broadcaster._listener.is_closed()
    finally:
        release.set()
        stubborn.cancel()
