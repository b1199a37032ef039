"""Route templates (``POST /v1/reports/{id}/export``) and the first-match-wins router."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PARAM = re.compile(r"\{([^{}]*)\}")
_METHODS = re.compile(r"[A-Z]+(\|[A-Z]+)*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Template:
    methods: tuple[str, ...]  # empty: any method
    path: str
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

    params: list[str] = []
    pos = 0
    for match in _PARAM.finditer(path):
        literal = path[pos : match.start()]
        if "{" in literal or "}" in literal:
            raise ValueError(f"unbalanced braces in {path!r}")
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
        pos = match.end()
    rest = path[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced braces in {path!r}")
    return Template(methods, path, tuple(params))


_NO_RULE = sys.maxsize


class _Node:
    """The rules that continue past one matched segment: a node of a segment trie."""

    __slots__ = ("end", "first", "literal", "param", "patterns", "tails")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}  # segment text → node
        self.param: _Node | None = None  # {name}: any non-empty segment
        self.patterns: dict[str, tuple[re.Pattern[str], _Node]] = {}  # text and {name} mixed
        self.tails: list[tuple[int, re.Pattern[str] | None]] = []  # {name:path} in this segment
        self.end = _NO_RULE  # the first rule whose path ends here
        self.first = _NO_RULE  # the first rule at or below this node


def _segment_regex(text: str) -> str:
    """A segment that mixes text and parameters, as a regex (``{name:path}`` takes the rest)."""
    regex, pos = "", 0
    for match in _PARAM.finditer(text):
        name, _, kind = match.group(1).partition(":")
        regex += re.escape(text[pos : match.start()])
        regex += f"(?P<{name}>.*)" if kind == "path" else f"(?P<{name}>[^/]+)"
        pos = match.end()
    return regex + re.escape(text[pos:])


# How a rule reads its parameters: (segment index, the name of a parameter that is the whole
# segment, or a regex for one that mixes text and parameters, True if it takes the rest).
_Reader = tuple[int, str | re.Pattern[str], bool]


class Router:
    """First template that matches wins.

    Templates are compiled into one segment trie per method: a request walks literal segments
    by dict lookup and tries ``{name}`` and mixed segments beside them, skipping any branch
    whose first rule cannot beat a match already found. The cost follows the path's depth and
    the branches it meets, not the number of rules.
    """

    def __init__(self, templates: Sequence[Template]) -> None:
        methods = {m for t in templates for m in _matched_methods(t.methods)}
        self._any = _Node()  # rules for methods no template names
        self._roots = {method: _Node() for method in methods}
        self._readers: list[list[_Reader]] = []
        for index, template in enumerate(templates):
            segments, readers = self._compile(template.path)
            self._readers.append(readers)
            named = _matched_methods(template.methods)
            roots = [self._roots[m] for m in named] if named else [self._any, *self._roots.values()]
            for root in roots:
                _insert(root, index, segments)

    @staticmethod
    def _compile(path: str) -> tuple[list[tuple[str, Any]], list[_Reader]]:
        segments: list[tuple[str, Any]] = []
        readers: list[_Reader] = []
        for depth, text in enumerate(path.split("/")):
            if "{" not in text:
                segments.append(("literal", text))
                continue
            params = _PARAM.findall(text)
            if params[-1].endswith(":path"):
                name = params[-1].partition(":")[0]
                if text == f"{{{params[-1]}}}":  # the whole rest of the path
                    segments.append(("tail", None))
                    readers.append((depth, name, True))
                else:
                    pattern = re.compile(_segment_regex(text), re.DOTALL)
                    segments.append(("tail", pattern))
                    readers.append((depth, pattern, True))
                break  # {name:path} ends the path
            if text == f"{{{params[0]}}}":
                segments.append(("param", None))
                readers.append((depth, params[0], False))
            else:
                pattern = re.compile(_segment_regex(text), re.DOTALL)
                segments.append(("pattern", pattern))
                readers.append((depth, pattern, False))
        return segments, readers

    def match(self, method: str, path: str) -> tuple[int, dict[str, str]] | None:
        """The index of the first matching template and its parameters, or None."""
        root = self._roots.get(method, self._any)
        if root.first == _NO_RULE or not method or " " in method:
            return None
        segments = path.split("/")
        count = len(segments)
        best = _NO_RULE
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            if node.first >= best:
                continue
            if depth == count:
                best = min(best, node.end)
                continue
            if node.tails:
                rest = "/".join(segments[depth:])
                for index, pattern in node.tails:  # in rule order
                    if index >= best:
                        break
                    if pattern is None or pattern.fullmatch(rest):
                        best = index
                        break
            segment = segments[depth]
            child = node.literal.get(segment)
            if child is not None and child.first < best:
                stack.append((child, depth + 1))
            child = node.param
            if child is not None and segment and child.first < best:
                stack.append((child, depth + 1))
            for pattern, child in node.patterns.values():
                if child.first < best and pattern.fullmatch(segment):
                    stack.append((child, depth + 1))
        if best == _NO_RULE:
            return None
        params: dict[str, str] = {}
        for depth, reader, tail in self._readers[best]:
            text = "/".join(segments[depth:]) if tail else segments[depth]
            if isinstance(reader, str):
                params[reader] = text
            else:
                params.update(reader.fullmatch(text).groupdict())  # type: ignore[union-attr]
        return best, params


def _matched_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    # Every framework answers HEAD with its GET handler: a GET rule must cover HEAD too, or
    # HEAD would be an unenforced way to the same handler.
    return (*methods, "HEAD") if "GET" in methods and "HEAD" not in methods else methods


def _insert(root: _Node, index: int, segments: list[tuple[str, Any]]) -> None:
    node = root
    node.first = min(node.first, index)
    for kind, value in segments:
        if kind == "tail":
            node.tails.append((index, value))
            return
        if kind == "literal":
            node = node.literal.setdefault(value, _Node())
        elif kind == "param":
            if node.param is None:
                node.param = _Node()
            node = node.param
        else:
            pattern = value
            node = node.patterns.setdefault(pattern.pattern, (pattern, _Node()))[1]
        node.first = min(node.first, index)
    node.end = min(node.end, index)


class _Cover:
    """A node of the trie of earlier rules that ``shadowed`` walks; shapes, not names."""

    __slots__ = ("ends", "literal", "param", "patterns", "tails")

    def __init__(self) -> None:
        self.literal: dict[str, _Cover] = {}
        self.param: _Cover | None = None
        self.patterns: dict[str, tuple[re.Pattern[str], _Cover]] = {}
        # (shape, regex or None for a bare {name:path}, literal text before it, rule, methods)
        self.tails: list[tuple[str, re.Pattern[str] | None, str | None, int, Methods]] = []
        self.ends: list[tuple[int, Methods]] = []


Methods = frozenset[str] | None  # None: any method
_Shape = tuple[str, str, re.Pattern[str] | None, str | None]  # kind, shape, regex, tail prefix


def _shape(path: str) -> list[_Shape]:
    shapes: list[_Shape] = []
    for text in path.split("/"):
        params = _PARAM.findall(text)
        shape = _PARAM.sub(lambda m: "{*}" if m[1].endswith(":path") else "{}", text)
        if not params:
            shapes.append(("literal", text, None, None))
        elif params[-1].endswith(":path"):
            pure = text == f"{{{params[-1]}}}"
            prefix = text.partition("{")[0] if len(params) == 1 else None
            regex = None if pure else re.compile(_segment_regex(text), re.DOTALL)
            shapes.append(("tail", shape, regex, prefix))
            break
        elif text == f"{{{params[0]}}}":
            shapes.append(("param", shape, None, None))
        else:
            shapes.append(("pattern", shape, re.compile(_segment_regex(text), re.DOTALL), None))
    return shapes


def shadowed(templates: Sequence[Template]) -> dict[int, tuple[int, ...]]:
    """Rules that never match because earlier ones match all their requests first.

    Rule index → the earlier rules that cover it (together, when each covers some methods).
    Sound but not complete: a rule reported is shadowed; one that earlier rules cover only
    through a subtle regex overlap may go unreported.
    """
    root = _Cover()
    found: dict[int, tuple[int, ...]] = {}
    for index, template in enumerate(templates):
        shapes = _shape(template.path)
        methods: Methods = frozenset(_matched_methods(template.methods)) or None
        covering: list[tuple[int, Methods]] = []
        _covering(root, shapes, 0, covering)
        if methods is None:
            by = [i for i, m in covering if m is None][:1]
        else:
            whole = [i for i, m in covering if m is None or m >= methods][:1]
            parts = [(i, m) for i, m in covering if m is not None and m & methods]
            union = frozenset().union(*(m for _, m in parts)) if parts else frozenset()
            by = whole or ([i for i, _ in parts] if union >= methods else [])
        if by:
            found[index] = tuple(sorted(set(by)))
        _add(root, shapes, index, methods)
    return found


def _covering(
    node: _Cover, shapes: list[_Shape], depth: int, out: list[tuple[int, Methods]]
) -> None:
    """Collect the earlier rules under ``node`` whose paths include all of ``shapes[depth:]``."""
    if depth == len(shapes):
        out.extend(node.ends)
        return
    kind, shape, _, prefix = shapes[depth]
    rest = None
    if all(s[0] == "literal" for s in shapes[depth:]):
        rest = "/".join(s[1] for s in shapes[depth:])
    for tail_shape, regex, tail_prefix, index, methods in node.tails:
        if (
            regex is None
            or tail_shape == shape
            or (tail_prefix is not None and kind == "literal" and shape.startswith(tail_prefix))
            or (tail_prefix is not None and prefix is not None and prefix.startswith(tail_prefix))
            or (rest is not None and regex.fullmatch(rest))
        ):
            out.append((index, methods))
    if kind == "tail":
        return
    children: list[_Cover] = []
    if kind == "literal":
        if shape in node.literal:
            children.append(node.literal[shape])
        children.extend(child for regex, child in node.patterns.values() if regex.fullmatch(shape))
    elif kind == "pattern" and shape in node.patterns:
        children.append(node.patterns[shape][1])
    if node.param is not None and shape:  # any segment but the empty one
        children.append(node.param)
    for child in children:
        _covering(child, shapes, depth + 1, out)


def _add(root: _Cover, shapes: list[_Shape], index: int, methods: Methods) -> None:
    node = root
    for kind, shape, regex, prefix in shapes:
        if kind == "tail":
            node.tails.append((shape, regex, prefix, index, methods))
            return
        if kind == "literal":
            node = node.literal.setdefault(shape, _Cover())
        elif kind == "param":
            if node.param is None:
                node.param = _Cover()
            node = node.param
        else:
            assert regex is not None
            node = node.patterns.setdefault(shape, (regex, _Cover()))[1]
    node.ends.append((index, methods))
