"""Pure rules for activity monitoring (issue 17): an NHI's intent as its day-one baseline, the
profile it learns, and the findings an event raises against both.

No I/O, no clock, no settings: times come from the events themselves, so an import replayed
over the same events finds the same things. `Watch` holds the short windows one NHI needs
(rate, reconnaissance, concurrent networks) while an import walks its events in order.

The findings, each once per event at most (the most telling kind wins where two would say the
same thing, e.g. a console sign-in is human use, not also an out-of-scope action):

* `use_after_revocation`: any use after the NHI was quarantined, expired or decommissioned;
* `human_use`: a console sign-in or a browser user agent (OWASP NHI10);
* `out_of_scope`: an action the granted scope does not cover, allowed or denied;
* `new_network`: a source outside the declared CIDRs, or (once learned) a network never seen;
* `concurrent_networks`: one credential used from two networks within `CONCURRENT_SECONDS`;
* `reconnaissance`: many distinct List*/Describe*/Get* (or catalog reads) in a short window;
* `burst`: far more events in a minute than the learned rate.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from models.enums import ActivityKind, AgentCategory, NhiStatus, Platform, Severity

# Events seen before a learned profile judges networks and rates: until then only the
# declared intent does (the day-one baseline).
MIN_LEARNED_EVENTS = 200
MIN_LEARNED_MINUTES = 30
BURST_WINDOW = timedelta(seconds=60)
BURST_FLOOR = 600  # events in a minute below which nothing is a burst, whatever was learned
BURST_FACTOR = 10.0  # times the learned busiest-minute average
RECON_WINDOW = timedelta(minutes=5)
RECON_DISTINCT = 15  # distinct List*/Describe*/Get* actions (or catalog reads) in the window
CONCURRENT_SECONDS = 60
PROFILE_CAP = 200  # distinct values kept per profile dimension; the rest are counted as "other"

# Calls every AWS principal may make whatever its policy says (they reveal nothing).
ALWAYS_ALLOWED_AWS = frozenset({"sts:getcalleridentity"})
# Postgres commands that are not privileges: session plumbing every login issues.
ALWAYS_ALLOWED_PG = frozenset(
    {"CONNECT", "DISCONNECT", "BEGIN", "COMMIT", "ROLLBACK", "SET", "SHOW", "RESET", "DISCARD"}
)
HUMAN_ACTIONS = frozenset({"signin:consolelogin", "signin:switchrole", "signin:getsignintoken"})
_RECON_RE = re.compile(r"^[a-z0-9-]+:(list|describe|get)[A-Za-z0-9]*$", re.IGNORECASE)
# Browsers say Mozilla/...; SDKs and CLIs say what they are (aws-cli, Boto3, aws-sdk-go,
# psycopg, ...) and AWS's own console backend says "AWS Internal".
_BROWSER_RE = re.compile(r"^Mozilla/\d|\b(Chrome|Safari|Firefox|Edg)/\d")
_HUMAN_PG_CLIENTS = re.compile(r"^(psql|pgadmin|dbeaver|datagrip|tableplus)", re.IGNORECASE)
BROWSING_CATEGORIES = frozenset({AgentCategory.BROWSER_AGENT, AgentCategory.COMPUTER_AGENT})
# Revoked in effect: a use after the moment the NHI entered one of these is a finding.
REVOKED = frozenset(
    {NhiStatus.QUARANTINED, NhiStatus.DECOMMISSIONED, NhiStatus.REVOKE_FAILED, NhiStatus.MISSING}
)


@dataclass(frozen=True)
class Intent:
    """What an NHI was declared to do: the day-one baseline."""

    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    platform: Platform
    name: str
    category: AgentCategory
    status: NhiStatus
    scope: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # (actions, resources) each
    cidrs: tuple[str, ...]
    expires_at: datetime
    # When it stopped being usable (quarantined, decommissioned, missing); None while usable.
    revoked_at: datetime | None = None

    def allows(self, ip: str) -> bool:
        """Whether `ip` lies inside the declared CIDRs."""
        return _inside(ip, self.cidrs)


@dataclass(frozen=True)
class Event:
    """One normalised activity event, whatever its source."""

    id: uuid.UUID
    at: datetime
    action: str
    identity: str
    outcome: str = "success"  # success | denied | error
    resource: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    # The credential used (access key id, session, login role): concurrent-network checks
    # compare uses of the same one.
    credential: str | None = None
    task_credential_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Draft:
    """A finding before it is stored."""

    kind: ActivityKind
    severity: Severity
    summary: str
    evidence: dict[str, Any]


# Addresses repeat heavily in a log (an agent's few hosts): parsing each once keeps the import
# fast (ipaddress parses in pure Python).
@lru_cache(maxsize=65536)
def _inside(ip: str, cidrs: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


@lru_cache(maxsize=65536)
def network_of(ip: str | None) -> str | None:
    """The network an address belongs to for profiling: its /24 (IPv4) or /64 (IPv6); None
    for an AWS service calling on the NHI's behalf (`s3.amazonaws.com`) or no address."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@lru_cache(maxsize=65536)
def _covered(patterns: tuple[str, ...], value: str) -> bool:
    low = value.lower()
    return any(fnmatchcase(low, p.lower()) for p in patterns)


@lru_cache(maxsize=4096)
def _granted(privileges: tuple[str, ...], command: str) -> bool:
    return command in {p.upper() for p in privileges}


def in_scope(intent: Intent, event: Event) -> bool:
    """Whether the granted scope covers the event's action (and its resource, when the event
    names one): IAM wildcards for AWS, privileges for Postgres."""
    if intent.platform is Platform.POSTGRES:
        command = event.action.upper()
        if command in ALWAYS_ALLOWED_PG:
            return True
        return any(_granted(actions, command) for actions, _ in intent.scope)
    if event.action.lower() in ALWAYS_ALLOWED_AWS:
        return True
    for actions, resources in intent.scope:
        if _covered(actions, event.action) and (
            not event.resource or _covered(resources, event.resource)
        ):
            return True
    return False


def is_human(event: Event, platform: Platform, category: AgentCategory) -> str | None:
    """Why the event looks like a person at the keyboard, or None. A browser or computer-use
    agent drives a browser by design: its user agent says nothing about a person."""
    if event.action.lower() in HUMAN_ACTIONS:
        return f"console sign-in ({event.action})"
    agent = event.user_agent or ""
    if _is_browser(agent) and category not in BROWSING_CATEGORIES:
        return "browser user agent"
    if platform is Platform.POSTGRES and _HUMAN_PG_CLIENTS.match(agent):
        return f"interactive client {agent.split()[0]!r}"
    return None


@lru_cache(maxsize=4096)
def _is_browser(agent: str) -> bool:
    return bool(_BROWSER_RE.search(agent))


@lru_cache(maxsize=4096)
def _is_enumeration(action: str) -> bool:
    return bool(_RECON_RE.match(action))


def _is_catalog(resource: str | None) -> bool:
    if not resource:
        return False
    low = resource.lower()
    return "information_schema" in low or "pg_catalog" in low


def is_recon(event: Event) -> bool:
    return _is_enumeration(event.action) or _is_catalog(event.resource)


def _bump(counts: dict[str, int], key: str) -> None:
    if key in counts or len(counts) < PROFILE_CAP:
        counts[key] = counts.get(key, 0) + 1
    else:
        counts["other"] = counts.get("other", 0) + 1


@lru_cache(maxsize=4096)
def _agent_name(user_agent: str) -> str:
    return user_agent.split(" ")[0][:64]


@dataclass
class Profile:
    """What an NHI has been seen doing: counts per action, resource, network, hour and user
    agent, and its busiest-minute rate. Stored as JSON (`nhi_profiles.profile`)."""

    events: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)
    networks: dict[str, int] = field(default_factory=dict)
    user_agents: dict[str, int] = field(default_factory=dict)
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    minutes: int = 0  # distinct active minutes seen
    last_minute: str | None = None
    last_seen: str | None = None
    _minute: int = field(default=-1, repr=False)
    _last: datetime | None = field(default=None, repr=False)

    @property
    def learned(self) -> bool:
        return self.events >= MIN_LEARNED_EVENTS and self.minutes >= MIN_LEARNED_MINUTES

    def rate(self) -> float:
        """Average events per active minute."""
        return self.events / self.minutes if self.minutes else 0.0

    def learn(self, event: Event) -> None:
        self.events += 1
        _bump(self.actions, event.action)
        if event.resource:
            _bump(self.resources, event.resource[:256])
        net = network_of(event.source_ip)
        if net:
            _bump(self.networks, net)
        if event.user_agent:
            _bump(self.user_agents, _agent_name(event.user_agent))
        self.hours[event.at.hour] += 1
        # A new active minute only when the minute changes (formatting every event is slow).
        minute = int(event.at.timestamp()) // 60
        if minute != self._minute:
            self._minute = minute
            text = event.at.strftime("%Y-%m-%dT%H:%M")
            if text != self.last_minute:
                self.minutes += 1
                self.last_minute = text
        self._last = event.at

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "actions": self.actions,
            "resources": self.resources,
            "networks": self.networks,
            "user_agents": self.user_agents,
            "hours": self.hours,
            "minutes": self.minutes,
            "last_minute": self.last_minute,
            "last_seen": self._last.isoformat() if self._last else self.last_seen,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k[0] != "_"}
        return cls(**known)


@dataclass
class Watch:
    """The short windows of one NHI while an import walks its events (in time order)."""

    recent: deque[datetime] = field(default_factory=deque)
    recon: dict[str, datetime] = field(default_factory=dict)
    # credential -> network -> last use
    uses: dict[str, dict[str, datetime]] = field(default_factory=dict)
    burst_until: datetime | None = None
    recon_until: datetime | None = None


def _revocation(intent: Intent, event: Event) -> Draft | None:
    if intent.revoked_at is not None and event.at > intent.revoked_at:
        why = f"{intent.status.value} since {intent.revoked_at.isoformat()}"
    elif event.at > intent.expires_at:
        why = f"expired at {intent.expires_at.isoformat()}"
    else:
        return None
    # A refused attempt is the revocation working, but someone still holds the credential.
    severity = Severity.CRITICAL if event.outcome == "success" else Severity.HIGH
    return Draft(
        ActivityKind.USE_AFTER_REVOCATION,
        severity,
        f"{intent.name} used after it stopped being usable ({why})",
        {"why": why, "outcome": event.outcome},
    )


def _network(intent: Intent, profile: Profile, event: Event) -> Draft | None:
    net = network_of(event.source_ip)
    if net is None or event.source_ip is None:
        return None
    if intent.cidrs:
        if not intent.allows(event.source_ip):
            return Draft(
                ActivityKind.NEW_NETWORK,
                Severity.HIGH,
                f"{intent.name} used from {event.source_ip}, outside its declared CIDRs",
                {"network": net, "allowed_cidrs": list(intent.cidrs)},
            )
        return None
    if profile.learned and net not in profile.networks:
        return Draft(
            ActivityKind.NEW_NETWORK,
            Severity.MEDIUM,
            f"{intent.name} used from a network never seen before ({net})",
            {"network": net, "known_networks": sorted(profile.networks)[:20]},
        )
    return None


def _concurrent(watch: Watch, event: Event) -> Draft | None:
    net = network_of(event.source_ip)
    if net is None or event.credential is None:
        return None
    uses = watch.uses.get(event.credential)
    if uses is None:
        watch.uses[event.credential] = {net: event.at}
        return None
    if len(uses) == 1 and net in uses:  # the usual case: one network, nothing to compare
        uses[net] = event.at
        return None
    horizon = event.at - timedelta(seconds=CONCURRENT_SECONDS)
    for other in [n for n, t in uses.items() if t < horizon]:
        del uses[other]
    others = sorted(n for n in uses if n != net)
    uses[net] = event.at
    if not others:
        return None
    return Draft(
        ActivityKind.CONCURRENT_NETWORKS,
        Severity.HIGH,
        f"one credential used from {len(others) + 1} networks within {CONCURRENT_SECONDS} s",
        {"credential": event.credential, "networks": [net, *others]},
    )


def _recon(watch: Watch, event: Event) -> Draft | None:
    if not is_recon(event):
        return None
    # Distinct API calls: an agent reading many objects with one GetObject is not enumerating.
    # Every catalog query counts: a walk of information_schema repeats the same few views.
    key = f"{event.resource} {event.id}" if _is_catalog(event.resource) else event.action
    watch.recon[key] = event.at
    horizon = event.at - RECON_WINDOW
    for old in [k for k, t in watch.recon.items() if t < horizon]:
        del watch.recon[old]
    if len(watch.recon) < RECON_DISTINCT or (
        watch.recon_until is not None and event.at < watch.recon_until
    ):
        return None
    watch.recon_until = event.at + RECON_WINDOW
    return Draft(
        ActivityKind.RECONNAISSANCE,
        Severity.HIGH,
        f"{len(watch.recon)} distinct enumeration calls within {RECON_WINDOW}",
        {"calls": sorted(watch.recon)[:30]},
    )


def _burst(profile: Profile, watch: Watch, event: Event) -> Draft | None:
    watch.recent.append(event.at)
    horizon = event.at - BURST_WINDOW
    while watch.recent and watch.recent[0] < horizon:
        watch.recent.popleft()
    limit = max(BURST_FLOOR, BURST_FACTOR * profile.rate()) if profile.learned else None
    if limit is None or len(watch.recent) <= limit:
        return None
    if watch.burst_until is not None and event.at < watch.burst_until:
        return None
    watch.burst_until = event.at + BURST_WINDOW
    return Draft(
        ActivityKind.BURST,
        Severity.MEDIUM,
        f"{len(watch.recent)} events within a minute (learned rate {profile.rate():.1f}/min)",
        {"events_in_window": len(watch.recent), "learned_rate_per_minute": profile.rate()},
    )


def judge(intent: Intent, profile: Profile, watch: Watch, event: Event) -> list[Draft]:
    """The findings one event raises, then the event is learned into `profile`.

    Per event: at most one of revocation / human / scope (in that order: the first says the
    most), and independently network, concurrency, reconnaissance and burst, which need the
    windows in `watch` updated by every event."""
    found: list[Draft] = []
    first = _revocation(intent, event)
    if first is None:
        human = is_human(event, intent.platform, intent.category)
        if human is not None:
            first = Draft(
                ActivityKind.HUMAN_USE,
                Severity.HIGH,
                f"{intent.name} looks used by a person: {human}",
                {"why": human},
            )
    if first is None and not in_scope(intent, event):
        first = Draft(
            ActivityKind.OUT_OF_SCOPE,
            Severity.CRITICAL if event.outcome == "success" else Severity.HIGH,
            f"{intent.name} called {event.action}, outside its granted scope ({event.outcome})",
            {"outcome": event.outcome},
        )
    if first is not None:
        found.append(first)
    for check in (
        _network(intent, profile, event),
        _concurrent(watch, event),
        _recon(watch, event),
        _burst(profile, watch, event),
    ):
        if check is not None:
            found.append(check)
    profile.learn(event)
    return found
