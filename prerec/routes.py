"""Every route of the service, in one list."""

from aiohttp import web

from prerec import openapi, ping, prerecordings, ready, sse, telemetry
from prerec.uploads import tus


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping.ping)
    app.router.add_get("/ready", ready.ready)
    app.router.add_get("/metrics", telemetry.metrics_page)
    app.router.add_get("/prerecordings/{event}", prerecordings.list_prerecordings)
    app.router.add_get("/prerecordings/{event}/{start}", prerecordings.download)
    app.router.add_put(
        "/prerecordings/{event}/{start}", prerecordings.upload, expect_handler=prerecordings.upload_expect
    )
    app.router.add_delete("/prerecordings/{event}/{start}", prerecordings.delete)
    tus.add_routes(app)
    app.router.add_get("/sse", sse.stream, allow_head=False)
    app.router.add_get("/openapi", openapi.page)
    app.router.add_get("/openapi/openapi.json", openapi.spec)
