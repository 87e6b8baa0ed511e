"""Upload integrity: Content-MD5, Repr-Digest and Content-Digest are checked against the body."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.conftest import EVENT, blob_files, ogg, tmp_files

KEY = f"/prerecordings/{EVENT}/2024-01-01T00:00"
OGG = {"Content-Type": "audio/ogg"}
OLD = ogg(5000, b"o")
NEW = ogg(7000, b"n")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = {
    "Content-MD5": b64(hashlib.md5(NEW).digest()),
    "Repr-Digest": f"sha-256=:{b64(hashlib.sha256(NEW).digest())}:",
    "Content-Digest": f"sha-512=:{b64(hashlib.sha512(NEW).digest())}:",
}
BAD = {
    "Content-MD5": b64(hashlib.md5(OLD).digest()),
    "Repr-Digest": f"sha-256=:{b64(hashlib.sha256(OLD).digest())}:",
    "Content-Digest": f"sha-512=:{b64(hashlib.sha512(OLD).digest())}:",
}


@pytest.fixture
async def old_version(client):  # type: ignore[no-untyped-def]
    assert (await client.put(KEY, data=OLD, headers=OGG)).status == 201


@pytest.mark.parametrize("header", list(GOOD))
async def test_matching_digest_is_accepted(client, old_version, header: str) -> None:
    response = await client.put(KEY, data=NEW, headers={**OGG, header: GOOD[header]})
    assert response.status == 204
    assert await (await client.get(KEY)).read() == NEW


@pytest.mark.parametrize("header", list(BAD))
async def test_mismatching_digest_is_400_and_changes_nothing(client, settings, old_version, header: str) -> None:
    response = await client.put(KEY, data=NEW, headers={**OGG, header: BAD[header]})
    assert response.status == 400
    assert header in (await response.json())["detail"]
    assert await (await client.get(KEY)).read() == OLD
    assert len(blob_files(settings)) == 1 and tmp_files(settings) == []


async def test_all_digests_together(client, old_version) -> None:
    assert (await client.put(KEY, data=NEW, headers={**OGG, **GOOD})).status == 204
    response = await client.put(KEY, data=NEW, headers={**OGG, **GOOD, "Content-MD5": BAD["Content-MD5"]})
    assert response.status == 400


async def test_both_algorithms_in_one_field_are_checked(client, old_version) -> None:
    value = f"sha-256=:{b64(hashlib.sha256(NEW).digest())}:, sha-512=:{b64(hashlib.sha512(OLD).digest())}:"
    assert (await client.put(KEY, data=NEW, headers={**OGG, "Repr-Digest": value})).status == 400


@pytest.mark.parametrize("value", ["md5=:AAAAAAAAAAAAAAAAAAAAAA==:", "unixsum=:AAAA:", "crc32c=:AAAAAA==:"])
async def test_unsupported_algorithms_alone_are_ignored(client, value: str) -> None:
    assert (await client.put(KEY, data=NEW, headers={**OGG, "Repr-Digest": value})).status == 201


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Content-MD5", "not base64!"),
        ("Content-MD5", b64(b"short")),
        ("Repr-Digest", "sha-256=AAAA"),
        ("Content-Digest", "sha-256=:AAAA"),
        ("Repr-Digest", "=:AAAA:"),
    ],
)
async def test_malformed_digest_header_is_400_naming_it(client, header: str, value: str) -> None:
    response = await client.put(KEY, data=NEW, headers={**OGG, header: value})
    assert response.status == 400
    assert header in (await response.json())["detail"]
    assert (await client.get(KEY)).status == 404
