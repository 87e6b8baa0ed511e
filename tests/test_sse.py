"""GET /sse: one message per change, filtered by type, across app instances, resumable."""

from __future__ import annotations

import asyncio
import base64
import itertools
import uuid
from datetime import datetime, timedelta

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict, MultiDict

from prerec import db
from prerec.app import create_app
from prerec.model import EVENT_TYPES, PRERECORDING_EVENT_TYPES
from prerec.problems import Problem
from prerec.sse import parse_last_event_id, parse_types
from tests import contract
from tests.conftest import EVENT, Replica, free_port, ogg, read_events, sample, wait_for

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


async def change_everything(client) -> None:  # type: ignore[no-untyped-def]
    assert (await client.put(KEY, data=ogg(100, b"a"), headers=OGG)).status == 201
    assert (await client.put(KEY, data=ogg(200, b"b"), headers=OGG)).status == 204
    assert (await client.delete(KEY)).status == 204


async def test_created_updated_deleted_in_order(client) -> None:
    stream = await client.get("/sse")
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    await change_everything(client)
    events = await read_events(stream, 3)
    assert [data["type"] for _, data in events] == [
        "prerecording-created",
        "prerecording-updated",
        "prerecording-deleted",
    ]
    ids = [event_id for event_id, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == 3
    created = events[0][1]
    assert created["createdAt"].endswith("Z")
    item = created["data"]["prerecording"]
    assert item["event"] == EVENT and item["start"] == "2024-01-01T00:00:00" and item["size"] == 100
    contract.check("PrerecordingCreatedEvent", created)
    listing = await (await client.get(f"/prerecordings/{EVENT}")).json()
    assert listing["count"] == 0
    assert events[2][1]["data"] == {"prerecording": {"event": EVENT, "start": "2024-01-01T00:00:00"}}
    stream.close()


async def test_stream_starts_with_retry_and_sends_keepalive_comments(client) -> None:
    stream = await client.get("/sse")  # the test settings ping every second
    first = await asyncio.wait_for(stream.content.readline(), 5)
    assert first.startswith(b"retry: ")
    lines = []
    async with asyncio.timeout(5):
        while not any(line.startswith(b":") for line in lines):
            lines.append(await stream.content.readline())
    stream.close()


@pytest.mark.parametrize(
    "types", ["prerecording-created,prerecording-deleted", '["prerecording-created","prerecording-deleted"]']
)
async def test_types_filter(client, types: str) -> None:
    stream = await client.get("/sse", params={"types": types})
    await change_everything(client)
    events = await read_events(stream, 2)
    assert [data["type"] for _, data in events] == ["prerecording-created", "prerecording-deleted"]
    stream.close()


@pytest.mark.parametrize("types", ["", "prerecording-renamed", "prerecording-created,", "[]", '["x"]', "[1]"])
async def test_bad_types_is_400(client, types: str) -> None:
    response = await client.get("/sse", params={"types": types})
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert "types" in (await response.json())["detail"]


async def test_change_through_one_instance_reaches_a_subscriber_of_another(
    aiohttp_client, settings, database_url, client
) -> None:
    other = await aiohttp_client(create_app(settings, database_url))
    stream = await other.get("/sse")
    assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 201
    [(_, data)] = await read_events(stream, 1)
    assert data["type"] == "prerecording-created"
    stream.close()


async def test_last_event_id_replays_what_was_missed_then_goes_live(client) -> None:
    stream = await client.get("/sse")
    await client.put(KEY, data=ogg(100), headers=OGG)
    [(first_id, _)] = await read_events(stream, 1)
    stream.close()

    await client.put(KEY, data=ogg(200), headers=OGG)
    await client.delete(KEY)
    await client.put(KEY, data=ogg(300), headers=OGG)

    resumed = await client.get("/sse", headers={"Last-Event-ID": str(first_id)})
    replayed = await read_events(resumed, 3)
    assert [data["type"] for _, data in replayed] == [
        "prerecording-updated",
        "prerecording-deleted",
        "prerecording-created",
    ]
    await client.put(KEY, data=ogg(400), headers=OGG)
    [(live_id, live)] = await read_events(resumed, 1)
    assert live["type"] == "prerecording-updated" and live_id > replayed[-1][0]
    resumed.close()

    by_query = await client.get("/sse", params={"lastEventId": str(first_id), "types": "prerecording-deleted"})
    [(_, only)] = await read_events(by_query, 1)
    assert only["type"] == "prerecording-deleted"
    by_query.close()


async def test_last_event_id_from_the_future_goes_live(client) -> None:
    stream = await client.get("/sse", headers={"Last-Event-ID": "999999"})
    await client.put(KEY, data=ogg(100), headers=OGG)
    [(_, data)] = await read_events(stream, 1)
    assert data["type"] == "prerecording-created"
    stream.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "9" * 5000, "99999999999999999999"])
async def test_non_numeric_last_event_id_is_400(client, value: str) -> None:
    response = await client.get("/sse", headers={"Last-Event-ID": value})
    assert response.status == 400
    assert "Last-Event-ID" in (await response.json())["detail"]


async def test_repeated_types_add_up_and_a_repeated_last_event_id_is_400(client) -> None:
    stream = await client.get("/sse?types=prerecording-created&types=prerecording-deleted")
    await change_everything(client)
    assert [data["type"] for _, data in await read_events(stream, 2)] == [
        "prerecording-created",
        "prerecording-deleted",
    ]
    stream.close()
    response = await client.get("/sse?lastEventId=1&lastEventId=garbage")
    assert response.status == 400 and "lastEventId is given 2 times" in (await response.json())["detail"]
    response = await client.get("/sse", headers=[("Last-Event-ID", "1"), ("Last-Event-ID", "2")])
    assert response.status == 400 and "Last-Event-ID is given 2 times" in (await response.json())["detail"]


async def test_a_stalled_subscriber_is_dropped_while_others_keep_receiving(client, app, database_url) -> None:
    import socket

    from prerec.events import BROADCASTER

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((client.host, client.port))
    stalled.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
    reading = await client.get("/sse")
    broadcaster = app[BROADCASTER]
    while len(broadcaster.subscribers) < 2:
        await asyncio.sleep(0.01)

    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO events (type, data)
            SELECT 'prerecording-deleted',
                   jsonb_build_object('prerecording', jsonb_build_object('n', n, 'pad', repeat('x', 200)))
            FROM generate_series(1, 5000) AS n
            """
        )
        await conn.execute("SELECT pg_notify('prerec_events', 'bulk')")
    finally:
        await conn.close()

    events = await read_events(reading, 5000, timeout=30)
    assert [data["data"]["prerecording"]["n"] for _, data in events] == list(range(1, 5001))
    assert len(broadcaster.subscribers) == 1, "the stalled subscriber is still registered"
    # Its connection was closed: what the kernel buffered ends, then EOF or a reset.
    stalled.setblocking(False)
    total = 0
    async with asyncio.timeout(10):
        while True:
            try:
                data = stalled.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            total += len(data)
    assert total < 5000 * 250
    stalled.close()
    reading.close()


async def test_a_last_event_id_older_than_the_log_replays_what_is_kept_then_goes_live(
    client, app, database_url
) -> None:
    import asyncpg

    from prerec import db
    from prerec.events import BROADCASTER

    def on(day: int) -> str:
        return f"/prerecordings/{EVENT}/2024-01-0{day}T00:00"

    stream = await client.get("/sse")
    for day in (1, 2, 3):
        assert (await client.put(on(day), data=ogg(100), headers=OGG)).status == 201
    first, second, third = [event_id for event_id, _ in await read_events(stream, 3)]
    stream.close()

    async def prune(*ids: int) -> None:
        """Age the given events past the retention, then prune as every replica does."""
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE events SET created_at = now() - interval '2 days' WHERE id = any($1)", ids)
            assert await db.prune_events(conn, 86400, 1000) == len(ids)
        finally:
            await conn.close()

    # Seen the first, missed the second (pruned since) and the third (still kept).
    await prune(first, second)
    resumed = await client.get("/sse", headers={"Last-Event-ID": str(first)})
    [(replayed, data)] = await read_events(resumed, 1)
    assert replayed == third and data["data"]["prerecording"]["start"] == "2024-01-03T00:00:00"
    assert (await client.delete(on(1))).status == 204
    [(live, data)] = await read_events(resumed, 1)
    assert live > third and data["type"] == "prerecording-deleted"
    resumed.close()

    # Everything after the id is pruned: nothing to replay, and the stream goes live at once,
    # without waiting for a change (nor asking the log again and again until one comes).
    await prune(third, live)
    resumed = await client.get("/sse", headers={"Last-Event-ID": str(first)})
    broadcaster = app[BROADCASTER]
    await wait_for(lambda: broadcaster.streams <= broadcaster.subscribers)
    assert (await client.delete(on(2))).status == 204
    [(live, data)] = await read_events(resumed, 1)
    assert data["type"] == "prerecording-deleted"
    assert data["data"]["prerecording"]["start"] == "2024-01-02T00:00:00"
    resumed.close()


async def test_the_subscriber_gauge_drops_within_a_second_or_two_of_a_client_leaving(
    tmp_path, storage_env, replicas
) -> None:
    # A real server: the test client's server cancels a handler whose client left, which
    # aiohttp does not do by default. Pings only every 30 s: a failed ping cannot be what
    # notices the client has gone.
    replica = Replica({**storage_env, "PREREC_SSE_PING_SECONDS": "30"}, free_port(), tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready()
    async with aiohttp.ClientSession() as session:

        async def subscribers() -> float:
            async with session.get(f"{replica.url}/metrics") as response:
                return sample(await response.text(), "prerec_sse_subscribers")

        async def none_left() -> bool:
            return await subscribers() == 0

        stream = await session.get(f"{replica.url}/sse")
        assert (await stream.content.readline()).startswith(b"retry: ")
        assert await subscribers() == 1
        stream.close()
        await wait_for(none_left, timeout=2.0)


# Upload events: only for subscribers that name them

UPLOAD_TYPES = "upload-progress,upload-cancelled,upload-expired"
TUS = {"Tus-Resumable": "1.0.0"}
TUS_PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


async def create_upload(client, length: int, start: str = "2026-12-01T20:00") -> str:  # type: ignore[no-untyped-def]
    pairs = {"event": EVENT, "start": start, "filetype": "audio/ogg"}
    metadata = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())
    response = await client.post("/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata})
    assert response.status == 201, await response.text()
    return response.headers["Location"]


async def read_until(stream, event_type: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The data of every message up to the first of `event_type`, that one included."""
    events: list[dict] = []
    while not events or events[-1]["type"] != event_type:
        [(_, data)] = await read_events(stream, 1)
        events.append(data)
    return events


async def test_upload_events_reach_only_the_subscribers_that_name_them(
    aiohttp_client, settings, database_url, client
) -> None:
    default = await client.get("/sse")
    everything = await client.get("/sse", params={"types": ",".join(EVENT_TYPES)})
    # Through the event log, so across replicas: this one subscribes to another instance.
    other = await aiohttp_client(create_app(settings, database_url))
    uploads = await other.get("/sse", params={"types": UPLOAD_TYPES})
    assert uploads.status == 200
    location = await create_upload(client, 3000)
    patched = await client.patch(location, data=ogg(1000), headers={**TUS_PATCH, "Upload-Offset": "0"})
    assert patched.status == 204
    assert (await client.delete(location, headers=TUS)).status == 204
    assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 201

    # A subscriber that names no types sees exactly the stream it saw before uploads had events.
    [(_, first)] = await read_events(default, 1)
    assert first["type"] == "prerecording-created"
    told = await read_until(uploads, "upload-cancelled")
    assert {data["type"] for data in told[:-1]} == {"upload-progress"}
    creation, cancelled = told[0], told[-1]
    upload = creation["data"]["upload"]
    assert upload == {
        "event": EVENT,
        "start": "2026-12-01T20:00:00",
        "offset": 0,
        "length": 3000,
        "started": upload["started"],
        "progressed": upload["started"],
    }
    assert cancelled["data"]["upload"]["offset"] == 1000
    contract.check("UploadProgressEvent", creation)
    contract.check("UploadCancelledEvent", cancelled)
    contract.check("ChangeEvent", cancelled)
    # The control: naming every type, the same changes come as upload events, then the PUT's.
    seen = await read_until(everything, "prerecording-created")
    assert seen[:-1] == told
    for stream in (default, everything, uploads):
        stream.close()


async def test_a_resume_is_told_at_once_with_the_offset_it_resumes_from(client) -> None:
    location = await create_upload(client, 3000)
    patched = await client.patch(location, data=ogg(1000), headers={**TUS_PATCH, "Upload-Offset": "0"})
    assert patched.status == 204
    await asyncio.sleep(db.PROGRESS_EVENT_SECONDS)  # past the cadence: nothing folds the resume away
    stream = await client.get("/sse", params={"types": "upload-progress"})
    assert (await stream.content.readline()).startswith(b"retry: ")
    # The PATCH's head only: it has the upload, no byte of its body has come.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 1000\r\nContent-Length: 2000\r\n\r\n".encode()
    )
    await writer.drain()
    [(_, resumed)] = await read_events(stream, 1)
    assert resumed["type"] == "upload-progress" and resumed["data"]["upload"]["offset"] == 1000
    writer.write(b"\x00" * 2000)
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 204")
    writer.close()
    stream.close()


@pytest.mark.parametrize("cadence", [True, False], ids=["cadence", "without-cadence"])
async def test_progress_is_told_at_most_once_a_second_per_upload(client, monkeypatch, cadence: bool) -> None:
    if not cadence:  # the negative control: every resume and commit of the same PATCHes told
        monkeypatch.setattr(db, "PROGRESS_EVENT_SECONDS", 0.0)
    stream = await client.get("/sse", params={"types": "upload-progress,prerecording-created"})
    pieces, size = 12, 100
    location = await create_upload(client, pieces * size)
    for index in range(pieces):
        response = await client.patch(
            location, data=ogg(size), headers={**TUS_PATCH, "Upload-Offset": str(index * size)}
        )
        assert response.status == 204, await response.text()
    told = [data for data in await read_until(stream, "prerecording-created") if data["type"] == "upload-progress"]
    offsets = [data["data"]["upload"]["offset"] for data in told]
    assert offsets == sorted(offsets) and offsets[0] == 0
    if not cadence:
        assert len(told) == 1 + 2 * pieces  # the creation, then each PATCH's resume and its commit
        return
    moments = [datetime.fromisoformat(data["createdAt"]) for data in told]
    assert all(later - earlier >= timedelta(seconds=1) for earlier, later in itertools.pairwise(moments))
    assert len(told) < 1 + 2 * pieces
    stream.close()


async def test_cancelled_and_expired_uploads_are_told_and_replayed_after_a_last_event_id(
    client, app, database_url
) -> None:
    from prerec.uploads.engine import ENGINE

    stream = await client.get("/sse", params={"types": UPLOAD_TYPES})
    cancelled = await create_upload(client, 100, "2026-12-01T20:00")
    [(seen, _)] = await read_events(stream, 1)
    stream.close()
    assert (await client.delete(cancelled, headers=TUS)).status == 204
    expired = await create_upload(client, 200, "2026-12-01T21:00")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE uploads SET expires_at = now() - interval '1 s' WHERE id = $1", uuid.UUID(expired.rsplit("/")[-1])
        )
    finally:
        await conn.close()
    await app[ENGINE].sweep()
    resumed = await client.get(
        "/sse", params={"types": "upload-cancelled,upload-expired"}, headers={"Last-Event-ID": str(seen)}
    )
    replayed = [data for _, data in await read_events(resumed, 2)]
    assert [(data["type"], data["data"]["upload"]["start"]) for data in replayed] == [
        ("upload-cancelled", "2026-12-01T20:00:00"),
        ("upload-expired", "2026-12-01T21:00:00"),
    ]
    contract.check("UploadExpiredEvent", replayed[1])
    resumed.close()


# Parsing the stream's query and headers, from plain mappings

ALL = frozenset(EVENT_TYPES)
PRERECORDINGS = frozenset(PRERECORDING_EVENT_TYPES)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], PRERECORDINGS),
        ([("types", ",".join(EVENT_TYPES))], ALL),
        ([("types", "upload-progress")], {"upload-progress"}),
        ([("types", "prerecording-created")], {"prerecording-created"}),
        ([("types", "prerecording-created, prerecording-deleted")], {"prerecording-created", "prerecording-deleted"}),
        ([("types", '["prerecording-updated"]')], {"prerecording-updated"}),
        (
            [("types", "prerecording-created"), ("types", '["prerecording-deleted"]')],
            {"prerecording-created", "prerecording-deleted"},
        ),
        ([("types", "prerecording-created"), ("types", "prerecording-created")], {"prerecording-created"}),
    ],
)
def test_parse_types(pairs: list[tuple[str, str]], expected: set[str]) -> None:
    assert parse_types(MultiDict(pairs)) == expected


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([], [], None),
        ([("Last-Event-ID", "5")], [], 5),
        ([("last-event-id", "5")], [], 5),
        ([], [("lastEventId", "7")], 7),
        ([], [("lastEventId", " 7 ")], 7),
        # A reconnecting EventSource sends the header and keeps its first URL: the header wins.
        ([("Last-Event-ID", "9")], [("lastEventId", "7")], 9),
    ],
)
def test_parse_last_event_id(headers, query, expected) -> None:  # type: ignore[no-untyped-def]
    assert parse_last_event_id(CIMultiDict(headers), MultiDict(query)) == expected


@pytest.mark.parametrize(
    ("headers", "query", "named"),
    [
        ([("Last-Event-ID", "1"), ("Last-Event-ID", "1")], [], "Last-Event-ID is given 2 times"),
        ([], [("lastEventId", "1"), ("lastEventId", "2")], "lastEventId is given 2 times"),
        ([("Last-Event-ID", "\u0661")], [], "Last-Event-ID"),
        ([], [("lastEventId", "\u0661\u0662")], "lastEventId"),
        ([], [("lastEventId", "\u20037")], "lastEventId"),  # an em space is no optional whitespace
        ([("Last-Event-ID", "9" * 4301)], [], "Last-Event-ID"),
        ([], [("lastEventId", "1_0")], "lastEventId"),
    ],
)
def test_parse_last_event_id_refuses(headers, query, named: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Problem) as refused:
        parse_last_event_id(CIMultiDict(headers), MultiDict(query))
    assert refused.value.status == 400 and named in refused.value.detail
