"""HTTP handlers for /prerecordings: list, upload, download, delete."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from aiohttp import hdrs, web
from multidict import MultiMapping

from prerec import conditional, db, digests
from prerec.auth import check_write_token
from prerec.cache import CACHE
from prerec.commit import commit_blob
from prerec.config import SETTINGS_KEY
from prerec.db import POOL
from prerec.model import Prerecording, format_start, parse_content_type, parse_count, parse_event, parse_start
from prerec.problems import Problem
from prerec.storage import STORAGE
from prerec.storage.receive import Pace, receive
from prerec.storage.responses import BlobResponse
from prerec.telemetry import METRICS

log = logging.getLogger(__name__)

# Upload handlers in progress, which a graceful shutdown waits for.
UPLOADS = web.AppKey("uploads", set[asyncio.Task[object]])


@dataclass(frozen=True)
class _Accepted:
    """What the checks before the body found: the type to store, the digests to verify."""

    content_type: str
    claims: list[digests.Claim]


# The findings of an upload whose headers the Expect handler already checked.
EARLY_CHECKS = web.RequestKey("early_checks", _Accepted)
# Why the Expect handler refused an upload, for the upload handler to answer.
EARLY_REFUSAL = web.RequestKey("early_refusal", Problem)

DEFAULT_LIMIT = 10


# Request parsing


def _key(request: web.Request) -> tuple[uuid.UUID, datetime]:
    return parse_event(request.match_info["event"]), parse_start(request.match_info["start"])


def query_value(query: MultiMapping[str], name: str) -> str | None:
    """A query value, plain or JSON-encoded as the original's clients send it.

    `"2024-01-01T00:00"` (with the quotes) reads as the string inside; `null` as not given.
    A parameter given twice is refused rather than one of its values picked: a client that
    sends `after=…&after=…` has a bug it should hear about.
    """
    values = query.getall(name, [])
    if len(values) > 1:
        raise Problem(400, f"The query parameter {name} is given {len(values)} times; give it once.")
    raw = values[0] if values else None
    if raw is None or raw == "null":
        return None
    if raw == "":
        raise Problem(400, f"The query parameter {name} is empty; leave it out or give a value.")
    if raw.startswith('"'):
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise Problem(400, f"The query parameter {name}={raw[:100]!r} is not a valid JSON string.")
        return value
    return raw


@dataclass(frozen=True)
class ListQuery:
    after: datetime | None = None
    before: datetime | None = None
    limit: int | None = DEFAULT_LIMIT  # None: no limit
    offset: int = 0
    descending: bool = False


def parse_list_query(query: MultiMapping[str]) -> ListQuery:
    """The list's filters and page from its query string (unknown parameters are ignored)."""
    after = query_value(query, "after")
    before = query_value(query, "before")
    limit = query_value(query, "limit")
    offset = query_value(query, "offset")
    order = query_value(query, "order")
    if order is None:
        order = "asc"
    elif order not in ("asc", "desc"):
        raise Problem(400, f"The query parameter order={order[:100]!r} must be 'asc' or 'desc'.")
    if limit is None:
        # limit=null is "no limit", unlike a missing limit, which is the default page of 10.
        page_size = None if "limit" in query else DEFAULT_LIMIT
    else:
        page_size = parse_count(limit, "query parameter limit")
    return ListQuery(
        after=None if after is None else parse_start(after, "query parameter after"),
        before=None if before is None else parse_start(before, "query parameter before"),
        limit=page_size,
        offset=0 if offset is None else parse_count(offset, "query parameter offset"),
        descending=order == "desc",
    )


def check_codings(headers: MultiMapping[str]) -> None:
    """Refuse a body that does not arrive as the bytes to store: a transfer coding other than
    chunked, a content coding other than identity. For PUT and the resumable uploads' bodies."""
    # Both parsers of aiohttp take "gzip, chunked" as chunked and hand over the still gzipped
    # bytes, which would be stored as if they were the audio (RFC 9112 §6.1: 501).
    transfer = [coding.strip(" \t").lower() for coding in headers.get(hdrs.TRANSFER_ENCODING, "").split(",")]
    transfer = [coding for coding in transfer if coding]
    if transfer and transfer != ["chunked"]:
        unknown = [coding for coding in transfer if coding != "chunked"]
        if unknown:
            raise Problem(
                501, f"The transfer coding {unknown[0][:40]!r} is not supported: send the body as is, or only chunked."
            )
        raise Problem(400, "The Transfer-Encoding applies chunked more than once.")
    # aiohttp would decompress a gzip body as it reads it: what is stored would not be the
    # bytes sent, and their Content-MD5 or Repr-Digest would fail. Prerecordings are stored
    # as sent, so no content coding is taken (RFC 9110 §15.5.16: 415 with Accept-Encoding).
    for coding in ",".join(headers.getall(hdrs.CONTENT_ENCODING, [])).split(","):
        coding = coding.strip(" \t")
        if coding.lower() not in ("", "identity"):
            raise Problem(
                415,
                f"The Content-Encoding {coding[:40]!r} is not accepted: upload the Ogg file as it is.",
                # Closed, not drained: aiohttp would decode the body as it reads it, and one
                # that does not decode fails there, after this answer.
                {hdrs.ACCEPT_ENCODING: "identity", "Connection": "close"},
            )


def _check_upload_headers(headers: MultiMapping[str], max_bytes: int) -> str:
    """What can be refused before a byte of the body is read; the normalised Content-Type."""
    check_codings(headers)
    # A partial PUT (curl --continue-at sends one) would replace the prerecording with the
    # fragment (RFC 9110 §14.5: a server that does not apply Content-Range must refuse it).
    if hdrs.CONTENT_RANGE in headers:
        raise Problem(
            400,
            f"Content-Range ({headers[hdrs.CONTENT_RANGE][:60]!r}) is not supported on PUT: a partial upload "
            "would replace the prerecording with the fragment. Send the whole file; continuing a broken "
            "upload needs a resumable-upload protocol, which a plain PUT is not.",
        )
    content_type = parse_content_type(headers.get(hdrs.CONTENT_TYPE))
    # aiohttp's parser has already refused a Content-Length that is not digits.
    length = int(headers[hdrs.CONTENT_LENGTH]) if hdrs.CONTENT_LENGTH in headers else None
    if length is not None and length > max_bytes:
        raise Problem(
            413,
            f"The declared Content-Length {length} is larger than the limit of {max_bytes} bytes.",
            {"Connection": "close"},
        )
    if length == 0:
        raise Problem(400, "The upload is empty: send the Ogg audio as the request body.")
    return content_type


async def upload_expect(request: web.Request) -> None:
    """Answer `Expect: 100-continue` only when the upload can be accepted.

    aiohttp's default handler says "continue" before any check runs, and the client then
    sends a body that will be refused; this one refuses first. It does not answer a refusal
    itself: aiohttp would send that answer past the middlewares (no request id, no access log
    line, no metric), so the upload handler raises it instead.
    """
    try:
        # Kept on the request: the handler that reads the body need not check (and query) again.
        request[EARLY_CHECKS] = await _refuse_early(request)
    except Problem as problem:
        request[EARLY_REFUSAL] = problem
        return
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        request[EARLY_REFUSAL] = Problem(417, f"The Expect value {request.headers[hdrs.EXPECT]!r} is not supported.")
        return
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


# Responses


def _validator_headers(response: web.StreamResponse, prerecording: Prerecording) -> None:
    response.headers[hdrs.ETAG] = prerecording.etag
    response.headers[hdrs.LAST_MODIFIED] = prerecording.last_modified


def _representation_headers(response: web.StreamResponse, prerecording: Prerecording) -> None:
    _validator_headers(response, prerecording)
    response.headers[hdrs.CONTENT_TYPE] = prerecording.type
    response.headers[hdrs.ACCEPT_RANGES] = "bytes"
    response.headers["Repr-Digest"] = prerecording.repr_digest


# Handlers


async def list_prerecordings(request: web.Request) -> web.Response:
    event = parse_event(request.match_info["event"])
    query = parse_list_query(request.query)
    settings = request.app[SETTINGS_KEY]
    async with db.connection(request.app[POOL], settings.db_timeout_seconds) as conn:
        count, items = await db.list_prerecordings(
            conn, event, query.after, query.before, query.limit, query.offset, query.descending
        )
    return web.json_response(
        {
            "count": count,
            "limit": query.limit,
            "offset": query.offset,
            "prerecordings": [item.to_json() for item in items],
        }
    )


async def _current(request: web.Request, event: uuid.UUID, start: datetime) -> Prerecording | None:
    settings = request.app[SETTINGS_KEY]
    async with db.connection(request.app[POOL], settings.db_timeout_seconds) as conn:
        return await db.get_prerecording(conn, event, start)


def _not_found(event: uuid.UUID, start: datetime) -> Problem:
    return Problem(404, f"There is no prerecording of event {event} at {format_start(start)}.")


async def _metadata(request: web.Request, event: uuid.UUID, start: datetime, cached: bool) -> Prerecording:
    """The current prerecording, from the cache when it can (and `cached` allows)."""
    cache = request.app[CACHE]
    key = (str(event), format_start(start))
    prerecording = cache.get(key) if cached else None
    if prerecording is None:
        token = cache.token()
        prerecording = await _current(request, event, start)
        if prerecording is None:
            raise _not_found(event, start)
        cache.put(key, prerecording, token)
    return prerecording


def _from_metadata(request: web.Request, prerecording: Prerecording) -> web.Response | conditional.ByteRange | None:
    """What the metadata alone decides: 412, 416 (raised), 304 (returned), else the range to
    send (None: all of it). Decided before the blob is opened, so a 304 or a refusal costs no
    store call, and a remote store is asked for exactly the bytes sent."""
    status = conditional.evaluate(request, prerecording)
    if status == 412:
        raise Problem(412, f"The precondition failed: the current ETag is {prerecording.etag}.")
    if status == 304:
        not_modified = web.Response(status=304)
        _validator_headers(not_modified, prerecording)
        return not_modified
    try:
        return conditional.requested_range(request, prerecording)
    except conditional.Unsatisfiable:
        raise Problem(
            416,
            f"The Range {request.headers[hdrs.RANGE][:100]!r} is outside the {prerecording.size} bytes stored.",
            {hdrs.CONTENT_RANGE: f"bytes */{prerecording.size}"},
        ) from None


_PRECONDITIONS = {
    hdrs.IF_MATCH,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_UNMODIFIED_SINCE,
    hdrs.IF_RANGE,
}


async def download(request: web.Request) -> web.StreamResponse:
    """GET and HEAD. A blob that is gone means the cache entry (or the row just read) was
    replaced or deleted meanwhile: evict and ask the database again."""
    event, start = _key(request)
    storage = request.app[STORAGE]
    head = request.method == hdrs.METH_HEAD
    for attempt in range(3):
        prerecording = await _metadata(request, event, start, cached=attempt == 0)
        decided = _from_metadata(request, prerecording)
        if isinstance(decided, web.Response):
            return decided
        offset, count = (0, prerecording.size) if decided is None else (decided.start, decided.length)
        if head:
            source = None
            found = storage.exists(prerecording.blob)
        elif not _PRECONDITIONS & request.headers.keys() and (
            location := await storage.presigned_url(prerecording.blob)
        ):
            # The store sends the bytes (PREREC_S3_PRESIGNED_GET_SECONDS); 412 and 416 were decided
            # above from the metadata, as for a streamed GET. A conditional GET is streamed: the
            # client would send its If-* headers again to the store, which compares its own ETag
            # (not our SHA-256) and dates (not our row's). The URL expires: no caching.
            return web.Response(status=307, headers={hdrs.LOCATION: location, hdrs.CACHE_CONTROL: "no-store"})
        else:
            source = await storage.open(prerecording.blob, prerecording.size, offset, count)
            found = source is not None
        if found:
            response = BlobResponse(source, count, status=200 if decided is None else 206)
            if decided is not None:
                response.headers[hdrs.CONTENT_RANGE] = f"bytes {decided.start}-{decided.end}/{prerecording.size}"
            _representation_headers(response, prerecording)
            return response
        request.app[CACHE].evict((str(event), format_start(start)))
    log.error("prerecording %s %s: blob %s is missing or torn", event, start, prerecording.blob)
    raise Problem(503, "The stored file of this prerecording is missing or damaged; run the storage check (make gc).")


async def upload(request: web.Request) -> web.StreamResponse:
    task = asyncio.current_task()
    assert task is not None
    request.app[UPLOADS].add(task)
    in_flight = request.app[METRICS].uploads_in_flight
    in_flight.inc()
    try:
        return await _upload(request)
    finally:
        in_flight.dec()
        request.app[UPLOADS].discard(task)


async def _refuse_early(request: web.Request) -> _Accepted:
    """Every check that needs no body byte: token, key, framing, type, length, digest
    headers, preconditions."""
    check_write_token(request)
    event, start = _key(request)
    content_type = _check_upload_headers(request.headers, request.app[SETTINGS_KEY].max_upload_bytes)
    claims = digests.claims(request)
    if conditional.has_preconditions(request):
        # A first look, so a doomed upload is refused before its body is read; the decision
        # that counts is taken again inside the writing transaction.
        conditional.check_write(request, await _current(request, event, start))
    return _Accepted(content_type, claims)


async def _upload(request: web.Request) -> web.StreamResponse:
    try:
        if EARLY_REFUSAL in request:
            raise request[EARLY_REFUSAL]
        accepted = request[EARLY_CHECKS] if EARLY_CHECKS in request else await _refuse_early(request)
    except Problem as problem:
        # The body is left unread: close the connection rather than have aiohttp read and
        # discard what may be gigabytes.
        problem.headers.setdefault("Connection", "close")
        raise
    event, start = _key(request)
    settings = request.app[SETTINGS_KEY]
    algorithms = frozenset(claim.algorithm for claim in accepted.claims)
    pace = Pace(settings.read_timeout_seconds, settings.min_upload_rate_bytes, settings.tmp_max_age_seconds)
    stored = await receive(request.app[STORAGE], request.content, settings.max_upload_bytes, pace, algorithms)
    request.app[METRICS].uploaded.inc(stored.size)
    saved = await commit_blob(
        request.app,
        event,
        start,
        accepted.content_type,
        stored,
        accepted.claims,
        check=lambda current: conditional.check_write(request, current),
    )
    headers = {hdrs.ETAG: saved.prerecording.etag}
    if saved.created:
        return web.json_response(saved.prerecording.to_json(), status=201, headers=headers)
    return web.Response(status=204, headers=headers)


async def delete(request: web.Request) -> web.Response:
    check_write_token(request)
    event, start = _key(request)
    settings = request.app[SETTINGS_KEY]
    async with db.connection(request.app[POOL], settings.db_timeout_seconds) as conn:
        deleted = await db.delete_prerecording(
            conn, event, start, check=lambda current: conditional.check_write(request, current)
        )
    if deleted is None:
        raise _not_found(event, start)
    request.app[CACHE].evict((str(event), format_start(start)))  # as commit_blob does
    await request.app[STORAGE].retire(deleted.blob)
    return web.Response(status=204)
