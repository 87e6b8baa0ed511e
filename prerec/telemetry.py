"""What operators observe: Prometheus metrics, one log line per request, request ids.

Metrics live in a registry of the app's own (not prometheus-client's global one), so several
apps in one process (tests, workers) never mix their counts.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter

from prerec.storage import Storage
from prerec.storage.responses import BlobResponse

access_log = logging.getLogger("prerec.access")

# The id of the request being handled, so that every log line written on its behalf (not only
# the access line) carries it.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = current_request_id.get()
            if request_id is not None:
                record.request_id = request_id
        return True


REQUEST_ID = "X-Request-ID"
# Generated ids: a random prefix per process and a counter. Unique, and far cheaper than a
# uuid4 per request (which showed up in profiles of HEAD bursts); they need not be secret.
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)
# An id from the client is echoed only if it is short printable ASCII; anything else is
# replaced, so a log line can never be forged or bloated through it.
_REQUEST_ID_OK = re.compile(r"[\x21-\x7e]{1,128}")


# With PREREC_WORKERS > 1 the supervisor points this at a folder shared by its workers, and
# prometheus-client keeps every value in files there, so any worker's /metrics tells the sum.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ


@dataclass
class Metrics:
    storage: Storage
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "prerec_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.duration = Histogram(
            "prerec_http_request_duration_seconds",
            "Time to answer an HTTP request (downloads: until the last byte is handed to the kernel)",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.uploaded = Counter("prerec_uploaded_bytes", "Body bytes of uploads received", registry=r)
        self.downloaded = Counter("prerec_downloaded_bytes", "Audio bytes sent to downloads", registry=r)
        self.uploads_in_flight = Gauge(
            "prerec_uploads_in_flight", "Uploads being received now", multiprocess_mode="livesum", registry=r
        )
        self.sse_subscribers = Gauge(
            "prerec_sse_subscribers", "Open /sse streams", multiprocess_mode="livesum", registry=r
        )
        self.events_delivered = Counter("prerec_sse_events_delivered", "Events written to /sse subscribers", registry=r)
        self.listener_reconnects = Counter(
            "prerec_listener_reconnects", "Times the LISTEN connection was re-established", registry=r
        )
        r.register(FreeSpace(self.storage))

    def render(self) -> bytes:
        if not MULTIPROCESS:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(FreeSpace(self.storage))
        return generate_latest(registry)


class FreeSpace(Collector):
    """The storage folder's free space, read at scrape time."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        free = self._storage.free_bytes()
        yield GaugeMetricFamily(
            "prerec_blob_store_free_bytes",
            "Free space in the storage folder",
            value=float("nan") if free is None else free,
        )


METRICS = web.AppKey("metrics", Metrics)


def _route(request: web.Request) -> str:
    # The route template, never the concrete path: label values must stay few (no event ids).
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@dataclass(slots=True)
class Exchange:
    """One request on its way to the access log and the metrics (see watch)."""

    request: web.Request
    request_id: str
    began: float
    response: web.StreamResponse | None = None

    def answer(self, response: web.StreamResponse) -> web.StreamResponse:
        """Tag the response with the request id and remember it for the access line."""
        response.headers[REQUEST_ID] = self.request_id
        self.response = response
        return response

    def record(self, task: object) -> None:
        request, response = self.request, self.response
        elapsed = time.perf_counter() - self.began
        # What was written for this response, status line and headers included (aiohttp's own
        # measure of a response, its body_length); BlobResponse adds what sendfile sent. Not the
        # declared length: a HEAD sends none of it, a client may leave halfway.
        sent = request.writer.output_size
        status = response.status if response is not None else 500
        aborted = response is not None and _cut_off(response)
        route = _route(request)
        metrics = request.app[METRICS]
        metrics.requests.labels(route, request.method, "aborted" if aborted else str(status)).inc()
        if route != "/sse":  # a stream's lifetime is not a response time
            metrics.duration.labels(route, request.method).observe(elapsed)
        if isinstance(response, BlobResponse) and response.body_sent:
            metrics.downloaded.inc(response.body_sent)
        access_log.info(
            "%s %s %d %dB %.1fms%s",
            request.method,
            request.path,
            status,
            sent,
            elapsed * 1000,
            " aborted" if aborted else "",
            extra={
                "method": request.method,
                "path": request.path,
                "route": route,
                "status": status,
                "aborted": aborted,
                "bytes": sent,
                "duration_ms": round(elapsed * 1000, 3),
                "request_id": self.request_id,
                "remote": request.remote,
            },
        )


def _cut_off(response: web.StreamResponse) -> bool:
    """Whether the client left before a response of declared length was sent whole.

    aiohttp sets body_length (the bytes written, headers included) only once the response is
    finished, so 0 means it never was. An event stream declares no length and always ends with
    its client leaving: that is not a cut.
    """
    return response.content_length is not None and response.body_length == 0


def watch(request: web.Request) -> Exchange:
    """Give the request its id, and have its access line written and its metrics counted when
    its task ends: once aiohttp has sent the response (or the client broke it off), so the
    duration covers the transfer and the bytes are those that went out, whoever sent them.

    telemetry_middleware calls it for every request (an Expect refusal too: the upload handler
    raises it, inside the middlewares).
    """
    offered = request.headers.get(REQUEST_ID, "")
    request_id = offered if _REQUEST_ID_OK.fullmatch(offered) else f"{_ID_PREFIX}{next(_id_counter):08x}"
    # Set before the callback is added: it runs in a copy of this context, so lines it writes
    # carry the id too.
    current_request_id.set(request_id)
    exchange = Exchange(request, request_id, time.perf_counter())
    task = asyncio.current_task()
    assert task is not None
    task.add_done_callback(exchange.record)
    return exchange


@web.middleware
async def telemetry_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost middleware: request id, metrics and the access log line for every answer.

    It never sends the response itself (aiohttp does, after it returns); see watch.
    """
    exchange = watch(request)
    return exchange.answer(await handler(request))


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


class _TextFormatter(logging.Formatter):
    """Plain lines for a terminal; a line written on behalf of a request ends with its id (the
    JSON format has it as a field)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} req={request_id}"


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
