from tests.admin.conftest import storage

__all__ = ["storage"]
