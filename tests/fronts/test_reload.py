"""A config reloaded on every front end: the next request is decided by the new limit and
sees it in its quota headers, the usage counted before is kept; a broken edit changes
nothing a client can see."""

from __future__ import annotations

from pathlib import Path

import yaml

from plangate import _reload
from tests.fronts.conftest import bearer, config
from tests.reload.support import BROKEN, Reloads, write


def _file(path: Path, limit: int) -> None:
    settings = config()
    settings["plans"]["free"]["features"]["api_calls"]["limit"] = limit
    write(path, yaml.safe_dump(settings))


def _watching(path: Path) -> list[Reloads]:
    """The reloads of every gate the front started on the file, once its watch is in place."""
    gates = [r._gate() for r in list(_reload._STARTED)]
    gates = [g for g in gates if g is not None and g.config_path == str(path)]
    assert gates, "the front started no gate on the file"
    for gate in gates:
        assert gate.reloading.wait_watching()
    return [Reloads(g) for g in gates]


def test_a_reloaded_limit_decides_the_next_request_and_keeps_the_usage(start, tmp_path):
    path = tmp_path / "plangate.yaml"
    _file(path, 3)
    client = start(str(path))
    statuses = [client.request("GET", "/v1/ok", bearer()).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]

    reloads = _watching(path)
    _file(path, 5)
    for seen in reloads:
        seen.wait(changed=True)
    first = client.request("GET", "/v1/ok", bearer())
    assert first.status == 200
    assert first.headers["ratelimit-policy"] == '"api_calls-1h";q=5;w=3600'
    # 3 counted before the reload, this one, one more: the fifth
    assert [client.request("GET", "/v1/ok", bearer()).status for _ in range(2)] == [200, 429]

    write(path, BROKEN)
    for seen in reloads:
        seen.wait(failed=True)
    kept = client.request("GET", "/v1/ok", bearer())
    assert kept.status == 429
    assert kept.headers["ratelimit-policy"] == '"api_calls-1h";q=5;w=3600'
