"""Clean-up for objects collected before they were closed, in a thread of its own.

A queue dropped without ``stop()``/``join()`` must still end its processes,
and a map dropped half-way on a caller's queue must still give the queue
back.  That clean-up must not run inside garbage collection: a finalizer
runs in whichever thread happens to collect, which may hold the queue's
lock at that moment (the clean-up then deadlocks on it), and an exception
raised in it, a ``KeyboardInterrupt`` from Ctrl-C included, is swallowed.

So all that runs at collection is the weak reference's callback, which is
``SimpleQueue.put`` itself: C code, made to be called from finalizers and
weakref callbacks (it takes no lock a Python thread can hold).  It hands
the dead reference to the reaper thread, which runs the clean-up with no
lock held and SIGINT blocked (see _threads).

The reaper runs while something is watched and ends when nothing is: a
program whose queues are all closed has no thread of ours left.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from typing import Any, Callable, Optional

from ._threads import helper_thread

__all__ = ["Watch", "watch"]

# Everything below is guarded by _lock, but the queue, whose put() is the
# weakref callback and takes no lock of ours.
_lock = threading.Lock()
_dead: queue.SimpleQueue[Any] = queue.SimpleQueue()
# id(weak reference) -> (the reference, what to run once its object is gone).
# The entry holds the reference alive; removing it drops the reference, whose
# callback then never runs.
_actions: dict[int, tuple[weakref.ref[Any], Callable[[], Any]]] = {}
_reaper: Optional[threading.Thread] = None


class Watch:
    """A registration made by ``watch()``; ``cancel()`` it once the object is closed."""

    __slots__ = ("_ref",)

    def __init__(self, ref: weakref.ref[Any]) -> None:
        self._ref: Optional[weakref.ref[Any]] = ref

    def cancel(self) -> bool:
        """Nothing is to be run when the object is collected.  True if the
        clean-up had not run (nor started) yet; any number of times."""
        ref, self._ref = self._ref, None
        if ref is None:
            return False
        with _lock:
            entry = _actions.get(id(ref))
            if entry is None or entry[0] is not ref:
                return False  # the reaper has it already
            del _actions[id(ref)]
            if not _actions:
                _dead.put(None)  # wake the reaper, so that it ends
            return True


def watch(obj: Any, action: Callable[[], Any]) -> Watch:
    """Run ``action()`` in the reaper thread once ``obj`` is collected,
    unless the returned watch is cancelled first.  ``action`` must not hold
    ``obj``.  Call it with Ctrl-C held back (see _threads.sigint_held_back):
    it may start the reaper thread."""
    global _reaper
    ref = weakref.ref(obj, _dead.put)
    with _lock:
        _actions[id(ref)] = (ref, action)
        if _reaper is None:
            _reaper = helper_thread(_reap, "parallel_queue-reaper")
            _reaper.start()
    return Watch(ref)


def _reap() -> None:
    global _reaper
    while True:
        ref = _dead.get()
        action = None
        with _lock:
            entry = _actions.get(id(ref)) if ref is not None else None
            if entry is not None and entry[0] is ref:
                del _actions[id(ref)]
                action = entry[1]
        if action is not None:
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - report it, and go on reaping
                threading.excepthook(
                    threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, threading.current_thread()))
                )
        with _lock:
            # Checked under the lock that watch() starts a reaper under: an
            # object watched from now on finds none and starts its own.
            if not _actions and _dead.empty():
                if _reaper is threading.current_thread():
                    _reaper = None
                return


def _after_fork_in_child() -> None:
    # The reaper thread does not exist in the child, and the lock may have
    # been copied held.  The queues watched are the parent's: forget them
    # (dropping their references disarms their callbacks).
    global _lock, _dead, _reaper
    _lock = threading.Lock()
    _dead = queue.SimpleQueue()
    _actions.clear()
    _reaper = None


os.register_at_fork(after_in_child=_after_fork_in_child)
