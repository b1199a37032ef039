"""``mode: shadow`` on one limit: everything else is enforced as usual; that limit is counted,
never refuses, is not shown to the client, and what it would have refused is logged (and in
the decision log)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from plangate import Gate, MemoryStorage
from plangate.config import load_config
from plangate.errors import ConfigError
from plangate.storage import Storage
from tests.support import Clock, config, token

START = 1_800_000_000.0


def trial(**log: object) -> dict[str, object]:
    """free: 5 calls a minute (enforced) and a new 3 a minute on trial... and 2 a day."""
    settings = config(**log)
    settings["plans"]["free"]["features"]["api_calls"] = [
        {"limit": 5, "window": "1m"},
        {"limit": 3, "window": "1h", "mode": "shadow"},
        {"limit": 100, "period": "day"},
    ]
    return settings


def test_a_shadow_limit_refuses_nothing_and_the_others_still_do(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate(trial(), storage=storage, clock=Clock(START))
    with caplog.at_level(logging.INFO, logger="plangate.shadow"):
        decisions = [gate.check("GET", "/v1/projects", token("acme", "free")) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]  # 5 a minute holds
    assert decisions[5].problem is not None
    assert decisions[5].problem.members["violated-policies"] == ["api_calls-1m"]
    assert [d.shadow_refused for d in decisions[:5]] == [()] * 3 + [("api_calls-1h",)] * 2
    shadow = [r.getMessage() for r in caplog.records if r.name == "plangate.shadow"]
    assert shadow == ["shadow limit api_calls-1h would have refused acme (plan free)"] * 2
    # the client sees the enforced limits only
    headers = dict(decisions[0].headers)
    assert "api_calls-1h" not in headers["ratelimit-policy"]
    assert '"api_calls-1m"' in headers["ratelimit-policy"]


def test_the_entitlements_endpoint_does_not_show_a_limit_on_trial() -> None:
    gate = Gate(trial(), storage=MemoryStorage(), clock=Clock(START))
    answer = gate.entitlements(token("acme", "free"))
    assert isinstance(answer, dict)
    policies = [entry["policy"] for entry in answer["meters"]["api_calls"]["limits"]]
    assert policies == ["api_calls-1m", "api_calls-day"]


def test_the_decision_log_has_what_it_would_have_refused(tmp_path: Path) -> None:
    target = tmp_path / "decisions.jsonl"
    gate = Gate(
        trial(decision_log={"to": str(target)}), storage=MemoryStorage(), clock=Clock(START)
    )
    for _ in range(4):
        assert gate.check("GET", "/v1/projects", token("acme", "free")).allowed
    (line,) = [json.loads(text) for text in target.read_text().splitlines()]
    assert (line["decision"], line["shadow_policy"]) == ("allow", ["api_calls-1h"])
    assert line["remaining"]["api_calls-1h"] == 0


def test_a_shadow_limit_cannot_charge_overage() -> None:
    settings = config()
    settings["features"]["ai_credits"] = {"kind": "credits"}
    settings["plans"]["free"]["features"]["api_calls"] = {
        "limit": 5, "window": "1m", "mode": "shadow", "overage": "ai_credits", "rate": 1,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="a shadow limit refuses nothing"):
        load_config(settings)


def test_remaining_does_not_count_a_limit_on_trial() -> None:
    gate = Gate(trial(), storage=MemoryStorage(), clock=Clock(START))
    decisions = [gate.check("GET", "/v1/projects", token("acme", "free")) for _ in range(4)]
    assert decisions[3].shadow_refused == ("api_calls-1h",)
    assert decisions[3].remaining("api_calls") == 1  # 5 a minute, 4 used; not the trial's 0
