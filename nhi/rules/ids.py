"""Every id the service gives Temporal: workflow ids, update ids and schedule ids.

Workflow ids are business-keyed (derived from the NHI, the provider, the orphaned identity), so
the API, Slack, the CLI, sweeps and tests address the same run, and a second start of the same
thing is refused or joined by Temporal instead of running twice. Update ids are derived from
what makes a request the same request (the caller and their `Idempotency-Key`, the prompt and
the click, the sweep), so Temporal applies a retried update once.

These strings are history: running workflows and stored sweep rows carry them, and operators
type them. Changing a format orphans every run started under the old one, so
`tests/test_ids.py` pins each of them.
"""

from __future__ import annotations

import hashlib
import uuid

NhiId = uuid.UUID | str
"""An NHI's id, as a UUID or its canonical text (a JSON body's `id`)."""

# --- workflow types ---
# Registered names of the workflows (their class names, as Temporal defaulted them), so code
# below the workflows layer (activities starting a run) names a workflow without importing it.

LIFECYCLE_WORKFLOW = "NhiLifecycleWorkflow"
PROVISION_WORKFLOW = "ProvisionNhiWorkflow"
CONTAIN_WORKFLOW = "ContainAgentWorkflow"
BUNDLE_WORKFLOW = "BundleWorkflow"

# --- workflow ids ---


def lifecycle_workflow_id(nhi_id: NhiId) -> str:
    """One run per NHI: started by the API with the provisioning request (it provisions the NHI
    first, then keeps it), restarted by the sweep or containment when none runs."""
    return f"nhi-{nhi_id}"


def provision_workflow_id(nhi_id: NhiId) -> str:
    """A provisioning run of its own: each NHI of a bundle, and every NHI requested before
    one-run provisioning (the rows and runs of those still name it)."""
    return f"nhi-provision-{nhi_id}"


def bundle_workflow_id(bundle_id: NhiId) -> str:
    """One run per bundle of NHIs requested together (approved and provisioned together)."""
    return f"nhi-bundle-{bundle_id}"


def containment_workflow_id(agent_id: NhiId) -> str:
    """One containment per agent at a time: a second contain (a person, an automatic finding)
    while one runs joins it instead of racing it."""
    return f"nhi-contain-{agent_id}"


def sweep_workflow_id(provider: str) -> str:
    """The scheduled sweep of a provider (the Schedule appends each fire time to it)."""
    return f"nhi-sweep-{provider}"


def manual_sweep_workflow_id(provider: str, sweep_id: uuid.UUID) -> str:
    """A sweep started through the API: its report row's id makes it unique."""
    return f"{sweep_workflow_id(provider)}-manual-{sweep_id}"


def task_reaper_workflow_id() -> str:
    """The scheduled task reaper (the Schedule appends each fire time to it)."""
    return "nhi-task-reaper"


def activity_import_workflow_id() -> str:
    """The scheduled activity import (the Schedule appends each fire time to it)."""
    return "nhi-activity-import"


def manual_activity_import_workflow_id(import_id: uuid.UUID) -> str:
    """An activity import started through the API (`nhi activity import`)."""
    return f"{activity_import_workflow_id()}-manual-{import_id}"


def orphan_workflow_id(kind: str, name: str, target: str | None = None) -> str:
    """One removal per orphaned identity, however many sweeps find it."""
    where = f"{target}-" if target else ""
    return f"nhi-orphan-{kind}-{where}{name}"


# --- schedule ids ---


def sweep_schedule_id(provider: str) -> str:
    """The Temporal Schedule that starts a provider's sweeps (same text as their workflow id)."""
    return f"nhi-sweep-{provider}"


def activity_import_schedule_id() -> str:
    """The Temporal Schedule of the activity import (same text as its workflow id)."""
    return "nhi-activity-import"


def task_reaper_schedule_id() -> str:
    """The Temporal Schedule that starts the task reaper (same text as its workflow id)."""
    return "nhi-task-reaper"


# --- update ids ---


def keyed_update_id(action: str, principal: str, key: str | None) -> str | None:
    """The update id of an API action sent with an `Idempotency-Key` (None without one): the
    same caller and key always name the same update, so Temporal applies a retried one once.
    Hashed, so neither the caller nor the key (which a client may reuse elsewhere) shows up in
    the workflow's history."""
    if key is None:
        return None
    digest = hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()[:32]
    return f"{action}-{digest}"


def decide_update_id(nhi_id: NhiId, approver: str, key: str | None) -> str:
    """An approval decision: keyed when the caller sent a key, else one per approver and NHI
    (a retried HTTP call from the same approver is applied once)."""
    return keyed_update_id("decide", approver, key) or f"decide-{nhi_id}-{approver}"


def api_answer_update_id(prompt_id: uuid.UUID, actor: str, key: str | None) -> str:
    """A prompt answered through the API: keyed when the caller sent a key, else one answer per
    person and prompt (a retried click is applied once)."""
    return keyed_update_id("answer", actor, key) or f"api-{prompt_id}-{actor}"


def slack_answer_update_id(prompt_id: uuid.UUID, user_id: str, click: str) -> str:
    """A prompt answered by a Slack click: Slack's own retries of the click are applied once."""
    return f"slack-{prompt_id}-{user_id}-{click}"


def slack_approval_update_id(approval_id: uuid.UUID, user_id: str, click: str) -> str:
    """An approval decided in Slack: Slack's retries of one click are applied once, and any
    other click reaches the workflow, which refuses a second decision."""
    return f"slack-approval-{approval_id}-{user_id}-{click}"


def completion_update_id(nhi_id: NhiId) -> str:
    """The decommission an agent's completion asks of each of its NHIs: once per NHI."""
    return f"complete-{nhi_id}"


def sweep_nudge_update_id(action: str, nhi_id: NhiId, term: uuid.UUID) -> str:
    """A sweep's request to a lifecycle (`decommission`, `mark_missing`): once per sweep, so a
    retried activity is deduplicated and a later sweep's nudge is a new request."""
    return f"sweep-{action}-{nhi_id}-{term}"


def containment_update_id(nhi_id: NhiId, incident_id: uuid.UUID) -> str:
    """An incident's hold on one NHI's lifecycle (a decommission): once per incident and NHI,
    however many containment passes send it."""
    return f"contain-{incident_id}-{nhi_id}"


def release_update_id(nhi_id: NhiId, incident_id: uuid.UUID) -> str:
    """An incident's release of one NHI's lifecycle (a restore): once per incident and NHI."""
    return f"release-{incident_id}-{nhi_id}"
