"""Shared fixtures: every test must leave no process of ours behind."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import pytest

from parallel_queue import ParallelQueue, _wire
from parallel_queue._core import Core
from parallel_queue._delivery import Delivery
from parallel_queue._options import Options
from parallel_queue._tasks import CALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def live_processes(parent: Optional[int] = None, session: Optional[int] = None) -> list[int]:
    """Live (non-zombie) processes whose parent, or session, is the one given."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; after it:
        # state, parent, process group, session.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        if (parent is not None and int(fields[1]) == parent) or (session is not None and int(fields[3]) == session):
            found.append(int(entry))
    return found


def _children_of(pid: int) -> list[int]:
    return live_processes(parent=pid)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, but multiprocessing's long-lived helpers.

    The fork servers and the resource tracker live as long as the test
    process by design; a fork server's *children* are ours and are counted
    (they have its command line: it forks without exec).
    """
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for kid in _children_of(parent):
            todo.append(kid)
            if parent == pid and any(h in _cmdline(kid) for h in ("forkserver", "resource_tracker")):
                continue
            out.append(kid)
    return out


def drain(it: Iterator[object], *errors: type[BaseException]) -> list[object]:
    """Every result of ``it``, with each error of the given types as its str()
    in its place (iteration goes on after a task's error)."""
    out: list[object] = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except errors as e:
            out.append(f"{type(e).__name__}: {e}")


def wait_until(condition: Callable[[], object], seconds: float = 30) -> None:
    """Look at ``condition`` until it holds, for a state the code under test
    reaches without telling anyone (a thread asleep in poll()).  Not a
    timing assertion: ``seconds`` is only how long before the test fails."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {seconds} s: {condition}")
        time.sleep(0.001)


def sleeping_in(thread: Any, what: str) -> bool:
    """Whether ``thread`` sleeps in the kernel in a function whose name holds
    ``what`` ("futex": on a lock; "poll": in poll()).  Linux's wait channel."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
            return what in f.read()
    except OSError:
        return False


def interrupt_main_thread_when(condition: Callable[[], object]) -> Any:
    """A started thread that sends SIGINT to the main thread once
    ``condition()`` holds (Ctrl-C at that very point); join it after."""
    main = threading.main_thread()

    def send() -> None:
        wait_until(condition)
        signal.pthread_kill(main.ident, signal.SIGINT)  # type: ignore[arg-type]

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


async def await_until(condition: Callable[[], object], seconds: float = 30) -> None:
    """``wait_until`` in a coroutine: lets the event loop run in between."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {seconds} s: {condition}")
        await asyncio.sleep(0.001)


class NoEngine:
    """An engine that runs nothing: a bare core is the put and get sides of
    a queue alone, for tests that drive them step by step.  It holds the
    write end of the output pipe (nothing is ever written to it, and a
    blocking get() waits, as on a queue whose tasks are still running)."""

    def __init__(self, output_w: Any) -> None:
        self.output_w = output_w

    def wind_down(self) -> None:
        pass

    def join(self, timeout: object) -> bool:
        return True

    def close(self) -> None:

        _wire.close_fd(self.output_w)

    def is_alive(self) -> bool:
        return False

    def workers_alive(self) -> int:
        return 0

    def workers_replaced(self) -> int:
        return 0

    def reorder_counts(self) -> tuple[int, int]:
        return 0, 0

    def left_behind_by_fork(self) -> None:
        pass


def make_bare_core(**options: object) -> Any:
    """A queue's core with no engine (its delivery reads a pipe nobody
    writes to); end it with ``terminate()``."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(ParallelQueue.__init__).parameters.items()
        if name not in ("self", "executor")
    }
    core = Core(Options(**{**defaults, "num_workers": 1, **options}), CALL)
    r, w = _wire.make_pipe()
    core.engine = NoEngine(w)
    core.delivery = Delivery(core, _wire.FrameReader(r))  # (it closes the read end)
    return core


@pytest.fixture
def bare_core() -> Iterator[Any]:
    core = make_bare_core()
    yield core
    core.terminate()


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
