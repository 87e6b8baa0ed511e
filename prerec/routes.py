"""Every route of the service, in one list."""

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from aiohttp import web

from prerec import openapi, ping, prerecordings, ready, sse, telemetry
from prerec.uploads import ietf, tus, views

KEY = "/prerecordings/{event}/{start}"
UPLOAD = "/uploads/{id}"

T = TypeVar("T")


def by_headers(
    is_ietf: Callable[[Mapping[str, str]], bool],
    ietf_handler: Callable[[web.Request], Awaitable[T]],
    other: Callable[[web.Request], Awaitable[T]],
) -> Callable[[web.Request], Awaitable[T]]:
    """One route, two protocols: the IETF draft's handler when the request's headers say so."""

    async def dispatch(request: web.Request) -> T:
        return await (ietf_handler if is_ietf(request.headers) else other)(request)

    return dispatch


async def _as_unrouted(request: web.Request) -> web.StreamResponse:
    """Without the draft's header, POST and OPTIONS at a key answer what they did before the
    draft had routes there: 405, naming the other methods."""
    resource = request.match_info.route.resource
    assert resource is not None
    allowed = {route.method for route in resource} - {"POST", "OPTIONS"}
    raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))


async def _refuse_expect(request: web.Request) -> None:
    """No 100 Continue for a request the handler refuses anyway."""


def _has_interop(headers: Mapping[str, str]) -> bool:
    # An /uploads/{id} request names its protocol: Upload-Draft-Interop-Version, else tus.
    return ietf.INTEROP in headers


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping.ping)
    app.router.add_get("/ready", ready.ready)
    app.router.add_get("/metrics", telemetry.metrics_page)
    app.router.add_get("/prerecordings/{event}", prerecordings.list_prerecordings)
    app.router.add_get(KEY, prerecordings.download)
    app.router.add_put(
        KEY,
        by_headers(ietf.is_careful_creation, ietf.create, prerecordings.upload),
        expect_handler=by_headers(ietf.is_careful_creation, ietf.create_expect, prerecordings.upload_expect),
    )
    app.router.add_post(
        KEY,
        by_headers(_has_interop, ietf.create, _as_unrouted),
        expect_handler=by_headers(_has_interop, ietf.create_expect, _refuse_expect),
    )
    app.router.add_route("OPTIONS", KEY, by_headers(_has_interop, ietf.options, _as_unrouted))
    app.router.add_delete(KEY, prerecordings.delete)
    tus.add_routes(app)
    app.router.add_get("/uploads", views.list_uploads)
    app.router.add_head(UPLOAD, by_headers(_has_interop, ietf.head, tus.head))
    app.router.add_patch(UPLOAD, by_headers(_has_interop, ietf.patch, tus.patch))
    app.router.add_delete(UPLOAD, by_headers(_has_interop, ietf.delete, tus.delete))
    app.router.add_get("/sse", sse.stream, allow_head=False)
    app.router.add_get("/openapi", openapi.page)
    app.router.add_get("/openapi/openapi.json", openapi.spec)
