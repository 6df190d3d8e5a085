"""The public API as a type checker sees it: mypy, in a child interpreter,
on tests/typing/usage.py (see there)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("mypy")


@pytest.mark.timeout(300)
def test_the_type_checker_checks_task_arguments_and_results(tmp_path):
    usage = os.path.join(ROOT, "tests", "typing", "usage.py")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--no-error-summary",
            "--follow-imports",
            "silent",  # (the package is checked on its own terms: see pyproject.toml)
            "--cache-dir",
            str(tmp_path / "cache"),
            "--python-version",
            "3.10",
            usage,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, MYPYPATH=ROOT),
        timeout=280,
    )
    assert r.returncode == 0, r.stdout + r.stderr
