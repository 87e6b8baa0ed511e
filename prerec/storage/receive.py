"""Streaming a request body into a new blob, whatever the backend.

The body is read as it arrives, refused early when it is too large or not Ogg, cut off when
its client stalls or drips, hashed in order on a thread of its own, and handed in pieces to
the backend's staged writer (Staged), several pieces in flight, in a few reused buffers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import hashlib
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from prerec.problems import Problem
from prerec.storage import Staged, Storage, StoredBlob

log = logging.getLogger(__name__)

OGG_CAPTURE_PATTERN = b"OggS"
# Pieces of an upload being hashed and written at once, at most.
PIPELINE_DEPTH = 4
# Writes go to a worker thread in pieces of this size: large enough that the thread hop and
# the hashing call are amortised (64 KiB pieces measured clearly slower), small enough that
# an upload holds only a couple of them in memory.
WRITE_PIECE = 1024 * 1024


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


async def _watch(body: StreamReader, progress: _Progress, pace: Pace, staged: Staged) -> None:
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
            touching = staged.touch()
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


try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = (ctypes.c_size_t,)
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


class Pieces(Protocol):
    """Where a pipeline writes: a new blob (Staged), or a resumable upload's segment."""

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]: ...


# Buffers of pipelines that closed, for the next ones. A resumable upload in 5 MiB PATCHes opens
# a pipeline per PATCH: fresh buffers each time (mmap'd, then zeroed page by page) took a tenth
# of the worker's loop in such an upload (py-spy). The spares go once the process has had no upload for a moment.
_spare: list[bytearray] = []
# Every such list of buffers kept for the next uploads (the pipelines' own, a backend's part
# buffers: keep_between_uploads), emptied together.
_kept: list[list[Any]] = [_spare]
# How long the process must be without an upload before its heap is trimmed (see Pipeline).
TRIM_AFTER_SECONDS = 0.5
_trimming: asyncio.TimerHandle | None = None
# Idle one-thread executors of closed pipelines, for the next ones: a resumable upload sent in
# 5 MiB PATCHes makes a pipeline a PATCH, and a new executor starts its thread at the first
# submit, which blocks the event loop until that thread runs (0.2 ms idle; p90 4 ms with both
# cores of the bench machine busy).
_spare_hashing: list[concurrent.futures.ThreadPoolExecutor] = []


def _buffer() -> bytearray:
    return _spare.pop() if _spare else bytearray(WRITE_PIECE)


def keep_between_uploads(spares: list[Any]) -> list[Any]:
    """Have `spares` (a backend's buffers kept for the next uploads) emptied with the
    pipelines' own once the process has had no upload for a moment. Add to it only while an
    upload is in progress (Pipeline.in_progress), or it may be kept past that moment."""
    _kept.append(spares)
    return spares


def _trim_when_idle() -> None:
    global _trimming
    _trimming = None
    if Pipeline.in_progress == 0:
        for spares in _kept:
            spares.clear()
        if _malloc_trim is not None:
            # malloc_trim takes milliseconds: not on the loop (nor at all once it shuts down).
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().run_in_executor(None, _malloc_trim, 0)


class Pipeline:
    """Hands pieces of an upload to threads, several pieces in flight.

    A few reused buffers: one fills on the loop while earlier ones are hashed and written, so
    a write that blocks on a busy disk does not stop the body from being read.
    Writes are positional (any order, on the backend's threads); hash updates must stay in
    order, so they go through one thread of this upload's own. No buffer is allocated per
    piece, so memory stays flat (allocating a fresh megabyte per piece let the allocator's
    heap grow by a hundred megabytes on 1 GiB uploads).

    Once the last upload in progress has closed its pipeline and no other began for
    TRIM_AFTER_SECONDS, the heap is trimmed: the body pieces aiohttp reads (mostly under the
    mmap threshold) come from the main heap, and after a burst of 200 concurrent 1 MiB uploads
    its freed memory, scattered, stayed resident (90-130 MB idle, 53 MB trimmed). malloc_trim,
    unlike the automatic trim, also hands back free pages inside the heap. Not at once: the
    PATCHes of one resumable upload follow each other closely, and each would trim a heap the
    next one grows again.
    """

    in_progress = 0  # pipelines not yet closed, in this process

    def __init__(
        self, staged: Pieces, algorithms: frozenset[str], hashers: dict[str, Any] | None = None, offset: int = 0
    ) -> None:
        """`hashers` continue hashes begun elsewhere (a resumable upload's), fed from
        `offset`, the position of the first byte added."""
        self.staged = staged
        self.hashers = hashers if hashers is not None else {name: hashlib.new(name) for name in algorithms | {"sha256"}}
        # Buffers are added only while all are busy (a small upload, or a disk that keeps up,
        # needs one or two), up to PIPELINE_DEPTH.
        global _trimming
        if _trimming is not None:
            _trimming.cancel()
            _trimming = None
        self.buffers = [_buffer()]
        # The thread work on each buffer (not asyncio wrappers, which cancellation detaches).
        self.busy: list[list[concurrent.futures.Future[None]]] = [[]]
        self.sent: collections.deque[int] = collections.deque()  # buffers in flight, oldest first
        self.ends = [0]  # where each buffer's piece ends
        # One thread: the hashes take the pieces in order.
        self.hashing = (
            _spare_hashing.pop()
            if _spare_hashing
            else concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
        )
        self.filling = 0
        self.filled = 0
        self.offset = offset  # bytes up to here are handed to the threads
        self.written = offset  # bytes up to here are written and hashed
        self.closed = False
        Pipeline.in_progress += 1

    def hash(self, piece: bytes | bytearray | memoryview) -> None:
        for hasher in self.hashers.values():
            hasher.update(piece)

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
                self.hashing.submit(self.hash, piece),
                self.staged.submit(piece, self.offset),
            ]
            self.sent.append(self.filling)
            self.offset += self.filled
            self.ends[self.filling] = self.offset
            self.filled = 0
        while self.sent and all(future.done() for future in self.busy[self.sent[0]]):
            await self._settle()  # done: raises its error, if any
        if len(self.sent) < len(self.buffers):
            self.filling = next(i for i in range(len(self.buffers)) if i not in self.sent)
        elif len(self.buffers) < PIPELINE_DEPTH:
            self.buffers.append(_buffer())
            self.busy.append([])
            self.ends.append(0)
            self.filling = len(self.buffers) - 1
        else:
            self.filling = await self._settle()

    async def _settle(self) -> int:
        """Wait for the oldest buffer in flight; it is free again."""
        index = self.sent[0]
        await self._wait(self.busy[index])
        self.sent.popleft()
        self.written = self.ends[index]
        return index

    async def finish(self) -> None:
        """Send what is buffered and wait until every piece is written and hashed; the
        pipeline may go on being filled afterwards."""
        await self.flush()
        while self.sent:
            await self._settle()

    def in_flight(self) -> list[concurrent.futures.Future[None]]:
        """The thread work not yet joined, to wait for before the file is closed under it."""
        return [future for futures in self.busy for future in futures if not future.done()]

    @staticmethod
    async def _wait(futures: list[concurrent.futures.Future[None]]) -> None:
        # A storage failure comes out of a write as the Problem to answer (Staged.submit).
        for future in futures:
            await asyncio.wrap_future(future)

    def digests(self) -> dict[str, bytes]:
        return {name: hasher.digest() for name, hasher in self.hashers.items()}

    def close(self) -> None:
        """On the loop, once per pipeline (the count of those in progress is not locked)."""
        if self.closed:
            return
        global _trimming
        self.closed = True
        Pipeline.in_progress -= 1
        for index, buffer in enumerate(self.buffers):
            # Never one a thread may still read (the write of a cut upload, in flight).
            if len(_spare) < PIPELINE_DEPTH and all(future.done() for future in self.busy[index]):
                _spare.append(buffer)
        self.buffers = []
        if Pipeline.in_progress == 0:
            if _trimming is not None:
                _trimming.cancel()
            _trimming = asyncio.get_running_loop().call_later(TRIM_AFTER_SECONDS, _trim_when_idle)
        if len(_spare_hashing) < PIPELINE_DEPTH and all(future.done() for futures in self.busy for future in futures):
            _spare_hashing.append(self.hashing)
        else:
            self.hashing.shutdown(wait=False)


async def receive(
    storage: Storage,
    body: StreamReader,
    max_bytes: int,
    pace: Pace,
    algorithms: frozenset[str] = frozenset(),
) -> StoredBlob:
    """Stream a request body into a new blob; the caller records it or removes it.

    The body is hashed with SHA-256 (the ETag) and any other hashlib `algorithms` asked for.
    """
    loop = asyncio.get_running_loop()
    staged = await storage.stage()
    pipeline = Pipeline(staged, algorithms)
    size = 0
    checked = False
    progress = _Progress(loop)
    watchdog = asyncio.create_task(_watch(body, progress, pace, staged))
    try:
        while chunk := await _read(body):
            size += len(chunk)
            progress.received = size
            if size > max_bytes:
                raise Problem(
                    413, f"The upload is larger than the limit of {max_bytes} bytes.", {"Connection": "close"}
                )
            if not checked:
                # Refuse a non-Ogg body at its first bytes instead of storing all of it.
                check_ogg_at(chunk, size - len(chunk))
                checked = size >= len(OGG_CAPTURE_PATTERN)
            view = memoryview(chunk)
            while view:
                if pipeline.add(view):
                    with progress.waiting_on_disk():
                        await pipeline.flush()
                view = view[pipeline.taken :]
        if size == 0:
            raise Problem(400, "The upload is empty: send the Ogg audio as the request body.")
        if size < len(OGG_CAPTURE_PATTERN):
            _not_ogg()  # the start of the pattern, but not all of it
        watchdog.cancel()
        await pipeline.finish()
        name = await staged.finish()
    except BaseException as error:
        if isinstance(error, Problem) and error.status == 503:
            # The store did not answer: its cleanup (an object store's abort) would wait out
            # the timeout a second time before the client hears. Done behind the answer; what
            # it cannot do, `gc` finds.
            _cleanup(staged.discard())
        else:
            # Shielded: a second cancellation must not leave the cleanup half done.
            await asyncio.shield(staged.discard())
        raise
    finally:
        watchdog.cancel()
        pipeline.close()
    return StoredBlob(name, size, pipeline.digests())


_cleaning: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references


def _cleanup(work: Coroutine[Any, Any, None]) -> None:
    """Run a failed upload's cleanup behind its answer (see receive)."""
    task = asyncio.get_running_loop().create_task(work)
    _cleaning.add(task)
    task.add_done_callback(_cleaned)


def _cleaned(task: asyncio.Task[None]) -> None:
    _cleaning.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("could not clean up after a failed upload: %r", error)


async def finish_cleanups(timeout: float) -> None:
    """At shutdown, before the storage closes under them: the cleanups still running, waited
    for at most `timeout` (what they leave, `gc` finds)."""
    if _cleaning:
        await asyncio.wait(list(_cleaning), timeout=timeout)


def check_ogg_at(piece: bytes | memoryview, position: int) -> None:
    """The bytes of a file that arrives in pieces (a body's chunks, a resumable upload's
    requests): the piece at `position` goes on with the capture pattern where it lies. Each
    piece is checked where it lands, never as if it began the file: one request may bring 'Og'
    and the next 'gS…', and 'MZ' then 'OggS…' is not Ogg."""
    expected = OGG_CAPTURE_PATTERN[position:]
    if bytes(piece[: len(expected)]) != expected[: len(piece)]:
        _not_ogg()


def _not_ogg() -> None:
    raise Problem(
        400,
        "The upload is not Ogg audio: it does not start with the capture pattern 'OggS'.",
        {"Connection": "close"},
    )
