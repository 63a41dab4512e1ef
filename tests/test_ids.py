"""The Temporal ids are history: running workflows, stored sweep rows and operators' scripts carry
them, so each format is pinned here, byte for byte, and the places that build ids build them
through `nhi.rules.ids` (one module, so two callers can never drift apart)."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

from nhi.rules import ids

NHI = uuid.UUID("0b9a3c1e-4f7d-4e2a-9c5b-1d2e3f405162")
PROMPT = uuid.UUID("5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f70819")
SWEEP = uuid.UUID("2c3d4e5f-6a7b-4c8d-9e0f-a1b2c3d4e5f6")
ROOT = Path(__file__).resolve().parent.parent


def test_workflow_ids_keep_their_formats() -> None:
    assert ids.lifecycle_workflow_id(NHI) == "nhi-0b9a3c1e-4f7d-4e2a-9c5b-1d2e3f405162"
    assert ids.provision_workflow_id(NHI) == "nhi-provision-0b9a3c1e-4f7d-4e2a-9c5b-1d2e3f405162"
    assert ids.sweep_workflow_id("aws") == "nhi-sweep-aws"
    assert ids.containment_workflow_id(NHI) == "nhi-contain-0b9a3c1e-4f7d-4e2a-9c5b-1d2e3f405162"
    assert ids.containment_workflow_id(str(NHI)) == ids.containment_workflow_id(NHI)
    assert ids.sweep_workflow_id("postgres") == "nhi-sweep-postgres"
    assert (
        ids.manual_sweep_workflow_id("aws", SWEEP)
        == "nhi-sweep-aws-manual-2c3d4e5f-6a7b-4c8d-9e0f-a1b2c3d4e5f6"
    )
    assert ids.orphan_workflow_id("iam_role", "nhi-x-1") == "nhi-orphan-iam_role-nhi-x-1"
    assert (
        ids.orphan_workflow_id("postgres_role", "nhi_x_1", "hr-db")
        == "nhi-orphan-postgres_role-hr-db-nhi_x_1"
    )
    assert ids.orphan_workflow_id("iam_role", "n", None) == ids.orphan_workflow_id("iam_role", "n")


def test_an_nhi_id_as_text_names_the_same_workflows() -> None:
    # A JSON body's `id` and the UUID the API holds must address the same run.
    for build in (ids.lifecycle_workflow_id, ids.provision_workflow_id):
        assert build(str(NHI)) == build(NHI)


def test_schedule_ids_keep_their_formats() -> None:
    assert ids.sweep_schedule_id("aws") == "nhi-sweep-aws"
    assert ids.sweep_schedule_id("postgres") == "nhi-sweep-postgres"
    assert ids.activity_import_schedule_id() == "nhi-activity-import"
    assert ids.activity_import_workflow_id() == "nhi-activity-import"
    assert (
        ids.manual_activity_import_workflow_id(SWEEP)
        == "nhi-activity-import-manual-2c3d4e5f-6a7b-4c8d-9e0f-a1b2c3d4e5f6"
    )


def test_update_ids_keep_their_formats() -> None:
    digest = hashlib.sha256(b"token:ana\x00key-1").hexdigest()[:32]
    assert ids.keyed_update_id("renew", "token:ana", "key-1") == f"renew-{digest}"
    assert ids.keyed_update_id("renew", "token:ana", None) is None
    assert ids.decide_update_id(NHI, "token:ana", "key-1") == f"decide-{digest}"
    assert ids.decide_update_id(NHI, "token:ana", None) == f"decide-{NHI}-token:ana"
    assert ids.api_answer_update_id(PROMPT, "token:ana", "key-1") == f"answer-{digest}"
    assert ids.api_answer_update_id(PROMPT, "token:ana", None) == f"api-{PROMPT}-token:ana"
    assert ids.slack_answer_update_id(PROMPT, "U123", "17.5") == f"slack-{PROMPT}-U123-17.5"
    assert ids.completion_update_id(NHI) == f"complete-{NHI}"
    assert ids.containment_update_id(NHI, SWEEP) == f"contain-{SWEEP}-{NHI}"
    assert ids.release_update_id(NHI, SWEEP) == f"release-{SWEEP}-{NHI}"
    assert (
        ids.sweep_nudge_update_id("mark_missing", NHI, SWEEP) == f"sweep-mark_missing-{NHI}-{SWEEP}"
    )


def test_keyed_update_ids_separate_callers_and_keys_and_hide_both() -> None:
    one = ids.keyed_update_id("renew", "token:ana", "k")
    assert one == ids.keyed_update_id("renew", "token:ana", "k"), "a retry names the same update"
    others = {
        ids.keyed_update_id("renew", "token:ben", "k"),  # another caller's same key
        ids.keyed_update_id("renew", "token:ana", "k2"),
        ids.keyed_update_id("decommission", "token:ana", "k"),
        # The separator keeps ("a", "bc") and ("ab", "c") apart.
        ids.keyed_update_id("renew", "token:an", "ak"),
    }
    assert one not in others and len(others) == 4
    assert one is not None and re.fullmatch(r"renew-[0-9a-f]{32}", one)
    assert "ana" not in one, "the caller never reaches the workflow's history"


def test_ids_of_different_things_never_collide() -> None:
    # A lifecycle id must never be read as another kind of run for some NHI or provider.
    built = {
        ids.lifecycle_workflow_id(NHI),
        ids.provision_workflow_id(NHI),
        ids.sweep_workflow_id("aws"),
        ids.manual_sweep_workflow_id("aws", SWEEP),
        ids.orphan_workflow_id("iam_role", "nhi-x"),
        ids.containment_workflow_id(NHI),
    }
    assert len(built) == 6
    assert ids.sweep_workflow_id("aws") == ids.sweep_schedule_id("aws"), (
        "the schedule and the runs it starts share the operator-facing name"
    )
    # A manual sweep's id starts like the scheduled ones, so one visibility prefix finds both.
    assert ids.manual_sweep_workflow_id("aws", SWEEP).startswith(ids.sweep_workflow_id("aws"))


def test_ids_are_built_only_in_the_ids_module() -> None:
    # The literal prefixes appear in code nowhere else: a new caller imports the builder.
    patterns = [
        re.compile(r"""f["']nhi-(provision-|sweep-|orphan-|contain-)?\{"""),
        re.compile(r"""f["'](sweep-|complete-|decide-|slack-|api-|contain-|release-)\{"""),
        re.compile(r"""f["']\{action\}-\{digest\}"""),
    ]
    packages = ["api", "activities", "models", "nhi", "workflows"]
    sources = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "worker.py"]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        if path != ROOT / "nhi" / "rules" / "ids.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(p.search(line) for p in patterns)
    ]
    assert offenders == []
