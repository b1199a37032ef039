import plangate


def test_public_names_are_pinned():
    assert plangate.__all__ == [
        "AsyncEnforcer",
        "AuthenticationError",
        "Config",
        "ConfigError",
        "ConfigIssue",
        "CustomerRecord",
        "Decision",
        "Enforcer",
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
