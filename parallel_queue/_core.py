"""One queue in the main process: its parts, and how its life moves on.

A queue is made of parts, each the only writer of its own state:

- ``lifecycle`` (``_lifecycle``): open, stopping, broken or terminated;
- ``intake`` (``_intake``): tasks waiting to be sent, markers, room;
- ``wakeups`` (``_wakeups``): the bells of everyone who sleeps on a
  descriptor, and their closing;
- ``delivery`` (``_delivery``): results in order, for ``get()``;
- ``engine``: whatever runs the tasks (``_engine``: our own worker and
  consumer processes; ``_executor``: an executor the caller owns), seen
  through the ``Engine`` protocol below.

``Core`` holds them and owns the lock they share.  It carries out the
transitions of the lifecycle that touch several parts (``stop``,
``terminate``, ``fail``, ``close``), a map's taking the queue over and
handing it back (``begin_map``, ``end_map``), and answers ``stats()``.

Locks: ``lock`` guards every part but the delivery, which has a lock of its
own.  When both are taken, the delivery's comes first (get() takes them
so), written out as ``with self.delivery.lock, self.lock:``.  Not through a
context manager of ours: a KeyboardInterrupt can land in a Python-level
``__enter__`` after it took the locks and before the ``with`` block began,
and then nothing releases them (the next call that wants the lock, the
``terminate()`` that the interrupt sets off, deadlocks); a lock's own
``__enter__`` is C, and cannot be split from its ``__exit__`` so.  Neither
lock is ever held while waiting (see ``_threads.Waiters``).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - imported before our exit handler is registered: see there
import os
import threading
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ._intake import Intake, MapLease
from ._lifecycle import Lifecycle
from ._options import Options
from ._progress import ProgressBar, check_progress, tqdm_options
from ._stats import LatencySampler, QueueStats
from ._wakeups import Wakeups

if TYPE_CHECKING:
    from ._delivery import Delivery  # (made by the engine: see there)

__all__ = ["Core", "Engine"]


class Engine(Protocol):
    """What a queue needs of whatever runs its tasks.

    The engine reads the intake (under the core's lock) and hands packets of
    results, in order, to the delivery.  It asks the lifecycle what to do,
    and reports a fault with ``Core.fail``.
    """

    def wind_down(self) -> None:
        """(after terminate()) Stop running tasks: end the
        dispatching thread and every process, and wait until they ended."""

    def join(self, timeout: Optional[float]) -> bool:
        """(after stop()) Wait until every task put before it was run and
        handed over; True if that happened within ``timeout``."""

    def close(self) -> None:
        """(everything has ended; lock held) Release every descriptor."""

    def is_alive(self) -> bool: ...

    def workers_alive(self) -> int: ...

    def workers_replaced(self) -> int: ...

    def reorder_counts(self) -> tuple[int, int]:
        """(packets, tasks) waiting for earlier ones in the reorder buffer."""

    def left_behind_by_fork(self) -> None:
        """(in a forked child, no lock) Forget processes that are not the child's."""


class Core:
    """The parts of one queue (see the module docstring)."""

    def __init__(self, opts: Options, form: int) -> None:
        check_progress(opts.progress)  # before anything starts
        self.opts = opts
        self.lock = threading.Lock()
        self.lifecycle = Lifecycle()
        self.latency = LatencySampler()
        self.wakeups = Wakeups()
        self.intake = Intake(opts, form, self.lock, self.lifecycle, self.wakeups, self.latency, self.reclaim_map)
        self.delivery: Delivery  # made by the engine, with its source of packets
        self.engine: Engine
        self.progress_bar: Optional[ProgressBar] = None
        _cores.add(self)

    # ------------------------------------------------------------ transitions

    def wake_everyone(self) -> None:
        """(lock held) The queue's state changed for all who wait: put()s and
        aput()s waiting for room, getters, the dispatcher.  Each looks again."""
        self.intake.room_freed()
        self.wakeups.getters.ring()
        self.wakeups.dispatcher.ring()

    def stop(self) -> None:
        """OPEN -> STOPPING (nothing, in any other state)."""
        self.lifecycle.check_owner()
        with self.lock:
            if not self.lifecycle.accepting:
                return
            self.intake.close_fast_path()  # first; then count (see _intake)
            self.lifecycle.stop(self.intake.tasks_put)
            self.wake_everyone()

    def fail(self, error: BaseException) -> None:
        """The queue cannot go on (OPEN or STOPPING -> BROKEN): wake everyone.
        The engine, which found the fault or is told by the lifecycle, ends
        its processes."""
        with self.lock:
            self.fail_locked(error)

    def fail_locked(self, error: BaseException) -> None:
        """``fail()`` with the lock held already (the delivery finds a dead
        consumer while it holds it)."""
        self.intake.close_fast_path()
        if self.lifecycle.break_with(error):
            self.wake_everyone()

    def terminate(self) -> None:
        """End everything now; results not yet delivered are lost.  Returns
        once every process has ended and everything is released.  Quiet in
        every state, in a forked child too."""
        if self.lifecycle.foreign:
            return
        with self.lock:
            self.intake.close_fast_path()
            if self.lifecycle.terminate(self.intake.tasks_put):
                self.intake.drop_pending()
                self.wake_everyone()
            elif self.lifecycle.closed:
                return
        self.engine.wind_down()
        self.close()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until the engine finished (after stop(), terminate() or a
        fault), then release everything; True if it did within ``timeout``.
        Once closed, True at once."""
        self.lifecycle.check_owner()
        if self.lifecycle.closed:
            return True
        if not self.engine.join(timeout):
            return False
        self.close()
        return True

    def close(self) -> None:
        """Everything has ended: release every descriptor (once)."""
        if self.progress_bar is not None:
            self.progress_bar.close()
        self.delivery.close()
        with self.lock:
            if not self.lifecycle.close():
                return
            self.engine.close()
            self.wakeups.close()
        _forget(self)

    def close_unstarted(self) -> None:
        """The engine could not start (see its constructor): release what the
        parts opened.  Nobody can be waiting yet."""
        with self.lock:
            self.lifecycle.close()
            self.engine.close()
            self.wakeups.close()
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            delivery.close()
        _forget(self)

    # ------------------------------------------------------------------ maps

    def begin_map(self, lease: MapLease) -> None:
        """A map takes the queue over: it must be running and idle (every
        result put before taken, no marker waiting), with no map running
        (one whose iterator was collected is ended first)."""
        self.reclaim_map()
        with self.delivery.lock, self.lock:  # (the order: module docstring)
            intake = self.intake
            if not self.lifecycle.accepting:
                raise self.lifecycle.refusal()
            if intake.lease is not None:
                raise RuntimeError("another imap() is running on this queue")
            intake.lease_to(lease)  # first; then look at pending (see _intake)
            if intake.pending or intake.markers or not self.delivery.idle(intake.dispatched):
                intake.take_back(lease)
                raise RuntimeError("imap() on a queue with results not yet taken (get them first)")

    def end_map(self, lease: MapLease) -> None:
        """A map on a caller's queue is over (done, closed, or its iterator
        collected): hand the queue back.  Its feeder's next put raises
        QueueStopped; tasks already sent still run, and their results are
        dropped as they come.  Any number of times; no wait."""
        with self.delivery.lock, self.lock:  # (the order: module docstring)
            if self.intake.take_back(lease):
                self.delivery.discard_up_to(self.intake.dispatched)
                self.wakeups.getters.ring()

    def reclaim_map(self) -> bool:
        """(no lock held) If the map holding the queue was abandoned (its
        iterator collected unclosed), end it now rather than wait for the
        reaper (see _reaper) to.  True if no map holds the queue now."""
        lease = self.intake.lease
        if lease is None:
            return True
        if not lease.abandoned():
            return False
        self.end_map(lease)
        return self.intake.lease is None

    # ---------------------------------------------------------------- queries

    def is_alive(self) -> bool:
        self.lifecycle.check_owner()
        return self.engine.is_alive()

    def backlog(self) -> int:
        """Tasks and markers put whose result (or error, or the marker) get()
        has not handed out; 0 once terminated (nothing more will come)."""
        self.lifecycle.check_owner()
        with self.delivery.lock, self.lock:  # (the order: module docstring)
            if self.lifecycle.terminated:
                return 0
            intake, delivery = self.intake, self.delivery
            delivered = delivery.moved - len(delivery.ready)  # (see Delivery.delivered, whose lock is held)
            return intake.tasks_put - delivered + intake.markers_put - intake.markers_taken

    def full(self) -> bool:
        """A task put now would wait for room."""
        with self.lock:
            return len(self.intake.queued()) >= self.intake.in_q_max

    def stats(self) -> QueueStats:
        self.lifecycle.check_owner()
        delivered = self.delivery.delivered
        # Both locks: the latency sampler's put side is the intake's, its get
        # side the delivery's (see _stats).
        with self.delivery.lock, self.lock:  # (the order: module docstring)
            intake = self.intake
            tasks_put, pending = intake.tasks_put, len(intake.queued())
            markers_put, markers_taken = intake.markers_put, intake.markers_taken
            mean, p50, p99 = self.latency.summary()
            terminated = self.lifecycle.terminated
        packets, items = self.engine.reorder_counts()
        return QueueStats(
            tasks_put=tasks_put,
            results_delivered=delivered,
            errors=self.delivery.errors_raised,
            markers_put=markers_put,
            markers_delivered=markers_taken,
            # After terminate() nothing is on its way any more.
            in_flight=0 if terminated else tasks_put - delivered,
            pending=pending,
            reorder_buffer_packets=packets,
            reorder_buffer_items=items,
            workers_alive=self.engine.workers_alive(),
            workers_replaced=self.engine.workers_replaced(),
            latency_mean=mean,
            latency_p50=p50,
            latency_p99=p99,
        )

    def show_progress(self, progress: Any = True, total: Optional[int] = None) -> None:
        """Start the progress bar (``progress``: True or tqdm's keywords;
        ``total``: the number of results, if known)."""
        self.progress_bar = ProgressBar(lambda: self.delivery.delivered, tqdm_options(progress, total))

    # ------------------------------------------------------------ ownership

    def running(self) -> None:
        """The engine has started: end it at interpreter exit if nobody did."""
        _live.add(self)

    def left_behind_by_fork(self) -> None:
        """In a child forked from the owner: the queue is not the child's.

        Runs in the child right after the fork, where no other thread exists
        and a lock may have been copied held, so it takes none.  Both fast
        paths are shut (``fast_put`` cleared, ``ready`` emptied of copied
        values), and every slow path starts with ``check_owner()``.
        """
        self.lifecycle.left_behind_by_fork()
        self.intake.close_fast_path()
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            delivery.left_behind_by_fork()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.left_behind_by_fork()


# Every queue of this process not yet closed (for the after-fork hook), and
# those whose engine runs (for the exit handler).  Plain sets, not weak ones:
# a weak set runs Python code when an entry dies, during garbage collection,
# where a Ctrl-C landing is swallowed; a queue leaves them when it closes
# (the reaper ends one dropped without stop(): see _reaper).
_cores: set[Core] = set()
_live: set[Core] = set()


def _forget(core: Core) -> None:
    _cores.discard(core)
    _live.discard(core)


def _after_fork_in_child() -> None:
    for core in list(_cores):
        core.left_behind_by_fork()
    _cores.clear()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _terminate_all_at_exit() -> None:
    # Must run before multiprocessing's own exit handler, which joins every
    # non-daemonic child and would wait forever for the workers of a queue
    # nobody stopped.  Exit handlers run last-registered first, and
    # multiprocessing.util registers its handler when first imported, which
    # can be lazily, after us: hence its import at the top.
    for core in list(_live):
        core.terminate()


atexit.register(_terminate_all_at_exit)
