"""Sending a blob (or a range of it) back: the HTTP response for GET and HEAD."""

from __future__ import annotations

import asyncio
import os
from typing import IO

from aiohttp import hdrs, web

from prerec.storage.fs import DISK
from prerec.storage.receive import WRITE_PIECE

# Below this size a blob is read and written in one go: cheaper than the sendfile machinery
# (which waits for the socket to be writable and loops in the event loop) for the small files
# UIs and probes fetch in bursts.
SMALL_BLOB = 64 * 1024


class BlobResponse(web.StreamResponse):
    """A blob (or a range of it) from an already opened file, with sendfile.

    Not web.FileResponse: that one stats and opens the file in the thread pool (slow for the
    small files playout and UIs probe) and replaces our content-derived ETag with one made
    from mtime and size. `file` is None for HEAD, which sends no body.

    `body_sent` tells how many bytes of the blob went out, also when the client broke off.
    """

    def __init__(self, file: IO[bytes] | None, offset: int, count: int, *, status: int = 200) -> None:
        super().__init__(status=status)
        self._file = file
        self._offset = offset
        self._count = count
        self.content_length = count
        self.body_sent = 0

    async def prepare(self, request: web.BaseRequest) -> web.AbstractStreamWriter | None:  # type: ignore[override]
        try:
            writer = await super().prepare(request)
            if self._file is None or request.method == hdrs.METH_HEAD or self._count == 0 or writer is None:
                return writer
            if self._count <= SMALL_BLOB:
                await self.write(os.pread(self._file.fileno(), self._count, self._offset))
                self.body_sent = self._count
            else:
                await self._sendfile(request, writer, self._file)
            await super().write_eof()
            return writer
        finally:
            self.close_file()

    async def _sendfile(self, request: web.BaseRequest, writer: web.AbstractStreamWriter, file: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        transport = request.transport
        if transport is None or transport.is_closing():
            # What aiohttp expects of a client that left (loop.sendfile would raise RuntimeError).
            raise ConnectionResetError("Connection lost")
        # asyncio leaves the file position after the last byte sent, also when the client breaks
        # off: that is how much went out.
        file.seek(self._offset)
        try:
            await loop.sendfile(transport, file, self._offset, self._count)
        except NotImplementedError:
            # No sendfile (uvloop): copy in pieces through a thread. pread keeps the position.
            left = self._count
            while left > 0:
                piece = await loop.run_in_executor(
                    DISK, os.pread, file.fileno(), min(left, WRITE_PIECE), self._offset + self.body_sent
                )
                if not piece:
                    break
                await self.write(piece)
                self.body_sent += len(piece)
                left -= len(piece)
        finally:
            sent = file.tell() - self._offset
            self.body_sent += sent
            # sendfile goes around aiohttp's writer, whose output_size is what the response sent
            # (its body_length, our access log's bytes).
            writer.output_size += sent

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
