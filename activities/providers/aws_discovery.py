"""What a sweep asks of AWS: every identity under this deployment's IAM path, with its tags,
usage and scope drift, in as few calls as IAM offers (the discovery half of AwsProvider).

Bulk calls, per account:
- `GetAccountAuthorizationDetails` (Filter User, then Role; MaxItems 1000, paged by Marker):
  users and roles with their tags, inline policies (the scope policy drift is judged on),
  attached policies, groups, and for roles `RoleLastUsed`. It has no PathPrefix: entries
  outside our IAM path are dropped as each page arrives.
- The IAM credential report (`GenerateCredentialReport` until COMPLETE, `GetCredentialReport`):
  the last use of both access keys of every user.

Per identity, only where no bulk call carries the field:
- a user missing from the credential report (created after the report, which AWS reuses for
  up to four hours) or an account that refuses the report: `ListAccessKeys` +
  `GetAccessKeyLastUsed` for that user, if the inventory holds it active;
- an orphan's delivery secret (Secrets Manager, `ListSecrets` by its `nhi:nhi-id` tag).

moto (5.2) serves `GetAccountAuthorizationDetails` in one page whatever MaxItems says (no
Marker), and writes no last-used dates into its credential report unless a key was used;
tests emulate IAM's paging with botocore event hooks on the worker's client.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code
from activities.providers.aws_iam import SCOPE_POLICY_NAME
from activities.providers.base import NHI_ID_TAG, Discovery, Known, Pace
from activities.providers.secret_store import SecretStore
from models.enums import NhiKind
from nhi import MANAGED_BY
from nhi.infra.ratelimit import THROTTLING_CODES
from nhi.rules.findings import PlatformIdentity
from nhi.rules.policy import identity_policy_document

if TYPE_CHECKING:
    from types_boto3_iam import IAMClient

log = logging.getLogger(__name__)
T = TypeVar("T")

DETAILS_PAGE_MAX = 1000  # IAM's largest MaxItems for GetAccountAuthorizationDetails
LISTINGS = ("User", "Role")  # in this order; a resumed sweep skips the finished ones
KIND_OF = {"User": NhiKind.IAM_USER_KEY, "Role": NhiKind.IAM_ROLE}
ENTRIES = {"User": "UserDetailList", "Role": "RoleDetailList"}
POLICIES = {"User": "UserPolicyList", "Role": "RolePolicyList"}
THROTTLE_ATTEMPTS = 8  # our own retries of a throttled call, on top of botocore's
REPORT_POLLS = 12  # GenerateCredentialReport polls before giving up on the report
DETAIL_THREADS = 8  # concurrent per-identity calls (all still under the one budget)
WATCH_ID = "nhi-sweep-throttle-watch"


@dataclass(frozen=True)
class ResumePoint:
    """Where a listing goes on: the listing (User/Role) and IAM's Marker of its next page
    (None: from its first page)."""

    listing: str
    marker: str | None = None


@runtime_checkable
class PageSink(Protocol):
    """What a paged discovery reports to: the sweep's budget, its pages, and where to resume.

    `__call__` takes one call's share of the budget (and heartbeats); `throttled` and
    `succeeded` tell the budget how the platform answered; `known` answers, per page, what the
    inventory holds of that page's names; `page` takes a page's identities together with the
    point after it, which the sink heartbeats so a restarted worker resumes there."""

    page_size: int
    resume_from: ResumePoint | None

    def __call__(self) -> None: ...

    def throttled(self) -> None: ...

    def succeeded(self) -> None: ...

    def known(self, names: list[str]) -> Mapping[str, Known]: ...

    def page(self, found: list[PlatformIdentity], after: ResumePoint | None) -> None: ...


@runtime_checkable
class PagedDiscovery(Protocol):
    """A provider whose discovery hands its listing over a page at a time."""

    def discover_pages(self, sink: PageSink) -> Discovery: ...


class _Collect:
    """A sink for callers that want the whole listing at once (`discover`)."""

    def __init__(self, known: Mapping[str, Known], pace: Pace) -> None:
        self._known = known
        self._pace = pace
        self.page_size = DETAILS_PAGE_MAX
        self.resume_from: ResumePoint | None = None
        self.found: list[PlatformIdentity] = []

    def __call__(self) -> None:
        self._pace()

    def throttled(self) -> None:
        return None

    def succeeded(self) -> None:
        return None

    def known(self, names: list[str]) -> Mapping[str, Known]:
        del names  # the whole inventory is at hand
        return self._known

    def page(self, found: list[PlatformIdentity], after: ResumePoint | None) -> None:
        del after  # nothing to resume: the caller holds everything
        self.found += found


def _document(entry: Mapping[str, Any], listing: str) -> dict[str, Any]:
    """The scope policy among an entry's inline policies ({} when there is none). IAM sends
    policy documents URL-encoded; botocore decodes most, not all, of them."""
    for policy in entry.get(POLICIES[listing], ()):
        if policy.get("PolicyName") == SCOPE_POLICY_NAME:
            doc = policy.get("PolicyDocument", {})
            if isinstance(doc, str):
                return dict(json.loads(urllib.parse.unquote(doc)))
            return dict(doc)
    return {}


def _when(value: str) -> datetime | None:
    """A credential report date ("N/A", "no_information" or ISO 8601)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class AwsDiscovery:
    """What a sweep asks of AWS: every identity under our IAM path, with details where needed."""

    _iam: IAMClient
    _store: SecretStore
    _iam_path: str
    _on_throttle: Callable[[], None] | None = None

    # ---- calls under the budget --------------------------------------------------------------

    def _watch_throttling(self, sink: PageSink) -> None:
        """Tell the budget about every throttled attempt on this client, botocore's own retries
        included (they happen below our calls and would otherwise hide the platform's signal)."""
        self._on_throttle = sink.throttled
        self._iam.meta.events.register(
            "needs-retry.iam", self._seen_attempt, unique_id=f"{WATCH_ID}-{id(self)}"
        )

    def _seen_attempt(self, response: Any = None, **_: Any) -> None:
        if response is None or self._on_throttle is None:
            return
        code = response[1].get("Error", {}).get("Code") if len(response) > 1 else None
        if code in THROTTLING_CODES:
            self._on_throttle()

    def _call(self, sink: PageSink, call: Callable[..., T], **params: Any) -> T:
        """One IAM call under the budget. Throttling halves the budget's rate and the call is
        tried again (jittered backoff); any other error propagates."""
        for attempt in range(THROTTLE_ATTEMPTS):
            sink()
            try:
                result = call(**params)
            except ClientError as err:
                if aws_code(err) not in THROTTLING_CODES or attempt == THROTTLE_ATTEMPTS - 1:
                    raise
                sink.throttled()
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))  # noqa: S311 (jitter)
                continue
            sink.succeeded()
            return result
        raise AssertionError("unreachable")  # the loop returns or raises

    # ---- per identity (fallbacks and the public reads) --------------------------------------

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """RoleLastUsed, or the latest use of any of the user's access keys."""
        del target  # one AWS account per worker
        if kind == NhiKind.IAM_ROLE:
            return (
                self._iam.get_role(RoleName=name)["Role"]
                .get("RoleLastUsed", {})
                .get("LastUsedDate")
            )
        return self._keys_last_used(name, None)

    def _keys_last_used(self, name: str, sink: PageSink | None) -> datetime | None:
        """Per user: ListAccessKeys + GetAccessKeyLastUsed (the credential report's fallback)."""

        def call(fn: Callable[..., T], **params: Any) -> T:
            return self._call(sink, fn, **params) if sink is not None else fn(**params)

        dates = []
        for key in call(self._iam.list_access_keys, UserName=name)["AccessKeyMetadata"]:
            used = call(self._iam.get_access_key_last_used, AccessKeyId=key["AccessKeyId"])
            if used["AccessKeyLastUsed"].get("LastUsedDate"):
                dates.append(used["AccessKeyLastUsed"]["LastUsedDate"])
        return max(dates) if dates else None

    def _drift(self, document: Mapping[str, Any], granted: Known) -> str | None:
        """Whether the scope policy IAM holds is the one the grant makes (any difference, a
        missing policy included, is drift: IAM offers no finer comparison we could trust)."""
        if granted.expires_at is None:
            return None  # nothing to compare with
        expected = identity_policy_document(
            list(granted.scope), list(granted.allowed_cidrs), granted.expires_at
        )
        if document == expected:
            return None
        return "platform permissions differ from the granted scope"

    # ---- bulk --------------------------------------------------------------------------------

    def _key_usage(self, sink: PageSink) -> dict[str, datetime | None] | None:
        """Users under our path → the latest use of their access keys, from the credential
        report; None when the account gives no report (every active user then falls back)."""
        try:
            wait = 0.2
            for _ in range(REPORT_POLLS):
                state = self._call(sink, self._iam.generate_credential_report)["State"]
                if state == "COMPLETE":
                    break
                time.sleep(wait)
                wait = min(2.0, wait * 2)
            else:
                log.warning("credential report not ready: last use read per user")
                return None
            content = self._call(sink, self._iam.get_credential_report)["Content"]
        except ClientError as err:
            log.warning("no credential report (%s): last use read per user", aws_code(err))
            return None
        ours = f":user{self._iam_path}"
        usage: dict[str, datetime | None] = {}
        for row in csv.DictReader(io.StringIO(content.decode())):
            if ours not in row.get("arn", ""):
                continue
            dates = [
                d
                for d in (
                    _when(row.get("access_key_1_last_used_date", "")),
                    _when(row.get("access_key_2_last_used_date", "")),
                )
                if d is not None
            ]
            usage[row["user"]] = max(dates) if dates else None
        return usage

    def _pages(
        self, sink: PageSink
    ) -> Iterable[tuple[str, list[dict[str, Any]], ResumePoint | None]]:
        """Each page of users, then of roles, under our path, with the point after it (None
        after the last page). Starts where the sink says a previous attempt stopped."""
        start = sink.resume_from or ResumePoint(LISTINGS[0])
        size = max(1, min(DETAILS_PAGE_MAX, sink.page_size))
        for index, listing in enumerate(LISTINGS):
            if index < LISTINGS.index(start.listing):
                continue
            marker = start.marker if listing == start.listing else None
            while True:
                params: dict[str, Any] = {"Filter": [listing], "MaxItems": size}
                if marker:
                    params["Marker"] = marker
                page: Mapping[str, Any] = self._call(
                    sink, self._iam.get_account_authorization_details, **params
                )
                if page.get("IsTruncated") and not page.get("Marker"):
                    raise ApplicationError(
                        "GetAccountAuthorizationDetails: truncated page without a marker",
                        type="ListingIncomplete",
                    )
                marker = page.get("Marker") if page.get("IsTruncated") else None
                after = ResumePoint(listing, marker) if marker else None
                if after is None and index + 1 < len(LISTINGS):
                    after = ResumePoint(LISTINGS[index + 1])
                entries = [
                    e
                    for e in page.get(ENTRIES[listing], ())
                    if str(e.get("Path", "")).startswith(self._iam_path)
                ]
                yield listing, entries, after
                if marker is None:
                    break

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Users and roles under our path, all at once (see `discover_pages` for sweeps)."""
        sink = _Collect(known, pace)
        self.discover_pages(sink)
        return Discovery(identities=sink.found)

    def discover_pages(self, sink: PageSink) -> Discovery:
        """Users and roles under our path, handed to `sink` a page at a time (nothing else is
        kept). Tags come with each page; the delivery secret is read only for managed names
        the inventory does not hold alive; usage and scope drift only for active ones.

        A listing that fails raises ListingFailed: a listing that ends early must never read as
        "nothing there" (the sink has seen some pages, which is why sweeps act only after)."""
        self._watch_throttling(sink)
        usage: dict[str, datetime | None] | None = None
        try:
            for listing, entries, after in self._pages(sink):
                names = [str(e.get("UserName") or e.get("RoleName")) for e in entries]
                known = sink.known(names)
                if (
                    usage is None
                    and listing == "User"
                    and any(known[n].status == "active" for n in names if n in known)
                ):
                    usage = self._key_usage(sink) or {}
                found = self._identities(sink, listing, entries, known, usage or {})
                sink.page(found, after)
        except ClientError as err:
            raise ApplicationError(
                f"listing IAM identities failed ({aws_code(err)}): sweep stopped, nothing changed",
                type="ListingFailed",
                non_retryable=True,
            ) from None
        finally:
            self._on_throttle = None
        return Discovery(identities=[])

    def _identities(
        self,
        sink: PageSink,
        listing: str,
        entries: list[dict[str, Any]],
        known: Mapping[str, Known],
        usage: Mapping[str, datetime | None],
    ) -> list[PlatformIdentity]:
        """A page's identities; the few per-identity calls a page needs run concurrently."""
        kind = KIND_OF[listing]

        def one(entry: dict[str, Any]) -> PlatformIdentity:
            name = str(entry.get("UserName") or entry.get("RoleName"))
            status = known[name].status if name in known else None
            tags = {t["Key"]: t["Value"] for t in entry.get("Tags", ())}
            managed = status is not None or tags.get("managed-by") == MANAGED_BY
            nhi_id = tags.get(NHI_ID_TAG)
            secret_arn = None
            if managed and nhi_id and status is None:
                secret_arn = self._call(sink, self._store.find_by_tag, key=NHI_ID_TAG, value=nhi_id)
            last_used = drift = None
            if status == "active":
                if listing == "Role":
                    last_used = entry.get("RoleLastUsed", {}).get("LastUsedDate")
                elif name in usage:
                    last_used = usage[name]
                else:  # not in the report (newer than it, or no report): ask per user
                    last_used = self._keys_last_used(name, sink)
                drift = self._drift(_document(entry, listing), known[name])
            return PlatformIdentity(
                name=name,
                kind=kind.value,
                created_at=entry["CreateDate"],
                managed=managed,
                nhi_id=nhi_id,
                secret_arn=secret_arn,
                last_used_at=last_used,
                drift=drift,
            )

        slow = [e for e in entries if self._needs_calls(e, known, usage, listing)]
        if len(slow) < 2:
            return [one(e) for e in entries]
        with ThreadPoolExecutor(max_workers=DETAIL_THREADS) as pool:
            return list(pool.map(one, entries))

    @staticmethod
    def _needs_calls(
        entry: Mapping[str, Any],
        known: Mapping[str, Known],
        usage: Mapping[str, datetime | None],
        listing: str,
    ) -> bool:
        name = str(entry.get("UserName") or entry.get("RoleName"))
        if name not in known:
            return any(t.get("Key") == NHI_ID_TAG for t in entry.get("Tags", ()))
        return listing == "User" and known[name].status == "active" and name not in usage
