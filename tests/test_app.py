"""The process lifecycle: graceful shutdown on SIGTERM (real processes)."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import aiohttp

from tests.conftest import EVENT, Replica, free_port, ogg, put_head, read_events, wait_for

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


async def test_sigterm_ends_streams_finishes_uploads_and_exits_0(tmp_path, storage_env, replicas) -> None:
    env = {**storage_env, "PREREC_SHUTDOWN_TIMEOUT_SECONDS": "10"}
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    replicas.append(replica)
    replica.wait_ready()

    async with aiohttp.ClientSession() as session:
        stream = await session.get(f"{replica.url}/sse")
        assert (await asyncio.wait_for(stream.content.readline(), 5)).startswith(b"retry:")

        body = ogg(4 * 1024 * 1024, b"s")
        half = len(body) // 2
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        writer.write(put_head(KEY, len(body)))
        writer.write(body[:half])
        await writer.drain()
        # An idle keep-alive connection, as a load balancer's pool holds them.
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", replica.port)
        idle_writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 204")
        await asyncio.sleep(0.3)

        replica.process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        # The event stream ends promptly...
        async with asyncio.timeout(3):
            while await stream.content.readline():
                pass
        assert time.monotonic() - began < 3

        # The replica is no longer ready, and a new request on the kept-alive connection is
        # sent elsewhere, not half-served.
        idle_writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        head = (await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)).decode()
        assert head.startswith("HTTP/1.1 503") and "Retry-After" in head
        idle_writer.close()

        # ...while the upload's remaining bytes still arrive and are stored.
        await asyncio.sleep(0.5)
        writer.write(body[half:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 201"), status_line
        writer.close()

    exit_code = await asyncio.to_thread(replica.process.wait, 15)
    assert exit_code == 0, replica.log.read_text()
    assert time.monotonic() - began < 10

    successor = Replica(env, free_port(), tmp_path / "successor.log")
    replicas.append(successor)
    successor.wait_ready()
    async with aiohttp.ClientSession() as session:
        assert await (await session.get(f"{successor.url}{KEY}")).read() == body


async def test_sigterm_cuts_an_upload_that_outlasts_the_timeout(tmp_path, storage_env, replicas) -> None:
    env = {**storage_env, "PREREC_SHUTDOWN_TIMEOUT_SECONDS": "1"}
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    replicas.append(replica)
    replica.wait_ready()
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    writer.write(put_head(KEY, 1_000_000) + b"OggS")
    await writer.drain()
    await asyncio.sleep(0.3)
    began = time.monotonic()
    replica.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(replica.process.wait, 15) == 0
    assert time.monotonic() - began < 5
    writer.close()
    assert list((tmp_path / "storage" / "tmp").glob("*")) == []


async def test_workers_share_one_port_and_stop_together(tmp_path, storage_env, replicas) -> None:
    import psutil

    replica = Replica({**storage_env, "PREREC_WORKERS": "2"}, free_port(), tmp_path / "workers.log")
    replicas.append(replica)
    replica.wait_ready()
    workers = psutil.Process(replica.process.pid).children()
    assert len(workers) == 2

    def listening() -> list[int]:
        return [
            worker.pid
            for worker in workers
            if any(c.laddr.port == replica.port and c.status == "LISTEN" for c in worker.net_connections())
        ]

    await wait_for(lambda: len(listening()) == 2, timeout=20)  # the second may still be starting

    async with aiohttp.ClientSession() as session:
        streams = [await session.get(f"{replica.url}/sse") for _ in range(8)]  # spread over both
        assert (await session.put(f"{replica.url}{KEY}", data=ogg(1000), headers=OGG)).status == 201
        for stream in streams:
            [(_, data)] = await read_events(stream, 1)
            assert data["type"] == "prerecording-created"
            stream.close()

        # Metrics count for the whole replica, whichever worker answers the scrape.
        for _ in range(40):
            async with aiohttp.ClientSession() as fresh:  # a new connection each: both workers serve
                assert (await fresh.get(f"{replica.url}/ping")).status == 204
        for _ in range(4):
            async with aiohttp.ClientSession() as fresh:
                text = await (await fresh.get(f"{replica.url}/metrics")).text()
            [pings] = re.findall(r'prerec_http_requests_total\{[^}]*route="/ping"[^}]*\} (\S+)', text)
            assert float(pings) >= 40, text[:2000]

    replica.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(replica.process.wait, 20) == 0
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
