"""``plangate.yaml``: the models, the loader and the compiled catalog.

``load_config(path)`` reads and checks a file; ``load_config(mapping)`` checks an object
already in memory (then messages carry key paths but no line numbers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConfigIssue
from ._catalog import (
    AddonGrant,
    Catalog,
    CreditGrant,
    Limit,
    MeterCost,
    MeterGrant,
    Plan,
    Rule,
    build_catalog,
    compile_entitlement,
    declared_rule,
    max_credits,
)
from ._durations import parse_duration
from ._loader import Document, read_bytes, read_source, validate_model
from ._models import ConfigModel

__all__ = [
    "AddonGrant",
    "Catalog",
    "Config",
    "ConfigModel",
    "CreditGrant",
    "Limit",
    "MeterCost",
    "MeterGrant",
    "Plan",
    "Rule",
    "compile_entitlement",
    "declared_rule",
    "load_config",
    "load_config_bytes",
    "max_credits",
    "parse_duration",
]


@dataclass(frozen=True, eq=False)  # one identity per load: usable as a cache key
class Config:
    """A loaded, checked config: the file as written (``model``) and compiled (``catalog``)."""

    model: ConfigModel
    catalog: Catalog
    source: str | None = None

    @property
    def notes(self) -> tuple[ConfigIssue, ...]:
        """Warnings: what the file declares that has no effect (not enforced yet, or a route
        rule that earlier rules shadow). ``plangate check`` prints them; loading goes on."""
        return self.catalog.notes


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load and check a config. Raises ``ConfigError`` listing every problem found.

    ``PLANGATE_STORAGE`` in the environment overrides ``storage:``, ``PLANGATE_MODE`` overrides
    ``mode:``.
    """
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        doc = Document(dict(source), {}, None)
    else:
        doc = read_source(source, env)
    return _checked(doc, env, str(source) if isinstance(source, (str, Path)) else None)


def load_config_bytes(
    data: bytes, name: str, *, env: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """``load_config`` for a config's bytes (a reload reads the file once, or the store's
    published copy); ``name`` is the file named in messages, ``source`` the path kept."""
    return _checked(read_bytes(data, name, env), env, source)


def _checked(doc: Document, env: Mapping[str, str] | None, source: str | None) -> Config:
    model = validate_model(ConfigModel, doc.data, doc)
    environ = os.environ if env is None else env
    override = environ.get("PLANGATE_STORAGE")
    if override:
        try:
            model = model.model_copy(update={"storage": ConfigModel.check_storage(override)})
        except ValueError as exc:
            issue = ConfigIssue("storage", f"PLANGATE_STORAGE: {exc}", doc.file)
            raise ConfigError([issue]) from None
    mode = environ.get("PLANGATE_MODE")
    if mode:
        if mode not in ("enforce", "shadow"):
            message = f"PLANGATE_MODE: expected enforce or shadow, got {mode!r}"
            raise ConfigError([ConfigIssue("mode", message, doc.file)])
        model = model.model_copy(update={"mode": mode})
    catalog = build_catalog(model, doc)
    return Config(model, catalog, source)
