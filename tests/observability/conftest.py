from tests.storage.conftest import storage
from tests.storage.test_outage import server  # a Redis of the test's own, to kill

__all__ = ["server", "storage"]
