"""The store is checked once at start-up: a wrong or missing Redis password, a refused or
unknown host, a Redis that does not answer — each an ERROR naming the URI (password masked)
and the cause, not a breaker WARNING on the first request. ``plangate check --connect`` does
the same for CI and deployments."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from plangate import asgi, cli, wsgi
from plangate.errors import StorageError
from plangate.storage import open_storage
from tests.middleware.apps import asgi_app, wsgi_app
from tests.servers import RedisServer, free_port, running
from tests.support import bearer, config

pytestmark = pytest.mark.redis

PASSWORD = "s3cret-pa55"


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    """A redis-server that wants a password (``requirepass``)."""
    server = RedisServer(None, "--requirepass", PASSWORD)
    with running(server):
        yield server


def _uri(server: RedisServer, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


def _cause(uri: str) -> str:
    store = open_storage(uri)
    with pytest.raises(StorageError) as caught:
        store.check_connection()
    store.close()
    return str(caught.value)


def test_the_right_password_connects_and_names_the_version(locked):
    store = open_storage(_uri(locked, PASSWORD))
    answered = store.check_connection()
    assert answered is not None
    assert answered.startswith(f"redis://:***@127.0.0.1:{locked.port}/0 (redis 7.")
    assert PASSWORD not in answered


def test_a_wrong_password_says_authentication_failed(locked):
    message = _cause(_uri(locked, "wrong-one"))
    assert message.startswith(
        f"cannot use redis://:***@127.0.0.1:{locked.port}/0: authentication failed"
    )
    assert "wrong-one" not in message


def test_a_missing_password_says_authentication_failed(locked):
    message = _cause(_uri(locked, None))
    assert message.startswith(f"cannot use {_uri(locked, None)}: authentication failed")


def test_a_refused_connection_says_so():
    uri = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    message = _cause(uri)
    assert message.startswith("cannot use redis://:***@127.0.0.1:")
    assert ": connection refused: " in message


def test_an_unknown_host_says_so():
    assert ": unknown host: " in _cause("redis://no-such-host.invalid:6379/0")


def test_a_redis_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        assert ": timed out: " in _cause(f"redis://127.0.0.1:{port}/0")


def test_a_memory_store_has_nothing_to_check():
    assert open_storage("memory://").check_connection() is None


# At start-up, in the middlewares ------------------------------------------------------------


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "plangate.storage" and r.levelno == logging.ERROR
    ]


def test_wsgi_logs_a_wrong_password_when_it_is_built(locked, caplog):
    with caplog.at_level(logging.INFO, logger="plangate.storage"):
        app = wsgi.PlanGateMiddleware(wsgi_app, config(), storage=_uri(locked, "wrong-one"))
        (error,) = _errors(caplog)  # before any request
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
            client.get("/v1/projects", headers=bearer())
    assert error.startswith(
        f"storage check failed: cannot use redis://:***@127.0.0.1:{locked.port}/0: "
        "authentication failed"
    )
    assert "wrong-one" not in caplog.text
    assert len(_errors(caplog)) == 1  # once
    app.gate.storage.close()


def test_wsgi_logs_the_connection_when_the_password_is_right(locked, caplog):
    with caplog.at_level(logging.INFO, logger="plangate.storage"):
        app = wsgi.PlanGateMiddleware(wsgi_app, config(), storage=_uri(locked, PASSWORD))
    assert _errors(caplog) == []
    assert f"storage check: connected to redis://:***@127.0.0.1:{locked.port}/0" in caplog.text
    app.gate.storage.close()


async def _lifespan(app: asgi.PlanGateMiddleware) -> list[str]:
    """Run the lifespan protocol as a server does: startup, then shutdown once started."""
    received: list[str] = []
    started = asyncio.Event()
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, str]:
        if received:
            await started.wait()
        return next(messages)

    async def send(message: dict[str, str]) -> None:
        received.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return received


def test_asgi_logs_a_wrong_password_at_lifespan_startup(locked, caplog):
    app = asgi.PlanGateMiddleware(asgi_app(), config(), storage=_uri(locked, "wrong-one"))
    assert _errors(caplog) == []  # building it does no I/O
    with caplog.at_level(logging.INFO, logger="plangate.storage"):
        received = asyncio.run(_lifespan(app))
    assert received == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    (error,) = _errors(caplog)
    assert "authentication failed" in error
    assert f"redis://:***@127.0.0.1:{locked.port}/0" in error
    assert not app.gate.storage_unchecked


def test_asgi_without_lifespan_checks_on_the_first_request(locked, caplog):
    app = asgi.PlanGateMiddleware(asgi_app(), config(), storage=_uri(locked, "wrong-one"))

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [
                (await client.get("/v1/projects", headers=bearer())).status_code for _ in range(2)
            ]
        await app.gate.storage.aclose()
        return statuses

    with caplog.at_level(logging.INFO, logger="plangate.storage"):
        assert asyncio.run(run()) == [200, 200]  # on_storage_error: local
    (error,) = _errors(caplog)  # once, by the first request
    assert "authentication failed" in error


def test_a_store_handed_to_the_middleware_is_the_callers_to_check(locked, caplog):
    store = open_storage(_uri(locked, "wrong-one"))
    with caplog.at_level(logging.INFO, logger="plangate.storage"):
        wsgi.PlanGateMiddleware(wsgi_app, config(), storage=store)
    assert _errors(caplog) == []
    store.close()


# plangate check --connect -------------------------------------------------------------------


def _config_file(tmp_path: Path, storage: str) -> str:
    path = tmp_path / "plangate.yaml"
    path.write_text(
        "version: 1\n"
        "identity:\n"
        "  jwt:\n"
        "    algorithms: [HS256]\n"
        "    secret: a-test-secret-that-is-long-enough-for-hs256\n"
        "    customer_claim: org_id\n"
        f"storage: {storage}\n",
        encoding="utf-8",
    )
    return str(path)


def test_check_connect_exits_0_and_names_the_server(locked, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = _config_file(tmp_path, _uri(locked, PASSWORD))
    assert cli.main(["check", "--connect", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: ok")
    assert out[-1].startswith(f"connected to redis://:***@127.0.0.1:{locked.port}/0 (redis 7.")


def test_check_connect_exits_1_on_a_wrong_password(locked, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = _config_file(tmp_path, _uri(locked, "wrong-one"))
    assert cli.main(["check", "--connect", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"plangate check: cannot use redis://:***@127.0.0.1:{locked.port}/0: authentication failed"
    )
    assert "wrong-one" not in err


def test_check_without_connect_does_not_connect(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = _config_file(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    assert cli.main(["check", path]) == 0
    assert "connected" not in capsys.readouterr().out
