"""Command line: `python -m prerec [serve|migrate|downgrade|revision|gc|settings]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import asyncpg

from prerec.config import SettingError, Settings
from prerec.telemetry import configure_logging

PR_SET_PDEATHSIG = 1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024
# Inside the package, so an installed wheel has it too: in a checkout prerec/alembic.ini and
# prerec/migrations are symlinks to the top-level ones (see pyproject.toml).
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"

log = logging.getLogger("prerec")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)


def resolve_database_url(settings: Settings) -> str:
    """PREREC_DATABASE_URL, or the embedded PostgreSQL under the data folder (started here)."""
    if settings.database_url:
        return settings.database_url
    from prerec import embedded

    return embedded.start(settings.data_dir).get_uri()


def _alembic(database_url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic(database_url), revision)


def without_password(url: str) -> str:
    """A database URL fit for a log line: no password, neither before the host nor in the query."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    query = urllib.parse.urlencode(
        [
            (key, value)
            for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if key.lower() != "password"
        ],
        safe="/",
    )
    # Joined by hand: urlunsplit drops the // of an empty host (postgresql:///db?host=/socket).
    return f"{parts.scheme}://{userinfo.partition(':')[0]}{at}{hosts}{parts.path}" + (f"?{query}" if query else "")


def serve(settings: Settings) -> None:
    # Where everything lives, first: an operator reading the log must not have to guess.
    if settings.storage_url is None:
        log.info("storage folder: %s", settings.blob_dir.resolve())
    else:
        log.info(
            "storage: s3://%s/%s at %s",
            settings.storage_url.bucket,
            settings.storage_url.prefix,
            settings.s3_endpoint_url or "AWS",
        )
    database_url = resolve_database_url(settings)
    log.info("database: %s", without_password(database_url))
    # In a child process: SQLAlchemy and alembic then never load into the serving process,
    # which saves it some 20 MB of memory for good.
    migration = subprocess.run(
        [sys.executable, "-m", "prerec", "migrate"], env={**os.environ, "PREREC_DATABASE_URL": database_url}
    )
    if migration.returncode != 0:
        log.error("migrations failed (exit %d); not serving", migration.returncode)
        raise SystemExit(1)
    if settings.workers == 1:
        serve_worker(settings, database_url, reuse_port=False)
    else:
        supervise_workers(settings, database_url)


def _return_freed_memory() -> None:
    """Have glibc hand large freed blocks back to the system at once.

    Its default mmap threshold rises after the first large free, after which the
    megabyte-sized upload buffers come from the heap and stay resident when freed: after 50
    concurrent uploads a process would keep 100 MB it no longer uses. A fixed threshold
    (M_MMAP_THRESHOLD) turns that adjustment off. Not glibc: nothing to do.

    Fixed at 1 MiB, not glibc's initial 128 KiB: the socket reads (asyncio's 256 KiB) and the
    body pieces aiohttp's parser cuts from them fall below it and reuse heap memory. Below
    them, each was a fresh mapping, faulted in and zeroed page by page: a 1 GiB PUT ran at
    180-230 MB/s instead of 290-320 here, and a GET relayed from S3 took 1.6-2.0 CPU-seconds a
    GiB instead of 1.1. Peak and idle RSS stayed the same (55 MB after a burst of 200
    uploads: the heap is trimmed once they are over, receive.Pipeline).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def serve_worker(settings: Settings, database_url: str, reuse_port: bool) -> None:
    from prerec.app import create_app
    from prerec.app import serve as serve_app
    from prerec.storage import StorageUnavailable

    _return_freed_memory()
    app = create_app(settings, database_url)
    try:
        asyncio.run(serve_app(app, settings, reuse_port=reuse_port))
    except OSError as error:
        log.error("cannot start serving on %s:%d: %s", settings.host, settings.port, error)
        raise SystemExit(1) from None
    except StorageUnavailable as error:
        log.error("cannot start: %s", error)
        raise SystemExit(1) from None
    finally:
        # Closing the loop restores SIGTERM's default, which would kill us without atexit while
        # the embedded PostgreSQL is being stopped.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def worker_stop_bound(settings: Settings) -> float:
    """How long a worker may take from SIGTERM to its exit before it counts as hung.

    Uploads in flight may take PREREC_SHUTDOWN_TIMEOUT_SECONDS; then aiohttp gives handlers
    1 s; then the cleanup, whose steps each wait at most the database timeout (app.py: the
    broadcaster's tasks and the sweeper, cancelled twice, count two each; the listener and
    the pool one each); and a few seconds for the interpreter's own exit on a busy machine.
    """
    return settings.shutdown_timeout_seconds + 1 + 6 * settings.db_timeout_seconds + 3


def supervise_workers(settings: Settings, database_url: str) -> None:
    """PREREC_WORKERS > 1: run that many worker processes on one port (SO_REUSEPORT).

    Each worker has its own pool and its own listener; this process only owns the embedded
    database (if any), forwards SIGTERM/SIGINT, and restarts a worker that dies unasked (with
    a pause, and giving up when they keep dying at once, say while the database is down). A
    worker that has not exited worker_stop_bound after being asked to is hung (stopped, or
    stuck in the kernel) and is killed, so the replica's stop never waits on it for ever.
    """
    from prometheus_client import multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="prerec-metrics-")
    env = {
        **os.environ,
        "PREREC_DATABASE_URL": database_url,
        "PREREC_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    command = [sys.executable, "-m", "prerec", "worker"]
    stopping: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        for worker in workers:
            if worker.poll() is None and worker.pid not in signalled:
                signalled.add(worker.pid)
                worker.send_signal(signum)

    # Handlers first: a signal arriving while workers start must reach them too.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers.extend(subprocess.Popen(command, env=env) for _ in range(settings.workers))
    log.info("serving on http://%s:%d with %d workers", settings.host, settings.port, settings.workers)
    deaths: list[float] = []
    while not stopping:
        for index, worker in enumerate(workers):
            if worker.poll() is None:
                continue
            deaths = [t for t in deaths if time.monotonic() - t < 30] + [time.monotonic()]
            if len(deaths) > 5:
                log.error("workers keep exiting (last with %d); stopping", worker.returncode)
                stop(signal.SIGTERM, None)
                break
            log.warning("worker %d exited with %d; starting a new one", worker.pid, worker.returncode)
            multiprocess.mark_process_dead(worker.pid, metrics_dir)
            _pause(min(2 ** len(deaths) * 0.1, 5), stopping)
            if stopping:  # its exit is reported above; it is not ours to wait for any more
                workers.pop(index)
                break
            workers[index] = subprocess.Popen(command, env=env)
        _pause(0.2, stopping)
    stop(stopping[0], None)  # one started just as the signal came has not had it yet
    bound = worker_stop_bound(settings)
    deadline = time.monotonic() + bound
    codes = [_wait_or_kill(worker, deadline, bound) for worker in workers]
    shutil.rmtree(metrics_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if any(codes) or len(deaths) > 5:
        raise SystemExit(1)


def _pause(seconds: float, stopping: list[int]) -> None:
    """Sleep, but return soon after a stop is asked for.

    In short naps because time.sleep resumes after a signal handler (PEP 475), and a
    threading.Event set from a handler can deadlock on the Event's own lock."""
    deadline = time.monotonic() + seconds
    while not stopping and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_or_kill(worker: subprocess.Popen[bytes], deadline: float, bound: float) -> int:
    try:
        return worker.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        log.error("worker %d did not stop within %.1f s of being asked to; killing it", worker.pid, bound)
        worker.kill()
    try:
        return worker.wait(5)
    except subprocess.TimeoutExpired:  # in uninterruptible sleep (a hung disk, say)
        log.error("worker %d has not exited even after SIGKILL; leaving it", worker.pid)
        return -signal.SIGKILL


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor (it would go on sharing the port with the
    next generation): ask Linux to send it SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def _check_storage(settings: Settings, apply: bool, grace_seconds: float):  # type: ignore[no-untyped-def]
    from prerec.storage import open_storage
    from prerec.storage_check import check

    storage = open_storage(settings)
    await storage.start()
    try:
        return await check(resolve_database_url(settings), storage, grace_seconds, apply)
    finally:
        await storage.close()


def storage_check(settings: Settings, apply: bool, grace_seconds: float) -> int:
    from prerec.problems import Problem
    from prerec.storage import StorageUnavailable

    try:
        report = asyncio.run(_check_storage(settings, apply, grace_seconds))
    except Problem as problem:
        print(f"prerec gc: could not check: {problem.detail}", file=sys.stderr)
        return 2
    except StorageUnavailable as error:
        print(f"prerec gc: could not check: {error}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        print(f"prerec gc: could not check: {error}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    log.info(
        "gc finished",
        extra={"orphans": len(report.orphans), "missing": len(report.missing), "repaired": len(report.repaired)},
    )
    return 1 if report.anything_wrong else 0


async def _copy_to_bucket(settings: Settings):  # type: ignore[no-untyped-def]
    from prerec.storage import open_storage
    from prerec.storage.copy import copy_to_bucket

    bucket = open_storage(settings)
    await bucket.start()
    try:
        return await copy_to_bucket(resolve_database_url(settings), settings.blob_dir, bucket)  # type: ignore[arg-type]
    finally:
        await bucket.close()


def copy_to_bucket(settings: Settings) -> int:
    from prerec.problems import Problem
    from prerec.storage import StorageUnavailable

    if settings.storage_url is None:
        print("prerec copy-to-bucket: set PREREC_STORAGE_URL to the bucket to copy into", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_copy_to_bucket(settings))
    except (Problem, StorageUnavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        detail = error.detail if isinstance(error, Problem) else error
        print(f"prerec copy-to-bucket: stopped (run it again to go on): {detail}", file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prerec", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve HTTP (the default); applies migrations first")
    commands.add_parser("worker", help="one worker of a PREREC_WORKERS > 1 server (started by serve)")
    commands.add_parser("migrate", help="upgrade the database schema to the newest revision")
    down = commands.add_parser("downgrade", help="take the schema back one revision (or to REVISION)")
    down.add_argument("revision", nargs="?", default="-1")
    gc = commands.add_parser(
        "gc", help="check that database and storage agree; exit 1 if anything was wrong (--apply repairs)"
    )
    gc.add_argument("--apply", action="store_true", help="remove orphans and leftovers, take broken rows out")
    gc.add_argument(
        "--grace-seconds",
        type=float,
        default=None,
        help="leave files younger than this alone: they may be uploads in progress "
        "(default: PREREC_TMP_MAX_AGE_SECONDS, one hour)",
    )
    commands.add_parser(
        "copy-to-bucket",
        help="copy every blob a row points at from PREREC_STORAGE_DIR into PREREC_STORAGE_URL's bucket, "
        "under the same names (idempotent, resumable)",
    )
    new = commands.add_parser("revision", help="write a new, empty migration")
    new.add_argument("-m", "--message", required=True)
    table = commands.add_parser("settings", help="print the settings table (Markdown); --readme FILE rewrites FILE's")
    table.add_argument("--readme", type=Path, help="a Markdown file whose settings table to regenerate in place")
    args = parser.parse_args(argv)

    if args.command == "settings":  # documentation: needs no valid environment
        from prerec.config import settings_table, with_settings_table

        if args.readme is None:
            print(settings_table(), end="")
        else:
            args.readme.write_text(with_settings_table(args.readme.read_text()))
        return 0

    try:
        settings = Settings.from_env()
    except SettingError as error:
        print(f"prerec: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Python's default SIGTERM kills without running atexit, which is what stops the embedded
    # PostgreSQL; turning it into SystemExit lets the interpreter exit properly. (While the
    # server runs, app.serve installs its own handler for a graceful stop.)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if args.command in (None, "serve"):
        serve(settings)
    elif args.command == "worker":
        _die_with_parent()
        serve_worker(settings, resolve_database_url(settings), reuse_port=True)
    elif args.command == "migrate":
        migrate(resolve_database_url(settings))
    elif args.command == "downgrade":
        from alembic import command

        command.downgrade(_alembic(resolve_database_url(settings)), args.revision)
    elif args.command == "gc":
        grace = settings.tmp_max_age_seconds if args.grace_seconds is None else args.grace_seconds
        return storage_check(settings, args.apply, grace)
    elif args.command == "copy-to-bucket":
        return copy_to_bucket(settings)
    elif args.command == "revision":
        from alembic import command
        from alembic.config import Config

        command.revision(Config(str(ALEMBIC_INI)), message=args.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
