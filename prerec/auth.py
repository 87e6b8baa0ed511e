"""Optional write protection: with PREREC_WRITE_TOKEN set, PUT and DELETE need the token."""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web

from prerec.config import SETTINGS_KEY
from prerec.problems import Problem

CHALLENGE = 'Bearer realm="prerec"'


def check_write_token(request: web.Request) -> None:
    token = request.app[SETTINGS_KEY].write_token
    if token is None:
        return
    scheme, _, offered = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    offered = offered.strip()
    if scheme.lower() != "bearer" or not offered.isascii() or not hmac.compare_digest(offered.encode(), token.encode()):
        raise Problem(
            401,
            "Uploads and deletions need the header Authorization: Bearer <PREREC_WRITE_TOKEN>.",
            {hdrs.WWW_AUTHENTICATE: CHALLENGE},
        )
