"""`nhi dev` on a fresh data directory (embedded Postgres): ready within 60 s, the README's
examples work as written, and Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str) -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        rf"<!-- example:{name} -->\n```sh\n(.*?)```\n<!-- /example:{name} -->", readme, re.S
    )
    assert block, f"README example {name} missing"
    return block.group(1)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
async def test_nhi_dev_runs_the_readme_examples(tmp_path: Path) -> None:
    names = ("api", "temporal", "ui", "moto")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_")}
    env.update(
        NHI_DATA_DIR=str(tmp_path / "data"),
        NHI_API_PORT=str(ports["api"]),
        NHI_API_URL=f"http://127.0.0.1:{ports['api']}",
        NHI_TEMPORAL_ADDRESS=f"127.0.0.1:{ports['temporal']}",
        NHI_DEV_TEMPORAL_UI_PORT=str(ports["ui"]),
        NHI_DEV_MOTO_PORT=str(ports["moto"]),
        # As every test worker: a run that no longer replays fails instead of retrying.
        NHI_WORKER_FAIL_ON_NONDETERMINISM="true",
    )
    log = (tmp_path / "dev.log").open("w+")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "nhi"), "dev"], cwd=ROOT, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        while "ready in" not in (tmp_path / "dev.log").read_text():
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()
            assert time.monotonic() - started < 60, "not ready within 60 s"
            await asyncio.sleep(0.2)
        banner = (tmp_path / "dev.log").read_text()
        assert f"http://127.0.0.1:{ports['ui']}" in banner  # the Temporal Web UI
        assert _port_open(ports["ui"])

        api = f"http://127.0.0.1:{ports['api']}"
        for name in ("cli", "curl"):
            script = (
                _example(name)
                .replace("http://127.0.0.1:8000", api)
                .replace(".nhi/admin-token", str(tmp_path / "data" / "admin-token"))
            )
            result = await asyncio.to_thread(
                subprocess.run, ["bash", "-euo", "pipefail", "-c", script],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, (name, result.stdout, result.stderr)

        admin = (tmp_path / "data" / "admin-token").read_text().strip()
        assert admin.startswith("nhi_") and admin in banner, "make dev prints the admin token"
        assert (tmp_path / "data" / "admin-token").stat().st_mode & 0o077 == 0
        async with httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {admin}"}
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                nhis = (await http.get("/v1/nhis")).json()
                if len(nhis) == 3 and all(n["status"] == "active" for n in nhis):
                    break
                assert time.monotonic() < deadline, nhis
                await asyncio.sleep(0.2)
        assert {n["kind"] for n in nhis} == {"iam_role", "iam_user_key", "postgres_role"}
        login = next(n for n in nhis if n["kind"] == "postgres_role")
        assert login["target"] == "demo" and login["credential_ref"].startswith("arn:aws:")
        assert "nhi_demo" in login["external_id"]
        key = next(n for n in nhis if n["kind"] == "iam_user_key")
        assert key["credential_ref"].startswith("arn:aws:secretsmanager:")
        assert json.dumps(nhis).count("SecretAccessKey") == 0
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 60)
        log.close()
    assert code == 0, (tmp_path / "dev.log").read_text()[-3000:]
    for port in ports.values():
        assert not _port_open(port), f"port {port} still open after Ctrl-C"


def test_nhi_dev_refuses_two_services_on_one_port(tmp_path: Path) -> None:
    """The same port for the API and moto would start both, one failing to bind and the other
    answering in its place: refused before anything starts, in one line naming both settings."""
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_")}
    env.update(
        NHI_DATA_DIR=str(tmp_path / "data"), NHI_API_PORT=str(port), NHI_DEV_MOTO_PORT=str(port)
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "nhi"), "dev"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"NHI_API_PORT and NHI_DEV_MOTO_PORT are both set to port {port}" in result.stderr
    assert not (tmp_path / "data" / "pgdata").exists(), "nothing started"
