"""Conditional requests and byte ranges (RFC 9110 sections 13 and 14) for one prerecording.

aiohttp parses the validators (If-Match, If-None-Match, If-Modified-Since,
If-Unmodified-Since); the decisions are made here, in the order section 13.2.2 gives, so
reads and writes agree. Range parsing is written by hand: aiohttp's `request.http_range`
folds a malformed header, a multi-range request and a reversed range into one ValueError,
while the RFC wants the first ignored, the second answered whole, and only an unsatisfiable
range refused with 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from aiohttp import hdrs, web
from aiohttp.helpers import ETAG_ANY, ETag

from prerec.model import Prerecording, http_date
from prerec.problems import Problem

_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


def _matches(tags: tuple[ETag, ...], current: Prerecording, *, weak: bool) -> bool:
    if any(tag.value == ETAG_ANY for tag in tags):
        return True
    value = current.etag.strip('"')
    return any(tag.value == value for tag in tags if weak or not tag.is_weak)


def _whole_seconds(moment: datetime) -> datetime:
    # HTTP dates have whole seconds; Last-Modified is sent rounded down (model.http_date).
    return moment.replace(microsecond=0)


def evaluate(request: web.Request, current: Prerecording | None) -> int | None:
    """The status a precondition imposes (304 or 412), or None to go on.

    `current` is None when nothing is stored at the key. For GET and HEAD the caller answers
    404 first: preconditions are ignored when the unconditional answer is not a success.
    """
    safe = request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
    if_match = request.if_match
    if if_match is not None:
        if current is None or not _matches(if_match, current, weak=False):
            return 412
    elif (since := request.if_unmodified_since) is not None and current is not None:
        if _whole_seconds(current.modified) > since:
            return 412
    if_none_match = request.if_none_match
    if if_none_match is not None:
        if current is not None and _matches(if_none_match, current, weak=True):
            return 304 if safe else 412
    elif safe and (since := request.if_modified_since) is not None and current is not None:
        if _whole_seconds(current.modified) <= since:
            return 304
    return None


def check_write(request: web.Request, current: Prerecording | None) -> None:
    """Refuse a PUT or DELETE whose preconditions fail (412)."""
    if evaluate(request, current) is None:
        return
    if current is None:
        raise Problem(412, "The precondition failed: nothing is stored at this key.")
    if request.headers.get(hdrs.IF_NONE_MATCH, "").strip() == "*":
        raise Problem(412, f"The precondition If-None-Match: * failed: a prerecording exists (ETag {current.etag}).")
    raise Problem(
        412, f"The precondition failed: the current ETag is {current.etag}, modified {http_date(current.modified)}."
    )


def has_preconditions(request: web.Request) -> bool:
    return any(
        name in request.headers
        for name in (hdrs.IF_MATCH, hdrs.IF_NONE_MATCH, hdrs.IF_UNMODIFIED_SINCE, hdrs.IF_MODIFIED_SINCE)
    )


class Unsatisfiable(Exception):
    pass


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def requested_range(request: web.Request, current: Prerecording) -> ByteRange | None:
    """The single byte range to send, or None for the whole representation.

    Raises Unsatisfiable when no byte of the range exists (416).
    """
    header = request.headers.get(hdrs.RANGE)
    if header is None or not _if_range_holds(request, current):
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        # Malformed, another unit, or several ranges: answered with the whole body (200).
        return None
    first, last = match.groups()
    size = current.size
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise Unsatisfiable
        return ByteRange(max(size - suffix, 0), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise Unsatisfiable
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)


def _if_range_holds(request: web.Request, current: Prerecording) -> bool:
    raw = request.headers.get(hdrs.IF_RANGE)
    if raw is None:
        return True
    raw = raw.strip()
    if raw.startswith(('"', "W/")):
        # Only a strong, identical entity tag keeps the range (weak ones never match here).
        return raw == current.etag
    since = request.if_range
    return since is not None and _whole_seconds(current.modified) == since
