"""The web dashboard (issue 18) in a real browser: Playwright drives the system Chromium
against the real API, worker, Temporal dev server, Postgres and moto (the `service` fixture).

Each test also writes screenshots of the pages it visits, at 1280 px and at phone width, to
docs/screenshots/ (overwritten every run; the README shows them)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from sqlalchemy import func, select

from api.app import create_app
from models.orm import AuditEvent, UiSession
from nhi.infra.db import transaction
from nhi.services.tokens import revoke_token
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, ApiServer, agent_body, bearer, eventually, mint

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Form controls a screen reader could not name (no <label>, no aria-label).
UNLABELLED = """() => [...document.querySelectorAll(
    "main input:not([type=hidden]), main select, main textarea")]
    .filter(e => e.labels.length === 0 && !e.getAttribute("aria-label")).map(e => e.outerHTML)"""
SENSITIVE = [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::tmp/*"]}]


def chromium() -> str:
    # Playwright must never download a browser here: the distribution's Chromium only.
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (`make test` installs it)"
    return path


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        await b.close()


@pytest_asyncio.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport=DESKTOP)
    yield ctx
    await ctx.close()


@pytest_asyncio.fixture
async def api(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    token = service.token("ui-platform", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as c:
        yield c


async def _agent(api: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await api.post("/v1/agents", json=agent_body(**overrides))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _request(
    api: httpx.AsyncClient, agent_id: str, scope: list[dict[str, Any]] | None = None, **extra: Any
) -> str:
    body = {"platform": "aws", "kind": "iam_role", "trust_principal": TRUST}
    body |= {"scope": scope or ROLE_SCOPE, **extra}
    response = await api.post(f"/v1/agents/{agent_id}/nhis", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _status(api: httpx.AsyncClient, nhi_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        nhi = (await api.get(f"/v1/nhis/{nhi_id}")).json()
        assert nhi["status"] == status, nhi
        return dict(nhi)

    return await eventually(check, timeout=60)


async def _active(api: httpx.AsyncClient, agent_id: str, **extra: Any) -> dict[str, Any]:
    return await _status(api, await _request(api, agent_id, **extra), "active")


async def sign_in(page: Page, service: Service, token: str) -> None:
    await page.goto(f"{service.url}/ui/login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/ui/mine")


async def shoot(page: Page, name: str) -> None:
    """The page as it is now, at 1280 px and at phone width (both full length)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        await page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size(DESKTOP)


def _csrf_of(page_html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = page_html.index(marker) + len(marker)
    return page_html[start : page_html.index('"', start)]


def _shown(value: str) -> str:
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC")


async def test_owner_sees_only_their_nhis_and_renews_one(
    service: Service, api: httpx.AsyncClient, context: BrowserContext
) -> None:
    mine = await _agent(api, owner_email="olivia@example.com", backup_owner_email="ben@example.com")
    theirs = await _agent(api, owner_email="ana@example.com")
    nhi = await _active(api, mine["id"], ttl="10d")
    other = await _active(api, theirs["id"], ttl="10d")
    token = service.token(
        "ui-olivia", "platform", teams=["olivia-team"], email="olivia@example.com"
    )

    page = await context.new_page()
    await page.goto(f"{service.url}/ui/login")
    await shoot(page, "login")
    await sign_in(page, service, token)
    row = page.locator(f'tr[data-nhi="{nhi["id"]}"]')
    await expect(row).to_contain_text(nhi["name"])
    assert other["name"] not in await page.content()
    await expect(row.get_by_test_id("expires-at")).to_have_text(_shown(nhi["expires_at"]))

    await row.get_by_label(f"Extend {nhi['name']} by").fill("20d")
    await row.get_by_role("button", name=f"Renew {nhi['name']}").click()
    await page.wait_for_url("**/ui/mine?done=renew")
    renewed = (await api.get(f"/v1/nhis/{nhi['id']}")).json()
    assert renewed["expires_at"] > nhi["expires_at"]
    await expect(page.get_by_role("status")).to_contain_text("Renewed")
    await expect(row.get_by_test_id("expires-at")).to_have_text(_shown(renewed["expires_at"]))
    await shoot(page, "my-identities")

    # The inventory shows the new expiry too, and only what the owner may see.
    await page.goto(f"{service.url}/ui/security")
    inventory = page.locator(f'tr[data-nhi="{nhi["id"]}"]').first
    await expect(inventory.get_by_test_id("expires-at")).to_have_text(_shown(renewed["expires_at"]))
    assert other["name"] not in await page.content()

    # An NHI inside its reminder window gets a reminder; the owner answers it (here through
    # the API) and the Expiring page shows the reminder and who answered.
    # Its 1-day reminder falls due a few seconds after activation (earlier ones are skipped).
    soon = await _active(api, mine["id"], ttl=86400 + 6)
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token)) as olivia:

        async def reminded() -> dict[str, Any]:
            # The last reminder is followed at once by an escalation, which supersedes it:
            # the escalation is the prompt left to answer.
            prompts = (await olivia.get("/v1/prompts", params={"nhi_id": soon["id"]})).json()
            escalations = [p for p in prompts if p["kind"] == "escalation"]
            assert escalations, f"no escalation yet: {prompts}"
            return dict(escalations[0])

        prompt = await eventually(reminded, timeout=60)
        answered = await olivia.post(
            f"/v1/prompts/{prompt['id']}/answer",
            json={"answer": "let_expire", "reason": "the pilot ends this week"},
        )
        assert answered.status_code == 200, answered.text
    await page.goto(f"{service.url}/ui/expiring")
    await expect(page.locator("main")).to_contain_text(nhi["name"])
    item = page.locator(f'li[data-nhi="{soon["id"]}"]')
    await item.locator("summary").click()
    await expect(item).to_contain_text("answered let_expire by")
    await shoot(page, "expiring")

    with transaction(service.sessions) as s:
        actors = set(s.scalars(select(AuditEvent.actor).where(AuditEvent.subject_id == nhi["id"])))
    assert "token:ui-olivia" in actors  # the same audit actor as through the API


async def test_approver_approves_and_requester_sees_no_button(
    service: Service, api: httpx.AsyncClient, browser: Browser
) -> None:
    requester = service.token("ui-rita", "platform", teams=["search"], email="rita@example.com")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(requester)) as rita:
        agent = await _agent(rita, owner_email="rita@example.com")
        nhi_id = await _request(rita, agent["id"], scope=SENSITIVE)
    await _status(api, nhi_id, "pending_approval")

    # Rita, with the approver token she also holds: the same person, so no decision buttons.
    own = await browser.new_context(viewport=DESKTOP)
    page = await own.new_page()
    await sign_in(
        page, service, service.token("ui-rita-appr", "approver", email="rita@example.com")
    )
    await page.goto(f"{service.url}/ui/approvals")
    card = page.locator(f'section[data-nhi="{nhi_id}"]')
    await expect(card).to_contain_text("You requested this")
    assert await card.locator("button").count() == 0
    await own.close()

    approver = await browser.new_context(viewport=DESKTOP)
    page = await approver.new_page()
    await sign_in(page, service, service.token("ui-abe", "approver", email="abe@example.com"))
    await page.goto(f"{service.url}/ui/approvals")
    card = page.locator(f'section[data-nhi="{nhi_id}"]')
    await expect(card.locator("code.sensitive")).to_have_text("s3:DeleteObject")
    await shoot(page, "approvals")
    await card.get_by_label("Reason to approve").fill("needed for the cleanup job")
    await card.get_by_role("button", name="Approve").click()
    await page.wait_for_url("**/ui/approvals?done=approve")
    approved = await _status(api, nhi_id, "active")
    assert approved["status"] == "active"
    await page.reload()
    assert await page.locator(f'section[data-nhi="{nhi_id}"]').count() == 0
    with transaction(service.sessions) as s:
        actors = set(s.scalars(select(AuditEvent.actor).where(AuditEvent.subject_id == nhi_id)))
    assert "token:ui-abe" in actors
    await approver.close()


async def test_security_filters_opens_agent_and_decommissions_auditor_cannot(
    service: Service, api: httpx.AsyncClient, browser: Browser
) -> None:
    agent = await _agent(
        api, owner_email="sam@example.com", backup_owner_email="audrey@example.com"
    )
    target = await _active(api, agent["id"])
    spare = await _active(api, agent["id"])

    sec = await browser.new_context(viewport=DESKTOP)
    page = await sec.new_page()
    page.on("dialog", lambda d: d.accept())
    await sign_in(page, service, service.token("ui-sec", "security", email="sec@example.com"))
    await page.goto(f"{service.url}/ui/security")
    await page.get_by_label("Team").select_option("search")
    await page.get_by_label("Status").select_option("active")
    await page.get_by_label("Platform").select_option("aws")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**/ui/security?*status=active*")
    row = page.locator(f'tr[data-nhi="{target["id"]}"]').first
    await expect(row).to_contain_text(target["name"])
    await shoot(page, "security")
    await page.get_by_label("Status").select_option("quarantined")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url("**status=quarantined*")
    assert await page.locator(f'#inventory ~ * tr[data-nhi="{target["id"]}"]').count() == 0

    await page.goto(f"{service.url}/ui/agents/{agent['id']}")
    await expect(page.get_by_test_id("risk-score")).to_have_text(_digits())
    await shoot(page, "agent")
    await page.get_by_role("button", name=f"Decommission {target['name']}").click()
    await page.wait_for_url(f"**/ui/agents/{agent['id']}?done=decommission")
    await _status(api, target["id"], "quarantined")
    await page.reload()
    await expect(page.locator(f'tr[data-nhi="{target["id"]}"] .status')).to_have_text("quarantined")
    await sec.close()

    # An auditor (the agent's backup owner, even) sees the same pages with every action
    # disabled, and a forged post with a valid CSRF token is still refused.
    aud = await browser.new_context(viewport=DESKTOP)
    page = await aud.new_page()
    await sign_in(page, service, service.token("ui-audrey", "auditor", email="audrey@example.com"))
    for path in ("/ui/mine", "/ui/security", f"/ui/agents/{agent['id']}", "/ui/approvals",
                 "/ui/expiring", "/ui/admin"):  # fmt: skip
        response = await page.goto(f"{service.url}{path}")
        assert response is not None and response.status == 200, path
        await expect(page.locator("main form[method=post] button:enabled")).to_have_count(0)
        assert await page.evaluate(UNLABELLED) == [], path
    await shoot(page, "admin")
    await page.goto(f"{service.url}/ui/mine")
    assert await page.locator(f'tr[data-nhi="{spare["id"]}"] button[disabled]').count() >= 2
    forged = await aud.request.post(
        f"{service.url}/ui/nhis/{spare['id']}/decommission",
        form={"csrf_token": _csrf_of(await page.content()), "reason": "forged"},
        max_redirects=0,
    )
    assert forged.status == 403, await forged.text()
    assert (await api.get(f"/v1/nhis/{spare['id']}")).json()["status"] == "active"
    await aud.close()


def _digits() -> re.Pattern[str]:
    return re.compile(r"^\d{1,3}$")


async def test_posts_without_csrf_or_session_are_refused(
    service: Service, api: httpx.AsyncClient, context: BrowserContext
) -> None:
    agent = await _agent(api, owner_email="carl@example.com")
    nhi = await _active(api, agent["id"])
    page = await context.new_page()
    await sign_in(
        page,
        service,
        service.token("ui-carl", "platform", teams=["carl"], email="carl@example.com"),
    )
    url = f"{service.url}/ui/nhis/{nhi['id']}/rotate"
    for form in ({"reason": "no token"}, {"reason": "wrong", "csrf_token": "x" * 43}):
        refused = await context.request.post(url, form=form, max_redirects=0)
        assert refused.status == 403, await refused.text()
        assert "csrf_token" in await refused.text()
    with transaction(service.sessions) as s:
        rotations = s.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.subject_id == nhi["id"], AuditEvent.actor == "token:ui-carl")
        )
    assert rotations == 0

    # No session: 401 (the sign-in page), like the API without a bearer token.
    async with httpx.AsyncClient(base_url=service.url) as anon:
        assert (await anon.get("/ui/mine")).status_code == 401
        assert (await anon.post(url, data={"csrf_token": "x"})).status_code == 401
        # The sign-in form itself carries a (double-submit) CSRF token.
        assert (await anon.post("/ui/login", data={"token": "nhi_x"})).status_code == 403

    # Signing out deletes the session: the cookie is worthless afterwards.
    cookie = next(c for c in await context.cookies() if c["name"] == "nhi_ui_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/ui/login")
    async with httpx.AsyncClient(base_url=service.url) as stale:
        stale.cookies.set("nhi_ui_session", cookie["value"], path="/ui")
        assert (await stale.get("/ui/mine")).status_code == 401
    with transaction(service.sessions) as s:
        key = hashlib.sha256(cookie["value"].encode()).hexdigest()
        assert s.get(UiSession, key) is None
        trail = list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_type == "ui_session", AuditEvent.subject_id == key[:16])
                .order_by(AuditEvent.id)
            )
        )
        assert trail == ["ui.signed_in", "ui.signed_out"]


async def test_admin_edits_a_policy_with_validation_and_a_diff(
    service: Service, context: BrowserContext
) -> None:
    admin = service.token("ui-admin", "admin", email="adele@example.com")
    page = await context.new_page()
    await sign_in(page, service, admin)
    await page.goto(f"{service.url}/ui/admin")
    box = page.locator('details:has(summary:has-text("aws/iam_user_key/prod"))')
    await box.locator("summary").click()
    area = box.get_by_label("Policy aws/iam_user_key/prod")
    original = await area.input_value()
    current = yaml.safe_load(original)["task_credential_max_ttl"]

    # Invalid input: refused with the field and rule named, nothing saved.
    await area.fill(original.replace("default_ttl:", "default_ttl: soon\nx_default_ttl:", 1))
    await box.get_by_role("button", name="Preview changes").click()
    await expect(page.get_by_test_id("error")).to_contain_text("default_ttl")
    assert (await page.request.get(f"{service.url}/ui/admin")).status == 200

    await page.goto(f"{service.url}/ui/admin")
    await box.locator("summary").click()
    changed = original.replace(
        f"task_credential_max_ttl: {current}", f"task_credential_max_ttl: {current - 60}"
    )
    await area.fill(changed)
    await box.get_by_role("button", name="Preview changes").click()
    diff = page.get_by_test_id("diff")
    await expect(diff).to_contain_text(f"-task_credential_max_ttl: {current}")
    await expect(diff).to_contain_text(f"+task_credential_max_ttl: {current - 60}")
    await shoot(page, "policy-diff")
    await page.get_by_role("button", name="Save policy").click()
    await page.wait_for_url("**/ui/admin?done=policy")

    async with httpx.AsyncClient(base_url=service.url, headers=bearer(admin)) as http:
        saved = next(
            p
            for p in (await http.get("/v1/policies")).json()
            if (p["platform"], p["kind"], p["environment"]) == ("aws", "iam_user_key", "prod")
        )
        assert saved["updated_by"] == "token:ui-admin"
        assert saved["task_credential_max_ttl_seconds"] == current - 60
        # Put it back for the rest of the suite.
        restored = await http.put("/v1/policies", json={"policies": [yaml.safe_load(original)]})
        assert restored.status_code == 200, restored.text


async def test_revoking_the_token_ends_its_sessions(
    service: Service, context: BrowserContext
) -> None:
    name = f"ui-short-{uuid.uuid4().hex[:6]}"
    token = mint(service.sessions, name, "auditor", email="short@example.com")
    page = await context.new_page()
    await sign_in(page, service, token)
    await page.goto(f"{service.url}/ui/expiring")
    with transaction(service.sessions) as s:
        revoke_token(s, name, "test:revoke")
    response = await page.reload()
    assert response is not None and response.status == 401
    await expect(page.get_by_role("alert")).to_contain_text("revoked")
    # Signing in again (keyboard only) returns to the page that asked for it.
    fresh = mint(service.sessions, f"{name}-2", "auditor", email="short@example.com")
    await page.get_by_label("API token").fill(fresh)
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/ui/expiring")


# ---- OIDC: authorization code + PKCE against a tiny local provider -----------------------------


class TinyIdp:
    """Just enough of an OIDC provider: /authorize answers at once with a code for a fixed
    user; /token checks the PKCE verifier against the challenge and issues a signed ID token."""

    ISSUER = "https://idp.test"
    CLIENT = "nhi-dashboard"

    def __init__(self, claims: dict[str, Any]) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.claims = claims
        self.codes: dict[str, dict[str, str]] = {}
        self.refused: list[str] = []
        app = FastAPI()
        app.get("/authorize")(self.authorize)
        app.post("/token")(self.token)
        self.app = app

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [jwk | {"kid": "idp1", "use": "sig", "alg": "RS256"}]})

    async def authorize(self, request: Request) -> RedirectResponse:
        q = request.query_params
        assert q["response_type"] == "code" and q["code_challenge_method"] == "S256"
        code = uuid.uuid4().hex
        self.codes[code] = dict(q)
        return RedirectResponse(f"{q['redirect_uri']}?code={code}&state={q['state']}", 303)

    async def token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        asked = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if asked is None or asked["code_challenge"] != expected:
            self.refused.append(form.get("code", ""))
            return JSONResponse({"error": "invalid_grant"}, 400)
        claims = self.claims | {
            "iss": self.ISSUER,
            "aud": self.CLIENT,
            "exp": int(time.time()) + 300,
            "nonce": asked["nonce"],
        }
        signed = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "idp1"})
        return JSONResponse({"id_token": signed, "token_type": "Bearer"})


async def test_oidc_sign_in_with_pkce(service: Service, context: BrowserContext) -> None:
    idp = TinyIdp({"sub": "olga-sub", "email": "Olga@Example.com", "roles": ["security"]})
    with ApiServer(idp.app) as provider:
        settings = service.settings.model_copy(
            update={
                "oidc_issuer": TinyIdp.ISSUER,
                "oidc_audience": "nhi-lifecycle",
                "oidc_jwks": idp.jwks(),
                "oidc_client_id": TinyIdp.CLIENT,
                "oidc_authorization_endpoint": f"{provider.url}/authorize",
                "oidc_token_endpoint": f"{provider.url}/token",
            }
        )
        with ApiServer(create_app(settings)) as app:
            page = await context.new_page()
            await page.goto(f"{app.url}/ui/login")
            await page.get_by_role("link", name="Sign in with your company account").click()
            await page.wait_for_url(f"{app.url}/ui/mine")
            await expect(page.get_by_test_id("whoami")).to_contain_text(
                "oidc:olga-sub (olga@example.com) · security"
            )
            assert idp.refused == []

            # A callback whose state is not this browser's sign-in is refused (401).
            await page.goto(f"{app.url}/ui/login")
            forged = await page.goto(f"{app.url}/ui/oidc/callback?code=x&state=not-mine")
            assert forged is not None and forged.status == 401
            # A code redeemed with the wrong verifier gets no ID token.
            async with httpx.AsyncClient(base_url=provider.url) as http:
                start = await context.request.get(f"{app.url}/ui/oidc/start", max_redirects=0)
                location = start.headers["location"]
                code = (await http.get(location.replace(provider.url, ""))).headers["location"]
                code = parse_qs(code.split("?", 1)[1])["code"][0]
                wrong = await http.post("/token", data={"code": code, "code_verifier": "x" * 43})
                assert wrong.status_code == 400 and idp.refused == [code]


async def test_cookies_are_secure_outside_dev_mode(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.url) as http:
        dev = (await http.get("/ui/login")).headers["set-cookie"].lower()
    assert "httponly" in dev and "samesite=lax" in dev and "secure" not in dev
    production = service.settings.model_copy(update={"dev_mode": False})
    with ApiServer(create_app(production)) as app:
        async with httpx.AsyncClient(base_url=app.url) as http:
            answer = await http.get("/ui/login")
            cookie = answer.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie
            assert "default-src 'self'" in answer.headers["content-security-policy"]


async def test_security_contains_an_agent_and_a_second_person_releases_it(
    service: Service, api: httpx.AsyncClient, browser: Browser
) -> None:
    agent = await _agent(api, owner_email="cora@example.com")
    nhi = await _active(api, agent["id"])
    sec = await browser.new_context(viewport=DESKTOP)
    page = await sec.new_page()
    page.on("dialog", lambda d: d.accept())
    await sign_in(page, service, service.token("ui-sec2", "security", email="sec2@example.com"))
    await page.goto(f"{service.url}/ui/agents/{agent['id']}")
    await page.get_by_label("Reason to contain").fill("leaked in a public gist")
    await page.get_by_role("button", name="Contain").click()
    await page.wait_for_url(f"**/ui/agents/{agent['id']}?done=contain")
    await _status(api, nhi["id"], "quarantined")
    await sec.close()

    approver = await browser.new_context(viewport=DESKTOP)
    page = await approver.new_page()
    await sign_in(page, service, service.token("ui-abe", "approver", email="abe@example.com"))
    await page.goto(f"{service.url}/ui/security")
    row = page.locator("tr", has=page.locator(f'a[href="/ui/agents/{agent["id"]}"]')).filter(
        has=page.get_by_role("button", name="Release")
    )
    await row.get_by_label("Reason to release").fill("key rotated, gist removed")
    await row.get_by_role("button", name="Release").click()
    await page.wait_for_url("**/ui/security?done=release")
    await _status(api, nhi["id"], "active")
    await approver.close()
