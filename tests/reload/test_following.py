"""What follows a reload beyond the request path: the watch's rules, SIGHUP given back, the
store's published config (signed, or nothing published yet), requirements declared on views,
the gateway's /render, the billing webhooks and the periodic usage export."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from plangate import Gate, MemoryStorage
from plangate._reload import SECRET_ENV, _Hangup, _touches, signature, version_of
from plangate.admin import AdminAPI
from plangate.asgi import PlanGateMiddleware
from plangate.errors import StorageError
from plangate.gateway import GatewayService
from plangate.integration import Requirement
from plangate.storage import PublishedConfig
from tests.admin.support import START
from tests.billing.support import billing_config, event, items, post
from tests.gateways.support import gateway_config
from tests.reload.support import SECRET, Reloads, config_text, limit_of, write
from tests.support import Clock, bearer


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "plangate.yaml"
    file.write_text(config_text(3))
    return file


def test_watch_and_store_together_is_a_config_error() -> None:
    from plangate.config import load_config
    from plangate.errors import ConfigError

    with pytest.raises(ConfigError, match="reload: watch and store"):
        load_config(yaml.safe_load(config_text(3, reload="{watch: true, store: true}")))


def test_the_watch_reloads_for_the_file_or_a_configmap_swap_only() -> None:
    path = "/etc/plangate/plangate.yaml"
    assert _touches({(2, "/etc/plangate/plangate.yaml")}, path)
    assert _touches({(1, "/etc/plangate/..data")}, path)  # the ConfigMap's symlink swapped
    assert not _touches({(1, "/etc/plangate/.plangate.yaml.swp")}, path)
    assert not _touches({(2, "/etc/plangate/other.yaml")}, path)


def test_an_edit_put_back_clears_the_error(path: Path) -> None:
    gate = Gate(str(path))
    serving = path.read_text()
    write(path, "version: 1\n")
    assert gate.reload().error is not None
    write(path, serving)  # the bytes serving: nothing to swap, and nothing wrong any more
    outcome = gate.reload()
    assert not outcome.changed
    assert outcome.error is None
    assert gate.config_status()["last_error"] is None


def test_sighup_calls_the_handler_before_and_gives_it_back(path: Path) -> None:
    """A handler of its own (the process's is shared by every test's gates): it chains to the
    handler it replaced, and the last gate gone gives that one back."""
    before = signal.getsignal(signal.SIGHUP)
    calls: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: calls.append(signum))
    hangup = _Hangup()
    try:
        gate = Gate(str(path))
        gate.reloading.following = True  # as start() makes it, without the process's handler
        reloads = Reloads(gate)
        hangup.add(gate)
        assert signal.getsignal(signal.SIGHUP) == hangup._handle
        write(path, config_text(4))
        os.kill(os.getpid(), signal.SIGHUP)
        reloads.wait(changed=True)
        assert calls == [signal.SIGHUP]  # the handler before was called too
        hangup.discard(gate)
        restored = signal.getsignal(signal.SIGHUP)
        assert restored is not hangup._handle
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [signal.SIGHUP, signal.SIGHUP]  # Python runs it before kill returns
    finally:
        signal.signal(signal.SIGHUP, before)


# the store ------------------------------------------------------------------------------


def _store_gate(tmp_path: Path, storage: MemoryStorage, limit: int = 3) -> tuple[Gate, Path]:
    file = tmp_path / f"store-{limit}.yaml"
    file.write_text(config_text(limit, reload="{store: true}"))
    return Gate(str(file), storage=storage), file


def test_a_process_starts_on_the_published_config_before_its_first_request(
    tmp_path: Path,
) -> None:
    storage = MemoryStorage()
    published = config_text(20, reload="{store: true}").encode()
    storage.publish_config(published, version_of(published))
    gate, _ = _store_gate(tmp_path, storage)
    gate.start()  # no waiting: start loads it
    assert gate.loaded.version == version_of(published)
    assert gate.loaded.origin == "store"
    gate.stop()


def test_with_nothing_published_the_store_mode_reloads_its_file(tmp_path: Path) -> None:
    storage = MemoryStorage()
    gate, file = _store_gate(tmp_path, storage)
    write(file, config_text(6, reload="{store: true}"))
    assert gate.reload().changed
    assert limit_of(gate) == 6
    assert gate.loaded.origin == "file"


def test_a_signed_store_refuses_an_unsigned_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "a-reload-secret-of-the-deployment")
    storage = MemoryStorage()
    gate, _ = _store_gate(tmp_path, storage)
    forged = config_text(1000, reload="{store: true}").encode()
    storage.publish_config(forged, version_of(forged))
    outcome = gate.reload()
    assert outcome.error is not None
    assert "not signed" in outcome.error.message
    assert limit_of(gate) == 3
    signed = config_text(40, reload="{store: true}").encode()
    mac = signature(signed, "a-reload-secret-of-the-deployment")
    storage.publish_config(signed, version_of(signed), mac)
    assert gate.reload().changed
    assert limit_of(gate) == 40


def test_plangate_reload_signs_with_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: Any
) -> None:
    from plangate.cli import main
    from plangate.storage import open_storage

    redis_server.client().flushall()
    monkeypatch.setenv(SECRET_ENV, "a-reload-secret-of-the-deployment")
    file = tmp_path / "plangate.yaml"
    file.write_text(config_text(3, storage=redis_server.url, reload="{store: true}"))
    assert main(["reload", str(file)]) == 0
    store = open_storage(redis_server.url)
    try:
        published = store.published_config()
    finally:
        store.close()
    assert published is not None
    assert published.mac == signature(file.read_bytes(), "a-reload-secret-of-the-deployment")


class _Unreachable(MemoryStorage):
    def published_config(self) -> PublishedConfig | None:
        raise StorageError("redis://127.0.0.1:1/0: connection refused")


def test_a_store_that_cannot_be_read_is_a_503_not_an_invalid_config(tmp_path: Path) -> None:
    file = tmp_path / "plangate.yaml"
    file.write_text(config_text(3, reload="{store: true}"))
    from plangate import AsyncGate

    gate = AsyncGate(str(file), storage=_Unreachable())
    with TestClient(AdminAPI(gate)) as client:
        answer = client.post("/config/reload", headers={"Authorization": "Bearer an-admin-token"})
    assert answer.status_code == 503
    assert answer.json()["type"].endswith("/storage-unavailable")
    assert gate.last_reload_error is not None
    assert gate.last_reload_error.storage


# requirements declared on views ------------------------------------------------------------


def test_a_reload_that_drops_what_a_view_requires_is_refused(path: Path) -> None:
    text = config_text(3).replace(
        "  api_calls: {kind: metered, unit: call}\n",
        "  api_calls: {kind: metered, unit: call}\n  reports: {kind: boolean}\n",
    )
    write(path, text)
    requirement = Requirement("reports", name="export_view")

    async def view(request: Request) -> JSONResponse:
        decision = await request.scope["state"]["plangate.pending"].arequire(requirement)
        return JSONResponse({"customer": decision.customer})

    app = PlanGateMiddleware(Starlette(routes=[Route("/x", view)]), str(path), views=True)
    mine = {"Authorization": f"Bearer {_jwt()}"}
    with TestClient(app) as client:
        assert client.get("/x", headers=mine).json() == {"customer": "acme"}
        write(path, config_text(3))  # reports is gone
        outcome = app.gate.reload()
        assert outcome.error is not None
        assert "export_view" in outcome.error.message
        assert "reports" in outcome.error.message
        assert client.get("/x", headers=mine).json() == {"customer": "acme"}  # still served


def test_a_requirement_the_config_does_not_know_follows_the_failure_policy(path: Path) -> None:
    requirement = Requirement("no_such_feature", name="new_view")

    async def view(request: Request) -> JSONResponse:
        decision = await request.scope["state"]["plangate.pending"].arequire(requirement)
        return JSONResponse({"customer": decision.customer})

    app = PlanGateMiddleware(Starlette(routes=[Route("/x", view)]), str(path), views=True)
    with TestClient(app) as client:
        answer = client.get("/x", headers={"Authorization": f"Bearer {_jwt()}"})
    assert answer.status_code == 200  # on_storage_error: local lets it through, no customer
    assert answer.json() == {"customer": None}


# the gateway, the webhooks, the export -------------------------------------------------------


def test_render_takes_a_problem_issued_just_before_a_reload(tmp_path: Path) -> None:
    settings = gateway_config()
    file = tmp_path / "gateway.yaml"
    file.write_text(yaml.safe_dump(settings))
    with TestClient(GatewayService(str(file))) as client:
        for _ in range(5):
            client.get("/check/v1/projects", headers=bearer())
        denied = client.get("/check/v1/projects?deny=403", headers=bearer())
        assert denied.status_code == 403
        changed = copy.deepcopy(settings)
        changed["plans"]["free"]["features"]["api_calls"] = {"limit": 50, "window": "1h"}
        write(file, yaml.safe_dump(changed))
        gate = client.app.gate  # type: ignore[attr-defined]
        assert gate.reload().changed
        rendered = client.get(
            "/render", headers={"X-Plangate-Problem": denied.headers["x-plangate-problem"]}
        )
        assert rendered.status_code == 429
        assert rendered.json()["violated-policies"] == ["api_calls-1m"]


def test_the_webhooks_use_the_secret_and_prices_of_the_config_serving(tmp_path: Path) -> None:
    from plangate import AsyncGate
    from plangate.billing import Webhooks

    settings = billing_config()
    file = tmp_path / "billing.yaml"
    file.write_text(yaml.safe_dump(settings))
    gate = AsyncGate(str(file), storage=MemoryStorage(), clock=Clock(START))
    app = Starlette(routes=[])
    from starlette.routing import Mount

    app.router.routes.append(Mount("/webhooks", app=Webhooks(gate)))
    rotated = copy.deepcopy(settings)
    rotated["billing"]["stripe"]["webhook_secret"] = "whsec_rotated_0123456789abcdef0123"
    rotated["billing"]["stripe"]["prices"]["price_team_monthly"] = "pro"
    write(file, yaml.safe_dump(rotated))
    assert gate.reload().changed
    body = event("customer.subscription.created", items=items(("price_team_monthly", 1)))
    with TestClient(app) as client:
        assert post(client, body).status_code == 400  # the old secret: refused
        answer = post(client, body, secret="whsec_rotated_0123456789abcdef0123")
    assert answer.status_code == 200, answer.text
    assert answer.json()["subscription"] != "unmapped"
    assert json.loads(answer.text).get("unmapped") is None  # the new price is mapped


def test_the_periodic_export_exports_with_the_config_serving(tmp_path: Path) -> None:
    from plangate.billing import PeriodicExport

    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    settings = yaml.safe_load(config_text(3))
    settings["billing"] = {"export": {"every": "1h", "to": "jsonl", "path": str(first_dir)}}
    gate = Gate(settings, storage=MemoryStorage())
    for _ in range(2):
        gate.settle(gate.check("GET", "/v1/items", _jwt()), 200)
    export = PeriodicExport(gate.storage, lambda: gate.loaded.config)
    moved = copy.deepcopy(settings)
    moved["billing"]["export"]["path"] = str(second_dir)
    assert gate.reload(yaml.safe_dump(moved).encode()).changed
    export.once()
    assert list(first_dir.iterdir()) == []
    assert len(list(second_dir.iterdir())) == 1


def _jwt() -> str:
    from plangate.testing import token

    return token(yaml.safe_load(config_text(3)), "acme")


def test_a_forced_reload_reads_a_rotated_key_file(tmp_path: Path) -> None:
    """SIGHUP and POST /admin/config/reload build the config again even when its bytes are
    the same: the key file it names may be what changed."""
    import time

    import jwt

    from tests.identity.keys import pem_pair

    key = tmp_path / "key.pem"
    old_private, old_public = pem_pair("ec")
    new_private, new_public = pem_pair("ec")
    key.write_bytes(old_public)
    file = tmp_path / "plangate.yaml"
    file.write_text(
        config_text(3).replace(
            f"    algorithms: [HS256]\n    secret: {SECRET}\n",
            f"    algorithms: [ES256]\n    public_key: file:{key}\n",
        )
    )
    gate = Gate(str(file))

    def decided(private: bytes) -> int:
        claims = {"sub": "acme", "exp": int(time.time()) + 60}
        decision = gate.check("GET", "/v1/items", jwt.encode(claims, private, algorithm="ES256"))
        return decision.problem.status if decision.problem else 200

    assert decided(old_private) == 200
    key.write_bytes(new_public)
    assert not gate.reload().changed  # the watch's reload: the same bytes, nothing to do
    assert gate.reload(force=True).changed
    assert decided(new_private) == 200
    assert decided(old_private) == 401


def test_a_handler_set_after_plangates_is_left_in_place(path: Path) -> None:
    before = signal.getsignal(signal.SIGHUP)
    hangup = _Hangup()
    try:
        gate = Gate(str(path))
        hangup.add(gate)
        later = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # another library's, after
        assert later == hangup._handle
        hangup.discard(gate)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # not "given back" over it
    finally:
        signal.signal(signal.SIGHUP, before)


# the watch: one per process, whatever happens to the gates and their directories ----------


def test_a_gate_dropped_without_stop_is_not_kept_alive_by_the_watch(path: Path) -> None:
    import gc
    import weakref

    gate = Gate(str(path))
    gate.start()
    assert gate.reloading.wait_watching()
    reloads = Reloads(gate)
    write(path, config_text(5))  # an answer with this gate in it
    reloads.wait(changed=True)
    gone = weakref.ref(gate)
    del gate
    gc.collect()
    assert gone() is None


def test_a_directory_removed_does_not_stop_the_watch_of_the_others(tmp_path: Path) -> None:
    import shutil

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "plangate.yaml").write_text(config_text(3))
    (second / "plangate.yaml").write_text(config_text(3))
    kept, doomed = Gate(str(first / "plangate.yaml")), Gate(str(second / "plangate.yaml"))
    kept.start()
    doomed.start()
    try:
        assert kept.reloading.wait_watching()
        reloads = Reloads(kept)
        shutil.rmtree(second)
        late_dir = tmp_path / "c"  # and a gate added after it, elsewhere
        late_dir.mkdir()
        (late_dir / "plangate.yaml").write_text(config_text(3))
        late = Gate(str(late_dir / "plangate.yaml"))
        late.start()
        assert late.reloading.wait_watching()
        assert kept.reloading.wait_watching()
        write(first / "plangate.yaml", config_text(9))
        reloads.wait(changed=True)
        assert limit_of(kept) == 9
        late.stop()
    finally:
        kept.stop()
        doomed.stop()


def test_a_reload_listener_that_stops_a_gate_does_not_deadlock_the_watch(
    path: Path, tmp_path: Path
) -> None:
    other_file = tmp_path / "other.yaml"
    other_file.write_text(config_text(3))
    gate, other = Gate(str(path)), Gate(str(other_file))
    for started in (gate, other):
        started.start()
    stopped: list[bool] = []
    gate.reload_listeners.append(lambda outcome: stopped.append(True) or other.stop())
    reloads = Reloads(gate)
    try:
        assert gate.reloading.wait_watching()
        write(path, config_text(6))
        reloads.wait(changed=True)
        assert stopped
        assert not other.reloading.started
        assert gate.reloading.wait_watching()  # the watch goes on for the gate left
        write(path, config_text(7))
        reloads.wait(count=2, changed=True)
    finally:
        gate.stop()


def test_a_relative_path_is_read_again_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "plangate.yaml").write_text(config_text(3))
    monkeypatch.chdir(tmp_path)
    gate = Gate("plangate.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(tmp_path / "plangate.yaml", config_text(8))
    assert gate.reload().changed
    assert limit_of(gate) == 8
