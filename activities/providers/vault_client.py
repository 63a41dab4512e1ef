"""A small OpenBao/Vault HTTP client: explicit timeouts, the service's own login, and every
error classified into an `ApplicationError` (the Vault counterpart of `classify_aws`).

httpx directly (no hvac): the provider needs a dozen endpoints, and owning the calls keeps
secrets out of every message. Vault's JSON error lists are quoted (trimmed): they name paths
and accessors, never a secret id or a token. A request body is never quoted.

The service authenticates with `NHI_VAULT_TOKEN`, or logs in with its own AppRole
(`NHI_VAULT_ROLE_ID` / `NHI_VAULT_SECRET_ID` at `NHI_VAULT_AUTH_MOUNT`) on first use and again
when its token is refused (expired).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import httpx
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from nhi.infra.config import Settings

TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Answers no retry can change: the request is malformed, refused or names a wrong method.
PERMANENT_STATUSES = frozenset({400, 403, 405})
_TYPES = {
    400: "VaultInvalidRequest",
    403: "VaultPermissionDenied",
    404: "VaultNotFound",
    405: "VaultUnsupportedOperation",
    412: "VaultInconsistent",
    429: "VaultRateLimited",
    500: "VaultInternalError",
    502: "VaultBadGateway",
    503: "VaultSealed",
}


def classify_vault(status: int, errors: list[str], doing: str) -> ApplicationError:
    """A Vault answer as an `ApplicationError` typed by status (`VaultPermissionDenied`...):
    permanent for 400/403/405, retryable otherwise (sealed, standby, rate limited, 5xx)."""
    kind = _TYPES.get(status, f"Vault{status}")
    detail = "; ".join(" ".join(e.split()) for e in errors)[:300] or f"HTTP {status}"
    return ApplicationError(
        f"{doing}: {kind}: {detail}", type=kind, non_retryable=status in PERMANENT_STATUSES
    )


def unreachable(err: httpx.HTTPError, doing: str) -> ApplicationError:
    """A transport failure (refused, timed out): retryable."""
    return ApplicationError(
        f"{doing}: VaultUnreachable: {type(err).__name__}", type="VaultUnreachable"
    )


def _errors(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    return [str(e) for e in errors] if isinstance(errors, list) else []


class VaultClient:
    """Blocking calls to one Vault/OpenBao server, as the service."""

    def __init__(
        self,
        addr: str,
        *,
        token: SecretStr | None = None,
        role_id: str | None = None,
        secret_id: SecretStr | None = None,
        auth_mount: str = "approle",
        namespace: str | None = None,
    ) -> None:
        if token is None and not (role_id and secret_id):
            raise ValueError("Vault needs NHI_VAULT_TOKEN or NHI_VAULT_ROLE_ID + _SECRET_ID")
        headers = {"X-Vault-Namespace": namespace} if namespace else {}
        self.addr = addr.rstrip("/")
        self._http = httpx.Client(base_url=f"{self.addr}/v1/", timeout=TIMEOUT, headers=headers)
        self._static = token
        self._token = token
        self._login = (role_id, secret_id, auth_mount)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultClient | None:
        """The client `NHI_VAULT_*` describes, or None when no Vault is configured."""
        if not settings.vault_addr:
            return None
        return cls(
            settings.vault_addr,
            token=settings.vault_token,
            role_id=settings.vault_role_id,
            secret_id=settings.vault_secret_id,
            auth_mount=settings.vault_auth_mount,
            namespace=settings.vault_namespace,
        )

    def __repr__(self) -> str:
        return f"VaultClient({self.addr})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ---- the service's own token ----------------------------------------------------------

    def _service_token(self, *, renew: bool = False) -> str:
        with self._lock:
            if self._token is not None and not renew:
                return self._token.get_secret_value()
            if self._static is not None:
                return self._static.get_secret_value()
            role_id, secret_id, mount = self._login
            assert role_id and secret_id  # checked in __init__
            token = self.login(mount, role_id, secret_id.get_secret_value())
            if token is None:
                raise ApplicationError(
                    "logging the service in to Vault: VaultPermissionDenied: its AppRole "
                    "credentials are refused",
                    type="VaultPermissionDenied",
                    non_retryable=True,
                )
            self._token = SecretStr(token)
            return token

    # ---- calls ------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        doing: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """One authenticated call; the JSON answer (None for 204, or 404 with `missing_ok`)."""
        for attempt in (0, 1):
            headers = {"X-Vault-Token": self._service_token(renew=attempt == 1)}
            try:
                response = self._http.request(
                    method, path, json=body, params=params, headers=headers
                )
            except httpx.HTTPError as err:
                raise unreachable(err, doing) from None
            # A service AppRole token that expired is refused with 403: log in once more.
            if response.status_code == 403 and attempt == 0 and self._static is None:
                continue
            break
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise classify_vault(response.status_code, _errors(response), doing)
        if response.status_code == 204 or not response.content:
            return None
        answer = response.json()
        return answer if isinstance(answer, dict) else None

    def read(self, path: str, *, doing: str) -> dict[str, Any] | None:
        """`data` of a GET, or None when the path does not exist."""
        answer = self.call("GET", path, doing=doing, missing_ok=True)
        return None if answer is None else dict(answer.get("data") or {})

    def write(self, path: str, body: dict[str, Any], *, doing: str) -> dict[str, Any]:
        """`data` of a POST (empty when Vault answers 204)."""
        answer = self.call("POST", path, doing=doing, body=body)
        return {} if answer is None else dict(answer.get("data") or {})

    def list(self, path: str, *, doing: str) -> list[str]:
        """The keys a LIST returns (none when the path does not exist)."""
        answer = self.call("LIST", path, doing=doing, missing_ok=True)
        keys = ((answer or {}).get("data") or {}).get("keys") or []
        return [str(k) for k in keys]

    def delete(self, path: str, *, doing: str) -> None:
        """DELETE; a path already gone counts as deleted."""
        self.call("DELETE", path, doing=doing, missing_ok=True)

    def login(self, mount: str, role_id: str, secret_id: str) -> str | None:
        """An AppRole login: the client token, or None when Vault refuses the credentials
        (400 "invalid role or secret ID", or the source address outside the bound CIDRs)."""
        doing = f"logging in at auth/{mount}"
        try:
            response = self._http.post(
                f"auth/{mount}/login", json={"role_id": role_id, "secret_id": secret_id}
            )
        except httpx.HTTPError as err:
            raise unreachable(err, doing) from None
        if response.status_code in (400, 403):
            return None
        if response.status_code >= 400:
            raise classify_vault(response.status_code, _errors(response), doing)
        return str(response.json()["auth"]["client_token"])

    def revoke_self(self, token: str) -> None:
        """Revoke a token a login made (a verification's), so none outlives its check."""
        with contextlib.suppress(httpx.HTTPError):  # it expires with its short TTL anyway
            self._http.post("auth/token/revoke-self", headers={"X-Vault-Token": token})
