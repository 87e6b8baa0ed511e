"""Three replica processes on one database and one store (a folder, or a bucket), behind a real nginx."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import EVENT, ROOT, Replica, free_port, ogg, read_events

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs nginx-light)")
OGG = {"Content-Type": "audio/ogg"}


def documented_nginx_block() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    return re.search(r"```nginx\n(.*?)```", text, re.DOTALL).group(1)  # type: ignore[union-attr]


# Run on a shared folder and on a shared bucket (conftest.pytest_generate_tests).
BACKENDS = ("fs", "s3")


def nginx_config(tmp_path: Path, listen: int, upstreams: list[int]) -> Path:
    block = documented_nginx_block()
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in upstreams)
    block = re.sub(r"(upstream prerec \{\n)(?:    server [^\n]+\n)+", lambda m: m.group(1) + servers, block)
    block = block.replace("listen 10600;", f"listen 127.0.0.1:{listen};")
    config = tmp_path / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    config.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx-error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp_path}/body;\nproxy_temp_path {tmp_path}/proxy;\n"
        f"{block}\n}}\n"
    )
    return config


@pytest.fixture
def fleet(tmp_path, storage_env, replicas):  # type: ignore[no-untyped-def]
    ports = [free_port() for _ in range(3)]
    for index, port in enumerate(ports):
        replicas.append(Replica(storage_env, port, tmp_path / f"replica{index}.log"))
    for replica in replicas:
        replica.wait_ready()
    listen = free_port()
    nginx = subprocess.Popen([NGINX, "-c", str(nginx_config(tmp_path, listen, ports))], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            break
        except OSError:
            if nginx.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nginx did not start: {nginx.stderr.read() if nginx.stderr else ''}") from None
            time.sleep(0.05)
    yield f"http://127.0.0.1:{listen}", [replica.url for replica in replicas]
    nginx.terminate()
    nginx.wait(10)


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
