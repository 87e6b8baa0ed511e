"""Connection policy: how long a client may take to send a request head or stay idle, how many
connections may be open at once, and how malformed requests and accept failures are logged.

Idle or slow clients must never hold the descriptors real requests need: a connection that
has not sent a complete request head within PREREC_HEADER_TIMEOUT_SECONDS is closed (aiohttp
has no such timeout: its keep-alive timer is the only bound, an hour by default), and at
PREREC_MAX_CONNECTIONS a new connection closes the connection idle the longest.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from prerec.config import Settings
from prerec.problems import problem_json, problem_response

log = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: stdio, the event loop's own, the
# listening sockets, the database pool (10) and listener, the metrics files, directory scans.
RESERVED_DESCRIPTORS = 64
# The idle connections themselves cost memory (some 6 KB each, measured): past
# this many, a larger descriptor limit buys nothing a station's clients need.
MOST_CONNECTIONS = 10_000

# llhttp's LineTooLong says only which limit was broken, not what broke it: with different
# limits for the request line (nginx's 8 KiB buffer) and a header field (aiohttp's default),
# the limit tells which part was too long.
MAX_REQUEST_LINE = 8192
MAX_HEADER_FIELD = 8190

# A line per this many seconds at most for what a flood repeats (accept failures, the cap).
LOG_INTERVAL_SECONDS = 10.0

# Sent, then closed, to a connection over the cap when no idle one can make room: the client
# sees why instead of a bare reset.
_BUSY_BODY = problem_json(503, "Too many open connections.").encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's default soft limit is 1024) and
    return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, error)
    return soft


def default_max_connections(descriptor_limit: int) -> int:
    """The connection cap for a descriptor limit: half of what is left after the reserve.

    The other half is for the file each connection may hold (the upload or download), and for
    a burst of connections: asyncio accepts up to 100 a loop turn, and each gets its descriptor
    before the cap can close it or an idle one (which frees its own a turn later). With
    systemd's 1024 that leaves room for some 500 in flight; at 256 a burst can still fail.
    """
    if descriptor_limit == resource.RLIM_INFINITY:
        return MOST_CONNECTIONS
    return max(1, min((descriptor_limit - RESERVED_DESCRIPTORS) // 2, MOST_CONNECTIONS))


class Throttled:
    """One log line per interval at most; the lines left out are summed up in one line at the
    end of the interval."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._logger = logger
        self._interval = interval
        self._quiet_until = 0.0
        self._left_out = 0
        self._last = ""

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            if self._left_out == 0:
                asyncio.get_running_loop().call_later(self._quiet_until - now, self._flush)
            self._left_out += 1
            self._last = message % args
            return
        self._quiet_until = now + self._interval
        self._logger.warning(message, *args)

    def _flush(self) -> None:
        if self._left_out:
            self._logger.warning("%s (and %d more like it in %g s)", self._last, self._left_out - 1, self._interval)
            self._left_out = 0
            self._quiet_until = time.monotonic() + self._interval


class Guard:
    """The open connections of one listener: counts them and closes the idle ones to make room."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        # Connections between requests (new, idle on keep-alive, or sending a head), the one
        # idle the longest first: dicts keep insertion order, so each move is O(1).
        self._idle: dict[Connection, None] = {}
        self._full = Throttled(log)

    def opened(self, connection: Connection) -> bool:
        """Count a new connection; False when it must be closed at once."""
        self.open += 1
        self._idle[connection] = None
        if self.open <= self.max_connections:
            return True
        oldest = next(iter(self._idle))
        if oldest is connection:
            self._idle.pop(connection)
            self._full.warning("%d connections open, all busy: new connections are refused", self.max_connections)
            return False
        self._idle.pop(oldest)
        oldest.force_close()
        self._full.warning(
            "%d connections open: the connections idle the longest are closed for new ones", self.max_connections
        )
        return True

    def closed(self, connection: Connection) -> None:
        self.open -= 1
        self._idle.pop(connection, None)

    def busy(self, connection: Connection) -> None:
        self._idle.pop(connection, None)

    def idle(self, connection: Connection) -> None:
        if connection.transport is not None:
            self._idle[connection] = None


class Connection(web.RequestHandler):
    """aiohttp's protocol, plus the header-read timeout, the cap and one-line parser errors.

    The header timer runs from the connection's start, and from the first byte of each later
    request head, until the head is complete; idle time between requests is left to aiohttp's
    keep-alive timer.
    """

    __slots__ = ("_guard", "_head_timer", "_in_request")

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.opened(self):
            transport.write(_BUSY)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._time_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.closed(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self._in_request and self._head_timer is None:
            self._time_head()
        super().data_received(data)

    # Private in aiohttp, but the one place that brackets a request from its parsed head to
    # its last response byte: what makes a connection busy rather than idle.
    async def _handle_request(self, *args: Any, **kwargs: Any) -> Any:
        self._in_request = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._guard.busy(self)
        try:
            return await super()._handle_request(*args, **kwargs)
        finally:
            self._in_request = False
            self._guard.idle(self)

    def _time_head(self) -> None:
        self._head_timer = asyncio.get_running_loop().call_later(self._guard.header_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._in_request:
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse: one log line (aiohttp logs a traceback for each,
        a cheap flood), and a problem answer with the most precise status."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status, detail = parse_error(exc, self.max_line_size)
        # Not HTTP at all (a scanner, TLS to the plain port): common on a public port.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(level, "malformed request from %s answered %d: %s", request.remote, status, detail)
        response = problem_response(status, detail)
        response.force_close()
        return response


def parse_error(error: HttpProcessingError, max_request_line: int) -> tuple[int, str]:
    """The status and a one-line detail for an error of aiohttp's HTTP parser."""
    if isinstance(error, LineTooLong):
        limit = error.args[1]
        if limit == max_request_line:
            return 414, f"The request line is longer than {limit} bytes."
        return 431, f"A header field is longer than {limit} bytes."
    first_line = (error.message or "").splitlines()[0] if error.message else ""
    first_line = first_line.rstrip(":").strip()
    if first_line == "Too many headers received":
        return 431, "There are too many header fields."
    return 400, f"The request is not valid HTTP: {first_line[:200] or 'malformed'}."


_accept_failures = Throttled(log)


def _loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # asyncio logs a traceback for every accept that fails for want of descriptors, and retries
    # each second: one line per interval says as much.
    if context.get("message") == "socket.accept() out of system resource":
        _accept_failures.warning("cannot accept connections: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


async def listen(runner: web.AppRunner, settings: Settings, reuse_port: bool = False) -> asyncio.Server:
    """Start accepting connections for the runner's app under this policy.

    Not web.TCPSite: it builds aiohttp's own protocol, and the header timeout and the cap
    need this subclass of it.
    """
    descriptors = raise_descriptor_limit()
    guard = Guard(settings.max_connections or default_max_connections(descriptors), settings.header_timeout_seconds)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_errors)
    manager = runner.server
    assert manager is not None, "runner.setup() first"

    def protocol() -> Connection:
        return Connection(
            manager,
            guard,
            loop=loop,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_FIELD,
            access_log=None,  # telemetry_middleware writes the one line per request, with its id
        )

    # reuse_port: with PREREC_WORKERS > 1 every worker listens on the same port and the kernel
    # spreads connections over them.
    server = await loop.create_server(protocol, settings.host, settings.port, reuse_port=reuse_port or None)
    log.info(
        "serving on http://%s:%d, at most %d connections (open file limit %d)",
        settings.host,
        settings.port,
        guard.max_connections,
        descriptors,
    )
    return server
