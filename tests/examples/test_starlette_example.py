from __future__ import annotations

from pathlib import Path

import httpx

from plangate.cli import mint_token
from plangate.config import load_config
from tests.support import load_module, serve_asgi

EXAMPLE = Path(__file__).parents[2] / "examples" / "starlette"


def load_example_app():
    return load_module(EXAMPLE / "app.py", "starlette_example").app


def test_starlette_example_runs_as_its_readme_says(monkeypatch):
    monkeypatch.delenv("PLANGATE_JWT_SECRET", raising=False)
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    config = load_config(EXAMPLE / "plangate.yaml")
    free = {"authorization": f"Bearer {mint_token(config, 'acme', 'free')}"}
    pro = {"authorization": f"Bearer {mint_token(config, 'acme', 'pro')}"}
    with serve_asgi(load_example_app()) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/reports/1/export", headers=free).status_code == 402
        assert client.post("/reports/1/export", headers=pro).status_code == 200
        summary = client.post("/summarize", headers=free, content="a long text to summarize")
        assert summary.status_code == 200
        assert "x-usage-tokens" not in summary.headers
        usage = client.get("/.plangate/entitlements", headers=free).json()
        assert usage["meters"]["ai_tokens"]["limits"][0]["used"] == 5
        assert client.get("/projects", headers=free).json()["max_projects"] == 3
