"""GET /sse: every change as a Server-Sent Event, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from multidict import MultiMapping

from prerec.config import SETTINGS_KEY
from prerec.events import BROADCASTER, Subscriber
from prerec.model import EVENT_TYPES, PRERECORDING_EVENT_TYPES, parse_count
from prerec.problems import Problem
from prerec.telemetry import METRICS

log = logging.getLogger(__name__)

# Sent once per stream: how long an EventSource waits before reconnecting (milliseconds).
RETRY_MS = 2000
# A fixed, small kernel send buffer for event streams (autotuning would grow it to megabytes):
# a reader that stops reading then blocks our writes after a few hundred events, its queue
# fills and it is dropped, instead of the kernel hoarding thousands of events for it.
SEND_BUFFER_BYTES = 64 * 1024


def parse_types(query: MultiMapping[str]) -> frozenset[str]:
    """The event types a stream asks for: `types` as a comma list or a JSON array.

    Unlike the list's parameters, `types` may be repeated (`types=a&types=b`): each names more
    types, so there is no first or last value to pick wrongly. Without `types`, the prerecording
    events only: upload-* events come to those who name them, so a subscriber written before
    they existed sees the stream it always saw.
    """
    values = query.getall("types", [])
    if not values:
        return frozenset(PRERECORDING_EVENT_TYPES)
    types: list[str] = []
    for value in values:
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
                raise Problem(400, f"The query parameter types={value[:100]!r} is not a JSON array of strings.")
            types.extend(parsed)
        else:
            types.extend(item.strip() for item in value.split(","))
    if not types or any(not item for item in types):
        raise Problem(400, "The query parameter types must name at least one event type, without empty items.")
    unknown = sorted(set(types) - set(EVENT_TYPES))
    if unknown:
        raise Problem(
            400,
            f"The query parameter types names unknown event types {[name[:40] for name in unknown[:5]]}; "
            f"known: {list(EVENT_TYPES)}.",
        )
    return frozenset(types)


def parse_last_event_id(headers: MultiMapping[str], query: MultiMapping[str]) -> int | None:
    """The id of the last event a resuming client saw.

    EventSource sends the header on reconnect; ?lastEventId= serves clients that cannot set
    it. The header wins: a reconnecting EventSource keeps the URL it was opened with, so the
    query then holds an older id than the header.
    """
    for source, values in (
        ("header Last-Event-ID", headers.getall("Last-Event-ID", [])),
        ("query parameter lastEventId", query.getall("lastEventId", [])),
    ):
        if len(values) > 1:
            raise Problem(400, f"The {source} is given {len(values)} times; give it once.")
        if values:
            return parse_count(values[0].strip(" \t"), source)
    return None


# How often an open stream looks whether its client is still there (see _until_gone).
GONE_CHECK_SECONDS = 1.0


async def _until_gone(request: web.Request, response: EventSourceResponse) -> None:
    """Return once the client has gone (or the stream's ping stopped).

    aiohttp (3.9+) does not cancel a handler whose client left, and has no event for it: a quiet
    stream would learn of it only from its next failed ping, PREREC_SSE_PING_SECONDS later, its
    subscriber (in the gauge, with its queue) kept that long. aiohttp drops the request's
    transport the moment the connection is lost, so a look at it each second is a sure and cheap
    sign (aiohttp_sse's own liveness check reads the same). Handler cancellation, aiohttp's
    documented alternative, is server-wide: it would cut uploads and transactions mid-way too.
    """
    while request.transport is not None and response.is_connected():
        await asyncio.sleep(GONE_CHECK_SECONDS)


def _abort_if_too_slow(request: web.Request, subscriber: Subscriber) -> None:
    if subscriber.too_slow and request.transport is not None:
        request.transport.abort()


async def stream(request: web.Request) -> web.StreamResponse:
    types = parse_types(request.query)
    after_id = parse_last_event_id(request.headers, request.query)
    broadcaster = request.app[BROADCASTER]
    async with broadcaster.subscribe(types, after_id) as subscriber:
        response = EventSourceResponse(ping_interval=request.app[SETTINGS_KEY].sse_ping_seconds)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        await response.prepare(request)
        # Closing the subscriber ends the loop below, which may be waiting for an event.
        gone = asyncio.create_task(_until_gone(request, response))
        gone.add_done_callback(lambda _: subscriber.close("the client went away"))
        # A subscriber dropped as too slow may be stuck in a write that will never drain:
        # abort its connection so the handler (and its buffers) go at once.
        dropped = asyncio.create_task(subscriber.closed.wait())
        dropped.add_done_callback(lambda _: _abort_if_too_slow(request, subscriber))
        subscribers = request.app[METRICS].sse_subscribers
        subscribers.inc()
        try:
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            delivered = request.app[METRICS].events_delivered
            async for event in broadcaster.events(subscriber):
                await response.write(event.message)
                delivered.inc()
        except (ConnectionError, TimeoutError, RuntimeError, Problem) as error:
            # The stream is already open: all we can do is end it; the client resumes
            # with Last-Event-ID.
            log.debug("SSE stream ended: %r", error)
        finally:
            subscribers.dec()
            if subscriber.reason:
                log.info("SSE stream ended: %s", subscriber.reason)
            dropped.cancel()
            gone.cancel()
            response.stop_streaming()
    return response
