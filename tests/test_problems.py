"""Errors as problem details, down to the one no handler meant to raise."""

from __future__ import annotations

import logging

from aiohttp import web

from prerec.app import create_app
from tests.conftest import sample

SECRET = "the connection string is postgresql://admin:hunter2@db"


async def test_an_unexpected_error_is_a_generic_500_logged_once_with_its_traceback(
    aiohttp_client, settings, database_url, caplog
) -> None:
    app = create_app(settings, database_url)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(SECRET)

    app.router.add_get("/broken", broken)  # a handler with a bug, added before the app starts
    client = await aiohttp_client(app)

    with caplog.at_level(logging.INFO):
        response = await client.get("/broken", headers={"X-Request-ID": "broken-1"})
    assert response.status == 500
    assert response.content_type == "application/problem+json"
    assert await response.json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "The server failed to answer this request.",
    }
    assert response.headers["X-Request-ID"] == "broken-1"

    with_traceback = [record for record in caplog.records if record.exc_info is not None]
    assert len(with_traceback) == 1, [record.getMessage() for record in with_traceback]
    [error] = with_traceback
    assert error.levelno == logging.ERROR and "GET /broken" in error.getMessage()
    assert error.exc_info[0] is RuntimeError
    assert SECRET not in await response.text()
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "prerec_http_requests_total", route="/broken", method="GET", status="500") == 1
    assert (await client.get("/ping")).status == 204
