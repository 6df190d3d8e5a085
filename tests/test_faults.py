"""Nothing lost, nothing hangs: dead workers, timeouts, recycling, dead consumer."""

from __future__ import annotations

import array
import ctypes
import faulthandler
import fcntl
import os
import pickle
import signal
import sys
import termios
import threading
import time

import pytest
from conftest import drain, run_python, wait_until

from parallel_queue import (
    ParallelQueue,
    ParallelSingleTaskQueue,
    QueueBrokenError,
    TaskTimeoutError,
    WorkerInitError,
    WorkerLostError,
    _wire,
    imap,
)
from parallel_queue._slots import Child
from parallel_queue._tasks import P_ITEM, P_STAGE, PROGRESS_FIELDS, STAGE_IDLE, STAGE_RUNNING


def die(how):
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(7)
    elif how == "exit0":
        os._exit(0)
    elif how == "segfault":
        # A real segfault, without the stack dump pytest's faulthandler
        # (inherited by the forked worker) would print on a passing run.
        faulthandler.disable()
        ctypes.string_at(0)
    raise AssertionError("still alive")


def whoami(i):
    return i, os.getpid()


@pytest.mark.parametrize(
    "how, signal_or_code",
    [("sigkill", "SIGKILL"), ("exit", "exited with code 7"), ("exit0", "exited with code 0"), ("segfault", "SIGSEGV")],
)
def test_dead_worker_is_one_error_in_its_slot(how, signal_or_code):
    with ParallelQueue(num_workers=2) as q:
        for i in range(30):
            q.put(abs, -i)
        q.put("before")
        q.put(die, how)
        q.put("after")
        for i in range(30):
            q.put(abs, -i)
        out = [q.get(timeout=60) for _ in range(31)]
        with pytest.raises(WorkerLostError) as info:
            q.get(timeout=60)
        rest = [q.get(timeout=60) for _ in range(31)]
    assert out == list(range(30)) + ["before"]
    assert rest == ["after"] + list(range(30))
    err = info.value
    assert err.task_index == 30 and err.pid > 0
    assert "task #30 (" in str(err) and "die" in str(err) and signal_or_code in str(err)


def test_every_worker_dies_and_is_replaced():
    """More deaths than workers: without replacements the queue would run out
    of workers after two deaths and the later results would never come."""
    with ParallelQueue(num_workers=2) as q:
        for i in range(6):
            q.put(die, "sigkill")
            q.put(whoami, i)
        for i in range(6):
            with pytest.raises(WorkerLostError):
                q.get(timeout=60)
            j, _ = q.get(timeout=60)
            assert j == i


def test_batched_neighbours_of_a_crash_run_again_and_are_not_lost():
    """A crash in the middle of a packet: the tasks before and after it in the
    same packet still deliver, exactly once, in order."""
    with ParallelQueue(num_workers=1, max_batch=50) as q:
        # One worker, and the tasks put before it starts: they travel together.
        for i in range(20):
            q.put(abs, -i)
        q.put(die, "sigkill")
        for i in range(20, 40):
            q.put(abs, -i)
        got = []
        for _ in range(41):
            try:
                got.append(q.get(timeout=60))
            except WorkerLostError as e:
                got.append(("lost", e.task_index))
    assert got == list(range(20)) + [("lost", 20)] + list(range(20, 40))


def test_task_timeout_kills_only_the_slow_task():
    with ParallelQueue(num_workers=2, task_timeout=0.5) as q:
        q.put(time.sleep, 0.01)
        q.put(time.sleep, 60)
        q.put(abs, -3)
        q.put(time.sleep, 60)
        assert q.get(timeout=60) is None
        with pytest.raises(TaskTimeoutError) as info:
            q.get(timeout=60)
        assert q.get(timeout=60) == 3
        with pytest.raises(TimeoutError):  # TaskTimeoutError is a TimeoutError too
            q.get(timeout=60)
    assert info.value.task_index == 1
    assert "task_timeout=0.5" in str(info.value)
    assert isinstance(info.value, WorkerLostError)


def test_max_tasks_per_worker_recycles_without_changing_results():
    with ParallelQueue(num_workers=2, max_tasks_per_worker=5) as q:
        for i in range(60):
            q.put(whoami, i)
        out = [q.get(timeout=60) for _ in range(60)]
    assert [i for i, _ in out] == list(range(60))
    pids = [p for _, p in out]
    assert len(set(pids)) >= 12  # 60 tasks / 5 per worker
    for p in set(pids):
        assert pids.count(p) <= 5


def failing_init():
    raise RuntimeError("no database")


def test_failing_initializer_breaks_the_queue_clearly():
    q = ParallelQueue(num_workers=2, worker_init_f=failing_init)
    try:
        # The workers may fail before or after the put: whichever call comes
        # after the failure raises it.
        with pytest.raises(WorkerInitError) as info:
            q.put(abs, -1)
            q.get(timeout=60)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "no database" in str(info.value)
        assert "failing_init" in info.value.__cause__.stack_trace
        with pytest.raises(QueueBrokenError):
            q.put(abs, -2)
    finally:
        q.terminate()
    assert not q.is_alive()


def crash_in_init():
    os._exit(5)


def test_initializer_that_kills_the_worker_breaks_instead_of_looping():
    q = ParallelQueue(num_workers=1, worker_init_f=crash_in_init)
    try:
        with pytest.raises(QueueBrokenError, match="keep dying"):
            q.put(abs, -1)
            q.get(timeout=60)
    finally:
        q.terminate()


def initializer_sets_global():
    global INITIALIZED
    INITIALIZED = os.getpid()


INITIALIZED = None


def read_global(_):
    return INITIALIZED


def test_initializer_runs_in_each_worker():
    with ParallelSingleTaskQueue(read_global, num_workers=2, worker_init_f=initializer_sets_global) as q:
        for i in range(10):
            q.put(i)
        assert all(isinstance(q.get(timeout=60), int) for _ in range(10))


def test_dead_consumer_breaks_get_promptly():
    q = ParallelQueue(num_workers=2)
    try:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        q.put(time.sleep, 60)
        errors = []

        def getter():
            try:
                q.get(timeout=60)
            except QueueBrokenError as e:
                errors.append(e)

        t = threading.Thread(target=getter)
        t.start()
        os.kill(q._core.engine.consumer.pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        assert errors and "consumer" in str(errors[0])
        with pytest.raises(QueueBrokenError):
            q.put(abs, -2)
        q.join(30)
        assert not q.is_alive()
    finally:
        q.terminate()


def test_stop_waits_for_work_lost_in_a_crash_after_stop():
    """A worker dying after stop() is still replaced: its tasks finish."""
    with ParallelQueue(num_workers=2) as q:
        for i in range(10):
            q.put(abs, -i)
        q.put(die, "sigkill")
        for i in range(10):
            q.put(abs, -i)
        q.stop()
        got = []
        while True:
            try:
                got.append(q.get(timeout=60))
            except WorkerLostError:
                got.append("lost")
            except Exception:
                break
    assert got == list(range(10)) + ["lost"] + list(range(10))


MAIN_PID = os.getpid()


class LoadsOnlyHere:
    """Pickles anywhere, but refuses to unpickle outside the test process."""

    def __init__(self, v):
        self.v = v

    def __getstate__(self):
        return self.v

    def __setstate__(self, v):
        if os.getpid() != MAIN_PID:
            raise RuntimeError("cannot be rebuilt in a worker")
        self.v = v


def identity(x):
    return x


def test_batch_that_will_not_unpickle_in_the_worker_fails_one_slot():
    """The batch pickles in the main process but not in the worker: it is sent
    again one pickle per task, and only the guilty task fails.  Packets of
    exactly eight (a map's chunksize): the bad one shares its packet with
    good ones, and later packets wait in the worker's pipe behind it."""
    inputs = [LoadsOnlyHere(i) if i == 13 else i for i in range(40)]
    with ParallelQueue(num_workers=1) as q:
        got = drain(q.imap(identity, inputs, chunksize=8), Exception)
    assert [x if isinstance(x, int) else x.split(":")[0] for x in got] == (
        list(range(13)) + ["UnpicklingError"] + list(range(14, 40))
    )


def test_is_alive_from_another_thread_never_reaps_a_process(monkeypatch):
    """Regression: a thread calling is_alive() while the queue ended used to
    reap a process the dispatcher then saw with exit code None, as a crash.
    Forced: between each process's exit and the dispatcher's reaping it,
    another thread asks is_alive() and stats()."""
    asked = []
    reap = Child.join

    def ask_then_reap(child):
        t = threading.Thread(target=lambda: asked.append((q.is_alive(), q.stats().workers_alive)))
        t.start()
        t.join()
        reap(child)

    monkeypatch.setattr(Child, "join", ask_then_reap)
    q = ParallelQueue(num_workers=2, max_tasks_per_worker=10)  # recycling: exits while it runs
    for i in range(50):
        q.put(abs, -i)
    q.stop()
    out = list(q)
    q.join(60)
    # Every result, no WorkerLostError: no exit was taken for a crash.
    assert out == list(range(50))
    # Asked at each end: the workers (50 tasks, 10 each: 5 at least) and the consumer.
    assert not q.is_alive() and len(asked) >= 5 + 1


def test_child_forked_while_another_thread_holds_the_fd_lock_does_not_hang():
    """Interleaving: the dispatcher thread forks a replacement worker at the
    instant another thread holds the lock that guards our descriptor list; the
    child inherits it held and, without a fresh lock after fork, hangs in
    close_inherited_fds().  Forced here: a thread holds the lock while we fork."""
    held = threading.Event()
    release = threading.Event()

    def hold():
        with _wire._OWNED_LOCK:
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60)
        pid = os.fork()
        if pid == 0:  # the child: what a worker does first
            _wire.close_inherited_fds(set())
            os._exit(0)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child hung on an inherited lock")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join()


def exit_cleanly_in_init():
    os._exit(0)


def test_initializer_that_exits_cleanly_breaks_instead_of_looping():
    """Regression: a worker that exited with status 0 before running anything
    was not counted as a start-up death and was restarted forever (1,226
    replacements in five seconds)."""
    q = ParallelQueue(num_workers=2, worker_init_f=exit_cleanly_in_init)
    try:
        q.put(abs, -1)
        with pytest.raises(WorkerInitError, match=r"the last exited with code 0\)"):
            q.get(timeout=60)
        assert q.stats().workers_replaced < 10
    finally:
        q.terminate()


def fork_a_helper():
    """Fork a helper that lives on (no exec) and holds every descriptor the
    worker had: multiprocessing's sentinel pipe included."""
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    return pid


def _sigint_blocked_in(native_id: int) -> bool:
    with open(f"/proc/self/task/{native_id}/status") as f:
        blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    return bool(blocked & (1 << (signal.SIGINT - 1)))


@pytest.mark.filterwarnings("ignore:resource_tracker. process died unexpectedly:UserWarning")
def test_a_resource_tracker_started_again_leaves_the_dispatcher_blocking_ctrl_c():
    """Regression (found by adversarial testing): multiprocessing's resource
    tracker, when it has died, is started again by the next spawn or
    forkserver process start, and unblocks SIGINT in the starting thread: a
    worker replaced after it left the dispatcher thread taking Ctrl-C for
    good.  Forced: the tracker is killed, then a worker is replaced."""
    import multiprocessing.resource_tracker as rt

    with ParallelQueue(num_workers=1, mp_context="spawn", max_tasks_per_worker=1) as q:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        dispatcher = q._core.engine.thread.native_id
        assert _sigint_blocked_in(dispatcher)
        os.kill(rt._resource_tracker._pid, signal.SIGKILL)
        os.waitpid(rt._resource_tracker._pid, 0)
        for i in range(3):  # each task replaces the worker
            q.put(abs, -i)
            assert q.get(timeout=60) == i
        assert _sigint_blocked_in(dispatcher)


FORK_WHILE_TRACKER_LOCK_HELD = """
import os, signal, threading, time
import multiprocessing.resource_tracker as rt
from parallel_queue import ParallelQueue

held, release = threading.Event(), threading.Event()

def hold():  # as the dispatcher does while it starts a worker under spawn
    with rt._resource_tracker._lock:
        held.set()
        release.wait(60)

rt.ensure_running()
t = threading.Thread(target=hold)
t.start()
assert held.wait(60)
pid = os.fork()
if pid == 0:
    with ParallelQueue(num_workers=1, mp_context={method!r}) as q:
        q.put(abs, -7)
        os._exit(0 if q.get(timeout=60) == 7 else 1)
release.set()
t.join()
deadline = time.monotonic() + 60
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        print("the child hung")
        break
    time.sleep(0.01)
else:
    print("the child's queue ran")
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_forked_while_a_thread_starts_a_process_can_start_its_own(method):
    """Interleaving: the program forks (os.fork) while our dispatcher thread
    starts a replacement worker under spawn or forkserver, holding
    multiprocessing's resource tracker lock; the child inherits the lock
    held by a thread it does not have, and its own first queue waited for it
    for ever (found by adversarial testing).  Forced here: a thread holds the
    lock while the program forks."""
    r = run_python(FORK_WHILE_TRACKER_LOCK_HELD.format(method=method), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "the child's queue ran"


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3+, Python 3.9+)")
def test_worker_death_is_seen_while_a_forked_helper_lives_on():
    """Regression: a task that forked a helper (no exec) handed it the write
    end of its worker's sentinel pipe, so when the worker later died nothing
    was noticed until the helper exited (forever, for a daemon).  The death
    is now seen from the process itself."""
    helper = None
    with ParallelQueue(num_workers=1) as q:
        try:
            q.put(fork_a_helper)
            helper = q.get(timeout=60)
            q.put(die, "sigkill")
            q.put(abs, -5)
            with pytest.raises(WorkerLostError):
                q.get(timeout=60)  # not 120 s: the helper is still alive
            assert q.get(timeout=60) == 5
            assert os.path.exists(f"/proc/{helper}")
        finally:
            if helper is not None:
                os.kill(helper, signal.SIGKILL)


class KillsWhenPickled:
    """A result whose pickling kills its worker (a segfault in a C
    extension's __reduce__, the OOM killer while pickling)."""

    def __reduce__(self):
        os._exit(9)


def return_killer():
    return KillsWhenPickled()


def close_inherited_descriptors():
    os.closerange(3, 1000)
    return "closed"


@pytest.mark.parametrize("batch", [1, 50])
@pytest.mark.parametrize("task", [return_killer, close_inherited_descriptors])
def test_worker_dying_after_its_task_returned_is_one_error_in_its_slot(task, batch):
    """Regression: a worker that died after the task returned but before the
    result left it (killed while pickling the result, or the task closed the
    worker's pipes) was blamed on nobody: the packet ran again, and again
    (workers_replaced past 1,000 in seconds), and the next get() never
    returned.  Now the task gets WorkerLostError in its slot, and its
    neighbours, in its packet or not, come out."""
    with ParallelQueue(num_workers=2, max_batch=batch) as q:
        for i in range(20):
            q.put(pow, i, 2)
        q.put(task)
        for i in range(20, 40):
            q.put(pow, i, 2)
        got = []
        for _ in range(41):
            try:
                got.append(q.get(timeout=60))
            except WorkerLostError as e:
                got.append(("lost", e.task_index, str(e)))
        assert q.stats().workers_replaced <= 10
    assert got[:20] == [i * i for i in range(20)] and got[21:] == [i * i for i in range(20, 40)]
    lost, index, message = got[20]
    assert (lost, index) == ("lost", 20)
    assert task.__name__ in message
    assert not q.is_alive()


class CrashesWhenLoaded:
    """An argument whose loader crashes the worker that unpickles it."""

    def __reduce__(self):
        return os._exit, (9,)


@pytest.mark.parametrize("chunksize", [1, 10])
def test_worker_dying_while_unpickling_an_argument_is_one_error_in_its_slot(chunksize):
    """Regression: in ``imap(str, items, chunksize=10)``, item 7's argument
    crashed the worker that unpickled it; item 0 of the packet was blamed,
    the retries found nothing to blame, and after three tries the queue
    broke with no result at all.  Now item 7 alone gets WorkerLostError."""
    items = [CrashesWhenLoaded() if i == 7 else i for i in range(30)]
    got = drain(imap(str, items, num_workers=2, chunksize=chunksize), WorkerLostError)
    assert got[:7] == [str(i) for i in range(7)] and got[8:] == [str(i) for i in range(8, 30)]
    assert got[7].startswith("WorkerLostError: task #7 (") and "unpickl" in got[7]


# ---------------------------------------------------------- a second round
# (faults found by trying to break the first round's fixes)


def pipe_bytes(fd):
    """Bytes waiting in the pipe whose end ``fd`` is (either end will do)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def block_forever():
    threading.Event().wait()


def gated_value(gate_path):
    while not os.path.exists(gate_path):  # (released by the test; no result can leave before)
        time.sleep(0.005)
    return "x"


def test_consumer_never_blocks_on_a_pipe_a_drain_already_emptied(tmp_path):
    """Regression: one select() in the consumer reported both the control
    pipe (a DRAIN for a dead worker Y) and worker X's result pipe.  Handled
    in that order, a DRAIN for X (dead too) read X's pipe to its end, and the
    stale event then made the consumer block for ever in a read of X's pipe.
    Forced with the consumer stopped while the events line up."""
    gate = tmp_path / "gate"
    q = ParallelQueue(num_workers=2, max_batch=1)
    try:
        engine = q._core.engine
        q.put(block_forever)
        q.put(gated_value, str(gate))
        wait_until(lambda: all(len(s.outstanding) == 1 for s in engine.slots))
        x = next(s for s in engine.slots if s.outstanding[0].first_task == 1)
        y = next(s for s in engine.slots if s is not x)
        # Y runs its task: killed before, it would be sent again, and run
        # for ever, rather than blamed.  Its stage says RUNNING a moment
        # before its task index leaves -1 (the batch's); a kill in between
        # rightly sends the packet again, as no task of it had started.
        y0 = y.index * PROGRESS_FIELDS
        wait_until(lambda: engine.progress[y0 + P_STAGE] == STAGE_RUNNING and engine.progress[y0 + P_ITEM] == 0)
        os.kill(engine.consumer.pid, signal.SIGSTOP)
        os.kill(y.proc.pid, signal.SIGKILL)
        wait_until(lambda: pipe_bytes(engine.ctrl_w.fd) > 0)  # DRAIN(Y): the control pipe first
        gate.touch()
        wait_until(lambda: pipe_bytes(x.results_w.fd) > 0)  # then X's result
        os.kill(x.proc.pid, signal.SIGKILL)  # DRAIN(X) follows on the control pipe
        wait_until(lambda: x.proc.ended())
        os.kill(engine.consumer.pid, signal.SIGCONT)
        with pytest.raises(WorkerLostError):
            q.get(timeout=60)
        assert q.get(timeout=60) == "x"
    finally:
        os.kill(engine.consumer.pid, signal.SIGCONT)
        q.terminate()


def returns_killer_after(blob):
    return KillsWhenPickled()


def size(blob):
    return len(blob)


def test_packets_too_big_for_the_pipe_are_sent_again_after_a_crash():
    """Regression: after a crash, the packets the dead worker held went to
    its replacement one after the other; each too big for the task pipe
    registered the pipe for writing again, and the dispatcher died of it
    (KeyError: already registered), breaking the queue."""
    blob = b"x" * (2 << 20)  # more than the 1 MiB a task pipe holds
    with ParallelQueue(num_workers=1, max_batch=1) as q:
        q.put(returns_killer_after, blob)
        q.put(size, blob)
        q.put(size, blob)
        with pytest.raises(WorkerLostError):
            q.get(timeout=60)
        assert [q.get(timeout=60), q.get(timeout=60)] == [len(blob), len(blob)]


class FailsToLoad:
    """An argument that pickles, and raises ValueError when unpickled."""

    def __reduce__(self):
        return int, ("not a number",)


def test_a_batch_sent_again_counts_once_towards_max_tasks_per_worker():
    """Regression: a batch that would not unpickle in the worker was sent
    again, and its tasks counted twice towards the worker's quota: the
    dispatcher thought the quota used up, the worker did not, and the next
    get() waited for ever."""
    with ParallelQueue(num_workers=1, max_tasks_per_worker=2) as q:
        got = []
        for item in (FailsToLoad(), "second", "third", "fourth"):
            q.put(identity, item)
            try:
                got.append(q.get(timeout=60))
            except pickle.UnpicklingError:
                got.append("UnpicklingError")
    assert got == ["UnpicklingError", "second", "third", "fourth"]


class SlowToPickle:
    def __reduce__(self):
        threading.Event().wait()
        return str, ("never",)


class SlowToLoad:
    def __reduce__(self):
        return time.sleep, (3600,)


def return_slow_to_pickle():
    return SlowToPickle()


@pytest.mark.parametrize("where", ["result", "argument"])
@pytest.mark.parametrize("batch", [1, 50])
def test_task_timeout_covers_pickling_the_result_and_unpickling_the_arguments(where, batch):
    """Regression: task_timeout timed only the running of a task; a result
    whose pickling, or an argument whose unpickling, never ended hung the
    queue for ever.  Now that task fails with TaskTimeoutError, and the
    others come out."""
    with ParallelQueue(num_workers=1, task_timeout=0.5, max_batch=batch) as q:
        q.put(abs, -1)
        if where == "result":
            q.put(return_slow_to_pickle)
        else:
            q.put(identity, SlowToLoad())
        q.put(abs, -3)
        assert q.get(timeout=60) == 1
        with pytest.raises(TaskTimeoutError, match="task_timeout=0.5s") as info:
            q.get(timeout=60)
        assert q.get(timeout=60) == 3
    assert info.value.task_index == 1
    assert ("pickle its result" if where == "result" else "unpickle its arguments") in str(info.value)


class TakesSecondsToPickle:
    def __reduce__(self):
        time.sleep(3)
        return str, ("late",)


def slow_to_pickle_at(i):
    return TakesSecondsToPickle() if i == 7 else i


def test_task_timeout_times_each_result_of_a_batch_on_its_own():
    """Regression: a batch's results were pickled together, and that step
    was allowed task_timeout once per task in it: one result taking three
    seconds to pickle, among twenty quick ones, passed a task_timeout of
    0.5 s.  Each task's steps are now timed on their own."""
    with ParallelQueue(num_workers=1, task_timeout=0.5) as q:
        out = drain(q.imap(slow_to_pickle_at, range(20), chunksize=20), TaskTimeoutError)
    assert out[:7] == list(range(7)) and out[8:] == list(range(8, 20))
    assert out[7].startswith("TaskTimeoutError") and "pickle its result" in out[7]


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def exit_with_a_message():
    sys.exit("bye from unpickling")


class RaisesWhenLoaded:
    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        return {"KeyboardInterrupt": raise_keyboard_interrupt, "SystemExit": exit_with_a_message}[self.how], ()


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SystemExit"])
def test_a_loader_raising_a_base_exception_is_that_tasks_error_and_nothing_more(how, capfd):
    """Regression: KeyboardInterrupt or SystemExit("...") raised while a
    worker unpickled a batch escaped the worker: the error did land in its
    slot, but the worker died printing a traceback (or the message) first."""
    with ParallelQueue(num_workers=1) as q:
        q.put(identity, 1)
        q.put(identity, RaisesWhenLoaded(how))
        q.put(identity, 3)
        assert q.get(timeout=60) == 1
        with pytest.raises(pickle.UnpicklingError, match=how):
            q.get(timeout=60)
        assert q.get(timeout=60) == 3
        assert q.stats().workers_replaced == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "bye from" not in err


def leave_a_thread_running(i):
    threading.Thread(target=threading.Event().wait, daemon=False).start()
    return i


def test_a_task_that_leaves_a_thread_running_does_not_keep_its_worker():
    """Regression: a worker whose task left a non-daemon thread running never
    exited (multiprocessing waits for such threads): recycling hung, and
    stop() then join() never ended."""
    with ParallelQueue(num_workers=1, max_tasks_per_worker=1) as q:
        for i in range(3):
            q.put(leave_a_thread_running, i)
        assert [q.get(timeout=60) for _ in range(3)] == [0, 1, 2]
        q.stop()
        q.join(60)
        assert not q.is_alive()


def test_idle_workers_killed_from_outside_are_no_start_up_deaths():
    """Regression: a worker that had long passed worker_init_f and was killed
    while idle counted as dying at start-up: three such kills broke the
    queue with WorkerInitError."""
    with ParallelQueue(num_workers=2) as q:
        q.put(identity, 0)
        assert q.get(timeout=60) == 0
        engine = q._core.engine
        slot = engine.slots[1]
        for _ in range(4):  # more than MAX_STARTUP_DEATHS
            old = slot.proc
            # Past worker_init_f (its stage says so), then killed while idle.
            wait_until(lambda: engine.progress[slot.index * PROGRESS_FIELDS + P_STAGE] == STAGE_IDLE)
            os.kill(old.pid, signal.SIGKILL)
            wait_until(lambda old=old: slot.proc is not old)
        q.put(identity, 1)
        assert q.get(timeout=60) == 1


def _die_here():
    os.kill(os.getpid(), signal.SIGKILL)


class DiesWhenUnpickled:
    """A map's function that kills any process that unpickles it."""

    def __call__(self, x):
        return x

    def __reduce__(self):
        return (_die_here, ())


def test_a_maps_function_that_kills_its_worker_as_it_loads_fails_each_task_under_its_own_number():
    """The worker dies unpickling the map's function, twice (the second time
    one task at a time): the function is not sent again, and each task
    fails in its own slot with a WorkerLostError that names it (before, each
    slot had one same error, numbered -1).  The queue goes on."""
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -5)
        assert q.get(timeout=60) == 5  # (the queue's tasks numbered from 0: this is task #0)
        it = q.imap(DiesWhenUnpickled(), range(3), chunksize=3)
        for i in range(3):
            with pytest.raises(
                WorkerLostError, match=rf"^task #{i + 1} .*while unpickling the map's function"
            ) as caught:
                next(it)
            assert caught.value.task_index == i + 1
        assert next(it, None) is None
        q.put(abs, -6)
        assert q.get(timeout=60) == 6
