"""GET /uploads?event={uuid}: an event's uploads in progress, for a UI that shows "the 20:00
show: 45 %". Whatever protocol they came by; no ids (an upload's URL is its capability)."""

from __future__ import annotations

import uuid

from aiohttp import web
from multidict import MultiMapping

from prerec import db
from prerec.config import SETTINGS_KEY
from prerec.model import parse_event
from prerec.prerecordings import query_value
from prerec.problems import Problem


def parse_uploads_query(query: MultiMapping[str]) -> uuid.UUID:
    """The event whose uploads to list: `event`, once, plain or JSON-encoded like the list's
    parameters (unknown parameters are ignored, as there)."""
    event = query_value(query, "event")
    if event is None:
        raise Problem(400, "The query parameter event is required: the UUID of the event whose uploads to list.")
    return parse_event(event, "query parameter event")


async def list_uploads(request: web.Request) -> web.Response:
    event = parse_uploads_query(request.query)
    async with db.connection(request.app[db.POOL], request.app[SETTINGS_KEY].db_timeout_seconds) as conn:
        uploads = await db.uploads_in_progress(conn, event)
    return web.json_response(
        {"uploads": [upload.to_json() for upload in uploads]}, headers={"Cache-Control": "no-store"}
    )
