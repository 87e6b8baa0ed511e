"""Browsers on another origin: PREREC_CORS_ORIGINS, preflights, and what a page may read.

The headers are checked over HTTP here; the last tests run a real page in headless Chromium,
served from another origin, that lists, uploads, downloads a range and follows /sse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import re
import urllib.parse

import pytest
from aiohttp import web
from multidict import CIMultiDict

from prerec import cors
from prerec.app import create_app
from prerec.config import SettingError, Settings
from prerec.ready import SHUTTING_DOWN
from tests.conftest import CHROMIUM, EVENT, chromium_dom, ogg, put_head

PAGE = "http://ui.example.org:8080"
OTHER = "http://evil.example.org"
BASE = f"/prerecordings/{EVENT}"
KEY = f"{BASE}/2024-01-01T00:00:00"
TOKEN = "s3cret"


def cors_headers(response) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


def listed(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


@pytest.fixture
async def cors_client(aiohttp_client, settings, database_url):  # type: ignore[no-untyped-def]
    configured = dataclasses.replace(settings, cors_origins=frozenset({PAGE}), write_token=TOKEN)
    return await aiohttp_client(create_app(configured, database_url))


# The setting


def test_unset_means_no_cors() -> None:
    assert Settings.from_env({}).cors_origins is None
    assert Settings.from_env({"PREREC_CORS_ORIGINS": ""}).cors_origins is None


def test_origins_are_normalised_as_browsers_send_them() -> None:
    value = "HTTPS://UI.Example.org:443, http://localhost:5173,http://[::1]:80 , http://127.0.0.1:0080"
    assert Settings.from_env({"PREREC_CORS_ORIGINS": value}).cors_origins == {
        "https://ui.example.org",
        "http://localhost:5173",
        "http://[::1]",
        "http://127.0.0.1",
    }
    assert Settings.from_env({"PREREC_CORS_ORIGINS": " * "}).cors_origins == {"*"}


@pytest.mark.parametrize(
    "value",
    [
        "ui.example.org",
        "https://ui.example.org/",
        "https://ui.example.org/app",
        "https://ui.example.org?x=1",
        "https://user@ui.example.org",
        "https://*.example.org",
        "https://ui.example.org:99999",
        "https://ui.example.org:0",
        "https://ui.example.org:٨٠",
        "null",
        "*, https://ui.example.org",
        "https://a.example.org,,https://b.example.org",
        "https://a.example.org,",
    ],
)
def test_a_malformed_origin_stops_the_start_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingError, match="PREREC_CORS_ORIGINS"):
        Settings.from_env({"PREREC_CORS_ORIGINS": value})


# The pure rules


def test_allowed_origin() -> None:
    assert cors.allowed_origin(PAGE, frozenset({PAGE})) == PAGE
    assert cors.allowed_origin(OTHER, frozenset({PAGE})) is None
    assert cors.allowed_origin(None, frozenset({PAGE})) is None
    # Exact: no prefix, suffix or case games.
    assert cors.allowed_origin(PAGE + ".evil.org", frozenset({PAGE})) is None
    assert cors.allowed_origin(PAGE.upper(), frozenset({PAGE})) is None
    assert cors.allowed_origin(OTHER, frozenset({"*"})) == "*"
    assert cors.allowed_origin(None, frozenset({"*"})) == "*"


@pytest.mark.parametrize(
    ("before", "after"),
    [(None, "Origin"), ("Accept-Encoding", "Accept-Encoding, Origin"), ("origin", "origin"), ("*", "*")],
)
def test_vary_gains_origin_once(before: str | None, after: str) -> None:
    headers: CIMultiDict[str] = CIMultiDict({"Vary": before} if before else {})
    cors.add_vary_origin(headers)
    assert headers["Vary"] == after


def test_is_preflight() -> None:
    preflight = CIMultiDict({"Origin": PAGE, "Access-Control-Request-Method": "PUT"})
    assert cors.is_preflight("OPTIONS", preflight)
    assert not cors.is_preflight("OPTIONS", CIMultiDict({"Origin": PAGE}))
    assert not cors.is_preflight("GET", preflight)


# Over HTTP


async def test_unset_sends_no_cors_headers(client) -> None:
    response = await client.get(BASE, headers={"Origin": PAGE})
    assert response.status == 200
    assert cors_headers(response) == {} and "Vary" not in response.headers
    preflight = await client.options(KEY, headers={"Origin": PAGE, "Access-Control-Request-Method": "PUT"})
    assert preflight.status == 405 and cors_headers(preflight) == {}


async def test_an_allowed_origin_may_read_the_answer_and_its_headers(cors_client) -> None:
    response = await cors_client.get(BASE, headers={"Origin": PAGE})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert "Origin" in listed(response.headers["Vary"]) or "origin" in listed(response.headers["Vary"])
    exposed = listed(response.headers["Access-Control-Expose-Headers"])
    for name in (
        "ETag",
        "Repr-Digest",
        "Content-Range",
        "Content-Length",
        "Accept-Ranges",
        "Last-Modified",
        "Location",
        "Retry-After",
        "X-Request-ID",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Expires",
        "Upload-Complete",
        "Upload-Limit",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Extension",
        "Tus-Max-Size",
        "Tus-Checksum-Algorithm",
        "Upload-Draft-Interop-Version",
    ):
        assert name.lower() in exposed, name
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_another_origin_gets_no_cors_headers_but_vary(cors_client) -> None:
    for origin in (OTHER, None):
        response = await cors_client.get(BASE, headers={"Origin": origin} if origin else {})
        assert response.status == 200
        assert cors_headers(response) == {}
        # The same URL answers an allowed origin differently: a cache must not mix them.
        assert "origin" in listed(response.headers["Vary"])


async def test_a_preflight_allows_every_method_and_header_a_client_sends(cors_client) -> None:
    asked = "content-type,authorization,if-none-match,repr-digest,upload-offset,tus-resumable"
    # PREREC_WRITE_TOKEN is set, and the preflight carries no token: it must not be refused.
    response = await cors_client.options(
        KEY, headers={"Origin": PAGE, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": asked}
    )
    assert response.status == 204, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert listed(response.headers["Access-Control-Allow-Methods"]) == {
        "get",
        "head",
        "put",
        "delete",
        "post",
        "patch",
        "options",
    }
    allowed = listed(response.headers["Access-Control-Allow-Headers"])
    for name in (
        "Content-Type",
        "Authorization",
        "If-Match",
        "If-None-Match",
        "If-Range",
        "Range",
        "Repr-Digest",
        "Content-Digest",
        "Content-MD5",
        "Last-Event-ID",
        "X-Request-ID",
        "Tus-Resumable",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Metadata",
        "Upload-Checksum",
        "Upload-Concat",
        "Upload-Defer-Length",
        "Upload-Complete",
        "Upload-Draft-Interop-Version",
    ):
        assert name.lower() in allowed, name
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "origin" in listed(response.headers["Vary"])
    assert "X-Request-ID" in response.headers


async def test_a_preflight_on_an_unknown_path_is_answered_so_the_404_can_be_read(cors_client) -> None:
    preflight = await cors_client.options("/nowhere", headers={"Origin": PAGE, "Access-Control-Request-Method": "GET"})
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == PAGE
    response = await cors_client.get("/nowhere", headers={"Origin": PAGE, "X-Request-ID": "x"})
    assert response.status == 404 and response.headers["Access-Control-Allow-Origin"] == PAGE


async def test_a_preflight_from_another_origin_is_refused_without_cors_headers(cors_client) -> None:
    response = await cors_client.options(KEY, headers={"Origin": OTHER, "Access-Control-Request-Method": "PUT"})
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    assert OTHER in (await response.json())["detail"]
    assert cors_headers(response) == {}


async def test_a_plain_options_request_is_not_a_preflight(cors_client) -> None:
    response = await cors_client.options(KEY, headers={"Origin": PAGE})
    assert response.status == 405  # the router's answer, now readable by the page
    assert response.headers["Access-Control-Allow-Origin"] == PAGE


async def test_problem_answers_carry_cors_headers(cors_client) -> None:
    """A page must be able to read why it was refused, whichever layer refused it."""
    origin = {"Origin": PAGE}
    answers = {
        "unknown route": await cors_client.get("/nowhere", headers=origin),
        "wrong method": await cors_client.post(KEY, headers=origin),
        "bad key": await cors_client.get(f"{BASE}/yesterday", headers=origin),
        "not found": await cors_client.get(KEY, headers=origin),
        "no token": await cors_client.put(KEY, data=ogg(100), headers={**origin, "Content-Type": "audio/ogg"}),
        "bad type": await cors_client.put(
            KEY, data=b"x", headers={**origin, "Content-Type": "text/plain", "Authorization": f"Bearer {TOKEN}"}
        ),
    }
    cors_client.app[SHUTTING_DOWN].set()
    answers["shutting down (a middleware)"] = await cors_client.get(BASE, headers=origin)
    for what, response in answers.items():
        assert response.status >= 400, what
        assert response.content_type == "application/problem+json", what
        assert response.headers.get("Access-Control-Allow-Origin") == PAGE, what
        assert "x-request-id" in listed(response.headers["Access-Control-Expose-Headers"]), what
    assert answers["no token"].status == 401 and answers["shutting down (a middleware)"].status == 503


async def test_downloads_and_the_event_stream_carry_cors_headers(cors_client) -> None:
    """Responses that handlers prepare themselves: blobs (sendfile) and /sse."""
    origin = {"Origin": PAGE}
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "audio/ogg"}
    created = await cors_client.put(KEY, data=ogg(300_000), headers={**origin, **auth})
    assert created.status == 201 and created.headers["Access-Control-Allow-Origin"] == PAGE
    for method, headers in (("GET", {}), ("GET", {"Range": "bytes=0-3"}), ("HEAD", {})):
        response = await cors_client.request(method, KEY, headers={**origin, **headers})
        await response.read()
        assert response.status in (200, 206)
        assert response.headers["Access-Control-Allow-Origin"] == PAGE, (method, headers)
        assert "origin" in listed(response.headers["Vary"])
    async with cors_client.get("/sse", headers=origin) as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        assert stream.headers["Access-Control-Allow-Origin"] == PAGE


async def test_an_expect_refusal_carries_cors_headers(cors_client) -> None:
    reader, writer = await asyncio.open_connection(cors_client.host, cors_client.port)
    writer.write(put_head(KEY, 100, "Expect: 100-continue", f"Origin: {PAGE}"))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    assert f"Access-Control-Allow-Origin: {PAGE}".encode() in head


async def test_any_origin(aiohttp_client, settings, database_url) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, cors_origins=frozenset({"*"})), database_url)
    )
    for headers in ({"Origin": OTHER}, {}):
        response = await client.get(BASE, headers=headers)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        # The same answer for every origin: nothing for a cache to keep apart.
        assert "Vary" not in response.headers
    preflight = await client.options(KEY, headers={"Origin": OTHER, "Access-Control-Request-Method": "DELETE"})
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"


# In a real browser

# What a web UI on another origin does: list, upload create-only (a preflighted PUT with the
# token), read the ETag, download a range, follow /sse, and read a problem's detail.
# Each step records what the page could see, or the error the browser gave it.
PAGE_SCRIPT = """
const api = new URLSearchParams(location.search).get("api");
const results = {};
async function step(name, action) {
  try { results[name] = await action(); } catch (error) { results[name] = {error: String(error)}; }
}
function withTimeout(promise, ms, what) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(what)), ms))]);
}
async function run() {
  const key = api + "/prerecordings/" + EVENT + "/2024-01-01T00:00:00";
  await step("list", async () => {
    const response = await fetch(api + "/prerecordings/" + EVENT);
    const body = await response.json();
    return {status: response.status, count: body.count, requestId: response.headers.get("X-Request-ID")};
  });
  const source = new EventSource(api + "/sse");
  const created = new Promise((resolve, reject) => {
    source.onmessage = (message) => resolve(JSON.parse(message.data).type);
    source.onerror = () => reject(new Error("EventSource error, readyState " + source.readyState));
  });
  created.catch(() => {});
  await step("sseOpen", () => withTimeout(new Promise((resolve, reject) => {
    source.onopen = () => resolve(true);
    source.addEventListener("error", () => reject(new Error("EventSource error, readyState " + source.readyState)));
  }), 10000, "EventSource did not open"));
  await step("put", async () => {
    const body = new Uint8Array(1000);
    body.set([79, 103, 103, 83]);
    const response = await fetch(key, {method: "PUT", body: body, headers: {
      "Content-Type": "audio/ogg", "If-None-Match": "*", "Authorization": "Bearer " + TOKEN}});
    return {status: response.status, etag: response.headers.get("ETag")};
  });
  await step("range", async () => {
    const response = await fetch(key, {headers: {"Range": "bytes=0-3"}});
    return {status: response.status, contentRange: response.headers.get("Content-Range"),
            reprDigest: response.headers.get("Repr-Digest"), text: await response.text()};
  });
  await step("sse", () => withTimeout(created, 10000, "no event within 10 s"));
  source.close();
  await step("problem", async () => {
    const response = await fetch(api + "/prerecordings/" + EVENT + "/yesterday");
    return {status: response.status, detail: (await response.json()).detail};
  });
  document.getElementById("results").textContent = JSON.stringify(results);
  document.title = "done";
}
run();
"""


def answered(metrics: str, method: str, status: str, route: str = "") -> float:
    """How many requests the server answered so (prerec_http_requests_total, summed over routes)."""
    route_pattern = re.escape(route) if route else '[^"]*'
    pattern = rf'prerec_http_requests_total{{method="{method}",route="{route_pattern}",status="{status}"}} (\S+)'
    return sum(float(count) for count in re.findall(pattern, metrics))


@pytest.fixture
async def page_origin(aiohttp_server) -> str:  # type: ignore[no-untyped-def]
    """A second server, on another port (so another origin), serving the page."""

    async def page(request: web.Request) -> web.Response:
        script = PAGE_SCRIPT.replace("EVENT", json.dumps(EVENT)).replace("TOKEN", json.dumps(TOKEN))
        return web.Response(
            text=f'<!doctype html><title>running</title><pre id="results"></pre><script>{script}</script>',
            content_type="text/html",
        )

    pages = web.Application()
    pages.router.add_get("/", page)
    server = await aiohttp_server(pages)
    return f"http://{server.host}:{server.port}"


async def results_in_chromium(page_origin: str, api: str, tmp_path) -> dict:  # type: ignore[no-untyped-def]
    dom = await chromium_dom(f"{page_origin}/?{urllib.parse.urlencode({'api': api})}", tmp_path, 30_000)
    assert "<title>done</title>" in dom, dom
    return json.loads(html.unescape(dom.split('<pre id="results">', 1)[1].split("</pre>", 1)[0]))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_a_page_on_an_allowed_origin_lists_uploads_downloads_and_follows_events(
    aiohttp_client, settings, database_url, page_origin, tmp_path
):  # type: ignore[no-untyped-def]
    configured = dataclasses.replace(settings, cors_origins=frozenset({page_origin}), write_token=TOKEN)
    client = await aiohttp_client(create_app(configured, database_url))
    api = str(client.make_url("")).rstrip("/")
    assert api.rsplit(":", 1)[1] != page_origin.rsplit(":", 1)[1]  # two origins

    results = await results_in_chromium(page_origin, api, tmp_path)

    assert results["list"]["status"] == 200 and results["list"]["count"] == 0, results
    assert results["list"]["requestId"], results  # an exposed header
    assert results["sseOpen"] is True, results
    assert results["put"]["status"] == 201 and results["put"]["etag"].startswith('"'), results
    assert results["range"] == {
        "status": 206,
        "contentRange": "bytes 0-3/1000",
        "reprDigest": results["range"]["reprDigest"],
        "text": "OggS",
    }, results
    assert results["range"]["reprDigest"].startswith("sha-256=:"), results
    assert results["sse"] == "prerecording-created", results
    assert results["problem"]["status"] == 400 and "yesterday" in results["problem"]["detail"], results
    # The PUT went through a preflight (its Content-Type and headers are not CORS-safelisted).
    assert answered(await (await client.get("/metrics")).text(), "OPTIONS", "204") >= 1


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_a_page_on_another_origin_is_blocked_by_the_browser(
    aiohttp_client, settings, database_url, page_origin, tmp_path
):  # type: ignore[no-untyped-def]
    configured = dataclasses.replace(settings, cors_origins=frozenset({PAGE}), write_token=TOKEN)
    client = await aiohttp_client(create_app(configured, database_url))
    api = str(client.make_url("")).rstrip("/")

    results = await results_in_chromium(page_origin, api, tmp_path)

    for step in ("list", "put", "range", "problem"):
        assert "Failed to fetch" in results[step]["error"], results
    assert "readyState 2" in results["sseOpen"]["error"], results  # closed for good, not retrying
    metrics = await (await client.get("/metrics")).text()
    # The list was answered, and the browser kept the answer from the page; the refused
    # preflight kept the PUT from being sent at all.
    assert answered(metrics, "GET", "200", route="/prerecordings/{event}") == 1
    assert answered(metrics, "OPTIONS", "403") >= 1
    assert answered(metrics, "PUT", "201") == 0
    assert (await (await client.get(BASE)).json())["count"] == 0
