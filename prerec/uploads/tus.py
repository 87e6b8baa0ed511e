"""tus 1.0.0 over the upload engine: core, creation, creation-with-upload, termination,
expiration, checksum (https://tus.io/protocols/resumable-upload).

Header parsing is pure functions over mappings; handlers only parse, call the engine and
shape the answer. Every answer, errors included, carries Tus-Resumable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web

from prerec import digests
from prerec.auth import check_write_token
from prerec.config import SETTINGS_KEY
from prerec.model import OGG, NewUpload, Upload, http_date, parse_count, parse_event, parse_start
from prerec.prerecordings import UPLOADS, check_codings
from prerec.problems import Problem
from prerec.uploads.engine import ENGINE, Checksum, claims_json, ended

VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
# tus names -> hashlib names.
CHECKSUM_ALGORITHMS = {"sha1": "sha1", "sha256": "sha256"}
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
MAX_METADATA = 4096


# Parsing (pure)


def check_resumable(headers: Mapping[str, str]) -> None:
    version = headers.get("Tus-Resumable")
    if version != VERSION:
        said = "no Tus-Resumable header was sent" if version is None else f"Tus-Resumable {version[:20]!r} was sent"
        raise Problem(412, f"This server speaks tus {VERSION} only; {said}.", {"Tus-Version": VERSION})


def parse_length(headers: Mapping[str, str]) -> int:
    if "Upload-Defer-Length" in headers:
        raise Problem(400, "Upload-Defer-Length is not offered: declare the length with Upload-Length.")
    if "Upload-Concat" in headers:
        raise Problem(400, "Upload-Concat (the concatenation extension) is not offered.")
    value = headers.get("Upload-Length")
    if value is None:
        raise Problem(400, "The Upload-Length header is required: the whole file's size in bytes.")
    return parse_count(value.strip(), "Upload-Length")


def parse_offset(headers: Mapping[str, str]) -> int:
    value = headers.get("Upload-Offset")
    if value is None:
        raise Problem(400, "The Upload-Offset header is required: where this body's bytes begin.")
    return parse_count(value.strip(), "Upload-Offset")


def parse_metadata(value: str | None) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64(value)` pairs (the value may be left out)."""
    if value is None:
        return {}
    if len(value) > MAX_METADATA:
        raise Problem(400, f"The Upload-Metadata is {len(value)} characters long; at most {MAX_METADATA} are read.")
    found: dict[str, str] = {}
    for pair in value.split(","):
        parts = pair.strip().split(" ")
        if len(parts) > 2 or not parts[0] or not parts[0].isascii():
            raise Problem(400, f"The Upload-Metadata pair {pair.strip()[:60]!r} is not 'key base64value'.")
        key = parts[0]
        if key in found:
            raise Problem(400, f"The Upload-Metadata key {key[:40]!r} is given twice.")
        try:
            found[key] = base64.b64decode(parts[1], validate=True).decode() if len(parts) == 2 else ""
        except (binascii.Error, ValueError):
            raise Problem(400, f"The Upload-Metadata value of {key[:40]!r} is not base64 of UTF-8 text.") from None
    return found


def format_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key for key, value in metadata.items()
    )


def parse_checksum(headers: Mapping[str, str]) -> Checksum | None:
    value = headers.get("Upload-Checksum")
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise Problem(
            400,
            f"The Upload-Checksum algorithm {algorithm[:20]!r} is not supported; use one of "
            f"{', '.join(CHECKSUM_ALGORITHMS)}.",
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    name = CHECKSUM_ALGORITHMS[algorithm]
    if len(digest) != hashlib.new(name).digest_size:
        raise Problem(400, f"The Upload-Checksum value is not the base64 of a {algorithm} digest.")
    return Checksum(name, digest)


def parse_target(metadata: Mapping[str, str]) -> tuple[uuid.UUID, Any, str]:
    """The prerecording an upload becomes: metadata keys event, start (as in the path), filetype."""
    for key in ("event", "start"):
        if key not in metadata:
            raise Problem(400, f"The Upload-Metadata must name the {key} (key {key!r}, base64 value).")
    filetype = metadata.get("filetype")
    if filetype is None or filetype.split(";")[0].strip().lower() != OGG:
        raise Problem(415, f"The Upload-Metadata filetype must be {OGG}, not {filetype!r}.")
    return parse_event(metadata["event"], "event"), parse_start(metadata["start"], "start"), OGG


def parse_conditions(headers: Mapping[str, str]) -> tuple[str | None, bool]:
    """A creation's If-Match (as sent, decided when the upload ends) and whether it sent
    If-None-Match: *, the only If-None-Match an upload keeps (create, never replace)."""
    if_none_match = headers.get(hdrs.IF_NONE_MATCH)
    if if_none_match is not None and if_none_match.strip() != "*":
        raise Problem(400, "On an upload's creation If-None-Match may only be '*' (create, never replace).")
    return headers.get(hdrs.IF_MATCH), if_none_match is not None


def parse_patch_type(headers: Mapping[str, str]) -> None:
    content_type = headers.get(hdrs.CONTENT_TYPE, "")
    if content_type.split(";")[0].strip().lower() != OFFSET_OCTET_STREAM:
        raise Problem(415, f"A PATCH carries Content-Type {OFFSET_OCTET_STREAM}, not {content_type[:60]!r}.")


# Answers


def _upload_headers(upload: Upload) -> dict[str, str]:
    headers = {"Upload-Offset": str(upload.durable), "Cache-Control": "no-store"}
    if upload.state in ("receiving", "finishing"):
        headers["Upload-Expires"] = http_date(upload.expires_at)
    return headers


def _tus(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Tus-Resumable on every answer, refusals included."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Problem as problem:
            problem.headers.setdefault("Tus-Resumable", VERSION)
            raise
        response.headers["Tus-Resumable"] = VERSION
        return response

    return wrapped


def path_id(request: web.Request) -> uuid.UUID:
    text = request.match_info["id"]
    if text.isascii():
        with contextlib.suppress(ValueError):
            return uuid.UUID(text)
    raise Problem(404, f"There is no upload {text[:60]!r}.")


def _content_length(request: web.Request) -> int | None:
    return request.content_length


# Handlers


@_tus
async def options(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Tus-Version": VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(request.app[SETTINGS_KEY].max_upload_bytes),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        },
    )


async def tracked(request: web.Request, work: Awaitable[web.Response]) -> web.Response:
    # A graceful shutdown waits for bodies in flight, as for PUT.
    task = asyncio.current_task()
    assert task is not None
    request.app[UPLOADS].add(task)
    try:
        return await work
    finally:
        request.app[UPLOADS].discard(task)


@_tus
async def create(request: web.Request) -> web.Response:
    check_write_token(request)
    check_resumable(request.headers)
    length = parse_length(request.headers)
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    event, start, type_ = parse_target(metadata)
    if_match, if_none_match = parse_conditions(request.headers)
    if request.body_exists:
        # Before the upload exists: refused, it would be left with no client knowing its URL.
        parse_patch_type(request.headers)
        check_codings(request.headers)
    engine = request.app[ENGINE]
    upload = await engine.create(
        NewUpload(
            event, start, type_, length, "tus", if_match, if_none_match, claims_json(digests.claims(request)), metadata
        )
    )
    location = f"/uploads/{upload.id}"
    headers = {hdrs.LOCATION: location, **_upload_headers(upload)}
    if request.body_exists:
        try:
            outcome = await tracked(
                request,
                engine.append(upload.id, 0, request.content, _content_length(request), parse_checksum(request.headers)),
            )
        except Problem as problem:
            problem.headers.setdefault(hdrs.LOCATION, location)
            raise
        headers.update(_upload_headers(outcome.upload))
        if outcome.result is not None and outcome.result.get("etag"):
            headers[hdrs.ETAG] = outcome.result["etag"]
    return web.Response(status=201, headers=headers)


@_tus
async def head(request: web.Request) -> web.Response:
    # Without the header it is answered, as tusd does: a browser or a curl -I looking at an
    # upload. A client that names another tus version is told (412).
    if "Tus-Resumable" in request.headers:
        check_resumable(request.headers)
    upload = await request.app[ENGINE].resumable(path_id(request))
    headers = {**_upload_headers(upload), "Upload-Length": str(upload.length)}
    if upload.metadata:
        headers["Upload-Metadata"] = format_metadata(upload.metadata)
    return web.Response(status=200, headers=headers)


@_tus
async def patch(request: web.Request) -> web.Response:
    check_write_token(request)
    check_resumable(request.headers)
    parse_patch_type(request.headers)
    check_codings(request.headers)
    offset = parse_offset(request.headers)
    checksum = parse_checksum(request.headers)
    upload_id = path_id(request)
    engine = request.app[ENGINE]
    if not request.body_exists:
        upload = await engine.get(upload_id)
        if upload.state == "finished" and offset == upload.length:
            return _patched(upload, upload.result)
        ended(upload)
        raise Problem(400, "The PATCH has no body: send the bytes from the offset on.")
    outcome = await tracked(
        request, engine.append(upload_id, offset, request.content, _content_length(request), checksum)
    )
    return _patched(outcome.upload, outcome.result)


def _patched(upload: Upload, result: dict[str, Any] | None) -> web.Response:
    headers = _upload_headers(upload)
    if result is not None and result.get("etag"):
        headers[hdrs.ETAG] = result["etag"]
    return web.Response(status=204, headers=headers)


@_tus
async def delete(request: web.Request) -> web.Response:
    check_write_token(request)
    check_resumable(request.headers)
    await request.app[ENGINE].cancel(path_id(request))
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    # HEAD, PATCH and DELETE on /uploads/{id} are shared with the IETF draft: routes.py
    # dispatches them by header.
    app.router.add_route("OPTIONS", "/uploads", options)
    app.router.add_post("/uploads", create)
