"""The IETF resumable-upload draft (draft-ietf-httpbis-resumable-upload) over the upload engine.

Creation is careful only (draft §Upload Strategies): a PUT or POST at the prerecording's key
with `Upload-Complete: ?0` answers 201 with the upload's URL, and the client PATCHes from
there. No 104 interim response is ever sent (aiohttp cannot, nginx forwards only 100/103), so
an optimistic `Upload-Complete: ?1` creation is a plain PUT. The upload resource is the one tus
uses (/uploads/{id}); routes.py picks this front end by the interop header.

Header parsing is pure functions over mappings; handlers only parse, call the engine and shape
the answer. Every answer, refusals included, echoes the interop version.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import http_sf
from aiohttp import hdrs, web

from prerec import digests
from prerec.auth import check_write_token
from prerec.conditional import parse_date
from prerec.config import SETTINGS_KEY
from prerec.model import OGG, NewUpload, Upload, parse_content_type, parse_count, parse_event, parse_start
from prerec.prerecordings import check_codings
from prerec.problems import Problem
from prerec.uploads import tus
from prerec.uploads.engine import ENGINE, claims_json

INTEROP = "Upload-Draft-Interop-Version"
# tus-js-client's ietf-draft-03 mode sends 5, its ietf-draft-05 mode 6; drafts -06…-08 are 7,
# -09 and later 8. Apple's URLSession: 3 in iOS 17 / macOS 14, 5 in iOS 18.0, 6 in iOS 18.1
# (swift-nio-extras' NIOResumableUpload), 8 in iOS 26 (design notes). 3 and 4 spoke
# Upload-Incomplete, the inverse of Upload-Complete; they are not served as resumable, but their
# whole-body uploads (`?0`) are plain PUTs, as the draft asks of a server that does not speak
# the version.
VERSIONS = (5, 6, 7, 8)
PARTIAL_UPLOAD = "application/partial-upload"
MISMATCHING_OFFSET = "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"
INCONSISTENT_LENGTH = "https://iana.org/assignments/http-problem-types#inconsistent-upload-length"
COMPLETED_UPLOAD = "https://iana.org/assignments/http-problem-types#completed-upload"


# Parsing (pure)


def parse_version(headers: Mapping[str, str]) -> int | None:
    """The interop version asked for; None when the header is absent (not this protocol)."""
    value = headers.get(INTEROP)
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) < 4) or int(text) not in VERSIONS:
        raise Problem(
            400,
            f"{INTEROP} {text[:20]!r} is not supported; this server speaks {', '.join(map(str, VERSIONS))}.",
        )
    return int(text)


def parse_complete(headers: Mapping[str, str], name: str = "Upload-Complete") -> bool | None:
    """Upload-Complete (or the older Upload-Incomplete `name`), a structured-field boolean
    (RFC 8941 §3.3.6: `?0` or `?1`)."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        item, _ = http_sf.parse(value.encode(), tltype="item")
    except Exception:  # http_sf signals a syntax error with a plain ValueError or its own
        item = None
    if not isinstance(item, bool):
        raise Problem(400, f"{name} {value[:20]!r} is not a structured boolean: send ?0 or ?1.")
    return item


def require_complete(headers: Mapping[str, str]) -> bool:
    complete = parse_complete(headers)
    if complete is None:
        raise Problem(400, "The Upload-Complete header is required: ?1 if this request ends the upload, else ?0.")
    return complete


def is_careful_creation(headers: Mapping[str, str]) -> bool:
    """Whether a PUT at a key is this protocol's creation; `Upload-Complete: ?1` (or no
    interop header) is a plain PUT, byte for byte as without this front end."""
    if INTEROP not in headers:
        return False
    try:
        complete = parse_complete(headers)
        if complete is None and headers[INTEROP].strip() in ("3", "4"):  # iOS 17: Upload-Incomplete
            incomplete = parse_complete(headers, "Upload-Incomplete")
            complete = None if incomplete is None else not incomplete
        return complete is not True
    except Problem:
        return True  # the creation handler names what is wrong


def parse_length(headers: Mapping[str, str]) -> int:
    value = headers.get("Upload-Length")
    if value is None:
        raise Problem(400, "The Upload-Length header is required on creation: the whole file's size in bytes.")
    return parse_count(value.strip(), "Upload-Length")


def creation_type(headers: Mapping[str, str]) -> str:
    """The prerecording's type: Content-Type, unless absent or partial-upload; then the tus
    metadata's filetype (tus-js-client's IETF modes send it); else 415."""
    content_type = headers.get(hdrs.CONTENT_TYPE)
    if content_type is not None and content_type.split(";")[0].strip().lower() != PARTIAL_UPLOAD:
        return parse_content_type(content_type)
    filetype = tus.parse_metadata(headers.get("Upload-Metadata")).get("filetype")
    if filetype is None:
        raise Problem(415, f"Name the type: Content-Type {OGG} (or Upload-Metadata filetype).")
    return parse_content_type(filetype)


def check_no_date_precondition(headers: Mapping[str, str]) -> None:
    """An upload keeps If-Match and If-None-Match: * for its end, not a date: a creation (at
    the PUT route, which honours If-Unmodified-Since) that asks for one is refused, never let
    replace a newer version. RFC 9110 §13.1.4: not read beside If-Match, nor when no date."""
    if hdrs.IF_MATCH not in headers and parse_date(headers.get(hdrs.IF_UNMODIFIED_SINCE)) is not None:
        raise Problem(
            400,
            "If-Unmodified-Since is not kept for a resumable upload: send If-Match with the current ETag instead.",
        )


def check_patch_type(version: int, headers: Mapping[str, str]) -> None:
    # Interop 5 (draft -03) named no type; from 6 on an append is application/partial-upload.
    if version < 6:
        return
    content_type = headers.get(hdrs.CONTENT_TYPE, "")
    if content_type.split(";")[0].strip().lower() != PARTIAL_UPLOAD:
        raise Problem(415, f"A PATCH carries Content-Type {PARTIAL_UPLOAD}, not {content_type[:60]!r}.")


def upload_limit(version: int, max_size: int, max_age: int) -> str | None:
    """Upload-Limit (added in draft -04 = interop 6, whose `expires` -06 renamed `max-age`):
    `max_age`, the seconds the upload has left."""
    if version < 6:
        return None
    age = "expires" if version == 6 else "max-age"
    return f"max-size={max_size}, {age}={max_age}"


# Answers


def _ietf(
    handler: Callable[[web.Request, int], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The interop version parsed once and echoed on every answer, refusals included."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        version: int | None = None
        try:
            version = parse_version(request.headers)
            if version is None:
                raise Problem(400, f"The {INTEROP} header is required here.")
            response = await handler(request, version)
        except Problem as problem:
            if version is not None:
                problem.headers.setdefault(INTEROP, str(version))
            raise
        response.headers[INTEROP] = str(version)
        return response

    return wrapped


def _limit_headers(request: web.Request, version: int, upload: Upload | None = None) -> dict[str, str]:
    """Upload-Limit; its age is what `upload` has left (draft: counted from this response),
    or without one (OPTIONS) the lifetime a new upload gets."""
    settings = request.app[SETTINGS_KEY]
    if upload is None:
        left = int(settings.upload_expiry_seconds)
    else:
        left = max(0, int((upload.expires_at - datetime.now(UTC)).total_seconds()))
    limit = upload_limit(version, settings.max_upload_bytes, left)
    return {} if limit is None else {"Upload-Limit": limit}


def _finished(upload: Upload, result: Mapping[str, Any]) -> web.Response:
    """What a plain PUT would have answered, plus the draft's two headers."""
    headers = {hdrs.ETAG: result["etag"], "Upload-Complete": "?1", "Upload-Offset": str(upload.length)}
    if result["status"] == 201:
        return web.json_response(result["body"], status=201, headers=headers)
    return web.Response(status=204, headers=headers)


async def _appended(request: web.Request, upload_id: uuid.UUID, offset: int, complete: bool) -> web.Response:
    engine = request.app[ENGINE]
    try:
        outcome = await tus.tracked(request, engine.append(upload_id, offset, request.content, request.content_length))
    except Problem as problem:
        if problem.status == 409 and "Upload-Offset" in problem.headers:
            expected = int(problem.headers["Upload-Offset"])
            problem.type = MISMATCHING_OFFSET
            problem.members = {"expected-offset": expected, "provided-offset": offset}
            problem.headers.setdefault("Upload-Complete", "?0")
        else:
            upload = await engine.get(upload_id)
            if upload.state == "failed":
                # Refused at its end (a precondition, a digest): the upload is over.
                problem.headers["Upload-Complete"] = "?1"
            elif upload.state == "finished" and problem.status == 410:
                # Draft §Upload Append: a completed upload is not modified; bytes sent to it are
                # an inconsistent length, an empty append a completed-upload.
                if request.content_length != 0:
                    raise Problem(
                        400,
                        f"The upload is complete ({upload.length} bytes): nothing can be appended to it.",
                        problem.headers,
                        type=INCONSISTENT_LENGTH,
                    ) from None
                problem.type = COMPLETED_UPLOAD
        raise
    if outcome.result is not None:
        return _finished(outcome.upload, outcome.result)
    if complete:
        raise Problem(
            400,
            f"Upload-Complete: ?1 was sent, but the upload has {outcome.upload.durable} of its "
            f"{outcome.upload.length} bytes.",
            {"Upload-Offset": str(outcome.upload.durable), "Upload-Complete": "?0"},
            type=INCONSISTENT_LENGTH,
        )
    return web.Response(status=204, headers={"Upload-Complete": "?0", "Upload-Offset": str(outcome.upload.durable)})


# Handlers


@_ietf
async def options(request: web.Request, version: int) -> web.Response:
    parse_event(request.match_info["event"])
    parse_start(request.match_info["start"])
    return web.Response(status=204, headers=_limit_headers(request, version))


async def _refuse_early(request: web.Request) -> tuple[int, str, int]:
    """Every check of a creation that needs no body byte; (version, type, length)."""
    check_write_token(request)
    version = parse_version(request.headers)
    assert version is not None
    parse_event(request.match_info["event"])
    parse_start(request.match_info["start"])
    if require_complete(request.headers):
        raise Problem(400, "This server creates resumable uploads with Upload-Complete: ?0 only (careful creation).")
    length = parse_length(request.headers)
    max_bytes = request.app[SETTINGS_KEY].max_upload_bytes
    if length > max_bytes:
        raise Problem(413, f"The declared length {length} is larger than the limit of {max_bytes} bytes.")
    if request.content_length is not None and request.content_length > length:
        raise Problem(400, f"The body of {request.content_length} bytes is longer than the Upload-Length {length}.")
    check_no_date_precondition(request.headers)
    check_codings(request.headers)
    return version, creation_type(request.headers), length


async def create_expect(request: web.Request) -> None:
    """Expect: 100-continue answered only when the creation can be accepted (as for PUT)."""
    try:
        await _refuse_early(request)
        await request.app[ENGINE].check_target(
            parse_event(request.match_info["event"]),
            parse_start(request.match_info["start"]),
            *tus.parse_conditions(request.headers),
        )
    except Problem:
        return  # the handler raises it again, through the middlewares
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


@_ietf
async def create(request: web.Request, version: int) -> web.Response:
    try:
        _, type_, length = await _refuse_early(request)
        if_match, if_none_match = tus.parse_conditions(request.headers)
    except Problem as problem:
        problem.headers.setdefault("Connection", "close")  # the body is left unread
        raise
    engine = request.app[ENGINE]
    upload = await engine.create(
        NewUpload(
            parse_event(request.match_info["event"]),
            parse_start(request.match_info["start"]),
            type_,
            length,
            "ietf",
            if_match,
            if_none_match,
            claims_json(digests.claims(request)),
            tus.parse_metadata(request.headers.get("Upload-Metadata")),
        )
    )
    location = f"/uploads/{upload.id}"
    headers = {hdrs.LOCATION: location, **_limit_headers(request, version, upload)}
    if request.body_exists and request.content_length != 0:
        try:
            answer = await _appended(request, upload.id, 0, complete=False)
        except Problem as problem:
            problem.headers.setdefault(hdrs.LOCATION, location)
            raise
        if answer.status != 204 or answer.headers.get("Upload-Complete") == "?1":
            answer.headers.update(headers)
            return answer
        headers["Upload-Offset"] = answer.headers["Upload-Offset"]
    else:
        headers["Upload-Offset"] = "0"
    return web.Response(status=201, headers={**headers, "Upload-Complete": "?0"})


@_ietf
async def head(request: web.Request, version: int) -> web.Response:
    upload = await request.app[ENGINE].resumable(tus.path_id(request))
    return web.Response(
        status=204,
        headers={
            "Upload-Offset": str(upload.durable),
            "Upload-Complete": "?1" if upload.state == "finished" else "?0",
            "Upload-Length": str(upload.length),
            "Cache-Control": "no-store",
            **_limit_headers(request, version, upload),
        },
    )


@_ietf
async def patch(request: web.Request, version: int) -> web.Response:
    check_write_token(request)
    check_patch_type(version, request.headers)
    check_codings(request.headers)
    offset = tus.parse_offset(request.headers)  # the same header, read the same way
    complete = require_complete(request.headers)
    upload_id = tus.path_id(request)
    # No query before the append: a body cut while one ran would be lost with its handler. A
    # `?1` body that falls short is kept and answered 400 inconsistent-upload-length after.
    if not request.body_exists or request.content_length == 0:
        upload = await request.app[ENGINE].get(upload_id)
        if upload.state == "finished" and offset == upload.length and upload.result is not None:
            return _finished(upload, upload.result)  # the client lost the last answer
        if not complete:
            raise Problem(400, "The PATCH has no body: send the bytes from the offset on.")
    return await _appended(request, upload_id, offset, complete)


@_ietf
async def delete(request: web.Request, version: int) -> web.Response:
    check_write_token(request)
    await request.app[ENGINE].cancel(tus.path_id(request))
    return web.Response(status=204)
