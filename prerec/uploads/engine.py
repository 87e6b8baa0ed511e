"""The resumable-upload engine on the storage folder: create, append, finish, cancel, expire.

No HTTP here: the protocol front ends (tus.py) parse headers and shape answers; this module
moves bytes and the offset. State lives in PostgreSQL (db.py's "Resumable uploads"), so any
replica continues an upload another began.

Bytes go to the storage backend's Appender for the lease generation (a segment file written at
explicit positions, or parts of an S3 multipart upload numbered under the lease fence with the
bytes short of a part kept in the database). A writer records progress only once the store made
it durable, through the fenced db.advance: a reported offset is a promise that every byte
below it survives kill -9 of any replica. A finished upload is assembled into a blob and
committed through commit.commit_blob, the PUT's own path, with the upload's end in the same
transaction.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from prerec import db, digests
from prerec.commit import commit_blob
from prerec.config import SETTINGS_KEY, Settings
from prerec.model import NewUpload, Prerecording, Upload, http_date
from prerec.problems import DatabaseUnavailable, Problem
from prerec.storage import STORAGE, Appender, Storage, StoredBlob
from prerec.storage.receive import OGG_CAPTURE_PATTERN, Pipeline, check_ogg_at

log = logging.getLogger(__name__)
T = TypeVar("T")

# Progress is made durable and recorded at least this often while a body streams, and at
# least every COMMIT_BYTES: what a kill -9 can cost, at most.
COMMIT_SECONDS = 1.0
COMMIT_BYTES = 64 * 1024 * 1024
# A second writer waits this long for the holder to let go before it takes the lease by force.
TAKEOVER_SECONDS = 2.0
POLL_SECONDS = 0.05
# An idle holder (a body that brings nothing for a while) renews its lease this often.
RENEW_SECONDS = 3.0
# A HEAD waits this long at most for another request's finishing (assembly and commit) to end.
FINISH_WAIT_SECONDS = 30.0
SWEEP_BATCH = 100


def owner_name() -> str:
    """Who holds a lease: host, process and a boot id (a pid is reused after a restart)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


class _Stopped(Exception):
    """Set on a request body to make its reader stop: another writer asked for the lease
    ("release"), the upload was cancelled ("cancel"), or this process is shutting down
    ("shutdown"). The reader records what arrived, then answers."""

    def __init__(self, verb: str) -> None:
        super().__init__(verb)
        self.verb = verb


class _ReadAhead:
    """A PATCH body, read on while the lease is taken and the store opened.

    Those are database and disk round trips, a few milliseconds on every PATCH, in which the
    loop would idle with the body waiting in socket buffers; read into memory meanwhile, it
    is copied off the socket in parallel with them (5 MiB PATCHes: the lease's take was a
    tenth of each). Bounded per request and per process, so a burst of PATCHes held up by
    their leases cannot fill the memory. Errors of the body come out in order, after the
    bytes read before them."""

    held = 0  # bytes read ahead in this process, not yet handed on
    PER_REQUEST = 1024 * 1024
    PER_PROCESS = 16 * 1024 * 1024

    def __init__(self, body: StreamReader) -> None:
        self.body = body
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.error: BaseException | None = None
        self.eof = False
        self.dropped = False

    async def during(self, work: Awaitable[T]) -> T:
        reading = asyncio.ensure_future(self._read())
        try:
            return await work
        finally:
            # A read waiting for bytes leaves them in aiohttp's buffer; awaited, as aiohttp
            # allows one waiting reader at a time.
            reading.cancel()
            await asyncio.wait([reading])

    async def _read(self) -> None:
        try:
            while self.size < self.PER_REQUEST and _ReadAhead.held < self.PER_PROCESS and not self.eof:
                chunk = await self.body.readany()
                if self.dropped:  # the PATCH is over (cancelled twice): nobody takes these
                    return
                self.eof = not chunk
                self.chunks.append(chunk)
                self.size += len(chunk)
                _ReadAhead.held += len(chunk)
        except Exception as error:  # the body's to raise, in order, as a read of it would
            self.error = error

    async def readany(self) -> bytes:
        """The body's next bytes: those read ahead first."""
        if self.chunks:
            chunk = self.chunks.popleft()
            _ReadAhead.held -= len(chunk)
            return chunk
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return await self.body.readany()

    def drop(self) -> None:
        """Give back what was read ahead and not handed on (a refused PATCH)."""
        self.dropped = True
        _ReadAhead.held -= sum(len(chunk) for chunk in self.chunks)
        self.chunks.clear()


@dataclass
class _Writer:
    generation: int
    body: StreamReader


@dataclass
class _Hashers:
    """Hashes of an upload's bytes [0, position), kept by the process that wrote them."""

    position: int
    hashers: dict[str, Any]

    def copy(self) -> _Hashers:
        return _Hashers(self.position, {name: hasher.copy() for name, hasher in self.hashers.items()})


@dataclass(frozen=True)
class Checksum:
    """A checksum over one request's body (tus Upload-Checksum): a hashlib name and the digest."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True)
class Outcome:
    """What an append left: the row as it now is, and the final answer once it finished."""

    upload: Upload
    result: dict[str, Any] | None = None


def claims_json(claims: list[digests.Claim]) -> list[dict[str, str]]:
    return [
        {"header": claim.header, "algorithm": claim.algorithm, "value": base64.b64encode(claim.digest).decode()}
        for claim in claims
    ]


def _claims(upload: Upload) -> list[digests.Claim]:
    return [
        digests.Claim(item["header"], item["algorithm"], base64.b64decode(item["value"])) for item in upload.digests
    ]


def check_preconditions(if_match: str | None, if_none_match: bool, current: Prerecording | None) -> None:
    """The creation request's If-Match / If-None-Match: *, decided against what is stored now
    (inside the finishing transaction, so a racing writer cannot slip between)."""
    if if_none_match and current is not None:
        raise Problem(412, f"The precondition If-None-Match: * failed: a prerecording exists (ETag {current.etag}).")
    if if_match is None:
        return
    if current is None:
        raise Problem(412, "The precondition failed: nothing is stored at this key.")
    tags = [tag.strip() for tag in if_match.split(",")]
    if "*" not in tags and current.etag not in tags:
        # Word for word what a PUT answers (conditional.check_write).
        raise Problem(
            412, f"The precondition failed: the current ETag is {current.etag}, modified {http_date(current.modified)}."
        )


@dataclass
class Engine:
    app: web.Application
    owner: str = field(default_factory=owner_name)
    # The backend pid of this process's listening connection (the broadcaster's): a lease
    # stamped with it is taken at once when this process dies.
    listener_pid: Callable[[], int | None] = lambda: None
    writers: dict[uuid.UUID, _Writer] = field(default_factory=dict)
    hashers: dict[uuid.UUID, _Hashers] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.app[SETTINGS_KEY]

    @property
    def storage(self) -> Storage:
        return self.app[STORAGE]

    @property
    def expiry(self) -> float:
        return self.settings.upload_expiry_seconds

    def _connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return db.connection(self.app[db.POOL], self.settings.db_timeout_seconds)

    # Notices from other replicas (the broadcaster's listening connection hands them here)

    def notice(self, payload: str) -> None:
        try:
            notice = db.UploadNotice.parse(payload)
        except ValueError:
            log.warning("ignored a malformed upload notice %r", payload[:100])
            return
        writer = self.writers.get(notice.upload_id)
        if writer is not None and writer.generation == notice.generation:
            # As the stall watchdog does: the reader's next read raises, and it stops there.
            writer.body.set_exception(_Stopped(notice.verb))

    def stop_writers(self) -> None:
        """At shutdown: every body in flight stops, what arrived is recorded, and the client is
        told to resume elsewhere at once rather than cut at the shutdown timeout."""
        for writer in self.writers.values():
            writer.body.set_exception(_Stopped("shutdown"))

    # Creation and reading

    async def create(self, new: NewUpload) -> Upload:
        if new.length > self.settings.max_upload_bytes:
            raise Problem(
                413,
                f"The declared length {new.length} is larger than the limit of {self.settings.max_upload_bytes} bytes.",
            )
        if new.length < len(OGG_CAPTURE_PATTERN):
            raise Problem(
                400,
                f"The declared length is {new.length}: Ogg audio has at least the {len(OGG_CAPTURE_PATTERN)} bytes "
                "of its capture pattern 'OggS'.",
            )
        free = await asyncio.to_thread(self.storage.free_bytes)
        if free is not None and free < new.length:
            raise Problem(507, f"The storage folder has {free} bytes free, fewer than the {new.length} declared.")
        await self.check_target(new.event, new.start, new.if_match, new.if_none_match)
        upload_id = uuid.uuid4()
        store_ref = await self.storage.begin_upload(upload_id)
        try:
            upload = await self._record_creation(upload_id, new, store_ref)
        except BaseException:
            await asyncio.shield(self.storage.discard_upload(upload_id, store_ref))
            raise
        return upload

    async def _record_creation(self, upload_id: uuid.UUID, new: NewUpload, store_ref: str | None) -> Upload:
        async with self._connection() as conn, conn.transaction():
            upload = await db.create_upload(conn, upload_id, new, self.expiry, store_ref)
            await db.append_upload_event(conn, "upload-progress", upload)
        return upload

    async def check_target(self, event: uuid.UUID, start: datetime, if_match: str | None, if_none_match: bool) -> None:
        """A creation's preconditions, first look: a doomed upload is refused (412, as a PUT
        would be) before it has a row or a byte. The decision that counts is taken again when
        the upload finishes, inside the writing transaction."""
        if if_match is None and not if_none_match:
            return
        async with self._connection() as conn:
            current = await db.get_prerecording(conn, event, start)
        check_preconditions(if_match, if_none_match, current)

    async def get(self, upload_id: uuid.UUID) -> Upload:
        """The upload as stored (404 if unknown); ended ones are the caller's to answer."""
        async with self._connection() as conn:
            upload = await db.get_upload(conn, upload_id)
        if upload is None:
            raise Problem(404, f"There is no upload {upload_id}.")
        return upload

    async def settled(self, upload_id: uuid.UUID) -> Upload:
        """The upload once a holder on another request let go (≤ TAKEOVER_SECONDS), so the
        offset reported is the one the next append must use (the draft's §Concurrency; tusd
        locks on HEAD too). Never forced: a holder that does not answer keeps its bytes, and
        the offset reported is the durable one, which is never wrong, only perhaps behind.

        An upload complete but not finished (its finisher died) is finished here: a client that
        sees offset == length takes the upload as done and never sends another byte."""
        upload = await self.get(upload_id)
        deadline = time.monotonic() + TAKEOVER_SECONDS
        finishing_deadline = time.monotonic() + FINISH_WAIT_SECONDS
        asked: int | None = None
        while upload.state in ("receiving", "finishing"):
            complete = upload.durable == upload.length
            if upload.lease_owner is None and not complete:
                return upload
            async with self._connection() as conn:
                # A free or dead holder's lease is taken at once: nothing of it to wait for.
                taken = await db.acquire_lease(conn, upload_id, self.owner, self.listener_pid())
                if taken is None and upload.state == "receiving" and asked != upload.generation:
                    await db.request_release(conn, upload_id, upload.generation)
                    asked = upload.generation
            if taken is not None:
                return await self._settle_taken(taken)
            waiting = finishing_deadline if upload.state == "finishing" else deadline
            if time.monotonic() >= waiting:
                break
            await asyncio.sleep(POLL_SECONDS)
            upload = await self.get(upload_id)
        return upload

    async def _settle_taken(self, taken: Upload) -> Upload:
        clean = True
        try:
            if taken.durable == taken.length:
                clean = False
                with contextlib.suppress(Problem, db.Fenced):
                    await self._finish(taken)
        finally:
            async with self._connection() as conn:
                await db.release_lease(conn, taken.id, taken.generation, clean)
        return await self.get(taken.id)

    async def resumable(self, upload_id: uuid.UUID) -> Upload:
        """The upload settled, for a client asking where to resume (HEAD): 410 once it ended or
        expired, 503 while it is being finished; a finished one is returned (its end is the answer)."""
        upload = await self.settled(upload_id)
        if upload.state not in ("receiving", "finishing", "finished") or (
            upload.state == "receiving" and upload.expires_at <= datetime.now(UTC)
        ):
            # Expired but not swept yet is expired all the same: it can no longer be resumed.
            state = "expired" if upload.state == "receiving" else upload.state
            raise Problem(410, f"The upload {upload.id} has ended ({state}).")
        if upload.state == "finishing":
            # Not "offset == length" yet: a client takes that as done, and the finish may still fail.
            raise Problem(503, "The upload is being finished; ask again shortly.", {"Retry-After": "1"})
        return upload

    # Appending

    async def _acquire(self, upload_id: uuid.UUID) -> Upload:
        """Take the lease: ask a live holder to let go, poll, force after TAKEOVER_SECONDS.
        Never an endless 423: the wait is bounded, and the upload is taken in the end."""
        deadline = time.monotonic() + TAKEOVER_SECONDS
        asked: int | None = None
        while True:
            force = time.monotonic() >= deadline
            async with self._connection() as conn:
                # A resume: whoever watches sees the upload move again (within the cadence).
                taken = await db.acquire_lease(
                    conn, upload_id, self.owner, self.listener_pid(), force=force, progress=True
                )
                if taken is not None:
                    return taken
                upload = await db.get_upload(conn, upload_id)
                if upload is None:
                    raise Problem(404, f"There is no upload {upload_id}.")
                ended(upload)
                if upload.expires_at <= datetime.now(UTC):
                    raise Problem(410, f"The upload {upload_id} has expired.")
                if force and upload.state == "receiving":
                    # Forced in vain: the row changed under us (a new holder); go round again.
                    deadline = time.monotonic() + TAKEOVER_SECONDS
                if asked != upload.generation:
                    await db.request_release(conn, upload_id, upload.generation)
                    asked = upload.generation
            await asyncio.sleep(POLL_SECONDS)

    async def append(
        self,
        upload_id: uuid.UUID,
        offset: int,
        body: StreamReader,
        content_length: int | None,
        checksum: Checksum | None = None,
    ) -> Outcome:
        """Stream one request body into the upload at `offset`, then finish it if complete.

        Every byte that reached this process counts, also when the body is cut: what arrived
        is made durable and recorded before the error is answered. With a checksum nothing
        counts until the whole body matched."""
        ahead = _ReadAhead(body)
        try:
            # The common case in one statement: nobody holds the upload and the offset is
            # right (a client's next chunk). Anything else goes the careful way below.
            taken = await ahead.during(self._take_for_append(upload_id, offset))
            if taken is not None:
                upload = taken.upload
            else:
                careful = await ahead.during(self._careful_acquire(upload_id, offset, content_length))
                if isinstance(careful, Outcome):
                    return careful
                upload = careful
            generation = upload.generation
            self.writers[upload_id] = _Writer(generation, body)
            # In a task of its own: a server that cancels its handler when the client leaves
            # (aiohttp's handler_cancellation, on in its test server) must still have the bytes
            # that arrived recorded. The cancelled handler cuts the body and waits for that.
            work = asyncio.ensure_future(self._append_held(upload, taken, offset, ahead, content_length, checksum))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                body.set_exception(ConnectionResetError("the request was cancelled"))
                with contextlib.suppress(BaseException):
                    await work
                raise
            finally:
                if (writer := self.writers.get(upload_id)) is not None and writer.generation == generation:
                    del self.writers[upload_id]
        finally:
            ahead.drop()

    async def _take_for_append(self, upload_id: uuid.UUID, offset: int) -> db.Taken | None:
        async with self._connection() as conn:
            taken = await db.take_for_append(conn, upload_id, self.owner, self.listener_pid())
            if taken is not None and taken.upload.durable != offset:
                await db.release_lease(conn, upload_id, taken.upload.generation, clean=True)
                return None
        return taken

    async def _careful_acquire(self, upload_id: uuid.UUID, offset: int, content_length: int | None) -> Upload | Outcome:
        """The lease for an append at `offset`, when it was not free at once or the offset
        looked wrong: a replay, a wait for the holder, a 409 or 410 decided on the row."""
        upload = await self.get(upload_id)
        if upload.state != "receiving" or upload.durable != offset:
            replay = _replay(upload, offset, content_length)
            if replay is not None:
                return replay
            ended(upload)
            if upload.durable != offset:
                upload = await self.settled(upload_id)
                ended(upload)
                if upload.durable != offset:
                    raise _mismatch(upload, offset)
        try:
            return await self._acquire(upload_id)
        except Problem as problem:
            # Finished by another request while this one waited for the lease (a client that
            # retried the last PATCH): that answer, not a 410.
            if (
                problem.status == 410
                and (replay := _replay(await self.get(upload_id), offset, content_length)) is not None
            ):
                return replay
            raise

    async def _append_held(
        self,
        upload: Upload,
        taken: db.Taken | None,
        offset: int,
        ahead: _ReadAhead,
        content_length: int | None,
        checksum: Checksum | None,
    ) -> Outcome:
        generation = upload.generation
        clean = True
        try:
            if upload.durable != offset:
                raise _mismatch(upload, offset)
            if upload.durable == upload.length:
                # Complete but not finished: a finisher died. Finish it here.
                return Outcome(upload, await self._finish(upload))
            left = upload.length - upload.durable
            if content_length is not None and content_length > left:
                raise Problem(
                    400,
                    f"The body of {content_length} bytes goes past the declared length {upload.length} "
                    f"(offset {offset}, {left} bytes left).",
                    {"Connection": "close"},
                )
            upload, clean = await self._receive(upload, taken, ahead, checksum)
            if upload.durable == upload.length:
                return Outcome(upload, await self._finish(upload))
            return Outcome(upload)
        except asyncio.CancelledError:
            # A write may still be running in a thread: the next holder starts a segment of its own.
            clean = False
            raise
        except db.Fenced:
            clean = False
            self.hashers.pop(upload.id, None)
            current = await self.get(upload.id)
            if current.state == "finished" and upload.durable == current.length:
                # Fenced at its finish by a finisher that took over: all of this PATCH's
                # bytes are in what that one saved, so its answer is this PATCH's too.
                return Outcome(current, current.result)
            ended(current)
            raise Problem(
                409,
                "Another request took this upload over; resume from the offset it reports.",
                {"Upload-Offset": str(current.durable), "Connection": "close"},
            ) from None
        finally:
            if upload.lease_owner is not None:  # not let go with the last progress commit
                with contextlib.suppress(Exception):
                    async with self._connection() as conn:
                        await db.release_lease(conn, upload.id, generation, clean)

    async def _receive(
        self, upload: Upload, taken: db.Taken | None, ahead: _ReadAhead, checksum: Checksum | None
    ) -> tuple[Upload, bool]:
        """Read the body into the store, recording progress as it goes; returns the row and
        whether every write was joined and synced (a clean release). `taken`: the pieces and
        tail came with the lease; else they are read now."""
        generation = upload.generation
        if taken is not None:
            pieces, tail = taken.pieces, taken.tail
        else:
            async with self._connection() as conn:
                pieces = await db.upload_pieces(conn, upload.id)
                tail = await db.upload_tail(conn, upload.id)

        async def allocate(count: int) -> int:
            async with self._connection() as conn:
                return await db.allocate_parts(conn, upload.id, generation, count)

        body = ahead.body
        appender = await ahead.during(self.storage.appender(upload, pieces, tail, allocate))
        kept = self.hashers.pop(upload.id, None)
        hashers = kept if kept is not None and kept.position == upload.durable else None
        if checksum is not None:
            # The request's own hash, and the whole file's on a copy: swapped in only if it matches.
            saved = hashers
            hashers = hashers.copy() if hashers is not None else None
            own = hashlib.new(checksum.algorithm)
        if upload.durable == 0:
            algorithms = {claim.algorithm for claim in _claims(upload)} | {"sha256"}
            hashers = _Hashers(0, {name: hashlib.new(name) for name in algorithms})
        feed = dict(hashers.hashers) if hashers is not None else {}
        if checksum is not None:
            feed["checksum"] = own
        # The PUT's pipeline: buffers filled from the body while earlier ones are written and
        # hashed on threads, so neither a store that blocks nor the hashing stops the reading.
        pipeline = Pipeline(appender, frozenset(), hashers=feed, offset=upload.durable)
        stop: BaseException | None = None
        last_commit = time.monotonic()
        committed_bytes = upload.durable
        syncing: asyncio.Future[None] | None = None  # a commit() behind the reading
        checked = upload.durable >= len(OGG_CAPTURE_PATTERN)
        overflow = False
        try:

            async def record(upto: int, last: bool = False) -> None:
                """Make the bytes below `upto` (all written) durable, then record them; the
                `last` record of a body short of the length lets go of the lease with it."""
                nonlocal upload
                progress = await appender.persist(upto)
                # db.advance is one statement, atomic on its own: no BEGIN and COMMIT round
                # trips around it on every PATCH.
                async with self._connection() as conn:
                    upload = await db.advance(
                        conn,
                        upload.id,
                        generation,
                        upload.durable,
                        progress.offset,
                        self.expiry,
                        pieces=progress.pieces,
                        tail=progress.tail,
                        progress=True,
                        release=last and progress.offset < upload.length,
                    )

            async def commit(behind: bool = False, last: bool = False) -> None:
                """Record what is written. `behind`: while the body goes on being read (an
                fdatasync or a part sent to a store can take a good part of a second, in which
                the client would stall), only what had been written when it began; at most one
                such commit at a time."""
                nonlocal syncing, last_commit, committed_bytes
                if syncing is not None:
                    if behind and not syncing.done():
                        return
                    task, syncing = syncing, None
                    await task  # its error (Fenced, a storage problem) is this one's
                if not behind:
                    await pipeline.finish()
                last_commit = time.monotonic()
                written = pipeline.written
                if written == upload.durable:
                    return
                committed_bytes = written
                if behind:
                    syncing = asyncio.ensure_future(record(written))
                else:
                    await record(written, last)

            idle = 0.0
            while True:
                received = pipeline.offset + pipeline.filled  # bytes handed to the pipeline
                # Never a progress commit of the whole length: the body could still go past it
                # (below), and a complete upload is one to finish.
                pending = checksum is None and upload.durable < received < upload.length
                wait = COMMIT_SECONDS if pending else RENEW_SECONDS
                try:
                    async with asyncio.timeout(wait):
                        chunk = await ahead.readany()
                except TimeoutError:
                    idle += wait
                    if idle >= self.settings.read_timeout_seconds:
                        stop = Problem(
                            408,
                            f"No body bytes arrived for {idle:g} seconds; what arrived was kept.",
                            {"Connection": "close"},
                        )
                        break
                    # A body that pauses: make what arrived durable (a client that gives up
                    # now finds it counted), and keep the lease alive.
                    if pending:
                        await commit()
                    else:
                        async with self._connection() as conn:
                            await db.renew_lease(conn, upload.id, generation)
                    continue
                except (ConnectionError, HttpProcessingError, _Stopped) as error:
                    stop = error
                    chunk = _buffered(body)
                idle = 0.0
                if not chunk:
                    break
                view = memoryview(chunk)
                if len(view) > upload.length - received:
                    overflow = True
                    break
                if not checked:
                    check_ogg_at(view, received)
                    checked = received + len(view) >= len(OGG_CAPTURE_PATTERN)
                while view:
                    if pipeline.add(view):
                        await pipeline.flush()
                    view = view[pipeline.taken :]
                if stop is not None:
                    break
                if (
                    checksum is None
                    and (
                        time.monotonic() - last_commit >= COMMIT_SECONDS
                        or pipeline.offset - committed_bytes >= COMMIT_BYTES
                    )
                    and pipeline.offset < upload.length
                ):
                    await commit(behind=True)
            if overflow:
                # A body longer than declared is not the file the upload was created for: none
                # of it counts beyond what a progress commit recorded before (never the whole
                # length, see `pending`), or the upload would be finished (published) after
                # its client was told 400. It stays resumable from its offset.
                if syncing is not None:
                    task, syncing = syncing, None
                    await task
                if checksum is not None:
                    self._keep(upload.id, saved)
                raise Problem(
                    400,
                    f"The body goes past the declared length {upload.length}; none of it was kept past the "
                    f"offset {upload.durable}.",
                    {"Upload-Offset": str(upload.durable), "Connection": "close"},
                )
            if pipeline.offset + pipeline.filled == upload.durable and stop is None:
                raise Problem(400, "The PATCH has no body: send the bytes from the offset on.")
            if checksum is not None:
                await pipeline.finish()
                if isinstance(stop, Problem | _Stopped | ConnectionError | HttpProcessingError):
                    # A cut body cannot be verified: none of its bytes count.
                    self._keep(upload.id, saved)
                    raise _answer(stop, checksum=True)
                if own.digest() != checksum.digest:
                    self._keep(upload.id, saved)
                    raise Problem(
                        460,
                        f"The Upload-Checksum ({checksum.algorithm}) does not match the body received; none of "
                        f"its bytes were kept (the offset stays {upload.durable}).",
                    )
            await commit(last=True)
        except BaseException:
            # A commit behind the reading is let finish (what it records is durable), and the
            # writes and hashing still in flight must end before the writer lets go of its file
            # or buffers under them.
            if syncing is not None:
                await asyncio.gather(syncing, return_exceptions=True)
            await asyncio.shield(_join(pipeline.in_flight(), appender))
            raise
        finally:
            pipeline.close()
        await appender.stop()
        if hashers is not None:
            hashers.position = pipeline.written
            self.hashers[upload.id] = hashers
        if stop is not None:
            raise _answer(stop)
        return upload, True

    def _keep(self, upload_id: uuid.UUID, hashers: _Hashers | None) -> None:
        if hashers is not None:
            self.hashers[upload_id] = hashers

    # Finishing

    async def _finish(self, upload: Upload) -> dict[str, Any]:
        """Hash, assemble, and commit as PUT does (commit.commit_blob), with the upload's end
        in the save's transaction: exactly one prerecording event, and a writer that lost its
        lease (or an upload cancelled meanwhile) saves nothing."""
        generation = upload.generation
        async with self._connection() as conn:
            pieces = await db.upload_pieces(conn, upload.id)
        claims = _claims(upload)
        algorithms = frozenset(claim.algorithm for claim in claims)
        kept = self.hashers.pop(upload.id, None)
        async with self._connection() as conn:
            upload = await db.begin_finishing(conn, upload.id, generation)
        # Assembling gigabytes may outlast a lease: renewed, or another replica would take the
        # upload as abandoned and finish it a second time.
        name = await self._renewing(upload.id, generation, self.storage.assemble(upload, pieces))
        if kept is not None and kept.position == upload.length and algorithms <= kept.hashers.keys():
            computed = {algorithm: hasher.digest() for algorithm, hasher in kept.hashers.items()}
        else:
            # Bytes written elsewhere (another replica, an earlier process): read back from
            # the blob (an object store cannot read the parts of an upload not yet completed).
            computed = await self._renewing(upload.id, generation, self.storage.hash_blob(name, algorithms))
        result: dict[str, Any] = {}

        async def finished(conn: asyncpg.Connection, saved: db.Saved) -> None:
            result.update(
                status=201 if saved.created else 204,
                etag=saved.prerecording.etag,
                body=saved.prerecording.to_json() if saved.created else None,
            )
            await db.finish_upload(conn, upload.id, generation, result, self.expiry)

        try:
            await commit_blob(
                self.app,
                upload.event,
                upload.start,
                upload.type,
                StoredBlob(name, upload.length, computed),
                claims,
                check=lambda current: check_preconditions(upload.if_match, upload.if_none_match, current),
                also=finished,
                keep=True,
            )
        except (db.Fenced, DatabaseUnavailable):
            # Another finisher took over (it may be recording this very blob: the name is the
            # upload's), or the database failed (perhaps after committing): the blob stays, and
            # the upload stays finishing for the next finisher, who finds it assembled.
            raise
        except Problem as refusal:
            # Refused at its end (a precondition, a digest): the refusal is what the upload
            # answers from now on, and only then, as its holder still, the blob goes.
            async with self._connection() as conn:
                await db.fail_upload(
                    conn, upload.id, generation, {"status": refusal.status, "detail": refusal.detail}, self.expiry
                )
            await asyncio.shield(self.storage.remove(name))
            raise
        return result

    async def _renewing(self, upload_id: uuid.UUID, generation: int, work: Awaitable[T]) -> T:
        """Await `work` while renewing the lease every RENEW_SECONDS (Fenced stops it)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=RENEW_SECONDS)
                if done:
                    return task.result()
                async with self._connection() as conn:
                    await db.renew_lease(conn, upload_id, generation)
        finally:
            if not task.done():
                task.cancel()

    # Cancelling and expiring

    async def cancel(self, upload_id: uuid.UUID) -> None:
        """End an upload in progress and remove its bytes; a PATCH in flight stops."""
        async with self._connection() as conn:
            async with conn.transaction():
                cancelled = await db.cancel_upload(conn, upload_id, self.expiry)
                if cancelled is not None:
                    if cancelled.lease_owner is not None:
                        # Delivered at commit: the holder then finds the upload cancelled.
                        await db.request_cancel(conn, upload_id, cancelled.generation)
                    await db.append_upload_event(conn, "upload-cancelled", cancelled)
            if cancelled is None:
                upload = await db.get_upload(conn, upload_id)
                if upload is None:
                    raise Problem(404, f"There is no upload {upload_id}.")
                raise Problem(410, f"The upload {upload_id} has already ended ({upload.state}).")
        # Wait (bounded) for the holder to join its writes before removing the bytes under it.
        deadline = time.monotonic() + TAKEOVER_SECONDS
        upload = cancelled
        while upload.lease_owner is not None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            upload = await self.get(upload_id)
        self.hashers.pop(upload_id, None)
        await self.storage.discard_upload(upload_id, cancelled.store_ref)

    async def sweep(self) -> list[uuid.UUID]:
        """Expire due uploads (their bytes go) and forget old tombstones; every replica runs it."""
        async with self._connection() as conn:
            async with conn.transaction():
                expired = await db.expire_due(conn, SWEEP_BATCH, self.expiry)
                for upload in expired:
                    await db.append_upload_event(conn, "upload-expired", upload)
            await db.delete_tombstones(conn, SWEEP_BATCH)
        for upload in expired:
            self.hashers.pop(upload.id, None)
            await self.storage.discard_upload(upload.id, upload.store_ref)
            log.info(
                "upload %s expired at offset %d of %d; its bytes were removed", upload.id, upload.durable, upload.length
            )
        await self._sweep_leftovers()
        return [upload.id for upload in expired]

    async def _sweep_leftovers(self) -> None:
        """Remove bytes no upload in progress owns: a crash between an upload's end being
        committed and its bytes being removed leaves them (segments, a multipart upload). Only
        old ones (untouched or begun PREREC_TMP_MAX_AGE_SECONDS ago), so the bytes of an upload
        being created are never taken."""
        cutoff = time.time() - self.settings.tmp_max_age_seconds
        owners = await self.storage.stale_uploads(cutoff)
        for upload_id, store_ref in owners.items():
            async with self._connection() as conn:
                upload = await db.get_upload(conn, upload_id)
            if upload is None or upload.state not in ("receiving", "finishing"):
                await self.storage.discard_upload(upload_id, store_ref)
                log.warning("removed the bytes of upload %s, which has ended or is unknown", upload_id)

    async def sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:  # one failed round must not end the sweeping for good
                log.warning("could not sweep expired uploads: %r", error)
            await asyncio.sleep(min(self.expiry / 10, 60.0))


async def _join(work: list[concurrent.futures.Future[None]], appender: Appender) -> None:
    await asyncio.gather(*(asyncio.wrap_future(future) for future in work), return_exceptions=True)
    await appender.stop()


def _buffered(body: StreamReader) -> bytes:
    """What aiohttp had received of a body before it was cut or stopped.

    Its reader raises the error before handing over what it still buffers; those bytes reached
    this process and count (a client resuming from the offset need not send them again). No
    public call returns them once the error is set, hence the private one."""
    try:
        return body._read_nowait(-1) if body._buffer else b""
    except Exception:  # the private API changed: lose these bytes, never the upload
        return b""


def ended(upload: Upload) -> None:
    """Refuse to go on with an upload that ended (410), naming how."""
    if upload.state in ("receiving", "finishing"):
        return
    if upload.state == "failed" and upload.result is not None:
        raise Problem(
            410, f"The upload ended refused ({upload.result.get('status')}): {upload.result.get('detail', '')}".strip()
        )
    raise Problem(410, f"The upload {upload.id} has ended ({upload.state}).")


def _replay(upload: Upload, offset: int, content_length: int | None) -> Outcome | None:
    """A finished upload asked again at its end: the answer it gave (the client lost it). Not
    for a body with bytes: they go past the length, and are refused as at any other offset."""
    if upload.state == "finished" and offset == upload.length and not content_length:
        return Outcome(upload, upload.result)
    return None


def _mismatch(upload: Upload, offset: int) -> Problem:
    return Problem(
        409,
        f"The Upload-Offset {offset} is not the upload's offset {upload.durable}; resume from {upload.durable}.",
        {"Upload-Offset": str(upload.durable)},
    )


def _answer(stop: BaseException, checksum: bool = False) -> Problem:
    """How a body that ended early is answered, after what arrived was recorded."""
    if isinstance(stop, Problem):
        return stop
    if isinstance(stop, _Stopped):
        if stop.verb == "shutdown":
            return Problem(
                503,
                "This replica is shutting down; the bytes that arrived were kept: resume on another from the "
                "offset it reports.",
                {"Retry-After": "1", "Connection": "close"},
            )
        if stop.verb == "cancel":
            return Problem(410, "The upload was cancelled while this request was under way.", {"Connection": "close"})
        return Problem(400, "Another request took this upload over; this one stopped.", {"Connection": "close"})
    kept = "none of its bytes were kept" if checksum else "the bytes that arrived were kept"
    return Problem(400, f"The body was cut off before its end; {kept}.", {"Connection": "close"})


ENGINE = web.AppKey("upload_engine", Engine)
