"""PREREC_WRITE_TOKEN: writes need the bearer token, reads stay open."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from prerec.app import create_app
from tests.conftest import EVENT, ogg, put_head

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}
TOKEN = "s3cret-token"


@pytest.fixture
async def guarded(aiohttp_client, settings, database_url):  # type: ignore[no-untyped-def]
    return await aiohttp_client(create_app(dataclasses.replace(settings, write_token=TOKEN), database_url))


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"])
async def test_writes_without_the_token_are_401_with_a_challenge(guarded, authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        await guarded.put(KEY, data=ogg(100), headers={**OGG, **headers}),
        await guarded.delete(KEY, headers=headers),
    ):
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.content_type == "application/problem+json"
    assert (await guarded.get(KEY)).status == 404


async def test_writes_with_the_token_work_and_reads_stay_open(guarded) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await guarded.put(KEY, data=ogg(100), headers={**OGG, **auth})).status == 201
    assert (await guarded.get(KEY)).status == 200
    assert (await guarded.head(KEY)).status == 200
    assert (await guarded.get(f"/prerecordings/{EVENT}")).status == 200
    assert (await guarded.delete(KEY, headers=auth)).status == 204


async def test_a_refused_upload_never_sends_its_body(guarded) -> None:
    reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
    writer.write(put_head(KEY, 50_000_000, "Expect: 100-continue"))
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()


async def test_without_a_token_writes_are_open(client) -> None:
    assert (await client.put(KEY, data=ogg(100), headers=OGG)).status == 201


async def test_a_token_that_is_not_ascii_is_401_not_a_crash(guarded) -> None:
    reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
    writer.write(f"DELETE {KEY} HTTP/1.1\r\nHost: x\r\n".encode() + b"Authorization: Bearer \xff\xfe\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()
