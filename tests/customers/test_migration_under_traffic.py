"""Moving 10 000 customers off a legacy plan while requests and other writes flow: no request
fails, no concurrent write is lost, every customer ends on the new plan."""

from __future__ import annotations

import random
import threading

import pytest

from plangate import Gate
from plangate.storage import customer_key, open_storage
from plangate.storage._redis_codec import customer_fields
from tests.customers.test_provisioning import catalog
from tests.support import token

pytestmark = pytest.mark.redis

CUSTOMERS = 10_000
LEGACY, TARGET = "pro-2023", "pro"


def test_ten_thousand_customers_migrate_while_requests_flow(redis_server):
    from plangate import CustomerRecord

    with redis_server.client() as client:
        client.flushall()
        pipe = client.pipeline(transaction=False)
        for i in range(CUSTOMERS):  # written as the store writes them, in one pipeline
            record = CustomerRecord(f"c{i:05}", plan=LEGACY)
            pipe.hset(customer_key(record.customer), mapping=_fields(record))
        pipe.execute()
    admin = Gate(catalog(), storage=open_storage(redis_server.url))
    traffic = [Gate(catalog(), storage=open_storage(redis_server.url)) for _ in range(3)]
    stop = threading.Event()
    failures: list[str] = []
    decided: list[int] = [0] * len(traffic)

    def requests(n: int) -> None:
        pick = random.Random(n)
        gate = traffic[n]
        while not stop.is_set():
            customer = f"c{pick.randrange(CUSTOMERS):05}"
            decision = gate.check("GET", "/v1/projects", token(customer, "free"))
            if decision.problem is not None or decision.plan not in (LEGACY, TARGET):
                failures.append(f"{customer}: {decision.plan} {decision.problem}")
            gate.settle(decision, 200)
            decided[n] += 1

    patched = [f"c{i:05}" for i in range(0, CUSTOMERS, 200)]

    def other_writes() -> None:  # an operator adding add-ons meanwhile
        for customer in patched:
            admin.customers.patch(customer, {"addons": {"token_pack": 3}})

    workers = [threading.Thread(target=requests, args=(n,)) for n in range(len(traffic))]
    writer = threading.Thread(target=other_writes)
    for worker in workers:
        worker.start()
    writer.start()
    try:
        result = admin.customers.migrate(LEGACY, TARGET)
    finally:
        writer.join()
        stop.set()
        for worker in workers:
            worker.join()
    try:
        assert failures == []
        assert all(decided)  # requests flowed throughout
        assert result["matched"] == CUSTOMERS
        assert result["migrated"] == CUSTOMERS
        plans: dict[str, str | None] = {}
        cursor = None
        while True:
            page = admin.storage.list_customers(limit=1000, cursor=cursor)
            plans.update((r.customer, r.plan) for r in page.records)
            cursor = page.cursor
            if cursor is None:
                break
        assert len(plans) == CUSTOMERS
        assert set(plans.values()) == {TARGET}
        for customer in patched:  # the concurrent writes survived the migration
            assert admin.customers.show(customer)["addons"] == {"token_pack": 3}
        assert admin.customers.migrate(LEGACY, TARGET)["matched"] == 0
        for gate in traffic:  # and the next request of every gate is decided on the new plan
            assert gate.check("GET", "/v1/projects", token("c00001", "free")).plan == TARGET
    finally:
        for gate in (admin, *traffic):
            gate.storage.close()


def _fields(record) -> dict[str, str]:
    fields = customer_fields(record)
    return {**dict(zip(fields[::2], fields[1::2], strict=True)), "version": "1"}
