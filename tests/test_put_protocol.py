"""put()'s lock-free fast path: each interleaving with the threads that clear
``fast_put`` (the dispatcher going to sleep, stop(), terminate()).

The fast path appends a task without the lock, then reads ``fast_put``
again (see parallel_queue/_intake.py).  The first tests drive one put()
against a bare queue core (no engine: see conftest), with a hook that runs
the other thread's step at the exact moment between put()'s steps, so each
interleaving happens every time.  One races real producer threads against
stop().
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Any, Callable, Optional

import pytest
from conftest import interrupt_main_thread_when, make_bare_core, sleeping_in

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueClosedError, QueueStopped
from parallel_queue._core import Core
from parallel_queue._intake import Intake, MapLease
from parallel_queue._stats import SAMPLE_EVERY
from parallel_queue._tasks import ONE
from parallel_queue._threads import Waiters


class HookedDeque(deque):
    """``pending`` with a hook run just before or just after the next append:
    where another thread could run between put()'s steps."""

    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[], None]] = None

    def append(self, x: Any) -> None:
        hook, self.before = self.before, None
        if hook is not None:
            hook()
        super().append(x)
        hook, self.after = self.after, None
        if hook is not None:
            hook()


@pytest.fixture
def front(bare_core):
    i = bare_core.intake
    i.pending = HookedDeque()
    # Draw tickets until the next put() takes the fast path (not sampled).
    while not (next(i.put_ticket) + 1) & (SAMPLE_EVERY - 1):
        pass
    return bare_core


def put_through(front: Core, cls: type = ParallelQueue) -> Callable[..., None]:
    """``cls``'s put(), on a bare core instead of a running queue's (a
    ParallelSingleTaskQueue's takes the arguments alone)."""
    q = cls.__new__(cls)
    q._core = front
    q._intake = front.intake
    if cls is ParallelQueue:
        return q.put  # type: ignore[no-any-return]
    return lambda fn, *args: q.put(*args)


def wake_bytes(front: Core) -> int:
    """Rings of the dispatcher's doorbell since the last look."""
    try:
        return len(os.read(front.wakeups.dispatcher.fileno(), 64))
    except BlockingIOError:
        return 0


def dispatcher_goes_to_sleep(front: Core) -> None:
    with front.lock:
        assert front.intake.may_dispatcher_sleep()  # it saw no task


@pytest.mark.parametrize("cls", [ParallelQueue, ParallelSingleTaskQueue])
def test_dispatcher_sleeping_between_append_and_reread_is_woken(front, cls):
    # put() checks fast_put (set), the dispatcher finds pending empty and
    # sleeps, put() appends: without the re-read and settle_put, the task
    # would wait until some later put() woke the dispatcher.
    front.intake.pending.before = lambda: dispatcher_goes_to_sleep(front)
    put_through(front, cls)(abs, -1)
    assert len(front.intake.pending) == 1
    assert wake_bytes(front) == 1
    assert not front.intake.dispatcher_idle and front.intake.fast_put


def test_dispatcher_looking_after_the_append_sees_the_task(front):
    # The other order: the append comes first, so the dispatcher must not
    # sleep (and put() has nobody to wake).
    def dispatcher_looks() -> None:
        with front.lock:
            assert not front.intake.may_dispatcher_sleep()

    front.intake.pending.after = dispatcher_looks
    put_through(front)(abs, -1)
    assert len(front.intake.pending) == 1
    assert wake_bytes(front) == 0
    assert front.intake.fast_put and not front.intake.dispatcher_idle


def test_stop_between_append_and_reread_counts_the_task(front):
    # stop() counts the task appended just before it: put() returns and the
    # task runs.
    front.intake.pending.after = front.stop
    put_through(front)(abs, -1)
    assert front.lifecycle.stopped_at == 1
    assert front.intake.takeable() == 1 and len(front.intake.pending) == 1


@pytest.mark.parametrize("cls", [ParallelQueue, ParallelSingleTaskQueue])
def test_stop_between_check_and_append_withdraws_the_task(front, cls):
    # put() saw fast_put set, then stop() counted 0 tasks, then put()
    # appended: the task came after stop(), so put() withdraws it and raises.
    put = put_through(front, cls)
    front.intake.pending.before = front.stop
    with pytest.raises(QueueClosedError, match="after stop"):
        put(abs, -1)
    assert front.lifecycle.stopped_at == 0
    assert len(front.intake.pending) == 0 and front.intake.takeable() == 0


def test_stop_between_check_and_append_keeps_counted_neighbours(front):
    put = put_through(front)
    for i in range(3):
        put(abs, i)
    front.intake.pending.before = front.stop
    with pytest.raises(QueueClosedError):
        put(abs, 99)
    assert [args for _, args, _ in front.intake.pending] == [(0,), (1,), (2,)]
    assert front.lifecycle.stopped_at == 3


def test_terminate_between_check_and_append_withdraws_the_task(front):
    front.intake.pending.before = front.terminate
    with pytest.raises(QueueClosedError, match="terminated"):
        put_through(front)(abs, -1)
    assert len(front.intake.pending) == 0


def test_terminate_leaves_nothing_to_take(front):
    """Regression: after terminate() emptied pending, takeable() still said
    stopped_at - dispatched, and a dispatcher mid-loop popped an empty deque
    (an IndexError, reported as an internal error)."""
    put = put_through(front)
    for i in range(3):
        put(abs, i)
    front.terminate()
    with front.lock:
        assert front.intake.takeable() == 0


def test_a_map_taking_the_queue_over_between_check_and_append_refuses_the_put(front):
    """Regression: put() saw fast_put set, then a map took the queue over,
    then put() appended: the dispatcher sent the task as the map's first
    input (with the map's function and form), put() found it gone, "taken,
    so counted", and returned; every result of the map moved by one.  The
    map's tasks now wait in a deque of their own: the dispatcher sends none
    of the put's, and put() withdraws its task and raises."""
    lease = MapLease(abs, ONE, None)
    sent = []

    def dispatcher_takes() -> None:
        with front.lock:
            sent.append(front.intake.take_tasks(front.intake.takeable()).items)

    front.intake.pending.before = lambda: front.begin_map(lease)
    front.intake.pending.after = dispatcher_takes
    with pytest.raises(RuntimeError, match="imap"):
        put_through(front)(pow, 2, 3)
    assert sent == [[]]
    assert len(front.intake.pending) == 0 and front.intake.lease is lease
    front.end_map(lease)
    assert front.intake.lease is None and front.intake.fast_put


def test_a_put_appended_before_a_map_takes_over_stops_the_map(front):
    """The other order: the task is in pending when the map looks, so the
    map refuses to start (the queue is not idle) and put() returns."""
    lease = MapLease(abs, ONE, None)
    refused = []

    def map_starts() -> None:
        with pytest.raises(RuntimeError, match="not yet taken"):
            front.begin_map(lease)
        refused.append(True)

    front.intake.pending.after = map_starts
    put_through(front)(pow, 2, 3)
    assert refused and front.intake.lease is None
    with front.lock:
        assert front.intake.takeable() == 1


def test_producers_racing_stop_lose_nothing_and_run_nothing_extra():
    # Every put() that returned has its result delivered; every put() that
    # raised QueueClosedError has none.  Four threads put as fast as they can
    # while stop() comes at some point.
    accepted: list[list[int]] = [[] for _ in range(4)]
    with ParallelQueue(num_workers=2, in_q_max=100_000) as q:
        started = threading.Barrier(5)

        def produce(t: int) -> None:
            started.wait()
            i = 0
            while True:
                task = t * 10_000_000 + i
                try:
                    q.put(abs, -task)
                except QueueClosedError:
                    return
                accepted[t].append(task)
                i += 1

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        started.wait()
        got = [q.get(timeout=60) for _ in range(5000)]
        q.stop()
        for t in threads:
            t.join(60)
        while True:
            try:
                got.append(q.get(timeout=60))
            except QueueStopped:
                break
    assert sorted(got) == sorted(x for a in accepted for x in a)
    for a in accepted:  # each thread's tasks come out in its order
        mine = set(a)
        assert [x for x in got if x in mine] == a
    with pytest.raises(queue.Empty):
        q.get(block=False)


class _InterruptedCondition(threading.Condition):
    """A Condition whose ``with`` is hit by Ctrl-C just after it took the
    lock, inside the Python code of __enter__: the interleaving that hung."""

    def __enter__(self) -> bool:
        self._lock.acquire()  # type: ignore[attr-defined]
        raise KeyboardInterrupt


def full_front(in_q_max: int = 1) -> Core:
    """A bare core whose pending is full: put() waits for room forever."""
    f = make_bare_core(in_q_max=in_q_max)
    for i in range(in_q_max):
        f.intake.pending.append((abs, (i,), None))
    return f


def close_front(f: Core) -> None:
    f.terminate()


# Where put() is interrupted: after its check, after it added its waiter
# (both under the lock), in its sleep (outside), and by a real SIGINT.
STEPS = [(Intake, "check_can_put"), (Waiters, "add"), (Waiters, "sleep"), "signal"]


@pytest.mark.parametrize("where", STEPS, ids=lambda w: w if isinstance(w, str) else w[1])
@pytest.mark.parametrize("call", ["put", "put_many", "put_marker"])
def test_interrupt_inside_a_waiting_put_leaves_nothing_held(monkeypatch, call, where):
    """Regression for a hung Ctrl-C: put() waited with Condition.wait under
    ``with condition:``, and a KeyboardInterrupt landing inside the Python
    code of Condition.__enter__ left the queue's lock held; terminate() then
    waited for it forever.  Interrupt a waiting put() at each of its steps,
    and with a real SIGINT while it sleeps: the lock is free afterwards, and
    the waiter it left does no harm."""
    with monkeypatch.context() as m:
        # Any Condition the queue makes is hit at its worst moment: put()
        # must not wait through one (a lock held by a Condition's ``with``
        # when the signal lands is never released).
        m.setattr(threading, "Condition", _InterruptedCondition)
        f = full_front()
    try:
        if call == "put_marker":  # markers waiting for get() up to their bound
            f.intake.markers.extend((0, "a marker") for _ in range(f.opts.max_markers))
        sender = None
        if where == "signal":
            main = threading.main_thread()
            assert main is threading.current_thread()
            # Sent once this thread's waiter is registered and it sleeps on it.
            sender = interrupt_main_thread_when(lambda: len(f.intake.room) == 1 and sleeping_in(main, "futex"))
        else:
            owner, name = where

            def interrupted(*args: Any, **kwargs: Any) -> Any:
                if name != "sleep":  # the step happened, then the signal came
                    original(*args, **kwargs)
                raise KeyboardInterrupt  # (in the sleep itself: instead of it)

            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                if call == "put":
                    put_through(f)(abs, -1)
                elif call == "put_many":
                    f.intake.put_many(iter([(abs, (-1,), None)]), 10, None)
                else:
                    f.intake.put_marker("another", None)
        finally:
            monkeypatch.undo()
            if sender is not None:
                sender.join(60)
        assert not f.lock.locked()
        f.stop()  # takes the lock, and releases whatever waiter was left
        assert len(f.intake.room) == 0
        with pytest.raises(QueueClosedError):
            put_through(f)(abs, -2)
    finally:
        close_front(f)


def test_put_timeout_while_waiting_for_room_leaves_no_waiter():
    f = full_front()
    try:
        with pytest.raises(queue.Full):
            f.intake.put_task((abs, (-1,), None), 0.05)
        with pytest.raises(queue.Full):
            f.intake.put_many(iter([1]), 1, 0.05)
        f.intake.markers.extend((0, "m") for _ in range(f.opts.max_markers))
        with pytest.raises(queue.Full):
            f.intake.put_marker("another", 0)
        assert len(f.intake.room) == 0 and not f.lock.locked()
    finally:
        close_front(f)


class TakenWhileAppending(deque):
    """``pending`` where a producer's lock-free append lands in the middle of
    the dispatcher taking tasks: between its copy and its removal of them."""

    late: Any = None

    def _append_late(self) -> None:
        late, self.late = self.late, None
        if late is not None:
            super().append(late)  # another thread's put(), without the lock

    def clear(self) -> None:
        self._append_late()
        super().clear()

    def popleft(self) -> Any:
        self._append_late()
        return super().popleft()


@pytest.mark.parametrize("batch", ["all", "some"])
def test_put_during_take_tasks_is_never_lost(front, batch):
    """Regression: take_tasks() took a whole batch as ``list(pending)`` then
    ``pending.clear()``; a put() appending between the two, without the lock,
    was cleared away unseen (1 task in 40,000 with a tiny switch interval),
    and stats agreed with the loss.  Forced here at that exact moment."""
    i = front.intake
    i.pending = TakenWhileAppending(i.pending)
    put = put_through(front)
    for k in range(3):
        put(abs, k)
    i.pending.late = (abs, (99,), None)
    n = 3 if batch == "all" else 2
    with front.lock:
        items = i.take_tasks(n).items
    assert [args for _, args, _ in items] == [(k,) for k in range(n)]
    assert [args for _, args, _ in i.pending] == [(k,) for k in range(n, 3)] + [(99,)]
    assert i.tasks_put == 4
