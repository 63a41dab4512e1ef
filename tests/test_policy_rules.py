"""Pure rules of nhi/rules/policy.py: TTLs, scope checks, CIDRs, principals, names, IAM documents."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime

import pytest

from models.contracts import ScopeStatement
from models.enums import NhiKind
from nhi.rules.policy import (
    INLINE_POLICY_LIMIT,
    MAX_STATEMENTS,
    QUARANTINE_POLICY_RESERVE,
    PolicyRules,
    RuleViolation,
    actions_overlap,
    check_trust_account,
    identity_name,
    identity_policy_document,
    parse_ttl,
    policy_size,
    principal_account,
    scope_policy_limit,
    trust_policy_document,
    validate_cidrs,
    validate_rule_pattern,
    validate_scope,
    validate_trust_principal,
)

FORBIDDEN = ("*", "iam:*", "organizations:*", "account:*", "sts:*")
SENSITIVE = (
    "iam:PassRole",
    "*:Delete*",
    "*:Put*Policy",
    "kms:Decrypt",
    "secretsmanager:GetSecretValue",
)
BUCKET = "arn:aws:s3:::agent-bucket/*"


def _rules(*, allow_resource_wildcard: bool = False, label: str = "prod") -> PolicyRules:
    return PolicyRules(
        label=label,
        allowed=True,
        default_ttl_seconds=86400,
        max_lifetime_seconds=30 * 86400,
        allow_resource_wildcard=allow_resource_wildcard,
        forbidden_actions=FORBIDDEN,
        sensitive_actions=SENSITIVE,
    )


RULES = _rules()


def _stmt(actions: list[str], resources: list[str] | None = None) -> ScopeStatement:
    return ScopeStatement(actions=actions, resources=resources or [BUCKET])


# --- parse_ttl ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (1, 1),
        (3600, 3600),
        ("3600", 3600),
        ("90s", 90),
        ("45m", 45 * 60),
        ("12h", 12 * 3600),
        ("30d", 30 * 86400),
        ("2w", 2 * 604800),
        ("  7d  ", 7 * 86400),
        ("12 h", 12 * 3600),
        ("\t600\n", 600),
        ("007", 7),
    ],
)
def test_parse_ttl_accepts(value: int | str, seconds: int) -> None:
    assert parse_ttl(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        -3600,
        "0",
        "0d",
        "-5",
        "-5m",
        "abc",
        "3x",
        "",
        "   ",
        "d",
        "1.5h",
        "12H",
        "1h30m",
        True,
        False,
    ],
)
def test_parse_ttl_refuses(value: int | str) -> None:
    with pytest.raises(RuleViolation) as info:
        parse_ttl(value)
    assert info.value.field == "ttl"
    assert str(info.value).startswith("ttl: ")


def test_rule_violation_is_a_value_error_with_field_and_message() -> None:
    err = RuleViolation("scope[0].actions[1]", "nope")
    assert isinstance(err, ValueError)
    assert err.field == "scope[0].actions[1]"
    assert err.message == "nope"
    assert str(err) == "scope[0].actions[1]: nope"


# --- actions_overlap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "rule", "expected"),
    [
        ("*", "*", True),
        ("*:*", "*", True),
        ("s3:*", "*", False),  # a rule of `*` forbids asking for everything only
        ("iam:CreateUser", "*", False),
        ("*", "iam:*", True),
        ("*:*", "iam:*", True),
        ("iam:CreateUser", "iam:*", True),
        ("IAM:createuser", "iam:*", True),
        ("iam:CreateUser", "IAM:*", True),
        ("i*:*", "iam:*", True),
        ("ia?:List*", "iam:*", True),
        ("s3:GetObject", "iam:*", False),
        ("s3:DeleteObject", "*:Delete*", True),
        ("s3:Delete*", "*:Delete*", True),
        ("s3:Del*", "*:Delete*", True),
        ("s3:*", "*:Delete*", True),
        ("s3:*Object", "*:Delete*", True),
        ("s3:GetObject", "*:Delete*", False),
        ("s3:List*", "*:Delete*", False),
        ("s3:PutBucketPolicy", "*:Put*Policy", True),
        ("s3:Put*", "*:Put*Policy", True),
        ("s3:*Policy", "*:Put*Policy", True),
        ("s3:PutObject", "*:Put*Policy", False),
        ("kms:Decrypt", "kms:Decrypt", True),
        ("KMS:DECRYPT", "kms:Decrypt", True),
        ("kms:De*", "kms:Decrypt", True),
        ("kms:*crypt", "kms:Decrypt", True),
        ("kms:Encrypt", "kms:Decrypt", False),
        ("s3:Decrypt", "kms:Decrypt", False),
    ],
)
def test_actions_overlap(requested: str, rule: str, expected: bool) -> None:
    assert actions_overlap(requested, rule) is expected


# --- validate_scope: forbidden actions ---------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        "*",
        "iam:CreateUser",
        "IAM:createuser",
        "iam:*",
        "iam:PassRole",
        "iam:Pass*",
        "iam:?reateUser",
        "sts:AssumeRole",
        "STS:*",
        "organizations:ListAccounts",
        "account:*",
    ],
)
def test_forbidden_action_refused_naming_entry_rule_and_policy(action: str) -> None:
    scope = [_stmt(["s3:GetObject"]), _stmt(["s3:ListBucket", action])]
    with pytest.raises(RuleViolation) as info:
        validate_scope(scope, RULES)
    assert info.value.field == "scope[1].actions[1]"
    assert repr(action) in info.value.message
    assert "prod policy" in info.value.message
    assert "forbidden" in info.value.message


@pytest.mark.parametrize("action", ["*:*", "i*:*"])
def test_service_wildcards_refused(action: str) -> None:
    # `_ACTION_RE` allows no wildcard in the service prefix, so these are refused before
    # the forbidden rules are even consulted; either way they never reach IAM.
    with pytest.raises(RuleViolation) as info:
        validate_scope([_stmt([action])], RULES)
    assert info.value.field == "scope[0].actions[0]"
    assert repr(action) in info.value.message


def test_forbidden_message_uses_the_policy_label() -> None:
    with pytest.raises(RuleViolation) as info:
        validate_scope([_stmt(["iam:CreateUser"])], _rules(label="staging"))
    assert "staging policy" in info.value.message
    assert "'iam:*'" in info.value.message


@pytest.mark.parametrize(
    "action", ["s3", "s3:Get Object", "", ":GetObject", "s3:", "s3:Get:Object"]
)
def test_malformed_action_refused(action: str) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_scope([_stmt(["s3:GetObject", "s3:ListBucket", action])], RULES)
    assert info.value.field == "scope[0].actions[2]"
    assert repr(action) in info.value.message
    assert "not an IAM action" in info.value.message


# --- validate_scope: sensitive actions ---------------------------------------------------


@pytest.mark.parametrize(
    "action",
    ["s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:List*", "kms:Encrypt", "dynamodb:Query"],
)
def test_ordinary_action_allowed_and_not_sensitive(action: str) -> None:
    assert validate_scope([_stmt([action])], RULES) == []


@pytest.mark.parametrize(
    "action",
    [
        "s3:DeleteObject",
        "s3:*",
        "s3:Delete*",
        "dynamodb:DeleteTable",
        "s3:PutBucketPolicy",
        "s3:Put*",
        "kms:Decrypt",
        "kms:decrypt",
        "kms:De*",
        "kms:*",
        "secretsmanager:GetSecretValue",
        "secretsmanager:Get*",
    ],
)
def test_sensitive_action_allowed_and_reported(action: str) -> None:
    assert validate_scope([_stmt(["s3:GetObject", action])], RULES) == [action]


def test_sensitive_actions_collected_across_statements_in_order() -> None:
    scope = [
        _stmt(["s3:GetObject", "s3:DeleteObject"]),
        _stmt(["kms:Encrypt"], ["arn:aws:kms:us-east-1:123456789012:key/abc"]),
        _stmt(["kms:Decrypt", "s3:*"]),
    ]
    assert validate_scope(scope, RULES) == ["s3:DeleteObject", "kms:Decrypt", "s3:*"]


# IAM reads `?` as a wildcard too: these name s3:DeleteObject / s3:PutBucketPolicy.
@pytest.mark.parametrize("action", ["s3:Delet?Object", "s3:?eleteObject", "s3:PutBucketPolic?"])
def test_question_mark_does_not_evade_sensitive_rules(action: str) -> None:
    assert validate_scope([_stmt([action])], RULES) == [action]


# `$` in a regex also matches before a trailing newline; the checks must match whole strings.
@pytest.mark.parametrize("action", ["*\n", "kms:Decrypt\n"])
def test_trailing_newline_action_refused(action: str) -> None:
    with pytest.raises(RuleViolation):
        validate_scope([_stmt([action])], RULES)


# --- validate_scope: resources and statement count ---------------------------------------


@pytest.mark.parametrize(
    "resource",
    ["*", "arn:aws:s3:::*", "arn:aws:dynamodb:us-east-1:123456789012:*", "arn:aws:iam::aws:*"],
)
def test_whole_resource_wildcard_refused(resource: str) -> None:
    scope = [_stmt(["s3:GetObject"], [BUCKET, "arn:aws:s3:::agent-bucket", resource])]
    with pytest.raises(RuleViolation) as info:
        validate_scope(scope, RULES)
    assert info.value.field == "scope[0].resources[2]"
    assert repr(resource) in info.value.message
    assert "prod policy" in info.value.message
    assert "wildcard" in info.value.message


@pytest.mark.parametrize("resource", ["arn:aws:s3:::**", "arn:aws:s3:::*/*"])
def test_spelled_out_whole_resource_wildcard_refused(resource: str) -> None:
    with pytest.raises(RuleViolation):
        validate_scope([_stmt(["s3:GetObject"], [resource])], RULES)


@pytest.mark.parametrize(
    "resource",
    ["*", "arn:aws:s3:::*", "arn:aws:dynamodb:us-east-1:123456789012:*"],
)
def test_whole_resource_wildcard_allowed_when_policy_allows(resource: str) -> None:
    scope = [_stmt(["s3:GetObject"], [resource])]
    assert validate_scope(scope, _rules(allow_resource_wildcard=True)) == []


@pytest.mark.parametrize(
    "resource",
    [
        "arn:aws:s3:::agent-bucket",
        "arn:aws:s3:::agent-bucket/*",
        "arn:aws:s3:::agent-bucket/prefix/*",
        "arn:aws:dynamodb:us-east-1:123456789012:table/agent-table",
        "arn:aws:dynamodb:us-east-1:123456789012:table/*",
        "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws-us-gov:s3:::gov-bucket",
        "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-v2",
    ],
)
def test_named_resources_allowed(resource: str) -> None:
    assert validate_scope([_stmt(["s3:GetObject"], [resource])], RULES) == []


@pytest.mark.parametrize(
    "resource",
    ["agent-bucket", "s3://agent-bucket/*", "arn:aws:s3", "arn:azure:s3:::bucket", "", "**"],
)
@pytest.mark.parametrize("allow_wildcard", [False, True])
def test_non_arn_resource_refused(resource: str, allow_wildcard: bool) -> None:
    scope = [_stmt(["s3:GetObject"]), _stmt(["s3:GetObject"], [BUCKET, resource])]
    with pytest.raises(RuleViolation) as info:
        validate_scope(scope, _rules(allow_resource_wildcard=allow_wildcard))
    assert info.value.field == "scope[1].resources[1]"
    assert repr(resource) in info.value.message
    assert "not an ARN" in info.value.message


def test_actions_are_checked_before_resources_of_the_same_statement() -> None:
    with pytest.raises(RuleViolation) as info:
        validate_scope([_stmt(["iam:CreateUser"], ["*"])], RULES)
    assert info.value.field == "scope[0].actions[0]"


def test_empty_scope_refused() -> None:
    with pytest.raises(RuleViolation) as info:
        validate_scope([], RULES)
    assert info.value.field == "scope"


def test_max_statements_allowed() -> None:
    assert validate_scope([_stmt(["s3:GetObject"])] * MAX_STATEMENTS, RULES) == []


def test_too_many_statements_refused() -> None:
    with pytest.raises(RuleViolation) as info:
        validate_scope([_stmt(["s3:GetObject"])] * (MAX_STATEMENTS + 1), RULES)
    assert info.value.field == "scope"
    assert str(MAX_STATEMENTS) in info.value.message


# --- validate_rule_pattern ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["*:Delete*", "iam:*", "*", "*:Put*Policy", "kms:Decrypt", "s3:Get?bject", "i*:*"],
)
def test_rule_pattern_accepted(pattern: str) -> None:
    assert validate_rule_pattern("forbidden_actions[0]", pattern) == pattern


@pytest.mark.parametrize("pattern", ["not a pattern", "", "iam", "iam:", ":*", "iam:Create User"])
def test_rule_pattern_refused(pattern: str) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_rule_pattern("sensitive_actions[3]", pattern)
    assert info.value.field == "sensitive_actions[3]"
    assert repr(pattern) in info.value.message


# --- validate_cidrs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ([], []),
        (["10.0.0.1/8"], ["10.0.0.0/8"]),
        (["10.0.0.0/8", "192.168.1.77/24"], ["10.0.0.0/8", "192.168.1.0/24"]),
        (["203.0.113.5"], ["203.0.113.5/32"]),
        (["2001:db8::1/32"], ["2001:db8::/32"]),
        (["0.0.0.0/0"], ["0.0.0.0/0"]),
    ],
)
def test_cidrs_normalised(given: list[str], normalised: list[str]) -> None:
    assert validate_cidrs(given) == normalised


@pytest.mark.parametrize(
    ("cidrs", "field"),
    [
        (["garbage"], "allowed_cidrs[0]"),
        (["10.0.0.0/8", "10.0.0.0/33"], "allowed_cidrs[1]"),
        (["10.0.0.0/8", "192.168.0.0/16", "300.1.1.1/24"], "allowed_cidrs[2]"),
        (["10.0.0.0/8", ""], "allowed_cidrs[1]"),
        (["10.0.0/8/8"], "allowed_cidrs[0]"),
    ],
)
def test_bad_cidr_refused(cidrs: list[str], field: str) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_cidrs(cidrs)
    assert info.value.field == field
    assert "not a CIDR" in info.value.message


# --- validate_trust_principal ------------------------------------------------------------


@pytest.mark.parametrize(
    "principal",
    [
        "arn:aws:iam::123456789012:role/agent-runtime",
        "arn:aws:iam::123456789012:role/service-role/path/agent_runtime+x=y,z.w@q",
        "arn:aws:iam::123456789012:user/ci-runner",
        "arn:aws:iam::123456789012:root",
        "arn:aws:sts::123456789012:assumed-role/runtime-role/session-1",
        "arn:aws-us-gov:iam::123456789012:role/agent",
        "bedrock.amazonaws.com",
        "lambda.amazonaws.com",
        "ecs-tasks.amazonaws.com",
    ],
)
def test_trust_principal_accepted_for_role(principal: str) -> None:
    assert validate_trust_principal(NhiKind.IAM_ROLE, principal) == principal


@pytest.mark.parametrize("principal", [None, ""])
def test_trust_principal_required_for_role(principal: str | None) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_trust_principal(NhiKind.IAM_ROLE, principal)
    assert info.value.field == "trust_principal"
    assert "required" in info.value.message


@pytest.mark.parametrize(
    "principal",
    [
        "*",
        "bedrock",
        "amazonaws.com",
        "https://bedrock.amazonaws.com",
        "bedrock.amazonaws.com.evil.example",
        "arn:aws:iam::12345:role/agent",
        "arn:aws:iam::123456789012:role/*",
        "arn:aws:iam::123456789012:group/admins",
        "arn:aws:s3:::agent-bucket",
        "arn:aws:sts::123456789012:role/agent",
        "123456789012",
    ],
)
def test_garbage_trust_principal_refused(principal: str) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_trust_principal(NhiKind.IAM_ROLE, principal)
    assert info.value.field == "trust_principal"
    assert repr(principal) in info.value.message


@pytest.mark.parametrize(
    "principal", ["arn:aws:iam::123456789012:role/agent-runtime", "bedrock.amazonaws.com"]
)
def test_trust_principal_refused_for_access_key(principal: str) -> None:
    with pytest.raises(RuleViolation) as info:
        validate_trust_principal(NhiKind.IAM_USER_KEY, principal)
    assert info.value.field == "trust_principal"
    assert "iam_user_key" in info.value.message


@pytest.mark.parametrize("principal", [None, ""])
def test_no_trust_principal_for_access_key(principal: str | None) -> None:
    assert validate_trust_principal(NhiKind.IAM_USER_KEY, principal) is None


# --- identity_name -----------------------------------------------------------------------

NHI_ID = uuid.UUID("0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize("prefix", ["nhi", "ab", "abcdefgh"])
@pytest.mark.parametrize(
    "agent_name",
    ["abc", "invoice-bot", "a" * 63, "a" * 26 + "-" + "b" * 36, "ab" + "-" * 30 + "c" * 31],
)
def test_identity_name_shape(prefix: str, agent_name: str) -> None:
    name = identity_name(prefix, agent_name, NHI_ID)
    assert name == identity_name(prefix, agent_name, NHI_ID)
    assert len(name) <= 64
    assert name.startswith(f"{prefix}-")
    assert name.endswith(f"-{NHI_ID.hex}")
    assert "--" not in name
    assert re.fullmatch(r"[\w+=,.@-]{1,64}", name)


def test_identity_name_keeps_short_agent_names_whole() -> None:
    assert identity_name("nhi", "invoice-bot", NHI_ID) == f"nhi-invoice-bot-{NHI_ID.hex}"


def test_identity_name_truncates_long_agent_name_to_exactly_64() -> None:
    name = identity_name("nhi", "a" * 63, NHI_ID)
    assert len(name) == 64
    assert name == f"nhi-{'a' * 27}-{NHI_ID.hex}"


def test_identity_name_drops_dash_left_at_truncation_point() -> None:
    agent = "a" * 26 + "-" + "b" * 36  # the 27-char budget ends on the dash
    assert identity_name("nhi", agent, NHI_ID) == f"nhi-{'a' * 26}-{NHI_ID.hex}"


def test_identity_name_differs_per_nhi() -> None:
    other = uuid.UUID("fedcba9876543210fedcba9876543210")
    assert identity_name("nhi", "bot", NHI_ID) != identity_name("nhi", "bot", other)


# --- IAM documents -----------------------------------------------------------------------

EXPIRES = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
SCOPE = [
    _stmt(["s3:GetObject", "s3:ListBucket"], [BUCKET, "arn:aws:s3:::agent-bucket"]),
    _stmt(["kms:Decrypt"], ["arn:aws:kms:us-east-1:123456789012:key/abc"]),
]


@pytest.mark.parametrize("cidrs", [[], ["10.0.0.0/8"], ["10.0.0.0/8", "2001:db8::/32"]])
def test_identity_policy_document(cidrs: list[str]) -> None:
    doc = identity_policy_document(SCOPE, cidrs, EXPIRES)
    assert doc["Version"] == "2012-10-17"
    assert len(doc["Statement"]) == len(SCOPE)
    for i, (statement, scope) in enumerate(zip(doc["Statement"], SCOPE, strict=True)):
        assert statement["Sid"] == f"Scope{i}"
        assert statement["Effect"] == "Allow"
        assert statement["Action"] == scope.actions
        assert statement["Resource"] == scope.resources
        condition = statement["Condition"]
        assert condition["DateLessThan"] == {"aws:CurrentTime": "2030-01-02T03:04:05Z"}
        assert condition["DateLessThan"]["aws:CurrentTime"] == EXPIRES.strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        if cidrs:
            assert condition["IpAddress"] == {"aws:SourceIp": cidrs}
            assert set(condition) == {"DateLessThan", "IpAddress"}
        else:
            assert set(condition) == {"DateLessThan"}
    json.dumps(doc)  # serialisable as is


def test_identity_policy_document_does_not_share_caller_lists() -> None:
    cidrs = ["10.0.0.0/8"]
    doc = identity_policy_document(SCOPE, cidrs, EXPIRES)
    cidrs.append("192.168.0.0/16")
    doc["Statement"][0]["Action"].append("s3:DeleteObject")
    assert doc["Statement"][0]["Condition"]["IpAddress"]["aws:SourceIp"] == ["10.0.0.0/8"]
    assert SCOPE[0].actions == ["s3:GetObject", "s3:ListBucket"]


@pytest.mark.parametrize(
    ("principal", "key"),
    [
        ("bedrock.amazonaws.com", "Service"),
        ("lambda.amazonaws.com", "Service"),
        ("arn:aws:iam::123456789012:role/agent-runtime", "AWS"),
        ("arn:aws:iam::123456789012:root", "AWS"),
        ("arn:aws:sts::123456789012:assumed-role/runtime/session", "AWS"),
    ],
)
def test_trust_policy_document(principal: str, key: str) -> None:
    assert trust_policy_document(principal) == {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {key: principal}, "Action": "sts:AssumeRole"}
        ],
    }


def test_policy_size_counts_compact_json() -> None:
    assert policy_size({"a": 1}) == len('{"a":1}')
    assert policy_size({"a": [1, 2], "b": "x y"}) == len('{"a":[1,2],"b":"x y"}')
    doc = identity_policy_document(SCOPE, ["10.0.0.0/8"], EXPIRES)
    compact = json.dumps(doc, separators=(",", ":"))
    assert policy_size(doc) == len(compact)
    assert policy_size(doc) < len(json.dumps(doc, indent=2))
    assert policy_size(doc) < INLINE_POLICY_LIMIT[NhiKind.IAM_USER_KEY]


def test_inline_policy_limits() -> None:
    assert INLINE_POLICY_LIMIT == {NhiKind.IAM_ROLE: 10240, NhiKind.IAM_USER_KEY: 2048}


def test_the_quarantine_policies_fit_in_the_reserve_the_scope_leaves_them() -> None:
    """IAM's limit holds for all of an identity's inline policies together: a scope that took
    all of it would make IAM refuse the quarantine's deny-all and session revocation."""
    from activities.providers.aws_iam import deny_all, deny_sessions_issued_before

    quarantine = policy_size(json.loads(deny_all())) + policy_size(
        json.loads(deny_sessions_issued_before(EXPIRES))
    )
    assert quarantine <= QUARANTINE_POLICY_RESERVE
    for kind, limit in INLINE_POLICY_LIMIT.items():
        assert scope_policy_limit(kind) + quarantine <= limit


# --- check_trust_account: whom a role may trust, by account ------------------------------

OWN, PARTNER, STRANGER = "123456789012", "210987654321", "999999999999"


@pytest.mark.parametrize(
    ("principal", "allowed", "services"),
    [
        (f"arn:aws:iam::{OWN}:role/support-bot-runtime", [], False),  # the README's example
        (f"arn:aws:iam::{OWN}:root", [], False),
        (f"arn:aws:sts::{OWN}:assumed-role/runtime/session-1", [], False),
        (f"arn:aws:iam::{PARTNER}:role/agent", [PARTNER], False),
        (f"arn:aws-us-gov:iam::{PARTNER}:user/ci", [STRANGER, PARTNER], False),
        ("bedrock.amazonaws.com", [], True),
    ],
)
def test_trust_within_the_accounts_the_policy_names(
    principal: str, allowed: list[str], services: bool
) -> None:
    check_trust_account(
        principal,
        own_account=OWN,
        allowed_accounts=allowed,
        allow_service_principals=services,
        label="aws/iam_role/dev",
    )


@pytest.mark.parametrize(
    ("principal", "allowed", "services", "words"),
    [
        (f"arn:aws:iam::{STRANGER}:root", [], True, f"account {STRANGER}"),
        (f"arn:aws:iam::{STRANGER}:role/x", [PARTNER], True, "allowed_trust_accounts"),
        (f"arn:aws:sts::{STRANGER}:assumed-role/r/s", [], False, f"account {STRANGER}"),
        ("bedrock.amazonaws.com", [OWN, PARTNER], False, "allow_service_principals"),
        ("not-an-arn", [], False, "account"),
    ],
)
def test_trust_outside_the_policy_is_refused(
    principal: str, allowed: list[str], services: bool, words: str
) -> None:
    with pytest.raises(RuleViolation) as info:
        check_trust_account(
            principal,
            own_account=OWN,
            allowed_accounts=allowed,
            allow_service_principals=services,
            label="aws/iam_role/dev",
        )
    assert info.value.field == "trust_principal"
    assert words in info.value.message and "aws/iam_role/dev" in info.value.message


def test_principal_accounts() -> None:
    assert principal_account(f"arn:aws:iam::{PARTNER}:root") == PARTNER
    assert principal_account("lambda.amazonaws.com") is None
    assert principal_account("garbage") == ""
