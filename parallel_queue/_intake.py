"""The put side of a queue: tasks waiting to be sent, markers, room.

``put()``'s common path appends a task to ``pending`` without the lock (a
lock round costs more than the rest of ``put()``).  It is sound because of
one protocol, which every path of this module follows:

- ``put()`` appends its task, *then* reads ``fast_put``; whoever clears
  ``fast_put`` (the dispatcher going to sleep, ``stop()``, ``terminate()``,
  a breaking queue, a map taking the queue over) does so under the lock,
  *then* looks at ``pending``.  Under the GIL these steps happen in some
  single order, so either the ``put()`` sees ``fast_put`` still set, and the
  one who cleared it sees the task; or the ``put()`` sees it cleared and
  settles under the lock (``settle_put``: wake the dispatcher, or withdraw a
  task that came after ``stop()``).
- Positions in the task stream are counts, ``dispatched + len(queued())``,
  read under the lock: a marker or ``stop()`` put at a count comes after
  every task appended before the read and before every task appended after
  it.
- The dispatcher takes tasks by exact pops from the left, never by copying
  ``pending`` and clearing it: a task appended between the two would be
  cleared away unseen.

Markers never leave the main process: each waits here, with the count of
tasks put before it, until ``get()`` reaches its place (see ``_delivery``).

Every method but the lock-free appends runs with the queue's lock held
("lock held") or takes it itself; the lock belongs to ``_core.Core``.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections import deque
from typing import Any, Callable, Iterator, Optional

from ._errors import QueueStopped
from ._lifecycle import Lifecycle
from ._options import Options
from ._stats import SAMPLE_EVERY, LatencySampler
from ._threads import Waiters, deadline
from ._wakeups import Wakeups

__all__ = ["Intake", "MapLease", "TaskBatch", "NOT_YET", "FEED_CHUNK"]

# Tasks a map's feeder appends per lock round, from an input in memory (see
# Intake.feed).  Larger means fewer rounds; in_q_max still bounds what is
# read ahead of the workers.
FEED_CHUNK = 256


class MapLease:
    """A map's hold on a queue: while it runs, only its feeder puts (see _maps).

    Its tasks wait in a deque of their own, never in the queue's: a plain
    ``put()`` whose lock-free append races with the map taking the queue
    over lands in the queue's deque, where the dispatcher does not look
    while the map runs, and where that ``put()`` finds it and withdraws it
    (see ``Intake.settle_put``).  In a shared deque the dispatcher could
    send it as the map's next input, and every later result moved by one.
    """

    __slots__ = ("pending", "end", "cancelled", "fn", "form", "chunksize", "holder")

    def __init__(self, fn: Optional[Callable[..., Any]], form: int, chunksize: Optional[int]) -> None:
        self.pending: deque[Any] = deque()  # its tasks not yet sent
        self.end: Optional[int] = None  # one past its last task, once the input ran out
        self.cancelled = False
        # Sent first in each of its packets (None: the workers have the
        # function already, a map on a queue of its own).
        self.fn = fn
        self.form = form  # what its items are (_tasks.ONE or STAR)
        self.chunksize = chunksize  # its packets' exact size, if it asked for one
        # A weak reference to the map's iterator on a caller's queue (see
        # abandoned()); None for a map on a queue of its own.
        self.holder: Optional[Callable[[], Any]] = None

    def abandoned(self) -> bool:
        """Its iterator was collected unclosed: the queue is to be given back
        (by the reaper, or by whoever wants the queue first: see _core)."""
        return self.holder is not None and self.holder() is None


class TaskBatch:
    """Tasks taken together for one packet (see Intake.take_tasks)."""

    __slots__ = ("items", "form", "map_fn")

    def __init__(self, items: list[Any], form: int, map_fn: Optional[Any]) -> None:
        self.items = items
        self.form = form  # what an item is (_tasks.CALL, ARGS, STAR, ONE)
        # A map's function, sent ahead of the items (a TaskError once it
        # killed the worker that unpickled it: every task then fails).
        self.map_fn = map_fn

    def payload_items(self) -> list[Any]:
        """What is pickled: the items, after a map's function if there is one."""
        return self.items if self.map_fn is None else [self.map_fn, *self.items]


# What a try of Intake.when_room() returns when there is no room yet.
NOT_YET = object()


class Intake:
    """``pending`` tasks, ``markers``, and everyone waiting for room."""

    def __init__(
        self,
        opts: Options,
        form: int,
        lock: Any,
        lifecycle: Lifecycle,
        wakeups: Wakeups,
        latency: LatencySampler,
        reclaim_map: Callable[[], bool],
    ) -> None:
        """The queue's ``lock``, ``lifecycle``, ``wakeups`` and ``latency`` are
        the core's (see _core); ``form``: what the queue's own task items are
        (_tasks.CALL or ARGS); ``reclaim_map()`` (no lock held) ends a map
        whose iterator was collected (see _core)."""
        self.lock = lock
        self.reclaim_map = reclaim_map
        self.lifecycle = lifecycle
        self.wakeups = wakeups
        self.latency = latency
        self.form = form
        self.in_q_max = opts.in_q_max  # (read by put()'s fast path)
        self.max_markers = opts.max_markers
        self.pending: deque[Any] = deque()
        self.dispatched = 0  # tasks taken from ``pending`` (by take_tasks)
        self.markers: deque[tuple[int, Any]] = deque()  # (tasks put before it, the marker)
        self.markers_put = 0
        self.markers_taken = 0
        # put() may append without the lock: accepting, no map running and
        # no dispatcher asleep waiting for tasks.  One flag for put()'s
        # fast path to read; refresh_fast_put() derives it.
        self.fast_put = True
        # Tickets: every put() draws one; one in SAMPLE_EVERY takes the
        # locked path and has its latency measured.
        self.put_ticket = itertools.count()
        # The map running on this queue: while there is one, only its feeder
        # puts and only its iterator gets.
        self.lease: Optional[MapLease] = None
        self.dispatcher_idle = False  # waiting for tasks, with credit to send them
        self.room = Waiters(self.lock)  # put()s waiting for room in a full queue

    # -------------------------------------------------------------- counts

    def queued(self) -> deque[Any]:
        """(lock held) Where the tasks to send next wait: the running map's
        own deque, or the queue's (see MapLease)."""
        lease = self.lease
        return self.pending if lease is None else lease.pending

    @property
    def tasks_put(self) -> int:
        """(lock held) Tasks accepted so far; fixed once the stream ended."""
        stopped_at = self.lifecycle.stopped_at
        return stopped_at if stopped_at is not None else self.dispatched + len(self.queued())

    def takeable(self) -> int:
        """(lock held) How many tasks the dispatcher may take now: after
        stop(), only those put before it; after terminate(), none (their
        deque was emptied: see drop_pending)."""
        waiting = len(self.queued())
        stopped_at = self.lifecycle.stopped_at
        return waiting if stopped_at is None else min(waiting, stopped_at - self.dispatched)

    # ------------------------------------------------------ the dispatcher's

    def take_tasks(self, n: int) -> TaskBatch:
        """(lock held) The next ``n`` tasks (n <= takeable()), as one batch."""
        pending = self.queued()
        waiting = len(pending)
        # Exactly n pops from the left (module docstring); starmap: in C.
        items = list(itertools.starmap(pending.popleft, itertools.repeat((), n)))
        self.dispatched += n
        if waiting >= self.in_q_max:
            self.room_freed()
        lease = self.lease
        if lease is not None:
            return TaskBatch(items, lease.form, lease.fn)
        return TaskBatch(items, self.form, None)

    def fixed_batch(self) -> Optional[int]:
        """(lock held) The exact packet size asked for (an imap's chunksize), if any."""
        return None if self.lease is None else self.lease.chunksize

    def may_dispatcher_sleep(self) -> bool:
        """(lock held) The dispatcher is about to sleep until a put() wakes it.
        Clears ``fast_put`` first, then looks at ``pending`` (module
        docstring): False, and it stays awake, if a task is there already."""
        self.dispatcher_idle = True
        self.refresh_fast_put()
        if self.takeable():
            self.dispatcher_awake()
            return False
        return True

    def dispatcher_awake(self) -> None:
        """(lock held) The dispatcher is running again: put() may go fast."""
        self.dispatcher_idle = False
        self.refresh_fast_put()

    # ---------------------------------------------------------------- putting

    def refresh_fast_put(self) -> None:
        """(lock held) After a change to what ``fast_put`` is derived from.  The
        caller looks at ``pending`` only after it (module docstring)."""
        self.fast_put = self.lifecycle.accepting and self.lease is None and not self.dispatcher_idle

    def close_fast_path(self) -> None:
        """(lock held) The stream is about to end (stop, terminate, a fault, or
        a fork left this copy behind): from now on every put() settles under
        the lock.  Before counting."""
        self.fast_put = False

    def put_task(self, item: Any, timeout: Optional[float], sample: Optional[bool] = None) -> None:
        """put()'s locked path: wait for room, wake the dispatcher, sample latency."""
        self.lifecycle.check_owner()
        if sample is None:
            sample = not next(self.put_ticket) & (SAMPLE_EVERY - 1)

        def attempt(waited: bool) -> Any:
            if not self.check_can_put(waited) or len(self.pending) >= self.in_q_max:
                return NOT_YET
            if sample:
                self.latency.put_at(self.dispatched + len(self.pending))
            self.pending.append(item)
            self.wake_idle_dispatcher()
            return None

        self.when_room(timeout, attempt)

    def settle_put(self, item: Any) -> bool:
        """put() appended ``item`` without the lock, then found ``fast_put``
        cleared: finish under the lock.  The dispatcher may be asleep (wake
        it), or stop(), terminate(), a break or a map came in between the
        append and that read: the task stays if it was counted (by stop(),
        or taken by the dispatcher), and is withdrawn if not.  True if it
        was withdrawn: put() then takes its locked path, which raises why
        (or waits, see check_can_put)."""
        self.lifecycle.check_owner()
        with self.lock:
            if self.lifecycle.accepting and self.lease is None:
                self.wake_idle_dispatcher()
                return False
            pending = self.pending  # (never a map's: see MapLease)
            for k in range(len(pending) - 1, -1, -1):
                if pending[k] is item:
                    break
            else:
                return False  # already taken by the dispatcher: it was counted
            stopped_at = self.lifecycle.stopped_at
            if self.lifecycle.stopping and self.lease is None and stopped_at is not None:
                if self.dispatched + k < stopped_at:
                    return False  # counted by stop(): it runs
            # Came after stop() (or the queue is gone, or a map took it
            # over): tasks after it in ``pending`` came after it, so
            # withdrawing it moves no counted one.
            del pending[k]
            return True

    def put_many(
        self, items: Iterator[Any], count: int, timeout: Optional[float], lease: Optional[MapLease] = None
    ) -> bool:
        """Append up to ``count`` tasks from ``items``, as many as fit.

        Blocks (``queue.Full`` after ``timeout``) only while nothing fits.
        Returns True once ``items`` is used up.  The bulk path of a map's
        feeder (``lease``; QueueStopped once it is closed): one lock round
        per call instead of one per task.
        """
        self.lifecycle.check_owner()

        def attempt(waited: bool) -> Any:
            if lease is None:
                if not self.check_can_put(waited):
                    return NOT_YET
                pending = self.pending
            elif lease.cancelled:
                raise QueueStopped("the map was closed")
            elif not self.lifecycle.accepting:
                raise self.lifecycle.refusal(waited)
            else:
                pending = lease.pending
            before = len(pending)
            room = min(count, self.in_q_max - before)
            if room <= 0:
                return NOT_YET
            try:
                pending.extend(itertools.islice(items, room))
            finally:
                # Count what went in even if ``items`` raised half-way.
                if len(pending) > before:
                    self.latency.put_at(self.dispatched + before)
                    self.wake_idle_dispatcher()
            return len(pending) - before < room  # islice stops short only at the end

        return bool(self.when_room(timeout, attempt))

    def feed(self, items: Iterator[Any], lease: MapLease, in_memory: bool) -> None:
        """A map's feeder: every item of ``items`` becomes one of the map's
        tasks, as fast as the queue takes them; returns at the end of the
        input (QueueStopped once the map is closed, the queue's refusal once
        it takes no more).

        Any input that may wait (a pipe, a socket, a generator waiting for
        something) is read outside the lock: it holds up nobody else.
        (It was read under the lock: stats(), terminate() and the
        dispatcher's handling of a dead worker waited for as long as the
        input did, and the items read before the wait did not run.)

        An input ``in_memory`` (every iterable sized: a list, a range, an
        array) never waits: it is read in chunks, under the lock, one round
        each.  Any other input is read an item at a time, each one the
        dispatcher's to take as soon as it is read (a producer that writes
        its next item only once it has seen a result goes on): the item is
        appended
        without the lock, then the dispatcher is woken if it sleeps, the
        protocol of put()'s fast path (module docstring), with the lease's
        deque, where only this feeder appends.  A stop() or a closing of the
        map that comes between the check before a read and the append of
        the item read leaves that item uncounted: the map ends where it
        ended, before it.
        """
        self.lifecycle.check_owner()
        pending = lease.pending
        if in_memory:
            # Read under the lock, a chunk per round: no read of it waits.
            while not self.put_many(items, FEED_CHUNK, None, lease):
                pass
            return
        cap = self.in_q_max
        append = pending.append
        lifecycle = self.lifecycle
        self.feed_room(lease)
        for item in items:
            if len(pending) >= cap or lease.cancelled or not lifecycle.accepting:
                self.feed_room(lease)  # (raises if the map or the queue is closed)
            append(item)
            if self.dispatcher_idle:  # (read after the append: module docstring)
                with self.lock:
                    self.latency.put_at(self.dispatched + len(pending) - 1)
                    self.wake_idle_dispatcher()

    def check_feed(self, lease: MapLease) -> None:
        """(lock held) Raise if the map's feeder may put no more."""
        if lease.cancelled:
            raise QueueStopped("the map was closed")
        if not self.lifecycle.accepting:
            raise self.lifecycle.refusal()

    def feed_room(self, lease: MapLease) -> int:
        """Wait until the map may put more (raising if it never will): how
        many tasks, at most ``FEED_CHUNK``."""

        def attempt(waited: bool) -> Any:
            self.check_feed(lease)
            room = min(FEED_CHUNK, self.in_q_max - len(lease.pending))
            return room if room > 0 else NOT_YET

        return int(self.when_room(None, attempt))

    def put_marker(self, marker: Any, timeout: Optional[float]) -> None:
        self.lifecycle.check_owner()

        def attempt(waited: bool) -> Any:
            if not self.check_can_put(waited) or len(self.markers) >= self.max_markers:
                return NOT_YET
            self.markers.append((self.dispatched + len(self.pending), marker))
            self.markers_put += 1
            self.wakeups.getters.ring()
            return None

        self.when_room(timeout, attempt)

    def when_room(self, timeout: Optional[float], attempt: Callable[[bool], Any]) -> Any:
        """Run ``attempt(waited)`` under the lock until it finds room (returns
        anything but NOT_YET), sleeping on a waiter between tries (see
        _threads.Waiters: never a Condition, which Ctrl-C can break);
        ``queue.Full`` after ``timeout``."""
        until = deadline(timeout)
        waited = False
        while True:
            with self.lock:
                result = attempt(waited)
                if result is not NOT_YET:
                    return result
                lease = self.lease
                abandoned = lease is not None and lease.abandoned()
                if not abandoned:
                    waiter = self.room.add()
            if abandoned:
                # A map's iterator was collected: hand the queue back now
                # (outside the lock, see check_can_put), then try again.
                self.reclaim_map()
                continue
            remaining = None if until is None else until - time.monotonic()
            if not self.room.sleep(waiter, remaining):
                raise queue.Full
            waited = True

    def check_can_put(self, after_wait: bool) -> bool:
        """(lock held) Raise why put() cannot take a task now, if it cannot.
        False if it must wait: a map's iterator was collected, and the queue
        is to be given back first (see MapLease.abandoned, and when_room,
        which does it)."""
        if not self.lifecycle.accepting:
            raise self.lifecycle.refusal(after_wait)
        lease = self.lease
        if lease is not None:
            if lease.abandoned():
                return False
            raise RuntimeError("put() on a queue while its imap() runs (finish or close the map first)")
        return True

    # -------------------------------------------------------------- waking

    def wake_idle_dispatcher(self) -> None:
        """(lock held) A task was just appended: wake the dispatcher if it sleeps."""
        if self.dispatcher_idle:
            self.dispatcher_awake()
            self.wakeups.dispatcher.ring()

    def room_freed(self) -> None:
        """(lock held) Tasks or markers left a full queue: wake put() and aput()."""
        self.room.release_all()
        self.wakeups.putters.ring()

    def take_marker(self) -> Any:
        """(lock held, and the delivery's: only get() takes markers) The
        marker whose place get() has reached; there may be room for more."""
        marker = self.markers.popleft()[1]
        self.markers_taken += 1
        if len(self.markers) + 1 >= self.max_markers:
            self.room_freed()
        return marker

    # ------------------------------------------------------------------ maps

    def lease_to(self, lease: MapLease) -> None:
        """(lock held) A map takes the queue over: only its feeder puts now.
        Clears ``fast_put`` first: the caller looks at ``pending`` after
        (module docstring), and takes the queue back if a task is there."""
        self.lease = lease
        self.refresh_fast_put()

    def end_lease_input(self, lease: MapLease) -> None:
        """(lock held) The map's input ran out: its results end at the count
        put so far."""
        lease.end = self.dispatched + len(lease.pending)
        self.wakeups.getters.ring()

    def take_back(self, lease: MapLease) -> bool:
        """(lock held) The map is over: its feeder's next put raises
        QueueStopped, its tasks not sent yet are withdrawn (their items are
        in the map's form, which only its packets carry), and the queue
        takes tasks again.  False if ``lease`` was not the map running
        (any number of times)."""
        lease.cancelled = True
        lease.pending.clear()
        self.room_freed()  # the feeder, or put()s waiting for the queue back
        if self.lease is not lease:
            return False
        self.lease = None
        self.refresh_fast_put()
        return True

    def drop_pending(self) -> None:
        """(lock held, after terminate()) Tasks not yet sent will never run (a
        put() settling right now finds its task gone, counted as taken)."""
        self.pending.clear()
        if self.lease is not None:
            self.lease.pending.clear()
