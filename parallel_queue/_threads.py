"""Helper threads that never take the process's Ctrl-C, waiting that a
Ctrl-C cannot break, and Ctrl-C held back while a queue starts its processes.

The kernel hands a process-directed signal to any thread that does not block
it.  When SIGINT lands on one of our helper threads (a dispatcher asleep in
epoll, say), Python's handler only sets a flag, and a main thread asleep in
a lock wait (a full ``put()``) or in ``poll()`` (``get()``) is never
interrupted: Ctrl-C would do nothing.  Our threads block SIGINT, so the
kernel delivers it to a thread that handles it.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional


def helper_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A daemon thread running ``target(*args)`` with SIGINT blocked (not started)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)


class _Recorder:
    """Python's SIGINT handler while a press is held back: it records the
    press for the program's own handler (``original``), called once the
    block is over."""

    __slots__ = ("original", "pressed")

    def __init__(self, original: Callable[[int, Any], Any]) -> None:
        self.original = original
        self.pressed: list[int] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed.append(signum)


def _program_handler_in_child() -> None:
    # A process the program forks from another thread while our main thread
    # holds a press back would inherit the recorder, and take no Ctrl-C for
    # the rest of its life (the program's exit then waits for it, if it is
    # not daemonic): it gets the program's handler back.
    handler = signal.getsignal(signal.SIGINT)
    original = handler
    while isinstance(original, _Recorder):
        original = original.original
    if original is not handler:
        signal.signal(signal.SIGINT, original)


os.register_at_fork(after_in_child=_program_handler_in_child)


@contextlib.contextmanager
def sigint_held_back() -> Iterator[None]:
    """Hold Ctrl-C back until the block is over, then deliver it.

    A queue starting up forks children and records them: a press landing in
    between used to break it in four ways (seen in stack dumps, under fork):
    a fresh child took the SIGINT before it could ignore it (a traceback, or
    a dead consumer); the KeyboardInterrupt was raised inside an after-fork
    hook, which swallows it; it came inside ``Process.start()`` after the
    fork, before the process was recorded (an unkillable worker); or between
    registering the queue for exit clean-up and starting its thread (a join
    of a thread never started, then a hang).  So:

    - SIGINT is blocked in this thread at the OS level: a child forked here
      inherits the mask, and the signal stays pending in it until it has set
      SIGINT to ignored (``_worker``, ``_consumer``), which discards it.
    - In the main thread, where Python runs its handlers, the Python-level
      handler only records a press while the block runs: a press the kernel
      gave to another thread of the program cannot raise in the middle.

    At the end the handler is put back and the signal unblocked: a pending
    press is delivered there, and a recorded one is handed to the handler,
    so the block raises ``KeyboardInterrupt`` once everything it started is
    recorded and can be cleaned up.  If the block failed meanwhile, the
    KeyboardInterrupt does not show that failure as its context: it is the
    press's doing (a fork server that took the same press and died makes
    ``Process.start()`` fail, for one), and one press shows one traceback.
    """
    recorder: Optional[_Recorder] = None
    handler: Any = None
    old_mask: Any = None
    swapped = False
    try:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                recorder = _Recorder(handler)
                signal.signal(signal.SIGINT, recorder)
                swapped = True
            else:
                handler = None  # SIG_IGN, SIG_DFL or a handler set outside Python: the mask suffices
    except BaseException:
        # A press from just before is raised by these very calls (each runs
        # the pending handlers): undo what was done, or SIGINT would stay
        # blocked in this thread for good, and let it through.
        if swapped:
            signal.signal(signal.SIGINT, handler)
        if old_mask is None or signal.SIGINT not in old_mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        raise
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if swapped:
            signal.signal(signal.SIGINT, handler)
        try:
            if signal.SIGINT not in old_mask:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending press lands here
            if recorder is not None and recorder.pressed:
                handler(signal.SIGINT, None)
        except KeyboardInterrupt as interrupt:
            interrupt.__suppress_context__ = failed
            raise


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """(main thread) A Ctrl-C during the block is raised as it ends, not in it.

    For a short step that a KeyboardInterrupt must not cut in two.  Python
    runs signal handlers in the main thread only, whichever thread the
    kernel gave the signal to, so swapping the Python-level handler for one
    that records the press covers every press (blocking SIGINT in this
    thread would not: the kernel would hand the press to another thread of
    the program, and Python would still raise it here).  About 12 us a
    block.  Unlike ``sigint_held_back`` the mask is left alone: for blocks
    that start no process.
    """
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or threading.current_thread() is not threading.main_thread():
        yield  # nothing raises here: SIG_IGN, SIG_DFL, or not the main thread
        return
    recorder = _Recorder(handler)
    signal.signal(signal.SIGINT, recorder)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if recorder.pressed:
            handler(signal.SIGINT, None)


def run_whole(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` until one run of it was not cut short by Ctrl-C, then
    raise the ``KeyboardInterrupt`` if one came.

    For the ``finally`` of a wait: a press can land at any call in it, and a
    clean-up left half done (a poller still marked, a pipe still counted as
    watched) makes every later getter, or ``terminate()``, wait for ever.
    ``cleanup`` must be idempotent: it may run again after an interrupted
    run, from its start.  The ``KeyboardInterrupt`` does not show an
    exception that was on its way out of the wait as its context (the end
    of a map's results, say): it is the press's doing, and one press shows
    one traceback (as in sigint_held_back).
    """
    interrupted: Optional[BaseException] = None
    while True:
        try:
            cleanup()
            break
        except KeyboardInterrupt as k:
            interrupted = k
    if interrupted is not None:
        interrupted.__suppress_context__ = True
        raise interrupted


def deadline(timeout: Optional[float]) -> Optional[float]:
    """When a wait of ``timeout`` seconds from now ends (None: never)."""
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return None if timeout is None else time.monotonic() + timeout


class Waiters:
    """Threads waiting for something that is announced under a lock (``guard``).

    Never Condition.wait() under ``with guard``: its Python code moves the
    lock in and out (Condition.__enter__, _release_save, _acquire_restore),
    and a Ctrl-C landing between those steps either leaves the lock held
    (every later terminate() then waits for it forever) or releases it
    twice.  A waiter here is a lock of its own: ``add()`` it under
    ``guard``, ``sleep()`` on it once ``guard`` is released, and
    ``release_all()`` (under ``guard``) wakes every one.  An interrupt
    anywhere leaves at most a stale waiter, which the next release_all()
    releases harmlessly.
    """

    __slots__ = ("guard", "_locks")

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self._locks: list[Any] = []

    def __len__(self) -> int:
        """Waiters not yet released (the tests check none is left behind)."""
        return len(self._locks)

    def add(self) -> Any:
        """(guard held) A waiter that the next release_all() releases."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._locks.append(waiter)
        return waiter

    def release_all(self) -> None:
        """(guard held) Wake every waiter."""
        for waiter in self._locks:
            waiter.release()
        self._locks.clear()

    def sleep(self, waiter: Any, timeout: Optional[float]) -> bool:
        """(guard not held) Sleep until released: True; or until ``timeout``
        seconds passed: False, and the waiter is withdrawn."""
        if timeout is None:
            waiter.acquire()
            return True
        if timeout > 0 and waiter.acquire(timeout=timeout):
            return True
        with self.guard:
            if waiter in self._locks:
                self._locks.remove(waiter)
        return False
