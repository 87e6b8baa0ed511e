"""GET /sse: one message per change, filtered by type, across app instances, resumable."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from multidict import CIMultiDict, MultiDict

from prerec.app import create_app
from prerec.model import EVENT_TYPES
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


# Parsing the stream's query and headers, from plain mappings

ALL = frozenset(EVENT_TYPES)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], ALL),
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
