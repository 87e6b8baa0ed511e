"""The S3 backend: audio as objects in a bucket of any S3-compatible store (PREREC_STORAGE_URL).

Layout under the URL's prefix:
    blobs/<xx>/<random>.ogg   finished blobs, each under a new unique key, written once
    trash/<xx>/<random>.ogg   zero-byte markers: the blob of that name was retired at the
                              marker's LastModified, and is deleted once that is a grace period ago
    blobs/uploads/<id>.ogg    a resumable upload's object (blob name `uploads/<id>.ogg`): a
                              multipart upload from its creation until it is complete (UploadParts)

The write protocol is the folder's, in S3's terms. An upload streams into a multipart upload of
a new key (never over a live one), one part per filled buffer while the body still arrives; a
body smaller than one part is sent by one PutObject at its end. Only once the store has the
whole object (CompleteMultipartUpload) does the database point the key at it, and the blob it
replaced is retired after that commit. A refused or cut upload aborts its multipart upload; a
crash leaves one behind, which `gc` lists and aborts (and a bucket lifecycle rule
AbortIncompleteMultipartUpload catches too, see docs/deploy.md).

Blobs are retired by marker, not deleted, for the folder's reason: a download of the replaced
blob may still be under way on another replica.

Every call to the store is bounded by PREREC_S3_TIMEOUT_SECONDS and turned into a 503 with
Retry-After past it, so a store that is down or frozen never hangs a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import logging
import struct
import termios
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore import handlers
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from prerec.config import BucketUrl
from prerec.model import Piece, Tail, Upload
from prerec.problems import Problem
from prerec.storage import AllocateParts, Inventory, Progress, StorageUnavailable, Stored
from prerec.storage.receive import Pipeline, keep_between_uploads

log = logging.getLogger(__name__)

# S3 takes parts of 5 MiB to 5 GiB (the last one shorter), at most 10,000 of them: 8 MiB parts
# carry an upload of up to 78 GiB, far past PREREC_MAX_UPLOAD_BYTES' sensible values.
PART_SIZE = 8 * 1024 * 1024
# Parts on their way to the store at once, in the whole process: each holds a part's buffer
# until the store has it. An upload has at most one part in flight and one buffer filling.
PARTS_IN_FLIGHT = 8
# The store's smallest part but the last: a resumable upload keeps fewer bytes than this past
# its last part in the database (its tail) until more arrive.
MIN_PART = 5 * 1024 * 1024
# Resumable uploads' objects: blobs/uploads/<upload id>.ogg, apart from plain uploads' keys so
# that `gc` leaves their multipart uploads (paused for hours, alive) to the upload engine.
UPLOADS = "uploads"
# A blob read back for its digests is hashed on a thread in pieces of about this size.
HASH_PIECE = 1024 * 1024
RETRY = {"Retry-After": "5"}
# Connections to the store, at most, per process (botocore's default is 10).
MAX_POOL_CONNECTIONS = 64
# A download whose client takes nothing for this long, while a write to it waits, lets go of
# its connection to the store (see ObjectSource).
HOLD_SECONDS = 2.0
# What the store says when an object or upload is not there (HEAD answers carry no code).
MISSING = {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class _Missing(Exception):
    """The object (or multipart upload) asked for is not in the store."""


@dataclass
class S3Storage:
    """Blobs in a bucket (see the module's note on the layout and the write protocol)."""

    url: BucketUrl
    endpoint_url: str | None
    region: str | None
    addressing_style: str
    timeout: float
    presigned_get_seconds: int = 0
    client: Any = field(init=False, default=None)
    _stack: contextlib.AsyncExitStack = field(init=False, default_factory=contextlib.AsyncExitStack)
    _in_flight: asyncio.Semaphore = field(init=False, default_factory=lambda: asyncio.Semaphore(PARTS_IN_FLIGHT))
    # Calls the store let time out, and whether it has answered none since (take_turn).
    _stalls: int = field(init=False, default=0)
    _stalled: bool = field(init=False, default=False)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.url.bucket}/{self.url.prefix}{where}"

    def key(self, folder: str, name: str) -> str:
        return f"{self.url.prefix}{folder}/{name}"

    async def start(self) -> None:
        config = AioConfig(
            # botocore's default CRC checksums are refused by MinIO, Ceph and others.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": self.addressing_style},
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            # One retry: every call runs under our own timeout, and a request waiting out
            # botocore's backoff is a client waiting for its answer. (Its `max_attempts` counts
            # the retries alone: 2 made three tries, the last after up to 2 s of backoff.)
            retries={"total_max_attempts": 2, "mode": "standard"},
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        self.client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region or None, config=config
            )
        )
        # botocore has a file-like body (a part's) wait for the store's "100 Continue"
        # (add_expect_header), and aiohttp waits for it with no bound of its own: behind a
        # store or proxy that ignores Expect every part would wait out our timeout. Parts go
        # without it, as they did as bytes.
        self.client.meta.events.unregister("before-call.s3", handlers.add_expect_header)
        if self.client.meta.region_name is None:
            log.info("no region set for the object store; signing for us-east-1")
        wrong = await self._bucket_problem()
        if wrong is not None:
            await self.close()
            raise StorageUnavailable(f"the object store {self.describe()} cannot be used: {wrong}")

    async def _bucket_problem(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.head_bucket(Bucket=self.url.bucket)
        except TimeoutError:
            return f"it did not answer within {self.timeout:g} s (PREREC_S3_TIMEOUT_SECONDS)"
        except NoCredentialsError:
            return "no credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        except ClientError as error:
            code = _code(error)
            if code in ("404", "NoSuchBucket"):
                return f"the bucket {self.url.bucket!r} does not exist"
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return f"the bucket {self.url.bucket!r} refuses these credentials ({code})"
            return f"the bucket {self.url.bucket!r} answered {code}"
        except (BotoCoreError, aiohttp.ClientError, OSError) as error:
            return f"it cannot be reached ({error})"
        return None

    async def close(self) -> None:
        await self._stack.aclose()

    async def ready(self) -> str | None:
        wrong = await self._bucket_problem()
        return None if wrong is None else f"the object store: {wrong}"

    def free_bytes(self) -> int | None:
        return None  # a bucket has no free space to ask for

    async def take_turn(self) -> None:
        """A place among PARTS_IN_FLIGHT. Under load the wait is as long as the parts ahead
        take, as long as the store answers them; but an upload that queued behind parts the
        store stopped answering (one timed out while it waited, none answered since) is
        answered 503 at once, not after its own part waited out the timeout too."""
        if not self._in_flight.locked():
            await self._in_flight.acquire()
            return
        stalls = self._stalls
        await self._in_flight.acquire()
        if self._stalls != stalls and self._stalled:
            self._in_flight.release()
            raise Problem(
                503,
                f"The object store did not answer the parts ahead of this one within {self.timeout:g} s.",
                RETRY,
            )

    async def call(self, what: str, call: Awaitable[Any]) -> Any:
        """One call to the store, bounded by the timeout; its failure as the Problem to answer,
        except a missing object or upload (_Missing), which callers decide about."""
        try:
            async with asyncio.timeout(self.timeout):
                answer = await call
        except TimeoutError:
            self._stalls += 1
            self._stalled = True
            raise Problem(503, f"The object store did not answer within {self.timeout:g} s ({what}).", RETRY) from None
        except ClientError as error:
            self._stalled = False  # it answered
            if _code(error) in MISSING:
                raise _Missing from error
            message = error.response.get("Error", {}).get("Message", "")
            raise Problem(503, f"The object store refused {what}: {_code(error)} {message}".rstrip(), RETRY) from error
        except (BotoCoreError, aiohttp.ClientError, OSError) as error:
            raise Problem(503, f"The object store cannot be reached ({what}): {error}", RETRY) from error
        self._stalled = False
        return answer

    # Plain uploads

    async def stage(self, name: str | None = None) -> StagedObject:
        """A new object under a fresh name (or `name`: copy-to-bucket keeps the folder's names)."""
        return StagedObject(self, name or _new_name())

    # Downloads

    def exists(self, name: str) -> bool:
        # HEAD answers from the database alone: asking the store would cost every HEAD a
        # round trip, and a blob that went missing shows at GET (503) and in `gc`.
        return True

    async def open(self, name: str, size: int, start: int, length: int) -> ObjectSource | None:
        """The blob's bytes start..start+length, asked for before any header is sent (so a
        store that is down is a 503); None when the object is missing or not `size` long."""
        key = self.key("blobs", name)
        if length == 0:
            return ObjectSource(self, None, key, None, start, start)
        try:
            answer = await self.get_range("reading a blob", key, start, start + length)
        except _Missing:
            return None
        except Problem as problem:
            if "InvalidRange" in problem.detail:  # shorter than the row says: torn
                return None
            raise
        total = answer.get("ContentRange", "").rpartition("/")[2]
        if total != str(size) or answer["ContentLength"] != length:
            answer["Body"].close()
            return None
        return ObjectSource(self, answer["Body"], key, answer.get("ETag"), start, start + length)

    async def get_range(self, what: str, key: str, start: int, end: int, **conditions: str) -> Any:
        """GetObject of the bytes start..end (end excluded) of an object."""
        return await self.call(
            what,
            self.client.get_object(Bucket=self.url.bucket, Key=key, Range=f"bytes={start}-{end - 1}", **conditions),
        )

    async def presigned_url(self, name: str) -> str | None:
        if not self.presigned_get_seconds:
            return None
        # Signed locally (no call to the store). Only the object is in the URL: the client sends
        # its Range header again when it follows the redirect, and the store answers the range.
        return await self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.url.bucket, "Key": self.key("blobs", name)},
            ExpiresIn=self.presigned_get_seconds,
        )

    async def blob_size(self, name: str) -> int | None:
        try:
            head = await self.call(
                "reading a blob's size", self.client.head_object(Bucket=self.url.bucket, Key=self.key("blobs", name))
            )
        except _Missing:
            return None
        return head["ContentLength"]

    # Retiring and sweeping

    async def retire(self, name: str) -> None:
        """Take a blob out of service (see the module's note on trash/); gone already is fine."""
        try:
            await self.call(
                "retiring a blob", self.client.put_object(Bucket=self.url.bucket, Key=self.key("trash", name), Body=b"")
            )
        except Problem as problem:
            # The row no longer points at it: at worst it waits for `gc` or the orphan sweep.
            log.warning("could not retire blob %s: %s", name, problem.detail)

    async def remove(self, name: str) -> None:
        """Delete a blob that was never served (its upload failed before commit)."""
        try:
            await self.call(
                "removing a blob", self.client.delete_object(Bucket=self.url.bucket, Key=self.key("blobs", name))
            )
        except _Missing:
            pass
        except Problem as problem:
            log.warning("could not remove blob %s: %s", name, problem.detail)

    async def _listing(self, folder: str) -> AsyncIterator[dict[str, Any]]:
        """The objects under a folder, one page (up to 1000) per call, each page bounded."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.url.bucket, Prefix=f"{self.url.prefix}{folder}/"
        )
        iterator = aiter(pages)
        while True:
            try:
                page = await self.call(f"listing {folder}/", anext(iterator))
            except StopAsyncIteration:
                return
            for item in page.get("Contents", []):
                yield item

    def _name(self, folder: str, key: str) -> str:
        return key.removeprefix(f"{self.url.prefix}{folder}/")

    async def sweep(self, max_age_seconds: float) -> list[str]:
        """Delete retired blobs past the grace period: the blob first, then its marker (a crash
        in between leaves a marker the next sweep finishes).

        Multipart uploads a crash left are not aborted here: an upload trickling in below one
        part's size for longer than the grace period would look the same. `gc --apply` aborts
        them on an operator's word, and a bucket lifecycle rule after days (docs/deploy.md).
        """
        cutoff = time.time() - max_age_seconds
        removed = []
        async for marker in self._listing("trash"):
            if marker["LastModified"].timestamp() >= cutoff:
                continue
            name = self._name("trash", marker["Key"])
            with contextlib.suppress(_Missing):
                await self.call(
                    "deleting a retired blob",
                    self.client.delete_object(Bucket=self.url.bucket, Key=self.key("blobs", name)),
                )
            with contextlib.suppress(_Missing):
                await self.call(
                    "deleting a retirement marker", self.client.delete_object(Bucket=self.url.bucket, Key=marker["Key"])
                )
            removed.append(f"trash/{name}")
        return removed

    async def inventory(self) -> Inventory:
        # Markers first: a blob retired between the two listings then still counts as in service
        # (harmless), never the other way round.
        retired = {self._name("trash", item["Key"]) async for item in self._listing("trash")}
        blobs = {}
        async for item in self._listing("blobs"):
            name = self._name("blobs", item["Key"])
            if name not in retired:
                blobs[name] = Stored(item["Size"], item["LastModified"].timestamp())
        return Inventory(blobs, await self._multipart_uploads())

    async def _multipart_uploads(self) -> dict[str, Stored]:
        """Unfinished multipart uploads by `<blob name>?uploadId=<id>`; their age is that of
        their newest part (or of their start, with no part yet)."""
        found = {}
        async for upload in self._multipart_listing():
            if upload["Key"].startswith(self.key("blobs", f"{UPLOADS}/")):
                continue  # a resumable upload's: the upload engine's sweeper decides about it
            try:
                parts = await self.call(
                    "listing an upload's parts",
                    self.client.list_parts(Bucket=self.url.bucket, Key=upload["Key"], UploadId=upload["UploadId"]),
                )
            except _Missing:  # completed or aborted meanwhile
                continue
            times = [upload["Initiated"].timestamp()]
            times += [part["LastModified"].timestamp() for part in parts.get("Parts", [])]
            size = sum(part["Size"] for part in parts.get("Parts", []))
            ref = f"{self._name('blobs', upload['Key'])}?uploadId={upload['UploadId']}"
            found[ref] = Stored(size, max(times))
        return found

    async def _multipart_listing(self, under: str = "") -> AsyncIterator[dict[str, Any]]:
        """The multipart uploads under blobs/`under`, one page per call, each page bounded."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.url.bucket, Prefix=self.key("blobs", under)
        )
        iterator = aiter(pages)
        while True:
            try:
                page = await self.call("listing multipart uploads", anext(iterator))
            except StopAsyncIteration:
                return
            for upload in page.get("Uploads", []):
                yield upload

    async def drop_leftover(self, ref: str) -> None:
        name, _, upload_id = ref.partition("?uploadId=")
        with contextlib.suppress(_Missing):
            await self.call(
                "aborting a multipart upload",
                self.client.abort_multipart_upload(
                    Bucket=self.url.bucket, Key=self.key("blobs", name), UploadId=upload_id
                ),
            )

    # Resumable uploads (prerec/uploads/engine.py)

    def _upload_key(self, store_ref: str) -> tuple[str, str]:
        name, _, multipart_id = store_ref.partition("?uploadId=")
        return self.key("blobs", name), multipart_id

    async def begin_upload(self, upload_id: uuid.UUID) -> str:
        """A multipart upload of the blob-to-be `uploads/<upload id>.ogg`; its reference
        `<name>?uploadId=<id>` (as the inventory names leftovers) goes into the row."""
        name = f"{UPLOADS}/{upload_id}.ogg"
        created = await self.call(
            "starting a resumable upload",
            self.client.create_multipart_upload(
                Bucket=self.url.bucket, Key=self.key("blobs", name), ContentType="audio/ogg"
            ),
        )
        return f"{name}?uploadId={created['UploadId']}"

    async def appender(
        self, upload: Upload, pieces: list[Piece], tail: Tail | None, allocate: AllocateParts
    ) -> UploadParts:
        assert upload.store_ref is not None, "an upload on S3 has its multipart upload from its creation"
        return UploadParts(self, upload, tail, allocate)

    async def assemble(self, upload: Upload, pieces: list[Piece]) -> str:
        """CompleteMultipartUpload with the recorded parts only: parts a zombie or a refused
        checksum left unrecorded are dropped by the store. Never rebuilt from ListParts
        (SeaweedFS lists a part uploaded twice under one number twice)."""
        assert upload.store_ref is not None
        name = upload.store_ref.partition("?uploadId=")[0]
        key, multipart_id = self._upload_key(upload.store_ref)
        _check_pieces(upload, pieces)
        parts = [{"PartNumber": piece.number, "ETag": piece.etag} for piece in pieces]
        try:
            await self.call(
                "completing a resumable upload",
                self.client.complete_multipart_upload(
                    Bucket=self.url.bucket, Key=key, UploadId=multipart_id, MultipartUpload={"Parts": parts}
                ),
            )
        except _Missing:
            # A finisher that died after completing it: the object is there, whole, or lost.
            if await self.blob_size(name) != upload.length:
                raise Problem(
                    503, f"The multipart upload of upload {upload.id} is gone and its object is not whole.", RETRY
                ) from None
        return name

    async def hash_blob(self, name: str, algorithms: frozenset[str]) -> dict[str, bytes]:
        """Streamed from the store, hashed on a thread in pieces of up to HASH_PIECE (the parts
        of an uncompleted multipart upload cannot be read, so this comes after assemble)."""
        hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms | {"sha256"}}

        def update(piece: bytes) -> None:
            for hasher in hashers.values():
                hasher.update(piece)

        try:
            answer = await self.call(
                "reading a blob back", self.client.get_object(Bucket=self.url.bucket, Key=self.key("blobs", name))
            )
        except _Missing:
            raise Problem(503, f"The blob {name} just assembled is missing from the store.", RETRY) from None
        body = answer["Body"]
        try:
            pending = bytearray()
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        piece = await body.raw_stream.content.readany()
                except (TimeoutError, BotoCoreError, aiohttp.ClientError) as error:
                    raise Problem(503, f"The object store stopped sending {name} ({error!r}).", RETRY) from error
                if piece:
                    pending += piece
                if len(pending) >= HASH_PIECE or (not piece and pending):
                    await asyncio.to_thread(update, pending)
                    pending = bytearray()
                if not piece:
                    break
        finally:
            body.close()
        return {algorithm: hasher.digest() for algorithm, hasher in hashers.items()}

    async def stale_uploads(self, cutoff: float) -> dict[uuid.UUID, str | None]:
        """Resumable uploads' multipart uploads begun before `cutoff`; whether their upload
        still lives is the database's to say (a long upload is old and alive)."""
        found: dict[uuid.UUID, str | None] = {}
        async for upload in self._multipart_listing(f"{UPLOADS}/"):
            if upload["Initiated"].timestamp() >= cutoff:
                continue
            name = self._name("blobs", upload["Key"])
            with contextlib.suppress(ValueError):
                upload_id = uuid.UUID(name.removeprefix(f"{UPLOADS}/").removesuffix(".ogg"))
                found[upload_id] = f"{name}?uploadId={upload['UploadId']}"
        return found

    async def discard_upload(self, upload_id: uuid.UUID, store_ref: str | None) -> None:
        """AbortMultipartUpload (a part still on its way may land after it: S3 then keeps
        it, so `gc` and the bucket's lifecycle rule have the last word)."""
        if store_ref is None:
            return
        key, multipart_id = self._upload_key(store_ref)
        try:
            await self.call(
                "aborting a resumable upload",
                self.client.abort_multipart_upload(Bucket=self.url.bucket, Key=key, UploadId=multipart_id),
            )
        except _Missing:
            pass
        except Problem as problem:
            log.warning("could not abort the multipart upload of upload %s: %s", upload_id, problem.detail)


def _check_pieces(upload: Upload, pieces: list[Piece]) -> None:
    position = 0
    for piece in pieces:
        if piece.start != position or piece.number is None or piece.etag is None:
            raise RuntimeError(f"upload {upload.id}: its recorded parts leave a hole at {position}")
        position += piece.size
    if position != upload.length:
        raise RuntimeError(f"upload {upload.id}: its recorded parts end at {position}, not at {upload.length}")


def _new_name() -> str:
    token = uuid.uuid4().hex
    return f"{token[:2]}/{token}.ogg"


def _settle(done: concurrent.futures.Future[None], error: BaseException | None = None) -> None:
    # The receiving side may have cancelled the future (its upload was cancelled).
    if done.set_running_or_notify_cancel():
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


class _PartBody(io.BytesIO):
    """A part's bytes as botocore and aiohttp read them: in pieces of at most READ_PIECE.

    botocore reads a body in 1 MiB pieces to sign it (always, over plain http), each a fresh
    mapping the kernel zeroes page by page: the process's malloc takes pieces of 1 MiB and up
    from mmap (__main__._return_freed_memory). Smaller reads come from reused heap memory:
    6.3 CPU-seconds a GiB became 5.4. Both readers read until an empty piece, as a stream's
    reader must (a read may return fewer bytes than asked for).
    """

    READ_PIECE = 256 * 1024  # what aiohttp reads a BytesIO body in

    def read(self, size: int | None = -1, /) -> bytes:
        if size is not None and size > self.READ_PIECE:
            size = self.READ_PIECE
        return super().read(size)


class _PartBuffer:
    """A part's bytes in an io.BytesIO, filled in place and, once the store has the part,
    reused by the next part of any upload (_spare_parts).

    Why not a bytearray (as before): handed to botocore as a part's body, aiohttp sent a
    bytearray by first copying it whole (a slice), and asyncio copied again what the socket
    did not take at once, each copy into fresh memory that the kernel maps and zeroes page by
    page; a new bytearray a part, grown as it filled, cost the same once more. Page faults
    were a fifth of a replica's CPU in a 1 GiB PUT to SeaweedFS (perf). aiohttp reads a
    BytesIO in 256 KiB pieces instead, and one that is reused is filled without faults: 8.3
    CPU-seconds a GiB became 6.3. The buffer keeps its size when reused; only the bytes
    written since (its length) are a part's.
    """

    def __init__(self, data: bytes = b"") -> None:
        self.io = _PartBody()
        self.io.write(data)

    def __len__(self) -> int:
        return self.io.tell()

    def write(self, piece: memoryview) -> None:
        self.io.write(piece)

    def head(self, count: int) -> bytes:
        """A copy of the first `count` bytes."""
        with self.io.getbuffer() as view, view[:count] as head:
            return bytes(head)

    def cut(self, count: int) -> bytes:
        """Keep the first `count` bytes; a copy of those past them."""
        with self.io.getbuffer() as view, view[count : len(self)] as rest:
            past = bytes(rest)
        self.io.seek(count)
        return past

    def body(self) -> _PartBody:
        """The bytes written, as botocore takes a part's body: a file read from its start to
        its end (so what an earlier part left past them is cut off first)."""
        self.io.truncate()
        self.io.seek(0)
        return self.io

    def reuse(self) -> _PartBuffer:
        """Empty again for the next part, its memory kept."""
        self.io.seek(0)
        return self


# Part buffers whose part the store has, for the next part of any upload: a few for the whole
# process (at most one part in flight per upload), so that an upload that is between parts
# does not hold a second one; dropped once the process has had no upload for a moment.
_spare_parts: list[_PartBuffer] = keep_between_uploads([])


def _next_buffer() -> _PartBuffer:
    return _spare_parts.pop().reuse() if _spare_parts else _PartBuffer()


class _PartFiller:
    """What StagedObject and UploadParts share: pieces copied into a part buffer on the loop,
    each filled buffer sent to the store as a part (_send_filled) while the next one fills.

    The pieces come in order (receive's pipeline hands them out so); each is taken by a task
    that waits for the one before it, so a piece waiting for a part buffer holds back the
    pieces after it, and with them the reading of the body: that is the backpressure that
    keeps an upload to two buffers whatever its size.
    """

    whole = "object"  # what the pieces make up, as a piece out of order is told
    filling: _PartBuffer
    size: int  # the bytes taken so far end here
    storage: S3Storage
    key: str
    taking: asyncio.Task[Any] | None  # the last piece's task: the next one waits for it
    error: BaseException | None  # the first failure: every piece after it fails with it

    def submit(self, piece: memoryview, offset: int) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.taking = asyncio.get_running_loop().create_task(self._take(self.taking, piece, offset, done))
        return done

    async def _take(
        self, before: asyncio.Task[Any] | None, piece: memoryview, offset: int, done: concurrent.futures.Future[None]
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
        try:
            self._check()
            if offset != self.size:
                raise RuntimeError(f"a piece at {offset} came while the {self.whole} is {self.size} bytes long")
            self.size += len(piece)
            while piece:
                room = PART_SIZE - len(self.filling)
                self.filling.write(piece[:room])
                piece = piece[room:]
                if len(self.filling) == PART_SIZE:
                    await self._send_filled()
        except BaseException as error:
            self.error = self.error or error
            _settle(done, error)
            return
        _settle(done)

    def _check(self) -> None:
        """Before a piece is taken: the failure that ends the upload, raised."""
        if self.error is not None:
            raise self.error

    async def _send_filled(self) -> None:
        raise NotImplementedError

    async def _send_part(self, what: str, upload_id: str, number: int, buffer: _PartBuffer) -> str:
        """One part to the store, its ETag; the caller took its place among PARTS_IN_FLIGHT
        (S3Storage.take_turn). The buffer is a spare once the store has it all (not after a
        failure: the request may still have been reading it)."""
        try:
            answer = await self.storage.call(
                what,
                self.storage.client.upload_part(
                    Bucket=self.storage.url.bucket,
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=buffer.body(),
                ),
            )
            if Pipeline.in_progress and len(_spare_parts) < PARTS_IN_FLIGHT:
                _spare_parts.append(buffer)
            return str(answer["ETag"])
        finally:
            self.storage._in_flight.release()


class StagedObject(_PartFiller):
    """One upload's new object, filled and sent part by part as _PartFiller says; a body
    smaller than one part goes by one PutObject at finish()."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.key = storage.key("blobs", self.name)
        self.filling = _PartBuffer()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.sending: asyncio.Task[None] | None = None
        self.taking: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None
        self.finished = False

    def _check(self) -> None:
        sending = self.sending
        if self.error is None and sending is not None and sending.done() and not sending.cancelled():
            # A part that failed ends the upload at the next piece, not a part later.
            self.error = sending.exception()
        super()._check()

    async def _send_filled(self) -> None:
        if self.sending is not None:
            await self.sending  # the part before: one in flight per upload
        if self.upload_id is None:
            created = await self.storage.call(
                "starting a multipart upload",
                self.storage.client.create_multipart_upload(
                    Bucket=self.storage.url.bucket, Key=self.key, ContentType="audio/ogg"
                ),
            )
            self.upload_id = created["UploadId"]
        await self.storage.take_turn()
        buffer, self.filling = self.filling, _next_buffer()
        number = len(self.parts) + 1
        self.parts.append({"PartNumber": number})
        self.sending = asyncio.get_running_loop().create_task(self._send_numbered(number, buffer))

    async def _send_numbered(self, number: int, buffer: _PartBuffer) -> None:
        assert self.upload_id is not None
        self.parts[number - 1]["ETag"] = await self._send_part(
            "sending a part of an upload", self.upload_id, number, buffer
        )

    def touch(self) -> concurrent.futures.Future[None]:
        # Nothing to refresh: the sweeper never takes a multipart upload (see S3Storage.sweep).
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done

    async def finish(self) -> str:
        if self.taking is not None:
            await asyncio.wait([self.taking])
        if self.error is not None:
            raise self.error
        storage, bucket = self.storage, self.storage.url.bucket
        if self.upload_id is None:
            await storage.call(
                "storing a blob",
                storage.client.put_object(
                    Bucket=bucket, Key=self.key, Body=self.filling.body(), ContentType="audio/ogg"
                ),
            )
        else:
            if self.filling:
                await self._send_filled()
            assert self.sending is not None
            await self.sending
            await storage.call(
                "completing a multipart upload",
                storage.client.complete_multipart_upload(
                    Bucket=bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
                ),
            )
        self.finished = True
        self.filling = _PartBuffer()
        return self.name

    async def discard(self) -> None:
        """Abort the multipart upload once the part in flight is done (or delete the object,
        when finish() completed despite a cancellation); failures only logged: `gc` finds what
        is left."""
        self.filling = _PartBuffer()  # not held while the part in flight is waited for
        for task in (self.taking, self.sending):
            if task is not None:
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()  # seen: the error that made us discard was answered already
        storage, bucket = self.storage, self.storage.url.bucket
        try:
            if self.finished:
                await storage.call("removing a blob", storage.client.delete_object(Bucket=bucket, Key=self.key))
            elif self.upload_id is not None:
                await storage.call(
                    "aborting a multipart upload",
                    storage.client.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self.upload_id),
                )
        except _Missing:
            pass
        except Problem as problem:
            log.warning("could not clean up the upload of %s: %s", self.name, problem.detail)


@dataclass
class _Part:
    start: int  # the upload offset of its first byte
    size: int
    number: int
    sending: asyncio.Task[str]  # its ETag once the store has it


class UploadParts(_PartFiller):
    """One lease generation's writes to a resumable upload: the bytes past the last recorded
    part (the tail the database kept, then what arrives) fill a part buffer, and each full
    one goes to the store as a part while the next fills (_PartFiller).

    Part numbers come from the database under the lease fence (`allocate`), so two
    generations never upload under one number, and a zombie's late part is never listed at
    Complete. persist() cuts at the offset asked: what is below it goes as a part when it is
    at least the store's minimum, else it is the tail, which the engine records with the
    offset in one transaction: every replica can go on from there, and nothing below the
    offset is only in this process's memory.
    """

    whole = "upload"

    def __init__(self, storage: S3Storage, upload: Upload, tail: Tail | None, allocate: AllocateParts) -> None:
        assert upload.store_ref is not None
        assert tail is None or tail.start + len(tail.data) == upload.durable
        self.storage = storage
        self.key, self.multipart_id = storage._upload_key(upload.store_ref)
        self.length = upload.length
        self.generation = upload.generation
        self.allocate = allocate
        self.base = upload.durable if tail is None else tail.start  # where the part filling begins
        self.filling = _PartBuffer() if tail is None else _PartBuffer(tail.data)
        self.size = upload.durable  # the bytes taken so far end here
        self.recorded, self.recorded_tail = upload.durable, tail
        self.parts: list[_Part] = []  # sent, not yet handed to persist()
        self.last: asyncio.Task[str] | None = None
        self.taking: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None

    async def _send_filled(self) -> None:
        await self._send(PART_SIZE)

    async def _send(self, count: int) -> None:
        """The first `count` bytes of the filling buffer as the next part."""
        if self.last is not None:
            await asyncio.wait([self.last])  # one part in flight per upload
            if not self.last.cancelled() and self.last.exception() is not None:
                raise self.last.exception()  # type: ignore[misc]
        number = await self.allocate(1)
        await self.storage.take_turn()
        past = self.filling.cut(count)  # bytes taken past the cut (a persist's) fill on
        buffer, self.filling = self.filling, _next_buffer()
        self.filling.write(memoryview(past))
        self.last = asyncio.get_running_loop().create_task(
            self._send_part("sending a part of a resumable upload", self.multipart_id, number, buffer)
        )
        self.parts.append(_Part(self.base, count, number, self.last))
        self.base += count

    async def persist(self, upto: int) -> Progress:
        cut = asyncio.get_running_loop().create_task(self._cut(self.taking, upto))
        self.taking = cut
        offset, tail, due = await asyncio.shield(cut)
        pieces = []
        for part in due:
            etag = await asyncio.shield(part.sending)
            pieces.append(Piece(part.start, part.size, self.generation, part.number, etag))
        self.recorded, self.recorded_tail = offset, tail
        return Progress(offset, pieces, tail)

    async def _cut(self, before: asyncio.Task[Any] | None, upto: int) -> tuple[int, Tail | None, list[_Part]]:
        """In line with the pieces taken: what persist(upto) records, and the parts it waits for."""
        if before is not None:
            await asyncio.wait([before])
        try:
            if self.error is not None:
                raise self.error
            if self.base > upto:
                # A part on its way holds bytes on both sides of `upto`: recorded once it is
                # in, at a later persist; until then the offset stops where it begins.
                straddling = next(part for part in self.parts if part.start + part.size > upto)
                due = self.parts[: self.parts.index(straddling)]
                if straddling.start < self.recorded:
                    return self.recorded, self.recorded_tail, []  # (nothing is due before it)
                self.parts = self.parts[len(due) :]
                return straddling.start, None, due
            held = upto - self.base
            if held >= MIN_PART or (held > 0 and upto == self.length):
                await self._send(held)
                held = 0
            tail = Tail(self.base, self.filling.head(held)) if held else None
            due = [part for part in self.parts if part.start + part.size <= upto]
            self.parts = self.parts[len(due) :]
            return upto, tail, due
        except BaseException as error:
            self.error = self.error or error
            raise

    async def stop(self) -> None:
        tasks = [task for task in (self.taking, self.last) if task is not None]
        tasks += [part.sending for part in self.parts]
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # seen: answered already, or the upload goes on elsewhere
        self.filling = _PartBuffer()
        self.parts = []


class ObjectSource:
    """A ranged GET's body, passed on as it arrives; each wait bounded by the timeout.

    Measured (1 GiB from SeaweedFS, same machine): at 0.5x a client reading the store itself
    most of the extra time was page faults (socket reads were fresh mappings below the mmap
    threshold, see __main__._return_freed_memory), then a timeout of our own around each read;
    without both, 0.7-0.85x, the rest being the one more socket hop. A larger aiohttp read
    buffer or larger transport write limits changed nothing beyond the noise. Operators who
    want the store's own speed set PREREC_S3_PRESIGNED_GET_SECONDS.

    A listener may stop reading for minutes (a browser's audio element does once it has
    buffered enough). Its download must not keep one of the pool's connections to the store
    meanwhile: as many paused listeners as the pool has connections would make every other
    download and upload of the replica wait. So a download whose write waits while the client
    takes nothing for HOLD_SECONDS lets go of the store's body (a watchdog per download, not a
    timer per write: writes come thousands of times a second), and once the client reads on the
    rest is asked for again, a ranged GET from where it stopped, of the same object (If-Match
    its ETag; a replaced blob stays readable for PREREC_TMP_MAX_AGE_SECONDS, a listener paused
    longer is cut off and its player asks again for the current version).

    "Takes nothing" is judged on the bytes not yet acknowledged by the client (ours buffered and
    the kernel's send queue), not on how long a write waits: a slow listener (a player reading at
    the audio's bitrate) can hold one write for many seconds while taking bytes all along, and
    asking the store again every few seconds would throw away what it had already sent.
    """

    def __init__(self, storage: S3Storage, body: Any, key: str, etag: str | None, start: int, end: int) -> None:
        self.storage = storage
        self.body = body
        self.key = key
        self.etag = etag
        self.position = start  # the bytes read from the store end here
        self.end = end
        self.writing = False  # a write to the client under way

    async def send(self, response: Any, request: web.BaseRequest, writer: web.AbstractStreamWriter) -> None:
        if self.position >= self.end:
            return
        loop = asyncio.get_running_loop()
        watchdog = loop.create_task(self._let_go_when_paused(request.transport))
        try:
            while self.position < self.end:
                if self.body is None:
                    await self._ask_again()
                try:
                    # What arrived, as aiohttp buffered it: StreamingBody.read(n) joins buffers
                    # into n bytes first, a copy that cost a quarter of the speed here. No
                    # timeout of our own around each read: the client's read_timeout is
                    # aiohttp's sock_read, which bounds every wait for the store's bytes already.
                    piece = await self.body.raw_stream.content.readany()
                except (TimeoutError, BotoCoreError, aiohttp.ClientError) as error:
                    # Headers are out: all that is left is to cut the response short, which the
                    # client sees as a download broken off (never a complete-looking short body).
                    raise ConnectionResetError(f"the object store stopped sending the blob ({error!r})") from error
                if not piece:
                    raise ConnectionResetError("the object store ended the blob short")
                self.position += len(piece)
                self.writing = True
                await response.write(piece)
                self.writing = False
                response.body_sent += len(piece)
        finally:
            watchdog.cancel()

    async def _let_go_when_paused(self, transport: asyncio.Transport | None) -> None:
        loop = asyncio.get_running_loop()
        seen: int | None = None
        since = loop.time()
        while True:
            await asyncio.sleep(HOLD_SECONDS / 4)
            unacknowledged = _unacknowledged(transport) if self.writing and transport is not None else None
            if unacknowledged != seen:
                seen, since = unacknowledged, loop.time()
            elif seen is not None and loop.time() - since >= HOLD_SECONDS and self._holds_a_connection():
                self.close()

    def _holds_a_connection(self) -> bool:
        # A body received to its end gave its connection back already; closing it would only
        # throw its bytes away.
        return self.body is not None and not self.body.raw_stream.content.is_eof()

    async def _ask_again(self) -> None:
        """The rest of the range, after the body was let go while the client held up a write."""
        try:
            same = {"IfMatch": self.etag} if self.etag else {}
            answer = await self.storage.get_range("reading a blob on", self.key, self.position, self.end, **same)
        except (Problem, _Missing) as error:
            raise ConnectionResetError(f"the rest of the blob could not be read after a pause ({error!r})") from error
        if answer["ContentLength"] != self.end - self.position:
            answer["Body"].close()
            raise ConnectionResetError("the blob is shorter than when its download began")
        self.body = answer["Body"]

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None


def _unacknowledged(transport: asyncio.Transport) -> int:
    """The bytes of a connection its peer has not acknowledged yet: those buffered in the
    transport, and where the kernel tells (Linux: SIOCOUTQ), those in the socket's send queue."""
    count = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(termios, "TIOCOUTQ"):
        with contextlib.suppress(OSError):
            count += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return count
