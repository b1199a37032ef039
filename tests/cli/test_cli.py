"""The ``plangate`` command: token, explain, demo (check is covered with the config tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from plangate.cli import DEMO_CONFIG, main
from tests.support import AUDIENCE, BASE_CONFIG, ISSUER, SECRET, token


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump(BASE_CONFIG))
    return path


def test_token_is_signed_with_the_config_secret(config_file, capsys):
    assert (
        main(
            [
                "token",
                "--customer",
                "acme",
                "--plan",
                "pro",
                "--config",
                str(config_file),
                "--ttl",
                "15m",
            ]
        )
        == 0
    )
    minted = capsys.readouterr().out.strip()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["org_id"] == "acme"
    assert claims["plan"] == "pro"
    assert claims["exp"] - claims["iat"] == 900


@pytest.mark.parametrize(
    ("ttl", "message"),
    [("1x", "invalid duration '1x'"), ("500ms", "a token lives at least 1s")],
)
def test_token_with_a_bad_ttl_says_why(ttl, message, capsys):
    assert main(["token", "--customer", "acme", "--ttl", ttl]) == 2
    assert message in capsys.readouterr().err


def test_token_defaults_to_the_demo_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLANGATE_JWT_SECRET", raising=False)
    assert main(["token", "--customer", "acme"]) == 0
    minted = capsys.readouterr().out.strip()
    secret = (
        yaml.safe_load(DEMO_CONFIG.read_text())["identity"]["jwt"]["secret"]
        .split(":-")[1]
        .rstrip("}")
    )
    claims = jwt.decode(minted, secret, algorithms=["HS256"], audience="example-api")
    assert claims["org_id"] == "acme"


def test_token_refuses_a_config_without_secret(tmp_path, capsys):
    cfg = {
        **BASE_CONFIG,
        "identity": {
            "jwt": {
                "algorithms": ["RS256"],
                "jwks_url": "http://127.0.0.1:9/jwks",
                "customer_claim": "sub",
            }
        },
    }
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["token", "--customer", "acme", "--config", str(path)]) == 2
    assert "no secret to sign with" in capsys.readouterr().err


def test_explain_shows_each_reason_and_consumes_nothing(config_file, capsys):
    tok = token("acme", "free")
    for _ in range(7):  # free allows 5 per minute; explain must not count
        assert (
            main(["explain", "--config", str(config_file), "--token", tok, "GET /v1/projects"]) == 0
        )
    out = capsys.readouterr().out.splitlines()
    assert out[-6:] == [
        "GET /v1/projects",
        "  - route rule 5: /v1/{rest:path}",
        "  - customer 'acme'",
        "  - plan free (from the token's plan claim)",
        "  - meters: api_calls-1m 4/5 left",
        "decision: ALLOW",
    ]


def test_explain_a_denial(config_file, capsys):
    main(
        [
            "explain",
            "--config",
            str(config_file),
            "--token",
            token("acme", "free"),
            "POST /v1/reports/9/export",
        ]
    )
    out = capsys.readouterr().out
    assert "deny 402 feature-not-in-plan: the free plan does not include export_reports" in out
    assert out.rstrip().endswith("decision: DENY 402 feature-not-in-plan")


def test_explain_without_token(config_file, capsys):
    main(["explain", "--config", str(config_file), "GET /v1/projects"])
    assert capsys.readouterr().out.rstrip().endswith("decision: DENY 401 unauthenticated")


def test_explain_public_route(config_file, capsys):
    main(["explain", "--config", str(config_file), "GET /health"])
    out = capsys.readouterr().out
    assert "route rule 0: GET /health (public)" in out
    assert out.rstrip().endswith("decision: ALLOW")


def test_explain_needs_method_and_path(config_file, capsys):
    assert main(["explain", "--config", str(config_file), "projects"]) == 2


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_the_example_api_and_prints_working_tokens():
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("PLANGATE_JWT_SECRET", "PLANGATE_STORAGE")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "plangate.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        tokens, lines = {}, []
        for line in proc.stdout:  # blocks until the demo says it is up
            lines.append(line)
            if line.startswith("export TOKEN_"):
                name, _, value = line.strip().removeprefix("export TOKEN_").partition("=")
                tokens[name.lower()] = value
            if "Uvicorn running on" in line:
                break
        assert set(tokens) == {"free", "pro", "enterprise"}, lines
        assert any(f"curl -i http://127.0.0.1:{port}/health" in line for line in lines)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/health").status_code == 200
            free = {"authorization": f"Bearer {tokens['free']}"}
            pro = {"authorization": f"Bearer {tokens['pro']}"}
            assert client.post("/v1/reports/42/export", headers=free).status_code == 402
            assert client.post("/v1/reports/42/export", headers=pro).status_code == 200
            chat = client.post(
                "/v1/completions",
                headers={"authorization": f"Bearer {tokens['enterprise']}"},
                json={"prompt": "write a haiku"},
            )
            assert chat.status_code == 200
            assert "x-usage-tokens" not in chat.headers
            statuses = [client.get("/v1/projects", headers=pro).status_code for _ in range(6)]
            assert statuses[-1] == 429
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
