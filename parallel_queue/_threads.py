"""Helper threads that never take the process's Ctrl-C, and waiting that a
Ctrl-C cannot break.

The kernel hands a process-directed signal to any thread that does not block
it.  When SIGINT lands on one of our helper threads (a dispatcher asleep in
epoll, say), Python's handler only sets a flag, and a main thread asleep in
a lock wait (a full ``put()``) or in ``poll()`` (``get()``) is never
interrupted: Ctrl-C would do nothing.  Our threads block SIGINT, so the
kernel delivers it to a thread that handles it.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from typing import Any, Callable, Optional


def helper_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A daemon thread running ``target(*args)`` with SIGINT blocked (not started)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)


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
