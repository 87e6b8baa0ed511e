"""Migrations: every revision upgrades, downgrades and upgrades again (the stairway)."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.script import ScriptDirectory

from prerec.__main__ import _alembic
from tests.conftest import with_database


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


def test_stairway(pg_server) -> None:  # type: ignore[no-untyped-def]
    base = pg_server.get_uri()

    async def fresh() -> str:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute("DROP DATABASE IF EXISTS stairway")
            await conn.execute("CREATE DATABASE stairway")
        finally:
            await conn.close()
        return with_database(base, "stairway")

    url = asyncio.run(fresh())
    config = _alembic(url)
    revisions = list(reversed(list(ScriptDirectory.from_config(config).walk_revisions())))
    assert len(revisions) >= 2
    for revision in revisions:
        command.upgrade(config, revision.revision)
        after_upgrade = asyncio.run(_tables(url))
        command.downgrade(config, revision.down_revision or "base")
        command.upgrade(config, revision.revision)
        assert asyncio.run(_tables(url)) == after_upgrade
    assert {"prerecordings", "events", "alembic_version"} <= asyncio.run(_tables(url))
    command.downgrade(config, "base")
    assert asyncio.run(_tables(url)) == {"alembic_version"}
