"""Operators' signals: Prometheus metrics, one JSON log line per request, request ids."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re

from prerec.app import create_app
from prerec.telemetry import configure_logging
from tests.conftest import EVENT, blob_files, ogg, put_head, read_events

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(2))
    return 0.0


async def test_metrics_count_requests_bytes_and_events(client) -> None:
    stream = await client.get("/sse")
    await client.put(KEY, data=ogg(5000), headers=OGG)
    await (await client.get(KEY)).read()
    await client.get(f"/prerecordings/{EVENT}/2024-13-01T00:00")
    await read_events(stream, 1)

    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    route = "/prerecordings/{event}/{start}"
    assert sample(text, "prerec_http_requests_total", route=route, method="PUT", status="201") == 1
    assert sample(text, "prerec_http_requests_total", route=route, method="GET", status="400") == 1
    assert sample(text, "prerec_http_request_duration_seconds_count", route=route, method="GET") == 2
    assert sample(text, "prerec_uploaded_bytes_total") == 5000
    assert sample(text, "prerec_downloaded_bytes_total") == 5000
    assert sample(text, "prerec_sse_subscribers") == 1
    assert sample(text, "prerec_sse_events_delivered_total") == 1
    assert sample(text, "prerec_uploads_in_flight") == 0
    assert sample(text, "prerec_blob_store_free_bytes") > 0
    assert "prerec_listener_reconnects_total" in text
    assert EVENT not in text, "a label carries an event id"
    stream.close()


async def test_request_id_is_echoed_or_made(client) -> None:
    response = await client.get("/ping", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    made = (await client.get("/ping")).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{20,}", made)
    assert (await client.get("/ping")).headers["X-Request-ID"] != made
    forged = await client.get("/ping", headers={"X-Request-ID": "x" * 500})
    assert forged.headers["X-Request-ID"] != "x" * 500
    problem = await client.get("/prerecordings/nope")
    assert "X-Request-ID" in problem.headers


async def test_one_json_line_per_request(client, capsys) -> None:
    configure_logging("INFO", "json")
    try:
        await client.put(KEY, data=ogg(100), headers={**OGG, "X-Request-ID": "upload-1"})
        await client.get("/nowhere")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "prerec.access"]
    assert len(access) == 2
    upload, missing = access
    assert upload["method"] == "PUT" and upload["status"] == 201 and upload["request_id"] == "upload-1"
    assert upload["route"] == "/prerecordings/{event}/{start}" and upload["duration_ms"] >= 0
    assert "bytes" in upload and upload["level"] == "INFO" and upload["time"]
    assert missing["status"] == 404 and missing["route"] == "unmatched"


async def test_lines_logged_while_handling_a_request_carry_its_id(client, settings, capsys) -> None:
    await client.put(KEY, data=ogg(1000), headers=OGG)
    [blob] = blob_files(settings)
    blob.write_bytes(ogg(10))  # torn: the handler logs an error about it
    configure_logging("INFO", "json")
    try:
        assert (await client.get(KEY, headers={"X-Request-ID": "torn-1"})).status == 503
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [error] = [line for line in lines if line["level"] == "ERROR"]
    assert error["logger"] == "prerec.prerecordings" and error["request_id"] == "torn-1"


async def test_a_stalled_upload_is_one_408_access_line_and_no_traceback(aiohttp_client, settings, database_url, caplog):  # type: ignore[no-untyped-def]
    impatient = dataclasses.replace(settings, read_timeout_seconds=0.5)
    client = await aiohttp_client(create_app(impatient, database_url))
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(put_head(KEY, 1000, "X-Request-ID: stalled-1") + b"OggS")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the server closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    await asyncio.sleep(0.1)  # anything logged after the answer went out
    assert not [r for r in caplog.records if r.exc_info or "Unhandled" in r.getMessage()], caplog.text
    [line] = [r for r in caplog.records if r.name == "prerec.access"]
    assert line.status == 408 and line.request_id == "stalled-1"
