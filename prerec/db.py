"""Every SQL statement of the service, on an asyncpg pool.

Writes follow one pattern (see save and delete): take the key's advisory lock, read the row
as it is, change it, append an event and NOTIFY, commit. The key lock makes concurrent writes
to one prerecording queue up, so each transaction knows exactly which blob it replaced. The
event lock, taken last and held until commit, makes event ids commit in increasing order: a
subscriber resuming after id N can never miss a later commit with a smaller id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from prerec.model import Event, Prerecording, key_json
from prerec.problems import CommitUncertain, DatabaseUnavailable

POOL = web.AppKey("pool", asyncpg.Pool)

NOTIFY_CHANNEL = "prerec_events"

# Advisory lock keys. The two-int form lives in a key space apart from the bigint form used
# for per-prerecording locks, so these cannot collide with a key's hash.
LOCK_SPACE = 0x70726563  # "prec"
EVENT_LOCK = (LOCK_SPACE, 1)
MIGRATION_LOCK = (LOCK_SPACE << 16) | 2

# What "the database is not reachable right now" looks like, as opposed to a bad query. Only
# connection errors count: a storage OSError inside a transaction block must not read as an
# outage.
DATABASE_DOWN = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    ConnectionError,
    TimeoutError,
)


def sqlalchemy_url(url: str) -> str:
    """The same database as a SQLAlchemy URL on the asyncpg driver (for alembic)."""
    scheme, rest = url.split("://", 1)
    if scheme not in ("postgres", "postgresql"):
        return url
    return f"postgresql+asyncpg://{rest}"


async def create_pool(url: str, timeout: float) -> asyncpg.Pool:
    # min_size=0: the pool connects on demand, so it starts and keeps working across a
    # database restart; broken connections are dropped and replaced on next acquire.
    return await asyncpg.create_pool(
        url, min_size=0, max_size=10, command_timeout=timeout, timeout=timeout, reset=_end_transaction
    )


async def _end_transaction(conn: asyncpg.Connection) -> None:
    """Reset a connection coming back to the pool.

    asyncpg's default reset (RESET ALL, UNLISTEN *, advisory unlock...) costs a round trip on
    every release, and these sessions never change state: no SET, no LISTEN (that is the
    broadcaster's own connection), only transaction-scoped advisory locks."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; an unreachable or hung database becomes a 503 within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            conn = await pool.acquire()
    except (*DATABASE_DOWN, OSError) as error:  # OSError: connection refused, socket gone
        raise DatabaseUnavailable() from error
    try:
        yield conn
    except DATABASE_DOWN as error:
        # A connection that failed like this gets no graceful goodbye (that would wait on the
        # same dead server); and after a restart every idle pooled connection is dead too, so
        # have the pool replace them all rather than fail one request per stale connection.
        conn.terminate()
        await pool.expire_connections()
        raise DatabaseUnavailable() from error
    finally:
        try:
            await pool.release(conn, timeout=timeout)
        except (*DATABASE_DOWN, OSError):
            conn.terminate()
            await pool.release(conn)


_COLUMN_NAMES = ("event", "start", "type", "size", "sha256", "modified", "blob")
_COLUMNS = ", ".join(_COLUMN_NAMES)


def _prerecording(row: asyncpg.Record) -> Prerecording:
    return Prerecording(**dict(row))


async def list_prerecordings(
    conn: asyncpg.Connection,
    event: uuid.UUID,
    after: datetime | None,
    before: datetime | None,
    limit: int | None,
    offset: int,
    descending: bool,
) -> tuple[int, list[Prerecording]]:
    # Only the bounds given become conditions: "$2 IS NULL OR start >= $2" would leave the
    # planner's generic plan (asyncpg prepares statements) unable to bound the index scan.
    conditions = ["event = $1"]
    args: list[Any] = [event]
    for bound, op in ((after, ">="), (before, "<")):
        if bound is not None:
            args.append(bound)
            conditions.append(f"start {op} ${len(args)}")
    where = " AND ".join(conditions)
    order = "DESC" if descending else "ASC"
    page = f"${len(args) + 1}"
    skip = f"${len(args) + 2}"
    # One statement, so the count and the page come from one snapshot, in one round trip; the
    # count is an index-only scan of the primary key. With no row on the page (offset past the
    # end, limit 0) the join still yields the count, with NULL columns.
    rows = await conn.fetch(
        f"""
        SELECT matches.total, page.*
        FROM (SELECT count(*) AS total FROM prerecordings WHERE {where}) AS matches
        LEFT JOIN LATERAL (
            SELECT {_COLUMNS} FROM prerecordings WHERE {where} ORDER BY start {order} LIMIT {page} OFFSET {skip}
        ) AS page ON true
        ORDER BY page.start {order}
        """,
        *args,
        limit,
        offset,
    )
    total = rows[0]["total"] if rows else 0
    items = [
        Prerecording(**{column: row[column] for column in _COLUMN_NAMES}) for row in rows if row["blob"] is not None
    ]
    return total, items


async def get_prerecording(conn: asyncpg.Connection, event: uuid.UUID, start: datetime) -> Prerecording | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM prerecordings WHERE event = $1 AND start = $2", event, start)
    return None if row is None else _prerecording(row)


async def _lock_key(conn: asyncpg.Connection, event: uuid.UUID, start: datetime) -> None:
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text || ' ' || $2::timestamp::text, 0))", event, start
    )


async def _append_event(conn: asyncpg.Connection, type_: str, data: dict[str, Any], *, ordered: bool = True) -> int:
    # One statement: take the event lock, insert, NOTIFY. The lock is then held only for this
    # round trip and the commit that follows it. The payload is the id alone: always far below
    # NOTIFY's 8000-byte limit, and the listener reads the event itself from the log.
    # ordered=False leaves the lock out (its parameters stay, unused). Only tests pass it: it is
    # the negative control that shows a reader skipping an event once ids may commit out of order.
    lock = "pg_advisory_xact_lock($1::int, $2::int)" if ordered else "$1::int, $2::int"
    event_id: int = await conn.fetchval(
        f"""
        WITH locked AS (SELECT {lock}),
             added AS (INSERT INTO events (type, data) SELECT $3, $4::jsonb FROM locked RETURNING id)
        SELECT id FROM added, pg_notify($5, id::text)
        """,
        *EVENT_LOCK,
        type_,
        json.dumps(data),
        NOTIFY_CHANNEL,
    )
    return event_id


@dataclass(frozen=True)
class Saved:
    prerecording: Prerecording
    created: bool
    replaced_blob: str | None


# Called inside a write's transaction, after the key's lock, with what is stored now: the
# place to decide preconditions (If-Match ...) so that racing writers cannot both pass them.
Check = Callable[[Prerecording | None], None]


def _no_check(current: Prerecording | None) -> None:
    pass


async def save_prerecording(
    conn: asyncpg.Connection,
    event: uuid.UUID,
    start: datetime,
    type_: str,
    size: int,
    sha256: bytes,
    blob: str,
    check: Check = _no_check,
) -> Saved:
    """Point the key at a new blob; return what it replaced so the caller can retire it.

    Raises CommitUncertain when the connection broke during COMMIT (the caller must then
    keep the new blob); any other failure means nothing was written."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await _lock_key(conn, event, start)
        current = await get_prerecording(conn, event, start)
        check(current)
        row = await conn.fetchrow(
            f"""
            INSERT INTO prerecordings (event, start, type, size, sha256, blob, modified)
            VALUES ($1, $2, $3, $4, $5, $6, now())
            ON CONFLICT (event, start) DO UPDATE
               SET type = excluded.type, size = excluded.size, sha256 = excluded.sha256,
                   blob = excluded.blob, modified = excluded.modified
            RETURNING {_COLUMNS}
            """,
            event,
            start,
            type_,
            size,
            sha256,
            blob,
        )
        saved = _prerecording(row)
        kind = "prerecording-created" if current is None else "prerecording-updated"
        await _append_event(conn, kind, {"prerecording": saved.to_json()})
    except BaseException:
        with contextlib.suppress(*DATABASE_DOWN):
            await transaction.rollback()
        raise
    try:
        await transaction.commit()
    except DATABASE_DOWN as error:
        raise CommitUncertain() from error
    return Saved(saved, current is None, None if current is None else current.blob)


async def delete_prerecording(
    conn: asyncpg.Connection, event: uuid.UUID, start: datetime, check: Check = _no_check
) -> Prerecording | None:
    async with conn.transaction():
        await _lock_key(conn, event, start)
        current = await get_prerecording(conn, event, start)
        if current is None:
            return None
        check(current)
        row = await conn.fetchrow(
            f"DELETE FROM prerecordings WHERE event = $1 AND start = $2 RETURNING {_COLUMNS}", event, start
        )
        if row is None:
            return None
        await _append_event(conn, "prerecording-deleted", {"prerecording": key_json(event, start)})
    return _prerecording(row)


async def ping(conn: asyncpg.Connection, timeout: float) -> None:
    # Not asyncpg's own timeout, which then waits on a cancel request that a hung server never
    # answers. Not asyncio.wait_for either: on Python 3.11 it swallows a cancellation that
    # arrives just as the answer does, and the broadcaster's watcher would never stop.
    async with asyncio.timeout(timeout):
        await conn.fetchval("SELECT 1")


async def all_prerecordings(conn: asyncpg.Connection) -> list[Prerecording]:
    return [_prerecording(row) for row in await conn.fetch(f"SELECT {_COLUMNS} FROM prerecordings")]


async def events_after(conn: asyncpg.Connection, after_id: int, limit: int = 500) -> list[Event]:
    rows = await conn.fetch(
        "SELECT id, type, data::text AS data, created_at FROM events WHERE id > $1 ORDER BY id LIMIT $2",
        after_id,
        limit,
    )
    return [Event(row["id"], row["type"], json.loads(row["data"]), row["created_at"]) for row in rows]


async def latest_event_id(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")


async def prune_events(conn: asyncpg.Connection, older_than_seconds: float, batch: int) -> int:
    status = await conn.execute(
        """
        DELETE FROM events WHERE id IN (
            SELECT id FROM events WHERE created_at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2
        )
        """,
        older_than_seconds,
        batch,
    )
    return int(status.split()[-1])
