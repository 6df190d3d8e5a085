"""The front of every queue: put(), markers, counters and wake-ups.

Both engines build on it: the process engine (``_engine``: our own worker
and consumer processes) and the executor engine (``_executor``: a thread
pool, a process pool or a Dask cluster the caller owns).  Everything here
runs in the caller's process, guarded by one lock, except put()'s fast
path, which appends to ``pending`` without it (a lock round costs more than
the rest of put()).  That path is sound because of one protocol:

- put() appends its task, *then* reads ``fast_put``; whoever clears
  ``fast_put`` (the dispatcher going to sleep, stop(), a breaking queue)
  does so under the lock, *then* looks at ``pending``.  Under the GIL these
  steps happen in some single order, so either the put() sees ``fast_put``
  still set, and the one who cleared it sees the task; or the put() sees it
  cleared and settles under the lock (``settle_put``: wake the dispatcher,
  or withdraw a task that came after stop()).
- Positions in the task stream are counts, ``dispatched + len(pending)``,
  read under the lock: a marker or stop() put at a count comes after every
  task appended before the read and before every task appended after it.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from . import _wire
from ._errors import QueueStopped, fresh_copy
from ._stats import SAMPLE_EVERY, LatencySampler, QueueStats
from ._threads import Waiters, deadline
from ._wakeups import Bells

if TYPE_CHECKING:
    from ._delivery import Delivery
    from ._engine import Options


class MapLease:
    """A map's hold on a queue (see Front.begin_map)."""

    __slots__ = ("end", "cancelled", "fn", "form", "chunksize")

    def __init__(self, fn: Callable[..., Any], form: int, chunksize: Optional[int]) -> None:
        self.end: Optional[int] = None  # one past its last, once the input ran out
        self.cancelled = False
        self.fn = fn  # sent first in each of its packets
        self.form = form  # what its items are (_worker.ONE or STAR)
        self.chunksize = chunksize  # its packets' exact size, if it asked for one


class TaskBatch:
    """Tasks taken together for one packet (see Front.take_tasks)."""

    __slots__ = ("items", "form", "map_fn")

    def __init__(self, items: list[Any], form: int, map_fn: Optional[Any]) -> None:
        self.items = items
        self.form = form  # what an item is (_worker.CALL, ARGS, STAR, ONE)
        # A map's function, sent ahead of the items (a TaskError once it
        # killed the worker that unpickled it: every task then fails).
        self.map_fn = map_fn

    def payload_items(self) -> list[Any]:
        """What is pickled: the items, after a map's function if there is one."""
        return self.items if self.map_fn is None else [self.map_fn, *self.items]


class Front:
    """Shared state and the put side of a queue; subclasses run the tasks."""

    def __init__(self, opts: Options) -> None:
        if opts.progress:
            from ._progress import require_tqdm

            require_tqdm()  # before anything starts
        self.opts = opts
        # The process that made the queue, the only one that can use it (a
        # forked child has copies of its objects, not its processes).
        self.owner_pid = os.getpid()
        self.foreign = False  # set in a forked child: see left_behind_by_fork()
        # Shared state in the main process, guarded by one lock.
        self.lock = threading.Lock()
        self.room = Waiters(self.lock)  # put()s waiting for room in a full queue
        self.pending: deque[Any] = deque()
        self.dispatched = 0  # tasks taken from ``pending`` (by take_tasks)
        self.markers: deque[tuple[int, Any]] = deque()
        self.markers_put = 0
        # put() may append without the lock: accepting, no map running and
        # no dispatcher asleep waiting for tasks (see the module docstring).
        # One flag for put()'s fast path to read; refresh_fast_put() derives it.
        self.fast_put = True
        # Tickets: every put() draws one; one in SAMPLE_EVERY takes the
        # locked path and has its latency measured.
        self.put_ticket = itertools.count()
        # The map running on this queue (ParallelQueue.imap): while there is
        # one, only its feeder puts and only its iterator gets.
        self.lease: Optional[MapLease] = None
        self.latency = LatencySampler()
        self.tasks_at_stop: Optional[int] = None
        self.terminated = False
        self.broken: Optional[BaseException] = None
        self.dispatcher_idle = False  # waiting for tasks, with credit to send them
        # Who sleeps watching descriptors, for a result (a getter thread in
        # poll(), coroutines in aget()) or for room (coroutines in aput()):
        # each listens to a bell of its own (see _wakeups).
        self.getters = Bells()
        self.putters = Bells()
        self.closed = False  # everything ended and every descriptor released
        self.accepting = True  # not stopped, broken or terminated
        self.in_q_max = opts.in_q_max  # for put()'s fast path

        self.fds = _wire.FdSet()  # every pipe of this queue's: closed by close()
        self.wake_r, self.wake_w = self.fds.pipe()  # wakes the dispatcher
        self.progress_bar: Any = None
        self.delivery: Delivery  # made by the engine, with its source of packets
        _fronts.add(self)

    def left_behind_by_fork(self) -> None:
        """In a child forked from the owner: the queue is not the child's.

        Runs in the child right after the fork, where no other thread exists
        and a lock may have been copied held, so it takes none.  Both fast
        paths are shut (``fast_put`` cleared, ``ready`` emptied of copied
        values), and every slow path starts with ``check_owner()``.
        """
        self.foreign = True
        self.fast_put = False
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            delivery.ready.clear()

    def check_owner(self) -> None:
        """Raise RuntimeError in a forked child: only the owner can use the queue."""
        if self.foreign:
            raise RuntimeError(
                f"this queue belongs to process {self.owner_pid}, which made it; a process forked from"
                " there cannot use it (make a new queue in the child)"
            )

    def show_progress(self, total: Optional[int] = None) -> None:
        """Start the progress bar (``total``: the number of results, if known)."""
        from ._progress import ProgressBar

        self.progress_bar = ProgressBar(self, total)

    # Wake-ups: one byte into a pipe the sleeper polls.  Always called with
    # ``lock`` held (see close()), so none can hit a closed descriptor.

    def wake_dispatcher(self) -> None:
        try:
            os.write(self.wake_w.fd, b"\0")
        except OSError:
            pass

    def room_freed(self) -> None:
        """Tasks or markers left a full queue: wake put() and aput() (lock held)."""
        self.room.release_all()
        self.putters.ring()

    def wake_all_getters(self) -> None:
        """(lock held) Everyone waiting for a result must look again (a marker,
        results read, stop, break, terminate)."""
        self.getters.ring()

    # ------------------------------------------------------------- putting

    @property
    def tasks_put(self) -> int:
        """Tasks accepted so far (exact under the lock)."""
        if self.tasks_at_stop is not None:
            return self.tasks_at_stop
        return self.dispatched + len(self.pending)

    def takeable(self) -> int:
        """(lock held) How many tasks the dispatcher may take now: after
        stop(), only those put before it."""
        if self.tasks_at_stop is None:
            return len(self.pending)
        return self.tasks_at_stop - self.dispatched

    def take_tasks(self, n: int) -> tuple[list[Any], int, Optional[Callable[..., Any]]]:
        """(lock held) The next ``n`` tasks (n <= takeable()), for the dispatcher:
        ``(items, form, map_fn)``, with the form of the items and the function
        a map's packets carry first (None: the queue's own)."""
        pending = self.pending
        waiting = len(pending)
        # Exactly n pops from the left, never ``list(pending)`` then
        # ``clear()``: a put() on its lock-free path may append between the
        # two, and clear() would drop that task unseen.  (starmap: the pops
        # run in C.)
        items = list(itertools.starmap(pending.popleft, itertools.repeat((), n)))
        self.dispatched += n
        if waiting >= self.opts.in_q_max:
            self.room_freed()
        lease = self.lease
        if lease is not None:
            return items, lease.form, lease.fn
        return items, self.opts.form, None

    def fixed_batch(self) -> Optional[int]:
        """(lock held) The exact packet size asked for (an imap's chunksize), if any."""
        lease = self.lease
        return self.opts.chunksize if lease is None else lease.chunksize

    def refresh_fast_put(self) -> None:
        """(lock held) After a change to what fast_put is derived from.  Every
        change that can clear it is made before this call, and the caller
        looks at ``pending`` only after it (module docstring)."""
        self.fast_put = self.accepting and self.lease is None and not self.dispatcher_idle

    def dispatcher_sleeps(self) -> bool:
        """(lock held) The dispatcher would sleep until a put() wakes it:
        False if a task is already there (then it must not sleep)."""
        self.dispatcher_idle = True
        self.refresh_fast_put()  # first; then look at pending
        if self.takeable():
            self.dispatcher_awake()
            return False
        return True

    def dispatcher_awake(self) -> None:
        """(lock held) The dispatcher is running again: put() may go fast."""
        self.dispatcher_idle = False
        self.refresh_fast_put()

    def put_task(self, item: Any, timeout: Optional[float], sample: Optional[bool] = None) -> None:
        """put()'s locked path: wait for room, wake the dispatcher, sample latency."""
        self.check_owner()
        if sample is None:
            sample = not next(self.put_ticket) & (SAMPLE_EVERY - 1)

        def attempt(waited: bool) -> Any:
            self.check_can_put(waited)
            if len(self.pending) >= self.opts.in_q_max:
                return NO_ROOM
            if sample:
                self.latency.put_at(self.dispatched + len(self.pending))
            self.pending.append(item)
            self.wake_idle_dispatcher()
            return None

        self.when_room(timeout, attempt)

    def settle_put(self, item: Any) -> None:
        """put() appended ``item`` without the lock, then found ``fast_put``
        cleared: finish under the lock.  The dispatcher may be asleep (wake
        it), or stop(), terminate() or a break came in between the append and
        that read: the task stays if stop() counted it, and is withdrawn (and
        put() raises) if not."""
        self.check_owner()
        with self.lock:
            if self.accepting and self.lease is None:
                self.wake_idle_dispatcher()
                return
            pending = self.pending
            for k in range(len(pending) - 1, -1, -1):
                if pending[k] is item:
                    break
            else:
                return  # already taken by the dispatcher: it was counted
            if self.broken is None and not self.terminated and self.tasks_at_stop is not None and self.lease is None:
                if self.dispatched + k < self.tasks_at_stop:
                    return  # counted by stop(): it runs
            # Came after stop() (or the queue is gone, or a map took it
            # over): tasks after it in ``pending`` came after it, so
            # withdrawing it moves no counted one.
            del pending[k]
            self.check_usable()
            self.check_no_map()

    def put_many(
        self, items: Iterator[Any], count: int, timeout: Optional[float], lease: Optional[MapLease] = None
    ) -> bool:
        """Append up to ``count`` tasks from ``items``, as many as fit.

        Blocks (``queue.Full`` after ``timeout``) only while nothing fits.
        Returns True once ``items`` is used up.  The bulk path of ``imap``:
        one lock round per call instead of one per task.  ``lease``: the map
        feeding (QueueStopped once it is closed).
        """
        self.check_owner()

        def attempt(waited: bool) -> Any:
            if lease is None:
                self.check_can_put(waited)
            elif lease.cancelled:
                raise QueueStopped("the map was closed")
            elif not self.accepting:
                self.check_usable(waited)
            before = len(self.pending)
            room = min(count, self.opts.in_q_max - before)
            if room <= 0:
                return NO_ROOM
            try:
                self.pending.extend(itertools.islice(items, room))
            finally:
                # Count what went in even if ``items`` raised half-way.
                if len(self.pending) > before:
                    self.latency.put_at(self.dispatched + before)
                    self.wake_idle_dispatcher()
            return len(self.pending) - before < room  # islice stops short only at the end

        return bool(self.when_room(timeout, attempt))

    def put_marker(self, marker: Any, timeout: Optional[float]) -> None:
        self.check_owner()

        def attempt(waited: bool) -> Any:
            self.check_can_put(waited)
            if len(self.markers) >= self.opts.max_markers:
                return NO_ROOM
            self.markers.append((self.dispatched + len(self.pending), marker))
            self.markers_put += 1
            self.wake_all_getters()
            return None

        self.when_room(timeout, attempt)

    def when_room(self, timeout: Optional[float], attempt: Callable[[bool], Any]) -> Any:
        """Run ``attempt(waited)`` under the lock until it finds room (returns
        anything but NO_ROOM), sleeping on a waiter between tries (see
        _threads.Waiters: never a Condition, which Ctrl-C can break);
        ``queue.Full`` after ``timeout``."""
        until = deadline(timeout)
        waited = False
        while True:
            with self.lock:
                result = attempt(waited)
                if result is not NO_ROOM:
                    return result
                waiter = self.room.add()
            remaining = None if until is None else until - time.monotonic()
            if not self.room.sleep(waiter, remaining):
                raise queue.Full
            waited = True

    def wake_idle_dispatcher(self) -> None:
        """(lock held) A task was just appended: wake the dispatcher if it sleeps."""
        if self.dispatcher_idle:
            self.dispatcher_awake()
            self.wake_dispatcher()

    def check_can_put(self, after_wait: bool) -> None:
        """(lock held) Raise why put() cannot take a task now, if it cannot."""
        if not self.accepting:
            self.check_usable(after_wait)
        self.check_no_map()

    def check_usable(self, after_wait: bool = False) -> None:
        """Raise the reason put() cannot take tasks any more (lock held)."""
        if self.broken is not None:
            raise fresh_copy(self.broken)
        if self.terminated:
            raise QueueStopped("the queue was terminated")
        if self.tasks_at_stop is not None:
            raise QueueStopped("stop() was called while put() waited" if after_wait else "put() after stop()")

    def check_no_map(self) -> None:
        """(lock held) put() is not for a queue a map has taken over."""
        if self.lease is not None:
            raise RuntimeError("put() on a queue while its imap() runs (finish or close the map first)")

    # ----------------------------------------------------------------- maps

    def begin_map(self, fn: Callable[..., Any], form: int, chunksize: Optional[int]) -> MapLease:
        """Take the queue over for a map (ParallelQueue.imap): it must be idle,
        every result put before taken, and no map running."""
        d = self.delivery
        with d.lock, self.lock:  # in this order, as Delivery takes them
            self.check_usable()
            if self.lease is not None:
                raise RuntimeError("another imap() is running on this queue")
            if self.markers or self.dispatched + len(self.pending) != d.moved + d.discard or d.ready or d.steps:
                raise RuntimeError("imap() on a queue with results not yet taken (get them first)")
            self.lease = MapLease(fn, form, chunksize)
            self.refresh_fast_put()
        return self.lease

    def end_map_input(self, lease: MapLease) -> None:
        """The map's input ran out: its results end at the count put so far."""
        with self.lock:
            lease.end = self.dispatched + len(self.pending)
            self.wake_all_getters()

    def cancel_map(self, lease: MapLease) -> None:
        """Stop the map's feeder (put_many raises QueueStopped)."""
        with self.lock:
            lease.cancelled = True
            self.room_freed()

    def release_map(self, lease: MapLease) -> None:
        """The map is over: results of its tasks not taken are dropped as they
        come, and the queue is the caller's again."""
        d = self.delivery
        with d.lock, self.lock:
            if self.lease is not lease:
                return
            # Its tasks not sent yet are withdrawn (their items are in the
            # map's form, which only its packets carry); the rest run.
            self.pending.clear()
            d.discard += self.dispatched - (d.moved + d.discard)
            self.lease = None
            self.refresh_fast_put()

    # ----------------------------------------------------------- lifecycle

    def stop(self) -> None:
        self.check_owner()
        with self.lock:
            if not self.closed:
                self.close_the_door()

    def close_the_door(self) -> None:
        """No more tasks (lock held): record where the stream ends, wake everyone."""
        self.accepting = False
        self.refresh_fast_put()  # first; then count (module docstring)
        if self.tasks_at_stop is None:
            self.tasks_at_stop = self.dispatched + len(self.pending)
        self.room_freed()
        self.wake_all_getters()
        self.wake_dispatcher()

    def begin_terminate(self) -> bool:
        """Mark the queue terminated; False if it already was (or is closed, or
        belongs to another process: a forked child's finalizers end quietly)."""
        if self.foreign:
            return False
        with self.lock:
            if self.terminated or self.closed:
                return False
            self.terminated = True
            self.close_the_door()
            # Tasks not yet sent will never run (a put() settling right now
            # finds its task gone and counts it as taken, as it was).
            self.pending.clear()
        return True

    def given_up(self) -> bool:
        """Terminated or broken: the dispatcher returns at once."""
        with self.lock:
            return self.terminated or self.broken is not None

    def end_dispatcher_then_kill(self, thread: threading.Thread) -> None:
        """After begin_terminate(): the dispatcher sees ``terminated`` at its next
        wake-up (just written) and returns; then this thread may reap and close."""
        if thread is not threading.current_thread() and thread.ident is not None:
            thread.join()
        self.kill_processes()

    def break_with(self, error: BaseException) -> None:
        """The queue cannot go on: record why, wake everyone, end the processes."""
        with self.lock:
            if self.broken is None and not self.terminated:
                self.broken = error
            self.accepting = False
            self.refresh_fast_put()
            self.room_freed()
            self.wake_all_getters()
        self.kill_processes()

    def stats(self) -> QueueStats:
        self.check_owner()
        d = self.delivery
        with self.lock:
            tasks_put, markers_put, pending = self.tasks_put, self.markers_put, len(self.pending)
            mean, p50, p99 = self.latency.summary()
            terminated = self.terminated
        packets, items = self.reorder_counts()
        delivered = d.delivered
        return QueueStats(
            tasks_put=tasks_put,
            results_delivered=delivered,
            errors=d.errors_raised,
            markers_put=markers_put,
            markers_delivered=d.markers_delivered,
            # After terminate() nothing is on its way any more.
            in_flight=0 if terminated else tasks_put - delivered,
            pending=pending,
            reorder_buffer_packets=packets,
            reorder_buffer_items=items,
            workers_alive=self.workers_alive(),
            workers_replaced=self.workers_replaced(),
            latency_mean=mean,
            latency_p50=p50,
            latency_p99=p99,
        )

    # What each engine provides.

    def terminate(self) -> None:
        """End everything at once; undelivered results are lost."""
        raise NotImplementedError

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until the engine has finished (after stop()); True if in time."""
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def workers_alive(self) -> int:
        raise NotImplementedError

    def workers_replaced(self) -> int:
        return 0

    def reorder_counts(self) -> tuple[int, int]:
        """(packets, tasks) waiting in the reorder buffer."""
        raise NotImplementedError

    def kill_processes(self) -> None:
        """End the engine's work at once (break_with)."""
        raise NotImplementedError


# What a when_room() attempt returns when there is no room yet.
NO_ROOM = object()

# Every queue of this process, for the after-fork hook below.
_fronts: weakref.WeakSet[Front] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for front in list(_fronts):
        front.left_behind_by_fork()
    _fronts.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
