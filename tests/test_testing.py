"""plangate.testing: tokens for made-up customers in an app's own tests."""

from __future__ import annotations

import httpx
import pytest

from plangate import load_config, wsgi
from plangate.errors import ConfigError
from plangate.testing import bearer, token
from tests.middleware.apps import wsgi_app
from tests.support import config


def test_a_made_up_customer_gets_through_the_real_identity_check():
    cfg = load_config(config())
    app = wsgi.PlanGateMiddleware(wsgi_app, cfg)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        response = client.get("/v1/projects", headers=bearer(cfg, "acme", "pro"))
    assert response.json()["plan"] == "pro"
    assert response.json()["customer"] == "acme"


def test_a_token_for_a_config_without_a_secret_says_why():
    cfg = config(
        identity={
            "jwt": {
                "algorithms": ["RS256"],
                "jwks_url": "http://127.0.0.1:9/k",
                "customer_claim": "sub",
            }
        }
    )
    with pytest.raises(ValueError, match="no secret to sign with"):
        token(cfg, "acme")


def test_plangate_mode_must_be_enforce_or_shadow(monkeypatch):
    monkeypatch.setenv("PLANGATE_MODE", "off")
    with pytest.raises(ConfigError, match="PLANGATE_MODE: expected enforce or shadow, got 'off'"):
        load_config(config())
