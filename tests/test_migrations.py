"""Migrations: every revision upgrades, downgrades and upgrades again (the stairway)."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.script import ScriptDirectory

from prerec.__main__ import _alembic
from tests.conftest import tables


def test_stairway(blank_database_url: str) -> None:
    url = blank_database_url
    config = _alembic(url)
    revisions = list(reversed(list(ScriptDirectory.from_config(config).walk_revisions())))
    assert len(revisions) >= 2
    for revision in revisions:
        command.upgrade(config, revision.revision)
        after_upgrade = asyncio.run(tables(url))
        command.downgrade(config, revision.down_revision or "base")
        command.upgrade(config, revision.revision)
        assert asyncio.run(tables(url)) == after_upgrade
    assert {"prerecordings", "events", "alembic_version"} <= asyncio.run(tables(url))
    command.downgrade(config, "base")
    assert asyncio.run(tables(url)) == {"alembic_version"}


def test_two_replicas_migrating_at_once_both_succeed_with_one_schema(blank_database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess

    from tests.conftest import ROOT

    url = blank_database_url
    env = {**os.environ, "PREREC_DATABASE_URL": url, "PREREC_DATA_DIR": str(tmp_path)}
    subprocess.run(["make", "--no-print-directory", "install"], cwd=ROOT, env=env, check=True, capture_output=True)
    runs = [
        subprocess.Popen(
            ["make", "--no-print-directory", "migrate"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # Exactly one of them applied the revisions; the other found the schema at head.
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1, outputs

    async def versions() -> list[str]:
        conn = await asyncpg.connect(url)
        try:
            return [row["version_num"] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
        finally:
            await conn.close()

    head = ScriptDirectory.from_config(_alembic(url)).get_current_head()
    assert asyncio.run(versions()) == [head]
    assert {"prerecordings", "events"} <= asyncio.run(tables(url))
