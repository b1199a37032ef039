"""Every broken config in ``invalid/`` fails with exactly the message its header states.

Each file starts with one ``# expect: MESSAGE`` line per issue, in order, where ``{file}``
stands for the path given to ``load_config``. A ``# xfail: REASON`` line after them marks a
file whose expected message is the correct behaviour that the loader does not give yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plangate import cli
from plangate.config import load_config
from plangate.errors import ConfigError
from tests.support import REFERENCE

INVALID = Path(__file__).parent / "invalid"
# An explicit environment, so that the machine's variables never leak into a test.
ENV: dict[str, str] = {}
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def _example() -> Path:
    return REFERENCE


def _header(path: Path) -> tuple[list[str], str | None]:
    expected: list[str] = []
    reason = None
    # Some files are broken below their header on purpose (a NUL, bytes that are not UTF-8).
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if line.startswith("# expect: "):
            expected.append(line.removeprefix("# expect: "))
        elif line.startswith("# xfail: "):
            reason = line.removeprefix("# xfail: ")
        else:
            break
    return expected, reason


def _cases() -> Iterator[Any]:
    for path in sorted(INVALID.glob("*.yaml")):
        _, reason = _header(path)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(path, id=path.stem, marks=marks)


def _expected_message(path: Path) -> str:
    expected, _ = _header(path)
    return "\n".join(line.replace("{file}", str(path)) for line in expected)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plangate.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("path", list(_cases()))
def test_invalid_config_fails_with_the_expected_message(path: Path) -> None:
    expected = _expected_message(path)
    assert expected, f"{path.name} must start with '# expect: MESSAGE' lines"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env=ENV)
    assert str(caught.value) == expected


def test_invalid_directory_covers_many_failure_modes() -> None:
    assert len(list(INVALID.glob("*.yaml"))) >= 30


def test_error_lists_one_issue_per_expected_line() -> None:
    path = INVALID / "several_reference_errors.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env=ENV)
    assert [str(issue) for issue in caught.value.issues] == _expected_message(path).split("\n")


def test_issue_carries_file_line_path_and_message() -> None:
    path = INVALID / "bad_duration.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env=ENV)
    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.path) == (
        str(path),
        15,
        "plans.pro.features.api_calls.window",
    )
    assert issue.message.startswith("invalid duration '1x': ")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_key_path_of_a_union_field_names_only_the_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "version: 1\n"
        "identity:\n"
        "  jwt:\n"
        "    algorithms: [HS256]\n"
        f"    secret: {SECRET}\n"
        "    audience: 5\n"
        "    customer_claim: org_id\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV)
    assert {issue.path for issue in caught.value.issues} == {"identity.jwt.audience"}


def test_malformed_variable_reference_is_an_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "version: 1\n"
        "identity:\n"
        "  jwt:\n"
        "    algorithms: [HS256]\n"
        "    secret: ${JWT-SECRET}\n"
        "    customer_claim: org_id\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV)
    assert [issue.path for issue in caught.value.issues] == ["identity.jwt.secret"]


# plangate check ------------------------------------------------------------------------


def test_check_exits_1_and_prints_the_error_to_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = INVALID / "bad_duration.yaml"
    assert cli.main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == _expected_message(path) + "\n"
    assert captured.out == ""


def test_check_exits_0_for_the_reference_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = str(_example())
    assert cli.main(["check", path]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: ok — 5 features, 4 plans, 4 routes\n")
    assert captured.err == ""
