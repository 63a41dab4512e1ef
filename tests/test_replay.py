"""Replay committed workflow histories against today's workflow code: a change that would break
running provisioning or lifecycle workflows fails here, before it reaches a worker.

The histories come from `tests/test_lifecycle.py::test_a_whole_life_in_seconds` (a provisioning
run and a 75-day lifecycle with rotations, reminders, a Slack renewal and decommission, recorded
before the provider interface) and `tests/test_postgres_lifecycle.py` (a `postgres_role`'s
provisioning, rotation, renewal and decommission through the provider interface), and
`tests/test_lifecycle_faults.py` (`lifecycle_revoke_failed`: a removal that keeps failing past
the alert window, alerted once per recipient, retried and finished, on the patched code). After
a deliberate, patched change, refresh them with `NHI_RECORD_HISTORIES=1 pytest -k "whole_life or postgres_role_lives or removal_that_keeps_failing"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import WORKFLOWS

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def test_golden_histories_are_committed() -> None:
    # AWS histories from before the provider interface (legacy activity names), Postgres ones
    # from after it: both paths must keep replaying.
    assert {p.stem for p in HISTORIES} >= {
        "provision",
        "lifecycle",
        "postgres_provision",
        "postgres_lifecycle",
        "lifecycle_revoke_failed",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_deterministically(path: Path) -> None:
    text = path.read_text()
    events = json.loads(text)["events"]
    assert len(events) > 10
    history = WorkflowHistory.from_json(f"golden-{path.stem}", text)
    result = await Replayer(
        workflows=WORKFLOWS, data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
