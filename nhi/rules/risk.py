"""Pure rules of an agent's footprint: how its scopes expand into permissions and data stores,
which of them are sensitive or write, and the risk score with the reasons that make it up.

No I/O, no clock (the caller passes `now`), no settings: the same inventory gives the same
footprint and the same score, so a score can be tested exactly and compared between requests.

The score is a sum of independent, capped parts (`WEIGHTS`), then capped at 100. Each part
only grows with what it counts, so adding a permission, an invoker or an expiry never lowers
a score.

code              points    cap  counted when
sensitive_write   10 each   30   a distinct sensitive permission that changes data or access:
                                 an AWS action the policy's `sensitive_actions` match whose
                                 verb is not a read (`READ_VERBS`), or a Postgres privilege
                                 other than SELECT/USAGE/REFERENCES, per object
sensitive_read    4 each    12   a distinct sensitive permission that only reads
                                 (`secretsmanager:GetSecretValue`, `kms:Decrypt`)
production_data   20        20   the agent is in `prod` and reaches at least one data store
wide_resource     5 each    15   a resource `*`, an ARN whose resource part is only
                                 wildcards, or a Postgres `schema.*`
invokers          2 each    10   a distinct person, group, service or schedule that can make
                                 the agent act, directly or through the chain of agents (and
                                 the agent's declared invokers)
chained_agents    4 each    12   another agent that can make this one act, directly or not
long_expiry       5 or 10   10   the latest expiry is over 30 days away (10: over 90 days)
no_backup_owner   10        10   the agent has no backup owner
stale_nhi         5 each    15   a live NHI not used for 30 days (never used: since it became
                                 active), or of a rotatable kind and not rotated for 90 days
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from models.contracts import ScopeStatement
from nhi.rules.pg_grants import READ_ONLY_PRIVILEGES, SCHEMA_PRIVILEGES, parse_grants
from nhi.rules.policy import actions_overlap

# ---- weights ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """Points per occurrence, and the most a part can add."""

    each: int
    cap: int


WEIGHTS: dict[str, Weight] = {
    "sensitive_write": Weight(10, 30),
    "sensitive_read": Weight(4, 12),
    "production_data": Weight(20, 20),
    "wide_resource": Weight(5, 15),
    "invokers": Weight(2, 10),
    "chained_agents": Weight(4, 12),
    "long_expiry": Weight(5, 10),
    "no_backup_owner": Weight(10, 10),
    "stale_nhi": Weight(5, 15),
}
MAX_SCORE = 100
LONG_EXPIRY = timedelta(days=30)
VERY_LONG_EXPIRY = timedelta(days=90)
STALE_UNUSED = timedelta(days=30)
STALE_UNROTATED = timedelta(days=90)
PRODUCTION = "prod"

# An AWS action reads when its verb starts with one of these (`s3:GetObject`, `s3:List*`);
# anything else, wildcards such as `s3:*` included, may change data or access.
READ_VERBS = (
    "Get",
    "List",
    "Describe",
    "Head",
    "Query",
    "Scan",
    "Search",
    "Select",
    "BatchGet",
    "Lookup",
    "View",
    "Decrypt",
    "Verify",
)
_WILDCARD_ONLY_RE = re.compile(r"[*?/]+")


# ---- expanding scopes ------------------------------------------------------------------------


@dataclass(frozen=True)
class NhiScope:
    """What one live NHI (or a task credential's parent) grants, and its policy's catalogue."""

    nhi_id: str
    platform: str
    scope: Sequence[ScopeStatement]
    sensitive_rules: Sequence[str] = ()
    target: str | None = None


@dataclass(frozen=True)
class AwsGrant:
    """One action pattern with every resource pattern it is granted on."""

    action: str
    resources: tuple[str, ...]
    nhi_ids: tuple[str, ...]
    sensitive: bool
    write: bool


@dataclass(frozen=True)
class PgGrant:
    """The privileges held on one Postgres object (`schema.table`, `schema.*` or `schema`)."""

    target: str
    object: str
    privileges: tuple[str, ...]
    sensitive: tuple[str, ...]
    nhi_ids: tuple[str, ...]


def is_write_action(action: str) -> bool:
    """Whether an IAM action pattern may change data or access (see `READ_VERBS`)."""
    verb = action.partition(":")[2]
    return not verb.startswith(READ_VERBS)


def is_write_privilege(privilege: str) -> bool:
    """Whether a Postgres privilege may change data (anything but SELECT, USAGE, REFERENCES)."""
    return privilege not in READ_ONLY_PRIVILEGES


def is_wide_resource(resource: str) -> bool:
    """`*`, or an ARN whose resource part is only wildcards (`arn:aws:s3:::*`)."""
    if resource == "*":
        return True
    parts = resource.split(":", 5)
    return len(parts) == 6 and bool(_WILDCARD_ONLY_RE.fullmatch(parts[5]))


def _pg_sensitive(privilege: str, rules: Iterable[str]) -> bool:
    # As nhi.rules.pg_grants matches policy entries: IAM patterns never match, `*` matches all.
    return any(fnmatchcase(privilege, rule.strip().upper()) for rule in rules)


def expand_aws(scopes: Iterable[NhiScope]) -> list[AwsGrant]:
    """The union of the AWS scopes by action (IAM actions are case-insensitive: merged on the
    lower-cased name, shown as first asked), sorted by action."""
    names: dict[str, str] = {}
    resources: dict[str, set[str]] = {}
    sources: dict[str, set[str]] = {}
    sensitive: dict[str, bool] = {}
    for item in scopes:
        for statement in item.scope:
            for action in statement.actions:
                key = action.lower()
                names.setdefault(key, action)
                resources.setdefault(key, set()).update(statement.resources)
                sources.setdefault(key, set()).add(item.nhi_id)
                marked = any(actions_overlap(action, rule) for rule in item.sensitive_rules)
                sensitive[key] = sensitive.get(key, False) or marked
    return [
        AwsGrant(
            action=names[key],
            resources=tuple(sorted(resources[key])),
            nhi_ids=tuple(sorted(sources[key])),
            sensitive=sensitive[key],
            write=is_write_action(names[key]),
        )
        for key in sorted(names)
    ]


def expand_postgres(scopes: Iterable[NhiScope]) -> list[PgGrant]:
    """The union of the Postgres scopes by target and object, with the USAGE on each table's
    schema that the provider grants alongside; sorted by target and object."""
    privileges: dict[tuple[str, str], set[str]] = {}
    sensitive: dict[tuple[str, str], set[str]] = {}
    sources: dict[tuple[str, str], set[str]] = {}

    def add(key: tuple[str, str], privilege: str, item: NhiScope) -> None:
        privileges.setdefault(key, set()).add(privilege)
        sources.setdefault(key, set()).add(item.nhi_id)
        marked = sensitive.setdefault(key, set())
        if _pg_sensitive(privilege, item.sensitive_rules):
            marked.add(privilege)

    for item in scopes:
        target = item.target or ""
        for grant in parse_grants(list(item.scope)):
            if grant.privilege in SCHEMA_PRIVILEGES:
                add((target, grant.schema), grant.privilege, item)
                continue
            add((target, f"{grant.schema}.{grant.table or '*'}"), grant.privilege, item)
            add((target, grant.schema), "USAGE", item)
    return [
        PgGrant(
            target=key[0],
            object=key[1],
            privileges=tuple(sorted(privileges[key])),
            sensitive=tuple(sorted(sensitive[key])),
            nhi_ids=tuple(sorted(sources[key])),
        )
        for key in sorted(privileges)
    ]


@dataclass(frozen=True)
class Stores:
    """Data stores the permissions reach."""

    s3_buckets: tuple[str, ...]
    dynamodb_tables: tuple[str, ...]
    postgres: tuple[tuple[str, str, tuple[str, ...]], ...]  # (target, schema, tables)

    @property
    def count(self) -> int:
        return len(self.s3_buckets) + len(self.dynamodb_tables) + len(self.postgres)


def data_stores(aws: Iterable[AwsGrant], postgres: Iterable[PgGrant]) -> Stores:
    """S3 buckets and DynamoDB tables named by resource ARNs (`*` when an S3 or DynamoDB action
    is granted on every resource), and Postgres schemas with their tables."""
    buckets: set[str] = set()
    tables: set[str] = set()
    for grant in aws:
        service = grant.action.partition(":")[0].lower()
        for resource in grant.resources:
            if resource == "*":
                if service in ("s3", "*"):
                    buckets.add("*")
                if service in ("dynamodb", "*"):
                    tables.add("*")
                continue
            parts = resource.split(":", 5)
            if len(parts) != 6:
                continue
            if parts[2] == "s3" and parts[5]:
                buckets.add(parts[5].split("/", 1)[0])
            elif parts[2] == "dynamodb" and parts[5].startswith("table/"):
                tables.add(parts[5].split("/")[1])
    schemas: dict[tuple[str, str], set[str]] = {}
    for pg in postgres:
        schema, _, table = pg.object.partition(".")
        named = schemas.setdefault((pg.target, schema), set())
        if table:
            named.add(table)
    return Stores(
        s3_buckets=tuple(sorted(buckets)),
        dynamodb_tables=tuple(sorted(tables)),
        postgres=tuple((t, s, tuple(sorted(names))) for (t, s), names in sorted(schemas.items())),
    )


# ---- staleness -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NhiActivity:
    """What the inventory knows of when an NHI was last used and rotated."""

    name: str
    rotatable: bool
    since: datetime  # when it became active (else when it was requested)
    last_used_at: datetime | None = None
    last_rotated_at: datetime | None = None


def is_stale(nhi: NhiActivity, now: datetime) -> bool:
    """Not used for `STALE_UNUSED`, or (rotatable kinds) not rotated for `STALE_UNROTATED`."""
    used = nhi.last_used_at or nhi.since
    if now - used > STALE_UNUSED:
        return True
    rotated = nhi.last_rotated_at or nhi.since
    return nhi.rotatable and now - rotated > STALE_UNROTATED


# ---- the score -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskFacts:
    """What the score is computed from; every collection holds distinct, printable keys."""

    environment: str
    now: datetime
    sensitive_writes: frozenset[str] = frozenset()
    sensitive_reads: frozenset[str] = frozenset()
    wide_resources: frozenset[str] = frozenset()
    data_stores: int = 0
    invokers: frozenset[str] = frozenset()
    chained_agents: frozenset[str] = frozenset()
    expiry_horizon: datetime | None = None
    has_backup_owner: bool = True
    stale_nhis: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RiskReason:
    """One part of the score."""

    code: str
    points: int
    detail: str


@dataclass(frozen=True)
class RiskScore:
    """A score 0-100 and its reasons, in the order of `WEIGHTS`."""

    score: int
    reasons: tuple[RiskReason, ...] = field(default=())


def _listed(items: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(items)
    shown = ", ".join(ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def _counted(code: str, items: frozenset[str], what: str) -> RiskReason | None:
    if not items:
        return None
    weight = WEIGHTS[code]
    points = min(weight.each * len(items), weight.cap)
    return RiskReason(code, points, f"{len(items)} {what}: {_listed(items)}")


def score(facts: RiskFacts) -> RiskScore:
    """The risk score of a footprint, with a reason per part that adds points."""
    reasons: list[RiskReason | None] = [
        _counted("sensitive_write", facts.sensitive_writes, "sensitive write(s)"),
        _counted("sensitive_read", facts.sensitive_reads, "sensitive read(s)"),
    ]
    if facts.environment == PRODUCTION and facts.data_stores:
        reasons.append(
            RiskReason(
                "production_data",
                WEIGHTS["production_data"].each,
                f"reaches {facts.data_stores} data store(s) in prod",
            )
        )
    reasons += [
        _counted("wide_resource", facts.wide_resources, "wide resource(s)"),
        _counted("invokers", facts.invokers, "invoker(s)"),
        _counted("chained_agents", facts.chained_agents, "agent(s) in the invoker chain"),
    ]
    if facts.expiry_horizon is not None and facts.expiry_horizon - facts.now > LONG_EXPIRY:
        days = (facts.expiry_horizon - facts.now).days
        very = facts.expiry_horizon - facts.now > VERY_LONG_EXPIRY
        weight = WEIGHTS["long_expiry"]
        reasons.append(
            RiskReason(
                "long_expiry",
                weight.cap if very else weight.each,
                f"access lasts {days} more days",
            )
        )
    if not facts.has_backup_owner:
        reasons.append(
            RiskReason("no_backup_owner", WEIGHTS["no_backup_owner"].each, "no backup owner")
        )
    reasons.append(_counted("stale_nhi", facts.stale_nhis, "stale NHI(s)"))
    kept = tuple(r for r in reasons if r is not None)
    return RiskScore(min(MAX_SCORE, sum(r.points for r in kept)), kept)
