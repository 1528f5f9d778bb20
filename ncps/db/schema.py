"""The database schema, in SQLAlchemy Core, dialect-neutral.

Every indexed text column is a bounded ``String(n)``.  Migrations live in the
top-level ``schema/`` directory (package ``ncps_schema``); a test checks that
they and this model do not drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

# Text that may exceed 64 KiB (a store path with thousands of references):
# MySQL's TEXT stops there, so it gets MEDIUMTEXT (16 MiB).
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

config = Table(
    "config",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False),
    Column("value", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=True),
    UniqueConstraint("key"),
)

# One row per cached narinfo, as fetched and verified from an upstream.  ``url``
# is our canonical ``nar/<nar_key>.nar[.ext]``; ``upstream_url`` is where the NAR
# is fetched from.  ``refs`` holds space-separated store path base names and
# ``signatures`` the upstream ``Sig`` values, one per line.
narinfos = Table(
    "narinfos",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hash", String(32), nullable=False),
    Column("store_path", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("compression", String(16), nullable=False),
    Column("file_hash", String(160), nullable=True),
    Column("file_size", BigInteger, nullable=True),
    Column("nar_hash", String(160), nullable=False),
    Column("nar_size", BigInteger, nullable=False),
    Column("refs", LongText, nullable=False),
    Column("deriver", Text, nullable=True),
    Column("system", String(64), nullable=True),
    Column("ca", Text, nullable=True),
    Column("signatures", LongText, nullable=False),
    Column("nar_key", String(64), nullable=False),
    Column("upstream_url", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_accessed_at", DateTime, nullable=False),
    UniqueConstraint("hash"),
    Index(None, "nar_key", "compression"),
    Index(None, "last_accessed_at"),
)

# One row per NAR object whose bytes are whole, verified and committed to
# storage.  The row is written only after the object is in place.
nar_files = Table(
    "nar_files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hash", String(64), nullable=False),
    Column("compression", String(16), nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("nar_hash", String(160), nullable=False),
    Column("nar_size", BigInteger, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_accessed_at", DateTime, nullable=False),
    UniqueConstraint("hash", "compression"),
    Index(None, "last_accessed_at"),
)

__all__ = ["config", "metadata", "nar_files", "narinfos"]
