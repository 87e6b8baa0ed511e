"""Integrity of uploads: Content-MD5 (RFC 1864), Repr-Digest and Content-Digest (RFC 9530).

The body is hashed while it streams to disk (storage.receive); here the request's claims are
read before the body and checked after it. Uploads are stored as sent (no content coding), so
the content and the representation digest are over the same bytes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import http_sf
from aiohttp import hdrs, web

from prerec.problems import Problem

# RFC 9530's active algorithms; the deprecated ones (md5, sha, ...) are ignored, as the RFC says
# a recipient may do with any it does not support.
SUPPORTED = {"sha-256": "sha256", "sha-512": "sha512"}
DIGEST_HEADERS = ("Repr-Digest", "Content-Digest")


@dataclass(frozen=True)
class Claim:
    header: str
    algorithm: str  # a hashlib name
    digest: bytes


def claims(request: web.Request) -> list[Claim]:
    """Every digest the request asserts about its body; a malformed header is a 400."""
    found: list[Claim] = []
    md5 = request.headers.get(hdrs.CONTENT_MD5)
    if md5 is not None:
        try:
            digest = base64.b64decode(md5.strip(), validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != 16:
            raise Problem(400, f"The Content-MD5 header {md5!r} is not the base64 of a 16-byte MD5 digest.")
        found.append(Claim("Content-MD5", "md5", digest))
    for header in DIGEST_HEADERS:
        value = request.headers.get(header)
        if value is None:
            continue
        try:
            members = http_sf.parse(value.encode(), tltype="dictionary")
        except Exception:  # http_sf signals a syntax error with a plain ValueError or its own
            raise Problem(400, f"The {header} header is not a structured-field dictionary (RFC 9530).") from None
        for name, (digest, _params) in members.items():
            if name not in SUPPORTED:
                continue
            if not isinstance(digest, bytes):
                raise Problem(400, f"The {header} value for {name} must be a byte sequence (:base64:).")
            found.append(Claim(header, SUPPORTED[name], digest))
    return found


def verify(expected: list[Claim], computed: dict[str, bytes]) -> None:
    for claim in expected:
        if computed[claim.algorithm] != claim.digest:
            raise Problem(
                400,
                f"The {claim.header} {claim.algorithm} digest does not match the body received; nothing was stored.",
            )
