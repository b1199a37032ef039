"""The docs keep up with the code: every config key and every problem type is documented."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from plangate.config import _models
from plangate.engine._problems import PROBLEM_BASE, TITLES

DOCS = Path(__file__).parents[2] / "docs"

# Models the catalog builder reads from untyped values (plan entitlements, route costs), so
# they cannot be found by walking ConfigModel's annotations: where config.md documents them.
UNTYPED_SECTIONS: dict[type[BaseModel], str] = {
    _models.LimitSpec: "plans.NAME.features.METER",
    _models.CreditGrantSpec: "plans.NAME.features.CREDITS",
    _models.AddonGrantSpec: "addons.NAME.features.FEATURE",
    _models.HeaderCost: "routes[].meters.METER",
}


def _models_in(annotation: typing.Any) -> list[tuple[str, type[BaseModel]]]:
    """The models an annotation holds, each with the suffix its values add to a key path."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return [(".NAME" + suffix, model) for suffix, model in _models_in(args[1])]
    if origin is list:
        return [("[]" + suffix, model) for suffix, model in _models_in(args[0])]
    return [found for arg in args for found in _models_in(arg)]


def _sections_of_config_model() -> dict[type[BaseModel], str]:
    """Each model reachable from ConfigModel, with its key path (``identity.jwt``)."""
    sections: dict[type[BaseModel], str] = {_models.ConfigModel: ""}
    todo: list[tuple[str, type[BaseModel]]] = [("", _models.ConfigModel)]
    while todo:
        path, model = todo.pop()
        for name, field in model.model_fields.items():
            for suffix, nested in _models_in(field.annotation):
                if nested not in sections:
                    nested_path = f"{path}.{name}{suffix}" if path else f"{name}{suffix}"
                    sections[nested] = nested_path
                    todo.append((nested_path, nested))
    return sections


def _sections(text: str) -> dict[str, str]:
    """Markdown heading line → the text under it, up to the next heading."""
    found: dict[str, str] = {}
    heading, body = "", []
    for line in text.splitlines():
        if line.startswith("#"):
            found[heading] = "\n".join(body)
            heading, body = line, []
        else:
            body.append(line)
    found[heading] = "\n".join(body)
    return found


def test_every_model_of_the_config_has_a_section_in_the_reference():
    defined = {
        obj
        for obj in vars(_models).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == _models.__name__
        and obj.model_fields
    }
    documented = set(_sections_of_config_model()) | set(UNTYPED_SECTIONS)
    assert defined <= documented, (
        f"models without a place in docs/config.md: {sorted(m.__name__ for m in defined - documented)}"
    )


def test_config_reference_documents_every_field_of_every_model():
    sections = _sections((DOCS / "config.md").read_text(encoding="utf-8"))
    places = {**_sections_of_config_model(), **UNTYPED_SECTIONS}
    missing = []
    for model, path in places.items():
        heading = "## Top-level keys" if model is _models.ConfigModel else None
        if heading is None:
            matches = [h for h in sections if re.fullmatch(rf"#+ `{re.escape(path)}`", h)]
            assert matches, f"docs/config.md has no heading `{path}` for {model.__name__}"
            heading = matches[0]
        body = sections[heading]
        for field in model.model_fields:
            if not re.search(rf"^\| `{re.escape(field)}` \|", body, re.MULTILINE):
                missing.append(f"{path or '(top level)'}.{field}")
    assert not missing, f"docs/config.md has no table row for: {', '.join(missing)}"


def test_http_page_documents_every_problem_type_with_its_uri_and_status():
    text = (DOCS / "http.md").read_text(encoding="utf-8")
    for name, (status, title) in TITLES.items():
        uri = PROBLEM_BASE + name
        rows = [line for line in text.splitlines() if line.startswith("|") and f"`{uri}`" in line]
        assert rows, f"docs/http.md: no table row with the type URI {uri}"
        assert any(str(status) in row and title in row for row in rows), (
            f"docs/http.md: the row of {uri} must give status {status} and title {title!r}"
        )


def _rows(body: str) -> dict[str, list[str]]:
    """Table rows of a section: the key in the first column → every column."""
    rows = {}
    for line in body.splitlines():
        match = re.match(r"^\| `([^`]+)` \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    return rows


def _documented_default(value: typing.Any) -> str | None:
    """How config.md writes a simple default, in YAML terms; None for defaults it describes."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return None
    if isinstance(value, (int, float, str)):
        return f"`{value}`"
    return None


def test_config_reference_rows_match_the_models_required_keys_and_defaults():
    sections = _sections((DOCS / "config.md").read_text(encoding="utf-8"))
    places = {**_sections_of_config_model(), **UNTYPED_SECTIONS}
    wrong = []
    for model, path in places.items():
        if model is _models.ConfigModel:
            heading = "## Top-level keys"
        else:
            heading = next(h for h in sections if re.fullmatch(rf"#+ `{re.escape(path)}`", h))
        rows = _rows(sections[heading])
        stale = set(rows) - set(model.model_fields)
        wrong += [f"{path or '(top level)'}.{key}: no such key" for key in sorted(stale)]
        for name, field in model.model_fields.items():
            cells = rows.get(name)
            if cells is None or len(cells) < 3:
                continue
            default = cells[2]
            where = f"{path or '(top level)'}.{name}"
            if field.is_required():
                if default != "required":
                    wrong.append(f"{where}: required, but documented with default {default}")
                continue
            if default == "required":
                wrong.append(f"{where}: optional, but documented as required")
                continue
            expected = _documented_default(field.default)
            if expected is not None and expected not in default:
                wrong.append(f"{where}: the default is {expected}, documented as {default}")
    assert not wrong, "docs/config.md disagrees with the models:\n" + "\n".join(wrong)
