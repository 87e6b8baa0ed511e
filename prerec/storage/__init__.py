"""Where the audio is kept: the interface every storage backend offers, and its values.

Backends sit side by side behind it: fs.py (a folder, which several replicas may share) and
s3.py (a bucket of an S3-compatible store, for replicas on machines that share no filesystem);
open_storage() picks one from the settings. receive.py streams a request body into any of
them and responses.py sends a blob back, so handlers never know which backend they talk to.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from prerec.config import Settings
    from prerec.model import Piece, Tail, Upload
    from prerec.storage.responses import Source


class StorageUnavailable(Exception):
    """The store cannot be used at all (no such bucket, credentials refused): said at start,
    not at the first upload. The message is for the operator."""


@dataclass(frozen=True)
class StoredBlob:
    name: str
    size: int
    # hashlib name -> digest; always "sha256", plus whatever the caller asked for.
    digests: dict[str, bytes]

    @property
    def sha256(self) -> bytes:
        return self.digests["sha256"]


@dataclass(frozen=True)
class Stored:
    """A stored blob or leftover as a listing sees it: its size and when it was last written."""

    size: int
    modified: float  # a timestamp


@dataclass(frozen=True)
class Inventory:
    """What a store holds, for the storage check and the orphan sweep.

    `blobs`: blobs in service by name (retired ones are not listed: they are on their way out).
    `leftovers`: what unfinished plain uploads left behind (temporary files, multipart uploads),
    by a reference drop_leftover() takes; a young one may be an upload still arriving.
    """

    blobs: dict[str, Stored]
    leftovers: dict[str, Stored]


class Staged(Protocol):
    """One new blob, written once: pieces in, then finished under a fresh name or discarded."""

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
        """Write a piece at its place in the blob; pieces may land in any order.

        The piece's buffer may be reused once the future is done. A concurrent future, not an
        asyncio one: cancelling the upload must not detach the work still using the buffer.
        A storage failure comes out of it as the Problem to answer.
        """
        ...

    def touch(self) -> concurrent.futures.Future[None]:
        """Show every replica's sweeper that this blob is still being written. Not awaited by
        the caller: a hung store must not keep it from cutting off a slow client."""
        ...

    async def finish(self) -> str:
        """Make the blob durable under a fresh name, and return the name."""
        ...

    async def discard(self) -> None:
        """Leave nothing behind: once the work in flight is done, remove what was written, and
        the finished blob too when finish() completed despite a cancellation."""
        ...


@dataclass(frozen=True)
class Progress:
    """What a resumable upload's writer made durable, for the engine to record under the lease
    fence: the offset every byte below which is durable, the pieces that are new or grew, and
    the bytes past the last piece (the tail, kept in the database; None: no such bytes)."""

    offset: int
    pieces: list[Piece]
    tail: Tail | None


# Hands out `count` part numbers no other writer of the upload ever gets (the engine's fenced
# allocation in the database); raises db.Fenced once the writer lost its lease.
AllocateParts = Callable[[int], Awaitable[int]]


class Appender(Protocol):
    """One lease generation's writes to a resumable upload, from its durable offset on."""

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
        """As Staged.submit; pieces come in order, from the upload's durable offset."""
        ...

    async def persist(self, upto: int) -> Progress:
        """Make every byte below `upto` durable (all were submitted, and their futures are
        done); pieces past it may go on arriving meanwhile. The offset returned is `upto` once
        every piece up to it was joined (when no piece is in flight past it); before that it
        may be short of it, never short of the offset recorded before. At the upload's length,
        everything is in pieces (no tail)."""
        ...

    async def stop(self) -> None:
        """Join every write still in flight (a zombie's late write must not outlive this),
        and let go of files and buffers. Nothing is removed: the upload goes on elsewhere."""
        ...


class Storage(Protocol):
    async def start(self) -> None:
        """Get ready to serve (the folder backend lays out its folders; the S3 one checks its
        bucket and credentials, StorageUnavailable when it cannot be used)."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> str | None:
        """What keeps the store from taking uploads now (for /ready), or None."""
        ...

    def free_bytes(self) -> int | None:
        """Room left for uploads, None when unknown."""
        ...

    async def stage(self) -> Staged:
        """Begin a new blob (a PUT's body), under a name no blob had before."""
        ...

    async def open(self, name: str, size: int, start: int, length: int) -> Source | None:
        """The blob's bytes start..start+length, opened for sending (before any header goes
        out, so a failing store is still a 503); None when it is missing or not `size` long."""
        ...

    def exists(self, name: str) -> bool:
        """Whether HEAD may answer for the blob (without a call to a remote store)."""
        ...

    async def presigned_url(self, name: str) -> str | None:
        """Where a GET of the blob may be sent instead (PREREC_S3_PRESIGNED_GET_SECONDS), or None
        to stream it through."""
        ...

    async def retire(self, name: str) -> None:
        """Take a replaced or deleted blob out of service; it is removed after a grace period,
        as a download of it may still be under way on another replica."""
        ...

    async def remove(self, name: str) -> None:
        """Remove at once a blob that was never served (its commit failed)."""
        ...

    async def sweep(self, max_age_seconds: float) -> list[str]:
        """Remove what crashed uploads left and retired blobs past the grace period; return
        what was removed."""
        ...

    async def inventory(self) -> Inventory: ...

    async def blob_size(self, name: str) -> int | None:
        """The size of a blob now (None: it is missing), to check a suspicious row again."""
        ...

    async def drop_leftover(self, ref: str) -> None:
        """Remove a leftover the inventory listed; gone already is fine."""
        ...

    # Resumable uploads (prerec/uploads/engine.py). The engine records what these return.

    async def begin_upload(self, upload_id: uuid.UUID) -> str | None:
        """Prepare a new upload's place in the store; what to keep in its row (store_ref)."""
        ...

    async def appender(
        self, upload: Upload, pieces: list[Piece], tail: Tail | None, allocate: AllocateParts
    ) -> Appender:
        """The writer for the upload's lease generation, from its durable offset on, given
        what the database recorded of it."""
        ...

    async def assemble(self, upload: Upload, pieces: list[Piece]) -> str:
        """The recorded pieces as one blob; its name. Done again after a finisher died in it,
        it returns the same blob if that is already whole."""
        ...

    async def hash_blob(self, name: str, algorithms: frozenset[str]) -> dict[str, bytes]:
        """SHA-256 and the other digests of a blob read back (bytes another process wrote)."""
        ...

    async def stale_uploads(self, cutoff: float) -> dict[uuid.UUID, str | None]:
        """Uploads with bytes in the store untouched (or begun) before `cutoff`, a timestamp:
        their store_ref by id, for the sweeper to check against the database."""
        ...

    async def discard_upload(self, upload_id: uuid.UUID, store_ref: str | None) -> None:
        """Remove an upload's bytes (cancelled, expired, refused at its end); gone is fine."""
        ...


def open_storage(settings: Settings) -> Storage:
    """The backend the settings choose (not started yet)."""
    # Imported here: the backends import this module's types.
    if settings.storage_url is not None:
        from prerec.storage.s3 import S3Storage

        return S3Storage(
            settings.storage_url,
            settings.s3_endpoint_url,
            settings.s3_region,
            settings.s3_addressing_style,
            settings.s3_timeout_seconds,
            settings.s3_presigned_get_seconds,
        )
    from prerec.storage.fs import FileStorage

    return FileStorage(settings.blob_dir)


# What the app keeps its blobs in.
STORAGE = web.AppKey("storage", Storage)
