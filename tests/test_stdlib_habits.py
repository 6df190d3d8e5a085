"""What queue.Queue and Pool users reach for: qsize, empty, full, the
_nowait methods, join() before stop(), put() after stop(), and timeout=."""

from __future__ import annotations

import asyncio
import functools
import queue
import time

import pytest

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueClosedError, QueueStopped


def takes_timeout(x, timeout=None):
    return x, timeout


def test_qsize_and_empty_count_every_result_not_yet_handed_out():
    """qsize() counts tasks and markers put whose result get() has not
    returned, running or ready alike; empty() is qsize() == 0, so the loop
    ``while not q.empty(): q.get()`` collects everything put before it."""
    with ParallelQueue(num_workers=2) as q:
        assert q.qsize() == 0 and q.empty()
        q.put(abs, -1)
        q.put("marker")
        q.put(abs, -2)
        assert q.qsize() == 3 and not q.empty()
        assert q.get(timeout=60) == 1
        assert q.qsize() == 2
        got = []
        while not q.empty():
            got.append(q.get(timeout=60))
        assert got == ["marker", 2] and q.qsize() == 0
    q = ParallelQueue(num_workers=1)
    try:
        q.put(time.sleep, 600)  # running, not done: counted
        assert q.qsize() == 1
        with pytest.raises(queue.Empty):
            q.get_nowait()
    finally:
        q.terminate()
    assert q.qsize() == 0  # nothing more will come


def test_full_and_put_nowait():
    """full() says a put would wait (in_q_max tasks wait to be sent);
    put_nowait() raises queue.Full then, instead of waiting."""
    q = ParallelQueue(num_workers=1, in_q_max=2)
    try:
        q.put(time.sleep, 600)  # the worker is busy: tasks pile up
        for _ in range(10_000):
            if q.full():
                break
            q.put_nowait(abs, -1)
        assert q.full()
        put_before = q.stats().tasks_put
        with pytest.raises(queue.Full):
            q.put_nowait(abs, -1)
        assert q.stats().tasks_put == put_before
    finally:
        q.terminate()
    s = ParallelSingleTaskQueue(abs, num_workers=1)
    try:
        s.put_nowait(-5)
        assert s.get(timeout=60) == 5
    finally:
        s.terminate()


def test_join_before_stop_is_a_value_error_and_put_after_stop_says_closed():
    """join() before stop() would wait for ever: ValueError, as Pool.join().
    put() after stop() raises QueueClosedError, which is not a queue.Empty
    (a put that fails does not say "empty")."""
    q = ParallelQueue(num_workers=1)
    try:
        with pytest.raises(ValueError, match="before stop"):
            q.join()
        with pytest.raises(ValueError):
            q.join(timeout=1)
        q.stop()
        q.join(timeout=60)
        with pytest.raises(QueueClosedError, match="after stop") as info:
            q.put(abs, -1)
        assert not isinstance(info.value, queue.Empty)
        with pytest.raises(QueueStopped):
            q.get(timeout=1)
    finally:
        q.terminate()


def test_the_polling_loop_ends_on_queue_stopped():
    """The documented loop: QueueStopped caught before queue.Empty ends
    (catching only queue.Empty would go round for ever after stop())."""
    with ParallelQueue(num_workers=1) as q:
        q.put(abs, -3)
        q.stop()
        got, rounds = [], 0
        while True:
            rounds += 1
            try:
                got.append(q.get(timeout=0.1))
            except QueueStopped:
                break
            except queue.Empty:
                continue
        assert got == [3] and rounds < 1000


def test_timeout_is_puts_own_in_put_and_aput_and_a_partial_gives_it_to_the_task():
    """put() and aput() both take timeout= for themselves (aput passed it to
    the task); a functools.partial hands the task its own."""

    async def main(q, s):
        await q.aput(takes_timeout, 1, timeout=5)
        await s.aput(2, timeout=5)
        await q.aput(functools.partial(takes_timeout, 3, timeout=7))
        return [q.get(timeout=60), s.get(timeout=60), q.get(timeout=60)]

    with ParallelQueue(num_workers=1) as q, ParallelSingleTaskQueue(takes_timeout, num_workers=1) as s:
        assert asyncio.run(main(q, s)) == [(1, None), (2, None), (3, 7)]
        q.put(takes_timeout, 4, timeout=5)
        assert q.get(timeout=60) == (4, None)


def test_aput_timeout_raises_full_and_puts_nothing():
    q = ParallelQueue(num_workers=1, in_q_max=2)

    async def main():
        for _ in range(10_000):
            try:
                await q.aput(abs, -1, timeout=0.05)
            except queue.Full:
                return True
        return False

    try:
        q.put(time.sleep, 600)  # the worker is busy: tasks pile up
        assert asyncio.run(main())
        assert q.full()
        put_before = q.stats().tasks_put
        with pytest.raises(queue.Full):
            asyncio.run(q.aput(abs, -1, timeout=0))
        assert q.stats().tasks_put == put_before  # the timed-out aput put nothing
    finally:
        q.terminate()
