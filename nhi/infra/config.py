"""The one settings class. Every entrypoint builds it and passes it down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.schemas import SslMode, TargetName
from nhi.infra.codec import parse_keys
from nhi.rules.targets import parse_dsn, password_ref, prefixes_overlap, secret_name, under_prefix


class PostgresTargetSetting(BaseModel):
    """One Postgres target defined at deploy time (an entry of `NHI_POSTGRES_TARGETS`)."""

    # Never quote a bad value back: a DSN pasted with a password in it would reach the logs.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    dsn: str = Field(description="`postgresql://admin_user@host:port/dbname`, no password.")
    password_env: str | None = Field(default=None, description="Variable holding the password.")
    password_secret: str | None = Field(
        default=None, description="Secrets Manager ARN or name of the password."
    )
    sslmode: SslMode = "prefer"
    connection_limit: int = Field(default=10, ge=1, le=1000)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        parse_dsn(value)
        return value

    @model_validator(mode="after")
    def _one_password_ref(self) -> PostgresTargetSetting:
        password_ref(self.password_env, self.password_secret)
        return self

    @property
    def password_ref(self) -> str:
        """`env:VAR` or `secret:ARN`: where the admin password is."""
        return f"env:{self.password_env}" if self.password_env else f"secret:{self.password_secret}"


class WorkloadIssuerSetting(BaseModel):
    """One issuer of workload identities (an entry of `NHI_WORKLOAD_OIDC_ISSUERS`): a platform
    whose JWTs (a Kubernetes service account token, a GitHub Actions OIDC token, a cloud
    workload identity) may stand for an agent, once a subject of it is bound to that agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(
        min_length=1, max_length=200, description="The `iss` claim, compared exactly."
    )
    audience: str = Field(
        min_length=1, max_length=200, description="The `aud` the tokens must carry for us."
    )
    jwks: dict[str, Any] | None = Field(default=None, description="The issuer's JWKS itself.")
    jwks_url: str | None = Field(
        default=None, pattern=r"^https?://", description="Where the issuer publishes its JWKS."
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> WorkloadIssuerSetting:
        if (self.jwks is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks and jwks_url")
        return self


class Settings(BaseSettings):
    """Configuration read from `NHI_*` environment variables (and `.env`).

    The README's configuration table lists every field; `tests/test_settings_doc.py`
    keeps the two in step.
    """

    # Errors never quote values: a secret or a DSN with a password would end up in the logs.
    model_config = SettingsConfigDict(
        env_prefix="NHI_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the inventory database (`postgresql+psycopg://...`). "
        "Unset in `nhi dev`: an embedded Postgres under `NHI_DATA_DIR` is started.",
    )
    temporal_address: str = Field(
        default="127.0.0.1:7233", description="Temporal frontend `host:port`."
    )
    temporal_namespace: str = Field(default="default", description="Temporal namespace.")
    temporal_task_queue: str = Field(
        default="nhi-lifecycle", description="Task queue the worker polls and the API starts on."
    )
    temporal_api_key: SecretStr | None = Field(
        default=None, description="API key for Temporal Cloud; enables TLS when set."
    )
    temporal_tls: bool = Field(default=False, description="Connect to Temporal over TLS.")
    # --- settings: codec (payload encryption, mTLS) ---
    temporal_tls_cert: Path | None = Field(
        default=None,
        description="Path of the client certificate (PEM) for mTLS to Temporal (Temporal Cloud "
        "or a cluster requiring client certificates); needs `NHI_TEMPORAL_TLS_KEY`.",
    )
    temporal_tls_key: Path | None = Field(
        default=None,
        description="Path of the client certificate's private key (PEM); read at connect, "
        "never logged.",
    )
    temporal_tls_ca: Path | None = Field(
        default=None,
        description="Path of the CA bundle (PEM) that signed Temporal's server certificate. "
        "Unset: the system roots (right for Temporal Cloud).",
    )
    temporal_tls_server_name: str | None = Field(
        default=None,
        description="Server name to verify Temporal's certificate against, when it differs "
        "from the host of `NHI_TEMPORAL_ADDRESS`.",
    )
    payload_keys: SecretStr | None = Field(
        default=None,
        description="Payload encryption keys, `kid:base64key[,kid:base64key...]` (32-byte "
        "AES-256 keys, e.g. `openssl rand -base64 32`): the first encrypts, all decrypt. "
        "Unset: payloads are stored in clear (`make dev`).",
    )
    codec_cors_origin: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+$",
        description="Origin of the Temporal Web UI allowed to call `/codec/encode` and "
        "`/codec/decode` from the browser (e.g. `https://cloud.temporal.io`). Unset: no CORS.",
    )
    aws_region: str = Field(
        default="us-east-1", description="AWS region for IAM, STS and Secrets Manager."
    )
    aws_endpoint_url: str | None = Field(
        default=None,
        description="Send every AWS call here instead of AWS (a moto server in dev and tests). "
        "Unset in production.",
    )
    aws_max_attempts: int = Field(
        default=5,
        ge=1,
        le=20,
        description="Total botocore attempts per AWS call (standard retry mode).",
    )
    iam_path: str = Field(
        default="/nhi-lifecycle/",
        pattern=r"^/([A-Za-z0-9+=,.@_-]+/)*$",
        description="IAM path for every user and role this service creates (sweeps list by it).",
    )
    task_credential_principal: str | None = Field(
        default=None,
        max_length=600,
        pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/[A-Za-z0-9_+=,.@/-]+$",
        description="IAM role or user ARN the API process issues AWS task credentials as; "
        "provisioning adds it to an iam_role's trust where the policy allows task credentials.",
    )
    task_role_stock: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Postgres task roles each API process keeps made ahead per target "
        "(NOLOGIN, password set, at most 60 s old): an issue renames one instead of paying the "
        "target's password hashing while it waits. 0: every issue makes its role.",
    )
    name_prefix: str = Field(
        default="nhi",
        pattern=r"^[a-z][a-z0-9]{1,7}$",
        description="Prefix of every identity name this service creates.",
    )
    secret_prefix: str = Field(
        default="nhi-lifecycle/",
        pattern=r"^[A-Za-z0-9/_+=.@-]*/$",
        description="Secrets Manager name prefix for delivered credentials.",
    )
    # --- settings: GitHub App (issue 20) ---
    github_api_url: str = Field(
        default="https://api.github.com",
        pattern=r"^https?://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?(/[A-Za-z0-9._/-]*)?$",
        description="GitHub REST API base URL (GitHub Enterprise Server: `https://<host>/api/v3`).",
    )
    github_app_id: str | None = Field(
        default=None,
        pattern=r"^[0-9]{1,20}$",
        description="The GitHub App's id (the JWT issuer). Unset: GitHub NHIs fail as "
        "`NotConfigured`.",
    )
    github_app_private_key_secret: str | None = Field(
        default=None,
        max_length=512,
        description="Secrets Manager name or ARN of the GitHub App's private key (PEM); read "
        "by reference at each signing, never held in settings.",
    )
    github_installation_id: int | None = Field(
        default=None, ge=1, description="The organisation's installation of the GitHub App."
    )
    # --- settings: OpenBao / Vault (issue 20) ---
    vault_addr: str | None = Field(
        default=None,
        pattern=r"^https?://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?/?$",
        description="OpenBao/Vault address (`http://127.0.0.1:8200`). Unset: no `vault` "
        "platform and no `vault_kv` delivery on this worker.",
    )
    vault_token: SecretStr | None = Field(
        default=None,
        description="Token the service acts with in Vault (else AppRole: "
        "`NHI_VAULT_ROLE_ID` + `NHI_VAULT_SECRET_ID`).",
    )
    vault_role_id: str | None = Field(
        default=None, max_length=200, description="The service's own AppRole role id."
    )
    vault_secret_id: SecretStr | None = Field(
        default=None, description="The service's own AppRole secret id."
    )
    vault_auth_mount: str = Field(
        default="approle",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Auth mount the service's own AppRole login uses.",
    )
    vault_approle_mount: str = Field(
        default="approle",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="AppRole auth mount the `vault_approle` NHIs' roles live under.",
    )
    vault_kv_mount: str = Field(
        default="secret",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="KV v2 mount `vault_kv` delivery writes under (at `NHI_SECRET_PREFIX`...).",
    )
    vault_namespace: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_/-]+$",
        description="Vault/OpenBao namespace of every call (`X-Vault-Namespace`).",
    )
    vault_dev: bool = Field(
        default=False,
        description="`make dev`: start an OpenBao dev server (`bao`) on 127.0.0.1 and use it.",
    )
    rotation_overlap_seconds: int = Field(
        default=3600,
        ge=0,
        le=7 * 86400,
        description="How long the old access key keeps working after a rotation promotes the "
        "new one (and again between deactivating and deleting it).",
    )
    revoke_retry_seconds: int = Field(
        default=6 * 3600,
        ge=60,
        description="How often a `revoke_failed` NHI's removal is tried again.",
    )
    revoke_alert_seconds: int = Field(
        default=300,
        ge=30,
        le=86400,
        description="A removal still failing after this long makes the NHI `revoke_failed` and "
        "alerts the owner and the security channel once (retries go on every "
        "`NHI_REVOKE_RETRY_SECONDS`).",
    )
    # --- settings: lifecycle (issue 11/12 helpers insert below this line) ---
    # --- settings: ops ---
    worker_http_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's health and metrics server binds to (`0.0.0.0` in a "
        "container, so probes and Prometheus reach it).",
    )
    worker_http_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Port of the worker's `/healthz`, `/readyz` and `/metrics`; 0 turns the "
        "server (and the Temporal SDK metrics it serves) off.",
    )
    metrics_refresh_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How often the API recomputes the inventory gauges of `/metrics` (one "
        "background query; never per scrape).",
    )
    # Off in production: a lifecycle whose code stopped replaying must wait (its task retried)
    # for a fixed deploy, not end. Tests turn it on, so a nondeterminism fails loudly at once.
    worker_fail_on_nondeterminism: bool = Field(
        default=False,
        description="Fail a workflow run whose history no longer replays on this code "
        "(tests and CI) instead of retrying its task until a fix is deployed (production).",
    )
    # --- settings: api ---
    api_update_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="How long an API call waits for a lifecycle to accept an action; past it "
        "the call answers 503 and the action is never applied later.",
    )
    worker_poll_fresh_seconds: float = Field(
        default=90.0,
        ge=5,
        le=3600,
        description="Readiness (`/readyz` of the API and the worker): a worker whose last poll of "
        "the task queue is older than this has stopped. Above the server's long-poll interval "
        "(Temporal's `matching.longPollExpirationInterval`, 1 minute by default).",
    )
    # --- settings: sweeps ---
    sweep_preactive_seconds: int = Field(
        default=3600,
        ge=300,
        le=7 * 86400,
        description="An NHI still `requested` or `provisioning` this long after its request, "
        "with no running provisioning workflow, is re-driven or cleaned up by the sweep.",
    )
    # --- settings: targets and auth ---
    target_secret_prefix: str = Field(
        default="nhi-targets/",
        pattern=r"^[A-Za-z0-9/_+=.@-]+/$",
        description="Secrets Manager name prefix a target's admin password must be under "
        "(never the delivery prefix `NHI_SECRET_PREFIX`).",
    )
    target_allowed_hosts: list[str] = Field(
        default_factory=list,
        description='JSON list of host patterns (`fnmatch`, e.g. `["*.db.internal"]`) a '
        "registered Postgres target may point at. Empty: no target can be registered "
        "through the API.",
    )
    identity_reuse_check: bool = Field(
        default=True,
        description="Refuse a request that would share a trust principal between agents, or a "
        "Postgres target between environments (OWASP NHI9 reuse, NHI8 environment isolation).",
    )
    dev_mode: bool = Field(
        default=False,
        description="Set by `nhi dev`: relaxes production-only checks (targets may use an "
        "sslmode other than `verify-full`). Never set in production.",
    )
    aws_account_id: str | None = Field(
        default=None,
        pattern=r"^\d{12}$",
        description="This service's own AWS account, whose principals an `iam_role` may always "
        "trust. Unset: learned once from `sts:GetCallerIdentity`.",
    )
    sweep_interval_seconds: int = Field(
        default=86400, ge=300, description="How often the scheduled sweep of each provider runs."
    )
    task_reaper_interval_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="How often the task reaper (Temporal Schedule `nhi-task-reaper`) drops "
        "expired Postgres task roles and ends expired task credentials.",
    )
    activity_s3_prefix: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="`s3://bucket/prefix` of CloudTrail (or Postgres csvlog) files imported on "
        "a schedule (`nhi-activity-import`), resuming after the last key imported; unset: no "
        "scheduled import.",
    )
    activity_import_interval_seconds: int = Field(
        default=300,
        ge=60,
        le=86400,
        description="How often the scheduled activity import runs.",
    )
    finding_alert_window_seconds: int = Field(
        default=3600,
        ge=0,
        le=604800,
        description="Activity findings of the same NHI and kind alert once within this window.",
    )
    auto_contain_severity: Literal["low", "medium", "high", "critical", "off"] = Field(
        default="critical",
        description="Activity findings at or above this severity start the agent's containment "
        "(`ContainAgentWorkflow`); `off` never does.",
    )
    sweep_calls_per_second: float = Field(
        default=10.0, gt=0, le=1000, description="Pace of a sweep's calls per provider account."
    )
    sweep_page_size: int = Field(
        default=1000,
        ge=1,
        le=1000,
        description="Identities per page of a sweep's bulk listing (IAM allows at most 1000).",
    )
    sweep_propagation_seconds: int = Field(
        default=600,
        ge=0,
        description="Identities younger than this are never called orphans (IAM lags).",
    )
    sweep_stale_days: int = Field(
        default=90, ge=1, description="An active NHI unused this long is reported stale."
    )
    orphan_grace_seconds: int = Field(
        default=86400, ge=0, description="How long a quarantined orphan waits before deletion."
    )
    postgres_targets: dict[TargetName, PostgresTargetSetting] = Field(
        default_factory=dict,
        description="JSON map of Postgres target name to `dsn` (no password) and "
        "`password_env` or `password_secret`, optional `sslmode`, `connection_limit`; "
        "wins over a registered target of the same name.",
    )
    slack_bot_token: SecretStr | None = Field(
        default=None,
        description="Bot token (`xoxb-...`). Unset: prompts go to the log and `nhi prompts`.",
    )
    slack_signing_secret: SecretStr | None = Field(
        default=None, description="Signing secret that authenticates `POST /slack/interactions`."
    )
    slack_api_url: str | None = Field(
        default=None,
        description="Slack Web API base URL (ending in `/api/`) for an emulator or proxy.",
    )
    slack_security_channel: str = Field(
        default="#nhi-security", description="Channel for security alerts (failed revocations)."
    )
    slack_team_channels: dict[str, str] = Field(
        default_factory=dict,
        description="JSON map of agent team to Slack channel for escalations, "
        'e.g. `{"search": "#search"}`.',
    )
    slack_default_team_channel: str = Field(
        default="#nhi-owners", description="Escalation channel for teams without their own."
    )
    oidc_issuer: str | None = Field(
        default=None, description="OIDC issuer whose JWTs the API accepts (unset: API tokens only)."
    )
    oidc_audience: str | None = Field(default=None, description="Audience the JWTs must carry.")
    oidc_jwks_url: str | None = Field(
        default=None, description="Where the issuer publishes its signing keys (JWKS)."
    )
    oidc_jwks: str | None = Field(
        default=None, description="The JWKS itself, as JSON (instead of `NHI_OIDC_JWKS_URL`)."
    )
    oidc_roles_claim: str = Field(
        default="roles",
        description="JWT claim listing the caller's roles (`platform`, `admin`...).",
    )
    oidc_teams_claim: str = Field(
        default="teams", description="JWT claim listing the teams a `platform` caller acts for."
    )
    oidc_email_claim: str = Field(
        default="email", description="JWT claim with the caller's email (owner rights)."
    )
    oidc_client_id: str | None = Field(
        default=None,
        description="Dashboard sign-in (`/ui/`): the OIDC client id; with the two endpoints "
        "below it enables authorization code + PKCE (the ID token's audience).",
    )
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="Dashboard sign-in: the client secret (unset: a public client)."
    )
    oidc_authorization_endpoint: str | None = Field(
        default=None, description="Dashboard sign-in: the issuer's authorization endpoint URL."
    )
    oidc_token_endpoint: str | None = Field(
        default=None, description="Dashboard sign-in: the issuer's token endpoint URL."
    )
    workload_oidc_issuers: list[WorkloadIssuerSetting] = Field(
        default_factory=list,
        description="JSON list of workload identity issuers (`issuer`, `audience`, `jwks` or "
        "`jwks_url`) whose JWTs act as the one agent their subject is bound to "
        "(`nhi agents workloads add`). Unset: none.",
    )
    ui_session_ttl_seconds: int = Field(
        default=28800,
        ge=300,
        le=7 * 86400,
        description="How long a dashboard session lasts (signing out, or revoking its API "
        "token, ends it sooner).",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds to.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL the `nhi` CLI talks to."
    )
    # A request holds its connection for the whole call (an issue: through its round trips to
    # the target; a provisioning request: through its Temporal start), and a connection beyond
    # the pool is opened for one checkout and closed on return: each costs a new Postgres
    # backend (fork and authentication). With 5, 8 concurrent issues opened one for about every
    # third issue; with 16, 32 provisioning requests in flight opened 53 extra for 300 NHIs.
    # Larger by default would crowd `max_connections` (README, Kubernetes): raise it where the
    # API's usual concurrency is higher (`nhi_db_connections_opened_total` keeps growing).
    api_database_pool_size: int = Field(
        default=16,
        ge=1,
        le=500,
        description="Database connections each API process keeps open (as many more are "
        "opened for a burst and closed after it).",
    )
    worker_max_concurrent_activities: int = Field(
        default=32, ge=1, le=1000, description="Activity slots (and threads) per worker process."
    )
    # Lifecycles sleep for days between events, so a cached run rarely saves a replay, while
    # each costs the worker ~300 KB: 400 keeps a worker well under 300 MB
    # (bench/results/memory.md).
    worker_max_cached_workflows: int = Field(
        default=400, ge=0, description="Sticky workflow cache size per worker process."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the worker, the API and `nhi dev`."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text`: one readable line per record; `json`: one JSON object per line "
        "(time, level, logger, message, trace, workflow and NHI ids where known).",
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="OTLP/HTTP collector (e.g. `http://otel-collector:4318`; spans go to "
        "`/v1/traces` under it). Unset: no tracing at all.",
    )
    data_dir: Path = Field(
        default=Path(".nhi"),
        description="Where `nhi dev` keeps the embedded Postgres, Temporal's database and logs.",
    )
    dev_moto_port: int = Field(
        default=5000, ge=1, le=65535, description="Port of the moto server `nhi dev` starts."
    )
    dev_temporal_ui_port: int = Field(
        default=8233, ge=1, le=65535, description="Port of the Temporal Web UI `nhi dev` starts."
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: str | None) -> str | None:
        # Operators paste `postgres://` or `postgresql://` URLs from their provider; the
        # service runs on psycopg 3 only, so name the driver for them.
        if value is None:
            return None
        for plain in ("postgres://", "postgresql://"):
            if value.startswith(plain):
                return "postgresql+psycopg://" + value[len(plain) :]
        return value

    @field_validator("payload_keys")
    @classmethod
    def _payload_keys(cls, value: SecretStr | None) -> SecretStr | None:
        # A bad key ring stops every entry point at start, naming the entry, never the key.
        if value is not None:
            parse_keys(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _client_cert_and_key_together(self) -> Settings:
        if (self.temporal_tls_cert is None) != (self.temporal_tls_key is None):
            raise ValueError(
                "temporal_tls_cert: NHI_TEMPORAL_TLS_CERT and NHI_TEMPORAL_TLS_KEY go together "
                "(mTLS needs both the certificate and its key)"
            )
        return self

    @model_validator(mode="after")
    def _target_passwords_never_delivered_secrets(self) -> Settings:
        # A target's admin password is sent to the target's host: were it read from under the
        # delivery prefix, a target could carry an agent's credential away.
        if prefixes_overlap(self.target_secret_prefix, self.secret_prefix):
            raise ValueError(
                "target_secret_prefix: must not be, contain or lie under NHI_SECRET_PREFIX "
                "(the delivery prefix)"
            )
        for name, target in self.postgres_targets.items():
            where = secret_name(target.password_secret or "")
            if target.password_secret and (not where or under_prefix(where, self.secret_prefix)):
                raise ValueError(
                    f"postgres_targets.{name}.password_secret: must not name a secret under "
                    "NHI_SECRET_PREFIX (the delivery prefix)"
                )
        return self

    @model_validator(mode="after")
    def _workload_issuers_apart_from_people(self) -> Settings:
        # A JWT goes to the workload path by its (iss, aud): were that pair also the company
        # IdP's, a person's token and a workload's could not be told apart.
        seen: set[str] = set()
        for i, entry in enumerate(self.workload_oidc_issuers):
            if entry.issuer in seen:
                raise ValueError(f"workload_oidc_issuers[{i}].issuer: listed twice")
            seen.add(entry.issuer)
            if (entry.issuer, entry.audience) == (self.oidc_issuer, self.oidc_audience):
                raise ValueError(
                    f"workload_oidc_issuers[{i}].audience: must differ from NHI_OIDC_AUDIENCE "
                    "for the same issuer (people's tokens and workloads' must not be confused)"
                )
        return self

    def require_database_url(self) -> str:
        """The database URL, or a clear error for entrypoints that cannot start without one."""
        if not self.database_url:
            raise RuntimeError(
                "NHI_DATABASE_URL is not set (only `nhi dev` starts an embedded Postgres)"
            )
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, built once per process."""
    return Settings()
