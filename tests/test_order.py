"""Results come out in put order, whatever order the tasks finish in."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import threading
import time

import pytest

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueStopped


class BatchDone(int):
    """A marker type, as the batch indexer of the 0.5 description uses."""


def make_gated(go, done):
    def task(i):
        assert go[i].wait(30), f"task {i} was never released"
        done[i].set()
        return i * 10

    return task


@pytest.mark.parametrize("finish_order", list(itertools.permutations(range(3))))
def test_every_completion_order_comes_out_in_put_order(finish_order):
    """Force each of the 6 orders in which 3 concurrent tasks can finish.

    A one-packet reorder buffer (consumer_buffer_max=1) means every task that
    finishes ahead of an earlier one must wait for the window: the WAIT and
    wake-up path runs in every order but the identity.
    """
    ctx = multiprocessing.get_context()
    go = [ctx.Event() for _ in range(3)]
    done = [ctx.Event() for _ in range(3)]
    with ParallelSingleTaskQueue(make_gated(go, done), num_workers=3, max_batch=1, consumer_buffer_max=1) as q:
        for i in range(3):
            q.put(i)
        for i in finish_order:
            go[i].set()
            assert done[i].wait(30)
        assert [q.get(timeout=30) for _ in range(3)] == [0, 10, 20]


def test_markers_keep_their_place_type_and_identity():
    markers = [BatchDone(2), BatchDone(0), BatchDone(3)]
    with ParallelQueue(num_workers=2) as q:
        q.put(markers[0])  # a marker before any task
        q.put(abs, -1)
        q.put(abs, -2)
        q.put(markers[1])
        q.put(markers[2])  # two markers in a row
        for i in range(3):
            q.put(pow, i, 2)
        q.put(None)  # None is a marker like any other non-callable
        out = [q.get(timeout=30) for _ in range(9)]
    assert out == [2, 1, 2, 0, 3, 0, 1, 4, None]
    assert out[0] is markers[0] and out[3] is markers[1] and out[4] is markers[2]
    assert type(out[0]) is BatchDone


def test_marker_with_arguments_is_an_error():
    with ParallelQueue(num_workers=1) as q:
        with pytest.raises(ValueError):
            q.put(BatchDone(1), 2)
        with pytest.raises(ValueError):
            q.put("marker", key=1)
        q.put(abs, -5)
        assert q.get(timeout=30) == 5


def test_marker_wakes_a_waiting_get():
    """A get() blocked for the next result returns a marker put after it started waiting."""
    with ParallelQueue(num_workers=1) as q:
        got = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
        t.start()
        time.sleep(0.2)  # let get() start waiting; the result does not depend on it
        q.put("marker")
        t.join(30)
        assert got == ["marker"]


def jitter(i):
    time.sleep(random.random() * 0.002)
    return i


def test_wraparound_with_tiny_buffers_many_cycles():
    """Ids wrap hundreds of times (window 6, base 13) and order holds."""
    n = 3000
    with ParallelQueue(num_workers=2, consumer_buffer_max=1, max_batch=2, in_q_max=5) as q:
        base = 2 * q._engine.opts.window + 1
        assert base == 13

        def produce():
            for i in range(n):
                q.put(jitter, i)
                if i % 500 == 499:
                    q.put(BatchDone(i))
            q.stop()

        t = threading.Thread(target=produce)
        t.start()
        out = list(q)
        t.join()
    expected = []
    for i in range(n):
        expected.append(i)
        if i % 500 == 499:
            expected.append(BatchDone(i))
    assert out == expected
    assert [type(x) for x in out if isinstance(x, BatchDone)] == [BatchDone] * 6


def test_single_task_queue_passes_args_and_kwargs():
    with ParallelSingleTaskQueue(divmod, num_workers=2) as q:
        q.put(7, 2)
        q.put(9, 4)
        assert q.get(timeout=30) == (3, 1)
        assert q.get(timeout=30) == (2, 1)
    with ParallelSingleTaskQueue(int, num_workers=1) as q:
        q.put("ff", base=16)
        assert q.get(timeout=30) == 255


def kw_task(a, b=0, *, c=0):
    return (a, b, c)


def test_kwargs_reach_the_task_and_timeout_does_not():
    with ParallelQueue(num_workers=2) as q:
        q.put(kw_task, 1, b=2, c=3, timeout=5)
        q.put(kw_task, 4)
        assert q.get(timeout=30) == (1, 2, 3)
        assert q.get(timeout=30) == (4, 0, 0)


def test_iteration_ends_after_stop_and_drain():
    with ParallelQueue(num_workers=2) as q:
        for i in range(100):
            q.put(abs, -i)
        q.put("end")
        q.stop()
        assert list(q) == list(range(100)) + ["end"]
        with pytest.raises(QueueStopped):
            q.get(timeout=1)
        with pytest.raises(QueueStopped):
            q.put(abs, 1)


def test_stop_with_nothing_put():
    q = ParallelQueue(num_workers=2)
    q.stop()
    q.join(30)
    assert not q.is_alive()
    assert list(q) == []


def test_many_results_without_get_until_join():
    """join() reads results into memory, so it never waits for a get() that is not coming."""
    q = ParallelQueue(num_workers=2)
    payload = "x" * 10_000
    for i in range(300):  # about 3 MB of results: far more than a pipe holds
        q.put(str.__add__, payload, str(i))
    q.stop()
    q.join(60)
    assert not q.is_alive()
    out = list(q)
    assert [s[10_000:] for s in out] == [str(i) for i in range(300)]
