"""The SQL layer's promises that HTTP cannot show directly: event ids commit in order."""

from __future__ import annotations

import asyncio

import asyncpg

from prerec import db
from tests.conftest import fresh_database, with_database


async def test_event_ids_become_visible_in_commit_order(database_url) -> None:
    """A second writer cannot take an id until the first has committed, so a reader that has
    seen id N can never later find a smaller id appear."""
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        tx1 = first.transaction()
        await tx1.start()
        first_id = await db._append_event(first, "prerecording-deleted", {"n": 1})

        tx2 = second.transaction()
        await tx2.start()
        pending = asyncio.ensure_future(db._append_event(second, "prerecording-deleted", {"n": 2}))
        await asyncio.sleep(0.3)
        assert not pending.done(), "a second writer took an event id while the first was uncommitted"

        await tx1.commit()
        second_id = await asyncio.wait_for(pending, 5)
        await tx2.commit()
        assert second_id > first_id
    finally:
        await first.close()
        await second.close()


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
