"""uploads: drop the unused `assembled` column

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

0003 gave each upload an `assembled` column for the blob's name once its pieces were put
together. Nothing ever wrote it: the name is deterministic instead (the folder backend names the
blob after the upload, S3 completes the multipart upload at the key recorded in `store_ref`), so a
finisher that died after assembling is found by that name. A column nobody writes only misleads
whoever reads the schema.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_column("uploads", "assembled")


def downgrade() -> None:
    op.add_column("uploads", sa.Column("assembled", sa.Text()))
