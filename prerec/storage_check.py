"""`python -m prerec gc`: check that the database and the store agree, and repair.

Finds blobs no row points at (left by a crash between the blob's finish and the commit, or
before a replaced blob was retired), rows whose blob is missing or has the wrong size, and what
unfinished uploads left (temporary files; multipart uploads on S3). With --apply it removes
orphans and leftovers older than the grace period, and takes rows with a missing or torn blob
out of the listing (with a prerecording-deleted event, so UIs and playout see the truth instead of failing at air time).

Safe while replicas serve traffic: a blob younger than the grace period may be an upload
between its rename and its commit, so it is never touched; and every suspicious row is read
again, under its key's lock, right before it is repaired.

The running service retires old orphans by itself (sweep_orphans, from the app's sweeper),
with the same rule for what an orphan is.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from prerec import db
from prerec.model import Prerecording, format_start
from prerec.problems import DatabaseUnavailable
from prerec.storage import Storage, Stored

log = logging.getLogger(__name__)


@dataclass
class Report:
    orphans: list[str] = field(default_factory=list)
    young_orphans: list[str] = field(default_factory=list)
    missing: list[Prerecording] = field(default_factory=list)
    wrong_size: list[tuple[Prerecording, int]] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def anything_wrong(self) -> bool:
        return bool(self.orphans or self.missing or self.wrong_size or self.leftovers)

    def lines(self) -> list[str]:
        out = [f"orphan blob (no row points at it): {name}" for name in self.orphans]
        out += [f"recent unreferenced blob, left alone (may be an upload committing): {n}" for n in self.young_orphans]
        out += [f"missing blob for {_key(p)}: {p.blob}" for p in self.missing]
        out += [
            f"wrong size for {_key(p)}: {p.blob} has {size} bytes, expected {p.size}" for p, size in self.wrong_size
        ]
        out += [f"leftover upload (temporary file or multipart upload): {name}" for name in self.leftovers]
        out += [f"repaired: {action}" for action in self.repaired]
        summary = "something was wrong" if self.anything_wrong else "storage and database agree"
        counts = (
            f"{len(self.orphans)} orphans, {len(self.missing)} missing, {len(self.wrong_size)} wrong size, "
            f"{len(self.leftovers)} leftover uploads"
        )
        return [*out, f"{summary}: {counts}"]


def _key(prerecording: Prerecording) -> str:
    return f"{prerecording.event} {format_start(prerecording.start)}"


class _Changed(Exception):
    """The row changed since it was checked: it is no longer ours to repair."""


def _orphans(files: dict[str, Stored], referenced: set[str], cutoff: float) -> tuple[list[str], list[str]]:
    """Blob files no row points at: those untouched since `cutoff`, and the younger ones.

    A young one may be an upload between its rename into blobs/ and its commit, on any
    replica sharing the folder: the rename keeps the temporary file's mtime, which its last
    write set a moment before, and the commit follows within the database timeout, far
    inside the grace period. (A commit held up longer, by a database frozen mid-commit, comes
    with a database that cannot answer the query that lists the rows either.) So only an old
    one is known to be left over.
    """
    old: list[str] = []
    young: list[str] = []
    for name, stored in sorted(files.items()):
        if name not in referenced:
            (old if stored.modified < cutoff else young).append(name)
    return old, young


async def check(url: str, storage: Storage, grace_seconds: float, apply: bool) -> Report:
    report = Report()
    cutoff = time.time() - grace_seconds
    conn = await asyncpg.connect(url)
    try:
        # The store first, rows second (here and in sweep_orphans): a blob committed after the
        # listing cannot look orphaned.
        inventory = await storage.inventory()
        rows = await db.all_prerecordings(conn)
        referenced = await db.referenced_blobs(conn)
        report.orphans, report.young_orphans = _orphans(inventory.blobs, referenced, cutoff)
        for row in rows:
            listed = inventory.blobs.get(row.blob)
            if listed is not None and listed.size == row.size:
                continue
            current = await db.get_prerecording(conn, row.event, row.start)
            if current is None or current.blob != row.blob:
                continue  # replaced or deleted meanwhile: fine
            size = await storage.blob_size(row.blob)
            if size is None:
                report.missing.append(row)
            elif size != row.size:
                report.wrong_size.append((row, size))
        report.leftovers = sorted(ref for ref, stored in inventory.leftovers.items() if stored.modified < cutoff)

        if apply:
            await _repair(conn, storage, report)
    finally:
        await conn.close()
    return report


async def _repair(conn: asyncpg.Connection, storage: Storage, report: Report) -> None:
    for name in report.orphans:
        # Retired, not unlinked: it may have just been replaced, with a download still reading it.
        await storage.retire(name)
        report.repaired.append(f"retired orphan blob {name}")
    for ref in report.leftovers:
        await storage.drop_leftover(ref)
        report.repaired.append(f"removed leftover upload {ref}")
    for row in [*report.missing, *(row for row, _ in report.wrong_size)]:
        if await _take_out(conn, row.event, row.start, row.blob):
            await storage.retire(row.blob)
            report.repaired.append(f"took {_key(row)} out of the listing (its blob was missing or torn)")


async def _take_out(conn: asyncpg.Connection, event: uuid.UUID, start: datetime, blob: str) -> bool:
    def still_broken(current: Prerecording | None) -> None:
        if current is None or current.blob != blob:
            raise _Changed

    try:
        return await db.delete_prerecording(conn, event, start, check=still_broken) is not None
    except _Changed:
        return False


# More than this share of the blobs unreferenced is no crash's leftover: more likely a wrong
# or restored database. The sweeper then leaves everything for a person (and `make gc`).
MOST_ORPHANED = 0.5


async def sweep_orphans(
    pool: asyncpg.Pool,
    storage: Storage,
    grace_seconds: float,
    timeout: float,
    suspects: set[str] | None = None,
) -> list[str]:
    """Retire blobs no row has pointed at for the grace period (the running service's sweep).

    They are what an upload leaves when its commit's outcome was uncertain (the database froze
    or went away mid-commit) and the row never came to be. Nothing is touched when the
    database cannot be asked: without it, every blob would look unreferenced.

    With `suspects` (kept by the caller from one round to the next), a blob is retired only
    when the round before found it orphaned too. A blob's age alone cannot tell on S3: an
    object made by a multipart upload carries the time the upload *began* (on AWS), so a long
    upload between its completion and its commit looks like an old orphan for a moment.
    """
    cutoff = time.time() - grace_seconds
    # Listed before a pooled connection is taken: no connection is held through a store's listing.
    files = (await storage.inventory()).blobs
    try:
        async with db.connection(pool, timeout) as conn:
            referenced = await db.referenced_blobs(conn)
    except DatabaseUnavailable:
        log.warning("orphan sweep skipped: the database is not available")
        return []
    old, _ = _orphans(files, referenced, cutoff)
    if len(old) > len(files) * MOST_ORPHANED:
        log.error(
            "orphan sweep skipped: %d of %d blobs are unreferenced, which looks like a wrong database; "
            "check with `python -m prerec gc`",
            len(old),
            len(files),
        )
        return []
    if suspects is not None:
        confirmed = [name for name in old if name in suspects]
        suspects.clear()
        suspects.update(name for name in old if name not in confirmed)
        old = confirmed
    for name in old:
        # Retired, not unlinked: removed after another grace period, and recoverable until then.
        await storage.retire(name)
    return old
