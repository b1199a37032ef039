from __future__ import annotations

from collections.abc import Iterator

import pytest

from plangate.storage import Storage
from tests.storage.conftest import BACKENDS, open_backend

#: an admin call is not a request's: it may wait for the store longer than the request path's
#: 50 ms, and twenty at once on a busy test machine must not time out
TIMEOUTS = "socket_timeout=2&socket_connect_timeout=2"


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The storage tests' backends (memory, a real redis-server, a real Redis Cluster),
    emptied, with the timeouts of an admin call."""
    store = open_backend(request, TIMEOUTS)
    yield store
    store.close()
