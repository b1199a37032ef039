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


# Limits that keep a hostile or broken file from costing more than a mistake: a real config
# nests about six levels deep and aliases, if any, copy a few plans or meters.
MAX_DEPTH = 64
ALIAS_BUDGET = 100_000  # values that aliases may add to the document

# `${NAME:-default}` is swapped for a token of private-use characters before parsing, so that
# it reads as one plain scalar anywhere, even in a flow mapping where `{` and `,` are syntax;
# the reference, as written, is put back and interpolated once the YAML is parsed.
_TOKEN = re.compile("\ue000([0-9]+)\ue001")


class _References:
    def __init__(self, text: str) -> None:
        self.written: list[str] = []
        if "\ue000" in text:  # the file uses the token's characters itself: leave it as is
            self.text = text
            return

        def token(match: re.Match[str]) -> str:
            if match.group(1) is None or "\n" in match.group(0):
                return match.group(0)
            self.written.append(match.group(0))
            return f"\ue000{len(self.written) - 1}\ue001"

        self.text = _VARIABLE.sub(token, text)

    def restore(self, text: str) -> str:
        if not self.written or "\ue000" not in text:
            return text
        return _TOKEN.sub(lambda match: self.written[int(match.group(1))], text)


class _Reader:
    def __init__(self, file: str | None, env: Mapping[str, str], refs: _References) -> None:
        self.file = file
        self.env = env
        self.refs = refs
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []
        self.loader = yaml.SafeLoader("")
        self.written: dict[int, set[int]] = {}  # per mapping node: the keys written in it

    def read(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*loc, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        value = self._construct(node, loc)
        if isinstance(value, str) and "$" in (value := self.refs.restore(value)):
            value = self._interpolate(node, loc, value)
        return value

    def _construct(self, node: yaml.Node, loc: Loc) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            if node.tag not in self.loader.yaml_constructors:
                message = f"unknown tag {node.tag!r}: plangate.yaml takes plain YAML values"
            else:
                message = f"invalid {node.tag.rpartition(':')[2]}: {exc.problem}"
        except Exception as exc:  # PyYAML's constructors raise what they meet: 2001-02-30
            written = self.refs.restore(node.value)
            detail = f": {exc}" if written == node.value else ""  # exc would show the token
            message = f"invalid {node.tag.rpartition(':')[2]} {written!r}{detail}"
        self.loader.recursive_objects.pop(node, None)  # else an alias of it reads as recursive
        self._issue(node, loc, message)
        return None

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        # Keys written here may repeat keys merged in with `<<: *anchor` (and override them);
        # only a key written twice here is a duplicate. An alias reads the same node again,
        # merged already: remember what was written the first time.
        written = self.written.get(id(node))
        if written is None:
            merge = "tag:yaml.org,2002:merge"
            written = {id(key) for key, _ in node.value if key.tag != merge}
            self.written[id(node)] = written
            try:
                self.loader.flatten_mapping(node)
            except yaml.constructor.ConstructorError as exc:
                where = exc.problem_mark or node.start_mark
                self.issues.append(
                    ConfigIssue(
                        format_path(loc),
                        "a merge key (<<) takes an alias of a mapping, or a list of them "
                        "(<<: *defaults)",
                        self.file,
                        where.line + 1,
                    )
                )
                return {}
        result: dict[str, Any] = {}
        explicit: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._issue(key_node, loc, "a key must be text, not a list or a mapping")
                continue
            issues = len(self.issues)
            if self._construct(key_node, loc) is None:
                if len(self.issues) == issues:
                    self._issue(key_node, loc, "a key must be text, got None")
                continue
            key = self.refs.restore(key_node.value)  # as written: `on:` stays "on"
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
            return self._construct(plain, loc)
        return result

    def _issue(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.issues.append(
            ConfigIssue(format_path(loc), message, self.file, node.start_mark.line + 1)
        )


def _fail(path: Loc, message: str, file: str | None, line: int | None) -> ConfigError:
    return ConfigError([ConfigIssue(format_path(path), message, file, line)])


def _scan(text: str, file: str | None, refs: _References) -> None:
    """Check the YAML events before any node is built: syntax, nesting depth, alias expansion.

    A syntax error names the key path the parser had reached.
    """
    # Each frame: [is_mapping, key or item index, in a mapping: reading a value (not a key)]
    frames: list[list[Any]] = []
    # Per open collection: [values in it, collections nested in it, its anchor]
    sizes: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor → (values, levels of nesting)
    added = 0

    def path() -> Loc:
        return tuple(
            refs.restore(key) if isinstance(key, str) else key
            for is_mapping, key, in_value in frames
            if ((in_value and isinstance(key, str)) if is_mapping else key >= 0)
        )

    def consumed_value() -> None:
        if frames:
            top = frames[-1]
            if top[0]:
                top[2] = not top[2]

    def count(values: int, depth: int) -> None:
        if sizes:
            sizes[-1][0] += values
            sizes[-1][1] = max(sizes[-1][1], depth)

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark is not None else None
            top = frames[-1] if frames else None
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if len(frames) >= MAX_DEPTH:
                    message = f"more than {MAX_DEPTH} levels of nesting"
                    raise _fail(path()[:4], message, file, line)  # where the nesting starts
                if top is not None and not top[0]:
                    top[1] += 1
                frames.append([isinstance(event, yaml.MappingStartEvent), -1, False])
                sizes.append([1, 0, event.anchor])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                frames.pop()
                values, depth, anchor = sizes.pop()
                if anchor is not None:
                    anchors[anchor] = (values, depth + 1)
                count(values, depth + 1)
                consumed_value()
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                if isinstance(event, yaml.AliasEvent):
                    name = str(event.anchor)
                    if any(size[2] == name for size in sizes):
                        message = f"the alias *{name} is inside the value it names"
                        raise _fail(path(), message, file, line)
                    if name not in anchors:
                        message = f"invalid YAML: found undefined alias {name!r}"
                        raise _fail(path(), message, file, line)
                    values, depth = anchors[name]
                    added += values
                    if added > ALIAS_BUDGET:
                        message = (
                            f"aliases expand the file by more than {ALIAS_BUDGET} values; "
                            "write the repeated values out or use fewer aliases"
                        )
                        raise _fail(path(), message, file, line)
                    if len(frames) + depth > MAX_DEPTH:
                        message = f"the alias *{name} nests more than {MAX_DEPTH} levels deep"
                        raise _fail(path()[:4], message, file, line)
                    count(values, depth)
                else:
                    if event.anchor is not None:
                        anchors[event.anchor] = (1, 0)
                    count(1, 0)
                if top is None:
                    continue
                if not top[0]:
                    top[1] += 1
                elif not top[2]:
                    top[1] = getattr(event, "value", None)
                    top[2] = True
                else:
                    top[2] = False
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise _fail(path(), f"invalid YAML: {exc.problem or 'invalid YAML'}", file, line) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        character = f"U+{exc.character:04X}" if isinstance(exc.character, int) else "a byte"
        message = f"invalid YAML: the character {character} is not allowed in a YAML file"
        raise _fail(path(), message, file, line) from None


def read_yaml(text: str, file: str | None, env: Mapping[str, str]) -> Document:
    refs = _References(text)
    _scan(refs.text, file, refs)
    reader = _Reader(file, env, refs)
    try:
        node = yaml.compose(refs.text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:  # an anchor defined twice
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise _fail((), f"invalid YAML: {exc.problem}", file, line) from None
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
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc.strerror}", str(source))]) from None
    return read_bytes(data, str(source), env)


def read_bytes(data: bytes, source: str, env: Mapping[str, str] | None) -> Document:
    """A config's bytes, read as the file ``source`` (named in messages)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start : exc.start + 1].hex()
        message = f"not UTF-8: the byte 0x{byte} cannot be read; save the file as UTF-8"
        raise ConfigError([ConfigIssue("", message, str(source), line)]) from None
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
