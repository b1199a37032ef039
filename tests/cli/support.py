"""What the CLI tests share: running ``plangate`` in this process."""

from __future__ import annotations

import pytest

from plangate.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``plangate ARGV`` in this process: exit status, stdout, stderr (argparse's errors
    exit through SystemExit, as the console script does)."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err
