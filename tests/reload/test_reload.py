"""Hot reload in one process: a checked config swapped in whole, a broken one refused, the
file watched, SIGHUP, the store's published config; the counters kept."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from plangate import AsyncGate, Gate, MemoryStorage
from plangate._reload import version_of
from plangate.asgi import PlanGateMiddleware
from plangate.cli import main
from plangate.integration import Pending, Requirement
from plangate.testing import token
from tests.reload.support import BROKEN, Reloads, config_text, limit_of, write


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "plangate.yaml"
    file.write_text(config_text(3))
    return file


def _jwt(customer: str = "acme") -> str:
    return token(_mapping(), customer)  # the secret stays the same in every config here


def _bearer(path: Path, customer: str = "acme") -> str:
    return f"Bearer {_jwt(customer)}"


def _calls(gate: Gate, path: Path, n: int, customer: str = "acme") -> list[int]:
    """The statuses of ``n`` metered calls."""
    statuses = []
    for _ in range(n):
        decision = gate.check("GET", "/v1/items", _jwt(customer))
        statuses.append(decision.problem.status if decision.problem else 200)
        gate.settle(decision, 200)
    return statuses


def test_a_raised_limit_applies_at_once_and_keeps_the_usage_counted(path: Path) -> None:
    gate = Gate(str(path))
    assert _calls(gate, path, 4) == [200, 200, 200, 429]
    write(path, config_text(5))
    outcome = gate.reload()
    assert outcome.changed
    assert outcome.version == version_of(path.read_bytes())
    # 3 were counted under the old limit: 2 more fit under the new one
    assert _calls(gate, path, 3) == [200, 200, 429]
    assert gate.config_status()["reloads"] == 1


def test_a_lowered_limit_refuses_at_once(path: Path) -> None:
    gate = Gate(str(path))
    assert _calls(gate, path, 2) == [200, 200]
    write(path, config_text(2))
    assert gate.reload().changed
    assert _calls(gate, path, 1) == [429]


def test_the_same_bytes_change_nothing(path: Path) -> None:
    gate = Gate(str(path))
    loaded = gate.loaded
    outcome = gate.reload()
    assert not outcome.changed
    assert outcome.error is None
    assert gate.loaded is loaded
    assert gate.reloads == 0


def test_a_broken_edit_keeps_the_old_config_and_says_why_as_check_does(
    path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = Gate(str(path))
    serving = gate.loaded
    write(path, BROKEN)
    with caplog.at_level(logging.ERROR, logger="plangate.reload"):
        outcome = gate.reload()
    assert not outcome.changed
    assert outcome.error is not None
    assert gate.loaded is serving  # the old config still decides
    assert _calls(gate, path, 4) == [200, 200, 200, 429]
    # the errors as `plangate check` prints them: file, line, key
    assert main(["check", str(path)]) == 1
    printed = capsys.readouterr().err.strip()
    assert printed
    assert printed in caplog.text
    assert outcome.error.message == printed
    lines = {issue["line"] for issue in outcome.error.issues}
    assert all(issue["file"] == str(path) for issue in outcome.error.issues)
    assert lines == {12}  # api_calls: {limit: -5, …}
    status = gate.config_status()
    assert status["version"] == serving.version
    assert status["reload_errors"] == 1
    assert status["last_error"]["message"] == printed
    # fixed: served, and the error is history
    write(path, config_text(4))
    assert gate.reload().changed
    assert gate.config_status()["last_error"] is None


def test_an_unreadable_file_is_an_error_not_a_crash(path: Path) -> None:
    gate = Gate(str(path))
    path.unlink()
    outcome = gate.reload()
    assert outcome.error is not None
    assert "cannot read" in outcome.error.message
    assert _calls(gate, path, 1) == [200]  # still deciding on the config it had


def test_a_gate_given_an_object_has_no_file_to_reload() -> None:
    gate = Gate(_mapping())
    outcome = gate.reload()
    assert outcome.error is not None
    assert "not read from a file" in outcome.error.message
    # but it takes a config given to it
    assert gate.reload(config_text(9).encode()).changed
    assert limit_of(gate) == 9


def _mapping() -> dict[str, object]:
    import yaml

    data = yaml.safe_load(config_text(3))
    assert isinstance(data, dict)
    return data


def test_a_changed_storage_waits_for_a_restart(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate(str(path))
    store = gate.storage
    write(path, config_text(3, storage="redis://127.0.0.1:1/0"))
    with caplog.at_level(logging.WARNING, logger="plangate.reload"):
        assert gate.reload().changed
    assert gate.storage is store
    assert "takes effect at the next restart" in caplog.text


def test_a_request_in_flight_finishes_on_the_config_it_started_with(path: Path) -> None:
    """The handler reloads mid-request: its quota headers and a requirement its view
    declares are still of the config the request began with; the next request gets the new."""
    requirement = Requirement(meters={"api_calls": 1})
    new = config_text(50).encode()

    async def view(request: Request) -> JSONResponse:
        app.gate.reload(new)  # the first request changes it; the second finds it done
        pending: Pending = request.scope["state"]["plangate.pending"]
        declared = await pending.arequire(requirement)
        return JSONResponse({"declared_left": declared.remaining("api_calls")})

    app = PlanGateMiddleware(Starlette(routes=[Route("/v1/items", view)]), str(path), views=True)
    with TestClient(app) as client:
        first = client.get("/v1/items", headers={"Authorization": _bearer(path)})
        assert first.status_code == 200
        assert ";q=3;" in first.headers["ratelimit-policy"]
        assert first.json() == {"declared_left": 1}  # the old limit of 3, twice used
        second = client.get("/v1/items", headers={"Authorization": _bearer(path)})
        assert ";q=50;" in second.headers["ratelimit-policy"]


def test_a_new_token_header_is_read_from_the_next_request(path: Path) -> None:
    app = PlanGateMiddleware(Starlette(routes=[Route("/v1/items", _ok)]), str(path))
    jwt = _jwt()
    with TestClient(app) as client:
        assert (
            client.get("/v1/items", headers={"Authorization": f"Bearer {jwt}"}).status_code == 200
        )
        write(
            path,
            config_text(3).replace(
                "    plan_claim: plan\n", "    plan_claim: plan\n  token_from: header:X-Api-Token\n"
            ),
        )
        assert app.gate.reload().changed
        assert (
            client.get("/v1/items", headers={"Authorization": f"Bearer {jwt}"}).status_code == 401
        )
        assert client.get("/v1/items", headers={"X-Api-Token": jwt}).status_code == 200


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({})


def test_the_decision_log_follows_the_config(tmp_path: Path, path: Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write(path, config_text(1, extra=f"decision_log: {{to: {first}}}\n"))
    gate = Gate(str(path))
    assert _calls(gate, path, 2) == [200, 429]
    write(path, config_text(1, extra=f"decision_log: {{to: {second}}}\n"))
    assert gate.reload().changed
    assert _calls(gate, path, 1) == [429]
    assert len(first.read_text().splitlines()) == 1
    assert len(second.read_text().splitlines()) == 1
    assert sum(1 for o in gate.observers if getattr(o, "__self__", None) is not None) == 1


# what tells a gate to reload -------------------------------------------------------------


def test_an_edit_of_the_watched_file_is_loaded(path: Path) -> None:
    gate = Gate(str(path))
    reloads = Reloads(gate)
    gate.start()
    try:
        assert gate.reloading.wait_watching()
        write(path, config_text(7))
        reloads.wait(changed=True)
        assert gate.loaded.version == version_of(path.read_bytes())
        write(path, BROKEN)
        reloads.wait(failed=True)
        assert gate.last_reload_error is not None
        assert limit_of(gate) == 7
    finally:
        gate.stop()


def test_a_configmap_symlink_swap_is_loaded(tmp_path: Path) -> None:
    """Kubernetes updates a mounted ConfigMap by pointing ``..data`` at a new directory."""
    mount = tmp_path / "config"
    mount.mkdir()
    (mount / "..v1").mkdir()
    (mount / "..v1" / "plangate.yaml").write_text(config_text(3))
    (mount / "..data").symlink_to("..v1")
    (mount / "plangate.yaml").symlink_to("..data/plangate.yaml")
    gate = Gate(str(mount / "plangate.yaml"))
    reloads = Reloads(gate)
    gate.start()
    try:
        assert gate.reloading.wait_watching()
        (mount / "..v2").mkdir()
        (mount / "..v2" / "plangate.yaml").write_text(config_text(8))
        (mount / "..data_tmp").symlink_to("..v2")
        os.replace(mount / "..data_tmp", mount / "..data")
        reloads.wait(changed=True)
        assert limit_of(gate) == 8
    finally:
        gate.stop()


def test_sighup_reloads_every_started_gate_of_the_process(path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(config_text(3))
    gates = [Gate(str(p)) for p in (path, other)]
    for gate, p in zip(gates, (path, other), strict=True):
        write(p, config_text(3, reload="{watch: false}"))
        gate.reload()
    reloads = [Reloads(g) for g in gates]
    for gate in gates:
        gate.start()
    try:
        write(path, config_text(11, reload="{watch: false}"))
        write(other, config_text(12, reload="{watch: false}"))
        os.kill(os.getpid(), signal.SIGHUP)
        for seen in reloads:
            seen.wait(changed=True)
        limits = [limit_of(g) for g in gates]
        assert limits == [11, 12]
    finally:
        for gate in gates:
            gate.stop()


def test_a_config_published_on_the_store_reaches_every_gate_on_it(tmp_path: Path) -> None:
    storage = MemoryStorage()
    files = []
    for name in ("a", "b"):
        file = tmp_path / f"{name}.yaml"
        file.write_text(config_text(3, reload="{store: true}"))
        files.append(file)
    gates = [Gate(str(files[0]), storage=storage), Gate(str(files[1]), storage=storage)]
    reloads = [Reloads(g) for g in gates]
    for gate in gates:
        gate.start()
    published = config_text(20, reload="{store: true}").encode()
    storage.publish_config(published, version_of(published))
    for seen in reloads:
        seen.wait(changed=True)
    assert {g.loaded.version for g in gates} == {version_of(published)}
    assert {g.loaded.origin for g in gates} == {"store"}
    # a gate that starts later starts on the published version, whatever its file says
    late = Gate(str(files[0]), storage=storage)
    Reloads(late)
    late_reloads = Reloads(late)
    late.start()
    late_reloads.wait(changed=True)
    assert late.loaded.version == version_of(published)


def test_plangate_reload_publishes_to_processes_on_a_real_redis(
    tmp_path: Path, redis_server: object, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    redis_server.client().flushall()  # type: ignore[attr-defined]  # nothing published yet
    file = tmp_path / "plangate.yaml"
    file.write_text(config_text(3, storage=url, reload="{store: true}"))
    gates: list[Gate | AsyncGate] = [Gate(str(file)), AsyncGate(str(file))]
    reloads = [Reloads(g) for g in gates]
    for gate in gates:
        gate.start()
        gate.storage.inner.changes.wait_subscribed()  # type: ignore[attr-defined]
    new = tmp_path / "new.yaml"
    new.write_text(config_text(30, storage=url, reload="{store: true}"))
    assert main(["reload", str(new)]) == 0
    assert version_of(new.read_bytes()) in capsys.readouterr().out
    for seen in reloads:
        seen.wait(version=version_of(new.read_bytes()))
    assert {g.loaded.version for g in gates} == {version_of(new.read_bytes())}
    for gate in gates:
        gate.stop()
        gate.storage.close()


def test_plangate_reload_refuses_a_broken_config_and_publishes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(BROKEN)
    assert main(["reload", str(file)]) == 1
    assert str(file) in capsys.readouterr().err
    memory = tmp_path / "memory.yaml"
    memory.write_text(config_text(3))
    assert main(["reload", str(memory)]) == 2
    assert "shared store" in capsys.readouterr().err


def test_the_asgi_lifespan_starts_and_stops_the_watch_and_starts_it_again(path: Path) -> None:
    app = PlanGateMiddleware(Starlette(routes=[Route("/v1/items", _ok)]), str(path))
    gate = app.gate
    reloads = Reloads(gate)
    for limit in (6, 8):
        with TestClient(app):
            assert gate.reloading.started
            assert gate.reloading.wait_watching()
            write(path, config_text(limit))
            reloads.wait(changed=True, count=limit // 2 - 2)
            assert limit_of(gate) == limit
        assert not gate.reloading.started  # shut down: nothing watched


def test_a_forked_worker_follows_the_file_on_its_own(path: Path) -> None:
    """gunicorn --preload: the app (and its gate) is built before the fork; a worker starts
    following the file again at its first request — first reading the file as it is then
    (the parent loaded it long ago), then watching it on a thread of its own."""
    import multiprocessing

    from werkzeug.test import Client

    from plangate.wsgi import PlanGateMiddleware

    app = PlanGateMiddleware(_wsgi_ok, str(path))
    assert app.gate.reloading.wait_watching()
    app.gate.stop()  # the parent stops following: only the child's own watch can tell
    write(path, config_text(12))  # changed between the parent's load and the fork
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    child = context.Process(target=_child_reloads, args=(app, path, answer, Client))
    child.start()
    try:
        assert answer.get(timeout=30) == [12, 13]
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert limit_of(app.gate) == 3  # the parent never reloaded


def _wsgi_ok(environ: dict[str, object], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


def _child_reloads(app: Any, path: Path, answer: Any, client_class: Any) -> None:
    gate = app.gate
    reloads = Reloads(gate)
    client_class(app).get("/elsewhere")  # the worker's first request starts it
    seen = [limit_of(gate)]  # the file as it was at the fork, read at start
    assert gate.reloading.wait_watching()
    write(path, config_text(13))
    reloads.wait(version=version_of(path.read_bytes()))
    answer.put([*seen, limit_of(gate)])
