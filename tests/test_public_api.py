import ast
import importlib
from pathlib import Path

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
        "plangate.admin",
        "plangate.asgi",
        "plangate.config",
        "plangate.customers",
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


def test_the_integration_module_is_pinned():
    integration = importlib.import_module("plangate.integration")  # ruff keeps it sorted
    assert set(integration.__all__) == {
        "ENTITLEMENTS_PATH",
        "PENDING_KEY",
        "Answer",
        "AsyncGate",
        "Clock",
        "Exchange",
        "Gate",
        "Loaded",
        "Pending",
        "ReloadOutcome",
        "Requirement",
        "Settlement",
        "abegin",
        "asettle",
        "astream_settling",
        "begin",
        "encoded",
        "is_preflight",
        "json_answer",
        "problem_answer",
        "route_path",
        "settle",
        "stream_settling",
        "take_usage",
    }


def test_adapters_import_only_public_modules():
    root = Path(__file__).resolve().parent.parent / "adapters"
    private = []
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "plangate" and any(p.startswith("_") for p in parts[1:]):
                    private.append(f"{source.relative_to(root)}: {name}")
    assert private == []


def test_the_plangate_package_has_no_import_cycle_between_gateway_modules():
    logs = (Path(plangate.__file__).parent / "gateway" / "_logs.py").read_text()
    assert "_service" not in logs
