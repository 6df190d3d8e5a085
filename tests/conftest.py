"""Shared fixtures: every test must leave no process of ours behind."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, but multiprocessing's long-lived helpers.

    The forkserver and the resource tracker live as long as the test process
    by design; a forkserver's *children* are ours and are counted.
    """
    out: list[int] = []
    todo = [pid]
    while todo:
        for kid in _children_of(todo.pop()):
            todo.append(kid)
            cmd = _cmdline(kid)
            if "forkserver" in cmd or "resource_tracker" in cmd:
                continue
            out.append(kid)
    return out


@pytest.fixture(autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    """Fail a test that leaves worker or consumer processes running.

    Processes that are already dead may take a moment to be reaped by their
    parent; the fixture waits for that (bounded), it never waits for a
    process that is still running: those fail the test.
    """
    yield
    multiprocessing.active_children()  # reaps finished multiprocessing children
    left = descendants(os.getpid())
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = descendants(os.getpid())
    assert not left, f"processes left behind: {[(p, _cmdline(p)) for p in left]}"


def run_python(code: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter with the package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )
