"""A local emulator of the GitHub REST endpoints the GitHub provider uses, for tests.

A real HTTP server on 127.0.0.1 speaking GitHub's wire format, covering exactly:

* `GET /app/installations/{id}` (app JWT): the installation's account, permissions and
  repository selection;
* `POST /app/installations/{id}/access_tokens` (app JWT): an installation token, narrowed to
  the `repositories` (names) and `permissions` asked for; 422 when the installation lacks a
  repository or a permission level, as GitHub answers;
* `DELETE /installation/token` (installation token): revokes it (204; it is then 401);
* `GET /installation/repositories` (installation token): the repositories the token reaches,
  paginated with `per_page` / `page`;
* `GET /repos/{owner}/{repo}` (metadata, implied by every token);
* `GET /repos/{owner}/{repo}/contents/{path}` (`contents:read`) and
  `PUT /repos/{owner}/{repo}/contents/{path}` (`contents:write`).

The app JWT is verified with the app's public key (RS256, `iss` = the app id, at most ten
minutes between `iat` and `exp`, not expired) against wall time, because the provider signs with
wall time. Installation tokens expire one hour after issue on the emulator's `clock`, which a
time-skipping test points at the Temporal test server's virtual time. A repository the token
does not reach is 404, a permission it lacks 403 ("Resource not accessible by integration"), an
unknown, revoked or expired token 401 ("Bad credentials"). Nothing else of GitHub is emulated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

TOKEN_SECONDS = 3600
_LEVEL = {"read": 1, "write": 2}


def new_app_key() -> tuple[str, str]:
    """A fresh RSA key pair for a test app: (private PEM, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@dataclass
class Token:
    """An installation token the emulator issued (tests read these)."""

    value: str
    repositories: frozenset[str]  # full names, lower case
    permissions: dict[str, str]
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass
class Installation:
    id: int
    owner: str
    permissions: dict[str, str]
    # None: every repository of the owner ("all"); else the selected full names.
    selected: set[str] | None = None


@dataclass
class GithubEmulator:
    """Start with `with GithubEmulator(app_id, public_pem) as gh:`; `gh.url` is the API base."""

    app_id: str
    public_key: str
    clock: Callable[[], float] = time.time
    installations: dict[int, Installation] = field(default_factory=dict)
    # full name -> path -> bytes
    repositories: dict[str, dict[str, bytes]] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    # While set, token requests answer 503 as GitHub does in an incident.
    token_outage: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- fixtures ------------------------------------------------------------------------------

    def add_installation(
        self, installation_id: int, owner: str, permissions: dict[str, str]
    ) -> None:
        with self._lock:
            self.installations[installation_id] = Installation(installation_id, owner, permissions)

    def set_permissions(self, installation_id: int, permissions: dict[str, str]) -> None:
        """What an organisation admin does when accepting or reducing the app's permissions."""
        with self._lock:
            self.installations[installation_id].permissions = dict(permissions)

    def select_repositories(self, installation_id: int, names: set[str] | None) -> None:
        with self._lock:
            self.installations[installation_id].selected = (
                None if names is None else {n.lower() for n in names}
            )

    def add_repository(self, full_name: str, files: dict[str, bytes] | None = None) -> None:
        with self._lock:
            self.repositories[full_name.lower()] = dict(files or {})

    def live_tokens(self) -> list[Token]:
        now = self.clock()
        return [t for t in self.tokens.values() if not t.revoked and t.expires_at > now]

    # ---- server --------------------------------------------------------------------------------

    def __enter__(self) -> GithubEmulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _go(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = emulator.handle(
                    method, self.path, self.headers.get("Authorization", ""), body
                )
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._go("GET")

            def do_POST(self) -> None:
                self._go("POST")

            def do_PUT(self) -> None:
                self._go("PUT")

            def do_DELETE(self) -> None:
                self._go("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- routing -------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, auth: str, body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        self.calls.append((method, path))
        if m := re.fullmatch(r"/app/installations/(\d+)", path):
            return self._as_app(auth, lambda: self._installation(int(m.group(1))), method, "GET")
        if m := re.fullmatch(r"/app/installations/(\d+)/access_tokens", path):
            if self.token_outage:
                return 503, {"message": "Service Unavailable"}
            return self._as_app(auth, lambda: self._issue(int(m.group(1)), body), method, "POST")
        token = self._token(auth)
        if token is None:
            return 401, {"message": "Bad credentials"}
        if path == "/installation/token" and method == "DELETE":
            token.revoked = True
            return 204, None
        if path == "/installation/repositories" and method == "GET":
            return self._list(token, query)
        if m := re.fullmatch(r"/repos/([^/]+)/([^/]+)", path):
            if method != "GET":
                return 404, {"message": "Not Found"}
            full = f"{m.group(1)}/{m.group(2)}".lower()
            if full not in token.repositories or full not in self.repositories:
                return 404, {"message": "Not Found"}
            return 200, self._repo(full)
        if m := re.fullmatch(r"/repos/([^/]+)/([^/]+)/contents/(.+)", path):
            return self._contents(
                token, f"{m.group(1)}/{m.group(2)}".lower(), m.group(3), method, body
            )
        return 404, {"message": "Not Found"}

    # ---- app (JWT) endpoints -------------------------------------------------------------------

    def _as_app(
        self,
        auth: str,
        then: Callable[[], tuple[int, dict[str, Any] | None]],
        method: str,
        expected: str,
    ) -> tuple[int, dict[str, Any] | None]:
        if method != expected:
            return 404, {"message": "Not Found"}
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() != "bearer":
            return 401, {"message": "A JSON web token could not be decoded"}
        try:
            claims = jwt.decode(
                credential,
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
                leeway=0,
            )
        except jwt.PyJWTError as err:
            return 401, {"message": f"A JSON web token could not be decoded ({err})"}
        if str(claims["iss"]) != self.app_id:
            return 401, {"message": "Integration not found"}
        if int(claims["exp"]) - int(claims["iat"]) > 600 or int(claims["iat"]) > time.time() + 60:
            return 401, {"message": "'Expiration time' claim ('exp') is too far in the future"}
        return then()

    def _installation(self, installation_id: int) -> tuple[int, dict[str, Any] | None]:
        inst = self.installations.get(installation_id)
        if inst is None:
            return 404, {"message": "Not Found"}
        return 200, {
            "id": inst.id,
            "account": {"login": inst.owner},
            "permissions": dict(inst.permissions),
            "repository_selection": "all" if inst.selected is None else "selected",
        }

    def _reach(self, inst: Installation) -> set[str]:
        owned = {r for r in self.repositories if r.split("/", 1)[0] == inst.owner.lower()}
        return owned if inst.selected is None else owned & inst.selected

    def _issue(self, installation_id: int, body: bytes) -> tuple[int, dict[str, Any] | None]:
        inst = self.installations.get(installation_id)
        if inst is None:
            return 404, {"message": "Not Found"}
        request = json.loads(body or b"{}")
        reach = self._reach(inst)
        names = request.get("repositories")
        if names is None:
            repositories = reach
        else:
            repositories = {f"{inst.owner}/{n}".lower() for n in names}
            missing = sorted(repositories - reach)
            if missing:
                return 422, {
                    "message": f"There is at least one repository that does not exist "
                    f"or is not accessible to the parent installation: {missing}"
                }
        asked = request.get("permissions")
        permissions = dict(inst.permissions) if asked is None else dict(asked)
        for name, level in permissions.items():
            held = inst.permissions.get(name)
            if level not in _LEVEL or held is None or _LEVEL[held] < _LEVEL[level]:
                return 422, {
                    "message": f"The permissions requested are not granted to this "
                    f"installation: {name}:{level}"
                }
        permissions.setdefault("metadata", "read")
        now = self.clock()
        value = "ghs_" + secrets.token_urlsafe(27).replace("-", "a").replace("_", "b")[:36]
        with self._lock:
            self.tokens[value] = Token(
                value=value,
                repositories=frozenset(repositories),
                permissions=permissions,
                issued_at=now,
                expires_at=now + TOKEN_SECONDS,
            )
        return 201, {
            "token": value,
            "expires_at": _iso(now + TOKEN_SECONDS),
            "permissions": permissions,
            "repository_selection": "all" if names is None else "selected",
            **(
                {}
                if names is None
                else {"repositories": [self._repo(r) for r in sorted(repositories)]}
            ),
        }

    # ---- installation-token endpoints ----------------------------------------------------------

    def _token(self, auth: str) -> Token | None:
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return None
        token = self.tokens.get(credential)
        if token is None or token.revoked or token.expires_at <= self.clock():
            return None
        return token

    def _repo(self, full: str) -> dict[str, Any]:
        owner, name = full.split("/", 1)
        return {"full_name": full, "name": name, "owner": {"login": owner}, "private": True}

    def _list(self, token: Token, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        per_page = min(int(query.get("per_page", ["30"])[0]), 100)
        page = max(int(query.get("page", ["1"])[0]), 1)
        names = sorted(r for r in token.repositories if r in self.repositories)
        chunk = names[(page - 1) * per_page : page * per_page]
        return 200, {"total_count": len(names), "repositories": [self._repo(r) for r in chunk]}

    def _contents(
        self, token: Token, full: str, path: str, method: str, body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        if full not in token.repositories or full not in self.repositories:
            return 404, {"message": "Not Found"}
        need = "write" if method == "PUT" else "read"
        held = token.permissions.get("contents")
        if held is None or _LEVEL[held] < _LEVEL[need]:
            return 403, {"message": "Resource not accessible by integration"}
        files = self.repositories[full]
        if method == "GET":
            if path not in files:
                return 404, {"message": "Not Found"}
            data = files[path]
            return 200, {
                "type": "file",
                "path": path,
                "encoding": "base64",
                "content": base64.b64encode(data).decode(),
                "sha": hashlib.sha1(data).hexdigest(),
            }
        if method == "PUT":
            request = json.loads(body or b"{}")
            data = base64.b64decode(request.get("content", ""))
            existed = path in files
            if existed and request.get("sha") != hashlib.sha1(files[path]).hexdigest():
                return 409, {"message": f"{path} does not match the sha given"}
            files[path] = data
            return (200 if existed else 201), {
                "content": {"path": path, "sha": hashlib.sha1(data).hexdigest()},
                "commit": {"message": request.get("message", "")},
            }
        return 404, {"message": "Not Found"}


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
