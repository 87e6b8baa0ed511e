"""Shared fixtures: one real embedded PostgreSQL per test session, a fresh database per test.

Every test database is a copy of a migrated template (CREATE DATABASE ... TEMPLATE), which
takes milliseconds, so tests never see each other's rows or events; it is dropped after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import botocore.config
import botocore.exceptions
import botocore.session
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from prerec import embedded
from prerec.__main__ import migrate
from prerec.app import create_app
from prerec.config import Settings
from tests.seaweed import Weed, free_port

ROOT = Path(__file__).resolve().parent.parent
EVENT = "0f339cb0-7ab4-43fe-852d-75708232f76c"
TEMPLATE = "prerec_template"
_numbers = itertools.count()


def ogg(size: int, fill: bytes = b"\x00") -> bytes:
    """A body that passes the Ogg check: the capture pattern, then filler."""
    return b"OggS" + (fill * (size - 4))[: size - 4]


def put_head(path: str, length: int, *extra: str, content_type: str = "audio/ogg") -> bytes:
    """The request line and headers of a raw PUT, for tests that control every byte sent."""
    lines = [f"PUT {path} HTTP/1.1", "Host: x", f"Content-Type: {content_type}", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, CIMultiDict[str], bytes]:
    """One HTTP/1.1 answer off a raw connection: its status, its headers and its body (as long
    as its Content-Length says)."""
    status_line, *fields = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
    headers: CIMultiDict[str] = CIMultiDict()
    for field in fields:
        name, _, value = field.partition(":")
        headers.add(name, value.strip(" \t"))
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return int(status_line.split()[1]), headers, body


async def created_events(database_url: str) -> int:
    """How many prerecording-created events the log holds: an upload must make exactly one."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM events WHERE type = 'prerecording-created'")
    finally:
        await conn.close()


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # Under /tmp, which the pgserver system user may traverse (it cannot enter root's home).
    server = embedded.start(tmp_path_factory.mktemp("pg"))
    yield server
    server.cleanup()


def empty_database(pg_server, name: str) -> str:  # type: ignore[no-untyped-def]
    """A new database with no schema at all, as on a first deploy."""
    base = pg_server.get_uri()

    async def create() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name}")
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return with_database(base, name)


@pytest.fixture(scope="session")
def template_url(pg_server) -> str:  # type: ignore[no-untyped-def]
    url = empty_database(pg_server, TEMPLATE)
    migrate(url)
    return url


@contextlib.asynccontextmanager
async def fresh_database(template_url: str) -> AsyncIterator[str]:
    """A copy of the migrated template, dropped on the way out."""
    name = f"test_{os.getpid()}_{next(_numbers)}"
    admin = with_database(template_url, "postgres")
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    try:
        yield with_database(template_url, name)
    finally:
        await _drop_database(admin, name)


async def _drop_database(admin: str, name: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        # FORCE (PostgreSQL >= 13): a replica the test killed, or an app whose client is
        # torn down after this fixture, may still hold connections to it.
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
def blank_database_url(pg_server) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A new database with no schema at all, as on a first deploy; dropped after the test."""
    name = f"blank_{os.getpid()}_{next(_numbers)}"
    url = empty_database(pg_server, name)
    yield url
    asyncio.run(_drop_database(pg_server.get_uri(), name))


@pytest.fixture
async def database_url(template_url: str) -> AsyncIterator[str]:
    async with fresh_database(template_url) as url:
        yield url


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    weed = Weed(tmp_path_factory.mktemp("weed"))
    weed.start()
    print(f"SeaweedFS ready in {weed.started_in:.1f} s at {weed.url}")
    yield weed
    weed.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A module that sets `BACKENDS = ("fs", "s3")` runs each of its tests that keeps blobs
    # (through the settings, app, client or storage_env fixtures) on each backend named, with
    # the same assertions.
    chosen = any("backend" in mark.args[0] for mark in metafunc.definition.iter_markers("parametrize"))
    if "backend" in metafunc.fixturenames and getattr(metafunc.module, "BACKENDS", None) and not chosen:
        metafunc.parametrize("backend", metafunc.module.BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Where the test's blobs go: "fs" (a folder, the default) or "s3" (a bucket of its own in
    the session's SeaweedFS)."""
    return getattr(request, "param", "fs")


@pytest.fixture
def bucket_env(backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """For "s3": the settings and credentials naming a new bucket (also set in this process's
    environment, where the botocore chain finds them); nothing for "fs"."""
    if backend != "s3":
        return {}
    weed: Weed = request.getfixturevalue("seaweed")
    env = {
        **weed.env,
        "PREREC_STORAGE_URL": f"s3://{weed.new_bucket()}/station",
        "PREREC_S3_ENDPOINT_URL": weed.url,
        "PREREC_S3_ADDRESSING_STYLE": "path",
    }
    for name, value in weed.env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def settings(tmp_path: Path, bucket_env: dict[str, str]) -> Settings:
    defaults = Settings.from_env(bucket_env)
    return dataclasses.replace(defaults, data_dir=tmp_path, storage_dir=tmp_path / "storage", sse_ping_seconds=1.0)


@pytest.fixture
def app(settings: Settings, database_url: str) -> web.Application:
    return create_app(settings, database_url)


class ProductionLikeServer(TestServer):
    """aiohttp's TestServer cancels a handler whose client went away; a real server does not
    (handler_cancellation is off by default since aiohttp 3.9). Tests must meet the server as
    clients do, so the handlers here run on as they would in production."""

    async def _make_runner(self, handler_cancellation: bool = False, **kwargs: Any) -> web.BaseRunner:
        return await super()._make_runner(handler_cancellation=False, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client):  # type: ignore[no-untyped-def]
    """pytest-aiohttp's, with every app served as in production (ProductionLikeServer)."""

    async def make(app_or_server, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(app_or_server, web.Application):
            app_or_server = ProductionLikeServer(app_or_server)
        return await aiohttp_client(app_or_server, **kwargs)

    return make


@pytest.fixture
async def client(app: web.Application, aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
    # The app (and so its database) first: fixtures are torn down in reverse, so the app is
    # closed before its database is dropped.
    return await aiohttp_client(app)


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """A blob in a bucket, as blob_files lists it (what a Path is for the folder)."""

    client: Any
    bucket: str
    key: str

    def read_bytes(self) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()


def _bucket(settings: Settings):  # type: ignore[no-untyped-def]
    assert settings.storage_url is not None
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    return client, settings.storage_url.bucket, settings.storage_url.prefix


def _keys(client, bucket: str, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def blob_files(settings: Settings) -> list[Any]:
    """The blobs in service: files under blobs/, or objects under blobs/ with no trash marker."""
    if settings.storage_url is None:
        return sorted(p for p in (settings.blob_dir / "blobs").rglob("*") if p.is_file())
    client, bucket, prefix = _bucket(settings)
    retired = {key.removeprefix(f"{prefix}trash/") for key in _keys(client, bucket, f"{prefix}trash/")}
    return [
        StoredObject(client, bucket, key)
        for key in _keys(client, bucket, f"{prefix}blobs/")
        if key.removeprefix(f"{prefix}blobs/") not in retired
    ]


def blob_names(settings: Settings) -> set[str]:
    """The names (as rows hold them) of the blobs in service, on either backend."""
    if settings.storage_url is None:
        return {path.relative_to(settings.blob_dir / "blobs").as_posix() for path in blob_files(settings)}
    return {stored.key.removeprefix(f"{settings.storage_url.prefix}blobs/") for stored in blob_files(settings)}


def tmp_files(settings: Settings) -> list[Any]:
    """What unfinished uploads hold: temporary files, or multipart uploads in the bucket."""
    if settings.storage_url is None:
        return sorted((settings.blob_dir / "tmp").glob("*"))
    client, bucket, prefix = _bucket(settings)
    return client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])


def upload_files(settings: Settings) -> list[Any]:
    """What resumable uploads in progress hold: segment files, or multipart uploads in the
    bucket (under blobs/uploads/, apart from plain uploads')."""
    if settings.storage_url is None:
        return sorted((settings.blob_dir / "uploads").glob("*"))
    client, bucket, prefix = _bucket(settings)
    return client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}blobs/uploads/").get("Uploads", [])


async def wait_for(condition, timeout: float = 10.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll until condition() is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def chromium_dom(url: str, tmp_path: Path, budget_ms: int) -> str:
    """The DOM of the page at `url` once headless Chromium has run it for `budget_ms` of
    virtual time (timers and network waits included)."""
    assert CHROMIUM is not None
    chromium = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return (await asyncio.wait_for(chromium.communicate(), 120))[0].decode()


TUS_JS_CLIENT = "tus-js-client@4.3.1"


@pytest.fixture(scope="session")
def tus_js_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where Node finds tus-js-client: installed from npm now, once a session (it has
    dependencies of its own, so a packed tarball is not enough); nothing is vendored."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("needs node and npm (.ci/run installs them)")
    folder = tmp_path_factory.mktemp("tus-js-client")
    install = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(folder), TUS_JS_CLIENT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return folder


class Replica:
    """A real `python -m prerec` process; `files`: its soft and hard limits on open files."""

    def __init__(self, env: dict[str, str], port: int, log: Path, files: tuple[int, int] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prerec"],
            env={**os.environ, **env, "PREREC_PORT": str(port), "PREREC_HOST": "127.0.0.1"},
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None if files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, files),
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until this replica answers /ping.

        An answer counts only once the process started here holds the port: any other server
        already on it would answer too, and the test would then run against that one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"replica exited with {self.process.returncode}:\n{self.log.read_text()}")
            if self.listening():
                try:
                    with urllib.request.urlopen(f"{self.url}/ping", timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"replica not ready within {timeout} s:\n{self.log.read_text()}")

    def listening(self) -> bool:
        """Whether the process (or, with PREREC_WORKERS > 1, one of its workers) listens on the port."""
        try:
            main = psutil.Process(self.process.pid)
            tree = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        for process in tree:
            try:
                sockets = process.net_connections("tcp")
            except psutil.NoSuchProcess:
                continue
            if any(sock.status == psutil.CONN_LISTEN and sock.laddr.port == self.port for sock in sockets):
                return True
        return False

    def exited(self, timeout: float) -> int | None:
        """Its exit code, once it has exited within `timeout`; None if it still runs."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_lines(self) -> list[dict[str, Any]]:
        """Its JSON log lines (PREREC_LOG_FORMAT=json, the default), parsed."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.kill()


@pytest.fixture
def storage_env(tmp_path: Path, database_url: str, bucket_env: dict[str, str]) -> dict[str, str]:
    return {
        "PREREC_DATABASE_URL": database_url,
        "PREREC_DATA_DIR": str(tmp_path / "data"),
        "PREREC_STORAGE_DIR": str(tmp_path / "storage"),
        "PREREC_LOG_LEVEL": "info",
        **bucket_env,
    }


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(2))
    return 0.0


async def tables(url: str) -> set[str]:
    """The tables of a database's public schema."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def read_message(response) -> dict[str, str] | None:  # type: ignore[no-untyped-def]
    """The next message of an event stream (an open aiohttp response) as its fields, comments
    skipped and data lines joined; None once the stream has ended."""
    fields: dict[str, str] = {}
    while line := (await response.content.readline()).decode():
        line = line.rstrip("\r\n")
        if not line:
            if fields:
                return fields
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
    return None


async def read_events(response, count: int, timeout: float = 10.0) -> list[tuple[int, dict]]:  # type: ignore[no-untyped-def]
    """Read `count` SSE messages with data (id and parsed data) from an open aiohttp response."""
    events: list[tuple[int, dict]] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            message = await read_message(response)
            if message is None:
                raise AssertionError(f"stream ended after {len(events)} events")
            if "data" in message:
                events.append((int(message["id"]) if "id" in message else None, json.loads(message["data"])))  # type: ignore[arg-type]
    return events


# A fleet: three replicas on one database and one storage folder, behind the repository's nginx

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def documented_nginx_block() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    return re.search(r"```nginx\n(.*?)```", text, re.DOTALL).group(1)  # type: ignore[union-attr]


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
