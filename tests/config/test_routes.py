"""Route templates (``parse_template``) and the first-match-wins ``Router``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plangate.config._routes import Router, parse_template, shadowed


def _router(*templates: str) -> Router:
    return Router([parse_template(text) for text in templates])


# parse_template ------------------------------------------------------------------------


def test_template_with_one_method() -> None:
    template = parse_template("POST /v1/completions")
    assert (template.methods, template.path, template.params) == (
        ("POST",),
        "/v1/completions",
        (),
    )


def test_template_with_several_methods() -> None:
    assert parse_template("GET|HEAD /items").methods == ("GET", "HEAD")


def test_template_without_method_has_no_methods() -> None:
    assert parse_template("/items").methods == ()


def test_template_lists_its_parameters_in_order() -> None:
    template = parse_template("GET /orgs/{org}/files/{rest:path}")
    assert template.params == ("org", "rest")


def test_template_ignores_surrounding_whitespace() -> None:
    assert parse_template("  GET   /items  ") == parse_template("GET /items")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "expected 'METHOD /path' or '/path', got ''", id="empty"),
        pytest.param(
            "GET /a extra",
            "expected 'METHOD /path' or '/path', got 'GET /a extra'",
            id="three-parts",
        ),
        pytest.param(
            "get /a",
            "invalid methods 'get': use upper-case names joined by |, such as GET or GET|HEAD",
            id="lower-case-method",
        ),
        pytest.param(
            "GET||HEAD /a",
            "invalid methods 'GET||HEAD': use upper-case names joined by |, such as GET or GET|HEAD",
            id="empty-method",
        ),
        pytest.param(
            "GET,HEAD /a",
            "invalid methods 'GET,HEAD': use upper-case names joined by |, such as GET or GET|HEAD",
            id="comma-methods",
        ),
        pytest.param("GET items", "the path must start with /, got 'items'", id="relative-path"),
        pytest.param("GET", "the path must start with /, got 'GET'", id="method-only"),
        pytest.param("/a/{id", "unbalanced braces in '/a/{id'", id="unclosed-brace"),
        pytest.param("/a/id}", "unbalanced braces in '/a/id}'", id="stray-close-brace"),
        pytest.param("/a/{{id}", "unbalanced braces in '/a/{{id}'", id="double-open-brace"),
        pytest.param("/a/{id}}", "unbalanced braces in '/a/{id}}'", id="double-close-brace"),
        pytest.param("/a/{}", "invalid parameter name '' in '/a/{}'", id="empty-name"),
        pytest.param("/a/{1st}", "invalid parameter name '1st' in '/a/{1st}'", id="digit-name"),
        pytest.param(
            "/a/{report-id}",
            "invalid parameter name 'report-id' in '/a/{report-id}'",
            id="dash-name",
        ),
        pytest.param(
            "/a/{id}/b/{id}", "parameter 'id' appears twice in '/a/{id}/b/{id}'", id="repeated-name"
        ),
        pytest.param(
            "/a/{id:int}",
            "unknown parameter type 'int' in '/a/{id:int}': use {name} or {name:path}",
            id="unknown-type",
        ),
        pytest.param(
            "/files/{rest:path}/meta",
            "{rest:path} must end the path in '/files/{rest:path}/meta'",
            id="path-not-last",
        ),
    ],
)
def test_invalid_template_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_template(text)


# Router: methods ------------------------------------------------------------------------


def test_method_template_matches_its_method() -> None:
    assert _router("POST /v1/completions").match("POST", "/v1/completions") == (0, {})


def test_method_template_refuses_other_methods() -> None:
    assert _router("POST /v1/completions").match("GET", "/v1/completions") is None


def test_get_or_head_matches_get() -> None:
    assert _router("GET|HEAD /items").match("GET", "/items") == (0, {})


def test_get_or_head_matches_head() -> None:
    assert _router("GET|HEAD /items").match("HEAD", "/items") == (0, {})


def test_get_matches_head_because_frameworks_answer_head_with_the_get_handler() -> None:
    assert _router("GET /items/{id}").match("HEAD", "/items/7") == (0, {"id": "7"})


def test_head_alone_does_not_match_get() -> None:
    assert _router("HEAD /items").match("GET", "/items") is None


def test_get_or_head_refuses_post() -> None:
    assert _router("GET|HEAD /items").match("POST", "/items") is None


@pytest.mark.parametrize("method", ["GETX", "GE", "XGET"])
def test_method_must_match_whole(method: str) -> None:
    assert _router("GET /items").match(method, "/items") is None


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_template_without_method_matches_any_method(method: str) -> None:
    assert _router("/items").match(method, "/items") == (0, {})


# Router: paths and parameters -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/items/", "/items/7", "/item", "/v1/items"])
def test_literal_path_must_match_whole(path: str) -> None:
    assert _router("GET /items").match("GET", path) is None


def test_parameter_captures_one_segment() -> None:
    assert _router("POST /v1/reports/{id}/export").match("POST", "/v1/reports/42/export") == (
        0,
        {"id": "42"},
    )


def test_parameter_does_not_cross_a_slash() -> None:
    assert _router("GET /v1/reports/{id}").match("GET", "/v1/reports/4/2") is None


def test_parameter_does_not_match_an_empty_segment() -> None:
    assert _router("GET /v1/reports/{id}/export").match("GET", "/v1/reports//export") is None


def test_several_parameters_are_all_captured() -> None:
    assert _router("GET /orgs/{org}/projects/{project}").match("GET", "/orgs/acme/projects/p1") == (
        0,
        {"org": "acme", "project": "p1"},
    )


def test_path_parameter_captures_the_rest_with_slashes() -> None:
    assert _router("/v1/{rest:path}").match("GET", "/v1/a/b/c.txt") == (0, {"rest": "a/b/c.txt"})


def test_path_parameter_matches_the_empty_rest() -> None:
    assert _router("/v1/{rest:path}").match("GET", "/v1/") == (0, {"rest": ""})


def test_path_parameter_still_needs_its_prefix() -> None:
    assert _router("/v1/{rest:path}").match("GET", "/v2/a") is None


@pytest.mark.parametrize(
    ("template", "same", "different"),
    [
        pytest.param("/a.b", "/a.b", "/aXb", id="dot"),
        pytest.param("/a+b", "/a+b", "/aab", id="plus"),
        pytest.param("/a*", "/a*", "/aaa", id="star"),
        pytest.param("/(x)", "/(x)", "/x", id="parentheses"),
        pytest.param("/[ab]", "/[ab]", "/a", id="brackets"),
        pytest.param("/a?b", "/a?b", "/b", id="question-mark"),
        pytest.param("/a|b", "/a|b", "/b", id="bar"),
        pytest.param("/^a$", "/^a$", "/a", id="anchors"),
        pytest.param("/a\\d", "/a\\d", "/a1", id="backslash"),
    ],
)
def test_regex_metacharacters_in_a_literal_path_are_literal(
    template: str, same: str, different: str
) -> None:
    router = _router(template)
    assert (router.match("GET", same), router.match("GET", different)) == ((0, {}), None)


# Router: order --------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    router = _router("GET /v1/projects", "/v1/{rest:path}")
    assert router.match("GET", "/v1/projects") == (0, {})


def test_later_rule_applies_when_earlier_ones_do_not_match() -> None:
    router = _router("GET /v1/projects", "/v1/{rest:path}")
    assert router.match("POST", "/v1/projects") == (1, {"rest": "projects"})


def test_broad_rule_first_shadows_a_narrow_one() -> None:
    router = _router("/v1/{rest:path}", "GET /v1/projects")
    assert router.match("GET", "/v1/projects") == (0, {"rest": "projects"})


def test_parameters_come_from_the_rule_that_matched() -> None:
    # The first rule matches a prefix of the request and captures x before failing.
    router = _router("GET /a/{x}/{y}", "POST /a/{x}", "/a/{x}/z")
    assert router.match("PUT", "/a/b/z") == (2, {"x": "b"})


def test_rules_may_reuse_parameter_names() -> None:
    router = _router("GET /a/{id}", "POST /b/{id}")
    assert router.match("POST", "/b/7") == (1, {"id": "7"})


def test_no_matching_rule_gives_none() -> None:
    assert _router("GET /health", "POST /v1/{rest:path}").match("GET", "/v2/x") is None


def test_router_without_rules_matches_nothing() -> None:
    assert Router([]).match("GET", "/") is None


# Router: segments that mix text and parameters -----------------------------------------


def test_parameter_beside_text_in_one_segment() -> None:
    router = _router("GET /files/{name}.json")
    assert (router.match("GET", "/files/a.b.json"), router.match("GET", "/files/.json")) == (
        (0, {"name": "a.b"}),
        None,
    )


def test_two_parameters_in_one_segment_split_as_a_regex_would() -> None:
    assert _router("/v/{a}-{b}").match("GET", "/v/x-y-z") == (0, {"a": "x-y", "b": "z"})


def test_path_parameter_after_text_in_its_segment() -> None:
    router = _router("/static/v{rest:path}")
    assert (router.match("GET", "/static/v2/app.js"), router.match("GET", "/static/x")) == (
        (0, {"rest": "2/app.js"}),
        None,
    )


def test_path_parameter_needs_its_segment_to_exist() -> None:
    assert _router("/v1/{rest:path}").match("GET", "/v1") is None


def test_path_parameter_captures_newlines() -> None:
    assert _router("/v1/{rest:path}").match("GET", "/v1/a\nb") == (0, {"rest": "a\nb"})


def test_parameter_rule_before_a_literal_rule_wins() -> None:
    router = _router("GET /items/{id}", "GET /items/new")
    assert router.match("GET", "/items/new") == (0, {"id": "new"})


def test_literal_rule_before_a_parameter_rule_wins() -> None:
    router = _router("GET /items/new", "GET /items/{id}")
    assert router.match("GET", "/items/new") == (0, {})


def test_rule_for_any_method_keeps_its_place_among_method_rules() -> None:
    router = _router("POST /a", "/a", "GET /a")
    assert [router.match(m, "/a") for m in ("POST", "GET", "PATCH")] == [(0, {}), (1, {}), (1, {})]


@pytest.mark.parametrize("path", ["", "*", "a/b"])
def test_path_without_a_leading_slash_matches_nothing(path: str) -> None:
    assert _router("/a/{x}", "/{rest:path}").match("GET", path) is None


@pytest.mark.parametrize("method", ["", "GET /a", "G T"])
def test_a_method_that_is_not_a_token_matches_nothing(method: str) -> None:
    assert _router("/{rest:path}", "GET /a{x:path}").match(method, "/a") is None


# Router: agrees with one regex per rule, tried in order ---------------------------------


def _reference(templates: list[str], method: str, path: str) -> tuple[int, dict[str, str]] | None:
    """The first rule, in order, whose method list and path regex match: the definition."""
    for index, text in enumerate(templates):
        template = parse_template(text)
        methods = set(template.methods)
        if "GET" in methods:
            methods.add("HEAD")
        if methods and method not in methods:
            continue
        regex, pos = "", 0
        for param in re.finditer(r"\{(\w+)(:path)?\}", template.path):
            regex += re.escape(template.path[pos : param.start()])
            regex += f"(?P<{param[1]}>.*)" if param[2] else f"(?P<{param[1]}>[^/]+)"
            pos = param.end()
        found = re.fullmatch(regex + re.escape(template.path[pos:]), path, re.DOTALL)
        if found is not None:
            return index, found.groupdict()
    return None


_TEXT = st.sampled_from(["a", "b", "ab", "", "a.b", "a-b"])


@st.composite
def _template(draw: st.DrawFn) -> str:
    segments = []
    for depth in range(draw(st.integers(0, 4))):
        shape = draw(st.sampled_from(["text", "text", "param", "mixed", "pair"]))
        if shape == "text":
            segments.append(draw(_TEXT))
        elif shape == "param":
            segments.append(f"{{p{depth}}}")
        elif shape == "mixed":
            segments.append(f"{draw(_TEXT)}{{p{depth}}}{draw(_TEXT)}")
        else:
            segments.append(f"{{p{depth}}}-{{q{depth}}}")
    tail = draw(st.sampled_from(["", "", "{rest:path}", "a{rest:path}", "{p9}.{rest:path}"]))
    if tail:
        segments.append(tail)
    methods = draw(st.sampled_from(["", "", "GET ", "POST ", "GET|HEAD ", "HEAD ", "PUT|POST "]))
    return methods + "/" + "/".join(segments)


_PATH = st.lists(
    st.sampled_from(["a", "b", "ab", "", "a.b", "a-b", "b-a-b", "x", "aab", "a\nb"]), max_size=6
).map(lambda segments: "/" + "/".join(segments))
_METHOD = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"])


@settings(max_examples=500)
@given(templates=st.lists(_template(), max_size=12), method=_METHOD, path=_PATH)
def test_router_agrees_with_the_first_matching_regex(
    templates: list[str], method: str, path: str
) -> None:
    router = Router([parse_template(text) for text in templates])
    assert router.match(method, path) == _reference(templates, method, path)


@settings(max_examples=300)
@given(
    templates=st.lists(_template(), min_size=1, max_size=12),
    method=_METHOD,
    pick=st.integers(0),
    fill=st.lists(st.sampled_from(["a", "b", "a-b", "x/y", "", "a.b"]), min_size=12, max_size=12),
)
def test_router_agrees_on_paths_made_from_the_rules(
    templates: list[str], method: str, pick: int, fill: list[str]
) -> None:
    # Paths drawn at random rarely fit a rule: fill one rule's parameters instead.
    path = parse_template(templates[pick % len(templates)]).path
    values = iter(fill)
    path = re.sub(r"\{[^}]*\}", lambda _: next(values), path)
    router = Router([parse_template(text) for text in templates])
    assert router.match(method, path) == _reference(templates, method, path)


# shadowed: rules that earlier rules match entirely ---------------------------------------


def _shadowed(*templates: str) -> dict[int, tuple[int, ...]]:
    return shadowed([parse_template(text) for text in templates])


@pytest.mark.parametrize(
    ("templates", "expected"),
    [
        pytest.param(["/v1/{rest:path}", "GET /v1/projects"], {1: (0,)}, id="catch-all-first"),
        pytest.param(["GET /a", "HEAD /a"], {1: (0,)}, id="get-covers-head"),
        pytest.param(["GET /a", "POST /a", "GET|POST /a"], {2: (0, 1)}, id="methods-together"),
        pytest.param(["GET /a", "/a"], {}, id="any-method-after-one"),
        pytest.param(["/items/{id}", "/items/new"], {1: (0,)}, id="parameter-first"),
        pytest.param(["/items/new", "/items/{id}"], {}, id="literal-first"),
        pytest.param(["/items/{id}", "/items/"], {}, id="empty-segment"),
        pytest.param(["/files/{name}.json", "/files/a.json"], {1: (0,)}, id="mixed-segment"),
        pytest.param(["/files/{a}.json", "/files/{b}.json"], {1: (0,)}, id="same-shape"),
        pytest.param(["/s/v{rest:path}", "/s/v2/app.js"], {1: (0,)}, id="tail-prefix"),
        pytest.param(["/s/v{rest:path}", "/s/x"], {}, id="tail-prefix-differs"),
        pytest.param(["/{a}/{b}", "POST /x/{c}"], {1: (0,)}, id="parameters"),
        pytest.param(["/v1/{rest:path}", "/v1/{x:path}"], {1: (0,)}, id="same-tail"),
        pytest.param(["/v1/{x}", "/v1/{rest:path}"], {}, id="tail-after-one-segment"),
        pytest.param(["/v1/{rest:path}", "/v1"], {}, id="tail-needs-its-segment"),
    ],
)
def test_shadowed_rules(templates: list[str], expected: dict[int, tuple[int, ...]]) -> None:
    assert _shadowed(*templates) == expected


@settings(max_examples=500)
@given(
    templates=st.lists(_template(), min_size=2, max_size=10),
    method=_METHOD,
    pick=st.integers(0),
    fill=st.lists(st.sampled_from(["a", "b", "a-b", "x/y", "", "a.b"]), min_size=12, max_size=12),
)
def test_a_rule_reported_shadowed_never_matches_first(
    templates: list[str], method: str, pick: int, fill: list[str]
) -> None:
    found = _shadowed(*templates)
    for index, earlier in found.items():
        assert all(i < index for i in earlier)
    if not found:
        return
    index = sorted(found)[pick % len(found)]
    values = iter(fill)
    path = re.sub(r"\{[^}]*\}", lambda _: next(values), parse_template(templates[index]).path)
    if _reference([templates[index]], method, path) is not None:
        first = _reference(templates, method, path)
        assert first is not None
        assert first[0] < index
