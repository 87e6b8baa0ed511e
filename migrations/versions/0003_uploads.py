"""uploads: resumable uploads in progress, their stored pieces and the tail kept in the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Any replica continues an upload another began: the offset that is durable, the lease that lets
one writer at a time move it (fenced by `generation`) and the pieces of bytes in the store all
live here, in the database every replica shares. Every time is database time (now()), never a
replica's clock.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from prerec.model: a migration must keep meaning what it
# meant when it ran, whatever the code says later.
STATES = ("receiving", "finishing", "finished", "failed", "cancelled", "expired")
IN_PROGRESS = ("receiving", "finishing")


def _among(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def upgrade() -> None:
    op.create_table(
        "uploads",
        # uuid4, made by the caller (S3 needs it before the row exists): 122 random bits, as the
        # upload's URL is a capability.
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("event", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("start", postgresql.TIMESTAMP(timezone=False, precision=6), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        # > 0, not >= 0: a prerecording has at least one byte (0001), so an empty upload could
        # never finish.
        sa.Column("length", sa.BigInteger(), sa.CheckConstraint("length > 0", name="uploads_length"), nullable=False),
        # The offset promised to clients: bytes below it are durable in the store.
        sa.Column("durable", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("state", sa.Text(), server_default="receiving", nullable=False),
        # tus | ietf: shapes the result replayed to a client that lost the last answer.
        sa.Column("protocol", sa.Text(), nullable=False),
        # The preconditions as given at creation, checked again inside the finishing commit.
        sa.Column("if_match", sa.Text()),
        sa.Column("if_none_match", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("digests", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("store_ref", sa.Text()),  # S3: the multipart UploadId; NULL on the filesystem
        sa.Column("assembled", sa.Text()),  # the blob name once assembled (S3: Complete done)
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("progressed_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False),
        # In progress: when it expires unless it progresses. Ended: when the row (the 410, the
        # replayable result) goes.
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        # The fencing token: +1 on every lease change; a write names the generation it holds.
        sa.Column("generation", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.Text()),
        # Backend pid of the holder's long-lived connection: once it is gone from
        # pg_stat_activity the holder is dead, and the lease is taken without waiting.
        sa.Column("lease_pid", sa.Integer()),
        sa.Column("lease_expires", postgresql.TIMESTAMP(timezone=True)),
        sa.Column("released_clean", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("segment_generation", sa.BigInteger()),
        sa.Column("next_part", sa.Integer(), server_default="1", nullable=False),
        sa.Column("result", postgresql.JSONB()),  # {"status", "etag", "body"} of the final answer
        sa.CheckConstraint("durable BETWEEN 0 AND length", name="uploads_durable"),
        sa.CheckConstraint(_among("state", STATES), name="uploads_state"),
        sa.CheckConstraint(_among("protocol", ("tus", "ietf")), name="uploads_protocol"),
        # Only a complete upload may finish, or be on its way to finishing.
        sa.CheckConstraint("state NOT IN ('finishing', 'finished') OR durable = length", name="uploads_complete"),
        # An ended upload answers with what it answered last: that answer must be there.
        sa.CheckConstraint("state NOT IN ('finished', 'failed') OR result IS NOT NULL", name="uploads_result"),
        # A lease is an owner with an expiry; the pid is optional (without it, only expiry frees it).
        sa.CheckConstraint(
            "(lease_owner IS NULL) = (lease_expires IS NULL) AND (lease_pid IS NULL OR lease_owner IS NOT NULL)",
            name="uploads_lease",
        ),
        sa.CheckConstraint("next_part >= 1", name="uploads_next_part"),
    )
    # GET /uploads?event=: the uploads in progress of one event.
    op.create_index(
        "uploads_in_progress",
        "uploads",
        ["event", "start"],
        postgresql_where=sa.text(_among("state", IN_PROGRESS)),
    )
    # The sweeper: due uploads, and ended rows past their keeping time.
    op.create_index("uploads_expires", "uploads", ["expires_at"])

    op.create_table(
        "upload_pieces",  # filesystem: segment files; S3: parts
        sa.Column("upload_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("uploads.id", ondelete="CASCADE")),
        sa.Column("start", sa.BigInteger(), sa.CheckConstraint("start >= 0", name="upload_pieces_start")),
        sa.Column("size", sa.BigInteger(), sa.CheckConstraint("size > 0", name="upload_pieces_size"), nullable=False),
        # The generation that wrote the piece: a segment file is named after it.
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("number", sa.Integer()),  # S3 part number
        sa.Column("etag", sa.Text()),  # S3 part ETag
        sa.PrimaryKeyConstraint("upload_id", "start"),
    )

    op.create_table(
        # S3: the bytes past the last part, below the store's minimum part size. Written in the
        # transaction that moves the offset, so tail and offset never disagree.
        "upload_tails",
        sa.Column(
            "upload_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("uploads.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "start", sa.BigInteger(), sa.CheckConstraint("start >= 0", name="upload_tails_start"), nullable=False
        ),
        sa.Column("data", postgresql.BYTEA(), nullable=False),
    )
    # Audio does not compress: store it out of line without trying.
    op.execute("ALTER TABLE upload_tails ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("upload_tails")
    op.drop_table("upload_pieces")
    op.drop_index("uploads_expires", table_name="uploads")
    op.drop_index("uploads_in_progress", table_name="uploads")
    op.drop_table("uploads")
