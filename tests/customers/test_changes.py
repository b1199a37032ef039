"""A change to a customer reaches every process's next request: published on Redis pub/sub
(sharded on a cluster), heard by each process's cache; the TTL is the safety net when a
message is lost, and the subscriber comes back by itself."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from plangate import Gate, MemoryStorage
from plangate.storage import open_storage
from plangate.storage._redis_changes import CHANNEL
from tests.servers import RedisServer, running
from tests.storage.test_redis_service import uvicorn_process
from tests.support import Clock, bearer, config, token

WAIT = 15.0  # seconds an awaited event may take before the test fails


def plan_of(gate: Gate, customer: str = "acme") -> str | None:
    return gate.check("GET", "/v1/projects", token(customer, "free"), consume=False).plan


def gate_on(uri: str, ttl: float = 3600) -> Gate:
    """A gate with its own connections, as another process has: a long TTL, so that only
    a published change can reach it in time."""
    separator = "&" if "?" in uri else "?"
    return Gate(config(), storage=open_storage(f"{uri}{separator}customer_cache_ttl={ttl}"))


def feed(gate: Gate):
    return gate.storage.inner.changes  # type: ignore[attr-defined]


def subscribed(gate: Gate, times: int = 1) -> None:
    assert feed(gate).wait_subscribed(times, WAIT), "the subscriber did not (re)subscribe"


def heard(gate: Gate, version: int) -> None:
    assert gate.customers.wait_version("acme", version, WAIT), "the change was not heard"


@pytest.fixture(params=["redis_server", "redis_cluster", "redis_sentinel"])
def uri(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param).url)


def test_memory_is_one_process_and_a_change_shows_at_once():
    storage = MemoryStorage()
    writer, reader = Gate(config(), storage=storage), Gate(config(), storage=storage)
    assert plan_of(reader) == "free"
    writer.customers.assign("acme", plan="enterprise")
    assert plan_of(reader) == "enterprise"


@contextlib.contextmanager
def writer_and_reader(uri: str, reader_ttl: float = 3600) -> Iterator[tuple[Gate, Gate]]:
    """Two gates with their own connections, as two processes have: the reader has cached
    acme on free and subscribed."""
    writer, reader = gate_on(uri), gate_on(uri, ttl=reader_ttl)
    try:
        writer.storage.delete_customer("acme")  # whatever another test left there
        writer.customers.assign("acme", plan="free")
        assert plan_of(reader) == "free"
        subscribed(reader)
        yield writer, reader
    finally:
        writer.storage.close()
        reader.storage.close()


def change_is_heard(writer: Gate, reader: Gate, plan: str) -> None:
    """A change made by the writer decides the reader's next request."""
    seen = reader.customers.version("acme")
    writer.customers.assign("acme", plan=plan)
    heard(reader, seen + 1)
    assert plan_of(reader) == plan


def test_a_change_reaches_another_gates_next_request(uri: str):
    with writer_and_reader(uri) as (writer, reader):
        change_is_heard(writer, reader, "enterprise")
        if "cluster" in uri:
            assert feed(writer).sharded is True  # SPUBLISH/SSUBSCRIBE on Redis 7


def test_a_killed_subscription_comes_back_and_hears_again(redis_server):
    with writer_and_reader(redis_server.url) as (writer, reader):
        with redis_server.client() as client:
            assert client.client_kill_filter(_type="pubsub") >= 1
        subscribed(reader, 2)
        change_is_heard(writer, reader, "pro")


def test_with_the_subscription_dead_a_change_shows_within_the_ttl(redis_server):
    with writer_and_reader(redis_server.url, reader_ttl=5) as (writer, reader):
        clock = reader.customers.clock = Clock()  # the cache's TTL clock, from now on
        reader.customers.invalidate("acme")
        assert plan_of(reader) == "free"  # cached again, at 0 on that clock
        feed(reader).close(wait=True)  # the subscription is dead and stays dead
        with redis_server.client() as client:
            client.client_kill_filter(_type="pubsub")
        writer.customers.assign("acme", plan="enterprise")
        clock.now = 4.9  # nobody told this process: within the TTL its record answers...
        assert plan_of(reader) == "free"
        clock.now = 5.0  # ...and never past it
        assert plan_of(reader) == "enterprise"


def test_after_a_redis_restart_the_subscriber_is_back_by_itself():
    server = RedisServer()
    with running(server), writer_and_reader(server.url) as (writer, reader):
        server.restart()  # empty: the record is gone with it
        subscribed(reader, 2)
        change_is_heard(writer, reader, "enterprise")


def test_a_change_reaches_another_process(redis_server, tmp_path: Path):
    with redis_server.client() as client:
        client.flushall()
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump(config()))
    storage = f"{redis_server.url}?customer_cache_ttl=3600"
    writer = gate_on(redis_server.url)
    try:
        with uvicorn_process(storage, path) as url, httpx.Client(base_url=url) as client:

            def plan() -> str:
                answer = client.get("/.plangate/entitlements", headers=bearer("acme", "free"))
                return str(answer.json()["plan"])

            assert plan() == "free"  # read, and cached for an hour
            with redis_server.client() as redis:  # the other process has subscribed
                _until(lambda: redis.pubsub_numsub(CHANNEL)[0][1] >= 1)
            writer.customers.assign("acme", plan="enterprise")
            _until(lambda: plan() == "enterprise")
    finally:
        writer.storage.close()


def _until(condition, timeout: float = WAIT) -> None:
    """Poll another process's state (nothing in this process can be awaited for it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the other process did not see the change"
        time.sleep(0.01)


def _forked_reader(gate: Gate, pipe) -> None:  # runs in the child
    try:
        assert feed(gate).wait_subscribed(1, WAIT)  # its own subscriber, not the parent's
        pipe.send(plan_of(gate))
        seen = gate.customers.version("acme")
        pipe.recv()  # the parent has written
        assert gate.customers.wait_version("acme", seen + 1, WAIT)
        pipe.send(plan_of(gate))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        pipe.send(repr(exc))


def test_a_forked_worker_subscribes_on_its_own(redis_server):
    import multiprocessing

    # the reader's subscriber is the parent's: a thread the child does not inherit
    with writer_and_reader(redis_server.url) as (writer, reader):
        context = multiprocessing.get_context("fork")
        mine, theirs = context.Pipe()
        child = context.Process(target=_forked_reader, args=(reader, theirs))
        child.start()
        try:
            assert mine.poll(WAIT)
            assert mine.recv() == "free"
            writer.customers.assign("acme", plan="enterprise")
            mine.send("written")
            assert mine.poll(WAIT)
            assert mine.recv() == "enterprise"
        finally:
            child.join(WAIT)


def test_a_sharded_subscription_follows_its_channel_to_another_node():
    from tests.servers import RedisCluster

    cluster = RedisCluster()  # its own: the channel's slot is moved
    with running(cluster), writer_and_reader(cluster.url) as (writer, reader):
        assert feed(reader).sharded is True
        _move_slot_of(CHANNEL, cluster)  # Redis drops the shard channel's subscribers
        subscribed(reader, 2)
        change_is_heard(writer, reader, "enterprise")


def _move_slot_of(channel: str, cluster) -> None:
    """Give the (keyless) slot of ``channel`` to another master, on every node."""
    clients = [node.client() for node in cluster.nodes]
    try:
        slot = int(clients[0].execute_command("CLUSTER", "KEYSLOT", channel))
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        owner = next(
            i
            for i, c in enumerate(clients)
            if any(lo <= slot <= hi for lo, hi, *_ in c.execute_command("CLUSTER", "SLOTS"))
            and _serves(c, slot, cluster.nodes[i].port)
        )
        target = (owner + 1) % len(clients)
        for i in (target, owner, *(i for i in range(len(clients)) if i not in (owner, target))):
            clients[i].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in clients:
            client.close()


def _serves(client, slot: int, port: int) -> bool:
    for lo, hi, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if lo <= slot <= hi:
            return int(primary[1]) == port
    return False
