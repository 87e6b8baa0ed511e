"""What a prerecording is: its key (event, start), its metadata, and their JSON shapes.

Every rule about parsing or printing an event id or a start lives here, so the list query,
the paths and the event stream cannot disagree about them.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prerec.problems import Problem

# The three accepted forms of a start: minutes, seconds, or seconds with 1-6 fraction digits.
# No offset and no "Z": a start is a naive time in the event's own timezone.
_START = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?", re.ASCII)

# The largest count or id PostgreSQL's bigint holds; larger values are refused, not overflowed.
MAX_BIGINT = 2**63 - 1

# RFC 9110 §8.3.1 media type, ASCII only (it is stored, then sent back as a header). Written
# out rather than borrowed: email.headerregistry and aiohttp's parse_content_type (built on
# email.message) follow MIME, not HTTP: they take comments, spaces around the "/" and RFC 2231
# continuations, fall back to text/plain on garbage instead of failing, and flag the empty
# parameters HTTP allows ("audio/ogg;;codecs=opus") as defects.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_PARAMETER = rf"[ \t]*;[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED}))?"
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})((?:{_PARAMETER})*)", re.ASCII)
_PARAMETERS = re.compile(_PARAMETER, re.ASCII)
_IS_TOKEN = re.compile(_TOKEN, re.ASCII)
_QUOTED_PAIR = re.compile(r"\\(.)")

# Longer than any real audio type with its codecs; a bound, as the value is stored per row.
MAX_CONTENT_TYPE = 256
OGG = "audio/ogg"

# What a subscriber that names no types gets: the stream as it was before uploads had events.
PRERECORDING_EVENT_TYPES = ("prerecording-created", "prerecording-updated", "prerecording-deleted")
# An upload in progress, for a UI that shows "the 20:00 show: 45 %"; only for those who ask.
UPLOAD_EVENT_TYPES = ("upload-progress", "upload-cancelled", "upload-expired")
EVENT_TYPES = PRERECORDING_EVENT_TYPES + UPLOAD_EVENT_TYPES


def parse_event(text: str, name: str = "event") -> uuid.UUID:
    # ASCII first: uuid.UUID reads its hex digits with int(), which takes "٠" for 0.
    if text.isascii():
        with contextlib.suppress(ValueError):
            return uuid.UUID(text)
    raise Problem(400, f"The {name} {text[:100]!r} is not a UUID.")


def parse_start(text: str, name: str = "start") -> datetime:
    match = _START.fullmatch(text)
    if match is None:
        raise Problem(
            400,
            f"The {name} {text!r} is not a naive datetime of the form YYYY-MM-DDTHH:MM[:SS[.ffffff]] "
            "(no timezone offset).",
        )
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError as error:
        raise Problem(400, f"The {name} {text!r} is not a valid date and time: {error}.") from None


def parse_count(text: str, name: str) -> int:
    """A non-negative integer that fits a bigint, from a query value or header.

    ASCII digits only (str.isdigit alone takes "١" and "²"; int() takes "1_0", " 1" and "+1"),
    and at most 19 of them, so int() never sees a number it is slow or unwilling to convert.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_BIGINT:
        raise Problem(400, f"The {name} {text[:40]!r} is not a non-negative integer up to {MAX_BIGINT}.")
    return int(text)


def parse_content_type(text: str | None) -> str:
    """An upload's Content-Type, normalised: `audio/ogg` with its parameters (codecs, say).

    Type and parameter names are lower-cased; values are kept as sent, quoted only when they
    are not a token. Anything else is a 415 naming what is wrong.
    """
    expected = f"The Content-Type must be {OGG} (parameters such as codecs are allowed)"
    if text is None:
        raise Problem(415, f"{expected}; none was sent.")
    if len(text) > MAX_CONTENT_TYPE:
        raise Problem(415, f"The Content-Type is {len(text)} characters long; at most {MAX_CONTENT_TYPE} are accepted.")
    if not text.isascii():
        # aiohttp hands non-UTF-8 bytes over as surrogate escapes, which PostgreSQL cannot store.
        raise Problem(415, f"The Content-Type {text!r} is not ASCII.")
    match = _MEDIA_TYPE.fullmatch(text)
    if match is None:
        raise Problem(415, f"The Content-Type {text!r} is not a media type: type/subtype, then ;name=value parameters.")
    media_type = f"{match.group(1)}/{match.group(2)}".lower()
    if media_type != OGG:
        raise Problem(415, f"{expected}, not {text!r}.")
    parameters: dict[str, str] = {}
    for name, value in _PARAMETERS.findall(match.group(3)):
        if not name:
            continue  # an empty parameter, as in "audio/ogg;"
        name = name.lower()
        if name in parameters:
            raise Problem(415, f"The Content-Type {text!r} gives the parameter {name!r} twice.")
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        parameters[name] = value
    return "".join([media_type, *(f"; {name}={_parameter_value(value)}" for name, value in parameters.items())])


def _parameter_value(value: str) -> str:
    if _IS_TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_start(start: datetime) -> str:
    # isoformat() leaves the fraction out exactly when it is zero.
    return start.isoformat()


def http_date(moment: datetime) -> str:
    # Whole seconds, rounded down: never later than the change it reports (aiohttp's own
    # setter rounds up, which can put Last-Modified after the response's Date).
    return email.utils.format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def format_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Prerecording:
    event: uuid.UUID
    start: datetime
    type: str
    size: int
    sha256: bytes
    modified: datetime
    blob: str

    @functools.cached_property
    def last_modified(self) -> str:
        return http_date(self.modified)

    @property
    def etag(self) -> str:
        # Strong and derived from the content: the same bytes always have the same tag.
        return f'"{self.sha256.hex()}"'

    @property
    def repr_digest(self) -> str:
        return f"sha-256=:{base64.b64encode(self.sha256).decode()}:"

    def to_json(self) -> dict[str, Any]:
        return {
            "event": str(self.event),
            "start": format_start(self.start),
            "type": self.type,
            "size": self.size,
            "etag": self.etag,
            "modified": format_utc(self.modified),
        }


def key_json(event: uuid.UUID, start: datetime) -> dict[str, Any]:
    return {"event": str(event), "start": format_start(start)}


@dataclass(frozen=True)
class Event:
    """One change, as the event log stores it and /sse sends it."""

    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        # The original family's shape: type, camelCase createdAt in UTC, data by entity.
        return {"type": self.type, "createdAt": format_utc(self.created_at), "data": self.data}

    @functools.cached_property
    def message(self) -> bytes:
        """The event as one SSE message, encoded once however many subscribers get it."""
        return f"id: {self.id}\ndata: {json.dumps(self.to_json())}\n\n".encode()


# What an upload can be: in progress (receiving, finishing), or ended (the rest).
UPLOAD_STATES = ("receiving", "finishing", "finished", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class NewUpload:
    """What a creation asks for, as the upload's row keeps it: the prerecording it becomes,
    its length, the protocol, the preconditions decided at its end, the digests claimed for the
    whole file (engine.claims_json) and the client's metadata."""

    event: uuid.UUID
    start: datetime
    type: str
    length: int
    protocol: str
    if_match: str | None = None
    if_none_match: bool = False
    digests: list[dict[str, str]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """A resumable upload, as its row stores it (see migrations/versions/0003_uploads.py)."""

    id: uuid.UUID
    event: uuid.UUID
    start: datetime
    type: str
    length: int
    durable: int
    state: str
    protocol: str
    if_match: str | None
    if_none_match: bool
    digests: list[dict[str, str]]
    metadata: dict[str, str]
    store_ref: str | None
    # The row's `assembled` column (0003) is not read: nothing ever wrote it, the blob's name
    # being deterministic (storage.fs names it after the upload, S3 completes at store_ref's
    # key). A later release drops it; dropping it in this one would break the replicas of the
    # release before, which select it, for as long as a rolling deploy runs them.
    created_at: datetime
    progressed_at: datetime
    expires_at: datetime
    generation: int
    lease_owner: str | None
    lease_pid: int | None
    lease_expires: datetime | None
    released_clean: bool
    segment_generation: int | None
    next_part: int
    result: dict[str, Any] | None

    @property
    def offset(self) -> int:
        """What a client is told: every byte below it survives any replica's death."""
        return self.durable

    def to_json(self) -> dict[str, Any]:
        """The item of GET /uploads?event= (the event is the query's). No id: the upload's URL
        is a capability, and this is shown to anyone who can list."""
        return {
            "start": format_start(self.start),
            "offset": self.durable,
            "length": self.length,
            "type": self.type,
            "started": format_utc(self.created_at),
            "progressed": format_utc(self.progressed_at),
            "expires": format_utc(self.expires_at),
        }

    def event_json(self) -> dict[str, Any]:
        """The data of an upload-* event (no id either: anyone may subscribe)."""
        return {
            "upload": {
                "event": str(self.event),
                "start": format_start(self.start),
                "offset": self.durable,
                "length": self.length,
                "started": format_utc(self.created_at),
                "progressed": format_utc(self.progressed_at),
            }
        }


@dataclass(frozen=True)
class Piece:
    """A run of an upload's bytes in the store: a segment file (filesystem) or a part (S3).

    Only bytes below a piece's recorded size are ever assembled: a writer that lost its lease
    may still write past it, never below."""

    start: int
    size: int
    generation: int
    number: int | None = None  # S3 part number
    etag: str | None = None  # S3 part ETag


@dataclass(frozen=True)
class Tail:
    """S3: the bytes past the last part, fewer than the store's minimum part size."""

    start: int
    data: bytes
