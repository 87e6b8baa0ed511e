"""The JSON shapes of the API, defined once.

The OpenAPI document's components are these schemas (prerec/openapi.py) and the tests check
real answers against them (tests/contract.py). Every shape of ours is closed
(`additionalProperties: false`): a field added to a `to_json` without being added here fails
the tests and the fuzzer instead of slipping through.

Patterns use `[0-9]`, never `\\d`: JSON Schema regexes are ECMA-262, where Python's `re` (in
jsonschema) and hypothesis (in schemathesis) would read `\\d` as any Unicode digit.
"""

from __future__ import annotations

from typing import Any

from prerec.model import EVENT_TYPES, MAX_BIGINT
from prerec.uploads.ietf import VERSIONS as INTEROP_VERSIONS
from prerec.uploads.tus import VERSION as TUS_VERSION

# A calendar date that exists: month lengths spelled out, and 29 February only in leap years
# (divisible by 4, centuries only when divisible by 400), so that the pattern allows exactly the
# dates parse_start accepts (tests/test_openapi.py tries every year). Python has no year 0000.
_DATE = (
    r"(?!0000)(?:"
    r"[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
    r"|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29"
    r")"
)
_HOUR_MINUTE = r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]"
# Exactly the starts parse_start accepts: minutes, seconds, or seconds with 1-6 fraction digits.
START_PATTERN = rf"^{_DATE}{_HOUR_MINUTE}(?::[0-5][0-9](?:\.[0-9]{{1,6}})?)?$"
# What format_start prints: seconds always, a fraction of six digits only when it is not zero.
CANONICAL_START_PATTERN = rf"^{_DATE}{_HOUR_MINUTE}:[0-5][0-9](?:\.(?!000000)[0-9]{{6}})?$"
# What format_utc prints.
UTC_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{6})?Z$"
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(description: str, properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": False,
    }


def _event(event_type: str, data: str, description: str) -> dict[str, Any]:
    return _closed(
        description,
        {
            "type": {"type": "string", "const": event_type},
            "createdAt": {"type": "string", "format": "date-time", "pattern": UTC_PATTERN, "description": "UTC."},
            "data": ref(data),
        },
    )


_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT}


def _utc(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "date-time", "pattern": UTC_PATTERN, "description": description}


_UPLOAD_PROGRESS = {
    "offset": {**_COUNT, "description": "Bytes received and made durable."},
    "length": {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT, "description": "The declared size."},
}
# Each event type and the schema of its message.
_EVENT_SCHEMAS = {
    "prerecording-created": "PrerecordingCreatedEvent",
    "prerecording-updated": "PrerecordingUpdatedEvent",
    "prerecording-deleted": "PrerecordingDeletedEvent",
    "upload-progress": "UploadProgressEvent",
    "upload-cancelled": "UploadCancelledEvent",
    "upload-expired": "UploadExpiredEvent",
}
assert tuple(_EVENT_SCHEMAS) == EVENT_TYPES

SCHEMAS: dict[str, dict[str, Any]] = {
    "Start": {
        "type": "string",
        "pattern": START_PATTERN,
        "description": (
            "An instance's start in the event's timezone, naive: YYYY-MM-DDTHH:MM, YYYY-MM-DDTHH:MM:SS or "
            "YYYY-MM-DDTHH:MM:SS.ffffff; a date that exists, no offset."
        ),
        "examples": ["2024-01-01T00:00"],
    },
    "Order": {"type": "string", "enum": ["asc", "desc"], "default": "asc", "description": "By start."},
    "EventType": {"type": "string", "enum": list(EVENT_TYPES)},
    "Expectation": {"type": "string", "enum": ["100-continue"], "description": "The one Expect value served."},
    "TusVersion": {"type": "string", "enum": [TUS_VERSION], "description": "The one tus version served."},
    "InteropVersion": {
        "type": "string",
        "enum": [str(version) for version in INTEROP_VERSIONS],
        "description": "The IETF resumable-upload draft's interop versions served.",
    },
    "UploadComplete": {
        "type": "string",
        "enum": ["?0", "?1"],
        "description": "IETF draft: whether the upload ends with this request (an RFC 8941 boolean).",
    },
    "CarefulCreation": {
        "type": "string",
        "enum": ["?0"],
        "description": "Upload-Complete on the IETF draft's creation by POST: `?0`, the bytes follow by PATCH.",
    },
    "CreateOnly": {
        "type": "string",
        "enum": ["*"],
        "description": "If-None-Match on a tus creation: `*`, never replace a stored prerecording.",
    },
    "Prerecording": _closed(
        "A stored prerecording (the list item, and the 201 answer to an upload).",
        {
            "event": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
            "start": {
                "type": "string",
                "pattern": CANONICAL_START_PATTERN,
                "description": "Canonical: YYYY-MM-DDTHH:MM:SS, with .ffffff only when not zero.",
            },
            "type": {
                "type": "string",
                "minLength": 1,
                "maxLength": 256,
                "description": "The Content-Type it was uploaded with, normalised (type and parameter names "
                "lower-cased, parameters kept).",
            },
            "size": {"type": "integer", "minimum": 1, "description": "Bytes."},
            "etag": {
                "type": "string",
                "pattern": r'^"[0-9a-f]{64}"$',
                "description": "The ETag header value, quotes included: the SHA-256 of the content.",
            },
            "modified": {
                "type": "string",
                "format": "date-time",
                "pattern": UTC_PATTERN,
                "description": "When this version was stored, UTC.",
            },
        },
    ),
    "PrerecordingKey": _closed(
        "What names a prerecording: all a prerecording-deleted event tells.",
        {
            "event": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
            "start": {"type": "string", "pattern": CANONICAL_START_PATTERN},
        },
    ),
    "PrerecordingList": _closed(
        "One page of an event's prerecordings.",
        {
            "count": {**_COUNT, "description": "Every match, before limit and offset."},
            "limit": {"type": ["integer", "null"], "minimum": 0, "description": "null: no limit."},
            "offset": _COUNT,
            "prerecordings": {"type": "array", "items": ref("Prerecording")},
        },
    ),
    "PrerecordingData": _closed("The data of a created or updated event.", {"prerecording": ref("Prerecording")}),
    "PrerecordingKeyData": _closed("The data of a deleted event.", {"prerecording": ref("PrerecordingKey")}),
    "PrerecordingCreatedEvent": _event("prerecording-created", "PrerecordingData", "A prerecording was stored."),
    "PrerecordingUpdatedEvent": _event("prerecording-updated", "PrerecordingData", "A prerecording was replaced."),
    "PrerecordingDeletedEvent": _event(
        "prerecording-deleted", "PrerecordingKeyData", "A prerecording was deleted (or taken out by the storage check)."
    ),
    "UploadInProgress": _closed(
        "An upload on its way (GET /uploads?event=), tus or the IETF draft alike; no id: an upload's URL is "
        "its capability.",
        {
            "start": {
                "type": "string",
                "pattern": CANONICAL_START_PATTERN,
                "description": "The start of the prerecording it becomes, canonical.",
            },
            **_UPLOAD_PROGRESS,
            "type": {"type": "string", "minLength": 1, "maxLength": 256, "description": "Its Content-Type."},
            "started": _utc("When it was created, UTC."),
            "progressed": _utc("When its offset last grew (its creation if never), UTC."),
            "expires": _utc("When it expires unless it progresses, UTC."),
        },
    ),
    "UploadList": _closed(
        "An event's uploads in progress (receiving, or being finished), by start.",
        {"uploads": {"type": "array", "items": ref("UploadInProgress")}},
    ),
    "UploadProgress": _closed(
        "Where an upload stands, as its upload-* events tell it.",
        {
            "event": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
            "start": {"type": "string", "pattern": CANONICAL_START_PATTERN},
            **_UPLOAD_PROGRESS,
            "started": _utc("When it was created, UTC."),
            "progressed": _utc("When its offset last grew (its creation if never), UTC."),
        },
    ),
    "UploadData": _closed("The data of an upload-* event.", {"upload": ref("UploadProgress")}),
    "UploadProgressEvent": _event(
        "upload-progress",
        "UploadData",
        "An upload was created, resumed or made progress (at most one a second per upload). Only to "
        "subscribers that name it in `types`.",
    ),
    "UploadCancelledEvent": _event(
        "upload-cancelled", "UploadData", "An upload was cancelled. Only to subscribers that name it in `types`."
    ),
    "UploadExpiredEvent": _event(
        "upload-expired",
        "UploadData",
        "An upload expired without progress; its bytes are removed. Only to subscribers that name it in `types`.",
    ),
    "ChangeEvent": {
        "description": "The data of one /sse message.",
        "oneOf": [ref(name) for name in _EVENT_SCHEMAS.values()],
        "discriminator": {
            "propertyName": "type",
            "mapping": {event_type: f"#/components/schemas/{name}" for event_type, name in _EVENT_SCHEMAS.items()},
        },
    },
    "Problem": _closed(
        "RFC 9457 problem details; the detail names what is wrong.",
        {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            # RFC 9457 extension members of the IETF resumable-upload draft's mismatching-upload-offset.
            "expected-offset": {
                "type": "integer",
                "minimum": 0,
                "description": "IETF draft, offset mismatch: the upload's offset, where to resume.",
            },
            "provided-offset": {
                "type": "integer",
                "minimum": 0,
                "description": "IETF draft, offset mismatch: the Upload-Offset the request gave.",
            },
        },
        ["type", "title", "status", "detail"],
    ),
    "Readiness": _closed("The replica may take traffic.", {"status": {"type": "string", "const": "ready"}}),
    # Not a shape of ours: the OpenAPI 3.1 document, whose own schema is OpenAPI's.
    "OpenAPIDocument": {"type": "object", "required": ["openapi", "info", "paths"]},
}

# The data of the SSE messages: OpenAPI 3.2's `itemSchema` for text/event-stream, one item
# per message (its fields), `data` holding JSON. (OpenAPI 3.1 has no such keyword; the
# document carries it as `x-itemSchema`.)
SSE_ITEM: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "description": "One change.",
            "required": ["id", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$", "description": "Resume after it with Last-Event-ID."},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("ChangeEvent")},
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "description": "The first message: how long to wait before reconnecting, in milliseconds.",
            "required": ["retry"],
            "properties": {"retry": {"type": "integer", "minimum": 0}},
            "additionalProperties": False,
        },
    ]
}
