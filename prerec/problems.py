"""Errors as RFC 9457 problem details: one exception type, one middleware.

Handlers raise Problem(status, detail); the middleware turns it, aiohttp's own HTTP errors
(unknown route, wrong method) into `application/problem+json`. Nothing
else reaches the client: an unexpected exception is logged and answered with a bare 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from aiohttp import web

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 5
# Statuses outside the IANA registry that a protocol here answers with.
EXTRA_TITLES = {460: "Checksum Mismatch"}  # tus 1.0.0's checksum extension


class Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        headers: Mapping[str, str] | None = None,
        type: str = "about:blank",
        members: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        # A registered problem type and its extension members (RFC 9457 §3.2), where a
        # protocol defines one (the IETF resumable-upload draft's mismatching offset).
        self.type = type
        self.members = dict(members or {})


class DatabaseUnavailable(Problem):
    def __init__(self, detail: str = "The database is not available; try again shortly.") -> None:
        super().__init__(503, detail, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def title(status: int) -> str:
    return EXTRA_TITLES[status] if status in EXTRA_TITLES else HTTPStatus(status).phrase


def problem_json(
    status: int, detail: str, type: str = "about:blank", members: Mapping[str, object] | None = None
) -> str:
    return json.dumps({"type": type, "title": title(status), "status": status, "detail": detail, **(members or {})})


def problem_response(
    status: int,
    detail: str,
    headers: Mapping[str, str] | None = None,
    type: str = "about:blank",
    members: Mapping[str, object] | None = None,
) -> web.Response:
    response = web.Response(
        status=status, reason=title(status), text=problem_json(status, detail, type, members), headers=headers
    )
    response.content_type = PROBLEM_JSON
    if response.headers.get("Connection", "").lower() == "close":
        # aiohttp keeps the connection open whatever the header says (and reads on into the
        # body the client may never send): make the header true.
        response.force_close()
    return response


@web.middleware
async def problems_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem.status, problem.detail, problem.headers, problem.type, problem.members)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {name: error.headers[name] for name in ("Allow",) if name in error.headers}
        detail = _http_detail(request, error)
        return problem_response(error.status, detail, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return problem_response(500, "The server failed to answer this request.")


def _http_detail(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"There is no resource at {request.path}."
    if error.status == 405:
        allowed = error.headers.get("Allow", "")
        return f"The method {request.method} is not allowed on {request.path}; allowed: {allowed}."
    return error.text or HTTPStatus(error.status).phrase


class CommitUncertain(DatabaseUnavailable):
    """The connection broke while COMMIT was under way: the change may or may not be made."""
