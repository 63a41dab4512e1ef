"""Dashboard sign-in with the company's OIDC provider: authorization code with PKCE (S256).

The browser is sent to the provider with a fresh `state`, `nonce` and code challenge; the
verifier and both values wait in a short-lived HttpOnly cookie. On the way back the state must
match, the code is exchanged (with the verifier) at the token endpoint, and the ID token is
checked like the API checks a JWT (signature from the issuer's JWKS, expiry, issuer), with the
client id as audience and the nonce we sent. Roles, teams and email come from the same claims.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
import jwt

from nhi.infra.config import Settings
from nhi.services.auth import OidcVerifier, Principal, Unauthenticated

COOKIE = "nhi_ui_oidc"
FLOW_SECONDS = 600
TOKEN_TIMEOUT = 10.0


def enabled(settings: Settings) -> bool:
    """Whether the dashboard offers OIDC sign-in: issuer, keys, client and both endpoints."""
    return bool(
        settings.oidc_issuer
        and (settings.oidc_jwks or settings.oidc_jwks_url)
        and settings.oidc_client_id
        and settings.oidc_authorization_endpoint
        and settings.oidc_token_endpoint
    )


@dataclass(frozen=True)
class Flow:
    """One sign-in in flight: what the callback must see again."""

    state: str
    nonce: str
    verifier: str

    def cookie(self) -> str:
        return f"{self.state}.{self.nonce}.{self.verifier}"

    @classmethod
    def from_cookie(cls, value: str | None) -> Flow:
        parts = (value or "").split(".")
        if len(parts) != 3 or not all(parts):
            raise Unauthenticated("the sign-in expired or was started elsewhere; start again")
        return cls(*parts)


def challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def begin(settings: Settings, redirect_uri: str) -> tuple[str, Flow]:
    """The provider URL to send the browser to, and the flow to remember."""
    flow = Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48))
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.oidc_client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid email profile",
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": challenge(flow.verifier),
            "code_challenge_method": "S256",
        }
    )
    assert settings.oidc_authorization_endpoint
    sep = "&" if "?" in settings.oidc_authorization_endpoint else "?"
    return f"{settings.oidc_authorization_endpoint}{sep}{query}", flow


async def finish(
    settings: Settings, verifier: OidcVerifier, flow: Flow, state: str, code: str, redirect_uri: str
) -> Principal:
    """Check the state, redeem the code with the PKCE verifier, and verify the ID token."""
    if not hmac.compare_digest(flow.state, state):
        raise Unauthenticated("state: does not match this browser's sign-in")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": settings.oidc_client_id or "",
        "code_verifier": flow.verifier,
    }
    if settings.oidc_client_secret is not None:
        form["client_secret"] = settings.oidc_client_secret.get_secret_value()
    assert settings.oidc_token_endpoint
    try:
        async with httpx.AsyncClient(timeout=TOKEN_TIMEOUT) as http:
            answer = await http.post(settings.oidc_token_endpoint, data=form)
    except httpx.HTTPError as err:
        raise Unauthenticated(f"the identity provider could not be reached: {err}") from None
    if answer.status_code != 200:
        raise Unauthenticated(f"the identity provider refused the code ({answer.status_code})")
    id_token = answer.json().get("id_token")
    if not isinstance(id_token, str):
        raise Unauthenticated("the identity provider sent no ID token")
    principal = verifier.principal(id_token)  # signature, expiry, issuer, audience
    claims = jwt.decode(id_token, options={"verify_signature": False})
    if not hmac.compare_digest(str(claims.get("nonce", "")), flow.nonce):
        raise Unauthenticated("nonce: the ID token was not issued for this sign-in")
    return principal


def make_verifier(settings: Settings) -> OidcVerifier:
    """The API's JWT checks with the dashboard's client id as the audience (an ID token's)."""
    return OidcVerifier(settings.model_copy(update={"oidc_audience": settings.oidc_client_id}))
