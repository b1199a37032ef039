from __future__ import annotations

from collections.abc import Iterator

import pytest

from plangate.storage import MemoryStorage, Storage, open_storage
from tests.storage.conftest import BACKENDS

#: an admin call is not a request's: it may wait for the store longer than the request path's
#: 50 ms, and twenty at once on a busy test machine must not time out
TIMEOUTS = "socket_timeout=2&socket_connect_timeout=2"


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The storage tests' backends (memory, a real redis-server, a real Redis Cluster),
    emptied, with the timeouts of an admin call."""
    store: Storage
    if request.param == "memory":
        store = MemoryStorage()
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        with server.client() as client:
            client.flushall()
        store = open_storage(f"{server.url}?{TIMEOUTS}")
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        store = open_storage(f"{cluster.url}?{TIMEOUTS}")
    yield store
    store.close()
