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
from aiohttp.helpers import ETAG_ANY, ETag, parse_http_date

from prerec.model import Prerecording, http_date
from prerec.problems import Problem

# ASCII only: a Unicode digit such as "٠" is no byte position (\d would take it), and "byteſ"
# no unit (IGNORECASE alone folds the long s to s).
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE | re.ASCII)
# Larger than any offset a file can have (2**63 - 1, 19 digits): what a longer position means.
BEYOND_ANY_FILE = 10**19


def _matches(tags: tuple[ETag, ...], current: Prerecording, *, weak: bool) -> bool:
    if any(tag.value == ETAG_ANY for tag in tags):
        return True
    value = current.etag.strip('"')
    return any(tag.value == value for tag in tags if weak or not tag.is_weak)


def _whole_seconds(moment: datetime) -> datetime:
    # HTTP dates have whole seconds; Last-Modified is sent rounded down (model.http_date).
    return moment.replace(microsecond=0)


def parse_date(value: str | None) -> datetime | None:
    """An HTTP date from a header; None when absent or invalid (which RFC 9110 says to ignore).

    ASCII only: the parser underneath (email.utils) would read "٠١" as the day 1.
    """
    if value is None or not value.isascii():
        return None
    return parse_http_date(value)


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
    elif (since := parse_date(request.headers.get(hdrs.IF_UNMODIFIED_SINCE))) is not None and current is not None:
        if _whole_seconds(current.modified) > since:
            return 412
    if_none_match = request.if_none_match
    if if_none_match is not None:
        if current is not None and _matches(if_none_match, current, weak=True):
            return 304 if safe else 412
    elif (
        safe and (since := parse_date(request.headers.get(hdrs.IF_MODIFIED_SINCE))) is not None and current is not None
    ):
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
    headers = request.headers.getall(hdrs.RANGE, [])
    # Range is not a list-valued field: two of them are as malformed as one bad one.
    if len(headers) != 1 or not _if_range_holds(request, current):
        return None
    return parse_range(headers[0], current.size)


def parse_range(header: str, size: int) -> ByteRange | None:
    """The single byte range a Range header asks of `size` bytes, or None for all of them.

    None when the header is malformed, names another unit or several ranges (answered whole,
    200); raises Unsatisfiable when no asked-for byte exists (416). Positions are ASCII digits
    of any length: one too large for any file simply lies beyond this one's end.
    """
    match = _RANGE.fullmatch(header.strip(" \t"))
    if match is None:
        return None
    first, last = (_without_leading_zeros(digits) for digits in match.groups())
    if first is None:
        if last is None:
            return None
        if last == "0" or size == 0:
            raise Unsatisfiable
        return ByteRange(max(size - _position(last), 0), size - 1)
    # Compared as digit strings, so two huge positions keep their order.
    if last is not None and (len(last), last) < (len(first), first):
        return None  # invalid: ignored
    start = _position(first)
    if start >= size:
        raise Unsatisfiable
    return ByteRange(start, size - 1 if last is None else min(_position(last), size - 1))


def _without_leading_zeros(digits: str) -> str | None:
    return (digits.lstrip("0") or "0") if digits else None


def _position(digits: str) -> int:
    # int() of thousands of digits is slow, and past 4300 Python refuses it (that was a 500).
    return int(digits) if len(digits) <= 19 else BEYOND_ANY_FILE


def _if_range_holds(request: web.Request, current: Prerecording) -> bool:
    raw = request.headers.get(hdrs.IF_RANGE)
    if raw is None:
        return True
    raw = raw.strip()
    if raw.startswith(('"', "W/")):
        # Only a strong, identical entity tag keeps the range (weak ones never match here).
        return raw == current.etag
    since = parse_date(raw)
    return since is not None and _whole_seconds(current.modified) == since
