"""Alembic environment for ncps.

ncps runs migrations in code with a live connection passed in
``config.attributes["connection"]``; developers may also run ``alembic -c
schema/alembic.ini`` with ``-x url=<sqlalchemy url>``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ncps.db.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif context.is_offline_mode():
    context.configure(
        url=context.get_x_argument(as_dictionary=True).get("url", "sqlite://"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    url = context.get_x_argument(as_dictionary=True)["url"]
    with create_engine(url).connect() as conn:
        context.configure(
            connection=conn, target_metadata=metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
