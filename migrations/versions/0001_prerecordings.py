"""prerecordings: one row per stored upload, pointing at its blob file

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prerecordings",
        sa.Column("event", postgresql.UUID(as_uuid=True), nullable=False),
        # A naive time in the event's own timezone, to the microsecond.
        sa.Column("start", postgresql.TIMESTAMP(timezone=False, precision=6), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), sa.CheckConstraint("size > 0"), nullable=False),
        sa.Column("sha256", postgresql.BYTEA(), sa.CheckConstraint("octet_length(sha256) = 32"), nullable=False),
        # Path of the blob file relative to the storage folder; never reused.
        sa.Column("blob", sa.Text(), nullable=False, unique=True),
        sa.Column("modified", postgresql.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("event", "start"),
    )


def downgrade() -> None:
    op.drop_table("prerecordings")
