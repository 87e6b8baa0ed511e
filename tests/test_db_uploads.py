"""The resumable-upload statements against the real database: leases, fencing, expiry, notices.

No HTTP here: these are the promises the upload engine builds on. A writer that lost its lease
can never move the offset, two replicas never both hold one upload, the sweeper never expires
an upload someone is writing, and two sweepers never take the same one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import asyncpg
import pytest

from prerec import db
from prerec.model import NewUpload, Piece, Tail, Upload
from tests.conftest import EVENT, wait_for

DAY = 86400.0
EVENT_ID = uuid.UUID(EVENT)
START = datetime(2026, 12, 1, 20, 0)
Connect = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def connect(database_url: str) -> AsyncIterator[Connect]:
    """Opens connections of their own (one per replica, say); all closed at the end."""
    opened: list[asyncpg.Connection] = []

    async def open_one() -> asyncpg.Connection:
        opened.append(await asyncpg.connect(database_url))
        return opened[-1]

    yield open_one
    for conn in opened:
        await conn.close()


@pytest.fixture
async def conn(connect: Connect) -> asyncpg.Connection:
    return await connect()


async def new_upload(
    conn: asyncpg.Connection,
    length: int = 1000,
    event: uuid.UUID = EVENT_ID,
    start: datetime = START,
    expiry: float = DAY,
) -> Upload:
    return await db.create_upload(conn, uuid.uuid4(), NewUpload(event, start, "audio/ogg", length, "tus"), expiry)


async def make_due(conn: asyncpg.Connection, upload: Upload) -> None:
    """As if its expiry had passed a second ago."""
    await conn.execute("UPDATE uploads SET expires_at = now() - interval '1 s' WHERE id = $1", upload.id)


async def database_now(conn: asyncpg.Connection) -> datetime:
    return await conn.fetchval("SELECT now()")


async def gone(conn: asyncpg.Connection, pid: int) -> bool:
    return not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid)


async def lock_waiter(conn: asyncpg.Connection, pid: int) -> bool:
    return await conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid) is True


# Creation and reading


async def test_an_upload_reads_back_as_created_with_database_times(conn) -> None:
    upload_id = uuid.uuid4()
    new = NewUpload(
        uuid.UUID(EVENT),
        START,
        "audio/ogg; codecs=opus",
        2_000_000_000,
        "ietf",
        if_match='"abc"',
        if_none_match=True,
        digests=[{"algorithm": "sha256", "value": "AAAA"}],
        metadata={"filename": "show.ogg"},
    )
    created = await db.create_upload(conn, upload_id, new, 3600.0, "s3-upload-id")
    assert await db.get_upload(conn, upload_id) == created
    assert (created.id, created.event, created.start, created.type) == (
        upload_id,
        uuid.UUID(EVENT),
        START,
        "audio/ogg; codecs=opus",
    )
    assert (created.length, created.offset, created.state, created.protocol) == (2_000_000_000, 0, "receiving", "ietf")
    assert (created.if_match, created.if_none_match, created.store_ref) == ('"abc"', True, "s3-upload-id")
    assert created.digests == [{"algorithm": "sha256", "value": "AAAA"}]
    assert created.metadata == {"filename": "show.ogg"}
    assert created.result is None
    assert (created.generation, created.lease_owner, created.lease_pid, created.lease_expires) == (0, None, None, None)
    # One database clock: created, progressed and expiry come from the same now().
    assert created.created_at == created.progressed_at == await conn.fetchval("SELECT created_at FROM uploads")
    assert created.expires_at - created.created_at == timedelta(hours=1)
    assert created.to_json() == {
        "start": "2026-12-01T20:00:00",
        "type": "audio/ogg; codecs=opus",
        "offset": 0,
        "length": 2_000_000_000,
        "started": created.to_json()["started"],
        "progressed": created.to_json()["started"],
        "expires": created.to_json()["expires"],
    }
    assert created.to_json()["started"].endswith("Z")
    assert await db.get_upload(conn, uuid.uuid4()) is None


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE uploads SET length = 0",
        "UPDATE uploads SET durable = length + 1",
        "UPDATE uploads SET durable = -1",
        "UPDATE uploads SET state = 'paused'",
        "UPDATE uploads SET protocol = 'ftp'",
        "UPDATE uploads SET state = 'finishing'",  # not complete
        "UPDATE uploads SET state = 'failed'",  # no result to replay
        "UPDATE uploads SET lease_owner = 'x'",  # a lease without an expiry
        "UPDATE uploads SET lease_pid = 1",  # a pid without a holder
        "UPDATE uploads SET next_part = 0",
    ],
)
async def test_the_table_refuses_rows_that_cannot_be(conn, change: str) -> None:
    await new_upload(conn)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(change)


# Offsets and fencing


async def test_the_holder_moves_the_offset_forward_only(conn) -> None:
    upload = await new_upload(conn)
    lease = await db.acquire_lease(conn, upload.id, "replica-a", conn.get_server_pid())
    assert lease is not None and lease.generation == 1
    moved = await db.advance(conn, upload.id, 1, 0, 100, DAY)
    assert moved.offset == 100 and moved.progressed_at > upload.progressed_at
    assert (await db.advance(conn, upload.id, 1, 100, 250, DAY)).offset == 250
    # A write that expected an offset the row no longer has changes nothing.
    with pytest.raises(db.Fenced):
        await db.advance(conn, upload.id, 1, 100, 300, DAY)
    with pytest.raises(ValueError, match="backwards"):
        await db.advance(conn, upload.id, 1, 250, 200, DAY)
    with pytest.raises(asyncpg.CheckViolationError):  # past the declared length
        await db.advance(conn, upload.id, 1, 250, 1001, DAY)
    assert (await db.get_upload(conn, upload.id)).offset == 250


async def test_progress_pushes_expiry_back_and_renews_the_lease(conn) -> None:
    upload = await new_upload(conn, expiry=60.0)
    lease = await db.acquire_lease(conn, upload.id, "a", None, lease_seconds=1.0)
    await asyncio.sleep(0.05)  # so that the progress commit's now() is a later one
    moved = await db.advance(conn, upload.id, lease.generation, 0, 10, 60.0, lease_seconds=30.0)
    assert moved.expires_at - moved.progressed_at == timedelta(seconds=60)
    assert moved.expires_at > upload.expires_at
    assert moved.lease_expires - moved.progressed_at == timedelta(seconds=30)
    # No bytes, no progress: the expiry stays where the last progress put it.
    again = await db.advance(conn, upload.id, lease.generation, 10, 10, 60.0)
    assert (again.progressed_at, again.expires_at) == (moved.progressed_at, moved.expires_at)


async def zombie_run(conn: asyncpg.Connection, other: asyncpg.Connection, fenced: bool) -> Upload:
    """A writes, B takes the lease by force, then A's late commit arrives."""
    upload = await new_upload(conn)
    a = await db.acquire_lease(conn, upload.id, "replica-a", conn.get_server_pid())
    await db.advance(conn, upload.id, a.generation, 0, 100, DAY)
    b = await db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid(), force=True)
    assert b is not None and b.generation == a.generation + 1
    try:
        await db.advance(conn, upload.id, a.generation, 100, 200, DAY, pieces=[Piece(0, 200, 1)], fenced=fenced)
    except db.Fenced:
        pass
    return await db.get_upload(other, upload.id)


async def test_a_writer_whose_lease_was_taken_cannot_move_the_offset(conn, connect) -> None:
    other = await connect()
    after = await zombie_run(conn, other, fenced=True)
    assert after.offset == 100
    assert await db.upload_pieces(other, after.id) == []  # nor record its pieces
    # Nor renew, release, finish or fail what is no longer its own.
    with pytest.raises(db.Fenced):
        await db.renew_lease(conn, after.id, 1)
    assert await db.release_lease(conn, after.id, 1, clean=True) is False
    with pytest.raises(db.Fenced):
        await db.allocate_parts(conn, after.id, 1, 1)
    with pytest.raises(db.Fenced):
        await db.fail_upload(conn, after.id, 1, {"status": 412}, DAY)
    unchanged = await db.get_upload(other, after.id)
    assert (unchanged.lease_owner, unchanged.generation, unchanged.state) == ("replica-b", 2, "receiving")
    # The new holder goes on from the offset it was given.
    assert (await db.advance(other, after.id, 2, 100, 150, DAY)).offset == 150


async def test_without_the_fence_the_zombie_moves_the_offset(conn, connect) -> None:
    """The negative control: the same late commit with the generation left out of the
    condition lands, and the new holder's offset is no longer the one it was given."""
    other = await connect()
    after = await zombie_run(conn, other, fenced=False)
    assert after.offset == 200
    assert await db.upload_pieces(other, after.id) == [Piece(0, 200, 1)]
    with pytest.raises(db.Fenced):
        await db.advance(other, after.id, 2, 100, 150, DAY)


# Leases


async def race(conns: list[asyncpg.Connection], upload: Upload, force: bool) -> list[Upload | None]:
    return await asyncio.gather(
        *(db.acquire_lease(c, upload.id, f"replica-{n}", c.get_server_pid(), force=force) for n, c in enumerate(conns))
    )


async def test_of_replicas_racing_for_a_lease_exactly_one_wins(connect) -> None:
    conns = [await connect() for _ in range(4)]
    for _ in range(40):
        upload = await new_upload(conns[0])
        results = await race(conns, upload, force=False)
        winners = [result for result in results if result is not None]
        assert len(winners) == 1, results
        row = await db.get_upload(conns[0], upload.id)
        assert (row.generation, row.lease_owner) == (1, winners[0].lease_owner)


async def test_forced_racers_all_win_so_the_race_test_sees_double_winners(connect) -> None:
    """The negative control: with the condition off (force), every racer takes the lease,
    one after the other; the test above would have failed."""
    conns = [await connect() for _ in range(4)]
    upload = await new_upload(conns[0])
    results = await race(conns, upload, force=True)
    assert sorted(result.generation for result in results) == [1, 2, 3, 4]


async def test_a_live_lease_is_refused_and_an_expired_one_is_taken(conn, connect) -> None:
    other = await connect()
    upload = await new_upload(conn)
    held = await db.acquire_lease(conn, upload.id, "replica-a", conn.get_server_pid(), lease_seconds=0.5)
    assert await db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid()) is None
    # The holder's connection is alive all along: only the lease's expiry frees it.
    taken = await wait_for(lambda: db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid()))
    assert taken.generation == 2 and taken.lease_owner == "replica-b"
    assert await database_now(other) > held.lease_expires
    assert not conn.is_closed()


async def test_the_lease_of_a_holder_whose_connection_died_is_taken_at_once(conn, connect) -> None:
    holder, admin = await connect(), await connect()
    upload = await new_upload(conn)
    held = await db.acquire_lease(holder, upload.id, "replica-a", holder.get_server_pid(), lease_seconds=DAY)
    assert await db.acquire_lease(conn, upload.id, "replica-b", conn.get_server_pid()) is None
    # As when the holder is killed: its backend goes as the kernel closes its socket.
    assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", held.lease_pid)
    taken = await db.acquire_lease(conn, upload.id, "replica-b", conn.get_server_pid())
    assert taken is not None and taken.generation == 2
    assert taken.segment_generation == 2  # not a clean release: a segment of its own


async def test_a_lease_without_a_pid_is_freed_only_by_expiry(conn, connect) -> None:
    other = await connect()
    upload = await new_upload(conn)
    await db.acquire_lease(conn, upload.id, "replica-a", None, lease_seconds=DAY)
    assert await db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid()) is None


async def test_a_forced_takeover_bumps_the_generation_and_fences_the_old_holder(conn, connect) -> None:
    other = await connect()
    upload = await new_upload(conn)
    old = await db.acquire_lease(conn, upload.id, "replica-a", conn.get_server_pid(), lease_seconds=DAY)
    assert await db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid()) is None
    new = await db.acquire_lease(other, upload.id, "replica-b", other.get_server_pid(), force=True)
    assert new.generation == old.generation + 1 and new.segment_generation == new.generation
    with pytest.raises(db.Fenced):
        await db.advance(conn, upload.id, old.generation, 0, 10, DAY)
    await db.renew_lease(other, upload.id, new.generation)


async def test_the_segment_is_continued_only_after_a_clean_release(conn) -> None:
    upload = await new_upload(conn)
    first = await db.acquire_lease(conn, upload.id, "a", None)
    assert first.segment_generation == 1
    assert await db.release_lease(conn, upload.id, 1, clean=True)
    second = await db.acquire_lease(conn, upload.id, "b", None)
    assert (second.generation, second.segment_generation) == (2, 1)
    assert await db.release_lease(conn, upload.id, 2, clean=False)
    third = await db.acquire_lease(conn, upload.id, "c", None)
    assert (third.generation, third.segment_generation) == (3, 3)


async def test_a_take_for_an_append_brings_the_pieces_and_the_tail(conn) -> None:
    upload = await new_upload(conn)
    first = await db.take_for_append(conn, upload.id, "a", None)
    assert (first.upload.generation, first.pieces, first.tail) == (1, [], None)
    await db.advance(conn, upload.id, 1, 0, 100, DAY, pieces=[Piece(0, 100, 1)], release=True)
    continued = await db.take_for_append(conn, upload.id, "b", None)
    assert (continued.upload.segment_generation, continued.pieces) == (1, [Piece(0, 100, 1)])
    assert await db.take_for_append(conn, upload.id, "c", None) is None  # held
    parts = [Piece(100, 50, 2, 1, "e1"), Piece(150, 50, 2, 2, "e2")]
    await db.advance(conn, upload.id, 2, 100, 220, DAY, pieces=parts, tail=Tail(200, b"t" * 20), release=False)
    await db.release_lease(conn, upload.id, 2, clean=False)
    fresh = await db.take_for_append(conn, upload.id, "c", None)
    assert fresh.upload.segment_generation == 3
    assert (fresh.pieces, fresh.tail) == ([Piece(0, 100, 1), *parts], Tail(200, b"t" * 20))


async def take_behind_a_writer(conn: asyncpg.Connection, connect: Connect, untouched: bool) -> db.Taken | None:
    """A take whose snapshot comes before a writer that takes, writes its first piece and lets
    go cleanly, and whose row lock comes after it: the row then continues that writer's new
    segment, which the take's snapshot has no piece of."""
    other, observer = await connect(), await connect()
    upload = await new_upload(conn)
    lease = await db.acquire_lease(conn, upload.id, "a", None)
    await db.release_lease(conn, upload.id, lease.generation, clean=False)  # the next one starts a segment
    writer = other.transaction()
    await writer.start()
    taken = await db.acquire_lease(other, upload.id, "b", None)
    await db.advance(other, upload.id, taken.generation, 0, 100, DAY, pieces=[Piece(0, 100, 2)], release=True)
    racing = asyncio.ensure_future(db.take_for_append(conn, upload.id, "c", None, untouched=untouched))
    await wait_for(lambda: waiting_on_a_lock(observer, conn), timeout=5.0)
    await writer.commit()
    return await racing


async def waiting_on_a_lock(observer: asyncpg.Connection, waiter: asyncpg.Connection) -> bool:
    return await observer.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", waiter.get_server_pid()
    )


async def test_a_take_behind_a_writer_that_let_go_is_refused_not_misplaced(conn, connect) -> None:
    assert await take_behind_a_writer(conn, connect, untouched=True) is None


async def test_without_the_untouched_row_condition_the_pieces_are_wrong(conn, connect) -> None:
    """The negative control: the take continues segment 2, which begins at 0, but brings no
    piece of it, so the segment would be opened at 100 and the next bytes written over the
    first ones."""
    taken = await take_behind_a_writer(conn, connect, untouched=False)
    assert (taken.upload.segment_generation, taken.upload.offset, taken.pieces) == (2, 100, [])


async def test_nothing_is_leased_past_its_expiry_or_once_ended(conn) -> None:
    due, ended = await new_upload(conn), await new_upload(conn)
    await make_due(conn, due)
    await db.cancel_upload(conn, ended.id, DAY)
    for upload in (due, ended):
        assert await db.acquire_lease(conn, upload.id, "a", None, force=True) is None
    assert await db.acquire_lease(conn, uuid.uuid4(), "a", None, force=True) is None


async def test_a_finishing_upload_is_not_forced_but_taken_from_a_dead_holder(conn, connect) -> None:
    holder, admin = await connect(), await connect()
    upload = await new_upload(conn, length=10)
    lease = await db.acquire_lease(holder, upload.id, "a", holder.get_server_pid(), lease_seconds=DAY)
    await db.advance(holder, upload.id, lease.generation, 0, 10, DAY)
    assert (await db.begin_finishing(holder, upload.id, lease.generation)).state == "finishing"
    assert await db.acquire_lease(conn, upload.id, "b", None, force=True) is None
    await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", lease.lease_pid)
    taken = await db.acquire_lease(conn, upload.id, "b", None)
    assert (taken.state, taken.generation, taken.offset) == ("receiving", 2, 10)


# Pieces, tail and part numbers


async def test_pieces_and_tail_are_recorded_with_the_offset(conn) -> None:
    upload = await new_upload(conn)
    gen = (await db.acquire_lease(conn, upload.id, "a", None)).generation
    await db.advance(conn, upload.id, gen, 0, 100, DAY, pieces=[Piece(0, 100, gen)])
    await db.advance(conn, upload.id, gen, 100, 300, DAY, pieces=[Piece(0, 300, gen)])  # the segment grew
    assert await db.upload_pieces(conn, upload.id) == [Piece(0, 300, gen)]
    assert await db.upload_tail(conn, upload.id) is None

    parts = [Piece(300, 100, gen, 1, '"e1"'), Piece(400, 100, gen, 2, '"e2"')]
    await db.advance(conn, upload.id, gen, 300, 520, DAY, pieces=parts, tail=Tail(500, b"x" * 20))
    assert await db.upload_pieces(conn, upload.id) == [Piece(0, 300, gen), *parts]
    assert await db.upload_tail(conn, upload.id) == Tail(500, b"x" * 20)
    await db.advance(conn, upload.id, gen, 520, 530, DAY, tail=Tail(500, b"y" * 30))
    assert await db.upload_tail(conn, upload.id) == Tail(500, b"y" * 30)
    await db.advance(conn, upload.id, gen, 530, 530, DAY, pieces=[Piece(500, 30, gen, 3, '"e3"')])
    assert await db.upload_tail(conn, upload.id) is None
    with pytest.raises(ValueError, match="tail"):
        await db.advance(conn, upload.id, gen, 530, 540, DAY, tail=Tail(530, b"z"))


async def test_part_numbers_are_never_shared_between_generations(conn, connect) -> None:
    other = await connect()
    upload = await new_upload(conn)
    first = await db.acquire_lease(conn, upload.id, "a", None)
    assert await db.allocate_parts(conn, upload.id, first.generation, 2) == 1
    second = await db.acquire_lease(other, upload.id, "b", None, force=True)
    assert await db.allocate_parts(other, upload.id, second.generation, 1) == 3
    with pytest.raises(db.Fenced):
        await db.allocate_parts(conn, upload.id, first.generation, 1)
    assert await db.allocate_parts(other, upload.id, second.generation, 1) == 4


# Finishing, failing, cancelling


async def complete(conn: asyncpg.Connection, length: int = 100) -> Upload:
    upload = await new_upload(conn, length=length)
    lease = await db.acquire_lease(conn, upload.id, "a", conn.get_server_pid())
    return await db.advance(conn, upload.id, lease.generation, 0, length, DAY)


async def test_finishing_stores_the_result_inside_the_callers_transaction(conn) -> None:
    upload = await complete(conn)
    result = {"status": 201, "etag": '"00ff"', "body": {"size": 100}}
    async with conn.transaction():
        finished = await db.finish_upload(conn, upload.id, upload.generation, result, 3600.0)
        assert (finished.state, finished.result, finished.lease_owner) == ("finished", result, None)
        assert finished.expires_at - await database_now(conn) == timedelta(hours=1)  # kept for replay
    assert await db.get_upload(conn, upload.id) == finished

    rolled_back = await complete(conn)
    with pytest.raises(RuntimeError):
        async with conn.transaction():  # as when the prerecording's save fails after it
            await db.finish_upload(conn, rolled_back.id, rolled_back.generation, result, DAY)
            raise RuntimeError("the save failed")
    assert (await db.get_upload(conn, rolled_back.id)).state == "receiving"


async def test_finishing_is_fenced(conn, connect) -> None:
    other = await connect()
    upload = await complete(conn)
    await db.acquire_lease(other, upload.id, "b", None, force=True)
    with pytest.raises(db.Fenced):
        await db.finish_upload(conn, upload.id, upload.generation, {"status": 204}, DAY)
    assert (await db.get_upload(conn, upload.id)).state == "receiving"
    # An upload that is not complete cannot finish at all.
    incomplete = await new_upload(conn)
    lease = await db.acquire_lease(conn, incomplete.id, "a", None)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.finish_upload(conn, incomplete.id, lease.generation, {"status": 204}, DAY)


async def test_a_failed_upload_keeps_its_refusal(conn) -> None:
    upload = await complete(conn)
    refusal = {"status": 412, "body": {"detail": "If-Match failed"}}
    failed = await db.fail_upload(conn, upload.id, upload.generation, refusal, DAY)
    assert (failed.state, failed.result, failed.offset) == ("failed", refusal, 100)
    with pytest.raises(db.Fenced):
        await db.finish_upload(conn, upload.id, upload.generation, {"status": 201}, DAY)


@pytest.mark.parametrize("end", [db.finish_upload, db.fail_upload])
async def test_an_ended_upload_keeps_no_pieces_nor_tail(conn, end) -> None:  # type: ignore[no-untyped-def]
    upload = await new_upload(conn, length=100)
    gen = (await db.acquire_lease(conn, upload.id, "a", None)).generation
    await db.advance(conn, upload.id, gen, 0, 100, DAY, pieces=[Piece(0, 90, gen)], tail=Tail(90, b"t" * 10))
    other = await new_upload(conn, length=100)
    other_gen = (await db.acquire_lease(conn, other.id, "a", None)).generation
    await db.advance(conn, other.id, other_gen, 0, 50, DAY, pieces=[Piece(0, 50, other_gen)])
    # Its bytes are the prerecording's now (or gone): nothing left to find them by.
    await end(conn, upload.id, gen, {"status": 201}, DAY)
    assert await db.upload_pieces(conn, upload.id) == []
    assert await db.upload_tail(conn, upload.id) is None
    assert await db.upload_pieces(conn, other.id) == [Piece(0, 50, other_gen)]  # only its own


async def test_a_cancel_fences_the_holder_whose_release_then_tells_the_canceller(conn, connect) -> None:
    holder = await connect()
    upload = await new_upload(conn)
    lease = await db.acquire_lease(holder, upload.id, "a", holder.get_server_pid())
    await db.advance(holder, upload.id, lease.generation, 0, 10, DAY)
    cancelled = await db.cancel_upload(conn, upload.id, 60.0)
    assert (cancelled.state, cancelled.generation, cancelled.lease_owner) == ("cancelled", lease.generation, "a")
    with pytest.raises(db.Fenced):
        await db.advance(holder, upload.id, lease.generation, 10, 20, DAY)
    with pytest.raises(db.Fenced):
        await db.finish_upload(holder, upload.id, lease.generation, {"status": 201}, DAY)
    assert await db.release_lease(holder, upload.id, lease.generation, clean=True)
    assert (await db.get_upload(conn, upload.id)).lease_owner is None
    assert await db.cancel_upload(conn, upload.id, 60.0) is None
    assert await db.cancel_upload(conn, uuid.uuid4(), 60.0) is None


# Expiry


async def test_expiry_takes_only_due_uploads_in_progress_that_nobody_holds(conn, connect) -> None:
    holder = await connect()
    due_free = await new_upload(conn)
    due_lease_expired = await new_upload(conn)
    due_held = await new_upload(conn)
    not_due = await new_upload(conn)
    due_cancelled = await new_upload(conn)
    due_finished = await complete(conn)
    due_orphaned_finishing = await complete(conn, length=10)
    await db.acquire_lease(conn, due_lease_expired.id, "a", conn.get_server_pid(), lease_seconds=-1.0)
    await db.acquire_lease(holder, due_held.id, "b", holder.get_server_pid(), lease_seconds=DAY)
    await db.cancel_upload(conn, due_cancelled.id, DAY)
    await db.finish_upload(conn, due_finished.id, due_finished.generation, {"status": 201}, DAY)
    await db.begin_finishing(conn, due_orphaned_finishing.id, due_orphaned_finishing.generation)
    await conn.execute(
        "UPDATE uploads SET lease_expires = now() - interval '1 s' WHERE id = $1", due_orphaned_finishing.id
    )
    for upload in (due_free, due_lease_expired, due_held, due_cancelled, due_finished, due_orphaned_finishing):
        await make_due(conn, upload)

    expired = await db.expire_due(conn, 100, DAY)
    assert {upload.id for upload in expired} == {due_free.id, due_lease_expired.id, due_orphaned_finishing.id}
    for upload in expired:
        assert (upload.state, upload.lease_owner) == ("expired", None)
    assert (await db.get_upload(conn, due_lease_expired.id)).generation == 2  # its old holder is fenced
    states = {row["id"]: row["state"] for row in await conn.fetch("SELECT id, state FROM uploads")}
    assert [states[u.id] for u in (due_held, not_due, due_cancelled, due_finished)] == [
        "receiving",
        "receiving",
        "cancelled",
        "finished",
    ]
    assert await db.expire_due(conn, 100, DAY) == []


async def test_two_sweepers_never_take_the_same_upload_and_do_not_wait(connect) -> None:
    first, second = await connect(), await connect()
    uploads = [await new_upload(first) for _ in range(6)]
    for upload in uploads:
        await make_due(first, upload)
    async with first.transaction():
        taken_first = await db.expire_due(first, 3, DAY)
        # The first sweeper has not committed: the second passes over its rows at once.
        taken_second = await asyncio.wait_for(db.expire_due(second, 10, DAY), 10)
    assert len(taken_first) == len(taken_second) == 3
    assert {u.id for u in taken_first} | {u.id for u in taken_second} == {u.id for u in uploads}


async def test_without_skip_locked_the_second_sweeper_waits_for_the_first(connect) -> None:
    """The negative control: the same sweep without SKIP LOCKED queues behind the first."""
    first, second, watcher = await connect(), await connect(), await connect()
    uploads = [await new_upload(first) for _ in range(6)]
    for upload in uploads:
        await make_due(first, upload)
    transaction = first.transaction()
    await transaction.start()
    await db.expire_due(first, 3, DAY, skip_locked=False)
    pending = asyncio.ensure_future(db.expire_due(second, 10, DAY, skip_locked=False))
    await wait_for(lambda: lock_waiter(watcher, second.get_server_pid()))
    assert not pending.done()
    await transaction.commit()
    # Once the first committed, its rows are no longer due: still no row taken twice.
    assert len(await asyncio.wait_for(pending, 10)) == 3


async def test_many_sweepers_at_once_expire_each_due_upload_exactly_once(connect) -> None:
    conns = [await connect() for _ in range(4)]
    uploads = [await new_upload(conns[0]) for _ in range(40)]
    for upload in uploads:
        await make_due(conns[0], upload)

    async def sweep(conn: asyncpg.Connection) -> list[uuid.UUID]:
        taken: list[uuid.UUID] = []
        while True:
            async with conn.transaction():
                batch = await db.expire_due(conn, 3, DAY)
                await asyncio.sleep(0.01)  # the event and the commit that follow in the engine
            if not batch:
                return taken
            taken += [upload.id for upload in batch]

    taken = [upload_id for batch in await asyncio.gather(*(sweep(c) for c in conns)) for upload_id in batch]
    assert sorted(taken) == sorted(upload.id for upload in uploads)


async def test_ended_uploads_are_forgotten_after_their_keeping_time(conn) -> None:
    gone = await complete(conn)
    await db.advance(conn, gone.id, gone.generation, 100, 100, DAY, pieces=[Piece(0, 100, 1)])
    await db.finish_upload(conn, gone.id, gone.generation, {"status": 201}, -1.0)
    kept = await new_upload(conn)
    await db.cancel_upload(conn, kept.id, DAY)
    overdue_in_progress = await new_upload(conn)
    await make_due(conn, overdue_in_progress)
    assert await db.delete_tombstones(conn, 100) == 1
    assert await db.get_upload(conn, gone.id) is None
    assert await conn.fetchval("SELECT count(*) FROM upload_pieces") == 0
    assert await db.get_upload(conn, kept.id) is not None
    assert await db.get_upload(conn, overdue_in_progress.id) is not None  # the sweeper's to expire first


# Listing and notices


async def test_uploads_in_progress_lists_only_that_events_open_uploads(conn) -> None:
    event, elsewhere = uuid.UUID(EVENT), uuid.uuid4()
    later = await new_upload(conn, start=START + timedelta(hours=2))
    earlier = await new_upload(conn, start=START)
    finishing = await complete(conn, length=10)
    await db.begin_finishing(conn, finishing.id, finishing.generation)
    await new_upload(conn, event=elsewhere)
    await db.cancel_upload(conn, (await new_upload(conn)).id, DAY)
    finished = await complete(conn)
    await db.finish_upload(conn, finished.id, finished.generation, {"status": 201}, DAY)
    await make_due(conn, await new_upload(conn))
    listed = await db.uploads_in_progress(conn, event)
    assert [upload.id for upload in listed] == [earlier.id, finishing.id, later.id]
    assert [upload.id for upload in await db.uploads_in_progress(conn, uuid.uuid4())] == []


async def test_progress_is_logged_at_most_once_a_second_per_upload_key(conn) -> None:
    async def resumed(upload: Upload) -> int | None:
        """The id of the upload-progress event a take logged, if it logged one."""
        before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
        taken = await db.acquire_lease(conn, upload.id, "a", None, progress=True)
        await db.release_lease(conn, upload.id, taken.generation, clean=True)
        return await conn.fetchval("SELECT max(id) FROM events WHERE id > $1 AND type = 'upload-progress'", before)

    upload = await new_upload(conn)
    first = await resumed(upload)
    assert first is not None
    assert await resumed(upload) is None  # within the second: folded
    elsewhere = await new_upload(conn, start=START + timedelta(hours=1))
    assert await resumed(elsewhere) is not None  # another key has its own cadence
    # A second on (the log's clock moved back instead): told again.
    await conn.execute("UPDATE events SET created_at = created_at - interval '1 s' WHERE id = $1", first)
    again = await resumed(upload)
    assert again is not None
    [(event_type, data)] = await conn.fetch("SELECT type, data::text FROM events WHERE id = $1", again)
    assert event_type == "upload-progress" and json.loads(data) == (await db.get_upload(conn, upload.id)).event_json()
    # Other upload events never count against the cadence.
    later = START + timedelta(hours=2)
    cancelled = await db.cancel_upload(conn, (await new_upload(conn, start=later)).id, DAY)
    assert cancelled is not None
    await db.append_upload_event(conn, "upload-cancelled", cancelled)
    assert await resumed(await new_upload(conn, start=later)) is not None


async def logged_progress(conn: asyncpg.Connection) -> list[dict]:
    rows = await conn.fetch("SELECT data::text FROM events WHERE type = 'upload-progress' ORDER BY id")
    return [json.loads(row["data"]) for row in rows]


async def test_a_take_and_a_progress_commit_log_their_event_in_their_own_statement(conn, connect, monkeypatch) -> None:
    listener = await connect()
    notified: list[str] = []
    await listener.add_listener(db.NOTIFY_CHANNEL, lambda *args: notified.append(args[3]))
    monkeypatch.setattr(db, "PROGRESS_EVENT_SECONDS", 0.0)
    # A start with a fraction and a creation on a whole second: both of isoformat()'s shapes.
    upload = await new_upload(conn, start=START.replace(microsecond=250))
    await conn.execute("UPDATE uploads SET created_at = date_trunc('second', created_at) WHERE id = $1", upload.id)
    taken = await db.acquire_lease(conn, upload.id, "a", None, progress=True)
    moved = await db.advance(conn, upload.id, taken.generation, 0, 100, DAY, progress=True)
    quiet = await db.advance(conn, upload.id, taken.generation, 100, 200, DAY)
    with pytest.raises(db.Fenced):  # a fenced commit tells nothing
        await db.advance(conn, upload.id, taken.generation + 1, 200, 300, DAY, progress=True)
    assert await logged_progress(conn) == [taken.event_json(), moved.event_json()]
    assert "." not in taken.event_json()["upload"]["started"]  # no fraction at all
    assert taken.event_json()["upload"]["start"].endswith(".000250")
    await wait_for(lambda: len(notified) == 2)
    # Within the cadence the statements change the row and log nothing.
    monkeypatch.setattr(db, "PROGRESS_EVENT_SECONDS", 60.0)
    await db.release_lease(conn, upload.id, taken.generation, clean=True)
    again = await db.acquire_lease(conn, upload.id, "a", None, progress=True)
    assert (await db.advance(conn, upload.id, again.generation, 200, 300, DAY, progress=True)).offset == 300
    assert len(await logged_progress(conn)) == 2 and quiet.offset == 200


async def test_the_last_progress_commit_of_a_body_lets_go_of_the_lease_cleanly(conn, connect) -> None:
    upload = await new_upload(conn)
    lease = await db.acquire_lease(conn, upload.id, "a", conn.get_server_pid())
    held = await db.advance(conn, upload.id, lease.generation, 0, 100, DAY, pieces=[Piece(0, 100, 1)])
    assert (held.lease_owner, held.released_clean) == ("a", False)
    let_go = await db.advance(conn, upload.id, lease.generation, 100, 200, DAY, pieces=[Piece(0, 200, 1)], release=True)
    assert (let_go.offset, let_go.lease_owner, let_go.lease_pid, let_go.lease_expires) == (200, None, None, None)
    assert let_go.released_clean
    # The next holder continues the segment, and the one that let go can write nothing more.
    other = await connect()
    after = await db.acquire_lease(other, upload.id, "b", other.get_server_pid())
    assert (after.generation, after.segment_generation) == (2, 1)
    with pytest.raises(db.Fenced):
        await db.advance(conn, upload.id, lease.generation, 200, 300, DAY, release=True)
    assert (await db.get_upload(conn, upload.id)).lease_owner == "b"


async def test_a_release_request_reaches_the_holders_listening_connection(conn, connect) -> None:
    listener = await connect()
    received: list[str] = []
    await listener.add_listener(db.UPLOADS_CHANNEL, lambda *args: received.append(args[3]))
    upload_id = uuid.uuid4()
    await db.request_release(conn, upload_id, 7)
    await db.request_cancel(conn, upload_id, 8)
    await wait_for(lambda: len(received) == 2)
    assert [db.UploadNotice.parse(payload) for payload in received] == [
        db.UploadNotice("release", upload_id, 7),
        db.UploadNotice("cancel", upload_id, 8),
    ]


@pytest.mark.parametrize(
    "payload", ["", "release", f"stop {uuid.uuid4()} 1", "release x 1", f"cancel {uuid.uuid4()} x"]
)
def test_a_notice_that_is_not_one_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        db.UploadNotice.parse(payload)


async def test_leases_restamped_after_a_reconnect_are_not_taken_as_a_dead_holders(conn, connect) -> None:
    old, new, other = await connect(), await connect(), await connect()
    mine, theirs = await new_upload(conn), await new_upload(conn)
    await db.acquire_lease(conn, mine.id, "replica-a", old.get_server_pid(), lease_seconds=DAY)
    await db.acquire_lease(conn, theirs.id, "replica-b", other.get_server_pid(), lease_seconds=DAY)
    old_pid = old.get_server_pid()
    await old.close()  # replica-a's listening connection broke, and it opened `new`
    await wait_for(lambda: gone(conn, old_pid))
    assert await db.restamp_leases(conn, "replica-a", new.get_server_pid()) == 1
    assert await db.acquire_lease(conn, mine.id, "replica-c", None) is None
    assert (await db.get_upload(conn, theirs.id)).lease_pid == other.get_server_pid()
