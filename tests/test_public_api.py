import importlib

import pytest

import plangate


def test_public_names_are_pinned():
    assert plangate.__all__ == [
        "AsyncGate",
        "AuthenticationError",
        "Config",
        "ConfigError",
        "ConfigIssue",
        "CustomerRecord",
        "Decision",
        "Gate",
        "Identity",
        "MemoryStorage",
        "PlanGateError",
        "Problem",
        "Storage",
        "StorageError",
        "__version__",
        "load_config",
        "open_storage",
    ]
    assert plangate.__all__ == sorted(plangate.__all__)
    for name in plangate.__all__:
        assert hasattr(plangate, name)


@pytest.mark.parametrize(
    "module",
    [
        "plangate.asgi",
        "plangate.config",
        "plangate.engine",
        "plangate.errors",
        "plangate.identity",
        "plangate.storage",
        "plangate.wsgi",
    ],
)
def test_every_exported_name_of_a_package_exists(module):
    package = importlib.import_module(module)
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert missing == []
