from tests.storage.conftest import storage

__all__ = ["storage"]
