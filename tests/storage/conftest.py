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


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    store: Storage
    if request.param == "memory":
        store = MemoryStorage()
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        with server.client() as client:
            client.flushall()
        store = open_storage(server.url)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        store = open_storage(cluster.url)
    yield store
    store.close()
