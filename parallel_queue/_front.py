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

import _thread
import itertools
import os
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from . import _wire
from ._errors import QueueStopped, fresh_copy
from ._stats import SAMPLE_EVERY, LatencySampler, QueueStats

if TYPE_CHECKING:
    from ._delivery import Delivery
    from ._engine import Options


class MapLease:
    """A map's hold on a queue (see Front.begin_map)."""

    __slots__ = ("start", "end", "cancelled", "fn", "form")

    def __init__(self, start: int, fn: Callable[..., Any], form: int) -> None:
        self.start = start  # the index of its first task
        self.end: Optional[int] = None  # one past its last, once the input ran out
        self.cancelled = False
        self.fn = fn  # sent first in each of its packets
        self.form = form  # what its items are (_worker.ONE or STAR)


class Front:
    """Shared state and the put side of a queue; subclasses run the tasks."""

    def __init__(self, opts: Options) -> None:
        if opts.progress:
            from ._progress import require_tqdm

            require_tqdm()  # before anything starts
        self.opts = opts
        # Shared state in the main process, guarded by one lock.
        self.lock = threading.Lock()
        self.room_waiters: list[Any] = []  # put()s waiting for room (see room_waiter)
        self.pending: deque[Any] = deque()
        self.dispatched = 0  # tasks taken from ``pending`` (by take_tasks)
        self.markers: deque[tuple[int, Any]] = deque()
        self.markers_put = 0
        # put() may append without the lock: accepting, and no dispatcher
        # asleep waiting for tasks (see the module docstring).
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
        self.getter_waiting = False
        # Coroutines waiting in aget() / aput(): they sleep on the get wake-up
        # pipe and on the room pipe through the event loop.
        self.async_getters = 0
        self.async_putters = 0
        self.closed = False  # everything ended and every descriptor released
        # put()'s fast path reads these two instead of four conditions.
        self.accepting = True  # not stopped, broken or terminated
        self.in_q_max = opts.in_q_max

        self.wake_r, self.wake_w = _wire.make_pipe()  # wakes the dispatcher
        self.room_r, self.room_w = _wire.make_pipe()  # wakes aput(): there is room again
        self.get_wake_r, self.get_wake_w = _wire.make_pipe()  # wakes a waiting get()
        self.progress_bar: Any = None
        self.delivery: Delivery  # made by the engine, with its source of packets

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
        for waiter in self.room_waiters:
            waiter.release()
        self.room_waiters.clear()
        if self.async_putters:
            try:
                os.write(self.room_w.fd, b"\0")
            except OSError:
                pass

    def wake_getter(self, waiters: int = 1) -> None:
        """One byte per waiter to wake: each waiter takes one (see _delivery)."""
        if waiters > 0:
            try:
                os.write(self.get_wake_w.fd, b"\0" * waiters)
            except OSError:
                pass

    def wake_all_getters(self) -> None:
        """Everyone waiting for a result must look again (stop, break, terminate)."""
        self.wake_getter(int(self.getter_waiting) + self.async_getters)

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

    def packet_form(self) -> tuple[int, Optional[Callable[..., Any]]]:
        """(lock held) The form of the tasks in ``pending``, and the function a
        map's packets carry first (None: the queue's own form)."""
        lease = self.lease
        if lease is not None:
            return lease.form, lease.fn
        return self.opts.form, None

    def take_tasks(self, n: int) -> list[Any]:
        """(lock held) The next ``n`` tasks (n <= takeable()), for the dispatcher."""
        pending = self.pending
        waiting = len(pending)
        if n == waiting:
            items = list(pending)
            pending.clear()
        else:
            take = pending.popleft
            items = [take() for _ in range(n)]
        self.dispatched += n
        if waiting >= self.opts.in_q_max:
            self.room_freed()
        return items

    def dispatcher_sleeps(self) -> bool:
        """(lock held) The dispatcher would sleep until a put() wakes it:
        False if a task is already there (then it must not sleep)."""
        self.fast_put = False  # first; then look at pending (module docstring)
        if self.takeable():
            self.fast_put = self.accepting and self.lease is None
            return False
        self.dispatcher_idle = True
        return True

    def dispatcher_awake(self) -> None:
        """(lock held) The dispatcher is running again: put() may go fast."""
        self.dispatcher_idle = False
        self.fast_put = self.accepting and self.lease is None

    def put_task(self, item: Any, timeout: Optional[float], sample: Optional[bool] = None) -> None:
        """put()'s locked path: wait for room, wake the dispatcher, sample latency."""
        if sample is None:
            sample = not next(self.put_ticket) & (SAMPLE_EVERY - 1)
        deadline = _deadline(timeout)
        waited = False
        while True:
            with self.lock:
                self.check_can_put(waited)
                if len(self.pending) < self.opts.in_q_max:
                    if sample:
                        self.latency.put_at(self.dispatched + len(self.pending))
                    self.pending.append(item)
                    if self.dispatcher_idle:
                        self.dispatcher_awake()
                        self.wake_dispatcher()
                    return
                waiter = self.room_waiter()
            self.wait_for_room(waiter, deadline)
            waited = True

    def settle_put(self, item: Any) -> None:
        """put() appended ``item`` without the lock, then found ``fast_put``
        cleared: finish under the lock.  The dispatcher may be asleep (wake
        it), or stop(), terminate() or a break came in between the append and
        that read: the task stays if stop() counted it, and is withdrawn (and
        put() raises) if not."""
        with self.lock:
            if self.accepting and self.lease is None:
                if self.dispatcher_idle:
                    self.dispatcher_awake()
                    self.wake_dispatcher()
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
        deadline = _deadline(timeout)
        waited = False
        while True:
            with self.lock:
                if lease is None:
                    self.check_can_put(waited)
                elif lease.cancelled:
                    raise QueueStopped("the map was closed")
                elif not self.accepting:
                    self.check_usable(waited)
                before = len(self.pending)
                room = min(count, self.opts.in_q_max - before)
                if room > 0:
                    try:
                        self.pending.extend(itertools.islice(items, room))
                    finally:
                        # Count what went in even if ``items`` raised half-way.
                        n = len(self.pending) - before
                        if n:
                            self.latency.put_at(self.dispatched + before)
                        if n and self.dispatcher_idle:
                            self.dispatcher_awake()
                            self.wake_dispatcher()
                    return n < room  # islice stops short only at the end of ``items``
                waiter = self.room_waiter()
            self.wait_for_room(waiter, deadline)
            waited = True

    def put_marker(self, marker: Any, timeout: Optional[float]) -> None:
        deadline = _deadline(timeout)
        waited = False
        while True:
            with self.lock:
                self.check_usable(waited)
                self.check_no_map()
                if len(self.markers) < self.opts.in_q_max:
                    self.markers.append((self.dispatched + len(self.pending), marker))
                    self.markers_put += 1
                    if self.getter_waiting or self.async_getters:
                        self.wake_getter()
                    return
                waiter = self.room_waiter()
            self.wait_for_room(waiter, deadline)
            waited = True

    # Waiting for room.  Never Condition.wait() under ``with lock``: Python
    # code moves the lock in and out (Condition.__enter__, _release_save),
    # and a Ctrl-C landing between its steps either leaks the lock (every
    # later terminate() hangs on it) or releases it twice.  A waiter here is
    # a lock of its own, registered under ``lock`` and slept on after it is
    # released: an interrupt anywhere leaves at most a stale waiter, which
    # room_freed() releases harmlessly.

    def room_waiter(self) -> Any:
        """(lock held) A waiter that room_freed() will release."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self.room_waiters.append(waiter)
        return waiter

    def wait_for_room(self, waiter: Any, deadline: Optional[float]) -> None:
        """Sleep (lock not held) until room_freed(); ``queue.Full`` at ``deadline``."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is None:
            waiter.acquire()
            return
        if remaining > 0 and waiter.acquire(timeout=remaining):
            return
        with self.lock:
            if waiter in self.room_waiters:
                self.room_waiters.remove(waiter)
        raise queue.Full

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

    def begin_map(self, fn: Callable[..., Any], form: int) -> MapLease:
        """Take the queue over for a map (ParallelQueue.imap): it must be idle,
        every result put before taken, and no map running."""
        d = self.delivery
        with d.lock, self.lock:  # in this order, as Delivery takes them
            self.check_usable()
            if self.lease is not None:
                raise RuntimeError("another imap() is running on this queue")
            if self.markers or self.dispatched + len(self.pending) != d.moved + d.discard or d.ready or d.steps:
                raise RuntimeError("imap() on a queue with results not yet taken (get them first)")
            self.lease = MapLease(self.dispatched + len(self.pending), fn, form)
            self.fast_put = False
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
            if not self.dispatcher_idle:
                self.fast_put = self.accepting

    # ----------------------------------------------------------- lifecycle

    def stop(self) -> None:
        with self.lock:
            self.close_the_door()

    def close_the_door(self) -> None:
        """No more tasks (lock held): record where the stream ends, wake everyone."""
        self.accepting = False
        self.fast_put = False  # first; then count (module docstring)
        if self.tasks_at_stop is None:
            self.tasks_at_stop = self.dispatched + len(self.pending)
        self.room_freed()
        self.wake_all_getters()
        self.wake_dispatcher()

    def begin_terminate(self) -> bool:
        """Mark the queue terminated; False if it already was (or is closed)."""
        with self.lock:
            if self.terminated or self.closed:
                return False
            self.terminated = True
            self.close_the_door()
        return True

    def end_dispatcher_then_kill(self, thread: threading.Thread) -> None:
        """After begin_terminate(): the dispatcher sees ``terminated`` at its next
        wake-up (just written) and returns; then this thread may reap and close."""
        if thread is not threading.current_thread():
            thread.join()
        self.kill_processes()

    def break_with(self, error: BaseException) -> None:
        """The queue cannot go on: record why, wake everyone, end the processes."""
        with self.lock:
            if self.broken is None and not self.terminated:
                self.broken = error
            self.accepting = False
            self.fast_put = False
            self.room_freed()
            self.wake_all_getters()
        self.kill_processes()

    def stats(self) -> QueueStats:
        d = self.delivery
        with self.lock:
            tasks_put, markers_put, pending = self.tasks_put, self.markers_put, len(self.pending)
            mean, p50, p99 = self.latency.summary()
        packets, items = self.reorder_counts()
        delivered = d.delivered
        return QueueStats(
            tasks_put=tasks_put,
            results_delivered=delivered,
            errors=d.errors_raised,
            markers_put=markers_put,
            markers_delivered=d.markers_delivered,
            in_flight=tasks_put - delivered,
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


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return None if timeout is None else time.monotonic() + timeout
