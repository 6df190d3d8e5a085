"""What every process the queue starts does first, worker or consumer.

- Ignore Ctrl-C: the main process decides what stops, so a child never dies
  of it half-way through a task or a packet.
- Close the queue descriptors it inherited but was not given (under fork).
- Watch for the main process's death, and exit at once when it comes.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading

from . import _wire
from ._wire import Fd


def start_child(keep: set[int], parent_alive: Fd) -> None:
    """The first steps of a worker or the consumer (see the module docstring)."""
    ignore_sigint()
    _wire.close_inherited_fds(keep | {parent_alive.fd})
    watch_parent(parent_alive)


def ignore_sigint() -> None:
    """Ignore Ctrl-C from now on.  A press that came while the parent held it
    back (see ``_threads.sigint_held_back``) is pending here, blocked;
    ignoring SIGINT before unblocking it discards that press."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def watch_parent(parent_alive: Fd) -> None:
    """Make this process exit as soon as the main process is gone.

    The main process holds the only write end of the pipe; when it dies,
    however it dies, the read end reports end-of-file.  Where the kernel can
    deliver that as a signal it does the watching (see ``_kernel_watch``);
    elsewhere a thread blocked in read() notices it, even while a task runs
    for hours.
    """
    if _kernel_watch(parent_alive):
        return

    def watch() -> None:
        try:
            while os.read(parent_alive.fd, 64):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parallel_queue-parent-watch", daemon=True).start()


def _kernel_watch(parent_alive: Fd) -> bool:
    """On Linux: have the kernel SIGKILL this process when the pipe hangs up.

    A read end in async mode (O_ASYNC) makes the kernel signal its owner when
    the last writer closes; F_SETSIG makes that signal SIGKILL, which no task
    can catch, block or delay, even deep in C code.  The owner belongs to the
    open file description, which every child of the main process shares, so
    this process first opens one of its own (through /proc).  No thread: a
    thread start was about 1 ms of each worker's start-up, on the way to the
    first result.  False where any step is unavailable (no /proc, another
    kernel): the caller then watches with a thread.
    """
    setsig = getattr(fcntl, "F_SETSIG", None)
    o_async = getattr(os, "O_ASYNC", None)
    if setsig is None or o_async is None:
        return False
    try:
        # O_NONBLOCK: opening a pipe's read end must not wait for a writer.
        fd = os.open(f"/proc/self/fd/{parent_alive.fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, setsig, signal.SIGKILL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | o_async)
    except OSError:
        os.close(fd)
        return False
    # The main process may have gone before O_ASYNC was set, and then no
    # signal comes: look once, now that a later hang-up cannot be missed.
    if _wire.readable(fd, 0):
        os._exit(3)
    # ``fd`` stays open for the life of this process: closing it ends the watch.
    return True
