"""Connection policy: idle and slow clients cannot take the descriptors real requests need,
malformed requests are one log line, accept failures are not a log flood."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from prerec.connections import MAX_REQUEST_LINE, Throttled, default_max_connections, parse_error
from tests.conftest import Replica, free_port, ogg, put_head, read_answer


@pytest.fixture
def started(replicas: list[Replica], storage_env: dict[str, str], tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    def start(files: tuple[int, int] | None = None, **settings: str) -> Replica:
        env = {**storage_env, **{f"PREREC_{name.upper()}": value for name, value in settings.items()}}
        replica = Replica(env, free_port(), tmp_path / f"replica-{len(replicas)}.log", files)
        replicas.append(replica)
        replica.wait_ready()
        return replica

    yield start


async def get_ping(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await reader.read()
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(65536) == b""
    except ConnectionResetError:
        return True


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    except ConnectionResetError:
        return b"".join(chunks)
    finally:
        writer.close()


KEY = "/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-01T00:00"


# Idle and slow connections


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def flood(port: int, idle: int, slow: int) -> tuple[list[Connection], list[asyncio.Task[None]]]:
    """Open `idle` connections that send nothing and `slow` ones that trickle a request head
    that never ends (slowloris)."""

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        while not writer.is_closing():
            await asyncio.sleep(0.1)
            writer.write(b"X-Slow: 1\r\n")

    # In batches: past the listen backlog the kernel holds a handshake back for seconds
    # (SYN-ACK retries) before the server even sees it.
    connections: list[Connection] = []
    total = idle + slow
    for first in range(0, total, 50):
        batch = range(min(50, total - first))
        connections += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in batch))
        await asyncio.sleep(0.02)
    tricklers = [asyncio.create_task(trickle(writer)) for _, writer in connections[idle:]]
    return connections, tricklers


def close(connections: list[Connection], tricklers: list[asyncio.Task[None]]) -> None:
    for trickler in tricklers:
        trickler.cancel()
    for _, writer in connections:
        writer.close()


def test_a_flood_of_idle_and_slow_connections_leaves_ping_answering(started) -> None:
    """More idle and slowloris connections than the process may open files: /ping is still
    answered at once (the idle ones make room), and all of them are closed."""
    # 1024 files (systemd's default): at most (1024 - 64) / 2 = 480 connections.
    replica = started(files=(1024, 1024), header_timeout_seconds="1", keepalive_timeout_seconds="2")

    async def attack() -> None:
        connections, tricklers = await flood(replica.port, idle=1100, slow=100)
        try:
            for _ in range(3):
                async with asyncio.timeout(1):
                    assert (await get_ping(replica.port)).startswith(b"HTTP/1.1 204")
            async with asyncio.timeout(10):
                closed = await asyncio.gather(*(closed_by_server(reader) for reader, _ in connections))
            assert all(closed)
        finally:
            close(connections, tricklers)

    asyncio.run(attack())
    text = replica.log.read_text()
    assert "at most 480 connections" in text
    assert "Traceback" not in text and "Too many open files" not in text


def test_a_request_head_must_be_complete_within_the_header_timeout(started) -> None:
    replica = started(header_timeout_seconds="1", keepalive_timeout_seconds="60")

    async def clients() -> None:
        # Sends nothing.
        silent, _ = await asyncio.open_connection("127.0.0.1", replica.port)
        # Sends a head byte by byte, never ending it.
        slow, slow_writer = await asyncio.open_connection("127.0.0.1", replica.port)
        # Asks once, then starts a second head and stalls.
        again, again_writer = await asyncio.open_connection("127.0.0.1", replica.port)
        again_writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await again.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
        again_writer.write(b"GET /pi")

        async def drip() -> None:
            for byte in b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 100:
                slow_writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

        dripping = asyncio.create_task(drip())
        async with asyncio.timeout(10):
            for reader in (silent, slow, again):
                assert await closed_by_server(reader)
        assert not dripping.done(), "the slow head was cut only once it stopped arriving"
        dripping.cancel()

    asyncio.run(clients())


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(started) -> None:
    replica = started(header_timeout_seconds="60", keepalive_timeout_seconds="1")

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        for _ in range(2):
            writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
        async with asyncio.timeout(10):
            assert await closed_by_server(reader)

    asyncio.run(client())


def test_at_the_cap_an_idle_connection_makes_room_and_with_none_idle_a_new_one_gets_503(started) -> None:
    replica = started(max_connections="2")

    async def clients() -> None:
        # Two uploads under way: the "100 Continue" says each is in its handler, so busy.
        uploads = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
            writer.write(put_head(KEY, 1000, "Expect: 100-continue"))
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
            uploads.append((reader, writer))

        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        async with asyncio.timeout(5):
            status, headers, body = await read_answer(reader)
            assert status == 503 and headers["Retry-After"] == "1"
            assert json.loads(body)["detail"] == "Too many open connections."
            assert await closed_by_server(reader)
        writer.close()

        # One upload ends; its connection stays open, idle, and is the one closed for the next.
        (done, done_writer), (_, busy_writer) = uploads
        done_writer.write(ogg(1000))
        async with asyncio.timeout(5):
            assert (await read_answer(done))[0] == 201
            assert (await get_ping(replica.port)).startswith(b"HTTP/1.1 204")
            assert await closed_by_server(done)
        done_writer.close()
        busy_writer.close()

    asyncio.run(clients())
    assert "2 connections open, all busy: new connections are refused" in replica.log.read_text()


def test_the_open_file_limit_is_raised_to_the_hard_one_and_sets_the_default_cap(started) -> None:
    replica = started(files=(256, 1088))
    assert "at most 512 connections (open file limit 1088)" in replica.log.read_text()


def test_accept_failures_are_logged_once_per_interval(started) -> None:
    """With a cap set above what the open file limit allows, accepts fail: asyncio would log a
    traceback for each (thousands a second); one line says it."""
    replica = started(files=(128, 128), max_connections="1000")

    async def attack() -> None:
        connections, tricklers = await flood(replica.port, idle=200, slow=0)
        await asyncio.sleep(3)
        close(connections, tricklers)
        async with asyncio.timeout(10):
            while True:
                try:
                    async with asyncio.timeout(1):
                        if (await get_ping(replica.port)).startswith(b"HTTP/1.1 204"):
                            return
                except (TimeoutError, ConnectionError):
                    pass

    asyncio.run(attack())
    text = replica.log.read_text()
    assert "Traceback" not in text
    # By the message's start: the test's own folder name (in the start lines) holds "accept" too.
    lines = [line["message"] for line in replica.log_lines() if line["message"].startswith("cannot accept")]
    # One line; if the flood outlasted the interval, one summary of the lines left out may follow.
    assert lines[0] == "cannot accept connections: [Errno 24] Too many open files"
    assert len(lines) <= 2 and all("more like it in" in line for line in lines[1:]), lines


# Malformed requests


def test_malformed_requests_get_one_line_and_a_precise_status(started) -> None:
    replica = started()
    head = f"PUT {KEY} HTTP/1.1\r\nHost: x\r\nContent-Type: audio/ogg\r\n"
    cases = [
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", 431, "header field"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, "too many header fields"),
        (f"{head}Content-Length: 4\r\nContent-Length: 5\r\n\r\nOggS".encode(), 400, "Duplicate Content-Length"),
        (f"{head}Transfer-Encoding: chunked\r\n\r\n4\r\nOggS\r\nzz\r\n".encode(), 400, "chunk size"),
    ]
    for data, status, detail in cases:
        answer = asyncio.run(exchange(replica.port, data))
        head_bytes, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] %d " % status, head_bytes), head_bytes
        assert b"application/problem+json" in head_bytes
        problem = json.loads(body)
        assert problem["status"] == status and detail in problem["detail"]
    text = replica.log.read_text()
    assert "Traceback" not in text
    warnings = [line for line in replica.log_lines() if line["level"] == "WARNING"]
    assert [line["message"].split(" answered ")[1][:3] for line in warnings] == ["431", "414", "431", "400", "400"]


# Pure parts


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (LineTooLong(b"/aaa...", MAX_REQUEST_LINE), 414),
        (LineTooLong(b"aaa...", MAX_REQUEST_LINE - 2), 431),
        (BadHttpMessage("Too many headers received"), 431),
        (BadHttpMessage("Invalid character in chunk size:\n\n  b'zz'\n  ^"), 400),
    ],
)
def test_parse_error_status(error: BadHttpMessage, status: int) -> None:
    found, detail = parse_error(error, MAX_REQUEST_LINE)
    assert found == status and "\n" not in detail


@pytest.mark.parametrize(
    ("limit", "cap"),
    [(256, 96), (1024, 480), (20000, 9968), (1 << 20, 10000), (resource.RLIM_INFINITY, 10000), (64, 1)],
)
def test_default_cap_keeps_descriptors_for_files_and_the_rest(limit: int, cap: int) -> None:
    assert default_max_connections(limit) == cap


async def test_throttled_logs_one_line_per_interval_and_counts_the_rest(caplog) -> None:
    throttled = Throttled(logging.getLogger("test.throttled"), interval=0.2)
    with caplog.at_level(logging.WARNING, "test.throttled"):
        for attempt in range(1000):
            throttled.warning("failed %d", attempt)
        await asyncio.sleep(0.3)
        throttled.warning("failed again")
    assert [record.getMessage() for record in caplog.records] == [
        "failed 0",
        "failed 999 (and 998 more like it in 0.2 s)",
    ]
