"""Ctrl-C and a killed parent, on real child interpreters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

PRELUDE = """
import multiprocessing, os, signal, sys, threading

# An interactive session handles Ctrl-C; a child of a background job may
# have inherited SIGINT ignored (bash does that without job control), and
# Python keeps an inherited SIG_IGN.  Behave like the terminal session.
signal.signal(signal.SIGINT, signal.default_int_handler)

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue

ctx = multiprocessing.get_context({method!r})
started = ctx.Event()

def stuck(_):
    started.set()
    threading.Event().wait()

def ready(q):
    # Every process of the queue is past its start-up (a result went
    # through the consumer, a worker runs a task) before we report.
    pids = [str(p.pid) for p in q._engine.processes()]
    print(" ".join(pids), flush=True)
"""

BODIES = {
    "get": """
with ParallelSingleTaskQueue(stuck, num_workers=2, mp_context=ctx) as q:
    q.put(0)
    assert started.wait(60)
    ready(q)
    q.get()
""",
    "put": """
with ParallelSingleTaskQueue(stuck, num_workers=1, in_q_max=1, max_batch=1, mp_context=ctx) as q:
    q.put(0)
    assert started.wait(60)
    ready(q)
    for i in range(100):
        q.put(i)   # blocks once the worker holds two and one waits
""",
    "iterate": """
with ParallelSingleTaskQueue(stuck, num_workers=2, mp_context=ctx) as q:
    q.put(0)
    assert started.wait(60)
    ready(q)
    for result in q:
        pass
""",
    "no-with": """
q = ParallelSingleTaskQueue(stuck, num_workers=2, mp_context=ctx)
q.put(0)
assert started.wait(60)
ready(q)
q.get()
""",
}


def start_child(body: str, method: str = "fork") -> tuple[subprocess.Popen[str], list[int]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen(
        [sys.executable, "-c", PRELUDE.format(method=method) + body],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a shell job has
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(30)
        raise AssertionError(f"child failed to start: {child.stderr.read() if child.stderr else ''}")
    return child, [int(p) for p in line.split()]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"  # a zombie has exited


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Which of ``pids`` are still running after ``seconds`` (checked as they go)."""
    deadline = time.monotonic() + seconds
    left = [p for p in pids if not gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not gone(p)]
    return left


@pytest.mark.parametrize("where", sorted(BODIES))
def test_one_ctrl_c_stops_everything(where):
    child, pids = start_child(BODIES[where])
    try:
        os.killpg(child.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        child.wait(30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    err = child.stderr.read() if child.stderr else ""
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "Error" not in err.replace("KeyboardInterrupt", "")  # nothing else went wrong
    assert wait_gone(pids, 10) == []


def kill_parent_then_orphans(child: subprocess.Popen[str], pids: list[int]) -> list[int]:
    """SIGKILL the child interpreter; which of its ``pids`` outlived it
    (they are killed too, so they never run on into the next test)."""
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    left = wait_gone(pids, 10)
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


# How a worker learns that the main process is gone: the kernel's signal
# where it can (Linux), else a thread of the worker's own (forced here by
# making the kernel route unavailable; under fork the child inherits that).
WATCHES = {
    "kernel": "",
    "thread": "import parallel_queue._worker as w; w._kernel_watch = lambda fd: False\n",
}


# The main process starts a queue whose task never returns, then waits.
RUNS_FOREVER = """
def spin(_):  # deep in C code, never letting go of the GIL
    started.set()
    return sum(range(10**15))

q = ParallelSingleTaskQueue({task}, num_workers={n}, mp_context=ctx)
q.put(0)
assert started.wait(60)
ready(q)
threading.Event().wait()
"""


@pytest.mark.parametrize(("method", "watch"), [("fork", "kernel"), ("fork", "thread"), ("forkserver", "kernel")])
def test_killed_parent_leaves_no_orphans(method, watch):
    child, pids = start_child(WATCHES[watch] + RUNS_FOREVER.format(task="stuck", n=2), method)
    assert kill_parent_then_orphans(child, pids) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's watch is Linux's")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_killed_parent_ends_a_task_that_holds_the_gil(method):
    """A task deep in C code that never lets go of the GIL (sum over a huge
    range) still ends the moment the main process dies: the kernel kills the
    worker; a watcher thread would wait for the GIL for hours.  The worker
    also starts no thread of its own for the watch."""
    child, pids = start_child(RUNS_FOREVER.format(task="spin", n=1), method)
    worker = pids[0]  # processes(): the workers first, then the consumer
    threads = os.listdir(f"/proc/{worker}/task")
    assert kill_parent_then_orphans(child, pids) == []
    assert threads == [str(worker)]


def test_helper_threads_never_take_ctrl_c():
    """Regression for a hung Ctrl-C.  The kernel gives a process-directed
    SIGINT to any thread not blocking it; landing on a helper thread (the
    dispatcher asleep in epoll), Python only set a flag, and a main thread
    asleep in put()'s lock wait was never interrupted.  Every helper thread
    we start must block SIGINT, so the signal goes to a thread that handles
    it.  Checked directly on the threads' signal masks."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from parallel_queue import ParallelQueue, imap

    def blocks_sigint(t: threading.Thread) -> bool:
        with open(f"/proc/self/task/{t.native_id}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
        return bool(mask & (1 << (signal.SIGINT - 1)))

    with ThreadPoolExecutor(1) as ex:
        q1 = ParallelQueue(num_workers=1, progress=True)
        q2 = ParallelQueue(executor=ex)
        it = imap(abs, iter(range(10**9)), num_workers=1)
        next(it)
        try:
            ours = [t for t in threading.enumerate() if t.name.startswith("parallel_queue-")]
            names = {t.name for t in ours}
            assert {
                "parallel_queue-dispatcher",
                "parallel_queue-progress",
                "parallel_queue-executor-dispatcher",
                "parallel_queue-imap-feeder",
            } <= names
            assert [t.name for t in ours if not blocks_sigint(t)] == []
            assert not blocks_sigint(threading.main_thread())
        finally:
            it.close()
            q1.terminate()
            q2.terminate()


@pytest.mark.parametrize("where", ["wait_for_more", "raise_if_finished", "wait", "in_hand"])
def test_interrupt_inside_a_waiting_get_leaves_nothing_held(monkeypatch, where):
    """Regression for a hung Ctrl-C: the KeyboardInterrupt landed after get()
    had marked itself the poller and before the try that unmarks it, and
    terminate() then waited forever for a poller that was gone.  Raise it at
    each step of a waiting get() and check nothing stays held or marked."""
    from parallel_queue import ParallelQueue
    from parallel_queue._delivery import Delivery

    q = ParallelQueue(num_workers=1)
    try:
        d, e = q._engine.delivery, q._engine

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(Delivery, where, interrupted)
            with pytest.raises(KeyboardInterrupt):
                q.get()
        assert not d.polling and not e.getter_waiting
        assert not d.lock.locked() and not e.lock.locked()
        q.put(abs, -4)
        assert q.get(timeout=60) == 4  # still works afterwards
    finally:
        q.terminate()  # would wait forever for a poller that is gone


def test_interrupt_while_waiting_for_the_pollers_turn(monkeypatch):
    """Regression for a Ctrl-C that broke the getters' locking: a get() that
    waits while another thread polls used Condition.wait under ``with
    lock``, whose Python code releases the lock before it sleeps; a
    KeyboardInterrupt right after that release left the ``with`` releasing
    it a second time.  Here every Condition the delivery side makes is hit
    at that moment, and a real SIGINT reaches the waiting get(): it raises
    KeyboardInterrupt alone, leaves nothing held, and the queue goes on."""
    import threading
    import types

    from parallel_queue import ParallelQueue, QueueStopped, _delivery

    class ReleaseThenInterrupted(threading.Condition):
        def _release_save(self):  # type: ignore[override]
            self._lock.release()  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    polling = threading.Event()
    original_wait = _delivery.Delivery.wait

    def wait(self, timeout):  # the poller is in poll() from here on
        polling.set()
        original_wait(self, timeout)

    with monkeypatch.context() as m:
        m.setattr(_delivery, "threading", types.SimpleNamespace(Lock=threading.Lock, Condition=ReleaseThenInterrupted))
        q = ParallelQueue(num_workers=1)
    monkeypatch.setattr(_delivery.Delivery, "wait", wait)
    got: list = []
    poller = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    try:
        d = q._engine.delivery
        poller.start()
        assert polling.wait(60)
        timer = threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                q.get(timeout=60)  # waits for the poller's turn; the signal lands there
        finally:
            timer.cancel()
            timer.join()
        assert not d.lock.locked()
        q.put(abs, -4)
        q.put(abs, -5)
        poller.join(60)
        assert got == [4] and q.get(timeout=60) == 5
        q.stop()
        with pytest.raises(QueueStopped):
            q.get(timeout=60)
    finally:
        q.terminate()
        poller.join(60)
