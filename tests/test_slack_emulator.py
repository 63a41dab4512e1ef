"""The Slack emulator, driven through the real slack_sdk clients, and the signing helpers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.models.blocks import ActionsBlock, ButtonElement, SectionBlock
from slack_sdk.signature import SignatureVerifier

from tests.slack_emulator import (
    Call,
    SlackEmulator,
    block_actions_payload,
    signed_interaction,
)

TOKEN = "xoxb-test"
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


@pytest.fixture
def slack() -> Iterator[SlackEmulator]:
    with SlackEmulator(token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def client(slack: SlackEmulator) -> WebClient:
    return WebClient(token=TOKEN, base_url=slack.url, timeout=5)


def _blocks() -> list[dict[str, object]]:
    return [
        SectionBlock(text="Approve key for *agent-7*?").to_dict(),
        ActionsBlock(
            block_id="wf-123",
            elements=[
                ButtonElement(text="Approve", action_id="approve", value="wf-123", style="primary"),
                ButtonElement(text="Deny", action_id="deny", value="wf-123", style="danger"),
            ],
        ).to_dict(),
    ]


def test_url_and_auth_test(slack: SlackEmulator, client: WebClient) -> None:
    assert slack.url.startswith("http://127.0.0.1:") and slack.url.endswith("/api/")
    response = client.auth_test()
    assert response["ok"] and response["user_id"] and response["team_id"] and response["bot_id"]
    assert slack.calls == [Call("auth.test", {})]


def test_lookup_by_email_found(slack: SlackEmulator, client: WebClient) -> None:
    user_id = slack.add_user("alice@example.com", name="alice")
    assert user_id.startswith("U") and len(user_id) == 9
    user = client.users_lookupByEmail(email="alice@example.com")["user"]
    assert user["id"] == user_id
    assert user["name"] == "alice"
    assert user["deleted"] is False
    assert user["profile"]["email"] == "alice@example.com"
    assert slack.calls_to("users.lookupByEmail") == [
        Call("users.lookupByEmail", {"email": "alice@example.com"})
    ]


def test_lookup_by_email_not_found(client: WebClient) -> None:
    with pytest.raises(SlackApiError) as e:
        client.users_lookupByEmail(email="nobody@example.com")
    assert e.value.response["error"] == "users_not_found"


def test_lookup_by_email_deleted_user_is_returned(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("gone@example.com", "U0GONE", deleted=True)
    user = client.users_lookupByEmail(email="gone@example.com")["user"]
    assert user["id"] == "U0GONE" and user["deleted"] is True


def test_users_info(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("bob@example.com", "U0BOB")
    assert client.users_info(user="U0BOB")["user"]["profile"]["email"] == "bob@example.com"
    with pytest.raises(SlackApiError) as e:
        client.users_info(user="U0NOPE")
    assert e.value.response["error"] == "user_not_found"


def test_add_user_rejects_duplicates(slack: SlackEmulator) -> None:
    slack.add_user("dup@example.com", "U0DUP")
    with pytest.raises(ValueError):
        slack.add_user("DUP@example.com")
    with pytest.raises(ValueError):
        slack.add_user("other@example.com", "U0DUP")


def test_conversations_open(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("carol@example.com", "U0CAROL")
    assert client.conversations_open(users="U0CAROL")["channel"]["id"] == "D0CAROL"
    with pytest.raises(SlackApiError) as e:
        client.conversations_open(users="U0NOPE")
    assert e.value.response["error"] == "user_not_found"


def test_post_message_to_user_resolves_dm(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("dave@example.com", "U0DAVE")
    first = client.chat_postMessage(channel="U0DAVE", text="hello", blocks=_blocks())
    second = client.chat_postMessage(channel="U0DAVE", text="again")
    assert first["channel"] == second["channel"] == "D0DAVE"
    assert first["ts"] == "1700000000.000100"
    assert float(second["ts"]) > float(first["ts"])
    assert first["message"]["text"] == "hello"
    assert [m.text for m in slack.messages_in("D0DAVE")] == ["hello", "again"]
    assert slack.messages[("D0DAVE", first["ts"])].updates == 0


def test_post_message_to_named_channel(slack: SlackEmulator, client: WebClient) -> None:
    assert client.chat_postMessage(channel="#team", text="hi")["channel"] == "#team"
    assert client.chat_postMessage(channel="C123", text="hi")["channel"] == "C123"
    assert len(slack.messages_in("#team")) == len(slack.messages_in("C123")) == 1


def test_post_message_to_unknown_user(slack: SlackEmulator, client: WebClient) -> None:
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel="U0NOPE", text="hello")
    assert e.value.response["error"] == "channel_not_found"
    assert slack.messages == {}


def test_blocks_recorded_as_lists(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("erin@example.com", "U0ERIN")
    blocks = _blocks()
    response = client.chat_postMessage(channel="U0ERIN", text="fallback", blocks=blocks)
    (call,) = slack.calls_to("chat.postMessage")
    assert call.args["blocks"] == blocks
    assert slack.messages[("D0ERIN", response["ts"])].blocks == blocks
    # A form-encoded call carries blocks as a JSON string; the emulator decodes it too.
    client.api_call(
        "chat.postMessage",
        data={"channel": "U0ERIN", "text": "form", "blocks": json.dumps(blocks)},
    )
    assert slack.calls_to("chat.postMessage")[1].args["blocks"] == blocks


def test_chat_update(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("frank@example.com", "U0FRANK")
    posted = client.chat_postMessage(channel="U0FRANK", text="pending", blocks=_blocks())
    new_blocks = [SectionBlock(text="Approved by <@U0FRANK>").to_dict()]
    updated = client.chat_update(
        channel=posted["channel"], ts=posted["ts"], text="approved", blocks=new_blocks
    )
    assert updated["ts"] == posted["ts"] and updated["channel"] == "D0FRANK"
    message = slack.messages[("D0FRANK", posted["ts"])]
    assert (message.text, message.blocks, message.updates) == ("approved", new_blocks, 1)


def test_chat_update_wrong_ts_or_user_channel(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("gina@example.com", "U0GINA")
    posted = client.chat_postMessage(channel="U0GINA", text="pending")
    with pytest.raises(SlackApiError) as e:
        client.chat_update(channel=posted["channel"], ts="1.000000", text="x")
    assert e.value.response["error"] == "message_not_found"
    # Like Slack, updating needs the D... channel, not the user id the message was sent to.
    with pytest.raises(SlackApiError) as e:
        client.chat_update(channel="U0GINA", ts=posted["ts"], text="x")
    assert e.value.response["error"] == "message_not_found"
    assert slack.messages[("D0GINA", posted["ts"])].text == "pending"


def test_post_ephemeral_recorded(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("hank@example.com", "U0HANK")
    response = client.chat_postEphemeral(channel="C123", user="U0HANK", text="only you")
    assert response["message_ts"]
    (call,) = slack.calls_to("chat.postEphemeral")
    assert call.args == {"channel": "C123", "user": "U0HANK", "text": "only you"}
    assert slack.messages == {}  # ephemeral messages cannot be updated, so they are not stored


def test_unknown_method(client: WebClient) -> None:
    with pytest.raises(SlackApiError) as e:
        client.api_call("emoji.list")
    assert e.value.response["error"] == "unknown_method"
    assert e.value.response.status_code == 200


def test_invalid_token(slack: SlackEmulator) -> None:
    bad = WebClient(token="xoxb-wrong", base_url=slack.url, timeout=5)
    with pytest.raises(SlackApiError) as e:
        bad.auth_test()
    assert e.value.response["error"] == "invalid_auth"
    assert slack.calls == []


def test_fail_next_once(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("ivy@example.com", "U0IVY")
    slack.fail_next("chat.postMessage", "msg_too_long")
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel="U0IVY", text="x")
    assert e.value.response["error"] == "msg_too_long"
    assert client.chat_postMessage(channel="U0IVY", text="x")["ok"]
    assert len(slack.calls_to("chat.postMessage")) == 2
    assert len(slack.messages) == 1


def test_rate_limit_without_retry_handler(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("jay@example.com", "U0JAY")
    slack.rate_limit_next("chat.postMessage", retry_after=1)
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel="U0JAY", text="x")
    assert e.value.response.status_code == 429
    assert e.value.response["error"] == "ratelimited"
    assert e.value.response.headers["Retry-After"] == "1"
    assert slack.messages == {}


def test_rate_limit_with_retry_handler(slack: SlackEmulator) -> None:
    slack.add_user("kim@example.com", "U0KIM")
    client = WebClient(
        token=TOKEN,
        base_url=slack.url,
        timeout=5,
        retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)],
    )
    # Retry-After 0 keeps the test fast: the handler sleeps it plus under 1 s of jitter.
    slack.rate_limit_next("chat.postMessage", retry_after=0)
    assert client.chat_postMessage(channel="U0KIM", text="x")["channel"] == "D0KIM"
    assert len(slack.calls_to("chat.postMessage")) == 2
    assert len(slack.messages_in("D0KIM")) == 1


def test_clear_keeps_users(slack: SlackEmulator, client: WebClient) -> None:
    slack.add_user("lee@example.com", "U0LEE")
    client.chat_postMessage(channel="U0LEE", text="x")
    slack.clear()
    assert slack.calls == [] and slack.messages == {}
    assert client.users_info(user="U0LEE")["user"]["id"] == "U0LEE"


def test_stops_cleanly() -> None:
    emulator = SlackEmulator(token=TOKEN)
    with emulator:
        WebClient(token=TOKEN, base_url=emulator.url, timeout=5).auth_test()
    # No retry handlers: the default one would retry the refused connection after a back-off.
    after = WebClient(token=TOKEN, base_url=emulator.url, timeout=2, retry_handlers=[])
    with pytest.raises(OSError):
        after.auth_test()


def _payload() -> dict[str, Any]:
    return block_actions_payload(
        user_id="U0ALICE",
        action_id="approve",
        value="wf-123",
        channel_id="D0ALICE",
        message_ts="1700000000.000100",
        action_ts="1700000100.123456",
    )


def test_block_actions_payload_shape() -> None:
    payload = _payload()
    assert payload["type"] == "block_actions"
    assert payload["user"] == {
        "id": "U0ALICE",
        "username": "u0alice",
        "name": "u0alice",
        "team_id": "T0001",
    }
    assert payload["container"] == {
        "type": "message",
        "message_ts": "1700000000.000100",
        "channel_id": "D0ALICE",
        "is_ephemeral": False,
    }
    (action,) = payload["actions"]
    assert action["action_id"] == "approve" and action["value"] == "wf-123"
    assert action["type"] == "button" and action["action_ts"] == "1700000100.123456"
    assert payload["response_url"].startswith("https://hooks.slack.com/actions/T0001/")
    assert payload["trigger_id"]


def test_signed_interaction_verifies() -> None:
    body, headers = signed_interaction(SECRET, _payload())
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert json.loads(parse_qs(body.decode())["payload"][0]) == _payload()
    assert SignatureVerifier(SECRET).is_valid_request(body, headers)
    assert not SignatureVerifier("another-secret").is_valid_request(body, headers)


def test_signed_interaction_tampered_body_rejected() -> None:
    body, headers = signed_interaction(SECRET, _payload())
    tampered = body.replace(b"approve", b"deny")
    assert tampered != body
    assert not SignatureVerifier(SECRET).is_valid_request(tampered, headers)


def test_signed_interaction_stale_timestamp_rejected() -> None:
    now = int(time.time())
    body, headers = signed_interaction(SECRET, _payload(), timestamp=now - 301)
    assert not SignatureVerifier(SECRET).is_valid_request(body, headers)
    body, headers = signed_interaction(SECRET, _payload(), timestamp=now - 290)
    assert SignatureVerifier(SECRET).is_valid_request(body, headers)
