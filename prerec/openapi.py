"""GET /openapi (the Scalar reference page) and /openapi/openapi.json (the OpenAPI 3.1 spec).

The paths are written here by hand, the JSON shapes come from prerec/schemas.py, and tests
check the document against the routes the app registers, against the server (schemathesis:
no request it allows is refused) and against two client generators (tests/test_clients.py).
"""

from __future__ import annotations

import hashlib
import html
import json
from typing import Any

from aiohttp import web

from prerec.config import SETTINGS_KEY
from prerec.model import MAX_BIGINT
from prerec.schemas import SCHEMAS, SSE_ITEM, UUID_PATTERN, ref
from prerec.uploads import ietf, tus

# Header values in the forms the server reads. Entity tags as aiohttp parses them (it does not
# refuse a malformed list: it reads it as naming no tag, so the precondition fails with 412).
_ENTITY_TAGS = r'^(?:\*|(?:W/)?"[!#-~]+"(?: *, *(?:W/)?"[!#-~]+")*)$'
# An RFC 8941 dictionary of byte sequences, `sha-256=:<base64>:, sha-512=:<base64>:`.
_BASE64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"


def _base64_of(size: int) -> str:
    """Padded base64 of exactly `size` bytes."""
    tail = {0: "", 1: "[A-Za-z0-9+/]{2}==", 2: "[A-Za-z0-9+/]{3}="}[size % 3]
    return f"[A-Za-z0-9+/]{{{size // 3 * 4}}}{tail}"


_DIGEST_MEMBER = rf"[a-z*][a-z0-9_.*-]*=:{_BASE64}:"
_DIGESTS = rf"^{_DIGEST_MEMBER}(?: *, *{_DIGEST_MEMBER})*$"
# IMF-fixdate, the form the server sends (model.http_date).
_HTTP_DATE = r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT$"


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": ref("Problem")}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
_UNAVAILABLE = _problem("The database or the store (folder or bucket) is not available right now.", _RETRY_AFTER)
_BAD_REQUEST = _problem("A path or query value is malformed; the detail names it.")
_NOT_FOUND = _problem("No prerecording of that event at that start.")
_KEY_PARAMETERS = [{"$ref": "#/components/parameters/event"}, {"$ref": "#/components/parameters/start"}]
_VALIDATORS = {
    "ETag": {"$ref": "#/components/headers/ETag"},
    "Last-Modified": {"$ref": "#/components/headers/Last-Modified"},
}
_REPRESENTATION_HEADERS = {
    "Content-Length": {"schema": {"type": "integer", "minimum": 0}, "description": "Size in bytes."},
    "Content-Type": {"$ref": "#/components/headers/Content-Type"},
    "Accept-Ranges": {"description": "Always `bytes`.", "schema": {"type": "string", "enum": ["bytes"]}},
    "Repr-Digest": {
        "description": "SHA-256 of the whole representation (RFC 9530), also on 206.",
        "schema": {"type": "string", "pattern": "^sha-256=:[A-Za-z0-9+/]{43}=:$"},
    },
    **_VALIDATORS,
}
_UNAUTHORIZED = _problem(
    "PREREC_WRITE_TOKEN is set and the request lacks `Authorization: Bearer <token>`.",
    {"WWW-Authenticate": {"description": 'Bearer realm="prerec"', "schema": {"type": "string"}}},
)
# Writes are open unless the operator sets PREREC_WRITE_TOKEN: either way is valid.
_WRITE_SECURITY = [{}, {"writeToken": []}]
_PRECONDITION_FAILED = _problem("A precondition (If-Match, If-None-Match, If-Unmodified-Since) failed.")


def _header(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_IF_MATCH = _header(
    "If-Match",
    "Only if the current ETag is one of these (strong comparison), or `*`: it exists.",
    {"type": "string", "pattern": _ENTITY_TAGS},
)
_IF_NONE_MATCH = _header(
    "If-None-Match",
    "Only if the current ETag is none of these (weak comparison); `*`: it does not exist.",
    {"type": "string", "pattern": _ENTITY_TAGS},
)
_IF_UNMODIFIED_SINCE = _header("If-Unmodified-Since", "Only if not modified since this HTTP date.")


def _digest_parameters(of: str) -> list[dict[str, Any]]:
    checked = f"RFC 9530 digests of {of}; sha-256 and sha-512 are checked, others ignored."
    return [
        _header(
            "Content-MD5", f"Base64 MD5 of {of} (RFC 1864).", {"type": "string", "pattern": "^[A-Za-z0-9+/]{22}==$"}
        ),
        _header("Repr-Digest", checked, {"type": "string", "pattern": _DIGESTS}),
        _header("Content-Digest", checked, {"type": "string", "pattern": _DIGESTS}),
    ]


def _query(name: str, description: str, schema: dict[str, Any], **style: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema, **style}


_OGG = {"audio/ogg": {"schema": {"type": "string", "format": "binary", "contentMediaType": "audio/ogg"}}}


# tus 1.0.0 (prerec/uploads/tus.py). Every answer of its handlers carries Tus-Resumable; a 503
# may come from before the handler (shutting down, the connection limit), which does not.
_TUS_ANSWER = {"description": "The tus version of the answer.", "schema": {"type": "string", "enum": [tus.VERSION]}}
_TUS_RESUMABLE = {"Tus-Resumable": {**_TUS_ANSWER, "required": True}}
_UUID = UUID_PATTERN.removeprefix("^").removesuffix("$")
_UPLOAD_OFFSET = {"description": "Bytes received and made durable.", "schema": {"type": "integer", "minimum": 0}}
_UPLOAD_EXPIRES = {
    "description": "When an unfinished upload expires (PREREC_UPLOAD_EXPIRY_SECONDS after its last progress).",
    "schema": {"type": "string", "pattern": _HTTP_DATE},
}
_UPLOAD_STATE = {
    "Upload-Offset": {**_UPLOAD_OFFSET, "required": True},
    "Upload-Expires": _UPLOAD_EXPIRES,
    "Cache-Control": {"required": True, "schema": {"type": "string", "enum": ["no-store"]}},
}
_TUS_ETAG = {
    "ETag": {
        "description": "Only once the upload is complete: the prerecording's ETag.",
        "schema": {"type": "string", "pattern": r'^"[0-9a-f]{64}"$'},
    }
}
_ID_PARAMETERS = [
    {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The upload's id, the last part of the creation's Location.",
        "schema": {"type": "string", "format": "uuid"},
    },
]
_TUS_RESUMABLE_PARAMETER = {
    "name": "Tus-Resumable",
    "in": "header",
    "required": True,
    "description": "The tus version the client speaks.",
    "schema": ref("TusVersion"),
}
_UPLOAD_CHECKSUM = _header(
    "Upload-Checksum",
    "`<algorithm> <base64 digest>` of this request's body; on a mismatch none of its bytes count (460).",
    {
        "type": "string",
        "pattern": "^(?:"
        + "|".join(
            f"{name} {_base64_of(hashlib.new(hashed).digest_size)}" for name, hashed in tus.CHECKSUM_ALGORITHMS.items()
        )
        + ")$",
    },
)
_OFFSET_OCTET_STREAM = {
    tus.OFFSET_OCTET_STREAM: {
        "schema": {"type": "string", "format": "binary", "contentMediaType": tus.OFFSET_OCTET_STREAM}
    }
}
# A pair is `key base64(value)`, or a bare key; keys are ASCII without space or comma.
_METADATA_PAIR = rf"[!-+.-~-]+(?: {_BASE64})?"


def _tus_problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _problem(description, {**_TUS_RESUMABLE, **(headers or {})})


def _tus_unavailable(description: str) -> dict[str, Any]:
    return _problem(description, {"Tus-Resumable": _TUS_ANSWER, **_RETRY_AFTER})


def _bodiless(response: dict[str, Any]) -> dict[str, Any]:
    """A HEAD's answer: the problem's headers, no body."""
    return {key: value for key, value in response.items() if key != "content"}


_TUS_VERSION = {
    "Tus-Version": {
        "required": True,
        "description": "The tus versions served.",
        "schema": {"type": "string", "enum": [tus.VERSION]},
    }
}
_TUS_PRECONDITION_FAILED = _tus_problem(
    "Tus-Resumable is missing or not 1.0.0 (then with Tus-Version); or the creation's If-Match or "
    "If-None-Match: * failed: at creation (no upload is made; the same body as a PUT's 412) or when the "
    "upload was complete.",
    {"Tus-Version": {**_TUS_VERSION["Tus-Version"], "required": False}},
)
_TUS_UNAUTHORIZED = _problem(_UNAUTHORIZED["description"], {**_TUS_RESUMABLE, **_UNAUTHORIZED["headers"]})
_RESUME_HERE = {
    "Location": {
        "description": "Set when the upload was created before the body failed: resume it there.",
        "schema": {"type": "string", "pattern": rf"^/uploads/{_UUID}$"},
    }
}
_STALLED = "The body stalled for PREREC_READ_TIMEOUT_SECONDS; what arrived was kept (without Upload-Checksum)."
_CHECKSUM_MISMATCH = "The Upload-Checksum does not match the body received; none of its bytes were kept."
_TAKEN_OVER = "Another request took this upload over; resume from the Upload-Offset given."
_FULL = "The storage folder is full, or has less room free than the declared length."
_TUS_SHUTDOWN = (
    "The database or the storage folder is not available, or this replica is shutting down (the bytes that "
    "arrived were kept: resume on another replica)."
)

# The IETF resumable-upload draft (prerec/uploads/ietf.py) shares its routes with tus and with the
# plain PUT. OpenAPI has one operation per method and path, so each such operation documents every
# protocol it serves: their request headers as optional parameters (the descriptions say which a
# request needs together) and the union of their answers, each description saying who gives what.
_INTEROP_ANSWER = {
    "description": "IETF draft: the request's interop version, on every answer to a request naming a supported one.",
    "schema": ref("InteropVersion"),
}
_DRAFT = {ietf.INTEROP: _INTEROP_ANSWER}
_UPLOAD_COMPLETE = {
    "Upload-Complete": {
        "description": "IETF draft: `?1` once the upload is over (stored, or refused at its end), else `?0`.",
        "schema": ref("UploadComplete"),
    }
}
_UPLOAD_LIMIT = {
    "Upload-Limit": {
        "description": (
            "IETF draft, interop 6 and later: `max-size=<PREREC_MAX_UPLOAD_BYTES>, "
            "max-age=<PREREC_UPLOAD_EXPIRY_SECONDS>` (interop 6 says `expires=` for `max-age=`)."
        ),
        "schema": {"type": "string", "pattern": r"^max-size=[0-9]+, (?:max-age|expires)=[0-9]+$"},
    }
}
_INTEROP_PARAMETER = _header(
    ietf.INTEROP,
    "IETF draft: the interop version spoken, 5 to 8 (3 and 4 are refused, 400). With it the request is "
    "the draft's; without it, tus's (on /uploads/{id}) or a plain one.",
    ref("InteropVersion"),
)
_UPLOAD_LOCATION = {"type": "string", "pattern": rf"^/uploads/{_UUID}$"}
_MISMATCH_TYPE = f"`{ietf.MISMATCHING_OFFSET}`"
_INCONSISTENT_TYPE = f"`{ietf.INCONSISTENT_LENGTH}`"
# Answers of /uploads/{id}: tus's carry Tus-Resumable, the draft's its interop version.
_EITHER = {"Tus-Resumable": {**_TUS_ANSWER, "description": "tus: on every answer."}, **_DRAFT}


def _upload_problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _problem(description, {**_EITHER, **(headers or {})})


_NO_UPLOAD = _upload_problem("No upload with this id (a malformed id included).")


def _also(response: dict[str, Any], headers: dict[str, Any]) -> dict[str, Any]:
    """A response of the plain PUT that the draft's creation gives too, with the draft's headers."""
    return {**response, "headers": {**response.get("headers", {}), **headers}}


# A careful creation at the key (PUT with the interop header and `Upload-Complete: ?0`, or POST).
_CREATION_PARAMETERS = [
    _header(
        "Upload-Length",
        "IETF draft's creation (required there): the whole file's size in bytes, at least 4 (`OggS`); at most "
        "PREREC_MAX_UPLOAD_BYTES.",
        {"type": "integer", "minimum": 4, "maximum": MAX_BIGINT},
    ),
    _header(
        "Upload-Metadata",
        "IETF draft's creation: tus-style `key base64(value)` pairs (tus-js-client sends them); `filetype` "
        "gives the type when Content-Type is absent or application/partial-upload.",
        {"type": "string", "maxLength": tus.MAX_METADATA, "pattern": rf"^{_METADATA_PAIR}(?: *, *{_METADATA_PAIR})*$"},
    ),
]
_CREATED_UPLOAD = {
    "Location": {
        "description": "IETF draft's creation: the upload's URL, /uploads/{id}; append there with PATCH.",
        "schema": _UPLOAD_LOCATION,
    },
    "Upload-Offset": {**_UPLOAD_OFFSET, "description": "IETF draft's creation: the bytes received."},
    **_UPLOAD_COMPLETE,
    **_UPLOAD_LIMIT,
    **_DRAFT,
}
_CREATED = {
    "description": (
        "Created: the prerecording, as JSON (a plain PUT; or, in the IETF draft, the request whose bytes "
        "completed the upload, with `Upload-Complete: ?1`). IETF draft's careful creation that has not "
        "received the whole file: no body (`Upload-Complete: ?0`), and the upload's Location. OpenAPI 3.1 "
        "cannot mark a body optional: generated clients send no interop header and always get the JSON."
    ),
    "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
    "content": {"application/json": {"schema": ref("Prerecording")}},
}
_REPLACED = {
    "description": (
        "Replaced (a plain PUT; or, in the IETF draft, the request whose bytes completed the upload, with "
        "`Upload-Complete: ?1`)."
    ),
    "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
}
_CREATION_BAD = (
    "an unsupported interop version; Upload-Complete, Upload-Length or Upload-Metadata missing or malformed; "
    "a declared length of 0; If-None-Match other than `*`; If-Unmodified-Since without If-Match; a body "
    "longer than Upload-Length, cut off or not Ogg; or a digest that does not match the whole file."
)
_CREATION_PRECONDITION = (
    "IETF draft's creation whose body completed the upload: If-Match or If-None-Match: * failed, decided "
    "when complete (`Upload-Complete: ?1`, the bytes are discarded)."
)
_PARTIAL_UPLOAD = {
    ietf.PARTIAL_UPLOAD: {"schema": {"type": "string", "format": "binary", "contentMediaType": ietf.PARTIAL_UPLOAD}}
}
_CREATION_REFUSED = {
    **_DRAFT,
    "Location": {
        "description": "IETF draft's creation: set when the upload was created before its body failed: resume there.",
        "schema": _UPLOAD_LOCATION,
    },
}


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "prerec",
        "version": "1.0.0",
        "description": (
            "Prerecordings of scheduled events: the audio of one airing, named by the event's UUID and "
            "the instance's start in the event's own timezone (a naive datetime). Audio is Ogg.\n\n"
            "Every answer carries `X-Request-ID` (the client's, if short printable ASCII, else a new one). "
            "Any request may also be answered `414` (request line over 8192 bytes) or `431` (a header "
            "field over 8190 bytes, or too many), and, when the replica is at PREREC_MAX_CONNECTIONS with "
            "no idle connection to close, `503` with `Retry-After` and `Connection: close`. With "
            "PREREC_CORS_ORIGINS set, `OPTIONS` preflights are answered `204` on every path (`403` for an "
            "origin not listed) and answers carry `Access-Control-Allow-Origin`, "
            "`Access-Control-Expose-Headers` and `Vary: Origin`."
        ),
    },
    "paths": {
        "/ping": {
            "get": {
                "operationId": "ping",
                "summary": "Liveness check (does not touch the database)",
                "responses": {"204": {"description": "The process is alive."}},
            },
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: the database answers, storage is writable, the listener is connected",
                "responses": {
                    "200": {
                        "description": "Ready for traffic.",
                        "content": {"application/json": {"schema": ref("Readiness")}},
                    },
                    "503": _problem("Not ready (the detail names why), or shutting down.", _RETRY_AFTER),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format)",
                "responses": {
                    "200": {
                        "description": "Counters, gauges and histograms named prerec_*.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            },
        },
        "/prerecordings/{event}": {
            "get": {
                "operationId": "listPrerecordings",
                "summary": "List an event's prerecordings, ordered by start",
                "description": (
                    "Page with `limit` and `offset` until `offset` reaches `count`. For the original's "
                    'clients the server also takes each value JSON-encoded (`after="2024-01-01T00:00:00"`, '
                    '`order="desc"`), `null` for not given, and `limit=null` for no limit; the schemas '
                    "describe the plain forms only, so that generated clients type them plainly. Each "
                    "parameter may be given once: a repeated one is 400, not first-wins."
                ),
                "parameters": [
                    {"$ref": "#/components/parameters/event"},
                    _query("after", "Only starts at or after this one (inclusive).", ref("Start")),
                    _query("before", "Only starts before this one (exclusive).", ref("Start")),
                    _query(
                        "limit",
                        "Most items to return.",
                        {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT, "default": 10},
                    ),
                    _query(
                        "offset",
                        "Items to skip.",
                        {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT, "default": 0},
                    ),
                    _query("order", "Order by start.", ref("Order")),
                ],
                "responses": {
                    "200": {
                        "description": "One page of the matching prerecordings.",
                        "content": {"application/json": {"schema": ref("PrerecordingList")}},
                    },
                    "400": _BAD_REQUEST,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/prerecordings/{event}/{start}": {
            "get": {
                "operationId": "downloadPrerecording",
                "summary": "Download a prerecording, whole or one byte range",
                "description": (
                    "Single byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`) get 206; a request for several "
                    "ranges, a malformed Range or two Range headers get the whole body (200). Positions are "
                    "ASCII digits of any length: a first position past the size is 416, a last one past it "
                    "is clamped. Conditional requests follow "
                    "RFC 9110: If-Match and If-Unmodified-Since (412), If-None-Match and If-Modified-Since "
                    "(304), If-Range with an ETag or a date."
                ),
                "parameters": [
                    *_KEY_PARAMETERS,
                    _header("Range", "One byte range: bytes=a-b, bytes=a- or bytes=-n."),
                    _header("If-Range", "Apply Range only if this ETag or HTTP date is still current."),
                    _IF_MATCH,
                    _IF_NONE_MATCH,
                    _header("If-Modified-Since", "Answer 304 unless modified after this HTTP date."),
                    _IF_UNMODIFIED_SINCE,
                ],
                "responses": {
                    "200": {
                        "description": "The audio, exactly as uploaded.",
                        "headers": _REPRESENTATION_HEADERS,
                        "content": _OGG,
                    },
                    "206": {
                        "description": "The requested byte range.",
                        "headers": {
                            **_REPRESENTATION_HEADERS,
                            "Content-Range": {"description": "bytes a-b/size", "schema": {"type": "string"}},
                        },
                        "content": _OGG,
                    },
                    "304": {
                        "description": "Not modified (If-None-Match or If-Modified-Since).",
                        "headers": _VALIDATORS,
                    },
                    "307": {
                        "description": (
                            "Only with PREREC_S3_PRESIGNED_GET_SECONDS above 0 on an S3 store, for a GET "
                            "with no If-* header (a conditional GET is streamed: the store would compare "
                            "its own ETags): a presigned URL to the object, after prerec's own checks "
                            "(404, 416 from its metadata). The client sends its Range again there."
                        ),
                        "headers": {
                            "Location": {
                                "description": "The presigned URL, valid PREREC_S3_PRESIGNED_GET_SECONDS.",
                                "required": True,
                                "schema": {"type": "string"},
                            },
                            "Cache-Control": {"description": "no-store", "schema": {"type": "string"}},
                        },
                    },
                    "400": _BAD_REQUEST,
                    "404": _NOT_FOUND,
                    "412": _PRECONDITION_FAILED,
                    "416": _problem(
                        "The range is outside the stored bytes.",
                        {"Content-Range": {"description": "bytes */size", "schema": {"type": "string"}}},
                    ),
                    "503": _UNAVAILABLE,
                },
            },
            "put": {
                "operationId": "uploadPrerecording",
                "security": _WRITE_SECURITY,
                "summary": "Upload (create or replace) a prerecording",
                "description": (
                    "The body is streamed to disk as it arrives, chunked or with Content-Length. It must "
                    "start with the Ogg capture pattern `OggS`. The previous version stays served, whole, "
                    "until the new one is completely stored. `If-None-Match: *` makes it create-only; "
                    "`If-Match` replaces only a known version; both are decided in the writing transaction. "
                    "Content-MD5, Repr-Digest and Content-Digest (sha-256, sha-512) are checked against the "
                    "body. A wrong Content-Type, a declared length over the limit or a failed precondition "
                    "is answered before the body is read (and before `100 Continue`). The bytes are stored "
                    "exactly as sent: a Content-Encoding other than `identity` (415), a transfer coding other "
                    "than `chunked` (501) and a partial PUT with Content-Range (400) are refused.\n\n"
                    "With `Upload-Draft-Interop-Version` and `Upload-Complete: ?0` the PUT is the IETF "
                    "resumable-upload draft's careful creation, as POST here: `Upload-Length` is required, the "
                    "type comes from Content-Type (or the `filetype` metadata when it is absent or "
                    "application/partial-upload), If-None-Match may only be `*`, and the body (possibly empty) "
                    "is the file's first bytes. The answer is 201 with the upload's Location, no body; when the "
                    "body was the whole file, the plain PUT's answer with the draft's headers. With "
                    "`Upload-Complete: ?1` (an optimistic creation) it is a plain PUT: no 104 interim response "
                    "is ever sent, so such an upload cannot be resumed."
                ),
                "parameters": [
                    *_KEY_PARAMETERS,
                    _IF_MATCH,
                    _IF_NONE_MATCH,
                    {
                        **_IF_UNMODIFIED_SINCE,
                        "description": _IF_UNMODIFIED_SINCE["description"] + " Not on the IETF draft's creation "
                        "(400 unless If-Match is given too): an upload keeps If-Match and If-None-Match: * only.",
                    },
                    *_digest_parameters("the body"),
                    _header(
                        "Expect",
                        "The answer comes before the body is sent if it is a refusal.",
                        ref("Expectation"),
                    ),
                    _INTEROP_PARAMETER,
                    _header(
                        "Upload-Complete",
                        "IETF draft (required with its interop header): `?0` creates a resumable upload; `?1` "
                        "is a plain PUT.",
                        ref("UploadComplete"),
                    ),
                    *_CREATION_PARAMETERS,
                ],
                "requestBody": {
                    "required": True,
                    "description": "Ogg audio: it must begin with the capture pattern `OggS`.",
                    "content": _OGG,
                },
                "responses": {
                    "201": _also(_CREATED, _CREATED_UPLOAD),
                    "204": _also(_REPLACED, _CREATED_UPLOAD),
                    "400": _problem(
                        "A path value or digest header is malformed, the body is empty or not Ogg, a digest "
                        "does not match, or Content-Range was sent (a partial PUT is not supported). IETF "
                        "draft's creation: " + _CREATION_BAD,
                        _CREATION_REFUSED,
                    ),
                    "401": _also(_UNAUTHORIZED, _DRAFT),
                    "408": _problem(
                        "The body stalled, or arrived slower than PREREC_MIN_UPLOAD_RATE_BYTES a second averaged "
                        "over PREREC_READ_TIMEOUT_SECONDS; nothing was stored. IETF draft's creation: " + _STALLED,
                        _CREATION_REFUSED,
                    ),
                    "412": _problem(
                        _PRECONDITION_FAILED["description"] + " " + _CREATION_PRECONDITION,
                        {**_CREATION_REFUSED, **_UPLOAD_COMPLETE},
                    ),
                    "413": _problem(
                        "The body (IETF draft's creation: Upload-Length) is larger than PREREC_MAX_UPLOAD_BYTES.",
                        _DRAFT,
                    ),
                    "415": _problem(
                        "The Content-Type is not audio/ogg, is malformed or longer than 256 characters; or a "
                        "Content-Encoding other than identity was sent. IETF draft's creation: the type (Content-"
                        "Type, else the filetype metadata) is not audio/ogg.",
                        {
                            "Accept-Encoding": {
                                "description": "`identity` when a content coding was refused.",
                                "schema": {"type": "string", "enum": ["identity"]},
                            },
                            **_DRAFT,
                        },
                    ),
                    "417": _problem("The Expect header names something other than 100-continue."),
                    "501": _problem("A transfer coding other than chunked was sent."),
                    "503": _also(_UNAVAILABLE, _DRAFT),
                    "507": _problem(
                        "The storage folder is full (IETF draft's creation: has less room than Upload-Length).",
                        _CREATION_REFUSED,
                    ),
                },
            },
            "delete": {
                "operationId": "deletePrerecording",
                "security": _WRITE_SECURITY,
                "summary": "Delete a prerecording",
                "parameters": [*_KEY_PARAMETERS, _IF_MATCH, _IF_UNMODIFIED_SINCE],
                "responses": {
                    "204": {"description": "Deleted."},
                    "400": _BAD_REQUEST,
                    "401": _UNAUTHORIZED,
                    "404": _NOT_FOUND,
                    "412": _PRECONDITION_FAILED,
                    "503": _UNAVAILABLE,
                },
            },
            "post": {
                "operationId": "createDraftUpload",
                "security": _WRITE_SECURITY,
                "summary": "Create a resumable upload (IETF draft, careful creation)",
                "description": (
                    "The IETF resumable-upload draft's creation, as tus-js-client's IETF modes send it "
                    "(a PUT at the key with `Upload-Draft-Interop-Version` and `Upload-Complete: ?0` does "
                    "the same). Interop versions 5 to 8; 3 and 4 are refused (400). No 104 interim response "
                    "is ever sent: the upload's URL comes in the final 201, so a client must create "
                    "carefully (`Upload-Complete: ?0`, then PATCH). The type comes from Content-Type, or from "
                    "the `filetype` metadata when Content-Type is absent or application/partial-upload. "
                    "If-Match, If-None-Match: * and the digest headers (of the whole file) are decided when "
                    "the upload is complete, as for a PUT. A body is the file's first bytes; when it is the "
                    "whole file the answer is the PUT's (201 with the JSON item, or 204), with the draft's "
                    "headers. Refusals that need no body byte come before `100 Continue`. Without the interop "
                    "header: 405."
                ),
                "parameters": [
                    *_KEY_PARAMETERS,
                    {**_INTEROP_PARAMETER, "required": True},
                    {
                        **_header(
                            "Upload-Complete",
                            "`?0`: more appends follow (an RFC 8941 boolean; `?1` is refused, 400).",
                            ref("CarefulCreation"),
                        ),
                        "required": True,
                    },
                    {**_CREATION_PARAMETERS[0], "required": True},
                    *_CREATION_PARAMETERS[1:],
                    _IF_MATCH,
                    _header(
                        "If-None-Match",
                        "`*`: create only, never replace a stored prerecording (412 when the upload completes).",
                        ref("CreateOnly"),
                    ),
                    *_digest_parameters("the whole file"),
                    _header(
                        "Expect",
                        "The answer comes before the body is sent if it is a refusal.",
                        ref("Expectation"),
                    ),
                ],
                "requestBody": {
                    "required": False,
                    "description": "The file's first bytes (or all of them), from offset 0.",
                    "content": {**_OGG, **_PARTIAL_UPLOAD},
                },
                "responses": {
                    "201": _also(_CREATED, _CREATED_UPLOAD),
                    "204": _also(_REPLACED, _CREATED_UPLOAD),
                    "400": _problem("The key: as for PUT. " + _CREATION_BAD, _CREATION_REFUSED),
                    "401": _also(_UNAUTHORIZED, _DRAFT),
                    "405": _problem("No Upload-Draft-Interop-Version: POST is not otherwise served here."),
                    "408": _problem(_STALLED, _CREATION_REFUSED),
                    "412": _problem(_CREATION_PRECONDITION, {**_CREATION_REFUSED, **_UPLOAD_COMPLETE}),
                    "413": _problem("Upload-Length is larger than PREREC_MAX_UPLOAD_BYTES.", _DRAFT),
                    "415": _problem(
                        "The type (Content-Type, else the filetype metadata) is not audio/ogg, or a "
                        "Content-Encoding other than identity was sent.",
                        _CREATION_REFUSED,
                    ),
                    "503": _also(_UNAVAILABLE, _DRAFT),
                    "507": _problem(_FULL, _CREATION_REFUSED),
                },
            },
            "options": {
                "operationId": "draftUploadOptions",
                "summary": "The IETF draft's upload limits",
                "parameters": [*_KEY_PARAMETERS, {**_INTEROP_PARAMETER, "required": True}],
                "responses": {
                    "204": {
                        "description": "The limits (none for version 5, which has no Upload-Limit).",
                        "headers": {**_UPLOAD_LIMIT, ietf.INTEROP: {**_INTEROP_ANSWER, "required": True}},
                    },
                    "400": _problem("An unsupported interop version, or a malformed key (as for PUT).", _DRAFT),
                    "405": _problem("No Upload-Draft-Interop-Version: OPTIONS is not otherwise served here."),
                },
            },
        },
        "/uploads": {
            "get": {
                "operationId": "listUploads",
                "summary": "An event's uploads in progress, and how far each has come",
                "description": (
                    "Resumable uploads (tus or the IETF draft) to the event's prerecordings that are still "
                    "receiving or being finished, by start; not those that ended (finished, failed, cancelled, "
                    "expired) or are past their expiry. No ids: an upload's URL is its capability. For live "
                    "progress, subscribe to /sse with `types=upload-progress,upload-cancelled,upload-expired`."
                ),
                "parameters": [
                    {
                        "name": "event",
                        "in": "query",
                        "required": True,
                        "description": "The event's UUID (given once).",
                        "schema": {"type": "string", "format": "uuid"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The uploads in progress (none: an empty list).",
                        "headers": {"Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}}},
                        "content": {"application/json": {"schema": ref("UploadList")}},
                    },
                    "400": _problem("The event is missing, given twice or not a UUID."),
                    "503": _UNAVAILABLE,
                },
            },
            "options": {
                "operationId": "uploadOptions",
                "summary": "What the tus server offers (resumable uploads)",
                "description": (
                    "Resumable uploads speak tus 1.0.0 (https://tus.io/protocols/resumable-upload) with the "
                    "extensions creation, creation-with-upload, termination, expiration and checksum. A finished "
                    "upload becomes the prerecording its metadata names, stored as a PUT of the whole file "
                    "would store it (one prerecording-created or -updated event)."
                ),
                "responses": {
                    "204": {
                        "description": "The version, extensions, size limit and checksum algorithms.",
                        "headers": {
                            **_TUS_RESUMABLE,
                            **_TUS_VERSION,
                            "Tus-Extension": {
                                "required": True,
                                "schema": {"type": "string", "enum": [tus.EXTENSIONS]},
                            },
                            "Tus-Max-Size": {
                                "required": True,
                                "description": "PREREC_MAX_UPLOAD_BYTES: the largest Upload-Length taken.",
                                "schema": {"type": "integer", "minimum": 0},
                            },
                            "Tus-Checksum-Algorithm": {
                                "required": True,
                                "schema": {"type": "string", "enum": [",".join(tus.CHECKSUM_ALGORITHMS)]},
                            },
                        },
                    }
                },
            },
            "post": {
                "operationId": "createUpload",
                "security": _WRITE_SECURITY,
                "summary": "Begin a resumable upload (tus creation), optionally with its first bytes",
                "description": (
                    "Upload-Metadata names the prerecording the upload becomes: `event` (a UUID), `start` (as "
                    "in the path of /prerecordings) and `filetype` (`audio/ogg`, 415 otherwise), each value "
                    "base64 of UTF-8; other keys are kept and given back by HEAD. The file must start with "
                    "`OggS`. If-Match and If-None-Match: * are checked at creation (412, no upload made) and "
                    "again when the upload is complete, as for a PUT; the digest headers (of the whole file) "
                    "are checked when it is complete. A body "
                    f"(`Content-Type: {tus.OFFSET_OCTET_STREAM}`) is the file's first bytes (creation-with-"
                    "upload); when it is the whole file the prerecording is stored before the answer, which "
                    "then carries its ETag. Upload-Defer-Length and Upload-Concat are refused (400)."
                ),
                "parameters": [
                    _TUS_RESUMABLE_PARAMETER,
                    {
                        "name": "Upload-Length",
                        "in": "header",
                        "required": True,
                        "description": "The whole file's size in bytes, at least 4 (`OggS`); at most Tus-Max-Size.",
                        "schema": {"type": "integer", "minimum": 4, "maximum": MAX_BIGINT},
                    },
                    {
                        "name": "Upload-Metadata",
                        "in": "header",
                        "required": True,
                        "description": (
                            "Comma-separated `key base64(value)` pairs; keys given once: `event`, `start` "
                            "and `filetype` are required."
                        ),
                        "schema": {
                            "type": "string",
                            "maxLength": tus.MAX_METADATA,
                            "pattern": rf"^{_METADATA_PAIR}(?: *, *{_METADATA_PAIR})*$",
                        },
                    },
                    _IF_MATCH,
                    _header(
                        "If-None-Match",
                        "`*`: create only, never replace a stored prerecording (412 when the upload completes).",
                        ref("CreateOnly"),
                    ),
                    *_digest_parameters("the whole file"),
                    _UPLOAD_CHECKSUM,
                ],
                "requestBody": {
                    "required": False,
                    "description": "The file's first bytes (or all of them), from offset 0.",
                    "content": _OFFSET_OCTET_STREAM,
                },
                "responses": {
                    "201": {
                        "description": "Created; with a body, its bytes are counted in Upload-Offset.",
                        "headers": {
                            **_TUS_RESUMABLE,
                            "Location": {
                                "required": True,
                                "description": "Where the upload continues: /uploads/{id}.",
                                "schema": {"type": "string", "pattern": rf"^/uploads/{_UUID}$"},
                            },
                            **_UPLOAD_STATE,
                            **_TUS_ETAG,
                        },
                    },
                    "400": _tus_problem(
                        "A header is malformed or missing (the detail names it), the length is 0, "
                        "Upload-Defer-Length or Upload-Concat was sent, the body goes past the length, was cut "
                        "off or is not Ogg, or a digest does not match the complete file.",
                        _RESUME_HERE,
                    ),
                    "401": _TUS_UNAUTHORIZED,
                    "408": _tus_problem(_STALLED, _RESUME_HERE),
                    "409": _tus_problem(
                        _TAKEN_OVER, {**_RESUME_HERE, "Upload-Offset": {**_UPLOAD_OFFSET, "required": True}}
                    ),
                    "410": _tus_problem("The upload was cancelled while its body was under way.", _RESUME_HERE),
                    "412": _problem(
                        _TUS_PRECONDITION_FAILED["description"],
                        {**_TUS_PRECONDITION_FAILED["headers"], **_RESUME_HERE},
                    ),
                    "413": _tus_problem("Upload-Length is larger than PREREC_MAX_UPLOAD_BYTES (Tus-Max-Size)."),
                    "415": _tus_problem(
                        f"The metadata's filetype is not audio/ogg, or the body's Content-Type is not "
                        f"{tus.OFFSET_OCTET_STREAM} or its Content-Encoding not identity (then no upload is made).",
                        _RESUME_HERE,
                    ),
                    "460": _tus_problem(_CHECKSUM_MISMATCH, _RESUME_HERE),
                    "503": _tus_unavailable(_TUS_SHUTDOWN),
                    "507": _tus_problem(_FULL, _RESUME_HERE),
                },
            },
        },
        "/uploads/{id}": {
            "head": {
                "operationId": "getUploadOffset",
                "summary": "Where a resumable upload stands (its offset)",
                "description": (
                    "Waits (briefly) for a request still appending to let go, so the offset is the one to "
                    "resume from. A complete upload answers Upload-Offset equal to Upload-Length. tus answers "
                    "200; with `Upload-Draft-Interop-Version` the IETF draft's answer is 204."
                ),
                "parameters": [
                    *_ID_PARAMETERS,
                    {
                        **_TUS_RESUMABLE_PARAMETER,
                        "required": False,
                        "description": "tus: the tus version the client speaks (412 if another than 1.0.0).",
                    },
                    _INTEROP_PARAMETER,
                ],
                "responses": {
                    "200": {
                        "description": "tus: the upload's state.",
                        "headers": {
                            **_TUS_RESUMABLE,
                            **_UPLOAD_STATE,
                            "Upload-Length": {
                                "required": True,
                                "description": "The declared size.",
                                "schema": {"type": "integer", "minimum": 1},
                            },
                            "Upload-Metadata": {
                                "description": "The creation's metadata, as `key base64(value)` pairs.",
                                "schema": {"type": "string"},
                            },
                        },
                    },
                    "204": {
                        "description": "IETF draft: the upload's state.",
                        "headers": {
                            ietf.INTEROP: {**_INTEROP_ANSWER, "required": True},
                            "Upload-Offset": {**_UPLOAD_OFFSET, "required": True},
                            "Upload-Complete": {**_UPLOAD_COMPLETE["Upload-Complete"], "required": True},
                            "Upload-Length": {
                                "required": True,
                                "description": "The declared size.",
                                "schema": {"type": "integer", "minimum": 1},
                            },
                            "Cache-Control": {"required": True, "schema": {"type": "string", "enum": ["no-store"]}},
                            **_UPLOAD_LIMIT,
                        },
                    },
                    "400": _bodiless(_problem("IETF draft: an unsupported interop version.")),
                    "404": _bodiless(_NO_UPLOAD),
                    "412": _bodiless(
                        _tus_problem(
                            "tus: Tus-Resumable names another version than 1.0.0 (without it, or with the IETF "
                            "draft's interop header, the upload's state is answered).",
                            _TUS_VERSION,
                        )
                    ),
                    "410": _bodiless(_upload_problem("The upload failed, was cancelled or has expired.")),
                    "503": _bodiless(
                        _upload_problem(
                            "The upload is being finished (ask again after Retry-After), or the database is "
                            "not available.",
                            _RETRY_AFTER,
                        )
                    ),
                },
            },
            "patch": {
                "operationId": "appendToUpload",
                "security": _WRITE_SECURITY,
                "summary": "Append bytes to a resumable upload at its offset",
                "description": (
                    "The body's bytes are written from Upload-Offset, which must be the upload's offset (409 "
                    "names the right one). Bytes that arrive count even when the body is cut off, unless "
                    "Upload-Checksum is given (then all or none). The request that completes the upload "
                    "stores the prerecording before it answers, with its ETag; sent again at the end, it gets "
                    "that answer again. The file must start with `OggS`.\n\n"
                    f"tus: `Tus-Resumable: 1.0.0`, `Content-Type: {tus.OFFSET_OCTET_STREAM}`, answered 204. "
                    "IETF draft (`Upload-Draft-Interop-Version`): `Upload-Complete` (`?1` when this body "
                    f"ends the file), `Content-Type: {ietf.PARTIAL_UPLOAD}` (any type with interop 5); the "
                    "request that completes the upload is answered as a PUT would be (201 with the JSON item, "
                    "or 204), with `Upload-Complete: ?1`. An offset mismatch is the problem type "
                    f"{_MISMATCH_TYPE} with `expected-offset` and `provided-offset`; `Upload-Complete: ?1` on "
                    f"a body that does not reach the length is 400 {_INCONSISTENT_TYPE} (the bytes are kept)."
                ),
                "parameters": [
                    *_ID_PARAMETERS,
                    {
                        **_TUS_RESUMABLE_PARAMETER,
                        "required": False,
                        "description": "tus (required there, 412 without): the tus version the client speaks.",
                    },
                    _INTEROP_PARAMETER,
                    {
                        "name": "Upload-Offset",
                        "in": "header",
                        "required": True,
                        "description": "Where this body's bytes begin.",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT},
                    },
                    _header(
                        "Upload-Complete",
                        "IETF draft (required there, 400 without): `?1` if this body ends the file, else `?0`.",
                        ref("UploadComplete"),
                    ),
                    {**_UPLOAD_CHECKSUM, "description": "tus: " + _UPLOAD_CHECKSUM["description"]},
                ],
                "requestBody": {
                    "required": True,
                    "description": "The file's bytes from the offset on.",
                    "content": {**_OFFSET_OCTET_STREAM, **_PARTIAL_UPLOAD},
                },
                "responses": {
                    "201": {
                        "description": (
                            "IETF draft: this request completed the upload and created the prerecording: the "
                            "answer a PUT would have given."
                        ),
                        "headers": {
                            "ETag": {**_TUS_ETAG["ETag"], "description": "The prerecording's ETag.", "required": True},
                            "Upload-Complete": {**_UPLOAD_COMPLETE["Upload-Complete"], "required": True},
                            "Upload-Offset": {**_UPLOAD_OFFSET, "required": True},
                            ietf.INTEROP: {**_INTEROP_ANSWER, "required": True},
                        },
                        "content": {"application/json": {"schema": ref("Prerecording")}},
                    },
                    "204": {
                        "description": (
                            "Appended; on the request that completed the upload, stored too (then with the ETag; "
                            "in the IETF draft with `Upload-Complete: ?1`, when it replaced a prerecording)."
                        ),
                        "headers": {
                            **_EITHER,
                            "Upload-Offset": {**_UPLOAD_OFFSET, "required": True},
                            "Upload-Expires": {
                                **_UPLOAD_EXPIRES,
                                "description": "tus: " + _UPLOAD_EXPIRES["description"],
                            },
                            "Cache-Control": {
                                "description": "tus: on every answer of this kind.",
                                "schema": {"type": "string", "enum": ["no-store"]},
                            },
                            **_TUS_ETAG,
                            **_UPLOAD_COMPLETE,
                        },
                    },
                    "400": _upload_problem(
                        "A header is malformed or missing, the body is empty, goes past the declared length "
                        "(none of it counts past the Upload-Offset given; the upload goes on from there), "
                        "was cut off, is not Ogg or was stopped by another request taking the upload over, or a "
                        f"digest does not match the complete file. IETF draft: {_INCONSISTENT_TYPE} when "
                        "`Upload-Complete: ?1` was sent but the upload is short of its length (with its "
                        "Upload-Offset), or bytes were sent to a completed upload; `Upload-Complete: ?1` also "
                        "when a digest failed at the end.",
                        {"Upload-Offset": _UPLOAD_OFFSET, **_UPLOAD_COMPLETE},
                    ),
                    "401": _problem(_UNAUTHORIZED["description"], {**_EITHER, **_UNAUTHORIZED["headers"]}),
                    "404": _NO_UPLOAD,
                    "408": _upload_problem(_STALLED),
                    "409": _upload_problem(
                        "Upload-Offset is not the upload's offset, or another request took the upload over: "
                        f"resume from the Upload-Offset given. IETF draft: the problem type {_MISMATCH_TYPE}.",
                        {"Upload-Offset": {**_UPLOAD_OFFSET, "required": True}, **_UPLOAD_COMPLETE},
                    ),
                    "410": _upload_problem(
                        "The upload has ended: finished and asked at another offset, failed, cancelled or "
                        "expired (IETF draft: `Upload-Complete: ?1` when it was refused at its end; the problem "
                        f"type `{ietf.COMPLETED_UPLOAD}` for an empty append to a completed upload).",
                        _UPLOAD_COMPLETE,
                    ),
                    "412": _upload_problem(
                        "tus: Tus-Resumable is missing or not 1.0.0 (then with Tus-Version). If-Match or "
                        "If-None-Match: * of the creation failed when the upload was complete (the bytes are "
                        "discarded; IETF draft: `Upload-Complete: ?1`).",
                        {"Tus-Version": {**_TUS_VERSION["Tus-Version"], "required": False}, **_UPLOAD_COMPLETE},
                    ),
                    "415": _upload_problem(
                        f"tus: the Content-Type is not {tus.OFFSET_OCTET_STREAM}. IETF draft from interop 6: "
                        f"it is not {ietf.PARTIAL_UPLOAD}. Or a Content-Encoding other than identity was sent "
                        "(the bytes are stored as sent; with Accept-Encoding: identity)."
                    ),
                    "460": _tus_problem("tus: " + _CHECKSUM_MISMATCH),
                    "503": _problem(_TUS_SHUTDOWN, {**_EITHER, **_RETRY_AFTER}),
                    "507": _upload_problem(_FULL),
                },
            },
            "delete": {
                "operationId": "cancelUpload",
                "security": _WRITE_SECURITY,
                "summary": "Cancel a resumable upload (tus termination)",
                "description": (
                    "A PATCH under way stops; the bytes received are removed. tus needs `Tus-Resumable`; "
                    "with `Upload-Draft-Interop-Version` it is the IETF draft's cancellation."
                ),
                "parameters": [
                    *_ID_PARAMETERS,
                    {
                        **_TUS_RESUMABLE_PARAMETER,
                        "required": False,
                        "description": "tus (required there, 412 without): the tus version the client speaks.",
                    },
                    _INTEROP_PARAMETER,
                ],
                "responses": {
                    "204": {"description": "Cancelled.", "headers": _EITHER},
                    "400": _problem("IETF draft: an unsupported interop version."),
                    "401": _problem(_UNAUTHORIZED["description"], {**_EITHER, **_UNAUTHORIZED["headers"]}),
                    "404": _NO_UPLOAD,
                    "410": _upload_problem("The upload has already ended (finished, failed, cancelled or expired)."),
                    "412": _problem("tus: Tus-Resumable is missing or not 1.0.0.", {**_TUS_RESUMABLE, **_TUS_VERSION}),
                    "503": _problem(
                        "The database is not available, or this replica is shutting down.", {**_EITHER, **_RETRY_AFTER}
                    ),
                },
            },
        },
        "/sse": {
            "get": {
                "operationId": "subscribe",
                "summary": "Server-Sent Events: one message per change",
                "description": (
                    "The first message is `retry: <ms>`; then each change is one unnamed message, "
                    "`id: <event id>` and `data:` a JSON ChangeEvent. A comment line is sent every "
                    "PREREC_SSE_PING_SECONDS. With `Last-Event-ID` (or `lastEventId`) the stream first "
                    "replays every stored event after that id, then continues live. `types` may be "
                    "repeated (the types add up); `lastEventId` and `Last-Event-ID` at most once each (400), "
                    "and the header wins over the query. Without `types` the stream carries the "
                    "prerecording-* events only: the upload-* events (upload-progress at most once a second "
                    "per upload and when one is created or resumed, upload-cancelled, upload-expired) come "
                    "only to subscribers that name them."
                ),
                "parameters": [
                    _query(
                        "types",
                        "Only these event types (also accepted: repeated, or a JSON array). Default: the "
                        "prerecording-* types.",
                        {"type": "array", "items": ref("EventType"), "minItems": 1},
                        style="form",
                        explode=False,
                    ),
                    _query(
                        "lastEventId",
                        "Resume after this event id.",
                        {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT},
                    ),
                    _header(
                        "Last-Event-ID",
                        "Resume after this event id (EventSource sends it on reconnect).",
                        {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": (
                            "An endless stream of events. `x-itemSchema` describes each message as OpenAPI 3.2's "
                            "`itemSchema` does (its fields; `data` is JSON), which OpenAPI 3.1 cannot say."
                        ),
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-itemSchema": SSE_ITEM,
                            }
                        },
                    },
                    "400": _problem("An unknown or empty event type, or a malformed Last-Event-ID."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/openapi": {
            "get": {
                "operationId": "apiReference",
                "summary": "This API's reference page (Scalar)",
                "responses": {
                    "200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi/openapi.json": {
            "get": {
                "operationId": "openapiSpec",
                "summary": "This specification",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": ref("OpenAPIDocument")}},
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "writeToken": {
                "type": "http",
                "scheme": "bearer",
                "description": (
                    "PREREC_WRITE_TOKEN, needed for every write (PUT, DELETE; tus POST, PATCH, DELETE) when the "
                    "operator sets it."
                ),
            }
        },
        "parameters": {
            "event": {
                "name": "event",
                "in": "path",
                "required": True,
                "description": "The event's UUID.",
                "schema": {"type": "string", "format": "uuid"},
            },
            "start": {
                "name": "start",
                "in": "path",
                "required": True,
                "description": (
                    "The instance's start in the event's timezone, naive: YYYY-MM-DDTHH:MM, "
                    "YYYY-MM-DDTHH:MM:SS or YYYY-MM-DDTHH:MM:SS.ffffff."
                ),
                "schema": ref("Start"),
            },
        },
        "headers": {
            "ETag": {
                "description": "Strong entity tag: the SHA-256 of the content, quoted.",
                "schema": {"type": "string", "pattern": r'^"[0-9a-f]{64}"$'},
            },
            "Last-Modified": {
                "description": "When this version was stored (HTTP date).",
                "schema": {"type": "string", "pattern": _HTTP_DATE},
            },
            "Content-Type": {"description": "The Content-Type it was uploaded with.", "schema": {"type": "string"}},
            "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}},
        },
        "schemas": SCHEMAS,
    },
}


def _add_head_operations(spec: dict[str, Any]) -> None:
    """aiohttp answers HEAD wherever it answers GET (but /sse): describe each such HEAD as
    its GET without a body."""
    for path, item in spec["paths"].items():
        if "get" not in item or path == "/sse":
            continue
        get = item["get"]
        responses = {
            status: {key: value for key, value in response.items() if key != "content"}
            for status, response in get["responses"].items()
            if status != "307"  # a HEAD is answered from the metadata, never redirected
        }
        item["head"] = {
            **get,
            "operationId": get["operationId"] + "Head",
            "summary": get["summary"] + " (headers only)",
            "responses": responses,
        }


def _add_parser_refusals(spec: dict[str, Any]) -> None:
    """aiohttp's parser refuses an oversized request line or header before any route is chosen,
    so every operation can answer these."""
    for item in spec["paths"].values():
        for operation in item.values():
            operation["responses"].setdefault("414", _problem("The request line is too long."))
            operation["responses"].setdefault("431", _problem("A header field is too long, or there are too many."))


_add_parser_refusals(SPEC)
_add_head_operations(SPEC)
_SPEC_JSON = json.dumps(SPEC)

_PAGE = """<!doctype html>
<html>
  <head>
    <title>prerec API reference</title>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
  </head>
  <body>
    <script id="api-reference" data-url="/openapi/openapi.json"></script>
    <script src="{script}"></script>
  </body>
</html>
"""


async def spec(request: web.Request) -> web.Response:
    return web.Response(text=_SPEC_JSON, content_type="application/json")


async def page(request: web.Request) -> web.Response:
    script = html.escape(request.app[SETTINGS_KEY].scalar_js_url, quote=True)
    return web.Response(text=_PAGE.format(script=script), content_type="text/html")
