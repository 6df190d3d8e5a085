"""Results come out in put order, whatever order the tasks finish in."""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import random
import threading
import time

import pytest
from conftest import wait_until

from parallel_queue import PacketID, ParallelQueue, ParallelSingleTaskQueue, QueueClosedError, QueueStopped


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
        wait_until(lambda: len(q._core.wakeups.getters))  # get() sleeps in poll() now
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
        assert PacketID(q._core.opts.window).modulus == 13

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
        with pytest.raises(QueueClosedError):
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


_GATE = None


def _install_gate(gate):
    """worker_init_f: hand the worker the Event task -1 waits for."""
    global _GATE
    _GATE = gate


def held_then_sevens(i):
    """Task -1 waits for the gate; task i raises when i % 7 == 3."""
    if i < 0:
        assert _GATE.wait(60)
    elif i % 7 == 3:
        raise ValueError(i)
    return i


def expected_with_markers_and_errors(n, every):
    out = [-1]
    for i in range(n):
        out.append(f"ValueError {i}" if i % 7 == 3 else i)
        if i % every == every - 1:
            out.append(("marker", i))
    return out


def held_queue(gate, workers, batch):
    # in_q_max: room for every task, or put() would wait behind task -1.
    return ParallelQueue(
        num_workers=workers, max_batch=batch, in_q_max=10_000, worker_init_f=functools.partial(_install_gate, gate)
    )


def fill(q, gate, n, every):
    # Everything piles up behind task -1, then goes out in packets of
    # max_batch: markers and errors fall inside packets, so the runs of
    # values get() hands out without a lock must stop at each of them.
    batch = q._core.opts.max_batch
    q._intake.fixed_batch = lambda: batch  # packets of exactly max_batch tasks, as a map's chunksize
    q.put(held_then_sevens, -1)
    for i in range(n):
        q.put(held_then_sevens, i)
        if i % every == every - 1:
            q.put(("marker", i))
    gate.set()


def take(q):
    try:
        return q.get(timeout=60)
    except ValueError as e:
        return f"ValueError {e.args[0]}"


def test_markers_and_errors_inside_packets_keep_their_place():
    gate = multiprocessing.get_context().Event()
    n, every = 400, 10
    with held_queue(gate, 1, 50) as q:
        fill(q, gate, n, every)
        expected = expected_with_markers_and_errors(n, every)
        out = [take(q) for _ in expected]
    assert out == expected


def test_concurrent_getters_with_markers_and_errors_inside_packets():
    # Several threads race through get(): lock-free pops of values against
    # the locked slow path that hands out markers and errors.  Each item
    # comes out exactly once, and each thread sees its items in order.
    gate = multiprocessing.get_context().Event()
    n, every = 3000, 10
    with held_queue(gate, 2, 64) as q:
        fill(q, gate, n, every)
        q.stop()
        expected = expected_with_markers_and_errors(n, every)
        parts: list[list] = [[] for _ in range(4)]

        def consume(part):
            while True:
                try:
                    part.append(take(q))
                except QueueStopped:
                    return

        threads = [threading.Thread(target=consume, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    position = {repr(x): k for k, x in enumerate(expected)}
    assert sorted((x for p in parts for x in p), key=lambda x: position[repr(x)]) == expected
    for p in parts:
        assert [position[repr(x)] for x in p] == sorted(position[repr(x)] for x in p)


def test_markers_beyond_in_q_max_do_not_block_put():
    """Regression: with in_q_max=2, a third marker put before the first get()
    blocked put() (queue.Full with a timeout, a hang without).  0.5 held
    markers in its pipeline's buffers; a marker here is bounded by the same
    window as results, so 0.5 code with small buffers runs unchanged."""
    markers = [BatchDone(i) for i in range(6)]
    with ParallelQueue(num_workers=2, in_q_max=2) as q:
        q.put(abs, -1)
        for m in markers[:4]:
            q.put(m, timeout=30)
        q.put(abs, -2)
        for m in markers[4:]:
            q.put(m, timeout=30)
        got = [q.get(timeout=60) for _ in range(8)]
    assert got == [1, *markers[:4], 2, *markers[4:]]
    assert all(a is b for a, b in zip(got[1:5], markers[:4]))
