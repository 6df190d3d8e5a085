"""The same ordered queue on threads, a process pool and a Dask cluster."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
from conftest import drain, wait_until

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueStopped, aimap, imap


class Boom(Exception):
    def __init__(self, a, b):  # would not survive pickling: fine in a thread
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


def boom():
    raise Boom(1, 2)


def jitter(i):
    time.sleep(random.random() * 0.002)
    return i


class CountingExecutor(ThreadPoolExecutor):
    """Counts calls submitted and not yet finished, and the most at once."""

    def __init__(self, n):
        super().__init__(n)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def submit(self, fn, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        fut = super().submit(fn, *args, **kwargs)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _):
        with self.lock:
            self.running -= 1


def test_threads_order_markers_and_live_errors():
    with ThreadPoolExecutor(4) as ex:
        with ParallelQueue(executor=ex) as q:
            for i in range(500):
                q.put(jitter, i)
                if i % 100 == 99:
                    q.put(("marker", i))
            q.put(boom)
            q.put(threading.Lock)  # an unpicklable result: threads hand it over as is
            out = [q.get(timeout=60) for _ in range(505)]
            with pytest.raises(Boom) as info:
                q.get(timeout=60)
            lock = q.get(timeout=60)
        # the caller owns the executor: still usable after the queue is done
        assert ex.submit(abs, -3).result() == 3
    expected = []
    for i in range(500):
        expected.append(i)
        if i % 100 == 99:
            expected.append(("marker", i))
    assert out == expected
    assert isinstance(info.value.lock, type(threading.Lock()))  # the very object, lock and all
    assert "in boom" in info.value.stack_trace
    assert hasattr(lock, "acquire")


def test_threads_back_pressure_with_endless_producer():
    gate = threading.Event()
    ex = CountingExecutor(2)
    try:
        q = ParallelQueue(executor=ex, in_q_max=10, consumer_buffer_max=4)
        accepted = 0
        with pytest.raises(Exception) as info:  # queue.Full once everything is full
            for _ in range(10_000):  # "endless": far more than the bounds
                q.put(gate.wait, timeout=0.2)
                accepted += 1
        assert type(info.value).__name__ == "Full"
        # Never more than the window of calls submitted: 4 packets, and
        # pending held in_q_max; nothing else was read from the producer.
        assert ex.most <= 4
        assert accepted <= 10 + 4 * 1024
        gate.set()
        assert [q.get(timeout=60) for _ in range(accepted)] == [True] * accepted
        q.stop()
        q.join(60)
        assert not q.is_alive()
    finally:
        gate.set()
        ex.shutdown()


def double(x):
    return 2 * x


def test_process_pool_with_lambdas_and_single_task_queue():
    with ProcessPoolExecutor(2) as ex:
        k = 5
        with ParallelQueue(executor=ex) as q:
            q.put(lambda x: x + k, 1)  # cloudpickled by us: a plain pool could not
            q.put(divmod, 1, 0)
            q.put("m")
            assert q.get(timeout=60) == 6
            with pytest.raises(ZeroDivisionError):
                q.get(timeout=60)
            assert q.get(timeout=60) == "m"
        with ParallelSingleTaskQueue(double, executor=ex) as q:
            for i in range(100):
                q.put(i)
            q.stop()
            assert list(q) == [2 * i for i in range(100)]
        assert list(imap(double, range(50), executor=ex)) == [2 * i for i in range(50)]
        with ParallelQueue(executor=ex) as q:  # maps on a kept queue: the function rides in each packet
            assert list(q.imap(lambda x: x + k, range(30))) == [x + k for x in range(30)]
            assert list(q.imap(pow, range(10), [2] * 10, chunksize=3)) == [x * x for x in range(10)]


def test_options_that_need_our_processes_are_refused():
    with ThreadPoolExecutor(1) as ex:
        for kwargs in ({"task_timeout": 1}, {"max_tasks_per_worker": 3}, {"worker_init_f": print}, {"daemon": True}):
            with pytest.raises(ValueError, match="own worker processes"):
                ParallelQueue(executor=ex, **kwargs)
        with pytest.raises(TypeError):
            ParallelQueue(executor=object())


def test_async_and_stats_on_threads():
    async def main():
        with ThreadPoolExecutor(2) as ex:
            with ParallelQueue(executor=ex) as q:
                for i in range(50):
                    await q.aput(abs, -i)
                q.stop()
                got = [x async for x in q]
                stats = q.stats()
            via_aimap = [x async for x in aimap(abs, range(-5, 0), executor=ex)]
        return got, stats, via_aimap

    got, stats, via_aimap = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == list(range(50)) and via_aimap == [5, 4, 3, 2, 1]
    assert stats.tasks_put == 50 and stats.results_delivered == 50 and stats.in_flight == 0


def test_terminate_does_not_wait_for_stuck_threads():
    gate = threading.Event()
    ex = ThreadPoolExecutor(1)
    try:
        q = ParallelQueue(executor=ex)
        q.put(gate.wait)
        q.put(abs, -1)
        q.terminate()
        assert not q.is_alive()
        with pytest.raises(QueueStopped):
            q.get(timeout=1)
    finally:
        gate.set()
        ex.shutdown()


def fail_on_3(x):
    if x == 3:
        raise ValueError(f"three: {x}")
    return x


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_map_errors_in_place_on_executors(kind):
    # A thread pool hands errors back as live objects (LiveError), a process
    # pool as TaskErrors: imap and ParallelQueue.imap raise either in place
    # and go on after it.
    expected = [0, 1, 2, "ValueError: three: 3", 4, 5]
    with ThreadPoolExecutor(2) if kind == "threads" else ProcessPoolExecutor(2) as ex:
        assert drain(imap(fail_on_3, range(6), executor=ex, max_batch=6), ValueError) == expected
        with ParallelQueue(executor=ex) as q:
            assert drain(q.imap(fail_on_3, range(6)), ValueError) == expected


def _rebuilt_only_where_made(pid, value):
    if os.getpid() != pid:
        raise pickle.UnpicklingError(f"{value} cannot be rebuilt in another process")
    return RebuiltOnlyHere(value)


class RebuiltOnlyHere:
    """An argument that pickles here, and will not unpickle in any other process."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _rebuilt_only_where_made, (os.getpid(), self.value)


def identity(x):
    return x


def inputs_with_one_that_will_not_unpickle_there():
    return [RebuiltOnlyHere(i) if i == 3 else i for i in range(8)]


EXPECTED_CAREFUL = [0, 1, 2, "UnpicklingError", 4, 5, 6, 7]


def kinds(out):
    return [x if isinstance(x, int) else x.split(":")[0] for x in out]


def test_process_pool_packet_that_will_not_unpickle_there_fails_one_slot():
    """The packet (one, of eight tasks) will not unpickle in the pool's
    process as a whole: it is sent again one pickle per task, and only the
    task whose argument will not unpickle fails, in its place."""
    with ProcessPoolExecutor(2) as ex, ParallelQueue(executor=ex) as q:
        it = q.imap(identity, inputs_with_one_that_will_not_unpickle_there(), chunksize=8)
        out = drain(it, pickle.UnpicklingError)
        assert kinds(out) == EXPECTED_CAREFUL


def test_results_nobody_takes_never_block_the_dispatcher_under_the_lock():
    """Regression: each packet handed over wrote a byte to a blocking pipe,
    under the queue's lock; with a window larger than the pipe (64 KiB) and
    nobody calling get(), the write blocked with the lock held, and
    terminate() then waited for that lock for ever."""
    n = 70_000
    with ThreadPoolExecutor(2) as ex:
        q = ParallelQueue(executor=ex, max_batch=1, in_q_max=n, consumer_buffer_max=n)
        try:
            for i in range(n):
                q.put(abs, -i)
            source = q._core.engine.source
            wait_until(lambda: source.taken + len(source.packets) == n, seconds=120)
            with q._core.lock:  # (the dispatcher does not hold it for ever)
                pass
            assert [q.get(timeout=60) for _ in range(n)] == list(range(n))
        finally:
            q.terminate()
