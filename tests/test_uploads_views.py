"""GET /uploads?event=: an event's uploads in progress, from either protocol; and its query
parsed as a pure function."""

from __future__ import annotations

import base64
import os
import uuid

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from multidict import MultiDict

from prerec.problems import Problem
from prerec.uploads.views import parse_uploads_query
from tests import contract
from tests.conftest import EVENT

TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


def metadata(event: str, start: str) -> str:
    pairs = {"event": event, "start": start, "filetype": "audio/ogg"}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


async def create(client: TestClient, length: int, start: str, event: str = EVENT) -> str:
    response = await client.post(
        "/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(event, start)}
    )
    assert response.status == 201, await response.text()
    return response.headers["Location"]


def audio(size: int) -> bytes:
    return b"OggS" + os.urandom(size - 4)


async def test_lists_the_events_uploads_in_progress_by_start(client: TestClient, database_url: str) -> None:
    data = audio(3000)
    later = await create(client, 3000, "2026-12-01T22:00")
    patched = await client.patch(later, data=data[:1000], headers={**PATCH, "Upload-Offset": "0"})
    assert patched.status == 204
    # The IETF draft's uploads are the same uploads.
    draft = await client.put(
        f"/prerecordings/{EVENT}/2026-12-01T20:00:30.5",
        data=b"",
        headers={
            "Upload-Draft-Interop-Version": "8",
            "Upload-Complete": "?0",
            "Upload-Length": "500",
            "Content-Type": "audio/ogg; codecs=opus",
        },
    )
    assert draft.status == 201, await draft.text()
    # Not listed: another event's, a cancelled one, a finished one, one past its expiry.
    await create(client, 100, "2026-12-01T20:00", event=str(uuid.uuid4()))
    cancelled = await create(client, 100, "2026-12-01T21:00")
    assert (await client.delete(cancelled, headers=TUS)).status == 204
    finished = await create(client, 100, "2026-12-01T23:00")
    done = await client.patch(finished, data=audio(100), headers={**PATCH, "Upload-Offset": "0"})
    assert done.status == 204 and "ETag" in done.headers
    overdue = await create(client, 100, "2026-12-01T19:00")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE uploads SET expires_at = now() - interval '1 s' WHERE id = $1", uuid.UUID(overdue.rsplit("/")[-1])
        )
    finally:
        await conn.close()

    response = await client.get("/uploads", params={"event": EVENT})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    listing = await response.json()
    contract.check("UploadList", listing)
    assert [(item["start"], item["offset"], item["length"], item["type"]) for item in listing["uploads"]] == [
        ("2026-12-01T20:00:30.500000", 0, 500, "audio/ogg; codecs=opus"),
        ("2026-12-01T22:00:00", 1000, 3000, "audio/ogg"),
    ]
    item = listing["uploads"][1]
    assert item["started"] <= item["progressed"] < item["expires"]
    # No ids anywhere: an upload's URL is its capability.
    assert later.rsplit("/")[-1] not in await response.text()
    # JSON-encoded, as the list's parameters; an event with none in progress lists none.
    quoted = await client.get("/uploads", params={"event": f'"{EVENT}"'})
    assert await quoted.json() == listing
    empty = await client.get("/uploads", params={"event": str(uuid.uuid4())})
    assert await empty.json() == {"uploads": []}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("", "event is required"),
        ("?event=", "event is empty"),
        ("?event=null", "event is required"),
        ("?event=nope", "query parameter event 'nope' is not a UUID"),
        (f"?event={EVENT}&event={EVENT}", "event is given 2 times"),
    ],
)
async def test_a_missing_bad_or_repeated_event_is_400(client: TestClient, query: str, named: str) -> None:
    response = await client.get(f"/uploads{query}")
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert named in (await response.json())["detail"]


# The query, from plain mappings


@pytest.mark.parametrize("value", [EVENT, EVENT.upper(), f'"{EVENT}"'])
def test_parse_uploads_query(value: str) -> None:
    assert parse_uploads_query(MultiDict([("event", value), ("other", "ignored")])) == uuid.UUID(EVENT)


@pytest.mark.parametrize(
    "pairs",
    [[], [("event", "")], [("event", "null")], [("event", "\u0661" * 32)], [("event", EVENT), ("event", EVENT)]],
)
def test_parse_uploads_query_refuses(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(Problem) as refused:
        parse_uploads_query(MultiDict(pairs))
    assert refused.value.status == 400 and "event" in refused.value.detail
