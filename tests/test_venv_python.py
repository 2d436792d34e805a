"""
tools/venv-python: the interpreter `make` builds the virtualenv with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "venv-python"


def _stub(tmp_path: Path, name: str, status: int) -> str:
    """
    An "interpreter" whose suitability check exits with C{status}.
    """
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nexit {status}\n")
    path.chmod(0o755)
    return str(path)


def _pick(*candidates: str) -> str:
    return subprocess.run(
        [str(SCRIPT), *candidates], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_first_suitable_candidate(tmp_path: Path) -> None:
    """
    Candidates that fail the check (too old, no venv) or do not exist are
    passed over; the first that passes is the one.
    """
    old = _stub(tmp_path, "old", 1)
    good = _stub(tmp_path, "good", 0)
    later = _stub(tmp_path, "later", 0)
    assert _pick(str(tmp_path / "missing"), old, good, later) == good


def test_none_suitable_falls_back_to_python3(tmp_path: Path) -> None:
    assert _pick(_stub(tmp_path, "old", 1), str(tmp_path / "missing")) == "python3"


def test_check_asks_for_311_and_venv(tmp_path: Path) -> None:
    """
    The check a candidate runs: version 3.11 or newer, with venv and
    ensurepip importable (Debian ships the last two in a separate package).
    """
    record = tmp_path / "args"
    path = tmp_path / "py"
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 0\n')
    path.chmod(0o755)
    assert _pick(str(path)) == str(path)
    flag, code = record.read_text().splitlines()
    assert flag == "-c"
    assert "import sys, ensurepip, venv" in code
    assert "sys.version_info < (3, 11)" in code


def test_makefile_builds_the_venv_with_it(tmp_path: Path) -> None:
    """
    `make` creates the virtualenv with what the script prints, unless
    PYTHON is given.
    """
    venv = tmp_path / "venv"

    def dry(*extra: str) -> str:
        return subprocess.run(
            ["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *extra, f"{venv}/bin/python"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()[0]

    assert dry() == f"{_pick()} -m venv {venv}"
    assert dry("PYTHON=/opt/other/python3") == f"/opt/other/python3 -m venv {venv}"
