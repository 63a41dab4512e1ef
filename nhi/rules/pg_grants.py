"""Pure rules for Postgres NHIs: which grants a scope may ask for, role names, role markers.

No I/O here, so the API (to refuse a request before anything exists) and the Postgres provider
(to re-check just before it builds SQL) share exactly the same rules. Identifiers are held to
plain lower-case names, so nothing a requester types can change the shape of a statement even
before `psycopg.sql.Identifier` quotes it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase

from models.contracts import ScopeStatement
from nhi import MANAGED_BY
from nhi.rules.policy import PolicyRules, RuleViolation, check_statement_count

IDENTIFIER_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_WORD_RE = re.compile(r"[A-Z_]+( [A-Z_]+)*")

TABLE_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)
SCHEMA_PRIVILEGES = frozenset({"USAGE"})
PRIVILEGES = TABLE_PRIVILEGES | SCHEMA_PRIVILEGES
READ_ONLY_PRIVILEGES = frozenset({"SELECT", "USAGE", "REFERENCES"})

# Role attributes are what a role *is*, not something a grant can hand out; a request naming one
# is either a mistake or an attempt to get more than table access.
_ROLE_ATTRIBUTES = frozenset(
    {
        "SUPERUSER",
        "NOSUPERUSER",
        "CREATEROLE",
        "NOCREATEROLE",
        "CREATEDB",
        "NOCREATEDB",
        "BYPASSRLS",
        "NOBYPASSRLS",
        "REPLICATION",
        "NOREPLICATION",
        "LOGIN",
        "NOLOGIN",
        "INHERIT",
        "NOINHERIT",
        "PASSWORD",
        "CONNECTION LIMIT",
        "VALID UNTIL",
        "ADMIN OPTION",
        "GRANT OPTION",
    }
)
_OWNERSHIP = frozenset({"OWNER", "OWNERSHIP"})
_ALL = frozenset({"ALL", "ALL PRIVILEGES"})
_NEVER = frozenset({"CREATE", "TEMP", "TEMPORARY", "CONNECT", "EXECUTE", "SET", "ALTER SYSTEM"})

GROUP_NAME_MAX = 61  # leaves room for the "_a"/"_b" suffix within Postgres' 63
MAX_GRANTS = 200


@dataclass(frozen=True)
class Grant:
    """One privilege on one object. `table` is None for a whole schema: USAGE on the schema,
    or a table privilege on ALL TABLES IN SCHEMA (written `schema.*`)."""

    privilege: str
    schema: str
    table: str | None = None

    @property
    def on_schema(self) -> bool:
        """Whether this is a schema privilege (USAGE) rather than a table privilege."""
        return self.privilege in SCHEMA_PRIVILEGES


def _privilege(where: str, action: str) -> str:
    upper = action.upper()
    if upper in PRIVILEGES:
        return upper
    name = " ".join(upper.split())
    if name in _ROLE_ATTRIBUTES:
        raise RuleViolation(where, f"{action!r} is a role attribute, never granted")
    if name in _OWNERSHIP:
        raise RuleViolation(where, f"{action!r}: ownership is never handed to an NHI")
    if name in _ALL:
        raise RuleViolation(where, f"{action!r} is refused: name each privilege the agent needs")
    if name in _NEVER:
        raise RuleViolation(where, f"{action!r} is never granted to an NHI")
    if not _WORD_RE.fullmatch(upper):
        raise RuleViolation(
            where, f"{action!r} is not one privilege name such as 'SELECT' (one per entry)"
        )
    raise RuleViolation(
        where,
        f"{action!r} is not a Postgres privilege an NHI may hold "
        f"(one of {', '.join(sorted(PRIVILEGES))})",
    )


def _resource(where: str, resource: str) -> tuple[str, str | None]:
    """(schema, table) with table None for `schema.*` and for a bare schema."""
    parts = resource.split(".")
    bad = RuleViolation(
        where,
        f"{resource!r} is not a plain identifier such as 'public.documents', 'public.*' "
        "or 'public' (lower case letters, digits and '_')",
    )
    if len(parts) > 2 or not IDENTIFIER_RE.fullmatch(parts[0]):
        raise bad
    if parts[0].startswith("pg_") or parts[0] == "information_schema":
        raise RuleViolation(where, f"{resource!r} is in a system schema, never granted")
    if len(parts) == 1:
        return parts[0], None
    if parts[1] == "*":
        return parts[0], None
    if not IDENTIFIER_RE.fullmatch(parts[1]):
        raise bad
    return parts[0], parts[1]


def _matches(privilege: str, rule: str) -> bool:
    # Policies may be shared with AWS and hold IAM patterns ("iam:*"): those never match a
    # Postgres privilege, while "*" matches every one.
    return fnmatchcase(privilege, rule.strip().upper())


def validate_grants(scope: list[ScopeStatement], rules: PolicyRules) -> list[str]:
    """Refuse anything but plain table/schema privileges on plain identifiers; return the
    privileges the policy marks sensitive (they need an approver), upper case, each once.

    Raises:
        RuleViolation: naming the statement, the entry and the rule it breaks.
    """
    check_statement_count(scope)
    sensitive: list[str] = []
    for i, statement in enumerate(scope):
        privileges: list[str] = []
        for j, action in enumerate(statement.actions):
            where = f"scope[{i}].actions[{j}]"
            privilege = _privilege(where, action)
            for rule in rules.forbidden_actions:
                if _matches(privilege, rule):
                    raise RuleViolation(
                        where, f"{privilege!r} is forbidden by the {rules.label} policy ({rule!r})"
                    )
            if privilege not in sensitive and any(
                _matches(privilege, rule) for rule in rules.sensitive_actions
            ):
                sensitive.append(privilege)
            privileges.append(privilege)
        table_privileges = [p for p in privileges if p in TABLE_PRIVILEGES]
        for j, resource in enumerate(statement.resources):
            where = f"scope[{i}].resources[{j}]"
            _resource(where, resource)
            if "." not in resource and table_privileges:
                raise RuleViolation(
                    where,
                    f"{resource!r} names a schema, which only takes USAGE; "
                    f"{table_privileges[0]} needs '{resource}.<table>' or '{resource}.*'",
                )
    return sensitive


def parse_grants(scope: list[ScopeStatement]) -> list[Grant]:
    """The grants a validated scope asks for, each once, in the order asked.

    USAGE on a `schema.table` resource means USAGE on its schema. USAGE for the schemas of
    table grants is not added here; the provider grants it alongside.

    Raises:
        RuleViolation: if the scope was not valid (call `validate_grants` first).
    """
    grants: dict[Grant, None] = {}
    for i, statement in enumerate(scope):
        privileges = [
            _privilege(f"scope[{i}].actions[{j}]", a) for j, a in enumerate(statement.actions)
        ]
        for j, resource in enumerate(statement.resources):
            schema, table = _resource(f"scope[{i}].resources[{j}]", resource)
            for privilege in privileges:
                if privilege in SCHEMA_PRIVILEGES:
                    grants[Grant(privilege, schema)] = None
                elif "." not in resource:
                    raise RuleViolation(
                        f"scope[{i}].resources[{j}]",
                        f"{resource!r} names a schema, which only takes USAGE",
                    )
                else:
                    grants[Grant(privilege, schema, table)] = None
    if len(grants) > MAX_GRANTS:
        raise RuleViolation("scope", f"at most {MAX_GRANTS} grants")
    return list(grants)


def is_read_only(scope: list[ScopeStatement]) -> bool:
    """Whether the scope only reads (SELECT, USAGE, REFERENCES): its logins then open
    read-only transactions by default."""
    return all(a.strip().upper() in READ_ONLY_PRIVILEGES for s in scope for a in s.actions)


def group_name(prefix: str, agent_name: str, nhi_id: uuid.UUID) -> str:
    """Deterministic group role name (<= 61 chars, plain identifier): retries find what an
    earlier try made, and `prefix + "_"` marks every role this service creates."""
    agent = re.sub(r"[^a-z0-9_]+", "_", agent_name.lower()).strip("_")
    budget = GROUP_NAME_MAX - len(prefix) - 2 - 32
    if budget < 1 or not IDENTIFIER_RE.fullmatch(prefix):
        raise ValueError(f"name prefix {prefix!r} cannot start a Postgres role name")
    agent = agent[:budget].rstrip("_") or "agent"
    return f"{prefix}_{agent}_{nhi_id.hex}"


def has_our_shape(prefix: str, name: str) -> bool:
    """Whether a role is named like the ones this service makes (`<prefix>_<agent>_<id hex>`,
    or one of its logins): such a role without our marker is reported, anything else is not
    ours to mention (an admin role called `nhi_admin`, say)."""
    return re.fullmatch(rf"{re.escape(prefix)}_[a-z0-9_]+_[0-9a-f]{{32}}(_[ab])?", name) is not None


def role_names(group: str) -> tuple[str, str]:
    """The two LOGIN roles of a group, used alternately by rotation."""
    if len(group) > GROUP_NAME_MAX or not IDENTIFIER_RE.fullmatch(group):
        raise ValueError(
            f"{group!r} is not a plain identifier of at most {GROUP_NAME_MAX} characters"
        )
    return f"{group}_a", f"{group}_b"


def managed_comment(
    *,
    nhi_id: uuid.UUID | str,
    agent_id: uuid.UUID | str,
    part: str,
    created_at: datetime,
    task_credential_id: uuid.UUID | str | None = None,
) -> str:
    """The role COMMENT marking a role as ours. Postgres keeps no role creation time, so the
    comment carries it for sweeps (their propagation grace needs it). A task credential's
    login (`part="task"`) also names its credential, so sweeps and the reaper tie it to its
    row and to its parent NHI."""
    if part not in ("group", "login", "task"):
        raise ValueError(f"part must be 'group', 'login' or 'task', not {part!r}")
    if (part == "task") != (task_credential_id is not None):
        raise ValueError("task_credential_id is required for part='task' and only for it")
    text = (
        f"managed-by={MANAGED_BY};nhi-id={uuid.UUID(str(nhi_id))};"
        f"agent-id={uuid.UUID(str(agent_id))};part={part};created-at={created_at.isoformat()}"
    )
    if task_credential_id is not None:
        text += f";task-credential-id={uuid.UUID(str(task_credential_id))}"
    return text


def parse_comment(text: str | None) -> dict[str, str] | None:
    """The fields of a managed comment, or None when the role is not marked as ours."""
    if not text:
        return None
    fields: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
    if fields.get("managed-by") != MANAGED_BY or "nhi-id" not in fields:
        return None
    return fields
