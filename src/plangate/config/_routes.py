"""Route templates (``POST /v1/reports/{id}/export``), compiled once into one ordered regex."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_PARAM = re.compile(r"\{([^{}]*)\}")
_METHODS = re.compile(r"[A-Z]+(\|[A-Z]+)*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Template:
    methods: tuple[str, ...]  # empty: any method
    path: str
    regex: str  # matches "METHOD /path"; parameters as named groups
    params: tuple[str, ...]


def parse_template(text: str) -> Template:
    """Parse ``"GET|HEAD /items/{id}"``; raises ValueError with what is wrong."""
    parts = text.split()
    if len(parts) == 2:
        methods_text, path = parts
        if not _METHODS.fullmatch(methods_text):
            raise ValueError(
                f"invalid methods {methods_text!r}: use upper-case names joined by |, "
                "such as GET or GET|HEAD"
            )
        methods = tuple(methods_text.split("|"))
    elif len(parts) == 1:
        methods, path = (), parts[0]
    else:
        raise ValueError(f"expected 'METHOD /path' or '/path', got {text!r}")
    if not path.startswith("/"):
        raise ValueError(f"the path must start with /, got {path!r}")

    regex, params, pos = "", [], 0
    for match in _PARAM.finditer(path):
        literal = path[pos : match.start()]
        if "{" in literal or "}" in literal:
            raise ValueError(f"unbalanced braces in {path!r}")
        regex += re.escape(literal)
        name, _, kind = match.group(1).partition(":")
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid parameter name {name!r} in {path!r}")
        if name in params:
            raise ValueError(f"parameter {name!r} appears twice in {path!r}")
        if kind not in ("", "path"):
            raise ValueError(
                f"unknown parameter type {kind!r} in {path!r}: use {{name}} or {{name:path}}"
            )
        if kind == "path" and match.end() != len(path):
            raise ValueError(f"{{{name}:path}} must end the path in {path!r}")
        params.append(name)
        regex += f"(?P<{name}>.*)" if kind == "path" else f"(?P<{name}>[^/]+)"
        pos = match.end()
    rest = path[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced braces in {path!r}")
    regex += re.escape(rest)
    # Every framework answers HEAD with its GET handler: a GET rule must cover HEAD too, or
    # HEAD would be an unenforced way to the same handler.
    matched = (*methods, "HEAD") if "GET" in methods and "HEAD" not in methods else methods
    method_regex = "|".join(matched) if matched else "[^ ]+"
    return Template(methods, path, f"(?:{method_regex}) {regex}", tuple(params))


class Router:
    """First template that matches wins. One regex scan per request, whatever the rule count."""

    def __init__(self, templates: Sequence[Template]) -> None:
        self._templates = tuple(templates)
        alternatives = []
        for index, template in enumerate(templates):
            # Group names must be unique across alternatives: prefix them with the rule index.
            regex = re.sub(r"\(\?P<", f"(?P<r{index}_", template.regex)
            alternatives.append(f"(?P<r{index}>{regex})")
        self._regex = re.compile("|".join(alternatives) or r"(?!)", re.DOTALL)
        self._params = [
            [(name, f"r{i}_{name}") for name in t.params] for i, t in enumerate(templates)
        ]

    def match(self, method: str, path: str) -> tuple[int, dict[str, str]] | None:
        """The index of the first matching template and its parameters, or None."""
        m = self._regex.fullmatch(f"{method} {path}")
        if m is None:
            return None
        # The outer group of the matching alternative is the last one to have closed.
        index = int(m.lastgroup[1:])  # type: ignore[index]
        names = self._params[index]
        return index, ({name: m.group(group) for name, group in names} if names else {})
