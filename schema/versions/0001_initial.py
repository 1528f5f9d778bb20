"""Initial schema: config, narinfos, nar_files.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_config"),
        sa.UniqueConstraint("key", name="uq_config_key"),
    )
    op.create_table(
        "narinfos",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("hash", sa.String(32), nullable=False),
        sa.Column("store_path", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("compression", sa.String(16), nullable=False),
        sa.Column("file_hash", sa.String(160), nullable=True),
        sa.Column("file_size", sa.BigInteger(), nullable=True),
        sa.Column("nar_hash", sa.String(160), nullable=False),
        sa.Column("nar_size", sa.BigInteger(), nullable=False),
        sa.Column("refs", sa.Text(), nullable=False),
        sa.Column("deriver", sa.Text(), nullable=True),
        sa.Column("system", sa.String(64), nullable=True),
        sa.Column("ca", sa.Text(), nullable=True),
        sa.Column("signatures", sa.Text(), nullable=False),
        sa.Column("nar_key", sa.String(64), nullable=False),
        sa.Column("upstream_url", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_accessed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_narinfos"),
        sa.UniqueConstraint("hash", name="uq_narinfos_hash"),
    )
    op.create_index(
        "ix_narinfos_nar_key_compression", "narinfos", ["nar_key", "compression"]
    )
    op.create_index("ix_narinfos_last_accessed_at", "narinfos", ["last_accessed_at"])
    op.create_table(
        "nar_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("compression", sa.String(16), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("nar_hash", sa.String(160), nullable=False),
        sa.Column("nar_size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_accessed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_nar_files"),
        sa.UniqueConstraint(
            "hash", "compression", name="uq_nar_files_hash_compression"
        ),
    )
    op.create_index("ix_nar_files_last_accessed_at", "nar_files", ["last_accessed_at"])


def downgrade() -> None:
    op.drop_table("nar_files")
    op.drop_table("narinfos")
    op.drop_table("config")
