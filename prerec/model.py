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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prerec.problems import Problem

# The three accepted forms of a start: minutes, seconds, or seconds with 1-6 fraction digits.
# No offset and no "Z": a start is a naive time in the event's own timezone.
_START = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?", re.ASCII)

# The largest count or id PostgreSQL's bigint holds; larger values are refused, not overflowed.
MAX_BIGINT = 2**63 - 1

EVENT_TYPES = ("prerecording-created", "prerecording-updated", "prerecording-deleted")


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
