"""The life of a queue: one state, one writer, transitions in one place.

::

               stop()                the engine finished, then join()
      OPEN ------------> STOPPING -------------------------------+
        |                   |                                    v
        | a fault           | a fault                      (closed: every
        +------> BROKEN <---+                               process ended,
        |          +------ the engine ended, then join() --> every descriptor
        |          | terminate()                              released)
        |          v                                             ^
        +------> TERMINATED ---------------- at once ------------+
          terminate() (from STOPPING too)

- **OPEN**: ``put()`` takes tasks.
- **STOPPING**: ``stop()`` was called.  No task is taken any more; the ones
  put before it (``stopped_at`` of them) still run and come out, then
  ``get()`` raises ``QueueStopped``.
- **BROKEN**: the queue cannot go on (its consumer died, workers keep dying
  at start-up, an internal error): ``error`` says why.  Results that had
  already arrived still come out; then ``get()``, and ``put()`` at once,
  raise a copy of ``error``.
- **TERMINATED**: ``terminate()`` ended everything at once; what had not
  come out is lost.

``closed`` is apart from the state: the processes have ended and every
descriptor is released (after ``join()`` or ``terminate()``), whichever way
the queue ended (a queue collected unclosed is terminated: see _reaper).
``foreign`` marks the copy of a queue in a process forked from its owner:
that copy can only say it is not the child's.

Every transition is made with the queue's lock held (the owner of that
lock is ``_core.Core``), and so is every query a decision depends on.  A
few are read without it, where a stale answer only costs a look again:
``gone`` at the top of an engine's loop (it looks again under the lock
before it sleeps) and in its clean-up, ``closed`` and ``foreign`` (each set
once, never reset).  The transitions are idempotent: each
returns whether it changed anything, so ``stop()``, ``join()`` and
``terminate()`` may be called in any state, any number of times.
"""

from __future__ import annotations

import enum
import os
from typing import Optional

from ._errors import QueueClosedError, QueueStopped, fresh_copy

__all__ = ["State", "Lifecycle"]


class State(enum.Enum):
    OPEN = "open"
    STOPPING = "stopping"
    BROKEN = "broken"
    TERMINATED = "terminated"


class Lifecycle:
    """The state of one queue (see the module docstring); its only writer."""

    __slots__ = ("state", "stopped_at", "error", "closed", "owner_pid", "foreign")

    def __init__(self) -> None:
        self.state = State.OPEN
        # Tasks put before the stream ended: stop() or terminate() counts them.
        self.stopped_at: Optional[int] = None
        self.error: Optional[BaseException] = None  # why it broke
        self.closed = False
        self.owner_pid = os.getpid()
        self.foreign = False

    # ------------------------------------------------------------ transitions

    def stop(self, tasks_put: int) -> bool:
        """OPEN -> STOPPING: the stream ends after ``tasks_put`` tasks."""
        if self.state is not State.OPEN:
            return False
        self.state = State.STOPPING
        self.stopped_at = tasks_put
        return True

    def break_with(self, error: BaseException) -> bool:
        """OPEN or STOPPING -> BROKEN, because of ``error``."""
        if self.state not in (State.OPEN, State.STOPPING):
            return False
        self.state = State.BROKEN
        self.error = error
        return True

    def terminate(self, tasks_put: int) -> bool:
        """OPEN, STOPPING or BROKEN -> TERMINATED (not once closed)."""
        if self.state is State.TERMINATED or self.closed:
            return False
        self.state = State.TERMINATED
        if self.stopped_at is None:
            self.stopped_at = tasks_put
        return True

    def close(self) -> bool:
        """Everything has ended and is released; True the first time only."""
        if self.closed:
            return False
        self.closed = True
        return True

    def left_behind_by_fork(self) -> None:
        """In a process forked from the owner (no lock: see Core)."""
        self.foreign = True

    # ---------------------------------------------------------------- queries

    @property
    def accepting(self) -> bool:
        """Whether put() may take a task."""
        return self.state is State.OPEN

    @property
    def stopping(self) -> bool:
        return self.state is State.STOPPING

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    @property
    def gone(self) -> bool:
        """Terminated or broken: the dispatcher returns at once."""
        return self.state in (State.TERMINATED, State.BROKEN)

    def check_owner(self) -> None:
        """Raise RuntimeError in a forked child: only the owner can use the queue."""
        if self.foreign:
            raise RuntimeError(
                f"this queue belongs to process {self.owner_pid}, which made it; a process forked from"
                " there cannot use it (make a new queue in the child)"
            )

    def refusal(self, after_wait: bool = False) -> BaseException:
        """(not accepting) Why put() cannot take a task: the error to raise."""
        if self.error is not None:
            return fresh_copy(self.error)
        if self.state is State.TERMINATED:
            return QueueClosedError("the queue was terminated: it takes no more tasks")
        if after_wait:
            return QueueClosedError("stop() was called while put() waited: the queue takes no more tasks")
        return QueueClosedError("put() after stop(): the queue takes no more tasks")

    def end_of_results(self, delivered: int) -> Optional[BaseException]:
        """What get() raises once ``delivered`` results are out and nothing is in
        hand: None while more may come."""
        if self.error is not None:
            return fresh_copy(self.error)
        if self.stopped_at is not None and delivered >= self.stopped_at and self.state is State.STOPPING:
            return QueueStopped("the queue was stopped and every result was delivered")
        if self.state is State.TERMINATED:
            return QueueStopped("the queue was terminated")
        return None
