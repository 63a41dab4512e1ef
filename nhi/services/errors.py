"""Typed domain errors the services raise; `api/errors.py` maps each to HTTP in one place.

A rule broken by input is `nhi.rules.policy.RuleViolation` (422, naming the field); the others are
here: no such object (404), a clash with the current state (409), an action the caller may not
take (403). Each carries its field as an attribute, never only inside the message text.
"""

from __future__ import annotations


class NotFound(LookupError):
    """The addressed object does not exist (or the caller may not see it)."""


class Conflict(RuntimeError):
    """The request clashes with the current state; `field` names the request field it concerns
    (a duplicate `name`), when one does."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Forbidden(Exception):
    """Authenticated, but not allowed: 403 with the reason."""


class PolicyViolation(ValueError):
    """An action the rules refuse whatever the caller's rights (an expiry past the maximum
    lifetime); `field` names the request field at fault, when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
