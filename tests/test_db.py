"""The SQL layer's promises that HTTP cannot show directly: event ids commit in order."""

from __future__ import annotations

import asyncio

import asyncpg

from prerec import db
from tests.conftest import fresh_database, wait_for, with_database


async def waiting_for_advisory_lock(conn: asyncpg.Connection, pid: int) -> bool:
    wait = await conn.fetchrow("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = $1", pid)
    return tuple(wait) == ("Lock", "advisory")


async def ids_a_reader_skips(database_url: str, ordered: bool) -> list[int]:
    """Two writers, the one holding the smaller id committing last, and a reader that reads the
    log in between (as the broadcaster does on every NOTIFY); the ids it never sees."""
    first, second, reader = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        tx1 = first.transaction()
        await tx1.start()
        first_id = await db._append_event(first, "prerecording-deleted", {"n": 1}, ordered=ordered)

        async def append_and_commit() -> int:
            async with second.transaction():
                return await db._append_event(second, "prerecording-deleted", {"n": 2}, ordered=ordered)

        pending = asyncio.ensure_future(append_and_commit())
        # The second writer either commits at once or waits for the first one's event lock.
        await wait_for(lambda: pending.done() or waiting_for_advisory_lock(reader, second.get_server_pid()))
        assert pending.done() is not ordered, "the event lock did not hold the second writer back"

        seen = [event.id for event in await db.events_after(reader, 0)]
        await tx1.commit()
        second_id = await asyncio.wait_for(pending, 5)
        assert first_id < second_id
        seen += [event.id for event in await db.events_after(reader, seen[-1] if seen else 0)]
        return sorted({first_id, second_id} - set(seen))
    finally:
        for conn in (first, second, reader):
            await conn.close()


async def test_event_ids_become_visible_in_commit_order(database_url) -> None:
    """A second writer cannot take an id until the first has committed, so a reader that has
    seen id N can never later find a smaller id appear."""
    assert await ids_a_reader_skips(database_url, ordered=True) == []


async def test_without_the_event_lock_a_reader_skips_an_event(database_url) -> None:
    """The negative control: the same writers without the lock, and the reader misses one."""
    assert len(await ids_a_reader_skips(database_url, ordered=False)) == 1


async def test_concurrent_writers_never_let_a_reader_skip_an_event(database_url) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=8, max_size=8)
    seen: list[int] = []
    done = asyncio.Event()

    async def reader() -> None:
        last = 0
        async with pool.acquire() as conn:
            while not done.is_set() or last < await db.latest_event_id(conn):
                for event in await db.events_after(conn, last, 1000):
                    seen.append(event.id)
                    last = event.id

    async def writer(n: int) -> None:
        async with pool.acquire() as conn:
            for i in range(40):
                async with conn.transaction():
                    await db._append_event(conn, "prerecording-deleted", {"writer": n, "i": i})

    try:
        reading = asyncio.ensure_future(reader())
        await asyncio.gather(*(writer(n) for n in range(6)))
        done.set()
        await reading
        async with pool.acquire() as conn:
            stored = [row["id"] for row in await conn.fetch("SELECT id FROM events ORDER BY id")]
        assert seen == stored
    finally:
        await pool.close()


async def test_prune_keeps_recent_events(database_url) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await db._append_event(conn, "prerecording-deleted", {"old": True})
        await conn.execute("UPDATE events SET created_at = now() - interval '2 days'")
        async with conn.transaction():
            recent = await db._append_event(conn, "prerecording-deleted", {"old": False})
        assert await db.prune_events(conn, 86400, 1000) == 1
        assert [event.id for event in await db.events_after(conn, 0)] == [recent]
    finally:
        await conn.close()


async def test_a_test_database_is_dropped_afterwards_even_with_a_connection_left_open(template_url) -> None:
    async with fresh_database(template_url) as url:
        leftover = await asyncpg.connect(url)  # as a replica killed in the middle of a test leaves one
        name = await leftover.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(with_database(template_url, "postgres"))
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await admin.close()
        leftover.terminate()
