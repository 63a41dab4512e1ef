"""HTTP API request and response bodies (also what `nhi --json` prints).

The one validation boundary: every request body, query parameter and path segment is typed
here, so what reaches the inventory, Postgres and the workflows is bounded and printable.
Strings carry no NUL, control, format (bidi) or surrogate characters (free text may keep
newlines and tabs); numbers are JSON integers within their column, never booleans or floats;
durations are whole seconds or strings such as `30d`, at most 366 days.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    PlainValidator,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from models.contracts import ScopeStatement
from models.enums import (
    AgentCategory,
    AgentStatus,
    CredentialDelivery,
    Environment,
    IncidentStatus,
    InvokerChannel,
    InvokerKind,
    NhiKind,
    NhiStatus,
    Platform,
)

# --- limits ------------------------------------------------------------------------------------

MAX_DURATION_SECONDS = 366 * 86400
INT32_MAX = 2**31 - 1  # Integer columns are Postgres `integer`
MAX_LIST_LIMIT = 1000
MAX_OFFSET = INT32_MAX
MAX_REMINDER_OFFSETS = 10
MAX_BODY_BYTES = 1024 * 1024  # larger bodies are answered 413 (api/errors.py)

# --- characters --------------------------------------------------------------------------------

# Cc control (NUL, ESC of ANSI sequences), Cf format (bidi overrides such as U+202E, zero-width
# characters), Cs lone surrogates (Postgres cannot store them), Zl/Zp line and paragraph
# separators: none of them belongs in a name, an address or an audit reason, and each has been
# used to hide what a log line or a Slack message really says. U+FFFD, the replacement
# character, is what undecodable bytes (a URL's invalid UTF-8) become: the value was garbled.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_TEXT_ALLOWED = frozenset("\n\t\r")


def _refuse_characters(value: str, allowed: frozenset[str] = frozenset()) -> str:
    for position, char in enumerate(value):
        if char not in allowed and (
            unicodedata.category(char) in _UNSAFE_CATEGORIES or char == "\ufffd"
        ):
            raise PydanticCustomError(
                "unsafe_character",
                "must not contain control, format (bidi), separator, surrogate or replacement "
                "characters (U+{code} at position {position})",
                {"code": f"{ord(char):04X}", "position": position},
            )
    return value


def _line(value: str) -> str:
    """One line of printable text."""
    return _refuse_characters(value)


def _text(value: str) -> str:
    """Free text: newlines and tabs allowed, nothing else invisible."""
    return _refuse_characters(value, _TEXT_ALLOWED)


def _token(value: str) -> str:
    """A printable value without whitespace (ARNs, actions, principals)."""
    _refuse_characters(value)
    if any(char.isspace() for char in value):
        raise PydanticCustomError("whitespace", "must not contain whitespace")
    return value


def _ascii_token(value: str) -> str:
    _token(value)
    if not value.isascii():
        raise PydanticCustomError("not_ascii", "must be ASCII")
    return value


_LINE = AfterValidator(_line)
_TEXT = AfterValidator(_text)
# One line of printable text, for fields with no narrower shape (bound its length where used).
Line = Annotated[str, _LINE]

_REASON = "Why (recorded in the audit trail); newlines allowed, no control characters."
Reason = Annotated[str, StringConstraints(max_length=2000), _TEXT, Field(description=_REASON)]
RequiredReason = Annotated[
    str, StringConstraints(min_length=1, max_length=2000), _TEXT, Field(description=_REASON)
]


# --- identifiers -------------------------------------------------------------------------------

# An address as people type it, ASCII only: no quoted local parts, no IP literals, no IDN
# (use its xn-- form). Deliberately narrower than RFC 5322.
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _email(value: str) -> str:
    if len(value.partition("@")[0]) > 64 or not _EMAIL_RE.fullmatch(value):
        raise PydanticCustomError(
            "email", "must be an email address such as 'ana@example.com' (ASCII, no spaces)"
        )
    return value.lower()


Email = Annotated[
    str,
    StringConstraints(min_length=3, max_length=254),
    AfterValidator(_email),
    Field(description="An email address (ASCII), stored lower-case.", examples=["ana@example.com"]),
]
AgentName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"),
    Field(description="Lower-case letters, digits and dashes, 3-63 characters."),
]
TargetName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$"),
    Field(description="Lower-case letter, then lower-case letters, digits and dashes (1-63)."),
]
TokenName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{1,98}[a-z0-9]$"),
    Field(description="Lower-case letters, digits, '.', '_' and '-', 3-100 characters."),
]
Team = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    _LINE,
    Field(description="A team name: one line of printable text, 1-100 characters."),
]
SlackUserId = Annotated[str, StringConstraints(pattern=r"^[UW][A-Z0-9]{2,30}$")]
_SLACK_REF_RE = re.compile(r"[@#][a-z0-9][a-z0-9._-]{0,79}|[SCG][A-Z0-9]{2,30}")


def _approver(value: str) -> str:
    """A Slack user group or channel as given, or an email (lower-case)."""
    if _SLACK_REF_RE.fullmatch(value):
        return value
    try:
        return _email(value)
    except PydanticCustomError:
        raise PydanticCustomError(
            "approver",
            "must be a Slack user group ('@handle', 'S...'), channel ('#name', 'C...') or an email",
        ) from None


Approver = Annotated[
    str,
    StringConstraints(min_length=2, max_length=254),
    AfterValidator(_approver),
    Field(description="A Slack user group, a Slack channel, or an email."),
]
Principal = Annotated[
    str,
    StringConstraints(min_length=1, max_length=254),
    AfterValidator(_token),
    Field(description="A principal (ARN, service or email): printable, no whitespace."),
]
# IAM actions and Postgres privileges (`s3:GetObject`, `iam:*`, `SELECT`); nhi.rules.policy checks
# the grammar per platform, this keeps them ASCII so IGNORECASE patterns cannot be fooled by
# look-alikes such as the Kelvin sign.
ScopeAction = Annotated[
    str, StringConstraints(min_length=1, max_length=128), AfterValidator(_ascii_token)
]
# `arn:partition:service:region:account:resource`, or `*` (nhi.rules.policy checks the grammar and
# the wildcard rule); resources may hold any printable character, as S3 keys do, up to IAM's
# 2048.
ResourceArn = Annotated[
    str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_token)
]
# `arn:aws:iam::123456789012:role/x` or `bedrock.amazonaws.com`: AWS's principal names are
# ASCII; nhi.rules.policy checks the grammar.
TrustPrincipal = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_ascii_token),
    Field(
        description="iam_role only: the agent runtime's principal ARN or service principal "
        "(`x.amazonaws.com`).",
        examples=["arn:aws:iam::123456789012:role/agent-runtime"],
    ),
]
AccountId = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9]{12}$"),
    Field(description="An AWS account id: 12 digits, as a string.", examples=["123456789012"]),
]
PolicyEntry = Annotated[str, StringConstraints(min_length=1, max_length=128), _LINE]


_CIDR_RE = re.compile(r"[0-9A-Fa-f.:]{2,45}(/[0-9]{1,3})?")


def _cidr(value: str) -> str:
    # `fe80::1%eth0/64`: a zone id names an interface on one host, never a network.
    if "%" in value:
        raise PydanticCustomError("cidr_zone", "must be a CIDR without a zone id ('%...')")
    try:
        if not _CIDR_RE.fullmatch(value):
            raise ValueError(value)
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise PydanticCustomError(
            "cidr", "must be an IPv4 or IPv6 CIDR such as '10.0.0.0/8'"
        ) from None
    return value


Cidr = Annotated[
    str,
    StringConstraints(max_length=49),
    AfterValidator(_cidr),
    Field(
        description="An IPv4 or IPv6 network such as '10.0.0.0/8' (no zone id).",
        examples=["10.0.0.0/8"],
        json_schema_extra={"pattern": r"^[0-9A-Fa-f.:]{2,45}(/[0-9]{1,3})?$"},
    ),
]


def _in_range(value: datetime) -> datetime:
    # Checked on the local date: converting year 9999 with a negative offset to UTC overflows.
    if not 1970 <= value.year < 2200:
        raise PydanticCustomError("datetime_range", "must be between the years 1970 and 2199")
    return value


def _not_a_number(value: object) -> object:
    # JSON numbers would otherwise be read as Unix timestamps.
    if not isinstance(value, str | datetime):
        raise PydanticCustomError("datetime_type", "must be an ISO 8601 string with a timezone")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_not_a_number), AfterValidator(_in_range)]

# --- durations ---------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"([0-9]{1,10}) ?([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_SCHEMA_STRING = {
    "type": "string",
    "pattern": r"^[0-9]{1,10} ?[smhdw]?$",
    "maxLength": 12,
    "examples": ["30d", "12h", "3600"],
}


def duration_seconds(value: int | str) -> int:
    """Seconds of an already validated duration."""
    if isinstance(value, int):
        return value
    match = _DURATION_RE.fullmatch(value)
    assert match is not None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _duration_check(minimum: int) -> PlainValidator:
    def check(value: object) -> int | str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise PydanticCustomError(
                "duration_type",
                "must be whole seconds (a JSON integer) or a string such as '30d' or '12h'",
            )
        if isinstance(value, str) and not _DURATION_RE.fullmatch(value):
            raise PydanticCustomError(
                "duration_format",
                "must be whole seconds or a duration such as '45m', '12h', '30d' or '2w'",
            )
        seconds = duration_seconds(value)
        if not minimum <= seconds <= MAX_DURATION_SECONDS:
            raise PydanticCustomError(
                "duration_range",
                "must be between {minimum} and {maximum} seconds: nothing lives longer than "
                "366 days, the longest maximum lifetime a policy may set",
                {"minimum": minimum, "maximum": MAX_DURATION_SECONDS},
            )
        return value

    return PlainValidator(check)


def _duration_schema(minimum: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": minimum, "maximum": MAX_DURATION_SECONDS},
                _DURATION_SCHEMA_STRING,
            ],
            "description": "Seconds, or a duration such as '30d' or '12h'; at most 366 days.",
        }
    )


Duration = Annotated[int | str, _duration_check(1), _duration_schema(1)]
DurationOrZero = Annotated[int | str, _duration_check(0), _duration_schema(0)]

# --- query parameters and path segments --------------------------------------------------------

Limit = Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT, description="At most this many rows.")]
Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET, description="Skip this many rows.")]

# libpq's sslmode values.
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class Body(BaseModel):
    """Request bodies refuse unknown fields, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class ScopeIn(ScopeStatement):
    """One Allow statement as a request states it: printable, bounded actions and ARNs."""

    model_config = ConfigDict(extra="forbid")

    actions: list[ScopeAction] = Field(min_length=1, max_length=50)
    resources: list[ResourceArn] = Field(min_length=1, max_length=50)


# A request's scope validates as ScopeIn and is still a `ScopeStatement` to the code after it.
Scope = Annotated[
    ScopeStatement, GetPydanticSchema(lambda _type, handler: handler.generate_schema(ScopeIn))
]


class AgentCreate(Body):
    """Register an AI agent and the people answerable for it."""

    name: AgentName
    category: AgentCategory
    environment: Environment
    owner_email: Email
    owner_slack_id: SlackUserId | None = None
    backup_owner_email: Email | None = None
    team: Team
    purpose: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000), _TEXT
    ]
    expected_end_at: Timestamp | None = Field(
        default=None, description="When the agent's task is expected to end (timezone required)."
    )
    invokers: list[Principal] = Field(
        default_factory=list, max_length=100, description="Principals who may invoke the agent."
    )


class NhiCreate(Body):
    """Request one identity for an agent."""

    platform: Platform
    kind: NhiKind
    scope: list[Scope] = Field(min_length=1, max_length=20)
    ttl: Duration | None = Field(default=None, description="Policy default if unset.")
    allowed_cidrs: list[Cidr] = Field(default_factory=list, max_length=50)
    trust_principal: TrustPrincipal | None = None
    target: TargetName | None = Field(
        default=None, description="postgres_role only: the registered target database."
    )
    delivery: CredentialDelivery | None = Field(
        default=None,
        description="Where the credential is delivered (`aws_secrets_manager` or `vault_kv`); "
        "the policy's `delivery` if unset. Kinds with a static credential only.",
    )


class PolicyIn(Body):
    """One policy, as `nhi policies apply FILE` sends it. Refuses what a lifecycle could not
    run with: every reminder before the maximum lifetime, rotation within it."""

    platform: Platform
    kind: NhiKind
    environment: Environment
    allowed: StrictBool
    default_ttl: Duration
    max_lifetime: Duration
    rotation_period: Duration | None = None
    reminder_offsets: list[Duration] = Field(
        default_factory=list,
        max_length=MAX_REMINDER_OFFSETS,
        description="How long before expiry to remind the owner; each below max_lifetime.",
    )
    grace_period: DurationOrZero = 0
    max_session_duration: Duration = 3600
    allow_resource_wildcard: StrictBool = False
    forbidden_actions: list[PolicyEntry] = Field(default_factory=list, max_length=200)
    sensitive_actions: list[PolicyEntry] = Field(default_factory=list, max_length=200)
    delivery: CredentialDelivery = Field(
        default=CredentialDelivery.AWS_SECRETS_MANAGER,
        description="Where this policy's NHIs get their credential unless a request says.",
    )
    allowed_trust_accounts: list[AccountId] = Field(
        default_factory=list,
        max_length=100,
        description="iam_role: other AWS accounts whose principals a role may trust.",
    )
    allowed_resources: list[PolicyEntry] = Field(
        default_factory=list,
        max_length=200,
        description="github_app_token: the repositories a scope may name (`owner/repo` or "
        "`owner/*`); empty allows none.",
    )
    allow_service_principals: StrictBool = Field(
        default=False, description="iam_role: whether an AWS service principal may be trusted."
    )
    allow_task_credentials: StrictBool = Field(
        default=False,
        description="Whether short-lived task credentials may be issued from these NHIs.",
    )
    task_credential_max_ttl: Duration = Field(
        default=3600, description="The longest a task credential may live (60 s to 12 h)."
    )
    approvers: list[Approver] = Field(
        default_factory=list,
        max_length=50,
        description="Who decides requests that need approval: Slack user groups ('@handle' or "
        "an 'S...' id), channels ('#name' or a 'C...' id) or emails.",
    )
    # StrictInt: a Literal[1, 2] would take `true` as 1.
    approvals_required: StrictInt = Field(
        default=1, ge=1, le=2, description="Distinct approvers needed (2 for production)."
    )
    approval_window: Duration = Field(
        default="72h", description="No decision within this window denies (1 minute to 30 days)."
    )
    risk_threshold: StrictInt | None = Field(
        default=None,
        ge=0,
        le=100,
        description="A request that would raise the agent's risk score past this needs approval.",
    )

    @field_validator("rotation_period", "reminder_offsets")
    @classmethod
    def _within_max_lifetime(cls, value: Any, info: ValidationInfo) -> Any:
        # `max_lifetime` is declared first, so it is here when valid.
        max_lifetime = info.data.get("max_lifetime")
        if value is None or max_lifetime is None:
            return value
        limit = duration_seconds(max_lifetime)
        if info.field_name == "rotation_period" and duration_seconds(value) > limit:
            raise PydanticCustomError("rotation_period", "must not exceed max_lifetime")
        if info.field_name == "reminder_offsets":
            for i, offset in enumerate(value):
                if duration_seconds(offset) >= limit:
                    raise PydanticCustomError(
                        "reminder_offset",
                        "entry {index} must be shorter than max_lifetime",
                        {"index": i},
                    )
        return value


class PolicyApply(Body):
    """A set of policies to create or replace."""

    policies: list[PolicyIn] = Field(min_length=1, max_length=100)


_DSN_RE = r"^postgres(ql)?://[\x21-\x7e]{1,1000}$"


class TargetIn(Body):
    """Register a Postgres target: where to reach it as an admin, and where its admin password
    is (an environment variable or a Secrets Manager secret), never the password itself."""

    # Pydantic's own messages would quote the input: a DSN pasted with a password in it.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: TargetName
    dsn: Annotated[str, StringConstraints(max_length=1024, pattern=_DSN_RE)] = Field(
        description="`postgresql://admin_user@host:port/dbname`, without a password "
        "(printable ASCII, no spaces).",
    )
    password_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] | (
        None
    ) = Field(default=None, description="Environment variable of the worker holding the password.")
    password_secret: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9/_+=.@:-]{1,2048}$")] | None
    ) = Field(
        default=None,
        description="Secrets Manager ARN or name of the password (plain, or RDS-style JSON).",
    )
    sslmode: SslMode = "prefer"
    connection_limit: StrictInt = Field(
        default=10, ge=1, le=1000, description="At most this many admin connections at once."
    )


class Out(BaseModel):
    """Responses read straight from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


class NhiOut(Out):
    """An NHI as the inventory knows it. `credential_ref` is where the credential is, never it."""

    id: uuid.UUID
    agent_id: uuid.UUID
    platform: Platform
    kind: NhiKind
    name: str
    status: NhiStatus
    status_reason: str | None
    external_id: str | None
    credential_ref: str | None
    granted_scope: list[ScopeStatement]
    allowed_cidrs: list[str]
    trust_principal: str | None
    workflow_id: str | None
    requested_by: str
    created_at: datetime
    activated_at: datetime | None
    expires_at: datetime
    max_lifetime_at: datetime
    last_rotated_at: datetime | None
    last_used_at: datetime | None
    decommissioned_at: datetime | None
    rotation_period_seconds: int | None
    target: str | None = None


class ApprovalNeeded(BaseModel):
    """Why a request waits for approvers, and who they are (issue 16)."""

    approval_id: uuid.UUID
    approvers: list[str]
    approvals_required: int
    expires_at: datetime
    reasons: list[str] = Field(
        description="Sensitive entries asked for, and the risk reasons that moved the score."
    )
    risk_before: int
    risk_after: int
    risk_threshold: int | None = None


class NhiAccepted(BaseModel):
    """202 answer to a provisioning request."""

    id: uuid.UUID
    workflow_id: str
    status: NhiStatus
    expires_at: datetime
    approval: ApprovalNeeded | None = None


class NhiBatch(Body):
    """Several NHIs for one agent: validated, approved and provisioned together."""

    nhis: list[NhiCreate] = Field(min_length=1, max_length=20)


class BundleAccepted(BaseModel):
    """202 answer to a bundle: every NHI, the bundle's workflow, and its approval if any."""

    bundle_id: uuid.UUID
    workflow_id: str
    nhis: list[NhiAccepted]
    approval: ApprovalNeeded | None = None


class ApprovalOut(Out):
    """A request waiting for (or decided by) approvers."""

    id: uuid.UUID
    agent_id: uuid.UUID
    workflow_id: str
    bundle: bool
    nhi_ids: list[uuid.UUID]
    approvers: list[str]
    approvals_required: int
    requested_by: str
    status: str
    reasons: list[str]
    summary: dict[str, Any]
    decisions: list[dict[str, Any]]
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None


class AgentOut(Out):
    """An agent without its NHIs."""

    id: uuid.UUID
    name: str
    category: AgentCategory
    environment: Environment
    owner_email: str
    owner_slack_id: str | None
    backup_owner_email: str | None
    team: str
    purpose: str
    expected_end_at: datetime | None
    invokers: list[str]
    status: AgentStatus
    created_by: str
    created_at: datetime


class AgentDetail(AgentOut):
    """An agent with every NHI it holds."""

    nhis: list[NhiOut]


class PolicyOut(Out):
    """A stored policy."""

    platform: Platform
    kind: NhiKind
    environment: Environment
    allowed: bool
    default_ttl_seconds: int
    max_lifetime_seconds: int
    rotation_period_seconds: int | None
    reminder_offsets_seconds: list[int]
    grace_period_seconds: int
    max_session_duration_seconds: int
    allow_resource_wildcard: bool
    forbidden_actions: list[str]
    sensitive_actions: list[str]
    allowed_trust_accounts: list[str] = Field(default_factory=list)
    allowed_resources: list[str] = Field(default_factory=list)
    allow_service_principals: bool = False
    allow_task_credentials: bool = False
    task_credential_max_ttl_seconds: int = 3600
    approvers: list[str] = Field(default_factory=list)
    approvals_required: int = 1
    approval_window_seconds: int = 259200
    risk_threshold: int | None = None
    updated_by: str
    updated_at: datetime


class TargetOut(Out):
    """A registered target: how it is reached and where its password is, never the password."""

    name: str
    host: str
    port: int
    dbname: str
    admin_user: str
    password_ref: str
    sslmode: SslMode
    connection_limit: int
    source: Literal["inventory", "settings"]
    created_by: str | None
    created_at: datetime | None


class AuditOut(Out):
    """One audit event."""

    id: int
    subject_type: str
    subject_id: str
    event: str
    actor: str
    reason: str
    details: dict[str, Any]
    created_at: datetime


class PromptOut(Out):
    """A renewal prompt and its answer."""

    id: uuid.UUID
    nhi_id: uuid.UUID
    kind: str
    for_expires_at: datetime
    offset_seconds: int
    reason: str
    deliveries: list[dict[str, Any]]
    status: str
    decision: str | None
    decided_by: str | None
    decided_at: datetime | None
    created_at: datetime


class FieldError(BaseModel):
    """One field at fault and the rule it breaks (the value itself is never echoed)."""

    field: str = Field(examples=["owner_email"])
    message: str = Field(examples=["must be an email address such as 'ana@example.com'"])
    type: str = Field(examples=["email"])


class Error(BaseModel):
    """Every error answer: what went wrong, and where the request is at fault, the field.

    `detail` is always a sentence; `field` names the field at fault in dotted form
    (`policies[0].reminder_offsets`) when one is; `errors` lists every field at fault on a
    422 from validation.
    """

    detail: str = Field(examples=["owner_email: must be an email address such as 'ana@...'"])
    field: str | None = Field(default=None, examples=["owner_email"])
    errors: list[FieldError] | None = None


# --- invokers and footprints (issue 16) --------------------------------------------------------

_GROUP_RE = re.compile(r"[@#]?[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=,-]{0,253}")
_CRON_FIELD = r"[0-9A-Za-z*/,?-]{1,40}"
_CRON_RE = re.compile(
    rf"@(hourly|daily|weekly|monthly|yearly|annually)|{_CRON_FIELD}( {_CRON_FIELD}){{4}}"
)


def _invoker_ref(kind: InvokerKind, ref: str) -> str:
    """`ref` as its kind spells it: the stored, canonical form (emails lower-case, agent ids
    as hyphenated UUIDs)."""
    if kind is InvokerKind.PERSON:
        return _email(ref)
    if kind is InvokerKind.AGENT:
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            raise PydanticCustomError("invoker_ref", "must be an agent's id (a UUID)") from None
    patterns = {
        InvokerKind.GROUP: (_GROUP_RE, "a group name such as 'search-oncall' or '@search-team'"),
        InvokerKind.SERVICE: (_SERVICE_RE, "a service name or ARN without spaces"),
        InvokerKind.SCHEDULE: (_CRON_RE, "a cron expression of five fields or '@daily'"),
    }
    pattern, what = patterns[kind]
    if not pattern.fullmatch(ref):
        raise PydanticCustomError("invoker_ref", "must be {what}", {"what": what})
    return ref


class InvokerCreate(Body):
    """Who or what can make the agent act, through which channel, until when."""

    kind: InvokerKind
    ref: Annotated[str, StringConstraints(min_length=1, max_length=254), _LINE] = Field(
        description="person: an email; group: a group name; service: a service name or ARN; "
        "schedule: a cron expression; agent: another agent's id (same environment).",
        examples=["ana@example.com"],
    )
    channel: InvokerChannel
    expires_at: Timestamp | None = Field(
        default=None, description="When this invoker stops counting (timezone required)."
    )

    @field_validator("ref")
    @classmethod
    def _ref_of_kind(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")  # declared first: here when valid
        return value if kind is None else _invoker_ref(kind, value)

    @field_validator("channel")
    @classmethod
    def _cron_is_for_schedules(cls, value: InvokerChannel, info: ValidationInfo) -> InvokerChannel:
        kind = info.data.get("kind")
        if kind is not None and (kind is InvokerKind.SCHEDULE) != (value is InvokerChannel.CRON):
            raise PydanticCustomError(
                "invoker_channel", "a schedule invokes through cron, and only a schedule does"
            )
        return value


class InvokerOut(Out):
    """One recorded invoker."""

    id: uuid.UUID
    agent_id: uuid.UUID
    kind: InvokerKind
    ref: str
    channel: InvokerChannel
    expires_at: datetime | None
    added_by: str
    added_at: datetime


def _workload_subject(value: str) -> str:
    """A JWT `sub` as the platform writes it: printable, no whitespace, and no `*`, which
    would read as a wildcard where subjects only ever match exactly."""
    _token(value)
    if "*" in value:
        raise PydanticCustomError(
            "workload_subject", "must be one exact subject: wildcards ('*') are not supported"
        )
    return value


class WorkloadCreate(Body):
    """Bind a workload identity (a JWT subject of a trusted issuer) to the agent."""

    issuer: Annotated[str, StringConstraints(min_length=1, max_length=200), _LINE] = Field(
        description="One of `NHI_WORKLOAD_OIDC_ISSUERS`, exactly as its tokens' `iss`.",
        examples=["https://token.actions.githubusercontent.com"],
    )
    subject: Annotated[
        str, StringConstraints(min_length=1, max_length=240), AfterValidator(_workload_subject)
    ] = Field(
        description="The tokens' `sub`, matched exactly (a Kubernetes service account "
        "`system:serviceaccount:NS:NAME`, a GitHub Actions `repo:ORG/REPO:environment:ENV`).",
        examples=["system:serviceaccount:agents:kb-bot"],
    )
    reason: Reason = ""


class WorkloadOut(Out):
    """A workload identity bound to an agent."""

    id: uuid.UUID
    agent_id: uuid.UUID
    issuer: str
    subject: str
    created_by: str
    created_at: datetime


class FootprintNhi(BaseModel):
    """A live NHI of the agent."""

    id: uuid.UUID
    platform: Platform
    kind: NhiKind
    name: str
    status: NhiStatus
    target: str | None
    expires_at: datetime
    last_used_at: datetime | None
    last_rotated_at: datetime | None


class FootprintTaskCredential(BaseModel):
    """A live task credential derived from one of the agent's NHIs."""

    id: uuid.UUID
    nhi_id: uuid.UUID
    platform: str
    name: str
    task_id: str | None
    expires_at: datetime


class AwsPermission(BaseModel):
    """One IAM action pattern and every resource pattern it is granted on."""

    action: str
    resources: list[str]
    nhi_ids: list[uuid.UUID]
    sensitive: bool
    write: bool


class PostgresPermission(BaseModel):
    """The privileges held on one object of a target: `schema.table`, `schema.*` (every table
    of the schema) or `schema` (USAGE on the schema itself)."""

    target: str
    object: str
    privileges: list[str]
    sensitive: list[str]
    nhi_ids: list[uuid.UUID]


class Permissions(BaseModel):
    """The union of the agent's permissions per platform, expanded."""

    aws: list[AwsPermission]
    postgres: list[PostgresPermission]


class PostgresStore(BaseModel):
    """A schema the agent reaches on a target, and its tables (`*`: every table)."""

    target: str
    schema_name: str
    tables: list[str]


class DataStores(BaseModel):
    """Where the agent's permissions reach data."""

    s3_buckets: list[str]
    dynamodb_tables: list[str]
    postgres: list[PostgresStore]


class ChainAgent(BaseModel):
    """An agent met walking invoker links: `depth` 1 is a direct link, `via` the agent on the
    nearer side."""

    agent_id: uuid.UUID
    name: str
    environment: Environment
    depth: int
    via: uuid.UUID


class ChainInvoker(BaseModel):
    """A person, group, service or schedule that can make the agent act through an agent of
    the chain (`via`)."""

    kind: InvokerKind
    ref: str
    channel: InvokerChannel
    expires_at: datetime | None
    depth: int
    via: uuid.UUID


class RiskReasonOut(BaseModel):
    """One part of a risk score: its rule, points and what triggered it."""

    code: str
    points: int
    detail: str


class RiskOut(BaseModel):
    """A risk score 0-100 and the reasons that make it up (README "Footprints")."""

    score: int
    reasons: list[RiskReasonOut]


class FootprintOut(BaseModel):
    """Everything an agent can do, and who can make it do it."""

    agent_id: uuid.UUID
    name: str
    environment: Environment
    team: str
    nhis: list[FootprintNhi]
    task_credentials: list[FootprintTaskCredential]
    permissions: Permissions
    sensitive: Permissions
    data_stores: DataStores
    invokers: list[InvokerOut]
    declared_invokers: list[str]
    reachable_agents: list[ChainAgent]
    reachable_invokers: list[ChainInvoker]
    invokes: list[ChainAgent]
    chain_truncated: bool
    expiry_horizon: datetime | None
    risk: RiskOut
    computed_at: datetime


class FootprintRank(BaseModel):
    """One agent in a team's ranking by risk."""

    agent_id: uuid.UUID
    name: str
    environment: Environment
    score: int
    reasons: list[str]


# --- containment incidents (issue 17) ----------------------------------------------------------


class ContainBody(Body):
    """Why the agent is contained (recorded on the incident and in the audit trail)."""

    reason: RequiredReason


class ReleaseBody(Body):
    """Why containment is lifted (a second person: not the one who contained it)."""

    reason: RequiredReason


class IncidentOut(Out):
    """A containment incident: per-credential report (what was done, the proof it is dead)
    and timeline in `report`."""

    id: uuid.UUID
    agent_id: uuid.UUID
    status: IncidentStatus
    reason: str
    opened_by: str
    opened_at: datetime
    contained_at: datetime | None
    released_by: str | None
    released_at: datetime | None
    release_reason: str | None
    finding_id: uuid.UUID | None
    report: dict[str, Any]
