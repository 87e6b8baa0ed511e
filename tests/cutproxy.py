"""A TCP proxy for tests that cuts uploads mid-body, as a dropped link or a dying server does.

It reads each request's head on its way to the server (a keep-alive connection carries
several, as Node's agent sends them), forwards the body counting its bytes, and at the point
a planned cut names, either drops the link or runs the cut's action (kill the server that is
reading it) and forwards on. Each request and answer is logged with its time, so a test can
tell how long a client took to be back in business after each cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Cut:
    """One planned cut of a PATCH body: after `after` bytes of it, or at `fraction` of it, or
    where it carries the upload's byte `at` (its Upload-Offset says where it starts; a PATCH
    that ends before that byte passes whole, and the cut waits for a later one).

    Without `action` the link is dropped. With one, forwarding pauses there and `action(offset)`
    runs (the PATCH's Upload-Offset); it returns whether it cut (False: the cut is planned
    again for the next PATCH), and the rest of the body is forwarded to whatever is left."""

    after: int | None = None
    fraction: float | None = None
    at: int | None = None
    action: Callable[[int], Awaitable[bool]] | None = None
    name: str = "drop"

    def point(self, length: int, offset: int | None) -> int | None:
        """Where in a body of `length` bytes sent from `offset` to cut; None: not in this one."""
        if self.after is not None:
            return self.after
        if self.fraction is not None:
            return int(length * self.fraction)
        assert self.at is not None
        start = offset or 0
        return max(0, self.at - start) if self.at < start + length else None


@dataclass(frozen=True)
class Mark:
    """A line of the proxy's log: when, what ("request", "answer", a cut's name), and detail."""

    time: float
    what: str
    method: str = ""
    status: int = 0
    offset: int | None = None
    # A cut's: how many bytes of the body had been forwarded when it fell.
    forwarded: int = 0


def _head(data: bytes) -> tuple[str, dict[str, str]]:
    first, *lines = data.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return first, headers


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class CuttingProxy:
    """Forwards to `upstream`; cuts PATCH bodies as `plan` says, one cut per PATCH, then
    plain forwarding once the plan is done."""

    def __init__(self, upstream: tuple[str, int], plan: list[Cut]) -> None:
        self.upstream = upstream
        self.plan = list(plan)
        self.cuts: list[Mark] = []
        self.log: list[Mark] = []
        self.patch_offsets: list[int] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def _mark(self, what: str, **detail: object) -> Mark:
        mark = Mark(time.monotonic(), what, **detail)  # type: ignore[arg-type]
        self.log.append(mark)
        return mark

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        methods: asyncio.Queue[str] = asyncio.Queue()
        owed = 0  # requests forwarded whose answer has not been forwarded whole

        async def raw(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                target.write(data)
                await target.drain()

        async def to_server() -> str:
            nonlocal owed
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return "end"
                request_line, headers = _head(head)
                method = request_line.split(" ", 1)[0]
                offset = int(headers["upload-offset"]) if headers.get("upload-offset", "").isdigit() else None
                self._mark("request", method=method, offset=offset)
                methods.put_nowait(method)
                owed += 1
                up_writer.write(head)
                await up_writer.drain()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await raw(reader, up_writer)  # not ours to parse: forward the rest as is
                    return "end"
                length = int(headers.get("content-length", "0"))
                cut: Cut | None = None
                if method == "PATCH":
                    self.patch_offsets.append(-1 if offset is None else offset)
                    if self.plan and length and (point := self.plan[0].point(length, offset)) is not None:
                        cut = self.plan.pop(0)
                if cut is None:
                    point = length + 1
                seen = 0
                while seen < length:
                    data = await reader.read(min(65536, length - seen))
                    if not data:
                        break
                    if cut is not None and seen + len(data) >= point:
                        up_writer.write(data[: point - seen])
                        await up_writer.drain()
                        data, seen = data[point - seen :], point
                        if cut.action is None:
                            self.cuts.append(self._mark(cut.name, offset=offset, forwarded=point))
                            _reset(writer)
                            # The server's side is closed, not reset: a reset makes its kernel
                            # drop what the process had not read yet, bytes that never reached
                            # the server at all. What did reach it must count.
                            up_writer.close()
                            return "cut"
                        if await cut.action(-1 if offset is None else offset):
                            self.cuts.append(self._mark(cut.name, offset=offset, forwarded=point))
                        else:
                            self.plan.insert(0, cut)
                        cut = None
                    seen += len(data)
                    up_writer.write(data)
                    await up_writer.drain()
                if cut is not None:  # the body ended before the point: cut the next one
                    self.plan.insert(0, cut)
                if seen < length:
                    return "broken"

        async def to_client() -> None:
            nonlocal owed
            while True:
                try:
                    head = await up_reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                status_line, headers = _head(head)
                status = int(status_line.split(" ")[1])
                method = "" if status < 200 else methods.get_nowait() if not methods.empty() else ""
                offset = headers.get("upload-offset", "")
                self._mark("answer", method=method, status=status, offset=int(offset) if offset.isdigit() else None)
                writer.write(head)
                await writer.drain()
                if "chunked" in headers.get("transfer-encoding", "").lower() or (
                    method != "HEAD" and status >= 200 and status not in (204, 304) and "content-length" not in headers
                ):
                    await raw(up_reader, writer)
                    return
                length = 0 if method == "HEAD" or status < 200 else int(headers.get("content-length", "0"))
                if length:
                    writer.write(await up_reader.readexactly(length))
                    await writer.drain()
                if status >= 200:
                    owed -= 1

        server_side = asyncio.ensure_future(to_server())
        client_side = asyncio.ensure_future(to_client())
        try:
            await asyncio.wait([server_side, client_side], return_when=asyncio.FIRST_COMPLETED)
            if server_side.done() and not client_side.done():
                ended = None if server_side.exception() else server_side.result()
                # A client that closed between requests owes nothing; one cut off mid-body (or
                # whose server broke the link) still gets the answer the server gives (a 502
                # from a balancer whose upstream died), as it would without this proxy.
                if ended != "cut" and (ended != "end" or owed):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(client_side), 30)
        finally:
            for side in (server_side, client_side):
                side.cancel()
            await asyncio.gather(server_side, client_side, return_exceptions=True)
            up_writer.close()
            writer.close()
