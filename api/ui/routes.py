"""The dashboard's pages and forms (`/ui/`).

Adapters only: pages read through api/ui/views.py (the services and visibility rules the API
uses) and every button calls the very function its API route runs, with the same principal,
so the validators, the 401/403/404 rules and the audit actors are the API's. Errors become
an HTML page with the API's status code. Every POST carries the session's CSRF token; one
without it (or with a wrong one) is refused with 403 before anything else happens.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy.orm import Session
from temporalio.client import WorkflowUpdateFailedError

from api.deps import AppState, TemporalUnavailable
from api.errors import field_of, refusal
from api.routes import incidents as incident_routes
from api.routes import lifecycle
from api.routes import nhis as nhi_routes
from api.routes import policies as policy_routes
from api.routes import tokens as token_routes
from api.ui import oidc, views
from api.ui.session import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    UiContext,
    cookie_of,
    csrf_ok,
    end,
    new_secret,
    resolve,
    set_cookie,
    start_with_principal,
    start_with_token,
)
from models.enums import Role
from models.schemas import ContainBody, PolicyApply, ReleaseBody
from nhi.rules.policy import RuleViolation
from nhi.services.auth import Forbidden, Principal, Unauthenticated
from nhi.services.errors import Conflict, NotFound, PolicyViolation

router = APIRouter(prefix="/ui", include_in_schema=False)
_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
# The dashboard loads only its own files: no CDN, no inline script, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATUS_OF: list[tuple[type[Exception], int]] = [
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (RuleViolation, 422),
    (PolicyViolation, 422),
    (ValidationError, 422),
    (TemporalUnavailable, 503),
]
# What a successful action says on the page it returns to (a fixed set: no text from the URL).
DONE = {
    "renew": "Renewed: the new expiry is shown below.",
    "rotate": "Rotated.",
    "decommission": "Decommission started: quarantined until the grace period ends.",
    "restore": "Restored from quarantine.",
    "approve": "Approved: provisioning continues.",
    "deny": "Denied.",
    "policy": "Policy saved.",
    "revoke": "Token revoked.",
    "contain": "Containment started: see the incident on the Security page.",
    "release": "Containment released.",
    "accepted": "Accepted; still being carried out.",
}


def _delta(value: datetime | None, now: datetime) -> str:
    """`in 3d 4h` / `2h 5m ago`: an expiry countdown or a last-used age."""
    if value is None:
        return "never"
    seconds = int((value - now).total_seconds())
    ahead, seconds = seconds >= 0, abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    text = f"{days}d {hours}h" if days else (f"{hours}h {minutes}m" if hours else f"{minutes}m")
    return f"in {text}" if ahead else f"{text} ago"


def _dt(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "—"


_env.filters["dt"] = _dt
_env.globals["delta"] = _delta


def _render(
    request: Request,
    template: str,
    code: int = 200,
    ctx: UiContext | None = None,
    **values: Any,
) -> HTMLResponse:
    p = ctx.principal if ctx else None
    page = _env.get_template(template).render(
        request=request,
        me=p,
        csrf=ctx.csrf if ctx else "",
        csrf_field=CSRF_FIELD,
        now=datetime.now(UTC),
        done=DONE.get(request.query_params.get("done", "")),
        roles=sorted(p.roles) if p else [],
        Role=Role,
        **values,
    )
    return HTMLResponse(page, status_code=code, headers=_HEADERS)


def _status(err: Exception) -> int | None:
    return next((code for kind, code in _STATUS_OF if isinstance(err, kind)), None)


def _message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{field_of(first.get('loc', ()))}: {first.get('msg', '')}"
    return str(err)


async def _guarded(
    request: Request,
    ctx: Callable[[], UiContext | None],
    run: Callable[[], Awaitable[Response]],
) -> Response:
    """Run a page or action; a domain error becomes an HTML page with the API's status."""
    try:
        return await run()
    except WorkflowUpdateFailedError as err:
        return _error(request, ctx(), refusal(err))
    except Exception as err:
        if _status(err) is None:
            raise
        return _error(request, ctx(), err)


def _error(request: Request, ctx: UiContext | None, err: Exception) -> HTMLResponse:
    status = _status(err) or 500
    if status == 401:
        return _login_page(request, _message(err), 401)
    return _render(request, "error.html", status, ctx, status=status, message=_message(err))


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.nhi
    return state


async def _context(request: Request) -> UiContext:
    return await _state(request).db(lambda s: resolve(s, cookie_of(request)))


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (the only kind the dashboard sends), one value per field."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _next(form: dict[str, str], fallback: str) -> str:
    """Where to return after an action: a dashboard path only (never another site)."""
    target = form.get("next", "")
    if target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target.split("?")[0]
    return fallback


def _done(target: str, what: str) -> RedirectResponse:
    return RedirectResponse(f"{target}?done={quote(what)}", status_code=303, headers=_HEADERS)


async def _action(
    request: Request, run: Callable[[UiContext, dict[str, str]], Awaitable[Response]]
) -> Response:
    """A form post: a session (401), then its CSRF token (403), then the action."""
    ctx: UiContext | None = None

    async def checked() -> Response:
        nonlocal ctx
        ctx = await _context(request)
        form = await _form(request)
        if not csrf_ok(ctx.csrf, form.get(CSRF_FIELD)):
            raise Forbidden("csrf_token: missing or wrong; reload the page and try again")
        return await run(ctx, form)

    return await _guarded(request, lambda: ctx, checked)


async def _page(request: Request, build: Callable[[UiContext, Session], HTMLResponse]) -> Response:
    """A page: the session (401 shows the sign-in form), then `build` in one transaction."""
    ctx: UiContext | None = None

    async def run() -> Response:
        nonlocal ctx
        ctx = await _context(request)
        current = ctx
        return await _state(request).db(lambda s: build(current, s))

    return await _guarded(request, lambda: ctx, run)


# ---- sign-in ---------------------------------------------------------------------------------


_NOT_BACK = ("/ui/login", "/ui/logout", "/ui/oidc/")


def _login_page(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
    state = _state(request)
    nonce = new_secret()
    # After signing in, back to the page that asked for it (a dashboard page only).
    here = request.url.path if request.method == "GET" else ""
    back = here if here.startswith("/ui/") and not here.startswith(_NOT_BACK) else "/ui/mine"
    response = _render(
        request,
        "login.html",
        status,
        login_csrf=nonce,
        message=message,
        sso=oidc.enabled(state.settings),
        back=back,
    )
    set_cookie(response, state.settings, LOGIN_COOKIE, nonce, 3600)
    return response


@router.get("/login")
async def login_form(request: Request) -> Response:
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    """Exchange an API token for a session. The sign-in form carries a double-submit CSRF token
    (there is no session yet to hold one)."""
    form = await _form(request)
    state = _state(request)
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), form.get(CSRF_FIELD)):
        return _render(
            request, "error.html", 403, status=403, message="csrf_token: missing or wrong"
        )
    token = form.get("token", "")

    def start(s: Session) -> tuple[str, Principal]:
        value, who = start_with_token(s, state.settings, token)
        if who.has(Role.AGENT):
            raise Unauthenticated("an agent token acts as its agent and cannot sign in here")
        return value, who

    try:
        value, _ = await state.db(start)
    except Unauthenticated as err:
        return _login_page(request, str(err), 401)
    return _signed_in(state, value, _next(form, "/ui/mine"))


def _signed_in(state: AppState, value: str, target: str = "/ui/mine") -> Response:
    response = RedirectResponse(target, status_code=303, headers=_HEADERS)
    set_cookie(response, state.settings, COOKIE, value, state.settings.ui_session_ttl_seconds)
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.get("/oidc/start")
async def oidc_start(request: Request) -> Response:
    state = _state(request)
    if not oidc.enabled(state.settings):
        return _login_page(request, "OIDC sign-in is not configured (NHI_OIDC_*)", 404)
    url, flow = oidc.begin(state.settings, str(request.url_for("oidc_callback")))
    response = RedirectResponse(url, status_code=303, headers=_HEADERS)
    set_cookie(response, state.settings, oidc.COOKIE, flow.cookie(), oidc.FLOW_SECONDS)
    return response


@router.get("/oidc/callback", name="oidc_callback")
async def oidc_callback(request: Request, code: str = "", state: str = "") -> Response:
    app_state = _state(request)
    if not oidc.enabled(app_state.settings):
        return _login_page(request, "OIDC sign-in is not configured (NHI_OIDC_*)", 404)
    verifier = getattr(request.app.state, "ui_oidc", None)
    if verifier is None:
        verifier = request.app.state.ui_oidc = oidc.make_verifier(app_state.settings)
    try:
        flow = oidc.Flow.from_cookie(request.cookies.get(oidc.COOKIE))
        principal = await oidc.finish(
            app_state.settings,
            verifier,
            flow,
            state,
            code,
            str(request.url_for("oidc_callback")),
        )
    except Unauthenticated as err:
        return _login_page(request, str(err), 401)
    value = await app_state.db(lambda s: start_with_principal(s, app_state.settings, principal))
    response = _signed_in(app_state, value)
    response.delete_cookie(oidc.COOKIE, path="/ui")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    async def run(ctx: UiContext, _: dict[str, str]) -> Response:
        await _state(request).db(lambda s: end(s, ctx))
        response = RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    return await _action(request, run)


# ---- pages -----------------------------------------------------------------------------------


@router.get("/")
async def home() -> Response:
    return RedirectResponse("/ui/mine", status_code=303)


@router.get("/mine")
async def mine(request: Request) -> Response:
    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        groups = views.mine(s, ctx.principal)
        acts = {n.id: views.actions_for(ctx.principal, n) for _, ns in groups for n in ns}
        return _render(request, "mine.html", ctx=ctx, groups=groups, acts=acts, page="mine")

    return await _page(request, build)


@router.get("/expiring")
async def expiring(request: Request) -> Response:
    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        days, reminders = views.expiring(s, ctx.principal, datetime.now(UTC))
        return _render(
            request, "expiring.html", ctx=ctx, days=days, reminders=reminders, page="expiring"
        )

    return await _page(request, build)


@router.get("/agents/{agent_id}")
async def agent(request: Request, agent_id: uuid.UUID) -> Response:
    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        data = views.agent_page(s, ctx.principal, agent_id)
        acts = {n.id: views.actions_for(ctx.principal, n) for n in data.nhis}
        return _render(request, "agent.html", ctx=ctx, a=data, acts=acts, page="security")

    return await _page(request, build)


@router.get("/approvals")
async def approvals(request: Request) -> Response:
    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        pending = views.approvals(s, ctx.principal)
        return _render(request, "approvals.html", ctx=ctx, pending=pending, page="approvals")

    return await _page(request, build)


@router.get("/security")
async def security(request: Request) -> Response:
    q = request.query_params
    filters = views.Filters(**{k: q.get(k, "") for k in views.Filters.__dataclass_fields__})

    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        data = views.security(s, ctx.principal, filters, datetime.now(UTC))
        return _render(request, "security.html", ctx=ctx, d=data, page="security")

    return await _page(request, build)


@router.get("/admin")
async def admin(request: Request) -> Response:
    settings = _state(request).settings

    def build(ctx: UiContext, s: Session) -> HTMLResponse:
        data = views.admin(s, settings, ctx.principal)
        return _render(request, "admin.html", ctx=ctx, d=data, page="admin")

    return await _page(request, build)


# ---- actions ---------------------------------------------------------------------------------


def _answer(result: Any, target: str, what: str) -> Response:
    # A lifecycle still carrying the action out answers 202 in the API: said so here too.
    if isinstance(result, JSONResponse) and result.status_code == 202:
        return _done(target, "accepted")
    return _done(target, what)


@router.post("/nhis/{nhi_id}/{action}")
async def nhi_action(request: Request, nhi_id: uuid.UUID, action: str) -> Response:
    """Renew, rotate, decommission or restore (the API routes' functions), or approve and
    deny (the API's decision path)."""

    async def run(ctx: UiContext, form: dict[str, str]) -> Response:
        state, p = _state(request), ctx.principal
        reason = form.get("reason", "")
        result: Any
        if action == "renew":
            extend = form.get("extend_by", "").strip() or None
            body = lifecycle.RenewBody.model_validate({"reason": reason, "extend_by": extend})
            result = await lifecycle.renew(nhi_id, body, state, p)
        elif action in ("rotate", "decommission", "restore"):
            call = getattr(lifecycle, action)
            result = await call(nhi_id, lifecycle.ActionBody(reason=reason), state, p)
        elif action in ("approve", "deny"):
            decision = nhi_routes.DecisionBody.model_validate({"reason": reason})
            decide = nhi_routes.approve if action == "approve" else nhi_routes.deny
            result = await decide(nhi_id, decision, state, p)
        else:
            raise NotFound(f"action {action} not found")
        return _answer(result, _next(form, "/ui/mine"), action)

    return await _action(request, run)


@router.post("/agents/{agent_id}/{action}")
async def agent_action(request: Request, agent_id: uuid.UUID, action: str) -> Response:
    """Contain or release an agent: the incident routes' functions (issue 17)."""

    async def run(ctx: UiContext, form: dict[str, str]) -> Response:
        state, p = _state(request), ctx.principal
        reason = {"reason": form.get("reason", "")}
        if action == "contain":
            await incident_routes.contain(agent_id, ContainBody.model_validate(reason), state, p)
        elif action == "release":
            await incident_routes.release(agent_id, ReleaseBody.model_validate(reason), state, p)
        else:
            raise NotFound(f"action {action} not found")
        return _done(_next(form, f"/ui/agents/{agent_id}"), action)

    return await _action(request, run)


@router.post("/admin/policies/preview")
async def policy_preview(request: Request) -> Response:
    """Validate an edited policy exactly as `PUT /v1/policies` would, and show the diff
    against the policy in force; nothing is saved here."""

    async def run(ctx: UiContext, form: dict[str, str]) -> Response:
        text = form.get("policy", "")
        proposed = _parse_policy(text)
        entry = proposed.policies[0]
        current = await _state(request).db(
            lambda s: views.current_policy_yaml(
                s, entry.platform.value, entry.kind.value, entry.environment.value
            )
        )
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.replace("\r\n", "\n").splitlines(keepends=True),
                "in force",
                "proposed",
            )
        )
        return _render(request, "policy_preview.html", ctx=ctx, text=text, diff=diff, page="admin")

    return await _action(request, run)


def _parse_policy(text: str) -> PolicyApply:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RuleViolation("policy", f"not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise RuleViolation("policy", "must be one policy (a YAML mapping)")
    return PolicyApply.model_validate({"policies": [doc]})


@router.post("/admin/policies/apply")
async def policy_apply(request: Request) -> Response:
    async def run(ctx: UiContext, form: dict[str, str]) -> Response:
        body = _parse_policy(form.get("policy", ""))
        await _state(request).db(lambda s: policy_routes.apply_policies(body, s, ctx.principal))
        return _done("/ui/admin", "policy")

    return await _action(request, run)


@router.post("/admin/tokens/{name}/revoke")
async def token_revoke(request: Request, name: str) -> Response:
    async def run(ctx: UiContext, _: dict[str, str]) -> Response:
        await _state(request).db(lambda s: token_routes.revoke(name, s, ctx.principal))
        return _done("/ui/admin", "revoke")

    return await _action(request, run)
