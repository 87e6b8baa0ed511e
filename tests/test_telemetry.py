"""Operators' signals: Prometheus metrics, one JSON log line per request, request ids."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import urllib.parse

import pytest

from prerec.__main__ import without_password
from prerec.app import create_app
from prerec.telemetry import configure_logging
from tests.conftest import (
    EVENT,
    Replica,
    blob_files,
    free_port,
    ogg,
    put_head,
    read_answer,
    read_events,
    sample,
    wait_for,
)

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}


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


@pytest.mark.parametrize(
    ("extra", "content_type", "status"),
    [
        ((), "audio/mpeg", 415),  # refused by the checks
        (("Expect: 100-continue-please",), "audio/ogg", 417),  # an Expect value not understood
    ],
)
async def test_a_refused_expect_is_logged_counted_and_closes_the_connection(
    client, capsys, extra: tuple[str, ...], content_type: str, status: int
) -> None:
    """The refusal goes through the same middlewares as any answer, and the connection (with
    the body never sent) is not used again."""
    configure_logging("INFO", "json")
    try:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        expect = extra or ("Expect: 100-continue",)
        writer.write(put_head(KEY, 8, *expect, "X-Request-ID: refused-1", content_type=content_type))
        await writer.drain()
        async with asyncio.timeout(5):
            answered, headers, body = await read_answer(reader)
            assert answered == status, (headers, body)
            assert headers["X-Request-ID"] == "refused-1"
            assert json.loads(body)["status"] == status
            # A client that sends the body anyway, then another request: that one is not
            # served, the server closes the connection.
            writer.write(b"OggS1234GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""
        assert rest == b""
        writer.close()
        metrics = await (await client.get("/metrics")).text()
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "prerec.access" and line["path"] != "/metrics"]
    assert [(line["method"], line["status"], line["request_id"]) for line in access] == [("PUT", status, "refused-1")]
    route = "/prerecordings/{event}/{start}"
    assert sample(metrics, "prerec_http_requests_total", route=route, method="PUT", status=str(status)) == 1


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


def access_lines(caplog) -> list[logging.LogRecord]:  # type: ignore[no-untyped-def]
    return [record for record in caplog.records if record.name == "prerec.access"]


async def test_access_line_bytes_are_what_was_sent(client, caplog) -> None:
    size = 200_000
    await client.put(KEY, data=ogg(size), headers=OGG)
    caplog.set_level(logging.INFO, "prerec.access")
    caplog.clear()
    head = await client.head(KEY)
    assert int(head.headers["Content-Length"]) == size
    get = await client.get(KEY)
    assert len(await get.read()) == size
    await wait_for(lambda: len(access_lines(caplog)) == 2)
    head_line, get_line = access_lines(caplog)
    # A HEAD sends its status line and headers, none of the audio.
    assert 0 < head_line.bytes < 2000 and not head_line.aborted
    # A GET sends the audio too (sendfile, past aiohttp's writer).
    assert size < get_line.bytes < size + 2000 and not get_line.aborted
    text = await (await client.get("/metrics")).text()
    assert sample(text, "prerec_downloaded_bytes_total") == size


async def test_text_lines_name_status_bytes_duration_and_request_id(client, settings, capsys) -> None:
    await client.put(KEY, data=ogg(1000), headers=OGG)
    [blob] = blob_files(settings)
    blob.write_bytes(ogg(10))  # torn: the handler logs an error about it
    configure_logging("INFO", "text")
    written: list[str] = []

    def both_access_lines() -> bool:
        written.extend(capsys.readouterr().err.splitlines())
        return sum(" prerec.access: " in line for line in written) == 2

    try:
        await client.get("/ping", headers={"X-Request-ID": "abc"})
        await client.get(KEY, headers={"X-Request-ID": "torn-2"})
        await wait_for(both_access_lines)  # written as the request's task ends, maybe after the answer
    finally:
        logging.getLogger().handlers.clear()
    lines = written
    assert any(re.search(r"prerec\.access: GET /ping 204 \d+B \d+\.\dms req=abc$", line) for line in lines), lines
    assert any(re.search(r" 503 \d+B \d+\.\dms req=torn-2$", line) for line in lines), lines
    [error] = [line for line in lines if " ERROR " in line]
    assert error.endswith(" req=torn-2")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://prerec:s3cret@db.internal:5432/prerec?sslmode=require",
            "postgresql://prerec@db.internal:5432/prerec?sslmode=require",
        ),
        ("postgresql://u:s3cret@h1:5432,h2:5433/db", "postgresql://u@h1:5432,h2:5433/db"),
        ("postgres://u:s3c@ret@h/db", "postgres://u@h/db"),
        ("postgresql://u@h/db?password=s3cret&sslmode=verify-full", "postgresql://u@h/db?sslmode=verify-full"),
        ("postgresql:///db?host=/run/postgresql&PASSWORD=s3cret", "postgresql:///db?host=/run/postgresql"),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", "postgresql://postgres@/postgres?host=/tmp/pg"),
    ],
)
def test_database_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert without_password(url) == shown


def test_first_lines_say_where_the_data_lives_never_the_password(tmp_path, storage_env, replicas) -> None:
    url = urllib.parse.urlsplit(storage_env["PREREC_DATABASE_URL"])
    # The embedded server trusts local connections, so a password is accepted and ignored.
    with_password = url._replace(netloc=f"postgres:pw-that-must-not-show@{url.hostname or ''}").geturl()
    replica = Replica({**storage_env, "PREREC_DATABASE_URL": with_password}, free_port(), tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready()
    assert replica.stop() == 0
    messages = [line["message"] for line in replica.log_lines()]
    assert f"storage folder: {tmp_path / 'storage'}" in messages
    assert f"database: {without_password(with_password)}" in messages
    assert "pw-that-must-not-show" not in replica.log.read_text()


def test_first_lines_say_that_an_embedded_postgresql_was_started(tmp_path, replicas) -> None:
    env = {"PREREC_DATA_DIR": str(tmp_path / "data"), "PREREC_DATABASE_URL": ""}
    replica = Replica(env, free_port(), tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready(timeout=60)
    assert replica.stop() == 0  # SIGTERM: the embedded server is stopped with us
    messages = [line["message"] for line in replica.log_lines()]
    pgdata = tmp_path / "data" / "postgres"
    assert any(m.startswith("started an embedded PostgreSQL") and str(pgdata) in m for m in messages), messages
    assert f"storage folder: {tmp_path / 'data' / 'blobs'}" in messages
    assert any(m.startswith("database: postgresql://") for m in messages), messages
