"""Audio files on disk, and the write protocol that keeps each one whole.

Layout under the storage folder (which several replicas may share):
    tmp/<random>.part       uploads in progress
    blobs/<xx>/<random>.ogg finished blobs, each written once and never modified
    trash/<random>.ogg      replaced or deleted blobs, kept a while for readers still sending them

A blob is never overwritten in place. An upload streams into a new temporary file while its
SHA-256 is computed, is fsynced, renamed to a fresh blob name and its folder fsynced; only then
does the database point the key at it (db.save_prerecording), and only after that commit is
the blob it replaced unlinked. A crash at any point leaves the old row with its old file, or
the new row with its new file; what is left over is an unreferenced file, which the running
service retires once it is past the grace period (storage_check.sweep_orphans).

A replaced blob is not unlinked at once but moved to trash/ and removed after a grace period:
on a local disk an open file survives unlink, but on NFS another client's unlink makes a
reader's handle stale, and a download in progress on another replica would be cut.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import StreamReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from prerec.problems import Problem

log = logging.getLogger(__name__)

OGG_CAPTURE_PATTERN = b"OggS"
# Pieces of an upload being hashed and written at once, at most.
PIPELINE_DEPTH = 4
# Writes go to a worker thread in pieces of this size: large enough that the thread hop and
# the hashing call are amortised (64 KiB pieces measured clearly slower), small enough that
# an upload holds only a couple of them in memory.
WRITE_PIECE = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    name: str
    size: int
    # hashlib name -> digest; always "sha256", plus whatever the caller asked for.
    digests: dict[str, bytes]

    @property
    def sha256(self) -> bytes:
        return self.digests["sha256"]


FOLDERS = ("tmp", "blobs", "trash")


def layout(root: Path) -> None:
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)


def blob_path(root: Path, name: str) -> str:
    # A plain string join: this runs for every HEAD and GET, and pathlib's objects cost more
    # than the stat or open they lead to.
    return os.path.join(root, "blobs", name)


def _storage_problem(error: OSError) -> Problem:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return Problem(507, "The storage folder is full; the upload was not stored.")
    return Problem(
        503, f"The storage folder cannot be written ({os.strerror(error.errno or 0)}).", {"Retry-After": "5"}
    )


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# How much written data may wait in the page cache before its writeback is started.
WRITEBACK_STEP = 8 * 1024 * 1024

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux
    _sync_file_range = None
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a range to disk now, without waiting for it.

    Otherwise a whole upload sits dirty in the page cache (the background threshold is a tenth
    of memory) and the fsync before the rename writes all of it while the client waits; this
    way the disk works while the body is still arriving. Python's os module has no
    sync_file_range, hence ctypes; where it is missing this is a no-op and fsync does it all.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


@dataclass
class _Upload:
    """One upload's temporary file; its methods run in a worker thread."""

    root: Path
    algorithms: frozenset[str]
    tmp: Path = field(init=False)
    file: IO[bytes] | None = field(init=False, default=None)
    hashers: dict[str, hashlib._Hash] = field(init=False)

    def __post_init__(self) -> None:
        self.tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        self.hashers = {name: hashlib.new(name) for name in self.algorithms | {"sha256"}}

    def open(self) -> None:
        self.file = open(self.tmp, "xb", buffering=0)

    def hash(self, piece: bytes | bytearray) -> None:
        for hasher in self.hashers.values():
            hasher.update(piece)

    def write_at(self, piece: memoryview, offset: int) -> None:
        """Write a piece at its place in the file; pieces may land in any order."""
        assert self.file is not None
        fd = self.file.fileno()
        done = 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], offset + done)
        end = offset + len(piece)
        if end // WRITEBACK_STEP != offset // WRITEBACK_STEP:
            step = end // WRITEBACK_STEP * WRITEBACK_STEP
            _start_writeback(fd, step - WRITEBACK_STEP, WRITEBACK_STEP)

    def touch(self) -> None:
        # By path, not descriptor: once committed or discarded the name is gone and this is a
        # no-op, where a descriptor closed meanwhile could already number another file.
        try:
            os.utime(self.tmp)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not refresh temporary file %s: %s", self.tmp.name, error)

    def commit(self) -> str:
        """fsync, then rename into place under a fresh name, then fsync the folder."""
        assert self.file is not None
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        token = uuid.uuid4().hex
        name = f"{token[:2]}/{token}.ogg"
        target = Path(blob_path(self.root, name))
        target.parent.mkdir(exist_ok=True)
        os.rename(self.tmp, target)
        _fsync_folder(target.parent)
        return name

    def discard(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
                self.file = None
            self.tmp.unlink(missing_ok=True)
        except OSError as error:
            # Cleaning up must not hide the error that made us clean up; sweep() retries.
            log.warning("could not remove temporary file %s: %s", self.tmp.name, error)


async def _read(body: StreamReader) -> bytes:
    """The next bytes of a request body; a client that breaks off is a 400, not a crash."""
    try:
        return await body.readany()
    except _TooSlow as error:
        raise Problem(408, str(error), {"Connection": "close"}) from None
    except (ConnectionError, HttpProcessingError) as error:
        raise Problem(400, "The upload was cut off or malformed before its end; nothing was stored.") from error


class _TooSlow(TimeoutError):
    """A timeout, not a connection error: after our 408 aiohttp reads on to drain the body
    (lingering), meets this exception on it, and stops quietly only for a timeout; any other
    error there is logged as "Unhandled exception" with a traceback."""


@dataclass(frozen=True)
class Pace:
    """How slow an upload may be, and how its temporary file stays visibly alive."""

    # Fewer than min_rate bytes a second, averaged over the last `window` seconds, cuts the
    # upload off; with min_rate 0 only a body that brings nothing for a whole window is.
    window: float
    min_rate: float
    # The sweeper (of any replica sharing the folder) removes temporary files untouched this long.
    tmp_max_age: float

    @property
    def touch_every(self) -> float:
        """How often a live upload refreshes its file's mtime.

        A tenth of the sweeper's age limit (at most a minute): the nine tenths left absorb a
        disk thread that is slow to run the touch, an NFS client's attribute cache (up to a
        minute by default) showing another replica an old mtime, and clocks that differ
        between replicas and the file server.
        """
        return min(self.tmp_max_age / 10, 60.0)


class _Progress:
    """What the watchdog reads: bytes received, on a clock that stops while the upload waits
    for our own disk (that wait holds the client back; it is not the client's slowness)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.received = 0
        self._paused = 0.0
        self._waiting_since: float | None = None

    def clock(self) -> float:
        now = self.loop.time()
        waiting = 0.0 if self._waiting_since is None else now - self._waiting_since
        return now - self._paused - waiting

    @contextlib.contextmanager
    def waiting_on_disk(self) -> Iterator[None]:
        self._waiting_since = self.loop.time()
        try:
            yield
        finally:
            self._paused += self.loop.time() - self._waiting_since
            self._waiting_since = None


async def _watch(body: StreamReader, progress: _Progress, pace: Pace, upload: _Upload) -> None:
    """End a body that brings too little over the last window (a stalled, vanished or dripping
    client), and keep the temporary file's mtime fresh meanwhile.

    One watchdog per upload instead of a timeout around every read: reads come thousands of
    times a second, and a timer each would cost more than the check. Received bytes are
    sampled each tick; the oldest sample kept is the one a window back.

    The file is written only once a whole piece is buffered (WRITE_PIECE), so an upload
    trickling in below that would otherwise look abandoned to the sweeper; it is touched
    whatever arrives, as it belongs to a live upload for as long as this watchdog runs (a
    stalled one is cut by the rate rule, a crashed process stops touching).
    """
    loop = asyncio.get_running_loop()
    tick = min(pace.window / 4, pace.touch_every, 1.0)
    samples: collections.deque[tuple[float, int]] = collections.deque([(progress.clock(), 0)])
    touched = loop.time()
    touching: concurrent.futures.Future[None] | None = None
    while True:
        await asyncio.sleep(tick)
        if loop.time() - touched >= pace.touch_every and (touching is None or touching.done()):
            # Not awaited: a hung disk must not keep the watchdog from cutting a slow client.
            touching = DISK.submit(upload.touch)
            touched = loop.time()
        now = progress.clock()
        samples.append((now, progress.received))
        while len(samples) > 1 and now - samples[1][0] >= pace.window:
            samples.popleft()
        since, received_then = samples[0]
        elapsed = now - since
        if elapsed < pace.window:
            continue
        arrived = progress.received - received_then
        if arrived == 0:
            body.set_exception(
                _TooSlow(f"No body bytes arrived for {pace.window:g} seconds; the upload was abandoned.")
            )
            return
        if arrived < pace.min_rate * elapsed:
            body.set_exception(
                _TooSlow(
                    f"Only {arrived} body bytes arrived in the last {elapsed:.0f} seconds, below the minimum "
                    f"of {pace.min_rate:g} bytes per second; the upload was abandoned."
                )
            )
            return


# Blob file work runs on threads of its own: fsyncs can take seconds, and must not queue up
# the default executor that asyncpg's name lookups and everything else share.
DISK = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="blob-io")


try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = (ctypes.c_size_t,)
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


class _Pipeline:
    """Hands pieces of an upload to threads, several pieces in flight.

    A few reused buffers: one fills on the loop while earlier ones are hashed and written, so
    a write that blocks on a busy disk does not stop the body from being read.
    Writes are positional (any order, on the shared disk threads); hash updates must stay in
    order, so they go through one thread of this upload's own. No buffer is allocated per
    piece, so memory stays flat (allocating a fresh megabyte per piece let the allocator's
    heap grow by a hundred megabytes on 1 GiB uploads).

    When the last upload in progress closes its pipeline, the heap is trimmed: the body pieces
    aiohttp reads (mostly under the mmap threshold) come from the main heap, and after a burst
    of 200 concurrent 1 MiB uploads its freed memory, scattered, stayed resident (90-130 MB
    idle, 53 MB trimmed). malloc_trim, unlike the automatic trim, also hands back free pages
    inside the heap; it takes milliseconds, in a thread.
    """

    in_progress = 0  # pipelines not yet closed, in this process

    def __init__(self, upload: _Upload) -> None:
        self.upload = upload
        # Buffers are added only while all are busy (a small upload, or a disk that keeps up,
        # needs one or two), up to PIPELINE_DEPTH.
        self.buffers = [bytearray(WRITE_PIECE)]
        # The thread work on each buffer (not asyncio wrappers, which cancellation detaches).
        self.busy: list[list[concurrent.futures.Future[None]]] = [[]]
        self.sent: collections.deque[int] = collections.deque()  # buffers in flight, oldest first
        self.hashing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
        self.filling = 0
        self.filled = 0
        self.offset = 0
        self.closed = False
        _Pipeline.in_progress += 1

    def add(self, chunk: memoryview) -> bool:
        """Copy what fits into the current buffer; True when it is full. `taken` says how
        much of the chunk was used."""
        taken = min(WRITE_PIECE - self.filled, len(chunk))
        self.buffers[self.filling][self.filled : self.filled + taken] = chunk[:taken]
        self.filled += taken
        self.taken = taken
        return self.filled == WRITE_PIECE

    async def flush(self) -> None:
        """Send the filled buffer off, then find a free one to fill next."""
        if self.filled:
            piece = memoryview(self.buffers[self.filling])[: self.filled]
            self.busy[self.filling] = [
                self.hashing.submit(self.upload.hash, piece),
                DISK.submit(self.upload.write_at, piece, self.offset),
            ]
            self.sent.append(self.filling)
            self.offset += self.filled
            self.filled = 0
        while self.sent and all(future.done() for future in self.busy[self.sent[0]]):
            await self._wait(self.busy[self.sent.popleft()])  # done: raises its error, if any
        if len(self.sent) < len(self.buffers):
            self.filling = next(i for i in range(len(self.buffers)) if i not in self.sent)
        elif len(self.buffers) < PIPELINE_DEPTH:
            self.buffers.append(bytearray(WRITE_PIECE))
            self.busy.append([])
            self.filling = len(self.buffers) - 1
        else:
            self.filling = self.sent.popleft()
            await self._wait(self.busy[self.filling])

    async def finish(self) -> None:
        await self.flush()
        for futures in self.busy:
            await self._wait(futures)

    @staticmethod
    async def _wait(futures: list[concurrent.futures.Future[None]]) -> None:
        try:
            for future in futures:
                await asyncio.wrap_future(future)
        except OSError as error:
            raise _storage_problem(error) from error

    def settle(self) -> None:
        """Block until the threads are done with our buffers and file (cleanup only)."""
        concurrent.futures.wait([future for futures in self.busy for future in futures])

    def close(self) -> None:
        """On the loop, once per pipeline (the count of those in progress is not locked)."""
        if self.closed:
            return
        self.closed = True
        self.hashing.shutdown(wait=False)
        _Pipeline.in_progress -= 1
        if _Pipeline.in_progress == 0 and _malloc_trim is not None:
            DISK.submit(_malloc_trim, 0)


async def _on_disk(call, *args):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.get_running_loop().run_in_executor(DISK, call, *args)
    except OSError as error:
        raise _storage_problem(error) from error


async def receive(
    root: Path,
    body: StreamReader,
    max_bytes: int,
    pace: Pace,
    algorithms: frozenset[str] = frozenset(),
) -> StoredBlob:
    """Stream a request body into a new blob; the caller records it or removes it.

    The body is hashed with SHA-256 (the ETag) and any other hashlib `algorithms` asked for.
    """
    loop = asyncio.get_running_loop()
    upload = _Upload(root, algorithms)
    pipeline = _Pipeline(upload)
    size = 0
    checked = False
    progress = _Progress(loop)
    watchdog = asyncio.create_task(_watch(body, progress, pace, upload))
    committing: concurrent.futures.Future[str] | None = None
    try:
        with progress.waiting_on_disk():
            await _on_disk(upload.open)
        while chunk := await _read(body):
            size += len(chunk)
            progress.received = size
            if size > max_bytes:
                raise Problem(
                    413, f"The upload is larger than the limit of {max_bytes} bytes.", {"Connection": "close"}
                )
            if not checked and size >= len(OGG_CAPTURE_PATTERN):
                # Refuse a non-Ogg body at its first bytes instead of storing all of it.
                head = bytes(pipeline.buffers[pipeline.filling][: pipeline.filled]) + chunk[:4]
                _check_ogg(head[: len(OGG_CAPTURE_PATTERN)])
                checked = True
            view = memoryview(chunk)
            while view:
                if pipeline.add(view):
                    with progress.waiting_on_disk():
                        await pipeline.flush()
                view = view[pipeline.taken :]
        if size == 0:
            raise Problem(400, "The upload is empty: send the Ogg audio as the request body.")
        if size < len(OGG_CAPTURE_PATTERN):
            _check_ogg(bytes(pipeline.buffers[pipeline.filling][: pipeline.filled]))
        watchdog.cancel()
        await pipeline.finish()
        committing = DISK.submit(upload.commit)
        try:
            name = await asyncio.wrap_future(committing)
        except OSError as error:
            raise _storage_problem(error) from error
    except BaseException:

        def clean_up() -> None:
            # Work already handed to a thread cannot be cancelled: wait for it before the
            # file is closed and removed under it. A commit that completed despite our
            # cancellation renamed the file into blobs/: remove that too.
            pipeline.settle()
            upload.discard()
            if committing is not None:
                concurrent.futures.wait([committing])
                if not committing.cancelled() and committing.exception() is None:
                    with contextlib.suppress(OSError):
                        os.unlink(blob_path(root, committing.result()))

        await asyncio.shield(loop.run_in_executor(DISK, clean_up))
        raise
    finally:
        watchdog.cancel()
        pipeline.close()
    return StoredBlob(name, size, {name_: hasher.digest() for name_, hasher in upload.hashers.items()})


def _check_ogg(head: bytes) -> None:
    if not head.startswith(OGG_CAPTURE_PATTERN):
        raise Problem(
            400,
            "The upload is not Ogg audio: it does not start with the capture pattern 'OggS'.",
            {"Connection": "close"},
        )


def _retire(root: Path, name: str) -> None:
    target = root / "trash" / Path(name).name
    os.rename(blob_path(root, name), target)
    # The grace period counts from now, not from when the blob was written.
    os.utime(target)


async def retire(root: Path, name: str) -> None:
    """Take a blob out of service (see the module's note on trash/); gone already is fine."""
    try:
        await asyncio.get_running_loop().run_in_executor(DISK, _retire, root, name)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not retire blob %s: %s", name, error)


async def remove(root: Path, name: str) -> None:
    """Unlink a blob that was never served (its upload failed before commit)."""
    try:
        await asyncio.get_running_loop().run_in_executor(DISK, os.unlink, blob_path(root, name))
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove blob %s: %s", name, error)


def open_blob(root: Path, name: str) -> IO[bytes]:
    # Opening an existing local file takes microseconds; doing it on the loop saves the
    # thread-pool round trip that makes FileResponse slow for small files.
    return open(blob_path(root, name), "rb")


# Below this size a blob is read and written in one go: cheaper than the sendfile machinery
# (which waits for the socket to be writable and loops in the event loop) for the small files
# UIs and probes fetch in bursts.
SMALL_BLOB = 64 * 1024


class BlobResponse(web.StreamResponse):
    """A blob (or a range of it) from an already opened file, with sendfile.

    Not web.FileResponse: that one stats and opens the file in the thread pool (slow for the
    small files playout and UIs probe) and replaces our content-derived ETag with one made
    from mtime and size. `file` is None for HEAD, which sends no body.

    `body_sent` tells how many bytes of the blob went out, also when the client broke off.
    """

    def __init__(self, file: IO[bytes] | None, offset: int, count: int, *, status: int = 200) -> None:
        super().__init__(status=status)
        self._file = file
        self._offset = offset
        self._count = count
        self.content_length = count
        self.body_sent = 0

    async def prepare(self, request: web.BaseRequest) -> web.AbstractStreamWriter | None:  # type: ignore[override]
        try:
            writer = await super().prepare(request)
            if self._file is None or request.method == hdrs.METH_HEAD or self._count == 0 or writer is None:
                return writer
            if self._count <= SMALL_BLOB:
                await self.write(os.pread(self._file.fileno(), self._count, self._offset))
                self.body_sent = self._count
            else:
                await self._sendfile(request, writer, self._file)
            await super().write_eof()
            return writer
        finally:
            self.close_file()

    async def _sendfile(self, request: web.BaseRequest, writer: web.AbstractStreamWriter, file: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        transport = request.transport
        if transport is None or transport.is_closing():
            # What aiohttp expects of a client that left (loop.sendfile would raise RuntimeError).
            raise ConnectionResetError("Connection lost")
        # asyncio leaves the file position after the last byte sent, also when the client breaks
        # off: that is how much went out.
        file.seek(self._offset)
        try:
            await loop.sendfile(transport, file, self._offset, self._count)
        except NotImplementedError:
            # No sendfile (uvloop): copy in pieces through a thread. pread keeps the position.
            left = self._count
            while left > 0:
                piece = await loop.run_in_executor(
                    DISK, os.pread, file.fileno(), min(left, WRITE_PIECE), self._offset + self.body_sent
                )
                if not piece:
                    break
                await self.write(piece)
                self.body_sent += len(piece)
                left -= len(piece)
        finally:
            sent = file.tell() - self._offset
            self.body_sent += sent
            # sendfile goes around aiohttp's writer, whose output_size is what the response sent
            # (its body_length, our access log's bytes).
            writer.output_size += sent

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def blob_exists(root: Path, name: str) -> bool:
    # A stat on the loop, like open_blob: microseconds on a local disk.
    return os.path.exists(blob_path(root, name))


def stale_tmp(root: Path, cutoff: float) -> list[Path]:
    """Temporary files untouched since `cutoff` (a timestamp): uploads cut off by a crash."""
    return _untouched_since((root / "tmp").glob("*.part"), cutoff)


def _untouched_since(paths: Iterable[Path], cutoff: float) -> list[Path]:
    found = []
    for path in paths:
        try:
            if path.stat().st_mtime < cutoff:
                found.append(path)
        except FileNotFoundError:  # removed meanwhile (by another replica, say)
            continue
    return found


def sweep(root: Path, max_age_seconds: float) -> list[Path]:
    """Remove temporary files untouched for max_age_seconds (uploads cut off by a crash) and
    retired blobs past the same grace period.

    Age is the file's mtime, which every write refreshes (and retiring sets), so an upload
    still arriving, on this replica or another sharing the folder, is never touched.
    """
    cutoff = time.time() - max_age_seconds
    removed = []
    for path in [*stale_tmp(root, cutoff), *_untouched_since((root / "trash").glob("*"), cutoff)]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
