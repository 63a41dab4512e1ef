"""The Slack Web API client, built from settings (None when Slack is not configured)."""

from __future__ import annotations

from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from nhi.infra.config import Settings


def make_slack_client(settings: Settings) -> WebClient | None:
    """A client that honours Slack's Retry-After (slack-sdk does not retry 429s by default)."""
    if settings.slack_bot_token is None:
        return None
    client = WebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url or WebClient.BASE_URL,
        timeout=10,
    )
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=3))
    return client
