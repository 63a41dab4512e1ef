"""The containment playbook's activities (issue 17): open the incident, hold each NHI's
lifecycle, end task credentials, prove each credential dead by trying it, record each pass.

Quarantining itself is the providers' own containment (`ProviderActivities.quarantine` and
`verify_quarantine`, the lifecycle's path): the workflow calls those directly, so containment
reaches the platform at once whatever the state of each NHI's lifecycle. `hold_lifecycle`
then asks the lifecycle to decommission, so it records the quarantine itself and never
rotates, renews or restores behind the incident's back (its grace period then runs: an
incident left unreleased ends in deletion, the strongest containment).

Proofs try the credential: an access key signs STS `GetCallerIdentity`, a Postgres password
logs in. Secrets are read from the secret store inside the activity and never leave it: only
ids, names and the outcome go back to the workflow's history.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities._support import heartbeating
from activities.provider import plan_of
from activities.providers import postgres_ddl as ddl
from activities.providers.aws_iam import QUARANTINE_POLICY_NAME, REVOKE_SESSIONS_POLICY_NAME
from activities.providers.postgres_reap import Reaped, reap_task_roles, reason
from activities.providers.secret_store import CURRENT, PENDING, SecretStore
from models.contracts import (
    ContainAgentInput,
    Contract,
    LifecycleAction,
    LifecycleInput,
    ProvisionPlan,
)
from models.enums import IncidentStatus, NhiKind, NhiStatus, Platform
from models.orm import Incident, Nhi, TaskCredential
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import LIFECYCLE_WORKFLOW, containment_update_id, lifecycle_workflow_id
from nhi.rules.lifecycle import HOLD_NOT_ANSWERED, STILL_PROVISIONING
from nhi.rules.task_credentials import is_task_role_name
from nhi.services import incidents
from nhi.services.target_registry import TargetResolver
from nhi.services.transitions import transition

log = logging.getLogger(__name__)

# How the lifecycle sees the incident acting: the security team may contain any NHI. The
# person (or `system:auto-contain`) goes in `principal`, which the audit trail shows.
CONTAIN_ACTOR = "security:containment"
# Containment never needs the session length; the plan's field is required, so a fixed value.
PLAN_SESSION_SECONDS = 3600
# A lifecycle that does not answer the hold within this is left to the direct quarantine
# (which already holds) and asked again on the next pass.
HOLD_WAIT_SECONDS = 10.0
# Statuses whose lifecycle may still take a decommission (a fresh run acts on it at once).
HOLDABLE = frozenset({NhiStatus.ACTIVE, NhiStatus.ROTATING, NhiStatus.EXPIRING})
# SQLSTATEs of a login the server refused (28000: NOLOGIN or no such role; 28P01: password).
REFUSED_LOGIN = frozenset({"28000", "28P01"})
REFUSED_TEXT = re.compile(
    r'not permitted to log in|password authentication failed|role "[^"]*" does not exist'
)
# STS answers that mean the key does not authenticate.
REFUSED_KEY = frozenset(
    {"InvalidClientTokenId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"}
)


# ---- payloads ---------------------------------------------------------------------------------


class TaskTarget(Contract):
    """A live task credential of the agent (its name only: its secret never existed here)."""

    credential_id: uuid.UUID
    nhi_id: uuid.UUID
    platform: Platform
    name: str


class NhiTarget(Contract):
    """One NHI to contain: its plan (what the provider activities take) and inventory status."""

    nhi_id: uuid.UUID
    status: NhiStatus
    plan: ProvisionPlan
    tasks: list[TaskTarget] = []


class ContainPlan(Contract):
    """What one containment pass acts on."""

    incident_id: uuid.UUID
    agent_name: str
    owner_email: str
    security_channel: str = ""
    nhis: list[NhiTarget] = []


class HoldLifecycle(Contract):
    """Ask one NHI's lifecycle to decommission on the incident's behalf."""

    incident_id: uuid.UUID
    nhi_id: uuid.UUID
    reason: str = ""
    principal: str = ""


class EndTasks(Contract):
    """End the live task credentials of one NHI (after its quarantine)."""

    incident_id: uuid.UUID
    tasks: list[TaskTarget] = []
    target: str | None = None


class CredentialProof(Contract):
    """One credential after containment: what was done to it, and the proof it is dead."""

    credential: str
    kind: str  # access_key | role | login | task_role | task_session | identity
    platform: Platform
    nhi_id: uuid.UUID
    task_credential_id: uuid.UUID | None = None
    action: str = ""
    proof: str
    proven: bool
    # How: `tried` (the credential was used and refused), `catalog` / `iam` (the platform's own
    # state, where no secret exists to try), `state` (the quarantine's verification failed).
    method: str = "tried"
    at: datetime


class ProveDead(Contract):
    """Try every credential of one NHI (and read the state of its task credentials)."""

    nhi_id: uuid.UUID
    plan: ProvisionPlan
    tasks: list[TaskTarget] = []
    actions: list[str] = []


class PassRecord(Contract):
    """One containment pass, for the incident's report."""

    incident_id: uuid.UUID
    attempt: int = Field(ge=1)
    credentials: list[CredentialProof] = []
    lifecycles: dict[str, str] = {}
    timeline: list[dict[str, str]] = []
    key: str


def _now() -> datetime:
    return datetime.now(UTC)


# ---- the activities ---------------------------------------------------------------------------


class ContainActivities:
    """Incident rows, lifecycle holds and proofs; one instance per worker."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        aws: AwsClients,
        targets: TargetResolver,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._aws = aws
        self._targets = targets
        self._store = SecretStore(aws.secrets)

    # ---- the incident -----------------------------------------------------------------------

    @activity.defn
    def plan_containment(self, inp: ContainAgentInput) -> ContainPlan:
        """Open (or join) the agent's incident and list what to contain: every NHI whose
        identity may exist, with its live task credentials."""
        with transaction(self._sessions) as session:
            if inp.incident_id is not None:
                incident = session.get(Incident, inp.incident_id)
                if incident is None:
                    raise ApplicationError(
                        f"incident {inp.incident_id} not found", type="NotFound", non_retryable=True
                    )
            else:
                incident, _ = incidents.open_incident(
                    session,
                    inp.agent_id,
                    reason=inp.reason,
                    actor=inp.actor,
                    person=inp.actor,
                    finding_id=inp.finding_id,
                )
            pairs, tasks = incidents.containment_targets(session, inp.agent_id)
            agent = incidents.get_agent(session, inp.agent_id)
            by_nhi: dict[uuid.UUID, list[TaskTarget]] = {}
            for t in tasks:
                by_nhi.setdefault(t.nhi_id, []).append(
                    TaskTarget(
                        credential_id=t.id,
                        nhi_id=t.nhi_id,
                        platform=Platform(t.platform),
                        name=t.name,
                    )
                )
            return ContainPlan(
                incident_id=incident.id,
                agent_name=agent.name,
                owner_email=agent.owner_email,
                security_channel=self._settings.slack_security_channel,
                nhis=[
                    NhiTarget(
                        nhi_id=nhi.id,
                        status=NhiStatus(nhi.status),
                        plan=plan_of(nhi, a, self._settings, PLAN_SESSION_SECONDS),
                        tasks=by_nhi.get(nhi.id, []),
                    )
                    for nhi, a in pairs
                ],
            )

    @activity.defn
    def record_pass(self, rec: PassRecord) -> IncidentStatus:
        """Store a pass's per-credential report and timeline; the incident's status after it."""
        with transaction(self._sessions) as session:
            return incidents.record_pass(
                session,
                rec.incident_id,
                credentials=[c.model_dump(mode="json") for c in rec.credentials],
                lifecycles=rec.lifecycles,
                timeline=rec.timeline,
                attempt=rec.attempt,
                key=rec.key,
            )

    # ---- the lifecycle ----------------------------------------------------------------------

    @activity.defn
    async def hold_lifecycle(self, hold: HoldLifecycle) -> str:
        """Ask the NHI's lifecycle to decommission (quarantine now), or start a fresh run that
        does when none runs. Returns how: `update`, `fresh_lifecycle`, or why nothing was
        needed or possible (the direct quarantine holds either way)."""
        client = activity.client()
        handle = client.get_workflow_handle(lifecycle_workflow_id(hold.nhi_id))
        action = LifecycleAction(
            actor=CONTAIN_ACTOR,
            channel="system",
            principal=hold.principal,
            reason=f"incident {hold.incident_id}: {hold.reason}"[:2000],
        )
        try:
            described = await handle.describe()
            running = described.status is WorkflowExecutionStatus.RUNNING
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND:
                raise
            running = False
        if not running:
            status = await asyncio.to_thread(self._status_of, hold.nhi_id)
            if status not in HOLDABLE:
                return f"no lifecycle runs; the NHI is {status.value}"
            await client.start_workflow(
                LIFECYCLE_WORKFLOW,
                LifecycleInput(nhi_id=hold.nhi_id, pending_decommission=action),
                id=lifecycle_workflow_id(hold.nhi_id),
                task_queue=self._settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            return "fresh_lifecycle"
        try:
            async with asyncio.timeout(HOLD_WAIT_SECONDS):
                await handle.execute_update(
                    "decommission",
                    action,
                    id=containment_update_id(hold.nhi_id, hold.incident_id),
                    result_type=None,
                )
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == STILL_PROVISIONING:
                # Active in the inventory, but its run has not taken the NHI over yet (its
                # worker restarting right after recording it active): ask again, retried.
                raise ApplicationError(
                    f"the lifecycle of nhi {hold.nhi_id} is still provisioning it",
                    type="LifecycleNotReady",
                ) from None
            # Already quarantined or decommissioning: the lifecycle holds it already.
            return f"not needed: {cause}"
        except TimeoutError:
            return f"{HOLD_NOT_ANSWERED} within {HOLD_WAIT_SECONDS:g}s"
        return "update"

    def _status_of(self, nhi_id: uuid.UUID) -> NhiStatus:
        with transaction(self._sessions) as session:
            return NhiStatus(session.get_one(Nhi, nhi_id).status)

    # ---- task credentials -------------------------------------------------------------------

    @activity.defn
    def end_task_credentials(self, inp: EndTasks) -> list[str]:
        """End one NHI's live task credentials the reaper's way: Postgres task roles dropped
        (their NOLOGIN came with the NHI's quarantine) and proven gone, AWS sessions refused by
        the role's deny policy; each row `ended` (`parent_quarantined`) with its audit event.
        A role that cannot be dropped leaves its row live for the reaper (it is NOLOGIN)."""
        if not inp.tasks:
            return []
        dropped: dict[str, str] = {}
        roles = {
            t.name: t.credential_id
            for t in inp.tasks
            if t.platform is Platform.POSTGRES and is_task_role_name(t.name)
        }
        with heartbeating():
            if roles and inp.target:
                try:
                    reaped = reap_task_roles(ddl.resolve(self._targets, inp.target), roles)
                except ApplicationError as err:
                    reaped = Reaped(failed={n: reason(err) for n in roles})
                dropped = dict.fromkeys(reaped.gone, "login role dropped")
                dropped |= {n: f"not dropped: {why}" for n, why in reaped.failed.items()}
        done: list[str] = []
        with transaction(self._sessions) as session:
            for t in inp.tasks:
                row = session.get(TaskCredential, t.credential_id, with_for_update=True)
                if row is None or row.status == "ended":
                    continue
                what = (
                    "its STS session is refused by the role's deny policy"
                    if t.platform is Platform.AWS
                    else dropped.get(t.name, "not dropped: no target")
                )
                if what.startswith("not dropped"):
                    done.append(f"task {t.name}: {what}")
                    continue
                transition(
                    session,
                    row,
                    event="task_credential.ended",
                    actor="system:containment",
                    reason=f"incident {inp.incident_id}: agent contained; {what}",
                    status="ended",
                    changes={
                        "ended_at": _now(),
                        "end_reason": "parent_quarantined",
                        "last_error": None,
                    },
                    details={"end_reason": "parent_quarantined", "incident": str(inp.incident_id)},
                    key=f"containment/{inp.incident_id}/ended",
                )
                done.append(f"task {t.name}: ended ({what})")
        return done

    # ---- proofs -----------------------------------------------------------------------------

    @activity.defn
    def prove_dead(self, inp: ProveDead) -> list[CredentialProof]:
        """Try every credential of the NHI; each entry says whether it is proven dead."""
        with heartbeating():
            if inp.plan.platform is Platform.AWS:
                return self._prove_aws(inp)
            return self._prove_postgres(inp)

    def _entry(self, inp: ProveDead, **fields: Any) -> CredentialProof:
        return CredentialProof(
            platform=inp.plan.platform,
            nhi_id=inp.nhi_id,
            action="; ".join(inp.actions)[:2000],
            at=_now(),
            **fields,
        )

    def _prove_aws(self, inp: ProveDead) -> list[CredentialProof]:
        plan = inp.plan
        if plan.kind is NhiKind.IAM_ROLE:
            proof, proven = self._role_denied(plan.identity_name)
            out = [
                self._entry(
                    inp,
                    credential=f"role {plan.identity_name}",
                    kind="role",
                    proof=proof,
                    proven=proven,
                    method="iam",
                )
            ]
            out += [
                self._entry(
                    inp,
                    credential=f"task session {t.name}",
                    kind="task_session",
                    task_credential_id=t.credential_id,
                    proof=f"session of role {plan.identity_name}: {proof}",
                    proven=proven,
                    method="iam",
                )
                for t in inp.tasks
            ]
            return out
        return self._prove_keys(inp)

    def _role_denied(self, role: str) -> tuple[str, bool]:
        try:
            names = set(self._aws.iam.list_role_policies(RoleName=role)["PolicyNames"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchEntity":
                return "role deleted", True
            return f"could not read the role's policies: {err}", False
        wanted = {QUARANTINE_POLICY_NAME, REVOKE_SESSIONS_POLICY_NAME}
        if wanted <= names:
            return "deny-all and revoke-older-sessions policies attached", True
        return f"missing {sorted(wanted - names)}", False

    def _prove_keys(self, inp: ProveDead) -> list[CredentialProof]:
        """Each delivered access key (current and pending) signs GetCallerIdentity."""
        plan = inp.plan
        values = [v for v in (self._read(plan.secret_name, s) for s in (CURRENT, PENDING)) if v]
        seen: set[str] = set()
        out: list[CredentialProof] = []
        for value in values:
            key_id = str(value.get("AccessKeyId", ""))
            if not key_id or key_id in seen:
                continue
            seen.add(key_id)
            proof, proven, method = self._try_key(
                plan.identity_name, key_id, str(value.get("SecretAccessKey", ""))
            )
            out.append(
                self._entry(
                    inp,
                    credential=f"access key {key_id}",
                    kind="access_key",
                    proof=proof,
                    proven=proven,
                    method=method,
                )
            )
        if not out:
            proof, proven = self._user_state(plan.identity_name, None)
            out.append(
                self._entry(
                    inp,
                    credential=f"user {plan.identity_name}",
                    kind="access_key",
                    proof=f"no delivered key to try; {proof}",
                    proven=proven,
                    method="iam",
                )
            )
        return out

    def _try_key(self, user: str, key_id: str, secret: str) -> tuple[str, bool, str]:
        try:
            self._aws.sts_as(key_id, secret).get_caller_identity()
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in REFUSED_KEY:
                return f"STS GetCallerIdentity refused the key ({code})", True, "tried"
            return f"STS answered {code}: the key could not be tried", False, "tried"
        except BotoCoreError as err:
            return f"STS could not be reached: {err}", False, "tried"
        # Accepted. AWS refuses an inactive key on every call, so against AWS itself this is
        # a live key. An emulator (a configured endpoint: moto) does not enforce key status;
        # there the IAM state AWS would enforce is the strongest proof available.
        state, dead = self._user_state(user, key_id)
        if self._aws.endpoint_url is None:
            return f"STS accepted the key: it is live ({state})", False, "tried"
        return (
            f"STS at {self._aws.endpoint_url} accepted the key without enforcing key status; "
            f"IAM: {state}",
            dead,
            "iam",
        )

    def _user_state(self, user: str, key_id: str | None) -> tuple[str, bool]:
        try:
            keys = self._aws.iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
            policies = set(self._aws.iam.list_user_policies(UserName=user)["PolicyNames"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchEntity":
                return "user deleted", True
            return f"could not read the user: {err}", False
        active = [k["AccessKeyId"] for k in keys if k["Status"] == "Active"]
        known = {k["AccessKeyId"] for k in keys}
        deny = QUARANTINE_POLICY_NAME in policies
        where = "" if key_id is None or key_id in known else f"key {key_id} deleted; "
        text = (
            f"{where}active keys {active or 'none'}, deny-all {'attached' if deny else 'missing'}"
        )
        return text, not active and deny

    def _read(self, name: str, stage: str) -> Mapping[str, Any] | None:
        if not name:
            return None
        try:
            return self._store.read(name, stage)
        except ClientError:
            return None

    def _prove_postgres(self, inp: ProveDead) -> list[CredentialProof]:
        plan = inp.plan
        target = ddl.resolve(self._targets, plan.target)
        out: list[CredentialProof] = []
        seen: set[str] = set()
        for stage in (CURRENT, PENDING):
            value = self._read(plan.secret_name, stage)
            login = str(value.get("username", "")) if value else ""
            if not value or not login or login in seen:
                continue
            seen.add(login)
            proof, proven = _try_login(target, value)
            out.append(
                self._entry(
                    inp, credential=f"login {login}", kind="login", proof=proof, proven=proven
                )
            )
        with ddl.admin(target, f"reading the task roles of {plan.identity_name}") as conn:
            names = ddl.names_of(plan.identity_name)
            logins = ddl.find_roles(conn, [n for n in names.logins if n not in seen])
            tasks = ddl.task_roles(conn, plan.nhi_id)
            listed = ddl.find_roles(conn, [t.name for t in inp.tasks])
        for name, role in sorted(logins.items()):
            # A login role no delivered secret names (a retired one): its state is the proof.
            out.append(
                self._entry(
                    inp,
                    credential=f"login {name}",
                    kind="login",
                    method="catalog",
                    proof="NOLOGIN in pg_roles" if not role.can_login else "can still log in",
                    proven=not role.can_login,
                )
            )
        by_name = {t.name: t for t in inp.tasks}
        for name in sorted(set(by_name) | set(tasks)):
            found = tasks.get(name) or listed.get(name)
            proof = (
                "dropped (not in pg_roles)"
                if found is None
                else ("NOLOGIN in pg_roles" if not found.can_login else "can still log in")
            )
            task = by_name.get(name)
            out.append(
                self._entry(
                    inp,
                    credential=f"task role {name}",
                    kind="task_role",
                    method="catalog",
                    task_credential_id=task.credential_id if task else None,
                    proof=proof,
                    proven=found is None or not found.can_login,
                )
            )
        if not out:
            out.append(
                self._entry(
                    inp,
                    credential=f"group {plan.identity_name}",
                    kind="login",
                    method="catalog",
                    proof="no login role left",
                    proven=True,
                )
            )
        return out


def _try_login(target: Any, value: Mapping[str, Any]) -> tuple[str, bool]:
    """Log in with a delivered Postgres credential: proven dead only when the server itself
    refused the login (a target that cannot be reached proves nothing)."""
    try:
        with psycopg.connect(
            host=str(value["host"]),
            port=int(value["port"]),
            dbname=str(value["dbname"]),
            user=str(value["username"]),
            password=str(value["password"]),
            sslmode=getattr(target, "sslmode", "prefer"),
            connect_timeout=5,
            application_name="nhi-containment-proof",
        ):
            pass
    except psycopg.OperationalError as err:
        text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if err.sqlstate in REFUSED_LOGIN or REFUSED_TEXT.search(str(err)):
            # The message names the role, never the password.
            return f"login refused: {text}"[:500], True
        return f"could not try the login: {text}"[:500], False
    except (KeyError, ValueError) as err:
        return f"the delivered secret is unusable ({type(err).__name__})", False
    return "login succeeded: the credential is live", False
