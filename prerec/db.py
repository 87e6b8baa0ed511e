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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from prerec.model import Event, NewUpload, Piece, Prerecording, Tail, Upload, key_json
from prerec.problems import CommitUncertain, DatabaseUnavailable

POOL = web.AppKey("pool", asyncpg.Pool)

NOTIFY_CHANNEL = "prerec_events"
# Requests to an upload's lease holder ("release <id> <generation>", "cancel ..."): see
# request_release. Apart from NOTIFY_CHANNEL, whose payloads are event ids.
UPLOADS_CHANNEL = "prerec_uploads"

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

# Called inside a save's transaction, after its row is written and before its event, with what
# the save will return: the place for a write that must commit with the save or not at all (a
# resumable upload marked finished). Raising rolls the whole save back.
Also = Callable[[asyncpg.Connection, Saved], Awaitable[None]]


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
    also: Also | None = None,
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
        outcome = Saved(_prerecording(row), current is None, None if current is None else current.blob)
        if also is not None:
            # Before the event: its lock is meant to be held for one round trip and the commit.
            await also(conn, outcome)
        kind = "prerecording-created" if current is None else "prerecording-updated"
        await _append_event(conn, kind, {"prerecording": outcome.prerecording.to_json()})
    except BaseException:
        with contextlib.suppress(*DATABASE_DOWN):
            await transaction.rollback()
        raise
    try:
        await transaction.commit()
    except DATABASE_DOWN as error:
        raise CommitUncertain() from error
    return outcome


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


async def referenced_blobs(conn: asyncpg.Connection) -> set[str]:
    """The blob every row points at, and the blob-to-be of every unfinished upload (the part
    of its store_ref before `?uploadId=`): a finisher killed between assembling and
    committing leaves it for the next one. All the orphan sweep and gc need."""
    rows = await conn.fetch(
        """
        SELECT blob FROM prerecordings
        UNION ALL
        SELECT split_part(store_ref, '?uploadId=', 1) FROM uploads
         WHERE state IN ('receiving', 'finishing') AND store_ref IS NOT NULL
        """
    )
    return {row["blob"] for row in rows}


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


# ---------------------------------------------------------------------------------------------
# Resumable uploads
#
# One writer at a time moves an upload's offset, on any replica, with no sticky session. The
# writer holds a lease: an owner, an expiry and a generation. Every write to the row names the
# generation it holds (and the offset and state it expects); a writer that lost its lease, even
# one that woke up late from a freeze, changes zero rows and gets Fenced. That fence, not the
# lease's expiry, is what keeps two writers apart, so times need only be coarse; and every time
# is the database's now(), the one clock all replicas share. Each statement is one round trip:
# condition and change in one UPDATE leave no gap for another writer between them.
# ---------------------------------------------------------------------------------------------

# How long a lease lives without renewal. The holder renews it with every progress commit and,
# when idle, every few seconds; a holder that dies is noticed sooner through lease_pid.
LEASE_SECONDS = 10.0

# The row's columns are the dataclass's fields, in its order: one list, so they cannot disagree.
_UPLOAD_COLUMN_NAMES = tuple(field.name for field in fields(Upload))
_JSON_COLUMNS = ("digests", "metadata", "result")
# jsonb as text, decoded here: the pool sets no jsonb codec (events are read the same way).
_UPLOAD_COLUMNS = ", ".join(
    f"{name}::text AS {name}" if name in _JSON_COLUMNS else name for name in _UPLOAD_COLUMN_NAMES
)
_ENDED = "('finished', 'failed', 'cancelled', 'expired')"


class Fenced(Exception):
    """The row no longer is what the writer holds: another writer took the lease, the offset
    moved, or the upload ended. The writer must stop and never retry; its transaction is void."""


def _upload(row: asyncpg.Record | dict[str, Any]) -> Upload:
    values = dict(row)
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Upload(**values)


def _fenced(row: asyncpg.Record | None, upload_id: uuid.UUID, generation: int) -> Upload:
    if row is None:
        raise Fenced(f"upload {upload_id}: generation {generation} no longer holds it as expected")
    return _upload(row)


async def create_upload(
    conn: asyncpg.Connection, upload_id: uuid.UUID, new: NewUpload, expiry_seconds: float, store_ref: str | None = None
) -> Upload:
    row = await conn.fetchrow(
        f"""
        INSERT INTO uploads (id, event, start, type, length, protocol, if_match, if_none_match,
                             digests, metadata, store_ref, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, now() + make_interval(secs => $12))
        RETURNING {_UPLOAD_COLUMNS}
        """,
        upload_id,
        new.event,
        new.start,
        new.type,
        new.length,
        new.protocol,
        new.if_match,
        new.if_none_match,
        json.dumps(new.digests),
        json.dumps(new.metadata),
        store_ref,
        expiry_seconds,
    )
    return _upload(row)


async def get_upload(conn: asyncpg.Connection, upload_id: uuid.UUID) -> Upload | None:
    row = await conn.fetchrow(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = $1", upload_id)
    return None if row is None else _upload(row)


async def acquire_lease(
    conn: asyncpg.Connection,
    upload_id: uuid.UUID,
    owner: str,
    pid: int | None,
    *,
    force: bool = False,
    progress: bool = False,
    lease_seconds: float = LEASE_SECONDS,
) -> Upload | None:
    """Take the upload's lease under a new generation; None while someone else holds it (or
    the upload is not there to take: ended, expired, unknown).

    The lease is free when nobody holds it, when it expired, or when the holder's database
    backend (`pid`, the holder's long-lived connection) is gone from pg_stat_activity: a
    holder killed with -9 loses its connection as the kernel closes the socket, so its lease
    is taken at once. `force` takes a live lease (after asking the holder to let go, in vain).
    A `finishing` row is never forced, only taken from a dead or expired holder, and goes back
    to `receiving` for its taker to finish. Past expires_at nothing is taken: the sweeper's.

    The segment generation says where the filesystem writes: the holder's segment file is
    continued only after a clean release (its writes joined and synced); any other takeover
    starts a segment of its own, so a zombie's late writes can never land in the new one.

    `progress`: an upload-progress event tells watchers the upload moves again (a resume),
    within the cadence (see _progress_event), in this same statement.

    pg_stat_activity is read once per transaction: call this outside a long transaction."""
    row = await _take(conn, upload_id, owner, pid, force, progress, lease_seconds, with_pieces=False)
    return None if row is None else _upload(row)


async def take_for_append(
    conn: asyncpg.Connection, upload_id: uuid.UUID, owner: str, pid: int | None, *, untouched: bool = True
) -> Taken | None:
    """acquire_lease (not forced, with progress) for an append, with the upload's pieces and
    tail, all in one statement (a round trip less on every PATCH); None when the lease is not
    free, or when the row changed between the statement's snapshot and its row lock (the
    caller then takes the lease the usual way and reads the pieces afterwards).

    That second None is what makes the pieces sound: they are read in the statement's
    snapshot, but the row it changes is the newest one (READ COMMITTED re-reads a row that
    changed under it). A writer that took, wrote its first piece and let go in between would
    leave a row that continues its segment while the snapshot has no piece of it: the segment
    would be opened at the offset instead of its start, and written over.
    untouched=False leaves that condition out; only tests pass it, as the negative control."""
    row = await _take(conn, upload_id, owner, pid, False, True, LEASE_SECONDS, with_pieces=True, untouched=untouched)
    if row is None:
        return None
    values = dict(row)
    pieces = [Piece(*piece) for piece in values.pop("pieces")]
    tail_start, tail_data = values.pop("tail_start"), values.pop("tail_data")
    return Taken(_upload(values), pieces, None if tail_start is None else Tail(tail_start, tail_data))


@dataclass(frozen=True)
class Taken:
    """A lease just taken for an append, with the upload's pieces and tail as it found them."""

    upload: Upload
    pieces: list[Piece]
    tail: Tail | None


async def _take(
    conn: asyncpg.Connection,
    upload_id: uuid.UUID,
    owner: str,
    pid: int | None,
    force: bool,
    progress: bool,
    lease_seconds: float,
    *,
    with_pieces: bool,
    untouched: bool = True,
) -> asyncpg.Record | None:
    fresh = "AND xmin = (SELECT xmin FROM uploads WHERE id = $1)" if with_pieces and untouched else ""
    pieces = tail = ""
    if with_pieces:
        pieces = """
        , ARRAY(SELECT (p.start, p.size, p.generation, p.number, p.etag) FROM upload_pieces p
                 WHERE p.upload_id = taken.id ORDER BY p.start) AS pieces,
          t.start AS tail_start, t.data AS tail_data"""
        tail = "LEFT JOIN upload_tails t ON t.upload_id = taken.id"
    # One UPDATE: when two replicas race, the second waits on the row lock, then re-evaluates
    # the condition on the winner's row, finds a live lease and changes nothing.
    return await conn.fetchrow(
        f"""
        WITH taken AS (
        UPDATE uploads
           SET generation = generation + 1, state = 'receiving',
               lease_owner = $2, lease_pid = $3, lease_expires = now() + make_interval(secs => $5),
               segment_generation = CASE WHEN released_clean THEN segment_generation ELSE generation + 1 END,
               released_clean = false
         WHERE id = $1 AND expires_at > now() {fresh}
           AND (state = 'receiving' AND $4
                OR state IN ('receiving', 'finishing')
                   AND (lease_owner IS NULL OR lease_expires < now()
                        OR lease_pid IS NOT NULL
                           AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = uploads.lease_pid)))
        RETURNING {_UPLOAD_COLUMNS}
        ), {_progress_event(f"SELECT {_event_json('taken')} AS data FROM taken WHERE $6::boolean", 7)}
        SELECT taken.*{pieces} FROM taken {tail}
        """,
        upload_id,
        owner,
        pid,
        force,
        lease_seconds,
        progress,
        *_progress_arguments(),
    )


async def renew_lease(
    conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int, lease_seconds: float = LEASE_SECONDS
) -> None:
    """Keep an idle holder's lease alive, or a finisher's through a long assembly; Fenced once
    it is no longer the holder's."""
    status = await conn.execute(
        """
        UPDATE uploads SET lease_expires = now() + make_interval(secs => $3)
         WHERE id = $1 AND generation = $2 AND state IN ('receiving', 'finishing') AND lease_owner IS NOT NULL
        """,
        upload_id,
        generation,
        lease_seconds,
    )
    if status != "UPDATE 1":
        raise Fenced(f"upload {upload_id}: generation {generation} no longer holds it")


async def restamp_leases(conn: asyncpg.Connection, owner: str, pid: int) -> int:
    """After the owner's long-lived connection was replaced: point its leases at the new
    backend, or every other replica would take them as a dead holder's. A lease taken in the
    gap is simply lost (the holder gets Fenced): the generation is not touched."""
    status = await conn.execute("UPDATE uploads SET lease_pid = $2 WHERE lease_owner = $1", owner, pid)
    return int(status.split()[-1])


async def release_lease(conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int, clean: bool) -> bool:
    """Let go of the lease; False when it was no longer this generation's (nothing to do).

    `clean`: every write of this generation is joined and durable, so the next holder may go on
    writing the same segment. The state is not checked: releasing a cancelled upload's lease
    is how its canceller learns that no write is still in flight."""
    status = await conn.execute(
        """
        UPDATE uploads SET lease_owner = NULL, lease_pid = NULL, lease_expires = NULL, released_clean = $3
         WHERE id = $1 AND generation = $2 AND lease_owner IS NOT NULL
        """,
        upload_id,
        generation,
        clean,
    )
    return status == "UPDATE 1"


async def advance(
    conn: asyncpg.Connection,
    upload_id: uuid.UUID,
    generation: int,
    from_offset: int,
    to_offset: int,
    expiry_seconds: float,
    *,
    pieces: Sequence[Piece] = (),
    tail: Tail | None = None,
    lease_seconds: float = LEASE_SECONDS,
    progress: bool = False,
    release: bool = False,
    fenced: bool = True,
) -> Upload:
    """Record that bytes up to `to_offset` are durable, with the pieces that hold them (new or
    grown) and the tail as it now is (None: no tail); renew the lease and push expiry back.

    `progress`: log an upload-progress event within the cadence (see _progress_event).
    `release`: let go of the lease too, cleanly (every write of this generation is joined and
    synced: the next holder may continue its segment), as release_lease would: a PATCH that
    ends short of the length records and lets go in one statement.

    Fenced unless this generation holds the upload, the offset is still `from_offset` and the
    upload is receiving: a zombie can never move the offset, nor record a piece or a tail.
    fenced=False leaves the generation out of the condition (its parameter stays, unused). Only
    tests pass it: it is the negative control that shows a zombie moving the offset without it.
    """
    if to_offset < from_offset:
        raise ValueError(f"an offset never goes backwards: {from_offset} -> {to_offset}")
    if tail is not None and tail.start + len(tail.data) != to_offset:
        raise ValueError(f"the tail ends at {tail.start + len(tail.data)}, not at the offset {to_offset}")
    generation_holds = "generation = $2" if fenced else "$2::bigint IS NOT NULL"
    # One statement: the pieces and the tail are written only if the fenced UPDATE changed the
    # row (they select from it), so they can never disagree with the offset.
    row = await conn.fetchrow(
        f"""
        WITH moved AS (
            UPDATE uploads
               SET durable = $4,
                   progressed_at = CASE WHEN $4 > durable THEN now() ELSE progressed_at END,
                   expires_at = CASE WHEN $4 > durable THEN now() + make_interval(secs => $5) ELSE expires_at END,
                   lease_expires = CASE WHEN $15::boolean THEN NULL ELSE now() + make_interval(secs => $6) END,
                   lease_owner = CASE WHEN $15 THEN NULL ELSE lease_owner END,
                   lease_pid = CASE WHEN $15 THEN NULL ELSE lease_pid END,
                   released_clean = $15 OR released_clean
             WHERE id = $1 AND {generation_holds} AND durable = $3 AND state = 'receiving'
            RETURNING {_UPLOAD_COLUMNS}
        ), recorded AS (
            INSERT INTO upload_pieces (upload_id, start, size, generation, number, etag)
            SELECT moved.id, piece.start, piece.size, piece.generation, piece.number, piece.etag
              FROM moved, unnest($7::bigint[], $8::bigint[], $9::bigint[], $10::int[], $11::text[])
                          AS piece (start, size, generation, number, etag)
            ON CONFLICT (upload_id, start) DO UPDATE
               SET size = excluded.size, generation = excluded.generation,
                   number = excluded.number, etag = excluded.etag
        ), dropped_tail AS (
            DELETE FROM upload_tails USING moved WHERE upload_id = moved.id AND $12::bigint IS NULL
        ), kept_tail AS (
            INSERT INTO upload_tails (upload_id, start, data)
            SELECT moved.id, $12, $13::bytea FROM moved WHERE $12::bigint IS NOT NULL
            ON CONFLICT (upload_id) DO UPDATE SET start = excluded.start, data = excluded.data
        ), {_progress_event(f"SELECT {_event_json('moved')} AS data FROM moved WHERE $14::boolean", 16)}
        SELECT * FROM moved
        """,
        upload_id,
        generation,
        from_offset,
        to_offset,
        expiry_seconds,
        lease_seconds,
        [piece.start for piece in pieces],
        [piece.size for piece in pieces],
        [piece.generation for piece in pieces],
        [piece.number for piece in pieces],
        [piece.etag for piece in pieces],
        None if tail is None else tail.start,
        None if tail is None else tail.data,
        progress,
        release,
        *_progress_arguments(),
    )
    return _fenced(row, upload_id, generation)


async def upload_pieces(conn: asyncpg.Connection, upload_id: uuid.UUID) -> list[Piece]:
    rows = await conn.fetch(
        "SELECT start, size, generation, number, etag FROM upload_pieces WHERE upload_id = $1 ORDER BY start",
        upload_id,
    )
    return [Piece(**dict(row)) for row in rows]


async def upload_tail(conn: asyncpg.Connection, upload_id: uuid.UUID) -> Tail | None:
    row = await conn.fetchrow("SELECT start, data FROM upload_tails WHERE upload_id = $1", upload_id)
    return None if row is None else Tail(row["start"], row["data"])


async def allocate_parts(conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int, count: int) -> int:
    """S3: the first of `count` part numbers that are this generation's alone (fenced), so two
    generations can never upload under one number and overwrite each other's part."""
    number: int | None = await conn.fetchval(
        """
        UPDATE uploads SET next_part = next_part + $3
         WHERE id = $1 AND generation = $2 AND state = 'receiving'
        RETURNING next_part - $3
        """,
        upload_id,
        generation,
        count,
    )
    if number is None:
        raise Fenced(f"upload {upload_id}: generation {generation} no longer holds it")
    return number


async def begin_finishing(conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int) -> Upload:
    """Mark a complete upload as being assembled and committed (fenced). A finishing upload is
    never taken by force; only from a holder that died (see acquire_lease)."""
    row = await conn.fetchrow(
        f"""
        UPDATE uploads SET state = 'finishing'
         WHERE id = $1 AND generation = $2 AND state = 'receiving'
        RETURNING {_UPLOAD_COLUMNS}
        """,
        upload_id,
        generation,
    )
    return _fenced(row, upload_id, generation)


async def _end(
    conn: asyncpg.Connection,
    upload_id: uuid.UUID,
    generation: int,
    state: str,
    result: dict[str, Any],
    keep_seconds: float,
) -> Upload:
    # The lease goes with the upload's end; expires_at now says how long the row is kept to
    # replay `result` to a client that lost the last answer. Its pieces and tail go at once:
    # the bytes they name are the prerecording's now, or discarded.
    row = await conn.fetchrow(
        f"""
        WITH ended AS (
            UPDATE uploads
               SET state = $3, result = $4::jsonb, expires_at = now() + make_interval(secs => $5),
                   lease_owner = NULL, lease_pid = NULL, lease_expires = NULL
             WHERE id = $1 AND generation = $2 AND state IN ('receiving', 'finishing')
            RETURNING {_UPLOAD_COLUMNS}
        ), pieces AS (
            DELETE FROM upload_pieces USING ended WHERE upload_id = ended.id
        ), tail AS (
            DELETE FROM upload_tails USING ended WHERE upload_id = ended.id
        )
        SELECT * FROM ended
        """,
        upload_id,
        generation,
        state,
        json.dumps(result),
        keep_seconds,
    )
    return _fenced(row, upload_id, generation)


async def finish_upload(
    conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int, result: dict[str, Any], keep_seconds: float
) -> Upload:
    """The upload became its prerecording; `result` is the answer given. Meant to run inside
    the transaction that saves the prerecording: Fenced rolls that save back, so a writer
    that lost its lease can never commit the file, and a cancel that came first wins."""
    return await _end(conn, upload_id, generation, "finished", result, keep_seconds)


async def fail_upload(
    conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int, result: dict[str, Any], keep_seconds: float
) -> Upload:
    """The upload was refused at its end (a precondition, a digest); `result` is the refusal."""
    return await _end(conn, upload_id, generation, "failed", result, keep_seconds)


async def cancel_upload(conn: asyncpg.Connection, upload_id: uuid.UUID, keep_seconds: float) -> Upload | None:
    """Cancel an upload in progress; None if there is none to cancel (unknown or ended).

    The state alone fences the holder: none of its writes can move the offset any more. The
    lease is left in place (and the generation unchanged) so that the holder's release still
    lands: the canceller waits for lease_owner to go NULL before removing bytes still being
    written, and sends the holder a "cancel" request with the returned generation."""
    row = await conn.fetchrow(
        f"""
        UPDATE uploads SET state = 'cancelled', expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND state IN ('receiving', 'finishing')
        RETURNING {_UPLOAD_COLUMNS}
        """,
        upload_id,
        keep_seconds,
    )
    return None if row is None else _upload(row)


async def expire_due(
    conn: asyncpg.Connection, limit: int, keep_seconds: float, *, skip_locked: bool = True
) -> list[Upload]:
    """Mark up to `limit` uploads expired whose expiry passed and that nobody holds (a live
    lease is progressing: its expiry is pushed back with its next commit). The caller removes
    their bytes after commit; the rows stay as tombstones for `keep_seconds`.

    `finishing` counts too: one whose finisher died and that nobody resumed would otherwise be
    left forever. SKIP LOCKED: every replica sweeps, and a second sweeper passes over the rows
    a first one is expiring instead of queueing behind its transaction. skip_locked=False is
    for tests only: the negative control that shows the second sweeper waiting."""
    skip = "SKIP LOCKED" if skip_locked else ""
    # MATERIALIZED: as `WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` the planner may
    # rescan the subquery, which then skips the rows this very UPDATE just changed and hands
    # out the next ones: one sweep expired every due row, not `limit` of them.
    rows = await conn.fetch(
        f"""
        WITH due AS MATERIALIZED (
            SELECT id AS due_id FROM uploads
             WHERE state IN ('receiving', 'finishing') AND expires_at < now()
               AND (lease_owner IS NULL OR lease_expires < now())
             ORDER BY expires_at LIMIT $1 FOR UPDATE {skip}
        )
        UPDATE uploads
           SET state = 'expired', generation = generation + 1, expires_at = now() + make_interval(secs => $2),
               lease_owner = NULL, lease_pid = NULL, lease_expires = NULL
          FROM due WHERE id = due_id
        RETURNING {_UPLOAD_COLUMNS}
        """,
        limit,
        keep_seconds,
    )
    return [_upload(row) for row in rows]


async def delete_tombstones(conn: asyncpg.Connection, limit: int) -> int:
    """Forget up to `limit` ended uploads past their keeping time (their pieces and tails go
    with them); afterwards their URL is unknown (404)."""
    status = await conn.execute(
        f"""
        DELETE FROM uploads WHERE id IN (
            SELECT id FROM uploads WHERE state IN {_ENDED} AND expires_at < now() ORDER BY expires_at LIMIT $1
        )
        """,
        limit,
    )
    return int(status.split()[-1])


async def uploads_in_progress(conn: asyncpg.Connection, event: uuid.UUID) -> list[Upload]:
    """The event's uploads still on their way (GET /uploads?event=), by start. One past its
    expiry is left out even before the sweeper marks it: it can no longer be resumed."""
    rows = await conn.fetch(
        f"""
        SELECT {_UPLOAD_COLUMNS} FROM uploads
         WHERE event = $1 AND state IN ('receiving', 'finishing') AND expires_at > now()
         ORDER BY start, created_at
        """,
        event,
    )
    return [_upload(row) for row in rows]


# upload-progress events: at most one a second per upload, whatever the commit cadence (64 MiB
# commits on a fast link) or the number of PATCHes (a client sending 5 MiB chunks).
PROGRESS_EVENT_SECONDS = 1.0


async def append_upload_event(conn: asyncpg.Connection, type_: str, upload: Upload) -> int:
    """An upload-* event, in the transaction that changed the upload (so it is logged, and
    delivered, exactly when that change commits). The last statement before the commit: it
    takes the event lock, which is meant to be held for one round trip and the commit."""
    return await _append_event(conn, type_, upload.event_json())


def _iso_text(naive: str) -> str:
    """SQL for Python's isoformat() of a timestamp without zone: the fraction only when it is
    not zero (model.format_start, and format_utc in UTC)."""
    return (
        f"""to_char({naive}, 'YYYY-MM-DD"T"HH24:MI:SS') || CASE WHEN extract(microseconds FROM {naive})::bigint """
        f"""% 1000000 = 0 THEN '' ELSE to_char({naive}, '.US') END"""
    )


def _event_json(row: str) -> str:
    """SQL for Upload.event_json() of the row `row`, so a statement that changes an upload can
    log its event without a round trip back here (test_db_uploads holds the two equal)."""
    return f"""
        jsonb_build_object('upload', jsonb_build_object(
            'event', {row}.event::text, 'start', {_iso_text(f"{row}.start")},
            'offset', {row}.durable, 'length', {row}.length,
            'started', {_iso_text(f"({row}.created_at AT TIME ZONE 'UTC')")} || 'Z',
            'progressed', {_iso_text(f"({row}.progressed_at AT TIME ZONE 'UTC')")} || 'Z'))"""


def _progress_event(told: str, first: int) -> str:
    """CTEs for a WITH list: an upload-progress event with the data `told` selects (no row:
    no event), unless one for its key was logged less than PROGRESS_EVENT_SECONDS ago.
    Parameters $`first` on are _progress_arguments().

    The log itself keeps the cadence, in the database's clock: replicas that take turns on one
    upload share it, and no column is needed. The key stands for the upload because events
    carry no upload ids; two uploads to one key at once (rare) share one cadence.

    When `told` reads the row the statement changes, the event lock is taken only once that
    row is changed (the lock reads from it): the usual order, row lock then event lock, which
    is then held until the commit.

    now() (the transaction's start), not clock_timestamp(): a volatile bound keeps the planner
    off events_created_at, and each commit would scan a day of events. Events are stamped later
    than now(), so the spacing is still at least `PROGRESS_EVENT_SECONDS`."""
    return f"""told AS ({told}), locked AS (
            SELECT pg_advisory_xact_lock(${first + 1}::int, ${first + 2}::int) AS locked FROM told
             WHERE NOT EXISTS (
                SELECT FROM events
                 WHERE created_at > now() - make_interval(secs => ${first}) AND type = 'upload-progress'
                   AND data->'upload'->>'event' = told.data->'upload'->>'event'
                   AND data->'upload'->>'start' = told.data->'upload'->>'start')
        ), logged AS (
            INSERT INTO events (type, data) SELECT 'upload-progress', told.data FROM told, locked
            RETURNING id, pg_notify(${first + 3}, id::text)
        )"""


def _progress_arguments() -> tuple[Any, ...]:
    # The cadence is read here, not bound at import: tests switch it off.
    return (PROGRESS_EVENT_SECONDS, *EVENT_LOCK, NOTIFY_CHANNEL)


@dataclass(frozen=True)
class UploadNotice:
    """A request to an upload's lease holder, as sent on UPLOADS_CHANNEL."""

    verb: str  # "release" (let another writer take over) or "cancel"
    upload_id: uuid.UUID
    generation: int

    @property
    def payload(self) -> str:
        return f"{self.verb} {self.upload_id} {self.generation}"

    @classmethod
    def parse(cls, payload: str) -> UploadNotice:
        verb, upload_id, generation = payload.split(" ")
        if verb not in ("release", "cancel"):
            raise ValueError(f"not an upload notice: {payload!r}")
        return cls(verb, uuid.UUID(upload_id), int(generation))


async def _notify_holder(conn: asyncpg.Connection, notice: UploadNotice) -> None:
    # Delivered at once outside a transaction, at commit inside one. The generation lets the
    # holder ignore a request meant for a lease it no longer has (or not yet).
    await conn.execute("SELECT pg_notify($1, $2)", UPLOADS_CHANNEL, notice.payload)


async def request_release(conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int) -> None:
    """Ask the holder of `generation` to make what it has durable and let go. A lost request
    costs only time: the asker forces the lease after a while."""
    await _notify_holder(conn, UploadNotice("release", upload_id, generation))


async def request_cancel(conn: asyncpg.Connection, upload_id: uuid.UUID, generation: int) -> None:
    """Tell the holder of `generation` that its upload was cancelled: stop, and release."""
    await _notify_holder(conn, UploadNotice("cancel", upload_id, generation))
