"""TokenVerifier: key sources, claims, the verified-token cache, where the token is read."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from plangate.config._models import JwtConfig
from plangate.errors import AuthenticationError, KeysUnavailableError
from plangate.identity import TokenSource, TokenVerifier
from tests.identity.keys import pem_pair
from tests.support import SECRET


def settings(**changes) -> JwtConfig:
    values = {
        "algorithms": ["HS256"],
        "secret": SECRET,
        "customer_claim": "org_id",
        "plan_claim": "plan",
    }
    values.update(changes)
    return JwtConfig.model_validate(values)


def claims(**changes):
    body = {"org_id": "acme", "plan": "pro", "exp": int(time.time()) + 600}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("kind", "algorithm"),
    [("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256"), ("ed25519", "EdDSA")],
)
def test_public_key_algorithms(kind, algorithm):
    private, public = pem_pair(kind)
    verifier = TokenVerifier(
        settings(algorithms=[algorithm], secret=None, public_key=public.decode())
    )
    identity = verifier.verify(jwt.encode(claims(), private, algorithm=algorithm))
    assert (identity.customer, identity.plan) == ("acme", "pro")


def test_public_key_from_file(tmp_path):
    private, public = pem_pair("rsa")
    (tmp_path / "key.pem").write_bytes(public)
    verifier = TokenVerifier(
        settings(algorithms=["RS256"], secret=None, public_key=f"file:{tmp_path / 'key.pem'}")
    )
    assert verifier.verify(jwt.encode(claims(), private, algorithm="RS256")).customer == "acme"


@contextlib.contextmanager
def jwks_server(document: dict):
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


def test_jwks_url_selects_the_key_by_kid():
    private, public = pem_pair("rsa")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(public)))
    jwk.update(kid="key-1", use="sig", alg="RS256")
    with jwks_server({"keys": [jwk]}) as url:
        verifier = TokenVerifier(settings(algorithms=["RS256"], secret=None, jwks_url=url))
        good = jwt.encode(claims(), private, algorithm="RS256", headers={"kid": "key-1"})
        assert verifier.verify(good).customer == "acme"
        unknown_kid = jwt.encode(
            claims(org_id="other"), private, algorithm="RS256", headers={"kid": "key-2"}
        )
        with pytest.raises(AuthenticationError):
            verifier.verify(unknown_kid)


def test_dotted_customer_claim_walks_nested_objects_and_accepts_numbers():
    verifier = TokenVerifier(settings(customer_claim="org.id"))
    assert verifier.verify(jwt.encode(claims(org={"id": 42}), SECRET)).customer == "42"


@pytest.mark.parametrize("customer", ["", " ", "\t\n", "\u3000", "\u00a0 \u2003"])
def test_a_customer_claim_of_only_whitespace_is_no_customer(customer):
    verifier = TokenVerifier(settings())
    with pytest.raises(AuthenticationError, match="no usable 'org_id' claim") as refused:
        verifier.verify(jwt.encode(claims(org_id=customer), SECRET))
    assert refused.value.token_given


def test_a_customer_claim_with_inner_spaces_is_a_customer():
    verifier = TokenVerifier(settings())
    assert verifier.verify(jwt.encode(claims(org_id="Acme Inc"), SECRET)).customer == "Acme Inc"


def test_plan_claim_that_is_not_text_is_ignored():
    verifier = TokenVerifier(settings())
    assert verifier.verify(jwt.encode(claims(plan=["pro"]), SECRET)).plan is None


def test_leeway_accepts_a_token_expired_within_it():
    verifier = TokenVerifier(settings(leeway=30))
    assert verifier.verify(jwt.encode(claims(exp=int(time.time()) - 10), SECRET)).customer == "acme"


def test_repeated_token_skips_the_signature_check(monkeypatch):
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    verifier = TokenVerifier(settings())
    token = jwt.encode(claims(), SECRET)
    for _ in range(5):
        assert verifier.verify(token).customer == "acme"
    assert len(calls) == 1


def test_cached_token_is_verified_again_once_its_exp_has_passed(monkeypatch):
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    exp = int(time.time()) + 100
    now = [time.time()]
    verifier = TokenVerifier(settings(), clock=lambda: now[0])
    token = jwt.encode(claims(exp=exp), SECRET)
    verifier.verify(token)
    now[0] = exp - 1
    verifier.verify(token)
    assert len(calls) == 1  # still cached
    now[0] = exp + 1
    verifier.verify(token)  # PyJWT's own clock still accepts it; the cache did not
    assert len(calls) == 2


def test_cache_is_bounded():
    verifier = TokenVerifier(settings(), cache_size=2)
    tokens = [jwt.encode(claims(org_id=f"c{i}"), SECRET) for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert list(verifier._cache) == tokens[1:]


def test_threads_sharing_a_full_cache_get_identities_not_errors():
    # Threaded WSGI servers share one verifier; evicting from a full cache races.
    verifier = TokenVerifier(settings(), cache_size=4)
    tokens = [jwt.encode(claims(org_id=f"c{i}"), SECRET) for i in range(300)]
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work() -> None:
        for token in tokens:
            try:
                verifier.verify(token)
            except BaseException as exc:  # anything here would be a 500
                errors.append(exc)

    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(verifier._cache) <= 4


def test_jwks_outage_is_keys_unavailable_not_a_bad_token():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    verifier = TokenVerifier(settings(algorithms=["RS256"], secret=None, jwks_url=url))
    private, _ = pem_pair("rsa")
    token = jwt.encode(claims(), private, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(KeysUnavailableError):
        verifier.verify(token)


def test_oversized_token_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("decoded an oversized token"))
    verifier = TokenVerifier(settings(max_token_bytes=100))
    with pytest.raises(AuthenticationError, match="too large"):
        verifier.verify("x" * 101)


def test_missing_token_says_no_token_was_given():
    with pytest.raises(AuthenticationError) as info:
        TokenVerifier(settings()).verify(None)
    assert info.value.token_given is False


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("header:Authorization", "Bearer abc", "abc"),
        ("header:Authorization", "Basic abc", None),
        ("header:X-Api-Token", "abc", "abc"),
        ("header:X-Api-Token", "Bearer abc", "abc"),
        ("cookie:session", "theme=dark; session=abc", "abc"),
        ("cookie:session", "theme=dark", None),
        ("header:Authorization", None, None),
    ],
)
def test_token_source(spec, value, expected):
    source = TokenSource(spec)
    assert source.extract(value) == expected
