"""Ctrl-C and a killed parent, on real child interpreters."""

from __future__ import annotations

import contextlib
import gc
import inspect
import multiprocessing.heap
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, interrupt_main_thread_when, live_processes, run_python, sleeping_in

from parallel_queue import ParallelQueue, QueueBrokenError, QueueStopped, _delivery, _receiver, _threads, _wire, imap
from parallel_queue._region import RING_BYTES

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
    pids = [str(p.pid) for p in q._core.engine.processes()]
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
    "thread": "import parallel_queue._child as c; c._kernel_watch = lambda fd: False\n",
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
                "parallel_queue-reaper",
            } <= names
            assert [t.name for t in ours if not blocks_sigint(t)] == []
            assert not blocks_sigint(threading.main_thread())
        finally:
            it.close()
            q1.terminate()
            q2.terminate()


@pytest.mark.parametrize(
    "where",
    [("Receiver", "wait_for_more"), ("Delivery", "raise_if_finished"), ("Receiver", "wait"), ("Delivery", "may_sleep")],
    ids=lambda w: w[1],
)
def test_interrupt_inside_a_waiting_get_leaves_nothing_held(monkeypatch, where):
    """Regression for a hung Ctrl-C: the KeyboardInterrupt landed after get()
    had marked itself the poller and before the try that unmarks it, and
    terminate() then waited forever for a poller that was gone.  Raise it at
    each step of a waiting get() and check nothing stays held or marked."""
    owner, name = where
    q = ParallelQueue(num_workers=1)
    try:
        d, e = q._core.delivery, q._core

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(getattr({"Receiver": _receiver, "Delivery": _delivery}[owner], owner), name, interrupted)
            with pytest.raises(KeyboardInterrupt):
                q.get()
        assert d.receiver.poller is None and not len(e.wakeups.getters)
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

    class ReleaseThenInterrupted(threading.Condition):
        def _release_save(self):  # type: ignore[override]
            self._lock.release()  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    polling = threading.Event()
    original_wait = _receiver.Receiver.wait

    def wait(self, timeout):  # the poller is in poll() from here on
        polling.set()
        original_wait(self, timeout)

    fake_threading = types.SimpleNamespace(
        Lock=threading.Lock, Condition=ReleaseThenInterrupted, get_ident=threading.get_ident
    )
    with monkeypatch.context() as m:
        for module in (_delivery, _receiver):
            m.setattr(module, "threading", fake_threading)
        q = ParallelQueue(num_workers=1)
    monkeypatch.setattr(_receiver.Receiver, "wait", wait)
    got: list = []
    poller = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    try:
        d = q._core.delivery
        poller.start()
        assert polling.wait(60)
        # Ctrl-C once this thread waits for the poller's turn: its waiter
        # registered, and it asleep on it.
        main = threading.main_thread()
        sender = interrupt_main_thread_when(lambda: len(d.receiver.turns) == 1 and sleeping_in(main, "futex"))
        try:
            with pytest.raises(KeyboardInterrupt):
                q.get(timeout=60)  # waits for the poller's turn; the signal lands there
        finally:
            sender.join(60)
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


# ------------------------------------------------ Ctrl-C while a queue starts

# Each program below runs one small map under ``fork`` with a hook that sends
# SIGINT at one exact moment of the start-up (where stack dumps showed a real
# press landing), catches the KeyboardInterrupt, and prints what it still has
# running.  One press must mean one clean KeyboardInterrupt in the main
# process: no child traceback, no "Exception ignored", no process left.
STARTUP_PRELUDE = """
import multiprocessing, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal session
from parallel_queue import imap

def live_children():
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[1]) == os.getpid():
                kids.append(int(entry))
    return kids

def press():
    os.kill(os.getpid(), signal.SIGINT)
"""

STARTUP_EPILOGUE = """
try:
    print(list(imap(abs, range(-5, 0), num_workers=2, mp_context="fork")), flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
multiprocessing.active_children()  # reap what ended
print("left", live_children(), flush=True)
"""

STARTUP_HOOKS = {
    # A fresh child gets the press before it ignores SIGINT: it must not die
    # of it or print a traceback; the queue runs on.
    "child-after-fork": ("os.register_at_fork(after_in_child=press)", "[5, 4, 3, 2, 1]"),
    # The press lands in the parent's after-fork hook, where Python swallows
    # an exception ("Exception ignored"): it must not be lost.
    "parent-after-fork": (
        "pressed = []\n"
        "def once():\n"
        "    if not pressed:\n"
        "        pressed.append(1)\n"
        "        press()\n"
        "os.register_at_fork(after_in_parent=once)",
        "interrupted",
    ),
    # Inside Process.start(), after the fork, before the process is recorded
    # (multiprocessing's own bookkeeping of its children, for the first
    # worker): nothing would ever kill that worker.
    "inside-process-start": (
        "import multiprocessing.process as mpp\n"
        "class Hooked(set):\n"
        "    def add(self, p):\n"
        "        super().add(p)\n"
        "        if p.name.startswith('parallel_queue-worker'):\n"
        "            press()\n"
        "mpp._children = Hooked()",
        "interrupted",
    ),
    # Between registering the queue for exit clean-up and starting its
    # dispatcher thread: at exit, a join of a thread never started, then a
    # wait for the workers forever.
    "before-thread-start": (
        "import threading\n"
        "real_start = threading.Thread.start\n"
        "def start(self):\n"
        "    if self.name == 'parallel_queue-dispatcher':\n"
        "        press()\n"
        "    real_start(self)\n"
        "threading.Thread.start = start",
        "interrupted",
    ),
}


@pytest.mark.parametrize("moment", sorted(STARTUP_HOOKS))
def test_one_ctrl_c_at_each_moment_of_start_up_is_one_clean_exit(moment):
    hook, expected = STARTUP_HOOKS[moment]
    r = run_python(STARTUP_PRELUDE + hook + STARTUP_EPILOGUE, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [expected, "left []"]
    assert r.stderr == ""


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    return live_processes(session=sid)


SMALL_MAPS_FOREVER = """
import multiprocessing, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from parallel_queue import imap
print("ready", flush=True)
while True:
    list(imap(abs, range(10), num_workers=2, mp_context={method!r}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("method", "presses"), [("fork", 50), ("forkserver", 15), ("spawn", 10)])
def test_ctrl_c_at_random_moments_of_a_loop_of_small_maps(method, presses):
    """Ctrl-C at a random moment of ``while True: list(imap(...))``: every
    press ends the program with a KeyboardInterrupt, promptly, with no other
    error on stderr and no process left behind.  Before, under fork, 12 in 25
    runs printed a child's traceback, broke the queue instead or hung."""
    rng = random.Random(20261130)
    failures = []
    for attempt in range(presses):
        child = subprocess.Popen(
            [sys.executable, "-c", SMALL_MAPS_FOREVER.format(method=method)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            start_new_session=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            # A random moment: queues start and end several times a second.
            time.sleep(rng.uniform(0, 0.4))
            os.killpg(child.pid, signal.SIGINT)
            try:
                _, err = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                failures.append((attempt, "hung"))
                continue
            left = wait_gone(session_processes(child.pid), 10)
            tail = err.strip().splitlines()[-1:] if err.strip() else []
            if tail != ["KeyboardInterrupt"] or err.count("Traceback") != 1 or "Exception ignored" in err or left:
                failures.append((attempt, child.returncode, err[-2000:], left))
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            for p in session_processes(child.pid):
                os.kill(p, signal.SIGKILL)
    assert failures == []


FORKSERVER_PRESSES = """
import multiprocessing.process, os, signal

def press():
    os.killpg(0, signal.SIGINT)  # as a terminal does: to every process of the group

if __name__ == "__mp_main__":
    # The fork server imports the main script as it starts up (to preload
    # it): a press now.
    press()

if __name__ == "__main__":
    presses = []
    signal.signal(signal.SIGINT, lambda signum, frame: presses.append(signum))  # takes Ctrl-C, goes on

    real_start = multiprocessing.process.BaseProcess.start
    def start(self):
        real_start(self)
        press()  # the new process may still be loading its start-up data
    multiprocessing.process.BaseProcess.start = start

    from parallel_queue import ParallelQueue
    with ParallelQueue(num_workers=2, mp_context="forkserver", max_tasks_per_worker=2) as q:
        for i in range(12):
            q.put(abs, -i)
        print([q.get(timeout=60) for _ in range(12)])
        replaced = q.stats().workers_replaced
    print(replaced >= 4, len(presses) >= 2)  # presses held back together count once
"""


def test_ctrl_c_while_the_fork_server_and_its_processes_start(tmp_path):
    """Regression: multiprocessing's fork server, a new interpreter the first
    time a program uses it, took a terminal's Ctrl-C while it started up
    (importing the main script, which can take a while): it died, and the
    queue being made broke (11 presses in 12, 0.05 to 0.2 s after a queue
    was made, for a program that catches the KeyboardInterrupt and goes on).
    And it hands each process it forks Python's Ctrl-C handler.  Forced
    here: a press to the whole process group from inside the server's
    import of the main script, and right after every process start (the
    consumer, the workers, each worker replaced after two tasks), in a
    program that takes each press and goes on.  Every result comes out,
    nothing is printed."""
    script = tmp_path / "presses.py"
    script.write_text(FORKSERVER_PRESSES)
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env=dict(os.environ, PYTHONPATH=ROOT),
        start_new_session=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(list(range(12))), "True True"]
    assert r.stderr == ""


OWN_FORKSERVER_PROCESS = """
import multiprocessing, signal

def report(conn):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    conn.send((signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.SIGINT in blocked))

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal session (see PRELUDE)
    from parallel_queue import ParallelQueue
    with ParallelQueue(num_workers=1, mp_context="forkserver") as q:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        ctx = multiprocessing.get_context("forkserver")
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=report, args=(theirs,))
        p.start()
        print(mine.recv())
        p.join()
"""


def test_the_programs_own_fork_server_processes_still_take_ctrl_c(tmp_path):
    """Our fork server holds SIGINT blocked; multiprocessing's, which the
    program's own processes come from, is not touched: a process the
    program starts under forkserver beside a queue has Python's Ctrl-C
    handler and SIGINT unblocked, as without the queue."""
    script = tmp_path / "own.py"
    script.write_text(OWN_FORKSERVER_PROCESS)
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["(True, False)"]


def test_killed_parent_ends_a_stopped_consumer():
    """Regression: the consumer had no kernel parent-death kill as the workers
    do: a consumer stopped with SIGSTOP outlived its parent's SIGKILL."""
    # A result has gone through the consumer before it is stopped: it is past
    # its start-up, where it sets up the kernel's watch.
    body = """
q = ParallelQueue(num_workers=1, mp_context=ctx)
q.put(abs, -1)
assert q.get(timeout=60) == 1
ready(q)
threading.Event().wait()
"""
    child, pids = start_child(body)
    consumer = pids[-1]  # processes(): the workers, then the consumer
    os.kill(consumer, signal.SIGSTOP)
    assert kill_parent_then_orphans(child, pids) == []


def test_consumer_ends_quietly_when_the_main_process_is_gone():
    """Regression: when the main process was killed mid-stream, the consumer
    sometimes printed a 14-line BrokenPipeError traceback.  Forced here: the
    main process's end of the output pipe goes away (as if it had died)
    while results stream; the consumer exits without a word, and the queue
    reports its death."""
    code = """
import multiprocessing.heap
import os
from parallel_queue import ParallelQueue, QueueBrokenError
q = ParallelQueue(num_workers=2)
q.put(abs, -1)
assert q.get(timeout=60) == 1
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, q._core.engine.output_r.fd)  # the read end of the results pipe is gone
try:
    for i in range(20000):
        q.put(abs, -i)
    while True:
        q.get(timeout=60)
except QueueBrokenError as e:
    print("broken:", "consumer" in str(e))
q.terminate()
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "broken: True"
    assert r.stderr == ""


def test_ctrl_c_while_a_dropped_queue_is_ended_is_not_lost():
    """Regression: a queue dropped without stop() was ended by its finalizer,
    in the main thread, inside a weakref callback, where Python swallows
    exceptions: a press landing in those milliseconds (joining the
    dispatcher, killing and reaping the processes) was lost ("Exception
    ignored in: <finalize object>"), and the program ran on.  Forced: the
    press comes while the dropped queue's processes are killed."""
    code = """
import gc, os, signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)
from parallel_queue import ParallelQueue, _engine

real_kill = _engine.ProcessEngine.kill_processes
pressed = []

def press_then_kill(self):
    if not pressed:  # one press
        pressed.append(1)
        os.kill(os.getpid(), signal.SIGINT)
    real_kill(self)

_engine.ProcessEngine.kill_processes = press_then_kill
try:
    q = ParallelQueue(num_workers=2)
    q.put(abs, -1)
    assert q.get(timeout=60) == 1
    del q
    gc.collect()
    threading.Event().wait(30)  # the press ends this wait
    print("the press was lost")
except KeyboardInterrupt:
    print("interrupted")
"""
    r = run_python(code)
    assert r.stdout.strip() == "interrupted", (r.stdout, r.stderr)
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.parametrize("where", ["pthread_sigmask", "signal"])
def test_a_press_pending_as_start_up_begins_leaves_ctrl_c_working(monkeypatch, where):
    """Regression: a press that arrived just before a queue's start-up held
    Ctrl-C back was raised by the very calls that hold it back (each runs
    pending handlers), after SIGINT was blocked in the main thread and
    before the clean-up could undo it: SIGINT then stayed blocked in that
    thread for good, and no later Ctrl-C reached the program."""
    assert threading.current_thread() is threading.main_thread()
    real = getattr(_threads.signal, where)
    state = {"pressed": False}

    def pending_press(*args):
        # As CPython does: pthread_sigmask runs pending handlers after it
        # changed the mask, signal.signal before it changes the handler.
        if where == "signal" and not state["pressed"]:
            state["pressed"] = True
            raise KeyboardInterrupt
        result = real(*args)
        if not state["pressed"]:
            state["pressed"] = True
            raise KeyboardInterrupt
        return result

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    monkeypatch.setattr(_threads.signal, where, pending_press)
    with pytest.raises(KeyboardInterrupt):
        with _threads.sigint_held_back():
            raise AssertionError("the block must not run")
    monkeypatch.undo()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def interrupt_at_event(n: int, files: tuple[str, ...]):
    """A tracer that raises KeyboardInterrupt where a Ctrl-C can land in code
    from ``files``, at the ``n``-th such place: as a function of theirs
    begins, or as a call made from their code returns (the interpreter runs
    signal handlers there; not between any two lines).  Not as a generator
    resumes: a press there lands inside it, where its own try statements
    see it, and a tracer's exception would be raised before them.  Nor as a
    generator yields to their code: a press there lands in the caller once
    the generator is suspended, but a tracer's exception raised at the
    yield ends the generator without running its ``finally`` (a context
    manager's clean-up that no real press skips); it is raised at the
    caller's next event instead.  Returns (tracer, places counted)."""
    seen = [0]
    pending = [False]

    def ours(frame) -> bool:
        return frame is not None and frame.f_code.co_filename.endswith(files)

    def tracer(frame, event, arg):
        if pending[0] and ours(frame):
            pending[0] = False
            raise KeyboardInterrupt
        is_generator = frame.f_code.co_flags & inspect.CO_GENERATOR
        begins = event == "call" and ours(frame) and not is_generator
        if begins or (event == "return" and ours(frame.f_back)):
            seen[0] += 1
            if seen[0] == n:
                if event == "return" and is_generator:
                    pending[0] = True
                else:
                    raise KeyboardInterrupt
        return tracer

    return tracer, seen


@pytest.mark.parametrize("call", ["imap", "stats"])
def test_a_press_anywhere_in_the_cores_locked_steps_leaves_both_locks_free(call):
    """Regression: both locks were taken through a context manager of ours
    (a generator under contextlib): a Ctrl-C landing in its ``__enter__``
    after the locks were taken and before the ``with`` block began left
    them held for good, and the terminate() that the press set off in
    imap() deadlocked on them (1 press in about 300 at random moments of a
    loop of small maps).  Forced: a KeyboardInterrupt at every trace event
    place of the core's steps that take both locks, one after the other."""
    files = (os.path.join("parallel_queue", "_core.py"), "contextlib.py")
    with ParallelQueue(num_workers=2) as q:
        core = q._core
        assert list(q.imap(abs, [-1, -2])) == [1, 2]
        n = 0
        while True:
            n += 1
            tracer, seen = interrupt_at_event(n, files)
            sys.settrace(tracer)
            try:
                if call == "imap":
                    it = q.imap(abs, [-3, -4])
                    sys.settrace(None)
                    it.close()
                else:
                    q.stats()
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.settrace(None)
            # Not left held: the dispatcher thread takes the core's lock too,
            # so wait for a turn; one left held is never given.  (Released
            # here if it was, so that the queue can still be ended.)
            left_held = [lock for lock in (core.delivery.lock, core.lock) if not lock.acquire(timeout=30)]
            for lock in (core.delivery.lock, core.lock):
                lock.release()
            assert left_held == [], (n, seen[0])
            # The queue goes on (a map the press left half begun is taken
            # back from its collected iterator, see _core.reclaim_map).
            assert list(q.imap(abs, [-5, -6])) == [5, 6], n
            if not interrupted:
                break  # every event of the step has had its press
        assert n > 5


# Presses that land while the main process loads a result (once each).
PRESSES_WHILE_LOADING: list[int] = []


def _loaded(value):
    if PRESSES_WHILE_LOADING:
        PRESSES_WHILE_LOADING.pop()
        raise KeyboardInterrupt  # as a Ctrl-C landing in the loader's code
    return value


class PressedWhileLoaded:
    """A result (loaded as its value) whose loading, in the main process, is
    where a press lands."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_loaded, (self.value,))


def pressed_while_loaded(x):
    return PressedWhileLoaded(x)


@pytest.mark.parametrize("careful", [False, True])
def test_a_press_while_a_result_loads_is_raised_and_the_packet_kept(careful):
    """Regression: a Ctrl-C landing while the main process unpickled a packet
    of results was taken as the packet's failure to load (every loader
    error is), its values salvaged one by one, and the press was lost: the
    program went on (about 1 press in 100 at random moments of a loop of
    small maps never ended it).  Now the KeyboardInterrupt comes out of
    get(), and the packet stays first in line: the next get() has it, in
    order, nothing lost.  Both ways a packet's results load: whole, and one
    by one (task_timeout makes every packet careful)."""
    options = {"task_timeout": 60} if careful else {}
    with ParallelQueue(num_workers=2, max_batch=4, **options) as q:
        q.put(abs, -1)
        for i in range(2, 8):
            q.put(pressed_while_loaded, i)
        assert q.get(timeout=60) == 1
        PRESSES_WHILE_LOADING.append(1)
        with pytest.raises(KeyboardInterrupt):
            q.get(timeout=60)
        assert PRESSES_WHILE_LOADING == []
        assert [q.get(timeout=60) for _ in range(6)] == [2, 3, 4, 5, 6, 7]


def test_what_dies_with_a_python_callback_dies_as_the_queue_ends():
    """Regression: a queue's shared arrays (multiprocessing frees each block
    in a Finalize) and its threads' Thread objects (threading drops each
    from its set of threads in a weak reference's callback) died in the
    cyclic collector, at any allocation of the main thread later; a Ctrl-C
    landing in such a callback is swallowed by Python ("Exception ignored")
    and the program went on (3 presses in 1,800 at random moments of a loop
    of small maps; one of them half-way through multiprocessing's heap
    bookkeeping, which it left inconsistent).  Now they are let go as the
    queue ends, with Ctrl-C held back: they are gone once join() returns."""
    heap = multiprocessing.heap.BufferWrapper._heap
    gc.collect()
    gc.disable()  # only what the queue lets go itself is freed below
    try:
        q = ParallelQueue(num_workers=2)
        it = q.imap(abs, range(-50, 0))
        dispatcher = weakref.ref(q._core.engine.thread)
        feeder = weakref.ref(it._feeder)
        assert len(list(it)) == 50
        frees = heap._n_frees
        q.stop()
        q.join()
        assert dispatcher() is None
        assert feeder() is None
        assert heap._n_frees - frees == 3  # the reorder counts, max_packet_id, the progress array
        assert q.stats().in_flight == 0  # (the queue object itself lives on)
    finally:
        gc.enable()


def test_a_press_in_a_waits_clean_up_shows_one_traceback():
    """Regression: a Ctrl-C landing in the clean-up of a wait while the end of
    a map's results was on its way out (QueueStopped, caught by the map)
    showed that as its context: two tracebacks for one press (1 in 900 at
    random moments of a loop of small maps).  The clean-up still runs whole."""
    runs = []

    def cleanup():
        runs.append(1)
        if len(runs) == 1:
            raise KeyboardInterrupt  # the press, in the first run of the clean-up

    with pytest.raises(KeyboardInterrupt) as info:
        try:
            raise QueueStopped("the queue was stopped and every result was delivered")
        finally:
            _threads.run_whole(cleanup)
    e = info.value
    assert "".join(traceback.format_exception(type(e), e, e.__traceback__)).count("Traceback") == 1
    assert len(runs) == 2


# Where results change hands in the main process: the receiver's packets to
# the delivery's steps, the steps to a map.  (Not the receiver's own reading of
# the pipe: a press as a small read returns still loses what it read, a window
# that only holding SIGINT back around every read, some 5 us each, would
# close; reads into a large body do hold it back: see the test above.)
# More places than a round of either test below has (50 to 90 seen).
PLACES = 150

HAND_OVER_FILES = tuple(os.path.join("parallel_queue", name) for name in ("_delivery.py", "_threads.py", "_maps.py"))


def filled(i: int, size: int) -> bytes:
    return bytes([i]) * size


def put_and_get_through_presses(q, i: int, size: int) -> int:
    """Put ``filled(i, size)`` and get it as a program that catches each
    KeyboardInterrupt and goes on getting: it must come out whole.  Returns
    how many presses get() raised."""
    q.put(filled, i, size)
    interrupted = 0
    while True:
        try:
            got = q.get(timeout=60)
            break
        except KeyboardInterrupt:
            interrupted += 1
    assert got == filled(i, size), i
    return interrupted


@pytest.mark.parametrize("taken_by", ["main thread", "another thread"])
def test_a_press_as_a_read_of_a_large_result_returns_loses_nothing(monkeypatch, taken_by):
    """Regression: a Ctrl-C landing as a read of the consumer's pipe returned,
    before what it read was accounted for, lost those bytes; the queue broke
    rather than hand out what followed out of step.  With results too large
    for a ring, read from the pipe for as long as they take to copy, that was
    most presses (9 of 14 with 40 MB results, in an adversarial run).
    Forced with a real signal as the k-th read into a large result's body
    returns (k from 1 to 5), in a program that catches the KeyboardInterrupt
    and goes on getting.  The kernel hands a press to any thread that does
    not block SIGINT, and Python raises it in the main thread all the same:
    so the signal goes to the main thread, or to another thread of the
    program (the main thread waits until its C handler ran, on the wake-up
    descriptor).  Every result comes out whole."""
    size = RING_BYTES + (4 << 20)  # too large for a ring: it comes through the pipe
    me, main = os.getpid(), threading.main_thread().ident
    real_readv = os.readv
    armed = {"reads": 0}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    other = threading.Thread(target=threading.Event().wait, args=(60,), daemon=True)

    def readv(fd, buffers):
        n = real_readv(fd, buffers)
        if armed["reads"] and os.getpid() == me and threading.get_ident() == main and reader.in_large_frame:
            armed["reads"] -= 1
            if not armed["reads"]:  # a press, as the read returns
                if taken_by == "main thread":
                    signal.pthread_kill(main, signal.SIGINT)
                else:
                    signal.pthread_kill(other.ident, signal.SIGINT)
                    os.read(wake_r, 1)  # its C handler ran: Python raises it at the main thread's next check
        return n

    # As a terminal session (a test runner's worker may ignore SIGINT).
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    other.start()
    try:
        with ParallelQueue(num_workers=1) as q:
            reader = q._core.delivery.receiver.reader
            monkeypatch.setattr(os, "readv", readv)
            interrupted = 0
            for i in range(10):
                armed["reads"] = i % 5 + 1
                interrupted += put_and_get_through_presses(q, i, size)
                assert armed["reads"] == 0, i  # the press was sent
            monkeypatch.setattr(os, "readv", real_readv)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGINT, handler)
        os.close(wake_r)
        os.close(wake_w)
    assert interrupted == 10


def test_a_press_as_a_large_results_body_is_made_loses_nothing(monkeypatch):
    """Regression (found by adversarial testing): the body of a result too
    large for a ring was made (a bytearray of its size, zero-filled: some 10
    ms for 40 MB) in the read that found the frame's start, which held no
    press back: a press then broke the queue in 7 runs of 13 (40 MB results,
    one press each).  A new body is now made by the next read, which holds
    it back.  Forced: the main thread sends itself SIGINT as each new body is
    made (the pool emptied before each, as when results are kept)."""
    size = RING_BYTES + (4 << 20)
    me, main = os.getpid(), threading.main_thread().ident
    real_take = _wire.BodyPool.take

    def take(self, n, phase=0):
        new = not self.has(n)  # (a body kept in the pool is taken at once, in the read that finds the frame)
        body = real_take(self, n, phase)
        if new and n >= size and os.getpid() == me and threading.get_ident() == main:
            signal.pthread_kill(main, signal.SIGINT)  # lands as the body is made
        return body

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ParallelQueue(num_workers=1) as q:
            monkeypatch.setattr(_wire.BodyPool, "take", take)
            pool = q._core.delivery.receiver.reader.pool
            interrupted = 0
            for i in range(3):
                pool.free.clear()  # as when results are kept (arrays on their bodies): each body is new
                interrupted += put_and_get_through_presses(q, i, size)
            monkeypatch.setattr(_wire.BodyPool, "take", real_take)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert interrupted == 3


def test_a_press_as_a_large_reads_deferral_begins_cuts_nothing(monkeypatch):
    """Regression (found by adversarial testing): a Ctrl-C landing as the
    deferral of a large read began, before anything was read, marked the
    pipe cut: the queue broke though nothing was lost.  Forced: the main
    thread sends itself SIGINT as each large read's deferral begins."""
    main = threading.main_thread().ident
    real = _receiver.sigint_deferred
    presses = {"left": 3}

    @contextlib.contextmanager
    def pressed_first():
        if presses["left"]:
            presses["left"] -= 1
            signal.pthread_kill(main, signal.SIGINT)  # raised at the next check, before the swap
        with real():
            yield

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(_receiver, "sigint_deferred", pressed_first)
        with ParallelQueue(num_workers=1) as q:
            interrupted = sum(put_and_get_through_presses(q, i, RING_BYTES + (4 << 20)) for i in range(4))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert interrupted == 3


@pytest.mark.parametrize("hold", ["sigint_held_back", "sigint_deferred"])
def test_a_child_forked_while_a_press_is_held_back_takes_ctrl_c(hold):
    """Regression (found by adversarial testing): a process the program forks
    from another thread while the main thread holds a press back (a queue
    starting, a large read) inherited the recorder as its SIGINT handler: it
    took no Ctrl-C for the rest of its life, and the program's exit waited
    for it.  Forced: a thread forks inside the hold; the child has the
    program's handler."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    r, w = os.pipe()
    try:

        def fork_here():
            pid = os.fork()
            if pid == 0:
                os.write(w, b"ok" if signal.getsignal(signal.SIGINT) is signal.default_int_handler else b"no")
                os._exit(0)
            os.waitpid(pid, 0)

        with getattr(_threads, hold)():
            t = threading.Thread(target=fork_here)
            t.start()
            t.join(60)
        assert os.read(r, 2) == b"ok"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and ours is back too
    finally:
        signal.signal(signal.SIGINT, handler)
        os.close(r)
        os.close(w)


class Interrupted(Exception):
    """What a program's own SIGINT handler raises."""


def test_a_programs_own_exception_from_a_press_in_a_small_read_breaks_the_queue_cleanly(monkeypatch):
    """Regression (found by adversarial testing): a program whose SIGINT
    handler raises its own exception (not KeyboardInterrupt) got it from
    inside a read of the consumer's pipe; only a KeyboardInterrupt marked the
    pipe cut, so what the read had taken was lost unnoticed and the reads
    after it went out of step (a hang).  Forced: the handler's exception
    lands as a small read returns; get() then gives QueueBrokenError (what
    was read is lost: the queue cannot go on in step), never a wrong value
    or a hang."""
    main, me = threading.main_thread().ident, os.getpid()
    real_readv = os.readv
    armed = {"on": False}

    def readv(fd, buffers):
        n = real_readv(fd, buffers)
        if armed["on"] and os.getpid() == me and threading.get_ident() == main and n > 0:
            armed["on"] = False
            signal.pthread_kill(main, signal.SIGINT)
        return n

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGINT, handler)
    try:
        with ParallelQueue(num_workers=1, max_batch=1) as q:
            q.put(abs, -1)
            assert q.get(timeout=60) == 1  # the queue is up
            monkeypatch.setattr(os, "readv", readv)
            for i in range(20):
                q.put(abs, -i)
            armed["on"] = True
            got, outcome = [], None
            while outcome is None:
                try:
                    got.append(q.get(timeout=60))
                except Interrupted:
                    continue
                except QueueBrokenError as e:
                    outcome = e
            monkeypatch.setattr(os, "readv", real_readv)
            q.terminate()
    finally:
        signal.signal(signal.SIGINT, old)
    assert got == list(range(len(got)))  # nothing out of step before it
    assert "Ctrl-C" in str(outcome)


def test_a_press_anywhere_in_gets_hand_over_loses_and_repeats_nothing():
    """Regression: a Ctrl-C landing between the receiver giving up a decoded
    packet and the delivery's steps taking it lost the packet, for a program
    that catches the KeyboardInterrupt and goes on getting from the queue.
    Forced: a KeyboardInterrupt at every place a signal can land in get()'s
    code, one after the other; after each, the program keeps calling get()
    and must have every value once, in order."""
    with ParallelQueue(num_workers=2, max_batch=4) as q:
        n, base, pressed = 0, 0, 0
        while True:
            n += 1
            expected = list(range(base, base + 8))
            base += 8
            for x in expected:
                q.put(abs, x)
            tracer, seen = interrupt_at_event(n, HAND_OVER_FILES)
            got, interrupted = [], False
            sys.settrace(tracer)
            try:
                while len(got) < len(expected):
                    try:
                        got.append(q.get(timeout=60))
                    except KeyboardInterrupt:
                        interrupted = True
            finally:
                sys.settrace(None)
            assert got == expected, (n, seen[0])
            pressed += interrupted
            # How many places a round has depends on timing (a packet in
            # hand already, or one to wait for): go on past the most seen.
            if not interrupted and n > PLACES:
                break  # every place has had its press
        assert pressed > 20


def test_a_press_anywhere_in_a_maps_hand_over_loses_and_repeats_nothing():
    """Regression: a Ctrl-C landing as the delivery returned a batch of results
    to a map, before the map took it, lost the batch for a program that
    caught the KeyboardInterrupt and went on iterating the map.  Forced, as
    for get(): after each press the map goes on and gives every result
    once, in order.  (A press while it waited used to close it, so a prefix
    was all a program got: see test_a_map_waited_on_goes_on_after_a_caught_press.)"""
    with ParallelQueue(num_workers=2, max_batch=4) as q:
        n, went_on = 0, 0
        while True:
            n += 1
            expected = list(range(n * 100, n * 100 + 12))
            it = q.imap(abs, expected, chunksize=2)
            tracer, seen = interrupt_at_event(n, HAND_OVER_FILES)
            got, interrupted = [], False
            sys.settrace(tracer)
            try:
                while True:
                    try:
                        got.append(next(it))
                    except StopIteration:
                        break
                    except KeyboardInterrupt:
                        interrupted = True
            finally:
                sys.settrace(None)
            it.close()
            went_on += interrupted
            assert got == expected, (n, seen[0])
            if not interrupted and n > PLACES:
                break
        assert went_on > 0


def wait_for_a_file(i, path):
    """Task 0 waits until the test opens the FIFO ``path``."""
    if i == 0:
        with open(path) as f:
            f.read()
    return i


def test_a_map_waited_on_goes_on_after_a_caught_press(tmp_path):
    """Ctrl-C while next() on a map waits for its first result (a real
    SIGINT, the main thread asleep in poll()); the program catches it and
    goes on with the same map: every result, once, in order.  Before, the
    press closed the map, and the next next() said StopIteration: 0 of 20."""
    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    main = threading.main_thread()
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(wait_for_a_file, range(20), [fifo] * 20)
        sender = interrupt_main_thread_when(lambda: sleeping_in(main, "poll"))
        with pytest.raises(KeyboardInterrupt):
            next(it)
        sender.join()
        with open(fifo, "w"):
            pass
        assert list(it) == list(range(20))
