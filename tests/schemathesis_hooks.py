"""Schemathesis hooks for the fuzz test (loaded through SCHEMATHESIS_HOOKS).

Some properties of an upload are relations the schema cannot state: the file begins with
`OggS` (a pattern does not apply to raw bytes), a digest header or tus Upload-Checksum is the
digest of the body, tus Upload-Metadata holds base64 of a UUID, a start and a media type, and an
upload id is one the server handed out. Positive cases get them right, as any real client would
send them (a case on /uploads/{id} acts on an upload created for it); negative cases are sent as
generated, so the refusals are exercised too.
"""

import base64
import hashlib
import re
import uuid

import http_sf
import requests
import schemathesis
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from schemathesis.transport.serialization import Binary

from prerec.digests import DIGEST_HEADERS, SUPPORTED
from prerec.uploads.ietf import INTEROP, PARTIAL_UPLOAD
from prerec.uploads.tus import CHECKSUM_ALGORITHMS, OFFSET_OCTET_STREAM


def _positive(case) -> bool:  # type: ignore[no-untyped-def]
    return case.meta is not None and case.meta.generation.mode.is_positive


def _starts_the_file(case) -> bool:  # type: ignore[no-untyped-def]
    # A PUT and a tus creation send the file from its first byte; a PATCH from Upload-Offset.
    return case.method != "PATCH" or str((case.headers or {}).get("Upload-Offset")) == "0"


def _body(case) -> bytes:  # type: ignore[no-untyped-def]
    value = case.body
    data = value.data if isinstance(value, Binary) else value if isinstance(value, bytes) else str(value).encode()
    if data.startswith(b"OggS") or not _positive(case) or not _starts_the_file(case):
        return data
    return b"OggS" + data


@schemathesis.serializer("audio/ogg")
def ogg(ctx, value):  # type: ignore[no-untyped-def]
    return _body(ctx.case)


@schemathesis.serializer(OFFSET_OCTET_STREAM)
def offset_octet_stream(ctx, value):  # type: ignore[no-untyped-def]
    return _body(ctx.case)


@schemathesis.serializer(PARTIAL_UPLOAD)
def partial_upload(ctx, value):  # type: ignore[no-untyped-def]
    return _body(ctx.case)


def _metadata(**pairs: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


def _creation_metadata() -> str:
    # A fresh key each time, so that If-None-Match: * is not refused for an earlier case's file.
    return _metadata(event=str(uuid.uuid4()), start="2024-01-01T00:00", filetype="audio/ogg")


def _ietf(case) -> bool:  # type: ignore[no-untyped-def]
    """Whether a positive case on an upload's URL speaks the IETF draft, its headers made to
    agree: the body's media type picks the protocol (interop 5 names no type), as a real client
    sends one protocol's headers, not a mix the schema cannot forbid."""
    interop = case.headers.get(INTEROP)
    if case.method == "PATCH" and interop != "5":
        if case.media_type == PARTIAL_UPLOAD:
            case.headers.setdefault(INTEROP, "8")
        else:
            case.headers.pop(INTEROP, None)
    if INTEROP in case.headers:
        if case.method == "PATCH":
            case.headers.setdefault("Upload-Complete", "?0")
        return True
    if case.method != "HEAD":
        case.headers["Tus-Resumable"] = "1.0.0"
    return False


def _file_length(case) -> int:  # type: ignore[no-untyped-def]
    """The length of a new upload whose first bytes are this case's body: the body's own length
    (it completes the upload) when even, one more (the upload goes on) when odd, so both ends
    of an append are tried; exactly the body when it says it is the last (IETF `?1`)."""
    body = len(_body(case))  # a PATCH's Upload-Offset is 0 by now, so OggS comes first
    if body % 2 == 0 or case.headers.get("Upload-Complete") == "?1":
        return body
    return body + 1


def _new_upload(case) -> str:  # type: ignore[no-untyped-def]
    """The id of a new upload for this case; a PATCH's body is sent from offset 0."""
    length = 1000
    if case.method == "PATCH":
        case.headers["Upload-Offset"] = "0"
        if case.body is not NOT_SET:
            length = _file_length(case)
    response = requests.post(
        f"{case.operation.base_url.rstrip('/')}/uploads",
        headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(length), "Upload-Metadata": _creation_metadata()},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.headers["Location"].rsplit("/", 1)[1]


def _upload_in_progress(case, event: str) -> None:  # type: ignore[no-untyped-def]
    """An upload for the listed event, so that GET /uploads answers an item, not only []."""
    response = requests.post(
        f"{case.operation.base_url.rstrip('/')}/uploads",
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Length": "1000",
            "Upload-Metadata": _metadata(event=event, start="2024-01-01T00:00", filetype="audio/ogg"),
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text


def _careful_creation(case) -> bool:  # type: ignore[no-untyped-def]
    """Whether a positive case at a prerecording's key is the IETF draft's creation, with the
    headers it needs together: Upload-Complete (`?1` on a PUT is a plain PUT), metadata naming
    the type (for a body typed application/partial-upload or none), If-None-Match only `*`, no
    If-Unmodified-Since."""
    if case.method not in ("PUT", "POST") or INTEROP not in case.headers:
        return False
    case.headers.setdefault("Upload-Complete", "?0")
    if case.headers["Upload-Complete"] != "?0":
        return False
    case.headers["Upload-Metadata"] = _creation_metadata()
    if "If-None-Match" in case.headers:
        case.headers["If-None-Match"] = "*"
    case.headers.pop("If-Unmodified-Since", None)
    return True


@schemathesis.hook
def before_call(ctx, case, **kwargs):  # type: ignore[no-untyped-def]
    if not _positive(case):
        return
    # Schemathesis 4's coverage phase draws header values from letters and digits only, so for
    # a header whose pattern needs punctuation (an entity tag, a digest) it has no valid value;
    # it then reuses a non-matching one in cases it still calls positive. Those are not requests
    # the spec allows: leave the header out. First: schemathesis judges a case positive or not
    # again after each change, and _body adds OggS only to positive ones.
    for parameter in case.operation.headers:
        pattern = parameter.definition.get("schema", {}).get("pattern")
        value = case.headers.get(parameter.name)
        if pattern and isinstance(value, str) and not re.search(pattern, value):
            del case.headers[parameter.name]
    if case.path_parameters and "id" in case.path_parameters:
        _ietf(case)
        case.path_parameters["id"] = _new_upload(case)
    if case.path == "/uploads" and case.method in ("GET", "HEAD") and case.query and "event" in case.query:
        _upload_in_progress(case, str(case.query["event"]))
    if not case.headers:
        return
    if case.method not in ("PUT", "POST", "PATCH"):
        return
    creation = _careful_creation(case)
    if case.method == "POST" and not creation:  # tus's creation
        case.headers["Upload-Metadata"] = _creation_metadata()
    if case.body is NOT_SET:
        return
    body = _body(case)
    if case.method == "POST" and not creation:
        # The body is the whole file: the creation completes, and the digests are the file's.
        case.headers["Upload-Length"] = str(len(body))
    if creation:
        case.headers["Upload-Length"] = str(_file_length(case))
    if "Upload-Checksum" in case.headers:
        algorithm = case.headers["Upload-Checksum"].split(" ")[0]
        digest = hashlib.new(CHECKSUM_ALGORITHMS[algorithm], body).digest()
        case.headers["Upload-Checksum"] = f"{algorithm} {base64.b64encode(digest).decode()}"
    if "Content-MD5" in case.headers:
        case.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
    for header in DIGEST_HEADERS:
        if header in case.headers:
            # Keep the generated members and their order; only the checked algorithms get the
            # digest of what is sent (unknown ones are ignored by the server, as RFC 9530 allows).
            members = http_sf.parse(case.headers[header].encode(), tltype="dictionary")
            for name, (_, params) in list(members.items()):
                if name in SUPPORTED:
                    members[name] = (hashlib.new(SUPPORTED[name], body).digest(), params)
            case.headers[header] = http_sf.ser(members)


@schemathesis.check
def documented_body(ctx, response, case):  # type: ignore[no-untyped-def]
    """content_type_conformance and response_schema_conformance, but for the one answer whose
    body OpenAPI 3.1 cannot describe: the IETF draft's careful creation answers 201 with no body
    (the upload goes on at its Location) where the same operation's PUT answers 201 with the JSON
    item, and a response object cannot mark its content optional. Its headers are still checked
    (response_headers_conformance)."""
    if response.status_code == 201 and response.headers.get("upload-complete") == ["?0"] and not response.content:
        return None
    content_type_conformance(ctx, response, case)
    return response_schema_conformance(ctx, response, case)
