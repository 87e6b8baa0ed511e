"""`python -m prerec copy-to-bucket`: move a folder of blobs into the bucket of PREREC_STORAGE_URL.

Every blob a row points at is streamed from PREREC_STORAGE_DIR into the bucket under the same
name, so the database needs no change: switch the replicas to the bucket once the copy is done.
Idempotent and resumable: an object already in the bucket with the row's size is skipped, and a
copy cut off by a crash leaves no object (only a multipart upload, which `gc` removes). Each copy
is hashed as it goes and checked against the row's SHA-256; one that does not match is deleted
again and reported.

Run it while the replicas still serve from the folder (the bulk moves meanwhile), stop them, run
it once more (it copies only what was uploaded since), then start them on the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from prerec import db
from prerec.storage.fs import DISK, READ_PIECE
from prerec.storage.s3 import S3Storage

log = logging.getLogger(__name__)


@dataclass
class Copied:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # what is wrong, one line each

    def lines(self) -> list[str]:
        out = [f"copied {name}" for name in self.copied] + [f"failed: {line}" for line in self.failed]
        return [
            *out,
            f"{len(self.copied)} copied, {len(self.skipped)} already in the bucket, {len(self.failed)} failed",
        ]


async def copy_to_bucket(url: str, folder: Path, bucket: S3Storage) -> Copied:
    result = Copied()
    conn = await asyncpg.connect(url)
    try:
        rows = await db.all_prerecordings(conn)
    finally:
        await conn.close()
    for row in sorted(rows, key=lambda row: row.blob):
        if await bucket.blob_size(row.blob) == row.size:
            result.skipped.append(row.blob)
            continue
        path = folder / "blobs" / row.blob
        try:
            digest = await _copy(path, bucket, row.blob)
        except FileNotFoundError:
            result.failed.append(f"{row.blob} is not in the folder (run `python -m prerec gc` on it)")
            continue
        if digest != row.sha256:
            await bucket.remove(row.blob)
            result.failed.append(f"{row.blob} does not have the SHA-256 its row records; not copied")
            continue
        result.copied.append(row.blob)
    return result


async def _copy(path: Path, bucket: S3Storage, name: str) -> bytes:
    """Stream a file into the bucket under `name`, hashing it on the way; its SHA-256."""
    loop = asyncio.get_running_loop()
    file = await loop.run_in_executor(DISK, open, path, "rb", 0)
    staged = await bucket.stage(name)
    hasher = hashlib.sha256()
    offset = 0
    try:
        while piece := await loop.run_in_executor(DISK, file.read, READ_PIECE):
            hasher.update(piece)
            # The staged object copies what it keeps: each piece may go once this is done.
            await asyncio.wrap_future(staged.submit(memoryview(piece), offset))
            offset += len(piece)
        await staged.finish()
    except BaseException:
        await asyncio.shield(staged.discard())
        raise
    finally:
        file.close()
    return hasher.digest()
