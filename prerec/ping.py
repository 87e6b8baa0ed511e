"""Liveness: answers without touching the database, so a database outage never restarts pods."""

from aiohttp import web


async def ping(request: web.Request) -> web.Response:
    return web.Response(status=204)
