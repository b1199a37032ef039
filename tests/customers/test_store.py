"""The customer store: one cache with a TTL in front of a backend's records, used as the last
record seen while the backend fails."""

from __future__ import annotations

import asyncio

import pytest

from plangate import CustomerRecord, Gate, MemoryStorage, StorageError
from plangate.customers import AsyncCustomerStore, CustomerStore
from plangate.storage import open_storage
from tests.support import Clock, config, token


class Silent(MemoryStorage):
    """Memory records whose changes nobody is told of: another process's writes with every
    pub/sub message lost. Only the TTL brings them."""

    in_process = False  # the cache in front of it is what is tested

    def watch_customers(self, listener) -> None:
        pass


class Flaky(Silent):
    """Records that can be made unreachable, or changed while a read is on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.during_read = None

    def get_customer(self, customer: str) -> CustomerRecord | None:
        if self.down:
            raise StorageError("unreachable")
        record = super().get_customer(customer)
        if self.during_read is not None:
            action, self.during_read = self.during_read, None
            action()
        return record


def test_a_saved_record_is_loaded():
    customers = CustomerStore(MemoryStorage())
    customers.save(CustomerRecord("acme", plan="pro"))
    assert customers.load("acme").plan == "pro"
    assert customers.load("nobody") is None


def test_a_deleted_record_is_gone():
    storage = MemoryStorage()
    customers = CustomerStore(storage, ttl=60)
    customers.save(CustomerRecord("acme", plan="pro"))
    customers.delete("acme")
    assert customers.load("acme") is None
    assert storage.get_customer("acme") is None


def test_a_record_is_reused_for_the_ttl_then_read_again():
    storage, clock = Silent(), Clock()
    customers = CustomerStore(storage, ttl=5, clock=clock)
    customers.save(CustomerRecord("acme", plan="free"))
    storage.put_customer(CustomerRecord("acme", plan="pro"))  # written by another process
    clock.now = 4.9
    assert customers.load("acme").plan == "free"
    clock.now = 5.0
    assert customers.load("acme").plan == "pro"


def test_the_ttl_is_the_stores_customer_cache_ttl():
    assert CustomerStore(MemoryStorage()).ttl == 0  # in process: always read
    redis = open_storage("redis://localhost:1/0?customer_cache_ttl=7.5")  # connects lazily
    assert CustomerStore(redis).ttl == 7.5
    assert CustomerStore(open_storage("redis://localhost:1/0")).ttl == 5


def test_an_invalidated_record_is_read_again_and_counted_as_a_version():
    storage = Silent()
    customers = CustomerStore(storage, ttl=60)
    customers.save(CustomerRecord("acme", plan="free"))
    assert customers.version("acme") == 1
    storage.put_customer(CustomerRecord("acme", plan="pro"))
    customers.invalidate("acme")
    assert customers.version("acme") == 2
    assert customers.load("acme").plan == "pro"
    customers.invalidate("globex")  # never seen: nothing cached, the version still counts
    assert customers.version("globex") == 1


def test_a_read_older_than_a_change_does_not_replace_it_in_the_cache():
    storage = Flaky()
    customers = CustomerStore(storage, ttl=60)
    storage.put_customer(CustomerRecord("acme", plan="free"))
    storage.during_read = lambda: customers.save(CustomerRecord("acme", plan="pro"))
    assert customers.load("acme").plan == "free"  # read before the save
    storage.down = True  # answered from the cache, which holds the newer record
    assert customers.load("acme").plan == "pro"


def test_while_the_store_fails_the_record_seen_last_is_used_however_old():
    storage, clock = Flaky(), Clock()
    customers = CustomerStore(storage, ttl=5, clock=clock)
    storage.put_customer(CustomerRecord("acme", plan="pro"))
    assert customers.load("acme").plan == "pro"
    storage.down = True
    clock.now = 3600
    assert customers.load("acme").plan == "pro"
    customers.invalidate("acme")  # changed elsewhere, but the store cannot say how
    assert customers.load("acme").plan == "pro"
    with pytest.raises(StorageError):  # never seen: the caller falls back to the token
        customers.load("globex")


def test_the_async_store_shares_the_behaviour():
    storage, clock = Flaky(), Clock()
    customers = AsyncCustomerStore(storage, ttl=5, clock=clock)

    async def run() -> list[CustomerRecord | None]:
        await customers.save(CustomerRecord("acme", plan="pro"))
        await customers.save(CustomerRecord("globex", plan="free"))
        await customers.delete("globex")
        storage.down = True
        clock.now = 3600
        return [await customers.load("acme"), await customers.load("globex")]

    assert asyncio.run(run()) == [CustomerRecord("acme", plan="pro", version=1), None]


def test_the_gate_decides_from_its_customer_store():
    storage = Flaky()
    gate = Gate(config(), storage=storage)
    assert isinstance(gate.customers, CustomerStore)
    gate.customers.save(CustomerRecord("acme", plan="enterprise"))
    assert gate.check("GET", "/v1/projects", token("acme", "free")).plan == "enterprise"
    storage.down = True  # the record seen last still decides
    assert gate.check("GET", "/v1/projects", token("acme", "free")).plan == "enterprise"
    # a customer never seen: its token's plan claim decides
    assert gate.check("GET", "/v1/projects", token("globex", "pro")).plan == "pro"


def test_an_in_process_store_is_read_directly_and_changes_show_at_once():
    storage = MemoryStorage()
    store = CustomerStore(storage)
    assert store.direct
    storage.put_customer(CustomerRecord("acme", plan="pro"))  # written behind the store's back
    assert store.load("acme") == CustomerRecord("acme", plan="pro", version=1)


class Watched(Silent):
    """Counts who asked to be told of changes."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: list[object] = []

    def watch_customers(self, listener) -> None:
        self.watchers.append(listener)


def test_a_cache_subscribes_with_its_first_cached_record_and_only_then():
    storage = Watched()
    gate = Gate(config(), storage=storage)
    gate.customers.assign("acme", plan="pro")  # provisioning only: a command-line process
    gate.customers.patch("acme", {"plan": "enterprise"})
    assert gate.customers.show("acme")["plan"] == "enterprise"
    assert storage.watchers == []
    assert gate.check("GET", "/v1/projects", token("acme", "free")).plan == "enterprise"
    assert storage.watchers == [gate.customers]
    gate.check("GET", "/v1/projects", token("globex", "free"))
    assert storage.watchers == [gate.customers]  # once


def test_a_read_that_a_heard_change_overtook_is_not_cached():
    storage = Flaky()
    customers = CustomerStore(storage, ttl=60)
    storage.put_customer(CustomerRecord("acme", plan="free"))  # version 1

    def changed_elsewhere() -> None:  # while the read is on its way back
        storage.put_customer(CustomerRecord("acme", plan="pro"))  # version 2
        customers.heard("acme", 2)

    storage.during_read = changed_elsewhere
    assert customers.load("acme").plan == "free"  # what the read brought back...
    assert customers.load("acme").plan == "pro"  # ...was not kept: read again


def test_a_change_heard_during_the_read_of_a_cached_customer_is_not_lost():
    storage, clock = Flaky(), Clock()
    customers = CustomerStore(storage, ttl=5, clock=clock)
    storage.put_customer(CustomerRecord("acme", plan="free"))
    assert customers.load("acme").plan == "free"
    clock.now = 6  # expired: the next load reads

    def changed_elsewhere() -> None:
        storage.put_customer(CustomerRecord("acme", plan="pro"))
        customers.heard("acme", 2)

    storage.during_read = changed_elsewhere
    assert customers.load("acme").plan == "free"
    assert customers.load("acme").plan == "pro"


def test_an_older_write_finishing_last_does_not_replace_a_newer_one():
    from plangate.customers._provisioning import WriteCustomer

    storage = Silent()
    customers = CustomerStore(storage, ttl=60)
    storage.put_customer(CustomerRecord("acme", plan="free"))
    assert customers.load("acme").version == 1
    older, newer = CustomerRecord("acme", plan="pro"), CustomerRecord("acme", plan="enterprise")
    customers._written(WriteCustomer(newer, 1), 3)  # two concurrent writes: 2 and 3
    customers._written(WriteCustomer(older, 1), 2)  # ...the older one's answer came last
    assert (customers.load("acme").plan, customers.load("acme").version) == ("enterprise", 3)


def test_versions_never_repeat_after_a_delete():
    storage = MemoryStorage()
    assert storage.put_customer(CustomerRecord("acme", plan="pro")) == 1
    assert storage.delete_customer("acme") == 2
    assert storage.delete_customer("acme") == 0  # nothing left to delete
    assert storage.put_customer(CustomerRecord("acme", plan="free"), expected_version=0) == 3
