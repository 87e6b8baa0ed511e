"""A database restart under live traffic: 503s while it is down, recovery without a restart."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from prerec import embedded
from prerec.__main__ import migrate, worker_stop_bound
from prerec.app import create_app
from prerec.config import Settings
from tests.conftest import EVENT, Replica, blob_files, free_port, ogg, read_events, wait_for

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
    assert len(blob_files(settings)) == 1, "a refused upload left its blob behind"
    assert response.headers["Retry-After"].isdigit()
    assert response.content_type == "application/problem+json"
    for path in (KEY, f"/prerecordings/{EVENT}"):
        assert (await client.get(path)).status == 503
    assert (await client.delete(KEY)).status == 503
    resume = await client.get("/sse", headers={"Last-Event-ID": str(before_id)})
    assert resume.status == 503
    assert time.monotonic() - began < 4 * settings.db_timeout_seconds
    assert (await client.get("/ping")).status == 204
    not_ready = await client.get("/ready")
    assert not_ready.status == 503 and "database" in (await not_ready.json())["detail"]

    await asyncio.to_thread(start, own_server)

    deadline = time.monotonic() + 20
    while (status := (await client.put(KEY, data=ogg(100, b"3"), headers=OGG)).status) != 204:
        assert status == 503, status
        assert time.monotonic() < deadline, "uploads did not recover"
        await asyncio.sleep(0.2)
    assert (await client.delete(KEY)).status == 204
    deadline = time.monotonic() + 10
    while (await client.get("/ready")).status != 200:
        assert time.monotonic() < deadline, "not ready again after the database came back"
        await asyncio.sleep(0.2)

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


def _freeze(server, signum) -> None:  # type: ignore[no-untyped-def]
    import psutil

    postmaster = psutil.Process(server.get_pid())
    for process in [postmaster, *postmaster.children(recursive=True)]:
        process.send_signal(signum)


async def test_a_hung_database_never_holds_a_request_past_the_timeout(aiohttp_client, settings, own_server) -> None:
    """Not down but frozen (SIGSTOP): connections neither fail nor answer."""
    import dataclasses

    settings = dataclasses.replace(settings, db_timeout_seconds=1.0)
    client = await aiohttp_client(create_app(settings, own_server.get_uri()))
    assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 201
    _freeze(own_server, signal.SIGSTOP)
    try:
        for method, path in (("GET", KEY), ("GET", f"/prerecordings/{EVENT}"), ("DELETE", KEY), ("GET", "/ready")):
            began = time.monotonic()
            response = await client.request(method, path)
            assert response.status == 503, (method, path, response.status)
            assert time.monotonic() - began < 2 * settings.db_timeout_seconds + 0.5, (method, path)
        began = time.monotonic()
        assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 503
        assert time.monotonic() - began < 2 * settings.db_timeout_seconds + 0.5
        assert (await client.get("/ping")).status == 204
    finally:
        _freeze(own_server, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while (await client.get(KEY)).status != 200:
        assert time.monotonic() < deadline, "reads did not recover after the database thawed"
        await asyncio.sleep(0.2)


async def test_a_commit_cut_off_midway_is_503_and_keeps_the_blob_it_may_have_recorded(
    own_server, aiohttp_client, settings, caplog
) -> None:
    """The connection breaks while COMMIT is under way, so the upload cannot know whether it
    counted. Here it did: the blob must still be there for the row that points at it."""
    import asyncpg

    from prerec.storage.fs import FileStorage
    from prerec.storage_check import check

    url = own_server.get_uri()
    client = await aiohttp_client(create_app(settings, url))
    old, new = ogg(1000, b"o"), ogg(2000, b"n")
    assert (await client.put(KEY, data=old, headers=OGG)).status == 201
    [old_blob] = blob_files(settings)

    admin = await asyncpg.connect(url)
    try:
        # Every commit now waits, once written and flushed here, for a synchronous standby
        # that does not exist: the upload's COMMIT stops right there, and its backend is
        # terminated there (PostgreSQL then keeps the commit: it is durable locally).
        await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await admin.execute("SELECT pg_reload_conf()")
        uploading = asyncio.ensure_future(client.put(KEY, data=new, headers=OGG))
        committing = await wait_for(
            lambda: admin.fetchval("SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        )
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", committing)
        response = await asyncio.wait_for(uploading, 10)
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()

    assert response.status == 503 and response.content_type == "application/problem+json"
    assert response.headers["Retry-After"].isdigit()
    # The commit counted: the new version is served whole, from the blob the handler kept.
    assert await (await client.get(KEY)).read() == new
    [new_blob] = [path for path in blob_files(settings) if path != old_blob]
    [kept] = [record for record in caplog.records if "may or may not be recorded" in record.getMessage()]
    assert new_blob.name in kept.getMessage()

    # The version it replaced was never retired; the storage check finds and retires it.
    report = await check(url, FileStorage(settings.blob_dir), 0, apply=True)
    assert report.orphans == [old_blob.relative_to(settings.blob_dir / "blobs").as_posix()]
    assert not report.missing and not report.wrong_size
    assert not (await check(url, FileStorage(settings.blob_dir), 0, apply=False)).anything_wrong
    assert blob_files(settings) == [new_blob]


async def test_sigterm_with_the_database_frozen_still_exits(tmp_path, own_server, replicas) -> None:
    """Every goodbye to a frozen server (the pool's connections, the listener) goes unanswered:
    shutdown must give up on them rather than wait until SIGKILL."""
    env = {
        "PREREC_DATABASE_URL": own_server.get_uri(),
        "PREREC_DATA_DIR": str(tmp_path / "data"),
        "PREREC_STORAGE_DIR": str(tmp_path / "storage"),
        "PREREC_DB_TIMEOUT_SECONDS": "1",
        "PREREC_SHUTDOWN_TIMEOUT_SECONDS": "2",
    }
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    replicas.append(replica)
    replica.wait_ready()
    async with aiohttp.ClientSession() as session:
        # Connections left idle in the pool, and a subscriber: all of it has to be closed.
        assert (await session.put(f"{replica.url}{KEY}", data=ogg(100), headers=OGG)).status == 201
        stream = await session.get(f"{replica.url}/sse")
        assert stream.status == 200
        _freeze(own_server, signal.SIGSTOP)
        try:
            replica.process.send_signal(signal.SIGTERM)
            began = time.monotonic()
            bound = worker_stop_bound(Settings.from_env(env))
            exit_code = await asyncio.to_thread(replica.exited, bound + 10)
            waited = time.monotonic() - began
        finally:
            _freeze(own_server, signal.SIGCONT)
    log = replica.log.read_text()
    assert exit_code == 0, log
    assert waited < bound, (waited, bound)
    assert "could not close the database pool" in log and "could not close the listening connection" in log
