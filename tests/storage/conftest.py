from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from plangate.storage import MemoryStorage, Storage

# Every storage behaviour test runs against each backend here. Redis and Redis Cluster
# join this table with the Redis backend.
BACKENDS: dict[str, Callable[[], Storage]] = {"memory": MemoryStorage}


@pytest.fixture(params=list(BACKENDS))
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    store = BACKENDS[request.param]()
    yield store
    store.close()
