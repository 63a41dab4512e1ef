"""Errors keep their cause: every code the providers classify survives Temporal's failure
converter, reaches the workflow's failure reason, and a retried attempt logs one line.

The classification tables are enumerated from the providers themselves, so a code added there
is covered here. The end-to-end test runs a real worker on the Temporal dev server (the
time-skipping test server does not tell activities their retry policy) with a DeleteConflict
injected on the worker's own IAM client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from temporalio import workflow
from temporalio.api.failure.v1 import Failure
from temporalio.common import RetryPolicy
from temporalio.converter import DataConverter
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities._support import (
    PERMANENT_AWS_ERRORS,
    RETRYABLE_AWS_ERRORS,
    UNKNOWN_AWS_ERROR,
    classify_aws,
)
from activities.provider import ProviderActivities
from activities.providers.aws import AwsProvider
from activities.providers.postgres import (
    PERMANENT_SQLSTATES,
    RETRYABLE_SQLSTATES,
    classify_postgres,
)
from models.contracts import IdentityRef, ProvisionPlan, RemoveIdentity, ScopeStatement
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.logging import ACTIVITY_LOGGER, install_activity_log_filter
from nhi.rules.policy import identity_name, secret_name
from tests.helpers import inject_aws_error
from workflows.retry_policies import failure_reason


def round_trip(err: BaseException) -> BaseException:
    """Encode an exception as Temporal's default converter does for an activity failure,
    then decode it as the workflow sees it."""
    converter = DataConverter.default
    failure = Failure()
    converter.failure_converter.to_failure(err, converter.payload_converter, failure)
    return converter.failure_converter.from_failure(failure, converter.payload_converter)


def classified_aws(code: str) -> ApplicationError:
    """What a provider raises for an AWS answer with `code`: `raise classify_aws(..) from err`."""
    error = ClientError({"Error": {"Code": code, "Message": f"it said {code}"}}, "DeleteRole")
    try:
        try:
            raise error
        except ClientError as err:
            raise classify_aws(err, "deleting role r") from err
    except ApplicationError as app:
        return app


AWS_CODES = [*sorted(RETRYABLE_AWS_ERRORS | PERMANENT_AWS_ERRORS), "SomethingNew"]


@pytest.mark.parametrize("code", AWS_CODES)
def test_every_classified_aws_code_survives_the_failure_converter(code: str) -> None:
    err = classified_aws(code)
    assert err.__cause__ is not err and isinstance(err.__cause__, ClientError)
    back = round_trip(err)
    assert isinstance(back, ApplicationError)
    assert back.type == code
    assert back.message == f"it said {code} (deleting role r)"
    assert failure_reason(back) == f"{code}: it said {code} (deleting role r)"
    assert back.non_retryable is (code in PERMANENT_AWS_ERRORS)
    assert back.details[0]["code"] == code
    assert isinstance(back.cause, ApplicationError) and back.cause.type == "ClientError"


def test_an_aws_error_without_a_code_gets_a_stable_name() -> None:
    err = classified_aws("")
    back = round_trip(err)
    assert isinstance(back, ApplicationError) and back.type == UNKNOWN_AWS_ERROR
    assert not back.non_retryable


@pytest.mark.parametrize("state", sorted(RETRYABLE_SQLSTATES | PERMANENT_SQLSTATES))
def test_every_classified_sqlstate_survives_the_failure_converter(state: str) -> None:
    cls = psycopg.errors.lookup(state)
    try:
        try:
            raise cls("server text")
        except psycopg.Error as pg_err:
            # As the provider does: the psycopg error is left out (its text may quote SQL).
            raise classify_postgres(pg_err, "dropping r") from None
    except ApplicationError as app:
        err = app
    assert err.__cause__ is None
    back = round_trip(err)
    assert isinstance(back, ApplicationError)
    assert back.message == f"{cls.__name__} (SQLSTATE {state}, dropping r)"
    assert back.type in (cls.__name__, "ConcurrentUpdate")
    assert failure_reason(back) == f"{back.type}: {back.message}"
    assert back.non_retryable is (state in PERMANENT_SQLSTATES)
    assert back.details[0]["code"] == state


# ---- through a real worker -----------------------------------------------------------------------


@workflow.defn(sandboxed=False)
class RemoveOnce:
    """Runs `remove_identity` with two attempts and returns the failure reason the lifecycle
    would record."""

    @workflow.run
    async def run(self, request: RemoveIdentity) -> str:
        try:
            await workflow.execute_activity(
                "remove_identity",
                request,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=100), maximum_attempts=2
                ),
            )
        except ActivityError as err:
            return failure_reason(err)
        return "removed"


@pytest_asyncio.fixture
async def filtered() -> AsyncIterator[None]:
    install_activity_log_filter()
    yield


def role_plan(settings: Settings) -> ProvisionPlan:
    nhi_id = uuid.uuid4()
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="codes-agent",
        environment="dev",
        owner_email="ana@example.com",
        platform=Platform.AWS,
        kind=NhiKind.IAM_ROLE,
        identity_name=identity_name("nhi", "codes-agent", nhi_id),
        iam_path=settings.iam_path,
        secret_name=secret_name(settings.secret_prefix, "dev", "codes-agent", nhi_id),
        scope=[ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/*"])],
        trust_principal="bedrock.amazonaws.com",
        expires_at=datetime.now(UTC) + timedelta(days=1),
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
    )


async def remove_through_worker(
    env: WorkflowEnvironment, settings: Settings, code: str, status: int
) -> tuple[str, ProvisionPlan, AwsProvider]:
    """Create a role, then remove it through a real worker with `code` injected on DeleteRole;
    the failure reason the workflow saw."""
    clients = make_aws_clients(settings)
    provider = AwsProvider(clients, settings.iam_path)
    plan = role_plan(settings)
    provider.create(plan)
    lift = inject_aws_error(clients.iam, "DeleteRole", code, status)
    queue = f"codes-{uuid.uuid4().hex[:8]}"
    activities = ProviderActivities({Platform.AWS: provider})
    try:
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[RemoveOnce],
            activities=[activities.remove_identity],
            activity_executor=ThreadPoolExecutor(2),
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):
            reason = await env.client.execute_workflow(
                RemoveOnce.run,
                RemoveIdentity(plan=plan, force_delete_secret=True),
                id=f"codes-{plan.nhi_id}",
                task_queue=queue,
            )
    finally:
        lift()
    return reason, plan, provider


def failed_attempts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACTIVITY_LOGGER and r.levelno >= logging.WARNING]


async def test_a_retried_conflict_reaches_the_workflow_with_its_code_and_logs_one_line(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    filtered: None,
) -> None:
    caplog.set_level(logging.WARNING, logger=ACTIVITY_LOGGER)
    reason, plan, provider = await remove_through_worker(dev_env, settings, "DeleteConflict", 409)
    assert reason.startswith("DeleteConflict: injected DeleteConflict on DeleteRole")
    assert plan.identity_name in reason

    failed = failed_attempts(caplog)
    assert len(failed) == 2, [r.getMessage() for r in failed]
    retried, final = failed
    assert retried.exc_info is None  # one line, no traceback
    assert retried.getMessage().startswith("activity remove_identity (workflow codes-")
    assert "attempt 1 failed, will be retried: DeleteConflict: injected" in retried.getMessage()
    assert final.exc_info is not None  # the failure became final: its traceback is kept
    assert "Completing activity as failed" in final.getMessage()
    assert "RecursionError" not in caplog.text and "Failed building" not in caplog.text

    provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)  # blocker gone


async def test_a_permanent_refusal_is_final_at_once_and_keeps_its_traceback(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    filtered: None,
) -> None:
    caplog.set_level(logging.WARNING, logger=ACTIVITY_LOGGER)
    reason, plan, provider = await remove_through_worker(dev_env, settings, "AccessDenied", 403)
    assert reason.startswith("AccessDenied: injected AccessDenied on DeleteRole")
    assert "Operator: the worker is refused iam:DeleteRole" in reason
    [only] = failed_attempts(caplog)
    assert only.exc_info is not None
    provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
