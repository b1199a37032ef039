"""plangate: plans, features and usage meters in one config file, enforced on every request.

The public surface is what ``__all__`` lists; everything else may change between releases.
"""

from __future__ import annotations

from .__about__ import __version__
from ._gate import AsyncGate, Gate
from .config import Config, load_config
from .engine import Decision, Problem
from .errors import AuthenticationError, ConfigError, ConfigIssue, PlanGateError, StorageError
from .identity import Identity
from .storage import CustomerRecord, MemoryStorage, Storage, open_storage

__all__ = [
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
