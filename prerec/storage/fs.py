"""The folder backend: audio files on disk, and the write protocol that keeps each one whole.

Layout under the storage folder (which several replicas may share):
    tmp/<random>.part       uploads in progress
    blobs/<xx>/<random>.ogg finished blobs, each written once and never modified
    trash/<random>.ogg      replaced or deleted blobs, kept a while for readers still sending them
    uploads/<id>.<gen>.part resumable uploads' segments (see Segment)

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
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prerec.model import Piece, Tail, Upload
from prerec.problems import Problem
from prerec.storage import AllocateParts, Inventory, Progress, Stored

log = logging.getLogger(__name__)

FOLDERS = ("tmp", "blobs", "trash", "uploads")


def blob_path(root: Path, name: str) -> str:
    # A plain string join: this runs for every HEAD and GET, and pathlib's objects cost more
    # than the stat or open they lead to.
    return os.path.join(root, "blobs", name)


def storage_problem(error: OSError) -> Problem:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return Problem(507, "The storage folder is full; the upload was not stored.")
    return Problem(
        503, f"The storage folder cannot be written ({os.strerror(error.errno or 0)}).", {"Retry-After": "5"}
    )


def _assembled_name(upload_id: uuid.UUID) -> str:
    """A resumable upload's blob, named after it (see FileStorage._assemble)."""
    return f"{upload_id.hex[:2]}/{upload_id.hex}.ogg"


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


# Blob file work runs on threads of its own: fsyncs can take seconds, and must not queue up
# the default executor that asyncpg's name lookups and everything else share.
DISK = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="blob-io")


async def on_disk(call, *args):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.get_running_loop().run_in_executor(DISK, call, *args)
    except OSError as error:
        raise storage_problem(error) from error


def _or_problem(call, *args):  # type: ignore[no-untyped-def]
    # In the thread, so that the future handed back already carries the answer to give.
    try:
        return call(*args)
    except OSError as error:
        raise storage_problem(error) from error


@dataclass
class StagedFile:
    """One upload's temporary file; its blocking work runs on DISK threads."""

    root: Path
    tmp: Path = field(init=False)
    file: IO[bytes] | None = field(init=False, default=None)
    # Writes still running (or queued), and the commit once asked for: discard() waits for them.
    writes: list[concurrent.futures.Future[None]] = field(init=False, default_factory=list)
    committing: concurrent.futures.Future[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"

    def open(self) -> None:
        self.file = open(self.tmp, "xb", buffering=0)

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
        self.writes = [write for write in self.writes if not write.done()]
        write = DISK.submit(_or_problem, self.write_at, piece, offset)
        self.writes.append(write)
        return write

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

    def touch(self) -> concurrent.futures.Future[None]:
        return DISK.submit(self._touch)

    def _touch(self) -> None:
        # By path, not descriptor: once committed or discarded the name is gone and this is a
        # no-op, where a descriptor closed meanwhile could already number another file.
        try:
            os.utime(self.tmp)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not refresh temporary file %s: %s", self.tmp.name, error)

    async def finish(self) -> str:
        self.committing = DISK.submit(self.commit)
        try:
            return await asyncio.wrap_future(self.committing)
        except OSError as error:
            raise storage_problem(error) from error

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

    async def discard(self) -> None:
        await asyncio.get_running_loop().run_in_executor(DISK, self._discard)

    def _discard(self) -> None:
        # Work already handed to a thread cannot be cancelled: wait for it before the file is
        # closed and removed under it. A commit that completed despite our cancellation
        # renamed the file into blobs/: remove that too.
        committing = self.committing
        concurrent.futures.wait([*self.writes, *([committing] if committing is not None else [])])
        try:
            if self.file is not None:
                self.file.close()
                self.file = None
            self.tmp.unlink(missing_ok=True)
        except OSError as error:
            # Cleaning up must not hide the error that made us clean up; sweep() retries.
            log.warning("could not remove temporary file %s: %s", self.tmp.name, error)
        if committing is not None and not committing.cancelled() and committing.exception() is None:
            with contextlib.suppress(OSError):
                os.unlink(blob_path(self.root, committing.result()))


# Below this size a blob is read and written in one go: cheaper than the sendfile machinery
# (which waits for the socket to be writable and loops in the event loop) for the small files
# UIs and probes fetch in bursts.
SMALL_BLOB = 64 * 1024
# Without sendfile, a blob is copied through a thread in pieces of this size.
READ_PIECE = 1024 * 1024


class FileSource:
    """An opened blob file, sent with sendfile."""

    def __init__(self, file: IO[bytes], offset: int, count: int) -> None:
        self.file: IO[bytes] | None = file
        self.offset = offset
        self.count = count

    async def send(self, response: Any, request: Any, writer: Any) -> None:
        assert self.file is not None
        if self.count <= SMALL_BLOB:
            await response.write(os.pread(self.file.fileno(), self.count, self.offset))
            response.body_sent = self.count
            return
        loop = asyncio.get_running_loop()
        transport = request.transport
        if transport is None or transport.is_closing():
            # What aiohttp expects of a client that left (loop.sendfile would raise RuntimeError).
            raise ConnectionResetError("Connection lost")
        # asyncio leaves the file position after the last byte sent, also when the client breaks
        # off: that is how much went out.
        self.file.seek(self.offset)
        try:
            await loop.sendfile(transport, self.file, self.offset, self.count)
        except NotImplementedError:
            # No sendfile (uvloop): copy in pieces through a thread. pread keeps the position.
            left = self.count
            while left > 0:
                piece = await loop.run_in_executor(
                    DISK, os.pread, self.file.fileno(), min(left, READ_PIECE), self.offset + response.body_sent
                )
                if not piece:
                    break
                await response.write(piece)
                response.body_sent += len(piece)
                left -= len(piece)
        finally:
            sent = self.file.tell() - self.offset
            response.body_sent += sent
            # sendfile goes around aiohttp's writer, whose output_size is what the response sent
            # (its body_length, our access log's bytes).
            writer.output_size += sent

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _probe(tmp: Path) -> None:
    # A real write: os.access() says yes to root whatever the mount allows.
    with tempfile.NamedTemporaryFile(dir=tmp, prefix="ready-", suffix=".probe") as probe:
        probe.write(b"ok")
        probe.flush()
        os.fsync(probe.fileno())


def _untouched_since(paths: Iterable[Path], cutoff: float) -> list[Path]:
    found = []
    for path in paths:
        try:
            if path.stat().st_mtime < cutoff:
                found.append(path)
        except FileNotFoundError:  # removed meanwhile (by another replica, say)
            continue
    return found


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _stats(folder: Path, pattern: str) -> dict[str, Stored]:
    found = {}
    for path in folder.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile (by another replica, say)
            continue
        found[path.relative_to(folder).as_posix()] = Stored(stat.st_size, stat.st_mtime)
    return found


class Segment:
    """One lease generation's segment file of a resumable upload; methods run on DISK.

    Written at explicit positions, never with O_APPEND (not atomic across NFS clients). A
    segment is continued only by the generation that made it or one that took over after a
    clean release; any other takeover starts its own, so a zombie's late writes never land in
    bytes another writer's segment holds. Only bytes below a segment's recorded size (its
    Piece) are ever assembled."""

    def __init__(self, path: Path, start: int, generation: int = 0) -> None:
        self.path = path
        self.start = start  # the upload offset of the file's first byte
        self.generation = generation  # the segment generation, named in its Piece
        self.fd = -1
        self.syncing: concurrent.futures.Future[None] | None = None

    def open(self) -> None:
        existed = self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not existed:
            # The new name must survive a crash too, not only the bytes in it.
            _fsync_folder(self.path.parent)

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
        """Write the piece at its upload offset, on a DISK thread (receive.Pipeline's writer)."""
        return DISK.submit(_or_problem, self.write, piece, offset)

    def write(self, piece: memoryview, offset: int) -> None:
        position = offset - self.start
        done = 0
        while done < len(piece):
            done += os.pwrite(self.fd, piece[done:], position + done)
        # Each piece at once, not every WRITEBACK_STEP as a staged file does: the next fdatasync
        # comes within a second, or at the end of a PATCH of a few megabytes, which answers
        # only once all of it is on disk.
        _start_writeback(self.fd, position, len(piece))

    def sync(self) -> None:
        os.fdatasync(self.fd)

    async def persist(self, upto: int) -> Progress:
        """fdatasync; the segment's piece then reaches `upto` (the Appender's persist)."""
        self.syncing = DISK.submit(self.sync)
        try:
            await asyncio.wrap_future(self.syncing)
        except OSError as error:
            raise storage_problem(error) from error
        return Progress(upto, [Piece(self.start, upto - self.start, self.generation)], None)

    async def stop(self) -> None:
        """Close the file once an fdatasync still running is done (never under it)."""
        syncing = self.syncing

        def close() -> None:
            if syncing is not None:
                concurrent.futures.wait([syncing])
            self.close()

        await on_disk(close)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hash_ranges(ranges: list[tuple[Path, int]], algorithms: frozenset[str]) -> dict[str, bytes]:
    """SHA-256 and the other digests over the first `size` bytes of each file, in order."""
    hashers = {name: hashlib.new(name) for name in algorithms | {"sha256"}}
    for path, size in ranges:
        with open(path, "rb", buffering=0) as file:
            left = size
            while left > 0:
                piece = file.read(min(left, 1024 * 1024))
                if not piece:
                    raise RuntimeError(f"{path.name} is shorter than the {size} bytes recorded")
                for hasher in hashers.values():
                    hasher.update(piece)
                left -= len(piece)
    return {name: hasher.digest() for name, hasher in hashers.items()}


@dataclass(frozen=True)
class FileStorage:
    """Blobs in a folder (see the module's note on the layout and the write protocol)."""

    root: Path

    async def start(self) -> None:
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        pass

    async def ready(self) -> str | None:
        try:
            await asyncio.get_running_loop().run_in_executor(DISK, _probe, self.root / "tmp")
        except OSError as error:
            return f"the storage folder is not writable ({error.strerror})"
        return None

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def blob_path(self, name: str) -> str:
        return blob_path(self.root, name)

    async def stage(self) -> StagedFile:
        staged = StagedFile(self.root)
        await on_disk(staged.open)
        return staged

    async def open(self, name: str, size: int, start: int, length: int) -> FileSource | None:
        """The blob, opened for sending bytes start..start+length; None when it is missing or
        not `size` long (torn, or replaced meanwhile: never send fewer bytes than promised)."""
        try:
            # Opening an existing local file takes microseconds; doing it on the loop saves the
            # thread-pool round trip that makes FileResponse slow for small files.
            file = open(blob_path(self.root, name), "rb")
        except FileNotFoundError:
            return None
        except OSError as error:
            raise Problem(503, f"The stored file cannot be read ({error.strerror}).", {"Retry-After": "5"}) from error
        if os.fstat(file.fileno()).st_size != size:
            file.close()
            return None
        return FileSource(file, start, length)

    def exists(self, name: str) -> bool:
        # A stat on the loop, like open(): microseconds on a local disk.
        return os.path.exists(blob_path(self.root, name))

    async def presigned_url(self, name: str) -> str | None:
        return None  # a folder has no URL of its own: prerec sends the bytes

    def _retire(self, name: str) -> None:
        target = self.root / "trash" / Path(name).name
        os.rename(blob_path(self.root, name), target)
        # The grace period counts from now, not from when the blob was written.
        os.utime(target)

    async def retire(self, name: str) -> None:
        """Take a blob out of service (see the module's note on trash/); gone already is fine."""
        try:
            await asyncio.get_running_loop().run_in_executor(DISK, self._retire, name)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not retire blob %s: %s", name, error)

    async def remove(self, name: str) -> None:
        """Unlink a blob that was never served (its upload failed before commit)."""
        try:
            await asyncio.get_running_loop().run_in_executor(DISK, os.unlink, blob_path(self.root, name))
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not remove blob %s: %s", name, error)

    def stale_tmp(self, cutoff: float) -> list[Path]:
        """Temporary files untouched since `cutoff` (a timestamp): uploads cut off by a crash."""
        return _untouched_since((self.root / "tmp").glob("*.part"), cutoff)

    async def inventory(self) -> Inventory:
        return await on_disk(self._inventory)

    def _inventory(self) -> Inventory:
        # Leftovers are temporary files, by file name. Resumable uploads' segments are the
        # upload engine's to sweep (it asks the database which uploads still run).
        return Inventory(_stats(self.root / "blobs", "*/*"), _stats(self.root / "tmp", "*.part"))

    async def blob_size(self, name: str) -> int | None:
        return await on_disk(_size, blob_path(self.root, name))

    async def drop_leftover(self, ref: str) -> None:
        await on_disk(Path.unlink, self.root / "tmp" / Path(ref).name, True)

    async def sweep(self, max_age_seconds: float) -> list[str]:
        """Remove temporary files untouched for max_age_seconds (uploads cut off by a crash) and
        retired blobs past the same grace period; their paths under the folder.

        Age is the file's mtime, which every write refreshes (and retiring sets), so an upload
        still arriving, on this replica or another sharing the folder, is never touched.
        """
        return await asyncio.get_running_loop().run_in_executor(DISK, self._sweep, max_age_seconds)

    def _sweep(self, max_age_seconds: float) -> list[str]:
        cutoff = time.time() - max_age_seconds
        removed = []
        for path in [*self.stale_tmp(cutoff), *_untouched_since((self.root / "trash").glob("*"), cutoff)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.relative_to(self.root).as_posix())
        return removed

    # Resumable uploads

    def segment_path(self, upload_id: uuid.UUID, generation: int) -> Path:
        return self.root / "uploads" / f"{upload_id}.{generation}.part"

    async def segment(self, upload_id: uuid.UUID, generation: int, start: int) -> Segment:
        """The generation's segment, opened for writing; `start` is its first byte's offset."""
        segment = Segment(self.segment_path(upload_id, generation), start, generation)
        await on_disk(segment.open)
        return segment

    async def begin_upload(self, upload_id: uuid.UUID) -> str | None:
        """The name the upload's blob will have (segments are made by their writers): in the
        row, it is referenced while the upload is unfinished (db.referenced_blobs)."""
        return _assembled_name(upload_id)

    async def appender(
        self, upload: Upload, pieces: list[Piece], tail: Tail | None, allocate: AllocateParts
    ) -> Segment:
        """The segment of the upload's segment generation: continued where its recorded piece
        began (a clean release handed it over), else a new one from the durable offset."""
        generation = upload.segment_generation
        assert generation is not None, "an upload is written only under a lease"
        continued = [piece for piece in pieces if piece.generation == generation]
        return await self.segment(upload.id, generation, continued[0].start if continued else upload.durable)

    async def assemble(self, upload: Upload, pieces: list[Piece]) -> str:
        """The recorded pieces as one new blob named after the upload; the segments go. Done
        again by the next finisher when one was killed part way (see _assemble)."""
        return await on_disk(self._assemble, upload.id, upload.length, pieces)

    def _assemble(self, upload_id: uuid.UUID, length: int, pieces: list[Piece]) -> str:
        # Later segments are copied onto the first with copy_file_range (in the kernel; on NFS
        # 4.2 on the server), their recorded sizes only; the file is then cut at the length,
        # which drops whatever a refused checksum or a zombie left past it.
        position = 0
        for piece in pieces:
            if piece.start != position:
                raise RuntimeError(f"upload {upload_id}: its pieces leave a hole at {position}")
            position += piece.size
        if position != length:
            raise RuntimeError(f"upload {upload_id}: its pieces end at {position}, not at {length}")
        # Named after the upload, not a fresh token: a finisher killed after the rename below
        # left the blob whole under the name the next finisher looks for (its segments gone).
        name = _assembled_name(upload_id)
        destination = Path(blob_path(self.root, name))
        first = self.segment_path(upload_id, pieces[0].generation)
        if not first.exists() and destination.exists():
            if destination.stat().st_size != length:
                raise RuntimeError(f"upload {upload_id}: its assembled blob is not {length} bytes long")
            self._discard_upload(upload_id)  # what the dead finisher had not removed yet
            return name
        # Killed before the rename: done again from the start, the same bytes to the same places.
        with open(first, "r+b", buffering=0) as target:
            for piece in pieces[1:]:
                with open(self.segment_path(upload_id, piece.generation), "rb", buffering=0) as source:
                    copied = 0
                    while copied < piece.size:
                        done = os.copy_file_range(
                            source.fileno(), target.fileno(), piece.size - copied, copied, piece.start + copied
                        )
                        if done == 0:
                            raise RuntimeError(f"upload {upload_id}: a segment is shorter than recorded")
                        copied += done
            os.ftruncate(target.fileno(), length)
            os.fsync(target.fileno())
        destination.parent.mkdir(exist_ok=True)
        os.rename(first, destination)
        _fsync_folder(destination.parent)
        self._discard_upload(upload_id)
        return name

    async def hash_blob(self, name: str, algorithms: frozenset[str]) -> dict[str, bytes]:
        path = Path(blob_path(self.root, name))
        return await on_disk(lambda: _hash_ranges([(path, path.stat().st_size)], algorithms))

    async def stale_uploads(self, cutoff: float) -> dict[uuid.UUID, str | None]:
        """The uploads that have a segment untouched since `cutoff` (a timestamp)."""
        return await on_disk(self._stale_uploads, cutoff)

    def _stale_uploads(self, cutoff: float) -> dict[uuid.UUID, str | None]:
        owners: dict[uuid.UUID, str | None] = {}
        for path in _untouched_since((self.root / "uploads").glob("*.part"), cutoff):
            with contextlib.suppress(ValueError):
                owners[uuid.UUID(path.name.split(".", 1)[0])] = None
        return owners

    async def discard_upload(self, upload_id: uuid.UUID, store_ref: str | None) -> None:
        """Remove every segment of an upload (cancelled, expired, refused at its end)."""
        await on_disk(self._discard_upload, upload_id)

    def _discard_upload(self, upload_id: uuid.UUID) -> None:
        for path in (self.root / "uploads").glob(f"{upload_id}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
