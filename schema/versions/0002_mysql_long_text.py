"""MySQL/MariaDB: references and signatures as MEDIUMTEXT (TEXT stops at 64 KiB).

Other databases have no such limit on TEXT; there this migration does nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("refs", "signatures")


def upgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for column in _COLUMNS:
        op.alter_column(
            "narinfos",
            column,
            existing_type=sa.Text(),
            type_=mysql.MEDIUMTEXT(),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for column in _COLUMNS:
        op.alter_column(
            "narinfos",
            column,
            existing_type=mysql.MEDIUMTEXT(),
            type_=sa.Text(),
            existing_nullable=False,
        )
