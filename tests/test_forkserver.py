"""The package's fork server (``mp_context="forkserver"``) killed, or failing a
request: no queue breaks, no result is lost, no process is left.

The tests that kill the server run in a child interpreter: that orphans the
processes it had started, and they must be watched to their end there, not
left to the test process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import wait
from typing import Iterator

import pytest
from conftest import run_python, wait_until

from parallel_queue import ParallelQueue, _forkserver
from parallel_queue._forkserver import ForkServerProcess

PRELUDE = """
import multiprocessing.forkserver, os, signal
from parallel_queue import ParallelQueue, QueueBrokenError, QueueStopped, WorkerLostError, _forkserver

def get_all(q, n):
    out = []
    for _ in range(n):
        try:
            out.append(q.get(timeout=60))
        except WorkerLostError as e:
            out.append(("lost", e.exitcode, str(e)))
    return out

def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

def kill_server():
    pid = _forkserver._server._forkserver_pid
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # gone, not reaped: the next start finds it dead
    return pid

def pids(q):
    engine = q._core.engine
    return [s.proc.pid for s in engine.slots if s.proc is not None] + [engine.consumer.pid]
"""


def run(body: str) -> list[str]:
    r = run_python(PRELUDE + body, timeout=110)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout.splitlines()


def test_a_killed_fork_server_breaks_no_queue():
    """Regression: once our fork server was SIGKILLed, multiprocessing took
    its closed status pipe as the end of every process it had started, with
    exit code 255: the consumer, ending normally after stop(), was reported
    dead (QueueBrokenError, the results lost), and join() did not wait for
    processes still running.  Now their end is seen on their own pidfd, the
    consumer says it has delivered everything before it exits, a worker that
    dies after the kill is reported with its status unknown, and its
    replacement comes from a new server."""
    out = run("""
with ParallelQueue(num_workers=2, mp_context="forkserver") as q:
    q.put(abs, -1)
    assert q.get(timeout=60) == 1
    before = pids(q)
    kill_server()
    assert not any(gone(p) for p in before), "the queue's processes outlive the server"
    q.put(abs, -2)
    q.put(os._exit, 7)  # its worker ends, and the server that could say how is gone
    for i in range(3, 40):
        q.put(abs, -i)
    results = get_all(q, 39)
    print(results[0], results[2:] == list(range(3, 40)))
    lost = results[1]
    print(lost[0], lost[1], "how is unknown (the fork server that started it was killed)" in lost[2])
    print(q.stats().workers_replaced)
    after = pids(q)
    q.stop()
    print(list(q))  # the consumer's end after stop() is not its death
    try:
        q.get(timeout=60)
    except QueueStopped:
        print("stopped")
q.join()
print(all(gone(p) for p in before + after))
""")
    assert out == ["2 True", "lost None True", "1", "[]", "stopped", "True"]


# The server fails the request: killed after the check that it runs, before
# it is asked ("refused": the connection is refused), or stopped, asked, then killed ("eof": the request
# was sent, and the server's end closes with no answer).  From call ``at`` on,
# ``times`` times.
FAIL_REQUESTS = """
original = multiprocessing.forkserver.ForkServer.connect_to_new_process
calls = [0]

def failing(self, fds):
    calls[0] += 1
    if not {at} <= calls[0] < {at} + {times}:
        return original(self, fds)
    pid = self._forkserver_pid
    if "{how}" == "refused":
        # It dies after the check that it runs (which would start it again).
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        self.ensure_running = lambda: None
        try:
            return original(self, fds)
        finally:
            del self.ensure_running
    os.kill(pid, signal.SIGSTOP)
    try:
        return original(self, fds)
    finally:
        os.kill(pid, signal.SIGKILL)

multiprocessing.forkserver.ForkServer.connect_to_new_process = failing
"""


@pytest.mark.parametrize("how", ["refused", "eof"])
@pytest.mark.parametrize("at", [1, 2, 5], ids=["consumer", "worker", "replacement"])
def test_a_fork_server_that_fails_a_request_is_started_again(how, at):
    """Regression: a server that died as it was asked for a process (the
    consumer, a worker, or a replacement worker) made the construction raise
    a bare EOFError or ConnectionRefusedError, or broke the running queue
    with "internal error in the dispatcher thread: EOFError".  The server is
    now started again and asked once more: every result comes out."""
    out = run(
        FAIL_REQUESTS.format(at=at, times=1, how=how)
        + """
with ParallelQueue(num_workers=2, mp_context="forkserver", max_tasks_per_worker=1) as q:
    for i in range(8):
        q.put(abs, -i)
    print(get_all(q, 8), q.stats().workers_replaced >= 4, calls[0] > 5)
"""
    )
    assert out == [f"{list(range(8))} True True"]


@pytest.mark.parametrize("how", ["refused", "eof"])
def test_a_fork_server_that_fails_twice_gives_a_clear_error(how):
    """A server that fails twice in a row (started again in between): the
    construction raises ConnectionError saying so, and leaves nothing; a
    running queue that needs a replacement worker breaks with
    QueueBrokenError saying why, and its results so far come out first."""
    out = run(
        FAIL_REQUESTS.format(at=1, times=2, how=how)
        + """
try:
    ParallelQueue(num_workers=2, mp_context="forkserver")
except ConnectionError as e:
    print(type(e).__name__, "failed twice in a row" in str(e), multiprocessing.active_children())
calls[0] = -2  # the consumer and the worker start; its replacement fails twice
with ParallelQueue(num_workers=1, mp_context="forkserver", max_tasks_per_worker=2) as q:
    for i in range(4):
        q.put(abs, -i)
    got = []
    try:
        for i in range(4):
            got.append(q.get(timeout=60))
    except QueueBrokenError as e:
        print(got, "cannot start a worker to replace the one that ended" in str(e), "failed twice" in str(e))
"""
    )
    assert out == ["ConnectionError True []", "[0, 1] True True"]


# Preloaded by the fork server: the first time it has forked a process, it
# dies before it sends the process's pid (once: the flag file goes first).
DIE_AFTER_FORK = """
import multiprocessing.forkserver, os, signal

_write_signed = multiprocessing.forkserver.write_signed

def write_signed(fd, n):
    if n > 0 and os.path.exists({flag!r}):
        os.unlink({flag!r})
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_signed(fd, n)

multiprocessing.forkserver.write_signed = write_signed
"""


def test_a_fork_server_dying_between_fork_and_reply_leaves_nothing(tmp_path, monkeypatch):
    """The server forked a process and died before it said which: the
    request is made again of a new server, and the process forked for
    nothing exits without a word (it had printed an EOFError traceback, or,
    had its data been sent first, would have run a worker nobody knew of).
    Also: the program's set_forkserver_preload() list reaches our server."""
    flag = tmp_path / "die-once"
    flag.touch()
    (tmp_path / "die_after_fork.py").write_text(DIE_AFTER_FORK.format(flag=str(flag)))
    # On the path from the start: a fork server takes the environment's
    # path, not the program's sys.path.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = run(
        f"""
multiprocessing.set_forkserver_preload(["die_after_fork"])
with ParallelQueue(num_workers=2, mp_context="forkserver") as q:
    for i in range(6):
        q.put(abs, -i)
    print(get_all(q, 6), os.path.exists({str(flag)!r}))
"""
    )
    assert out == [f"{list(range(6))} False"]


def _blocked(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in the kernel (on a lock or in a read)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
            return f.read() not in ("", "0")
    except OSError:
        return False


@contextlib.contextmanager
def ended_under_a_stopped_server() -> Iterator[ForkServerProcess]:
    """A fork-server process that has ended while the server is SIGSTOPped
    (so it has not sent the status yet); the server goes on at the end of
    the block, and the process is joined (the caller closes it)."""
    mine, theirs = multiprocessing.Pipe()
    proc = ForkServerProcess(target=theirs.recv)
    proc.start()
    theirs.close()
    server = _forkserver._server._forkserver_pid
    os.kill(server, signal.SIGSTOP)
    try:
        mine.send(None)  # the process returns from recv() and exits 0
        assert wait([proc.sentinel], 60)
        yield proc
    finally:
        os.kill(server, signal.SIGCONT)
        mine.close()
    proc.join()


def test_two_threads_polling_one_ended_process_agree_on_its_status():
    """Regression: every thread that starts a process polls every child of
    the program (multiprocessing's _cleanup), and another may join it, so two
    threads can read one fork-server process's status at once.  The server
    writes it, then closes the pipe: the second reader found the pipe's end
    and called the status lost (exit code 255, "how is unknown").  Forced
    here: the server is stopped until both threads wait on the status of a
    process that has ended."""
    codes: list[object] = []
    with ended_under_a_stopped_server() as proc:
        # Blocking polls (join's): both wait for the status (one on the lock).
        pollers = [threading.Thread(target=lambda: codes.append(proc._popen.wait())) for _ in range(2)]
        for t in pollers:
            t.start()
        wait_until(lambda: all(_blocked(t) for t in pollers))
    for t in pollers:
        t.join(60)
    assert codes == [0, 0]
    assert proc.exitcode == 0 and not proc._popen.status_lost
    proc.close()


def test_a_process_given_up_after_its_fork_exits_without_a_word():
    """No descriptor left for the new process's pidfd (EMFILE: forced at
    that call, as when another thread takes the last descriptors after the
    queue reserved its own): the construction raises it, and the process
    the server had forked exits quietly (it printed an EOFError traceback:
    its data pipe was closed unsent)."""
    out = run("""
import errno
real = os.pidfd_open

def no_descriptor(pid, *flags):
    raise OSError(errno.EMFILE, "Too many open files")

os.pidfd_open = no_descriptor
try:
    ParallelQueue(num_workers=1, mp_context="forkserver")
except OSError as e:
    print(e.errno == errno.EMFILE, multiprocessing.active_children())
os.pidfd_open = real
with ParallelQueue(num_workers=1, mp_context="forkserver") as q:
    q.put(abs, -3)
    print(q.get(timeout=60))
""")
    assert out == ["True []", "3"]


def test_polling_an_ended_process_does_not_wait_for_a_stopped_server():
    """Found by adversarial testing: a poll that must not wait (every
    Process.start() in the program polls every child) blocked on the status
    of an ended process until the server, SIGSTOPped, went on.  It now says
    "not known yet" (None), as multiprocessing's own Popen does, and the
    status once the server has sent it."""
    got: list[object] = []
    with ended_under_a_stopped_server() as proc:
        poller = threading.Thread(target=lambda: got.append(proc.exitcode))
        poller.start()
        poller.join(60)  # a bound for the failure only: the call returns at once
        assert got == [None]
    assert proc.exitcode == 0
    proc.close()


def test_a_released_child_can_still_be_polled_by_another_threads_cleanup():
    """Found by adversarial testing (Python 3.9): every Process.start() polls
    the children in a list taken first (multiprocessing's _cleanup), and
    Process.close() set ``_popen`` to None under it: AttributeError in the
    other thread (a queue's dispatcher: "internal error").  The interleaving
    is forced: the list is taken, the queue's worker ends and is released,
    then 3.9's loop runs over the list."""
    with ParallelQueue(num_workers=1, mp_context="forkserver", max_tasks_per_worker=1) as q:
        first = q._core.engine.slots[0].proc
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        wait_until(lambda: first.released)  # recycled after its one task, and replaced
        old = first.proc
    taken = [old]  # as in a list taken before the release
    for p in taken:
        assert p._popen.poll() == 0  # 3.9's _cleanup: p._popen.poll() with no check for None
    assert old not in multiprocessing.process._children
