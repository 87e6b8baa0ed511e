"""Browsers on another origin (CORS): preflights and the headers that let a page read answers.

With PREREC_CORS_ORIGINS unset nothing here is installed and no response carries a CORS
header. Credentials are off (no `Access-Control-Allow-Credentials`): the service uses no
cookies, and a page that writes sends the bearer token itself in `Authorization`.

Hand-written rather than with aiohttp-cors, which does not fit (read at 0.8.1, its only
changes since 2018 being two releases in March 2025 for newer Python and aiohttp):
- it adds an OPTIONS route to each resource it is given, so unknown paths and 405 answers get
  no CORS headers (the browser then hides their problem body), each later route must be
  remembered, and the OPTIONS routes would appear among the app's documented operations;
- it echoes the origin but never sends `Vary: Origin`, so a shared cache may hand one
  origin's answer to another;
- its preflight allows only the one method asked for, and its header parsing is left as FIXMEs.
What is needed is small: one middleware answers preflights before any handler (so before the
write-token check: preflights carry no credentials), and one `on_response_prepare` hook adds
the headers to every response, including those that handlers prepare themselves (the /sse
stream, blob downloads) and the problem answers of middlewares, unknown routes and Expect
refusals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping

from aiohttp import hdrs, web

from prerec.problems import Problem

ANY = "*"

# POST, PATCH and OPTIONS have no route yet; they are listed for resumable uploads (tus,
# the IETF draft) and cost nothing meanwhile: the router still answers 405 where they don't
# apply, and with credentials off a page gains no power it lacks from a plain script.
ALLOW_METHODS = "GET, HEAD, PUT, DELETE, POST, PATCH, OPTIONS"
ALLOW_HEADERS = ", ".join(
    (
        "Content-Type",
        "Authorization",
        "If-Match",
        "If-None-Match",
        "If-Range",
        "Range",
        "Repr-Digest",
        "Content-Digest",
        "Content-MD5",
        "Last-Event-ID",
        "X-Request-ID",
        # tus 1.0 and the IETF resumable-upload draft
        "Tus-Resumable",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Metadata",
        "Upload-Checksum",
        "Upload-Concat",
        "Upload-Defer-Length",
        "Upload-Complete",
        "Upload-Draft-Interop-Version",
    )
)
# A page's script can read only these (beyond the CORS-safelisted ones such as Content-Type);
# upload clients (tus-js-client among them) break without the upload headers.
EXPOSE_HEADERS = ", ".join(
    (
        "ETag",
        "Repr-Digest",
        "Content-Range",
        "Content-Length",
        "Accept-Ranges",
        "Last-Modified",
        "Location",
        "Retry-After",
        "WWW-Authenticate",
        "X-Request-ID",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Expires",
        "Upload-Complete",
        "Upload-Limit",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Extension",
        "Tus-Max-Size",
        "Tus-Checksum-Algorithm",
        "Upload-Draft-Interop-Version",
    )
)
# Chromium caps a preflight's cache at two hours (Firefox at a day): asking for more is moot.
MAX_AGE_SECONDS = 7200

ORIGINS = web.AppKey("cors_origins", frozenset[str])


def install(app: web.Application, origins: frozenset[str] | None) -> None:
    if origins is None:
        return
    app[ORIGINS] = origins
    # Innermost: a preflight is still logged, counted and given its X-Request-ID.
    app.middlewares.append(_preflight)
    app.on_response_prepare.append(_add_headers)


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == hdrs.METH_OPTIONS and hdrs.ORIGIN in headers and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers


def allowed_origin(origin: str | None, origins: frozenset[str]) -> str | None:
    """The `Access-Control-Allow-Origin` value for a request from `origin`, None to send none.

    With `*` the answer is the same for every origin (and for none), so no `Vary` is needed.
    """
    if ANY in origins:
        return ANY
    return origin if origin in origins else None


def add_vary_origin(headers: MutableMapping[str, str]) -> None:
    vary = headers.get(hdrs.VARY)
    if vary is None:
        headers[hdrs.VARY] = "Origin"
    elif not {item.strip().lower() for item in vary.split(",")} & {"origin", "*"}:
        headers[hdrs.VARY] = f"{vary}, Origin"


@web.middleware
async def _preflight(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # Answered on every path, known or not: the request that follows then gets its real
    # answer (a 404 problem, say) which the page can read, instead of an opaque CORS failure.
    if not is_preflight(request.method, request.headers):
        return await handler(request)
    if allowed_origin(request.headers[hdrs.ORIGIN], request.app[ORIGINS]) is None:
        # No CORS headers on it, so the browser blocks the request; the detail helps whoever
        # reads the answer by hand.
        raise Problem(
            403,
            f"Pages from the origin {request.headers[hdrs.ORIGIN]!r} may not call this service; "
            "PREREC_CORS_ORIGINS lists those that may.",
        )
    # Every method and header at once (not an echo of the ones asked for), so one cached
    # preflight serves every request the page makes to this URL.
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_SECONDS),
        },
    )


async def _add_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    origins = request.app[ORIGINS]
    allowed = allowed_origin(request.headers.get(hdrs.ORIGIN), origins)
    if ANY not in origins:
        # Every answer depends on Origin (CORS headers or none): a cache must keep them apart.
        add_vary_origin(response.headers)
    if allowed is None:
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
    if not is_preflight(request.method, request.headers):
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
