"""Activities that talk to people: renewal prompts, escalations, decisions and alerts in Slack.

Without a bot token (dev mode) every message goes to the log instead, and prompts are answered
with `nhi prompts answer`. Messages hold names, scopes and dates, never a credential.
"""

from __future__ import annotations

import logging

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from models.contracts import (
    Alert,
    AlertPost,
    ApprovalMessage,
    ApprovalPost,
    ApprovalPosted,
    Delivery,
    DeliveryResult,
    MessageUpdate,
    PromptKind,
    PromptMessage,
    PromptPost,
    PromptPosted,
)
from nhi.rules.slack_messages import (
    approval_blocks,
    approval_text,
    decided_blocks,
    prompt_blocks,
    prompt_text,
)

log = logging.getLogger(__name__)

LOG_CHANNEL = "log"


class SlackActivities:
    """Slack Web API calls (or the log, when Slack is not configured)."""

    def __init__(self, client: WebClient | None, security_channel: str = "#nhi-security") -> None:
        self._slack = client
        self._security_channel = security_channel

    def _user_id(self, email: str) -> str | None:
        """The active Slack user with this email, or None if absent or deactivated."""
        assert self._slack is not None
        try:
            user = self._slack.users_lookupByEmail(email=email)["user"]
        except SlackApiError as err:
            if err.response.get("error") == "users_not_found":
                return None
            raise
        return None if user.get("deleted") else str(user["id"])

    def _post(
        self, channel: str, msg: PromptMessage, email: str | None, user_id: str | None
    ) -> Delivery:
        assert self._slack is not None
        response = self._slack.chat_postMessage(
            channel=channel, text=prompt_text(msg), blocks=prompt_blocks(msg)
        )
        return Delivery(
            channel=str(response["channel"]),
            ts=str(response["ts"]),
            email=email,
            slack_user_id=user_id,
        )

    @activity.defn
    def post_prompt(self, post: PromptPost) -> PromptPosted:
        """Post one prompt to one recipient: a person (by email; nothing when they have no
        active Slack account) or a channel.

        One recipient per activity, so a retry after a failure reposts to that recipient only,
        never to the ones already reached.
        """
        msg = post.msg
        if self._slack is None:
            log.warning(
                "PROMPT %s to %s: %s", msg.prompt_id, post.email or post.channel, prompt_text(msg)
            )
            return PromptPosted(
                delivery=Delivery(channel=LOG_CHANNEL, ts=str(msg.prompt_id), email=post.email)
            )
        if post.email:
            user = self._user_id(post.email)
            if user is None:
                return PromptPosted()
            return PromptPosted(delivery=self._post(user, msg, post.email, user))
        if not post.channel:
            raise ApplicationError("a prompt needs an email or a channel", non_retryable=True)
        return PromptPosted(delivery=self._post(post.channel, msg, None, None))

    def group_members(self, group: str) -> list[str]:
        """The Slack user ids in a user group given as `@handle` or its `S...` id."""
        assert self._slack is not None
        group_id = group
        if group.startswith("@"):
            groups = self._slack.usergroups_list()["usergroups"]
            found = [g["id"] for g in groups if g.get("handle") == group[1:]]
            if not found:
                return []
            group_id = str(found[0])
        return [str(u) for u in self._slack.usergroups_users_list(usergroup=group_id)["users"]]

    def _post_approval(self, channel: str, msg: ApprovalMessage, user: str | None) -> Delivery:
        assert self._slack is not None
        response = self._slack.chat_postMessage(
            channel=channel, text=approval_text(msg), blocks=approval_blocks(msg)
        )
        return Delivery(
            channel=str(response["channel"]), ts=str(response["ts"]), slack_user_id=user
        )

    @activity.defn
    def post_approval(self, post: ApprovalPost) -> ApprovalPosted:
        """Send an approval request to one of the policy's approvers: a DM to an email's
        Slack user, a message in a channel, or a DM to each member of a user group.

        One recipient per activity, so a retry reposts to that recipient only."""
        msg, recipient = post.msg, post.recipient
        if self._slack is None:
            log.warning("APPROVAL %s to %s: %s", msg.approval_id, recipient, approval_text(msg))
            return ApprovalPosted(
                deliveries=[Delivery(channel=LOG_CHANNEL, ts=str(msg.approval_id))]
            )
        if "@" in recipient[1:]:  # an email
            user = self._user_id(recipient)
            if user is None:
                log.warning("approver %s has no active Slack account", recipient)
                return ApprovalPosted()
            return ApprovalPosted(deliveries=[self._post_approval(user, msg, user)])
        if recipient.startswith(("@", "S")):
            members = self.group_members(recipient)
            return ApprovalPosted(deliveries=[self._post_approval(u, msg, u) for u in members])
        return ApprovalPosted(deliveries=[self._post_approval(recipient, msg, None)])

    @activity.defn
    def send_alert(self, post: AlertPost) -> None:
        """One alert to one recipient (a person by email, or a channel); a retry reposts to that
        recipient only. A person without an active Slack account gets it in the log."""
        channel = self._security_channel if post.security else post.channel
        if self._slack is None:
            log.error("ALERT to %s: %s", post.email or channel, post.text)
            return
        if post.email:
            user = self._user_id(post.email)
            if user is None:
                log.error("ALERT to %s (no active Slack account): %s", post.email, post.text)
                return
            self._slack.chat_postMessage(channel=user, text=post.text)
            return
        if not channel:
            raise ApplicationError("an alert needs an email or a channel", non_retryable=True)
        self._slack.chat_postMessage(channel=channel, text=post.text)

    # Lifecycles recorded before per-recipient sends scheduled these multi-recipient names;
    # they stay registered so such runs replay and complete.
    @activity.defn
    def deliver_prompt(self, msg: PromptMessage) -> DeliveryResult:
        """Reminder: DM the owner. Escalation: DM the backup owner and post to the team channel.

        `owner_reachable` is False when the owner has no active Slack account: the workflow
        then escalates at once.
        """
        if self._slack is None:
            log.warning("PROMPT %s %s", msg.prompt_id, prompt_text(msg))
            return DeliveryResult(
                prompt_id=msg.prompt_id,
                deliveries=[
                    Delivery(channel=LOG_CHANNEL, ts=str(msg.prompt_id), email=msg.owner_email)
                ],
            )
        deliveries: list[Delivery] = []
        if msg.kind is PromptKind.REMINDER:
            owner = self._user_id(msg.owner_email)
            if owner is None:
                return DeliveryResult(prompt_id=msg.prompt_id, owner_reachable=False)
            deliveries.append(self._post(owner, msg, msg.owner_email, owner))
            return DeliveryResult(prompt_id=msg.prompt_id, deliveries=deliveries)
        owner = self._user_id(msg.owner_email)
        if owner is not None:
            deliveries.append(self._post(owner, msg, msg.owner_email, owner))
        if msg.backup_owner_email:
            backup = self._user_id(msg.backup_owner_email)
            if backup is not None:
                deliveries.append(self._post(backup, msg, msg.backup_owner_email, backup))
        deliveries.append(self._post(msg.team_channel, msg, None, None))
        return DeliveryResult(
            prompt_id=msg.prompt_id, deliveries=deliveries, owner_reachable=owner is not None
        )

    @activity.defn
    def update_messages(self, update: MessageUpdate) -> None:
        """Rewrite answered prompts to show the decision (and remove their buttons)."""
        for delivery in update.deliveries:
            if delivery.channel == LOG_CHANNEL or self._slack is None:
                log.warning("PROMPT %s decided: %s", delivery.ts, update.text)
                continue
            self._slack.chat_update(
                channel=delivery.channel,
                ts=delivery.ts,
                text=update.text,
                blocks=decided_blocks(update.text),
            )

    @activity.defn
    def alert(self, alert: Alert) -> None:
        """Tell people and channels something went wrong (e.g. a revocation that keeps failing)."""
        channels = list(alert.channels)
        if alert.security and self._security_channel not in channels:
            channels.append(self._security_channel)
        if self._slack is None:
            log.error("ALERT to %s: %s", ", ".join(alert.emails + channels), alert.text)
            return
        for email in alert.emails:
            user = self._user_id(email)
            if user is not None:
                self._slack.chat_postMessage(channel=user, text=alert.text)
        for channel in channels:
            self._slack.chat_postMessage(channel=channel, text=alert.text)
