"""Helper threads that never take the process's Ctrl-C.

The kernel hands a process-directed signal to any thread that does not block
it.  When SIGINT lands on one of our helper threads (a dispatcher asleep in
epoll, say), Python's handler only sets a flag, and a main thread asleep in
a lock wait (a full ``put()``) or in ``poll()`` (``get()``) is never
interrupted: Ctrl-C would do nothing.  Our threads block SIGINT, so the
kernel delivers it to a thread that handles it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


def helper_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A daemon thread running ``target(*args)`` with SIGINT blocked (not started)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
