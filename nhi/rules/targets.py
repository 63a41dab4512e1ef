"""Pure rules on Postgres targets: admin DSNs, password references, secret prefixes and host
patterns. No I/O, so settings validation, the API schemas and the registry share them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import parse_qs, quote, unquote, urlsplit

from nhi.rules.policy import RuleViolation


def format_dsn(host: str, port: int, dbname: str, user: str | None = None) -> str:
    """`postgresql://[user@]host:port/dbname`, a socket directory percent-encoded as libpq
    takes it (the inverse of `parse_dsn`); never a password."""
    who = f"{user}@" if user else ""
    where = quote(host, safe="") if host.startswith("/") else host
    return f"postgresql://{who}{where}:{port}/{dbname}"


DEFAULT_PORT = 5432
_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$-]{0,62}$")
_DBNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
_SOCKET_DIR_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_SECRET_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}$"
)
_SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")
_NO_CREDENTIAL_IN_DSN = (
    "must not contain a password: name where it is with --password-env or --password-secret "
    "(password_env or password_secret in the API)"
)


@dataclass(frozen=True)
class ParsedDsn:
    """The parts of an admin DSN; it never has a password."""

    host: str
    port: int
    dbname: str
    admin_user: str


def parse_dsn(dsn: str, field_name: str = "dsn") -> ParsedDsn:
    """`postgresql://admin_user@host[:port]/dbname` (port 5432 by default).

    Refuses a DSN with a password (in the user part or as a parameter) and never quotes the
    DSN back, since it might hold one.

    Raises:
        RuleViolation: naming `field_name` and the part at fault.
    """
    try:
        url = urlsplit(dsn.strip())
    except ValueError:
        raise RuleViolation(
            field_name, "is not a URL such as postgresql://user@host:5432/db"
        ) from None
    userinfo, at, _ = url.netloc.rpartition("@")
    query = parse_qs(url.query, keep_blank_values=True)
    if (at and ":" in userinfo) or any(k.lower() in ("password", "passfile") for k in query):
        raise RuleViolation(field_name, _NO_CREDENTIAL_IN_DSN)
    if url.scheme not in ("postgresql", "postgres"):
        raise RuleViolation(field_name, "must start with postgresql://")
    if url.query or url.fragment:
        raise RuleViolation(
            field_name, "takes no parameters: give sslmode and connection_limit on their own"
        )
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise RuleViolation(field_name, "port must be a number between 1 and 65535")
    user = unquote(userinfo)
    if not at or not _USER_RE.fullmatch(user):
        raise RuleViolation(
            field_name, "must name the admin user: postgresql://admin_user@host:5432/db"
        )
    raw_host = url.netloc.rpartition("@")[2].rpartition(":")[0] or url.netloc.rpartition("@")[2]
    if raw_host.upper().startswith("%2F"):
        # A Unix socket directory, percent-encoded as libpq takes it: a worker next to its
        # database (and `nhi dev`'s embedded Postgres, which listens on a socket only).
        host = unquote(raw_host)
        if not _SOCKET_DIR_RE.fullmatch(host) or len(host) > 255:
            raise RuleViolation(field_name, "the socket directory must be an absolute path")
    else:
        host = url.hostname or ""
        if not host or not (_HOST_RE.fullmatch(host) or _is_ip(host)):
            raise RuleViolation(
                field_name, "must name the host: postgresql://admin_user@host:5432/db"
            )
    dbname = unquote(url.path[1:] if url.path.startswith("/") else url.path)
    if not _DBNAME_RE.fullmatch(dbname):
        raise RuleViolation(
            field_name, "must name one database: postgresql://admin_user@host:5432/db"
        )
    return ParsedDsn(host=host, port=port or DEFAULT_PORT, dbname=dbname, admin_user=user)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def validate_password_ref(ref: str, field_name: str = "password_ref") -> str:
    """`env:VARNAME` or `secret:<Secrets Manager ARN or name>`: where a password is, not it."""
    kind, sep, value = ref.partition(":")
    if sep and kind == "env" and _ENV_VAR_RE.fullmatch(value):
        return ref
    if (
        sep
        and kind == "secret"
        and (_SECRET_ARN_RE.fullmatch(value) or _SECRET_NAME_RE.fullmatch(value))
    ):
        return ref
    raise RuleViolation(field_name, "must be env:VARNAME or secret:<Secrets Manager ARN or name>")


def password_ref(password_env: str | None, password_secret: str | None) -> str:
    """The reference for exactly one of an environment variable or a secret."""
    if bool(password_env) == bool(password_secret):
        raise RuleViolation(
            "password_secret" if password_secret else "password_env",
            "give exactly one of password_env (--password-env) or password_secret "
            "(--password-secret)",
        )
    if password_env:
        if not _ENV_VAR_RE.fullmatch(password_env):
            raise RuleViolation("password_env", "is not an environment variable name")
        return f"env:{password_env}"
    password_secret = password_secret or ""
    if not (
        _SECRET_ARN_RE.fullmatch(password_secret) or _SECRET_NAME_RE.fullmatch(password_secret)
    ):
        raise RuleViolation("password_secret", "is not a Secrets Manager ARN or secret name")
    return f"secret:{password_secret}"


TARGET_PASSWORD_ENV_PREFIX = "NHI_TARGET_PASSWORD_"  # noqa: S105 - a name prefix, not a secret
_TARGET_ENV_RE = re.compile(r"^NHI_TARGET_PASSWORD_[A-Za-z0-9_]{1,200}$")
REQUIRED_SSLMODE = "verify-full"


def secret_name(where: str) -> str:
    """The secret's NAME in a `password_secret` (an ARN's part after `:secret:`, or the name)."""
    if where.startswith("arn:"):
        return where.split(":secret:", 1)[1] if ":secret:" in where else ""
    return where


def under_prefix(name: str, prefix: str) -> bool:
    """Whether a secret name lies under a prefix. Case-insensitively, to refuse on the safe
    side: whether a store matches names by case is its business, not ours."""
    return name.lower().startswith(prefix.lower())


def prefixes_overlap(a: str, b: str) -> bool:
    """Two secret prefixes of which one contains the other."""
    return under_prefix(a, b) or under_prefix(b, a)


def host_allowed(host: str, patterns: list[str]) -> bool:
    """`host` (a name, an address, or a Unix socket directory's absolute path) matches one of
    `patterns` (`fnmatch`, case-insensitive). A socket directory matches only patterns that
    are themselves absolute paths: `localhost` does not allow any socket on the worker's
    machine, `/var/run/postgresql` allows exactly that directory."""
    wanted = host.lower()
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if not pattern or wanted.startswith("/") != pattern.startswith("/"):
            continue
        if fnmatchcase(wanted, pattern):
            return True
    return False
