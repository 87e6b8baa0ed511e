"""Alembic environment: async engine on asyncpg, one advisory lock around every run.

The lock makes `make migrate` safe when several replicas run it at the same moment: the
second waits, then finds the schema already at head and does nothing.
"""

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from prerec.db import MIGRATION_LOCK, sqlalchemy_url

config = context.config


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url is None:
        from prerec.__main__ import resolve_database_url
        from prerec.config import Settings

        url = resolve_database_url(Settings.from_env())
    return sqlalchemy_url(url)


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=False)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("prerec migrations run online only: they take an advisory lock.")
asyncio.run(run_online())
