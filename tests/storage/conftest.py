from __future__ import annotations

from collections.abc import Iterator

import pytest

from plangate.storage import MemoryStorage, Storage, open_storage

# Every storage behaviour test runs against each backend here: the in-process store, a
# real redis-server, and a real 3-master Redis Cluster (servers started by tests/conftest.py).
BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param(
        "redis-cluster", id="redis-cluster", marks=[pytest.mark.redis, pytest.mark.cluster]
    ),
]


def open_backend(request: pytest.FixtureRequest, options: str = "") -> Storage:
    """The backend ``request.param`` names, emptied; ``options``: URI query options."""
    if request.param == "memory":
        return MemoryStorage()
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        with server.client() as client:
            client.flushall()
    else:
        server = request.getfixturevalue("redis_cluster")
        server.flush()
    return open_storage(f"{server.url}?{options}" if options else server.url)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    # the store's own behaviour, one reservation at a time: local leases (test_leases.py)
    # would count units ahead of use
    store = open_backend(request, "leases=off")
    yield store
    store.close()
