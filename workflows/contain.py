"""The containment playbook (issue 17): every credential of one agent made dead, and proven so.

One run per agent at a time, id `nhi-contain-<agent id>` (`containment_workflow_id`), started by
`POST /v1/agents/{id}/contain` (security) or automatically for a severe finding. Each pass, for
every NHI of the agent in parallel:

1. the provider's own containment (`ProviderActivities.quarantine`: AWS deny-all, keys
   inactive, older role sessions revoked; Postgres NOLOGIN on every login and task role and
   their sessions ended) and, alongside, the NHI's lifecycle asked to decommission
   (`hold_lifecycle`), so the lifecycle records the quarantine and never rotates or renews
   while contained;
2. its live task credentials ended (Postgres task roles dropped, rows ended);
3. the quarantine verified from the platform's state, then each credential tried
   (`prove_dead`: STS with the key, a login with the password).

The pass is recorded on the incident with one entry per credential and a timeline:
`contained` when every proof passed, else `partially_contained` with the cause, and the
owner and the security channel are told. A partial containment is passed again every
CONTAIN_RETRY_DELAY (re-reading the agent's NHIs and task credentials) until it holds or the
incident is released (the `release` signal, sent by the release API before it restores).
Quarantine is idempotent and never lifted here: passes only ever add containment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.contain import (
        ContainActivities,
        ContainPlan,
        CredentialProof,
        EndTasks,
        HoldLifecycle,
        NhiTarget,
        PassRecord,
        ProveDead,
    )
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from models.contracts import AlertPost, ContainAgentInput, IdentityRef
    from models.enums import IncidentStatus
    from nhi.rules.ids import CONTAIN_WORKFLOW
    from nhi.rules.lifecycle import HOLD_FAILED
    from workflows.provisioning import IDENTITY_REFS
    from workflows.retry_policies import (
        CONTAIN_PLATFORM_RETRY,
        CONTAIN_RETRY_DELAY,
        CONTAIN_STEP_RETRY,
        CONTAIN_TIMEOUT,
        CONTAIN_VERIFY_RETRY,
        DB_RETRY,
        PLATFORM_HEARTBEAT,
        PLATFORM_TIMEOUT,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        VERIFY_TIMEOUT,
        failure_reason,
    )

T = TypeVar("T")

# Passes per run before continuing as new (a containment retried for days keeps a short history).
PASSES_PER_RUN = 50
# Proof lines quoted in a partial containment's alert; the incident has them all.
ALERT_LINES = 10


class _NhiOutcome:
    """What one NHI's part of a pass came to."""

    def __init__(self, proofs: list[CredentialProof], lifecycle: str, line: str) -> None:
        self.proofs = proofs
        self.lifecycle = lifecycle
        self.line = line


@workflow.defn(name=CONTAIN_WORKFLOW)
class ContainAgentWorkflow:
    """Quarantines every credential of an agent and proves each one dead."""

    def __init__(self) -> None:
        self._released = False
        self._status = IncidentStatus.CONTAINING

    @workflow.signal
    def release(self) -> None:
        """The incident is being released: stop passing (the API restores afterwards)."""
        self._released = True

    @workflow.query
    def status(self) -> IncidentStatus:
        """The incident's status as of the last pass."""
        return self._status

    @workflow.run
    async def run(self, inp: ContainAgentInput) -> IncidentStatus:
        """Pass until contained (or released); the incident's status at the end."""
        notified: IncidentStatus | None = None
        attempt = inp.passes
        while True:
            # The inventory: retried as long as the lifecycle's own writes are (DB_RETRY).
            plan: ContainPlan = await self._step(ContainActivities.plan_containment, inp, DB_RETRY)
            attempt += 1
            status = await self._pass(plan, inp, attempt)
            self._status = status
            if status is not notified and status is not IncidentStatus.RELEASED:
                await self._notify(plan, status, attempt)
                notified = status
            if status is not IncidentStatus.PARTIALLY_CONTAINED or self._released:
                return status
            if attempt - inp.passes >= PASSES_PER_RUN:
                workflow.continue_as_new(
                    inp.model_copy(update={"incident_id": plan.incident_id, "passes": attempt})
                )
            delay = (
                timedelta(seconds=inp.retry_seconds) if inp.retry_seconds else CONTAIN_RETRY_DELAY
            )
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._released,
                    timeout=delay,
                    timeout_summary="next containment pass",
                )
            if self._released:
                return IncidentStatus.RELEASED
            inp = inp.model_copy(update={"incident_id": plan.incident_id})

    async def _pass(
        self, plan: ContainPlan, inp: ContainAgentInput, attempt: int
    ) -> IncidentStatus:
        started = workflow.now()
        tasks = sum(len(t.tasks) for t in plan.nhis)
        outcomes = await asyncio.gather(*(self._contain(plan, t, inp) for t in plan.nhis))
        took = (workflow.now() - started).total_seconds()
        timeline = [
            _line(
                started,
                "pass",
                f"attempt {attempt}: {len(plan.nhis)} NHIs and {tasks} task credentials",
            ),
            *(_line(workflow.now(), "nhi", o.line) for o in outcomes),
        ]
        proofs = [p for o in outcomes for p in o.proofs]
        dead = sum(p.proven for p in proofs)
        timeline.append(
            _line(workflow.now(), "proven", f"{dead} of {len(proofs)} dead after {took:.1f}s")
        )
        info = workflow.info()
        status: IncidentStatus = await self._step(
            ContainActivities.record_pass,
            PassRecord(
                incident_id=plan.incident_id,
                attempt=attempt,
                credentials=proofs,
                lifecycles={
                    str(t.nhi_id): o.lifecycle for t, o in zip(plan.nhis, outcomes, strict=True)
                },
                timeline=timeline,
                key=f"containment/{info.run_id}/{attempt}",
            ),
            DB_RETRY,
        )
        return status

    async def _contain(
        self, plan: ContainPlan, target: NhiTarget, inp: ContainAgentInput
    ) -> _NhiOutcome:
        """One NHI: its lifecycle held while the credentials are killed and tried (the hold
        is not on the path to the proofs: the provider's quarantine already holds)."""
        held, (actions, proofs) = await asyncio.gather(
            self._try(
                lambda: self._step(
                    ContainActivities.hold_lifecycle,
                    HoldLifecycle(
                        incident_id=plan.incident_id,
                        nhi_id=target.nhi_id,
                        reason=inp.reason,
                        principal=inp.actor,
                    ),
                )
            ),
            self._kill(plan, target),
        )
        lifecycle = f"{HOLD_FAILED}: {held}" if isinstance(held, _Failed) else str(held)
        name = target.plan.identity_name
        line = f"{name} ({target.plan.platform.value}): {'; '.join(actions)}; lifecycle {lifecycle}"
        return _NhiOutcome(proofs, lifecycle, line[:1000])

    # Today's runs hand the provider only the identity (patch `identity-ref-activities`).
    async def _quarantine(self, target: NhiTarget) -> list[str]:
        if workflow.patched(IDENTITY_REFS):
            return await workflow.execute_activity_method(
                ProviderActivities.quarantine_identity,
                IdentityRef.of_plan(target.plan),
                start_to_close_timeout=PLATFORM_TIMEOUT,
                heartbeat_timeout=PLATFORM_HEARTBEAT,
                retry_policy=CONTAIN_PLATFORM_RETRY,
            )
        return await workflow.execute_activity_method(
            ProviderActivities.quarantine,
            target.plan,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=CONTAIN_PLATFORM_RETRY,
        )

    async def _verify(self, target: NhiTarget) -> None:
        if workflow.patched(IDENTITY_REFS):
            await workflow.execute_activity_method(
                ProviderActivities.verify_identity_quarantined,
                IdentityRef.of_plan(target.plan),
                start_to_close_timeout=VERIFY_TIMEOUT,
                retry_policy=CONTAIN_VERIFY_RETRY,
            )
            return
        await workflow.execute_activity_method(
            ProviderActivities.verify_quarantine,
            target.plan,
            start_to_close_timeout=VERIFY_TIMEOUT,
            retry_policy=CONTAIN_VERIFY_RETRY,
        )

    async def _kill(
        self, plan: ContainPlan, target: NhiTarget
    ) -> tuple[list[str], list[CredentialProof]]:
        """Quarantine, end the task credentials, verify, try each credential."""
        quarantined = await self._try(lambda: self._quarantine(target))
        actions: list[str] = (
            [f"quarantine failed: {quarantined}"]
            if isinstance(quarantined, _Failed)
            else [f"quarantined ({', '.join(quarantined) or 'nothing left'})"]
        )
        if target.tasks:
            ended = await self._try(
                lambda: self._step(
                    ContainActivities.end_task_credentials,
                    EndTasks(
                        incident_id=plan.incident_id,
                        tasks=target.tasks,
                        target=target.plan.target,
                    ),
                )
            )
            actions += ended if isinstance(ended, list) else [f"task credentials: {ended}"]
        # Both only read the platform: the state check and the tries run side by side.
        verified, proofs = await asyncio.gather(
            self._try(lambda: self._verify(target)),
            self._try(
                lambda: self._step(
                    ContainActivities.prove_dead,
                    ProveDead(nhi_id=target.nhi_id, plan=target.plan, tasks=target.tasks),
                )
            ),
        )
        actions.append(
            "verified" if not isinstance(verified, _Failed) else f"not verified: {verified}"
        )
        action = "; ".join(actions)[:2000]
        found = [] if isinstance(proofs, _Failed) else list(proofs)
        if isinstance(proofs, _Failed):
            found.append(self._unproven(target, f"could not be tried: {proofs.reason}"))
        if isinstance(verified, _Failed):
            # What a try cannot see (a session still open, a key still active) is a live
            # credential too: the NHI is not contained until its state says so.
            found.append(self._unproven(target, f"quarantine not verified: {verified.reason}"))
        return actions, [p.model_copy(update={"action": action}) for p in found]

    @staticmethod
    def _unproven(target: NhiTarget, why: str) -> CredentialProof:
        return CredentialProof(
            credential=f"{target.plan.kind.value} {target.plan.identity_name}",
            kind="identity",
            platform=target.plan.platform,
            nhi_id=target.nhi_id,
            proof=why,
            proven=False,
            method="state",
            at=workflow.now(),
        )

    async def _notify(self, plan: ContainPlan, status: IncidentStatus, attempt: int) -> None:
        if status is IncidentStatus.CONTAINED:
            text = (
                f"Agent {plan.agent_name} is contained (incident {plan.incident_id}): every "
                f"credential of its {len(plan.nhis)} NHIs was tried and refused. Release needs "
                "a second person: `nhi release`."
            )
        else:
            text = (
                f"Agent {plan.agent_name} is only PARTIALLY contained (incident "
                f"{plan.incident_id}, pass {attempt}): some credentials are not proven dead "
                f"(see `nhi incidents show {plan.incident_id}`). Containment is retried every "
                f"{CONTAIN_RETRY_DELAY}."
            )
        for post in (
            AlertPost(text=text, email=plan.owner_email),
            AlertPost(text=text, security=True),
        ):
            try:
                await workflow.execute_activity_method(
                    SlackActivities.send_alert,
                    post,
                    start_to_close_timeout=SLACK_TIMEOUT,
                    retry_policy=SLACK_RETRY,
                )
            except ActivityError as err:
                workflow.logger.warning("containment alert not sent: %s", failure_reason(err))

    @staticmethod
    async def _step(
        method: Callable[..., Any], arg: Any, retry: RetryPolicy = CONTAIN_STEP_RETRY
    ) -> Any:
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=CONTAIN_TIMEOUT,
            retry_policy=retry,
        )

    @staticmethod
    async def _try(call: Callable[[], Awaitable[T]]) -> T | _Failed:
        """An activity whose failure is part of the report, not the run's end."""
        try:
            return await call()
        except ActivityError as err:
            return _Failed(failure_reason(err))


class _Failed:
    """An activity that failed, with its reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason[:500]

    def __str__(self) -> str:
        return self.reason


def _line(at: datetime, event: str, detail: str) -> dict[str, str]:
    return {"at": at.isoformat(), "event": event, "detail": detail}
