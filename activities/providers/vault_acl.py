"""The Vault ACL policy of a `vault_approle` NHI, written from its scope, and read back.

One policy per NHI, named like its role. Its HCL text carries this service's marker as
comment lines (`# nhi:nhi-id = ...`): AppRole roles hold no metadata, so the policy is what
says a role is ours (sweeps, conflict checks) and where its credential was delivered. Paths
and capabilities reach the text only after `nhi.rules.policy.validate_vault_scope`, whose path
grammar has no quote, brace or newline.

Containment rewrites the policy "suspended": every line of the grant commented out behind
`#| `, so the tokens already issued (which name the policy, not its contents) lose every
capability at once, and restoring is un-commenting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from models.contracts import ScopeStatement

SUSPENDED = "nhi:suspended"
_MARK_RE = re.compile(r"^# ([A-Za-z0-9:._-]+) = (.*)$")
_PATH_RE = re.compile(r'path "([^"]+)" \{\s*capabilities = \[([^\]]*)\]\s*\}', re.MULTILINE)
_HELD = "#| "


def grants(scope: Iterable[ScopeStatement]) -> dict[str, list[str]]:
    """Path -> capabilities (sorted, merged across statements)."""
    out: dict[str, set[str]] = {}
    for statement in scope:
        for path in statement.resources:
            out.setdefault(path, set()).update(statement.actions)
    return {path: sorted(caps) for path, caps in sorted(out.items())}


def render(scope: Iterable[ScopeStatement], marks: Mapping[str, str], *, suspended: bool) -> str:
    """The policy text: the marker comments, then one `path` block per granted path."""
    head = [f"# {k} = {v}" for k, v in sorted(marks.items()) if k != SUSPENDED]
    if suspended:
        head.append(f"# {SUSPENDED} = true")
    body: list[str] = []
    for path, caps in grants(scope).items():
        quoted = ", ".join(f'"{c}"' for c in caps)
        body += [f'path "{path}" {{', f"  capabilities = [{quoted}]", "}"]
    if suspended:
        body = [_HELD + line for line in body]
    return "\n".join(head + body) + "\n"


@dataclass(frozen=True)
class ReadPolicy:
    """A policy as read back: its marker, whether suspended, and what it grants."""

    marks: dict[str, str]
    suspended: bool
    granted: dict[str, list[str]]
    held: dict[str, list[str]]  # what a suspended policy grants again once restored


def parse(text: str) -> ReadPolicy:
    """Read a policy this module wrote (others parse to no marks and their paths)."""
    marks = {m.group(1): m.group(2) for m in map(_MARK_RE.match, text.splitlines()) if m}
    live = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    held = "\n".join(
        line.removeprefix(_HELD) for line in text.splitlines() if line.startswith(_HELD)
    )
    return ReadPolicy(
        marks=marks,
        suspended=marks.get(SUSPENDED) == "true",
        granted=_paths(live),
        held=_paths(held),
    )


def _paths(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for match in _PATH_RE.finditer(text):
        caps = [c.strip().strip('"') for c in match.group(2).split(",") if c.strip()]
        out[match.group(1)] = sorted(caps)
    return out


def restore(text: str) -> str:
    """The suspended policy's grant, live again (the marker kept)."""
    lines = [
        line.removeprefix(_HELD) for line in text.splitlines() if line != f"# {SUSPENDED} = true"
    ]
    return "\n".join(lines) + "\n"


def suspend(text: str) -> str:
    """The policy with its grant commented out (idempotent)."""
    if parse(text).suspended:
        return text
    lines = text.splitlines()
    head = [line for line in lines if line.startswith("# ")]
    body = [_HELD + line for line in lines if line and not line.startswith("#")]
    return "\n".join([*head, f"# {SUSPENDED} = true", *body]) + "\n"
