"""The docs' code blocks work: configs load, Python compiles and imports, commands parse.

Every fenced block of docs/**/*.md and README.md is read; each test is parametrized per block
with the id ``FILE:LINE`` (the line of the block's opening fence), so a failure names it.

- ```yaml: every block is YAML. A block holding a complete config (a top-level ``version:``)
  loads with ``plangate.config.load_config``; the others are fragments of a config (or of a
  gateway's), counted but not loaded.
- ```python: every block compiles (top-level ``await`` allowed: the snippets run inside a
  handler); its imports of plangate, the adapters and the frameworks they name resolve, and
  its calls of what it imported bind to the callee's signature.
- ```sh / ```bash / ```shell / ```console: every ``plangate ...`` command, and each
  ``$(plangate ...)`` in a command, is parsed by the CLI's own parser (never run).

Nothing is skipped by a marker: a snippet may use names it does not define (``app``, ``gate``),
but what it does write must be right.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from plangate import cli
from plangate.config import load_config

ROOT = Path(__file__).parents[2]
FILES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
SHELLS = {"sh", "bash", "shell", "console"}
# Imports checked: plangate's own modules and those of the libraries it integrates with.
# Anything else a snippet imports (redis, a project's own module) is not this test's business.
CHECKED_IMPORTS = {
    "plangate",
    "plangate_fastapi",
    "plangate_flask",
    "plangate_django",
    "starlette",
    "fastapi",
    "flask",
    "django",
    "prometheus_client",
    "opentelemetry",
}
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${VAR}; ${VAR:-default} needs none
SUBSTITUTION = re.compile(r"\$\((plangate [^()]*)\)")  # $(plangate token ...)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def _blocks(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file, indented ones (in a list) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        lang = opening["info"].split()[0].lower() if opening["info"].split() else ""
        yield Block(path, i + 1, lang, "\n".join(body) + "\n")
        i = j + 1


BLOCKS = [block for path in FILES for block in _blocks(path)]


def _of(*langs: str) -> list[Block]:
    return [block for block in BLOCKS if block.lang in langs]


def _params(blocks: list[Block]) -> list[object]:
    return [pytest.param(block, id=block.id) for block in blocks]


# YAML -------------------------------------------------------------------------------------


YAML_BLOCKS = _of("yaml", "yml")


def _is_complete_config(block: Block) -> bool:
    data = yaml.safe_load(block.text)
    return isinstance(data, dict) and "version" in data


CONFIGS = [block for block in YAML_BLOCKS if _is_complete_config(block)]


@pytest.mark.parametrize("block", _params(YAML_BLOCKS))
def test_yaml_block_parses(block: Block) -> None:
    yaml.safe_load(block.text)


@pytest.mark.parametrize("block", _params(CONFIGS))
def test_complete_config_loads(block: Block, tmp_path: Path) -> None:
    # ${VAR} with no default needs a value; a JWT secret needs 32 bytes or more
    env = {
        name: f"{name.lower()}-set-by-the-docs-test-0123456789"
        for name in ENV_REF.findall(block.text)
    }
    file = tmp_path / "plangate.yaml"
    file.write_text(block.text, encoding="utf-8")
    load_config(file, env=env)


def test_the_docs_hold_complete_configs() -> None:
    # the configs are told from fragments by `version:`: a test that found none checked nothing
    assert len(CONFIGS) >= 2, [block.id for block in CONFIGS]
    assert len(YAML_BLOCKS) > len(CONFIGS)


# Python -----------------------------------------------------------------------------------


PYTHON_BLOCKS = _of("python", "py")


def _parse(block: Block) -> ast.Module:
    tree = compile(
        block.text,
        block.id,
        "exec",
        flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        dont_inherit=True,
    )
    assert isinstance(tree, ast.Module)
    return tree


@pytest.mark.parametrize("block", _params(PYTHON_BLOCKS))
def test_python_block_compiles(block: Block) -> None:
    compile(_parse(block), block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _imports(tree: ast.Module) -> Iterator[tuple[str, str | None]]:
    """(module, name) for each name imported from a checked module; name None for ``import``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in CHECKED_IMPORTS:
                    yield alias.name, None
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in CHECKED_IMPORTS
        ):
            for alias in node.names:
                yield node.module, alias.name


IMPORTING = [block for block in PYTHON_BLOCKS if any(_imports(_parse(block)))]


@pytest.mark.parametrize("block", _params(IMPORTING))
def test_python_block_imports_resolve(block: Block) -> None:
    missing = []
    for module_name, name in _imports(_parse(block)):
        module = importlib.import_module(module_name)
        if name is None or name == "*" or hasattr(module, name):
            continue
        try:  # `from package import submodule`
            importlib.import_module(f"{module_name}.{name}")
        except ModuleNotFoundError:
            missing.append(f"from {module_name} import {name}")
    assert not missing, missing


@pytest.mark.parametrize("block", _params(IMPORTING))
def test_python_block_calls_bind(block: Block) -> None:
    # a call of an imported name passes arguments its signature takes (a renamed keyword, one
    # positional too many); the values are not checked
    tree = _parse(block)
    imported: dict[str, object] = {}
    for module_name, name in _imports(tree):
        module = importlib.import_module(module_name)
        if name is not None and hasattr(module, name):
            imported[name] = getattr(module, name)
    wrong = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        target = imported.get(node.func.id)
        if target is None or not callable(target):
            continue
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            continue
        keywords = [keyword.arg for keyword in node.keywords]
        if None in keywords:  # **kwargs
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without one
            continue
        try:
            signature.bind(*node.args, **{name: None for name in keywords if name is not None})
        except TypeError as exc:
            wrong.append(f"line {node.lineno}: {node.func.id}{signature}: {exc}")
    assert not wrong, wrong


def test_the_docs_hold_python_that_imports_plangate() -> None:
    assert len(IMPORTING) >= 10, [block.id for block in IMPORTING]


# Shell ------------------------------------------------------------------------------------


SHELL_BLOCKS = _of(*SHELLS)


def _commands(block: Block) -> list[str]:
    """The block's commands, continuation lines joined. In a transcript (a line starts with
    ``$ ``) only the prompted lines are commands: the rest is what they printed."""
    lines = block.text.replace("\\\n", " ").splitlines()
    if any(line.startswith("$ ") for line in lines):
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _plangate_commands(command: str) -> Iterator[list[str]]:
    """The argv (after ``plangate``) of each plangate invocation in a shell command line."""
    for inner in SUBSTITUTION.findall(command):
        yield from _plangate_commands(inner)
    command = SUBSTITUTION.sub("SUBSTITUTED", command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set(";&|"):  # a control operator ends a command
            if words[:1] == ["plangate"]:
                yield words[1:]
            words = []
        else:
            words.append(word)


def _argv(block: Block) -> list[list[str]]:
    return [argv for command in _commands(block) for argv in _plangate_commands(command)]


CLI_BLOCKS = [block for block in SHELL_BLOCKS if _argv(block)]


@pytest.mark.parametrize("block", _params(CLI_BLOCKS))
def test_plangate_commands_parse(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in _argv(block):
        words = list(argv)
        if words[:2] == ["usage", "export"]:  # as plangate.cli.main rewrites it
            words[:2] = ["usage-export"]
        try:
            args = cli._parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"plangate {shlex.join(argv)}: {capsys.readouterr().err.strip()}")
        assert hasattr(args, "run"), f"plangate {shlex.join(argv)}: no command"


def test_the_docs_hold_plangate_commands() -> None:
    assert sum(len(_argv(block)) for block in CLI_BLOCKS) >= 10, [b.id for b in CLI_BLOCKS]


def test_every_block_has_a_language() -> None:
    # an untagged block is neither highlighted nor checked here: diagrams are `text`
    assert not [block.id for block in BLOCKS if not block.lang]
