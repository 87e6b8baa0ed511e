"""Downloads as players make them, including the ones they give up on half way (and what the
access log and the metrics say of those)."""

from __future__ import annotations

import asyncio
import logging
import socket

from tests.conftest import EVENT, ogg, sample, wait_for

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
ROUTE = "/prerecordings/{event}/{start}"
SIZE = 16 * 1024 * 1024  # far more than the kernel buffers hold between the two ends


async def aborted_downloads(client) -> float:  # type: ignore[no-untyped-def]
    metrics = await (await client.get("/metrics")).text()
    return sample(metrics, "prerec_http_requests_total", route=ROUTE, method="GET", status="aborted")


async def test_a_client_leaving_mid_download_is_counted_as_aborted_and_harms_nothing(client, caplog) -> None:
    body = ogg(SIZE, b"\x01\x02\x03")
    assert (await client.put(KEY, data=body, headers={"Content-Type": "audio/ogg"})).status == 201

    caplog.set_level(logging.INFO)
    player = socket.socket()
    # A small receive window keeps the server's sendfile far from done when the player leaves.
    player.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    player.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(player, (client.host, client.port))
    await loop.sock_sendall(player, f"GET {KEY} HTTP/1.1\r\nHost: x\r\nX-Request-ID: leaver-1\r\n\r\n".encode())
    received = b""
    while len(received) < 100_000:
        received += await loop.sock_recv(player, 65536)
    assert received.startswith(b"HTTP/1.1 200")
    # Closing with unread data resets the connection, as a player seeking elsewhere does.
    player.close()

    await wait_for(lambda: aborted_downloads(client))
    assert await aborted_downloads(client) == 1
    [access] = [record for record in caplog.records if getattr(record, "request_id", None) == "leaver-1"]
    assert access.name == "prerec.access" and access.aborted is True  # type: ignore[attr-defined]
    assert access.status == 200  # type: ignore[attr-defined]
    # What went out, not the declared length: at least what the player read, far from all of it.
    assert len(received) <= access.bytes < SIZE / 2  # type: ignore[attr-defined]
    metrics = await (await client.get("/metrics")).text()
    assert 0 < sample(metrics, "prerec_downloaded_bytes_total") < SIZE / 2
    assert [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR] == []

    # The server is as healthy as before: it serves the whole file to the next player.
    assert (await client.get("/ready")).status == 200
    assert await (await client.get(KEY)).read() == body
    assert await aborted_downloads(client) == 1
