"""Sending a blob (or a range of it) back: the HTTP response for GET and HEAD."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web


class Source(Protocol):
    """A blob's bytes, opened by a backend (Storage.open) before any header went out."""

    async def send(self, response: BlobResponse, request: web.BaseRequest, writer: web.AbstractStreamWriter) -> None:
        """Write the bytes asked for, adding what went out to `response.body_sent`."""
        ...

    def close(self) -> None: ...


class BlobResponse(web.StreamResponse):
    """A blob (or a range of it) from an already opened source.

    Not web.FileResponse: that one stats and opens the file in the thread pool (slow for the
    small files playout and UIs probe), replaces our content-derived ETag with one made from
    mtime and size, and knows only files. `source` is None for HEAD, which sends no body.

    `body_sent` tells how many bytes of the blob went out, also when the client broke off.
    """

    def __init__(self, source: Source | None, count: int, *, status: int = 200) -> None:
        super().__init__(status=status)
        self._source = source
        self.content_length = count
        self.body_sent = 0

    async def prepare(self, request: web.BaseRequest) -> web.AbstractStreamWriter | None:  # type: ignore[override]
        try:
            writer = await super().prepare(request)
            if self._source is None or request.method == "HEAD" or not self.content_length or writer is None:
                return writer
            await self._source.send(self, request, writer)
            await super().write_eof()
            return writer
        finally:
            self.close_source()

    def close_source(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
