"""Three replica processes on one database and one store (a folder, or a bucket), behind a real nginx."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import EVENT, NGINX, ogg, read_events

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs nginx-light)")
OGG = {"Content-Type": "audio/ogg"}


# Run on a shared folder and on a shared bucket (conftest.pytest_generate_tests).
BACKENDS = ("fs", "s3")


async def test_an_upload_through_nginx_reaches_every_subscriber(fleet) -> None:
    balancer, direct = fleet
    key = f"{balancer}/prerecordings/{EVENT}/2024-01-01T00:00"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        streams = [await session.get(f"{url}/sse") for url in [balancer, *direct]]
        for stream in streams:
            assert (await asyncio.wait_for(stream.content.readline(), 10)).startswith(b"retry:")

        async def chunks():  # type: ignore[no-untyped-def]
            body = ogg(5 * 1024 * 1024, b"n")
            for i in range(0, len(body), 256 * 1024):
                yield body[i : i + 256 * 1024]

        response = await session.put(key, data=chunks(), headers=OGG)
        assert response.status == 201
        for stream in streams:
            [(_, data)] = await read_events(stream, 1)
            assert data["type"] == "prerecording-created"
            assert data["data"]["prerecording"]["size"] == 5 * 1024 * 1024
        for url in direct:  # every replica serves the same bytes
            assert await (await session.get(f"{url}/prerecordings/{EVENT}/2024-01-01T00:00")).read() == ogg(
                5 * 1024 * 1024, b"n"
            )
        for stream in streams:
            stream.close()


async def test_a_subscriber_resuming_through_nginx_gets_exactly_what_it_missed(fleet) -> None:
    balancer, _ = fleet
    key = f"{balancer}/prerecordings/{EVENT}/2024-01-01T00:00"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        stream = await session.get(f"{balancer}/sse")
        assert (await session.put(key, data=ogg(100), headers=OGG)).status == 201
        [(last_id, _)] = await read_events(stream, 1)
        stream.close()

        missed = []
        for size in (200, 300):
            assert (await session.put(key, data=ogg(size), headers=OGG)).status == 204
            missed.append(("prerecording-updated", size))
        assert (await session.delete(key)).status == 204
        missed.append(("prerecording-deleted", None))

        # Each reconnect may land on any replica: try it several times.
        for _ in range(3):
            resumed = await session.get(f"{balancer}/sse", headers={"Last-Event-ID": str(last_id)})
            events = await read_events(resumed, 3)
            got = [(data["type"], data["data"]["prerecording"].get("size")) for _, data in events]
            assert got == missed
            ids = [event_id for event_id, _ in events]
            assert ids == sorted(ids) and ids[0] > last_id
            resumed.close()

        resumed = await session.get(f"{balancer}/sse", headers={"Last-Event-ID": str(ids[-1])})
        assert (await session.put(key, data=ogg(400), headers=OGG)).status == 201
        [(next_id, data)] = await read_events(resumed, 1)
        assert next_id > ids[-1] and data["type"] == "prerecording-created"
        resumed.close()
