"""The command line's worker supervisor (PREREC_WORKERS > 1), on real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from prerec.__main__ import worker_stop_bound
from prerec.config import Settings
from tests.conftest import Replica, free_port, wait_for


@pytest.fixture
def workers_env(storage_env):  # type: ignore[no-untyped-def]
    # Short timeouts: a hung worker's deadline is worker_stop_bound of these.
    return {
        **storage_env,
        "PREREC_WORKERS": "2",
        "PREREC_SHUTDOWN_TIMEOUT_SECONDS": "1",
        "PREREC_DB_TIMEOUT_SECONDS": "0.5",
    }


def start(env, tmp_path, replicas) -> tuple[Replica, psutil.Process]:  # type: ignore[no-untyped-def]
    replica = Replica(env, free_port(), tmp_path / "replica.log")
    replicas.append(replica)
    replica.wait_ready()
    return replica, psutil.Process(replica.process.pid)


def listening(supervisor: psutil.Process, port: int) -> set[int]:
    return {
        worker.pid
        for worker in supervisor.children()
        if any(c.laddr.port == port and c.status == "LISTEN" for c in worker.net_connections())
    }


async def wait_logged(replica: Replica, text: str) -> None:
    await wait_for(lambda: text in replica.log.read_text())


def kill_all(pids) -> None:  # type: ignore[no-untyped-def]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but be plain
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_a_killed_worker_is_replaced(tmp_path, workers_env, replicas) -> None:
    replica, supervisor = start(workers_env, tmp_path, replicas)
    first = await wait_for(lambda: len(found := listening(supervisor, replica.port)) == 2 and found, timeout=20)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    both = await wait_for(lambda: len(found := listening(supervisor, replica.port)) == 2 and found - first and found)
    assert victim not in both
    assert f"worker {victim} exited with -9; starting a new one" in replica.log.read_text()

    replica.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(replica.exited, 30) == 0, replica.log.read_text()
    assert not any(psutil.pid_exists(pid) for pid in both)


async def test_a_stop_asked_for_while_a_worker_is_being_replaced_starts_no_worker(
    tmp_path, workers_env, replicas
) -> None:
    replica, supervisor = start(workers_env, tmp_path, replicas)
    workers = await wait_for(lambda: len(found := listening(supervisor, replica.port)) == 2 and found, timeout=20)
    survivor = max(workers)
    seen: set[int] = set()
    try:
        # Kill a worker, and freeze the supervisor in the pause before it starts another (when
        # it was quicker than us and already started one, kill that one and try again).
        for _ in range(3):
            victim = next(pid for pid in workers if pid != survivor)
            os.kill(victim, signal.SIGKILL)
            await wait_logged(replica, f"worker {victim} exited with -9")
            supervisor.suspend()
            workers = {child.pid for child in supervisor.children()}
            if workers == {survivor}:
                break
            supervisor.resume()
            await wait_for(lambda: len(found := listening(supervisor, replica.port)) == 2 and found, timeout=20)
            workers = {child.pid for child in supervisor.children()}
        else:
            pytest.fail("never caught the supervisor in its restart pause")

        # The stop arrives during the pause: once the supervisor runs on, it must start no one.
        replica.process.send_signal(signal.SIGTERM)
        supervisor.resume()
        while replica.process.poll() is None:
            seen |= {child.pid for child in supervisor.children()}
            await asyncio.sleep(0.01)
        assert seen <= {survivor}, f"started worker(s) {seen - {survivor}} after the stop"
        assert replica.process.returncode == 0, replica.log.read_text()
    finally:
        kill_all(seen | workers)


async def test_a_worker_that_does_not_stop_is_killed_at_the_deadline(tmp_path, workers_env, replicas) -> None:
    replica, supervisor = start(workers_env, tmp_path, replicas)
    workers = await wait_for(lambda: len(found := listening(supervisor, replica.port)) == 2 and found, timeout=20)
    hung, healthy = sorted(workers)
    # A stopped process cannot act on SIGTERM (it stays pending): a worker hung for good.
    os.kill(hung, signal.SIGSTOP)
    try:
        replica.process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        bound = worker_stop_bound(Settings.from_env(workers_env))
        exit_code = await asyncio.to_thread(replica.exited, bound + 10)
        waited = time.monotonic() - began
    finally:
        kill_all([hung])
    log = replica.log.read_text()
    assert exit_code == 1, log  # not a clean stop: a worker had to be killed
    assert f"worker {hung} did not stop within {bound:.1f} s of being asked to; killing it" in log
    assert waited >= bound - 0.5, "killed before its deadline"
    assert not psutil.pid_exists(hung) and not psutil.pid_exists(healthy)
