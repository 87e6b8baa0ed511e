"""A database restart under live traffic: 503s while it is down, recovery without a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from prerec import embedded
from prerec.__main__ import migrate
from prerec.app import create_app
from tests.conftest import EVENT, ogg, read_events

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


@pytest.fixture
def own_server(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A PostgreSQL of this test's own, which it may stop and start."""
    server = embedded.start(tmp_path_factory.mktemp("outage"))
    migrate(server.get_uri())
    yield server
    with server._lock:
        server.ensure_postgres_running()
    server.cleanup()


def stop(server) -> None:  # type: ignore[no-untyped-def]
    server.stop()


def start(server) -> None:  # type: ignore[no-untyped-def]
    with server._lock:
        server.ensure_postgres_running()


async def test_database_restart_under_a_subscriber(aiohttp_client, settings, own_server) -> None:
    import dataclasses

    settings = dataclasses.replace(settings, db_timeout_seconds=2.0)
    client = await aiohttp_client(create_app(settings, own_server.get_uri()))
    stream = await client.get("/sse")
    assert (await client.put(KEY, data=ogg(100, b"1"), headers=OGG)).status == 201
    [(before_id, _)] = await read_events(stream, 1)

    await asyncio.to_thread(stop, own_server)

    began = time.monotonic()
    response = await client.put(KEY, data=ogg(100, b"2"), headers=OGG)
    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()
    assert response.content_type == "application/problem+json"
    for path in (KEY, f"/prerecordings/{EVENT}"):
        assert (await client.get(path)).status == 503
    assert (await client.delete(KEY)).status == 503
    resume = await client.get("/sse", headers={"Last-Event-ID": str(before_id)})
    assert resume.status == 503
    assert time.monotonic() - began < 4 * settings.db_timeout_seconds
    assert (await client.get("/ping")).status == 204

    await asyncio.to_thread(start, own_server)

    deadline = time.monotonic() + 20
    while (status := (await client.put(KEY, data=ogg(100, b"3"), headers=OGG)).status) != 204:
        assert status == 503, status
        assert time.monotonic() < deadline, "uploads did not recover"
        await asyncio.sleep(0.2)
    assert (await client.delete(KEY)).status == 204

    # The stream stayed open and delivers what happened after the restart, once each.
    events = await read_events(stream, 2, timeout=20)
    assert [data["type"] for _, data in events] == ["prerecording-updated", "prerecording-deleted"]
    assert before_id < events[0][0] < events[1][0]
    assert (await client.get(KEY)).status == 404

    # A subscriber resuming with its last id gets the same, and nothing twice.
    resumed = await client.get("/sse", headers={"Last-Event-ID": str(before_id)})
    again = await read_events(resumed, 2)
    assert [event_id for event_id, _ in again] == [event_id for event_id, _ in events]
    resumed.close()
    stream.close()
