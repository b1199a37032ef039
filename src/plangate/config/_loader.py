"""Read ``plangate.yaml``: YAML with line numbers, ``${VAR}`` interpolation, then the models."""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, ConfigIssue

Loc = tuple[str | int, ...]

_VARIABLE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def format_path(loc: Loc) -> str:
    """``("plans", "pro", "features")`` → ``plans.pro.features``; list items as ``routes[2]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class Document:
    """A parsed YAML document and the line of every key in it."""

    def __init__(self, data: Any, lines: dict[Loc, int], file: str | None) -> None:
        self.data = data
        self.lines = lines
        self.file = file

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        line = None
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                break
        return ConfigIssue(path=format_path(loc), message=message, file=self.file, line=line)


class _Reader:
    def __init__(self, file: str | None, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []
        self.loader = yaml.SafeLoader("")

    def read(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*loc, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        value = self.loader.construct_object(node)
        if isinstance(value, str) and "$" in value:
            value = self._interpolate(node, loc, value)
        return value

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        # Keys written here may repeat keys merged in with `<<: *anchor` (and override them);
        # only a key written twice here is a duplicate.
        written = {id(key) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"}
        self.loader.flatten_mapping(node)
        result: dict[str, Any] = {}
        explicit: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._issue(key_node, loc, "a key must be text, not a list or a mapping")
                continue
            if self.loader.construct_object(key_node) is None:
                self._issue(key_node, loc, "a key must be text, got None")
                continue
            key = key_node.value  # as written: `on:` stays "on", `5:` stays "5"
            here = (*loc, key)
            if id(key_node) in written:
                if key in explicit:
                    self._issue(key_node, here, f"duplicate key {key!r}")
                    continue
                explicit.add(key)
            self.lines[here] = key_node.start_mark.line + 1
            result[key] = self.read(value_node, here)
        return result

    def _interpolate(self, node: yaml.ScalarNode, loc: Loc, text: str) -> Any:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            reference = _REFERENCE.fullmatch(match.group(1) or "")
            if reference is None:
                self._issue(
                    node,
                    loc,
                    f"invalid variable reference {match.group(0)!r}: "
                    "use ${NAME} or ${NAME:-default} (and $$ for a literal $)",
                )
                return ""
            name, default = reference.group(1), reference.group(2)
            value = self.env.get(name)
            if value:
                return value
            if default is not None:  # as in a shell: the default when unset or empty
                return default
            if value is None:
                self._issue(node, loc, f"environment variable {name} is not set")
            return ""

        result = _VARIABLE.sub(replace, text)
        if node.style is None:  # a plain scalar: `${LIMIT:-100}` is the number 100
            tag = self.loader.resolve(yaml.ScalarNode, result, (True, False))  # type: ignore[no-untyped-call]
            plain = yaml.ScalarNode(tag, result, node.start_mark, node.end_mark)
            return self.loader.construct_object(plain, deep=True)
        return result

    def _issue(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.issues.append(
            ConfigIssue(format_path(loc), message, self.file, node.start_mark.line + 1)
        )


def _path_at_error(text: str) -> Loc:
    """The key path the YAML parser had reached when it found a syntax error."""
    # Each frame: [is_mapping, key or item index, in a mapping: reading a value (not a key)]
    frames: list[list[Any]] = []

    def consumed_value() -> None:
        if frames:
            top = frames[-1]
            if top[0]:
                top[2] = not top[2]

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            top = frames[-1] if frames else None
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if top is not None and not top[0]:
                    top[1] += 1
                frames.append([isinstance(event, yaml.MappingStartEvent), -1, False])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                frames.pop()
                consumed_value()
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                if top is None:
                    continue
                if not top[0]:
                    top[1] += 1
                elif not top[2]:
                    top[1] = getattr(event, "value", None)
                    top[2] = True
                else:
                    top[2] = False
    except yaml.YAMLError:
        pass
    return tuple(
        key
        for is_mapping, key, in_value in frames
        if ((in_value and isinstance(key, str)) if is_mapping else key >= 0)
    )


def read_yaml(text: str, file: str | None, env: Mapping[str, str]) -> Document:
    reader = _Reader(file, env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or "invalid YAML"
        where = format_path(_path_at_error(text))
        raise ConfigError([ConfigIssue(where, f"invalid YAML: {problem}", file, line)]) from None
    if node is None:
        raise ConfigError([ConfigIssue("", "the file is empty", file, 1)])
    data = reader.read(node, ())
    if reader.issues:
        raise ConfigError(reader.issues)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "expected a mapping of keys at the top", file, 1)])
    return Document(data, reader.lines, file)


def read_source(source: str | os.PathLike[str], env: Mapping[str, str] | None) -> Document:
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc.strerror}", str(source))]) from None
    return read_yaml(text, str(source), os.environ if env is None else env)


def validate_model(model: type[BaseModel], value: Any, doc: Document, at: Loc = ()) -> Any:
    """``model.model_validate(value)``; errors become issues located in ``doc``, in file order."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        messages: dict[Loc, list[str]] = {}
        for error in exc.errors(include_url=False):
            loc = _input_loc(value, tuple(error["loc"]), error["type"])
            text = _message(model, error, loc)
            found = messages.setdefault(at + loc, [])
            if text not in found:
                found.append(text)
        issues = [doc.issue(loc, " or ".join(texts)) for loc, texts in messages.items()]
        issues.sort(key=lambda issue: issue.line or 0)
        raise ConfigError(issues) from None


def _input_loc(data: Any, loc: Loc, kind: str) -> Loc:
    """``loc`` without what pydantic adds that is not a key of the input (union member names)."""
    kept: list[str | int] = []
    for i, part in enumerate(loc):
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_dict or in_list:
            data = data[part]
        elif i == len(loc) - 1 and kind in ("missing", "extra_forbidden"):
            pass  # the key that is missing or unknown: keep it
        else:
            continue
        kept.append(part)
    return tuple(kept)


def _message(model: type[BaseModel], error: Any, loc: Loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _keys_at(model, loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "expected a mapping of keys"
    message = str(error["msg"])
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return message


def _keys_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the model allows at ``loc``, for "unknown key" messages."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        return models[0] if len(models) == 1 else annotation
    return annotation
