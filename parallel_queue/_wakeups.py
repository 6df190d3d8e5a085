"""Bells: how a sleeper that waits on descriptors is told to look again.

Whoever waits for a result or for room, and sleeps in ``poll()`` or in an
event loop (a getter thread, a coroutine in ``aget``/``aput``), listens to a
bell of its own: a non-blocking pipe that one byte makes readable.  Whoever
changes what they wait for (a marker put, results read, ``stop()``, a
breaking queue, room freed) rings every bell listening, under the queue's
lock.

One bell per sleeper, not one pipe shared by all: with a shared pipe and a
byte per sleeper, a sleeper could take a byte that another's ``poll()`` had
seen, and that one then blocked in its read (a thread's ``get(timeout=20)``
stuck past its timeout, a coroutine spinning).  A bell is only ever emptied
by its own sleeper, when it starts listening again.

Threads that wait for room in ``put()`` sleep on a lock of their own instead
(see ``_threads.Waiters``); this module is for those that must watch
descriptors.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from . import _wire

__all__ = ["Bell", "Bells", "Wakeups"]


class Bell:
    """A non-blocking pipe: ``ring()`` makes ``fileno()`` readable until ``clear()``."""

    __slots__ = ("_r", "_w")

    def __init__(self) -> None:
        self._r, self._w = _wire.make_pipe()
        os.set_blocking(self._r.fd, False)
        os.set_blocking(self._w.fd, False)

    def fileno(self) -> int:
        return self._r.fd

    def ring(self) -> None:
        try:
            os.write(self._w.fd, b"\0")
        except OSError:  # full: rung already (or closed after the queue ended)
            pass

    def clear(self) -> None:
        # Asked first, then read at once: reading an empty bell raises
        # BlockingIOError, and a Ctrl-C landing while that is handled (any
        # bytecode may take it before Python 3.11) shows it as its context,
        # two tracebacks for one press.  A bell holds at most one pipe's
        # capacity (64 KiB): a short read leaves it empty.
        fd = self._r.fd
        while fd >= 0 and _wire.readable(fd, 0):
            if len(os.read(fd, 1 << 16)) < 1 << 16:
                return

    @property
    def closed(self) -> bool:
        return self._r.fd < 0

    def close(self) -> None:
        _wire.close_fd(self._r)
        _wire.close_fd(self._w)


class Bells:
    """The bells of everyone waiting for one kind of news (results, room).

    Every method is called with the queue's lock held.  A sleeper
    ``listen()``s (which empties its bell), then checks the queue's state,
    then sleeps watching its bell, then ``stop_listening()``: any change
    made after its check rings the bell it watches, so no wake-up is lost.
    Bells handed out by ``for_owner()`` (one per event loop) are kept; once
    ``close()`` is called they are closed as soon as nobody listens.
    """

    __slots__ = ("_listening", "_by_owner", "_all", "closed")

    def __init__(self) -> None:
        self._listening: set[Bell] = set()
        self._by_owner: weakref.WeakKeyDictionary[Any, Bell] = weakref.WeakKeyDictionary()
        self._all: list[Bell] = []
        self.closed = False

    def __len__(self) -> int:
        """How many sleepers listen now."""
        return len(self._listening)

    def for_owner(self, owner: Any) -> Bell:
        """The bell of ``owner`` (an event loop: its coroutines wait on the
        queue one at a time, see _aio), made on first use."""
        bell = self._by_owner.get(owner)
        if bell is None or bell.closed:
            bell = self._by_owner[owner] = Bell()
            self._all.append(bell)
        return bell

    def listen(self, bell: Bell) -> None:
        bell.clear()
        self._listening.add(bell)

    def stop_listening(self, bell: Bell) -> None:
        """(idempotent) And close it, if the queue has ended meanwhile."""
        self._listening.discard(bell)
        if self.closed and bell in self._all:
            bell.close()

    def ring(self) -> None:
        for bell in self._listening:
            bell.ring()

    def close(self) -> None:
        """Close every bell nobody listens to now; the others as they stop."""
        self.closed = True
        for bell in self._all:
            if bell not in self._listening:
                bell.close()


class Wakeups:
    """Every bell of one queue, and their closing.

    ``dispatcher``: the dispatcher thread sleeps on it when it has credit
    but no task (see _intake).  ``getters``: those waiting for a result.
    ``putters``: coroutines waiting for room (threads wait on locks, see
    _intake).  Every ring happens under the queue's lock, and ``close()``
    too, so no ring can hit a descriptor closed, and its number reused.
    """

    __slots__ = ("dispatcher", "getters", "putters")

    def __init__(self) -> None:
        self.dispatcher = Bell()
        self.getters = Bells()
        self.putters = Bells()

    def close(self) -> None:
        """(lock held) The queue has ended; bells in use close as they are left."""
        self.dispatcher.close()
        self.getters.close()
        self.putters.close()
