"""The reference ceiling: a bare aiohttp handler that reads a request body and throws it away.

Whatever prerec does on top (hashing, writing, fsync, the database) is measured against this.
"""

import sys

from aiohttp import web


async def discard(request: web.Request) -> web.Response:
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
    return web.Response(status=204, headers={"X-Received": str(size)})


app = web.Application()
app.router.add_put("/{name:.*}", discard)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
