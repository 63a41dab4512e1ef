"""A local Slack Web API emulator for tests, plus helpers that build signed interactivity requests.

The emulator is a real HTTP server on 127.0.0.1, so `slack_sdk.WebClient` (or any HTTP client)
talks to it in the wire format it uses against slack.com (JSON POST for `chat.*`, GET with
query args for `users.lookupByEmail`, `Authorization: Bearer <token>`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

TEAM_ID = "T0001"
BOT_USER_ID = "UBOT0001"
BOT_ID = "B0001"

# Arguments that slack-sdk JSON-encodes into a single field when it sends a form or query string.
_JSON_ARGS = ("blocks", "attachments")
_FIRST_TS = 1_700_000_000_000_100  # "1700000000.000100", in microseconds


@dataclass(frozen=True)
class Call:
    """One authenticated Web API request, with its arguments merged from query string and body."""

    method: str
    args: dict[str, Any]


@dataclass
class Message:
    """A message the app posted, as it stands after any `chat.update`."""

    channel: str
    ts: str
    text: str | None
    blocks: list[dict[str, Any]] | None
    updates: int = 0


@dataclass(frozen=True)
class _User:
    id: str
    email: str
    name: str
    deleted: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "team_id": TEAM_ID,
            "name": self.name,
            "real_name": self.name,
            "deleted": self.deleted,
            "is_bot": False,
            "profile": {"email": self.email, "real_name": self.name, "display_name": self.name},
        }


@dataclass(frozen=True)
class _Fault:
    error: str
    status: int = 200
    retry_after: int | None = None


@dataclass
class _Reply:
    body: dict[str, Any]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    """Ends a method handler with `{"ok": false, "error": <error>}`."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _dm_channel(user_id: str) -> str:
    return "D" + user_id[1:]


def _is_user_id(value: str) -> bool:
    return value[:1] in ("U", "W")


class Hold:
    """One held call: `reached` is set once it arrived; it is answered after `release()`."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()


class SlackEmulator:
    """A Slack Web API server on a free local port; use as a context manager.

    Every request that passes the token check is recorded in `calls`, including those answered
    with an injected failure, so tests can see retries. Only successful posts land in `messages`.
    """

    def __init__(self, token: str = "xoxb-test") -> None:
        self.token = token
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        self._user_by_email: dict[str, str] = {}
        self._calls: list[Call] = []
        self._messages: dict[tuple[str, str], Message] = {}
        self._faults: dict[str, deque[_Fault]] = {}
        self._holds: dict[str, Hold] = {}
        self._next_ts = _FIRST_TS
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "auth.test": self._auth_test,
            "users.lookupByEmail": self._users_lookup_by_email,
            "users.info": self._users_info,
            "conversations.open": self._conversations_open,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "usergroups.list": self._usergroups_list,
            "usergroups.users.list": self._usergroups_users_list,
            "conversations.members": self._conversations_members,
            "views.open": self._views_open,
        }
        # User groups by id: (handle, member ids); channel members by channel; opened views.
        self._groups: dict[str, tuple[str, list[str]]] = {}
        self._members: dict[str, list[str]] = {}
        self.views: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SlackEmulator:
        """Serve in a background daemon thread."""
        # A short poll interval keeps shutdown() quick; the default 0.5 s adds up over a suite.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="slack-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> SlackEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test-facing API ---------------------------------------------------------------------

    def add_user(
        self,
        email: str,
        user_id: str | None = None,
        *,
        deleted: bool = False,
        name: str | None = None,
    ) -> str:
        """Add a user to the workspace directory and return its id."""
        user_id = user_id or "U" + uuid.uuid4().hex[:8].upper()
        user = _User(id=user_id, email=email, name=name or email.split("@")[0], deleted=deleted)
        with self._lock:
            # Duplicates would leave the email and id indexes disagreeing, so refuse them.
            if user_id in self._users or email.lower() in self._user_by_email:
                raise ValueError(f"user {user_id} / {email} already exists")
            self._users[user_id] = user
            self._user_by_email[email.lower()] = user_id
        return user_id

    def add_usergroup(self, handle: str, user_ids: list[str]) -> str:
        """A user group (`@handle`) with these members; returns its `S...` id."""
        with self._lock:
            group_id = f"S{len(self._groups) + 1:08d}"
            self._groups[group_id] = (handle, list(user_ids))
            return group_id

    def set_channel_members(self, channel: str, user_ids: list[str]) -> None:
        """Who is in a channel (`conversations.members`)."""
        with self._lock:
            self._members[channel] = list(user_ids)

    @property
    def calls(self) -> list[Call]:
        """All recorded calls, in order."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        """Recorded calls of one method, in order."""
        with self._lock:
            return [call for call in self._calls if call.method == method]

    @property
    def messages(self) -> dict[tuple[str, str], Message]:
        """Posted messages by (channel, ts); copies, so later updates do not change them."""
        with self._lock:
            return copy.deepcopy(self._messages)

    def messages_in(self, channel: str) -> list[Message]:
        """Messages posted to one (resolved) channel, in post order."""
        with self._lock:
            return [copy.deepcopy(m) for m in self._messages.values() if m.channel == channel]

    def clear(self) -> None:
        """Forget recorded calls, messages, pending faults and holds; keep the user directory."""
        with self._lock:
            self._calls.clear()
            self._messages.clear()
            self._faults.clear()
            for hold in self._holds.values():
                hold.release()
            self._holds.clear()

    def fail_next(self, method: str, error: str) -> None:
        """Answer the next call of `method` with `{"ok": false, "error": error}`."""
        with self._lock:
            self._faults.setdefault(method, deque()).append(_Fault(error))

    def hold_next(self, method: str) -> Hold:
        """Hold the next call of `method` before it is answered, until `Hold.release()`: a
        Slack call under way, for as long as a test needs one."""
        hold = Hold()
        with self._lock:
            self._holds[method] = hold
        return hold

    def rate_limit_next(self, method: str, retry_after: int = 1) -> None:
        """Answer the next call of `method` with HTTP 429, `Retry-After` and `ratelimited`."""
        with self._lock:
            fault = _Fault("ratelimited", status=429, retry_after=retry_after)
            self._faults.setdefault(method, deque()).append(fault)

    # -- request handling --------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = emulator._handle(
                    urlsplit(self.path),
                    self.headers.get("Authorization", ""),
                    self.headers.get("Content-Type", ""),
                    body,
                )
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

        return Handler

    def _handle(
        self, url: SplitResult, authorization: str, content_type: str, body: bytes
    ) -> _Reply:
        if authorization != f"Bearer {self.token}":
            return _Reply({"ok": False, "error": "invalid_auth"})
        method = url.path.removeprefix("/api/").strip("/")
        try:
            args = _parse_args(url.query, content_type, body)
        except ValueError:
            return _Reply({"ok": False, "error": "invalid_json"})
        with self._lock:
            hold = self._holds.pop(method, None)
        if hold is not None:
            hold.reached.set()
            hold.released.wait(timeout=120)
        with self._lock:
            self._calls.append(Call(method, copy.deepcopy(args)))
            faults = self._faults.get(method)
            fault = faults.popleft() if faults else None
            if fault is not None:
                headers = (
                    {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                )
                return _Reply({"ok": False, "error": fault.error}, fault.status, headers)
            handler = self._methods.get(method)
            if handler is None:
                return _Reply({"ok": False, "error": "unknown_method"})
            try:
                return _Reply({"ok": True, **handler(args)})
            except _ApiError as e:
                return _Reply({"ok": False, "error": e.error})

    # Method handlers run under self._lock.

    def _auth_test(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://emulated.slack.com/",
            "team": "Emulated",
            "user": "nhi-bot",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _users_lookup_by_email(self, args: dict[str, Any]) -> dict[str, Any]:
        user_id = self._user_by_email.get(str(args.get("email", "")).lower())
        if user_id is None:
            raise _ApiError("users_not_found")
        return {"user": self._users[user_id].as_json()}

    def _users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self._users.get(str(args.get("user", "")))
        if user is None:
            raise _ApiError("user_not_found")
        return {"user": user.as_json()}

    def _conversations_open(self, args: dict[str, Any]) -> dict[str, Any]:
        users = args.get("users", "")
        ids = users if isinstance(users, list) else [u for u in str(users).split(",") if u]
        if not ids:
            raise _ApiError("users_list_not_supplied")
        for user_id in ids:
            if user_id not in self._users:
                raise _ApiError("user_not_found")
        if len(ids) == 1:
            return {"channel": {"id": _dm_channel(ids[0])}}
        digest = hashlib.sha256(",".join(sorted(ids)).encode()).hexdigest()[:8].upper()
        return {"channel": {"id": "G" + digest}}

    def _resolve_channel(self, value: Any) -> str:
        channel = str(value or "")
        if not channel:
            raise _ApiError("channel_not_found")
        if _is_user_id(channel):
            # Slack posts to a user id in that user's DM and answers with the D... channel.
            if channel not in self._users:
                raise _ApiError("channel_not_found")
            return _dm_channel(channel)
        return channel

    def _new_ts(self) -> str:
        micros = self._next_ts
        self._next_ts += 100
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _chat_post_message(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._resolve_channel(args.get("channel"))
        text, blocks = args.get("text"), args.get("blocks")
        if not text and not blocks and not args.get("attachments"):
            raise _ApiError("no_text")
        message = Message(channel=channel, ts=self._new_ts(), text=text, blocks=blocks)
        self._messages[(channel, message.ts)] = message
        return {"channel": channel, "ts": message.ts, "message": _message_json(message)}

    def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(args.get("channel", "")), str(args.get("ts", ""))
        message = self._messages.get((channel, ts))
        if message is None:
            raise _ApiError("message_not_found")
        # As on Slack, fields left out keep their previous value.
        if "text" in args:
            message.text = args["text"]
        if "blocks" in args:
            message.blocks = args["blocks"]
        message.updates += 1
        return {
            "channel": channel,
            "ts": ts,
            "text": message.text,
            "message": _message_json(message),
        }

    def _usergroups_list(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "usergroups": [
                {"id": gid, "handle": handle, "name": handle, "user_count": len(users)}
                for gid, (handle, users) in self._groups.items()
            ]
        }

    def _usergroups_users_list(self, args: dict[str, Any]) -> dict[str, Any]:
        group = self._groups.get(str(args.get("usergroup", "")))
        if group is None:
            raise _ApiError("no_such_subteam")
        return {"users": list(group[1])}

    def _conversations_members(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args.get("channel", ""))
        if channel not in self._members:
            raise _ApiError("channel_not_found")
        return {"members": list(self._members[channel]), "response_metadata": {"next_cursor": ""}}

    def _views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("trigger_id"):
            raise _ApiError("invalid_trigger_id")
        view = args.get("view")
        if not isinstance(view, dict):
            raise _ApiError("invalid_arguments")
        view_id = f"V{len(self.views) + 1:08d}"
        self.views.append({"id": view_id, "trigger_id": args["trigger_id"], **view})
        return {"view": {"id": view_id, **view}}

    def _chat_post_ephemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        self._resolve_channel(args.get("channel"))
        if str(args.get("user", "")) not in self._users:
            raise _ApiError("user_not_found")
        if not args.get("text") and not args.get("blocks") and not args.get("attachments"):
            raise _ApiError("no_text")
        return {"message_ts": self._new_ts()}


def _message_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "message",
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "ts": message.ts,
        "text": message.text or "",
    }
    if message.blocks is not None:
        out["blocks"] = copy.deepcopy(message.blocks)
    return out


def _parse_args(query: str, content_type: str, body: bytes) -> dict[str, Any]:
    """Merge query-string and body arguments (body wins); JSON-decode `blocks`/`attachments`."""
    args: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
    if body:
        if content_type.lower().startswith("application/json"):
            decoded = json.loads(body)
            if not isinstance(decoded, dict):
                raise ValueError("JSON body must be an object")
            args.update(decoded)
        else:
            args.update(parse_qsl(body.decode(), keep_blank_values=True))
    for name in _JSON_ARGS:
        if isinstance(args.get(name), str):
            args[name] = json.loads(args[name])
    return args


# -- interactivity --------------------------------------------------------------------------


def signed_interaction(
    signing_secret: str, payload: dict[str, Any], *, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """Form-encoded body `payload=<json>` and the headers Slack sends: Content-Type
    application/x-www-form-urlencoded, X-Slack-Request-Timestamp, X-Slack-Signature
    (v0= + hex HMAC-SHA256 of f"v0:{ts}:{body}")."""
    ts = int(time.time()) if timestamp is None else timestamp
    body = urlencode({"payload": json.dumps(payload)})
    digest = hmac.new(
        signing_secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256
    ).hexdigest()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": str(ts),
        "X-Slack-Signature": f"v0={digest}",
    }
    return body.encode(), headers


def block_actions_payload(
    *,
    user_id: str,
    action_id: str,
    value: str,
    channel_id: str,
    message_ts: str,
    action_ts: str,
    team_id: str = TEAM_ID,
    response_url: str | None = None,
    block_id: str = "actions",
    username: str | None = None,
) -> dict[str, Any]:
    """A `block_actions` payload as Slack sends it when a user clicks a button in a message."""
    seed = hashlib.sha256(f"{user_id}:{action_ts}".encode()).hexdigest()
    username = username or re.sub(r"[^a-z0-9._-]", "", user_id.lower())
    return {
        "type": "block_actions",
        "user": {"id": user_id, "username": username, "name": username, "team_id": team_id},
        "api_app_id": "A0001",
        "team": {"id": team_id, "domain": "emulated"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel_id, "name": "directmessage"},
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel_id,
            "is_ephemeral": False,
        },
        "message": {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "ts": message_ts},
        "state": {"values": {}},
        "actions": [
            {
                "action_id": action_id,
                "block_id": block_id,
                "value": value,
                "type": "button",
                "action_ts": action_ts,
            }
        ],
        "response_url": response_url
        or f"https://hooks.slack.com/actions/{team_id}/{seed[:12]}/{seed[12:36]}",
        "trigger_id": f"{action_ts.replace('.', '')}.{seed[36:48]}",
    }
