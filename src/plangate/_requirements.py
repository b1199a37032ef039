"""Requirements declared on a view instead of in ``routes:``.

The framework adapters declare a ``Requirement`` per view (a FastAPI dependency, a Flask or
Django decorator). When the view is reached, the adapter decides it for the request
(``Pending.require``); the decision joins the request's exchange, which settles it once the
response status is known, exactly as it settles a route rule.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Literal

from .config import Config, Rule, declared_rule
from .errors import ConfigError, ConfigIssue


class Requirement:
    """What a view needs: a feature, meters with their cost, as a rule of ``routes:`` says.

    ``Requirement("export_reports", meters={"api_calls": 1})``. Checked against the config the
    first time it is used with it: an unknown feature or a meter that is not metered raises
    ``ConfigError`` naming ``name``.
    """

    def __init__(
        self,
        feature: str | None = None,
        *,
        meters: Mapping[str, int | Mapping[str, Any]] | None = None,
        count: Literal["success", "always"] = "success",
        mode: Literal["enforce", "shadow"] = "enforce",
        name: str = "requires()",
    ) -> None:
        declaration: dict[str, Any] = {"meters": dict(meters or {}), "count": count, "mode": mode}
        if feature is not None:
            declaration["feature"] = feature
        self.declaration = declaration
        self.name = name
        self._rules: weakref.WeakKeyDictionary[Config, Rule] = weakref.WeakKeyDictionary()
        _DECLARED.add(self)

    def __repr__(self) -> str:
        return f"Requirement({self.declaration!r})"

    def rule(self, config: Config) -> Rule:
        rule = self._rules.get(config)
        if rule is None:
            rule = declared_rule(config.model, self.declaration, self.name)
            self._rules[config] = rule
        return rule


#: every requirement declared in the process (views are declared when their module loads)
_DECLARED: weakref.WeakSet[Requirement] = weakref.WeakSet()


def check_requirements(serving: Config, new: Config) -> list[ConfigIssue]:
    """What ``new`` refuses of the requirements views declared and decided with ``serving``
    (a reload must not leave a view requiring a feature or a meter that is gone)."""
    issues: list[ConfigIssue] = []
    for requirement in list(_DECLARED):
        if serving not in requirement._rules:
            continue  # not one of this config's views (or not reached yet)
        try:
            requirement.rule(new)
        except ConfigError as exc:
            issues.extend(exc.issues)
    return issues
