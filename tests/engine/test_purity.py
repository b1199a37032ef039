"""The engine imports nothing that does I/O or belongs to a framework: no storage, no Redis,
no event loop, no web framework. Checked in a fresh interpreter, with ``plangate`` itself an
empty package, so only what ``plangate.engine`` pulls in (its own modules, and the config,
identity and errors packages it reads) is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = (
    "plangate.storage",
    "plangate.customers",
    "plangate._drivers",
    "redis",
    "anyio",
    "asyncio",
    "starlette",
    "werkzeug",
    "uvicorn",
    "flask",
    "django",
    "fastapi",
    "httpx",
)

LOAD = """
import importlib.util, json, sys, types

# plangate/__init__.py imports the whole package; load the engine without it.
spec = importlib.util.find_spec("plangate")
parent = types.ModuleType("plangate")
parent.__path__ = list(spec.submodule_search_locations)
sys.modules["plangate"] = parent
import plangate.engine

print(json.dumps(sorted(sys.modules)))
"""


def _loaded() -> list[str]:
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_engine_imports_no_storage_no_event_loop_and_no_framework():
    loaded = _loaded()
    assert "plangate.engine._engine" in loaded  # the engine itself was imported
    assert "plangate._gate" not in loaded  # and not the rest of the package
    found = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert found == []
