"""Every way a token can be wrong is a 401 problem: never a 500, never allowed (SPEC §3.2)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
import warnings

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from plangate import asgi, wsgi
from plangate.engine import PROBLEM_BASE
from tests.identity.keys import pem_pair
from tests.middleware.apps import asgi_app, wsgi_app
from tests.support import AUDIENCE, ISSUER, SECRET, config, serve_asgi, serve_wsgi, token

RSA_PRIVATE, RSA_PUBLIC = pem_pair("rsa")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes):
    now = int(time.time())
    claims = {"org_id": "acme", "plan": "pro", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def hand_signed(header: dict, claims: dict, key: bytes) -> str:
    """A token signed with HMAC-SHA256 by hand, with any header (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned(claims: dict) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


HS_ATTACKS = {
    "alg-none": lambda: unsigned(_claims()),
    "alg-none-with-signature": lambda: unsigned(_claims()) + "c2lnbmF0dXJl",
    "forged-signature": lambda: token("acme", "pro", secret="another-secret-that-is-long-enough!!"),
    "tampered-payload": lambda: _tamper(token("acme", "free")),
    "algorithm-not-listed": lambda: _hs512(_claims()),
    "expired": lambda: token("acme", ttl=-120),
    "not-yet-valid": lambda: jwt.encode(
        _claims(nbf=int(time.time()) + 3600), SECRET, algorithm="HS256"
    ),
    "wrong-audience": lambda: jwt.encode(_claims(aud="other-api"), SECRET, algorithm="HS256"),
    "wrong-issuer": lambda: jwt.encode(
        _claims(iss="https://evil.test/"), SECRET, algorithm="HS256"
    ),
    "no-exp": lambda: jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"),
    "missing-customer-claim": lambda: token(None, "pro"),
    "customer-claim-not-text": lambda: jwt.encode(
        _claims(org_id={"id": 1}), SECRET, algorithm="HS256"
    ),
    "empty-customer-claim": lambda: jwt.encode(_claims(org_id=""), SECRET, algorithm="HS256"),
    "blank-customer-claim": lambda: jwt.encode(_claims(org_id=" "), SECRET, algorithm="HS256"),
    "whitespace-customer-claim": lambda: jwt.encode(
        _claims(org_id="\t \u3000\n"), SECRET, algorithm="HS256"
    ),
    "garbage": lambda: "not-a-token",
    "three-garbage-parts": lambda: "a.b.c",
    "bad-base64": lambda: "eyJ!!!.eyJ!!!.sig",
    "json-array-payload": lambda: hand_signed({"alg": "HS256"}, [1, 2], SECRET.encode()),  # type: ignore[arg-type]
    "token-over-8kb": lambda: token("acme", "pro", padding="x" * 9_000),
    "jku-header": lambda: jwt.encode(
        _claims(),
        "attacker-secret-long-enough-for-hs256",
        algorithm="HS256",
        headers={"jku": "http://127.0.0.1:1/jwks"},
    ),
}

ATTACKER_PRIVATE, ATTACKER_PUBLIC = pem_pair("rsa")
ATTACKER_JWK = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(ATTACKER_PUBLIC)))


def _attacker(**headers) -> str:
    """Signed with the attacker's own key, with headers that point at that key."""
    return jwt.encode(_claims(), ATTACKER_PRIVATE, algorithm="RS256", headers=headers)


RS_ATTACKS = {
    # Headers that name where to find the key: plangate never follows them.
    "embedded-jwk-header": lambda: _attacker(jwk=ATTACKER_JWK),
    "jku-header": lambda: _attacker(jku="http://127.0.0.1:1/attacker-jwks.json"),
    "x5u-header": lambda: _attacker(x5u="http://127.0.0.1:1/attacker.pem"),
    "unknown-kid": lambda: _attacker(kid="attacker-key"),
    "kid-path-traversal": lambda: _attacker(kid="../../../../dev/null"),
    # The RS256 public key, which is public, used as an HMAC secret.
    "rs256-key-as-hs256-secret": lambda: hand_signed(
        {"alg": "HS256", "typ": "JWT"}, _claims(), RSA_PUBLIC
    ),
    "alg-none": lambda: unsigned(_claims()),
    "signed-by-another-key": lambda: jwt.encode(_claims(), pem_pair("rsa")[0], algorithm="RS256"),
}


def _hs512(claims: dict) -> str:
    with warnings.catch_warnings():  # the short key is the point: it must never be checked
        warnings.simplefilter("ignore")
        return jwt.encode(claims, SECRET, algorithm="HS512")


def _tamper(text: str) -> str:
    head, payload, sig = text.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["plan"] = "enterprise"
    return f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"


RS_CONFIG = config(
    identity={
        "jwt": {
            "algorithms": ["RS256"],
            "public_key": RSA_PUBLIC.decode(),
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "customer_claim": "org_id",
            "plan_claim": "plan",
        }
    }
)


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def clients(request):
    with contextlib.ExitStack() as stack:
        result = {}
        for name, cfg in (("hs", config()), ("rs", RS_CONFIG)):
            if request.param == "asgi":
                url = stack.enter_context(serve_asgi(asgi.PlanGateMiddleware(asgi_app(), cfg)))
            else:
                url = stack.enter_context(serve_wsgi(wsgi.PlanGateMiddleware(wsgi_app, cfg)))
            result[name] = stack.enter_context(httpx.Client(base_url=url, timeout=10))
        yield result


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"
    assert response.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'


@pytest.mark.parametrize("attack", list(HS_ATTACKS))
def test_hs256_attack_is_401(clients, attack):
    headers = {"authorization": f"Bearer {HS_ATTACKS[attack]()}"}
    assert_invalid_token(clients["hs"].post("/v1/reports/1/export", headers=headers))


@pytest.mark.parametrize("attack", list(RS_ATTACKS))
def test_rs256_attack_is_401(clients, attack):
    headers = {"authorization": f"Bearer {RS_ATTACKS[attack]()}"}
    assert_invalid_token(clients["rs"].post("/v1/reports/1/export", headers=headers))


def test_rs256_valid_token_is_allowed(clients):
    good = jwt.encode(_claims(), RSA_PRIVATE, algorithm="RS256")
    response = clients["rs"].post(
        "/v1/reports/1/export", headers={"authorization": f"Bearer {good}"}
    )
    assert response.status_code == 200


def test_expired_within_leeway_is_allowed(clients):
    cfg_leeway = RS_CONFIG["identity"]["jwt"].get("leeway")
    assert cfg_leeway is None  # the default leeway is 0: the "expired" attack above holds
    assert (
        clients["hs"]
        .get("/v1/projects", headers={"authorization": f"Bearer {token(ttl=600)}"})
        .status_code
        == 200
    )


@pytest.mark.parametrize(
    "value",
    ["Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Bearer", "bearer", "Token abc"],
)
def test_authorization_without_bearer_token_is_401_with_a_bare_challenge(clients, value):
    response = clients["hs"].get("/v1/projects", headers={"authorization": value})
    assert response.status_code == 401
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'  # no invalid_token


def test_bearer_scheme_is_case_insensitive(clients):
    response = clients["hs"].get("/v1/projects", headers={"authorization": f"bearer {token()}"})
    assert response.status_code == 200


def test_100kb_token_is_401_in_process_asgi():
    """Servers refuse a 100 KB header line themselves; the middleware must refuse it too."""
    import asyncio

    app = asgi.PlanGateMiddleware(asgi_app(), config())
    headers = {"authorization": f"Bearer {token(padding='x' * 100_000)}"}

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/projects", headers=headers)

    assert_invalid_token(asyncio.run(call()))


def test_100kb_token_is_401_in_process_wsgi():
    app = wsgi.PlanGateMiddleware(wsgi_app, config())
    headers = {"authorization": f"Bearer {token(padding='x' * 100_000)}"}
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        assert_invalid_token(client.get("/v1/projects", headers=headers))
