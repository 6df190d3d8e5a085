"""Soak: many tasks, random durations, errors, markers, several producers,
tiny buffers so ids wrap constantly, workers SIGKILLed along the way, results
that kill their worker while pickled, arguments whose loaders crash the
worker, results that will not unpickle in the main process, and getter
threads and coroutines taking from one queue.

``PQ_SOAK_TASKS`` sets the number of tasks (default 20,000, kept short for
CI); ``python -m pytest tests/test_soak.py`` with ``PQ_SOAK_TASKS=500000`` is
the long run.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import random
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallel_queue import ParallelQueue, QueueStopped, WorkerLostError

MAIN_PID = os.getpid()


class Marker(int):
    pass


class KillsWhenPickled:
    """A result whose pickling kills its worker."""

    def __reduce__(self):
        os._exit(9)


class CrashesWhenLoaded:
    """An argument whose loader kills the worker that unpickles it."""

    def __reduce__(self):
        return os._exit, (9,)


def _rebuild_in_a_worker(i):
    if os.getpid() == MAIN_PID:
        raise RuntimeError(f"result {i} cannot be rebuilt in the main process")
    return i


class LoadsOnlyInWorkers:
    """A result that will not unpickle in the main process."""

    def __init__(self, i):
        self.i = i

    def __reduce__(self):
        return _rebuild_in_a_worker, (self.i,)


def work(i, kind, seconds, announce_fd, argument=None):
    if kind == "victim":
        # Tell the chaos thread which process to kill, then wait to be killed.
        os.write(announce_fd, f"{os.getpid()}\n".encode())
        threading.Event().wait()
    if seconds:
        time.sleep(seconds)
    if kind == "raise":
        raise ValueError(str(i))
    if kind == "kills-when-pickled":
        return KillsWhenPickled()
    if kind == "will-not-unpickle":
        return LoadsOnlyInWorkers(i)
    return i


def make_plan(n, rng):
    """What each of ``n`` puts is: (kind, seconds)."""
    plan = []
    for _ in range(n):
        r = rng.random()
        if r < 0.001:
            plan.append(("victim", 0.0))
        elif r < 0.0015:
            plan.append(("kills-when-pickled", 0.0))
        elif r < 0.002:
            plan.append(("crashes-when-loaded", 0.0))
        elif r < 0.0025:
            plan.append(("will-not-unpickle", 0.0))
        elif r < 0.0225:
            plan.append(("raise", 0.0))
        elif r < 0.0325:
            plan.append(("marker", 0.0))
        elif r < 0.1325:
            plan.append(("ok", rng.random() * 0.001))
        else:
            plan.append(("ok", 0.0))
    return plan


def put_planned(q, i, kind, seconds, announce_fd):
    """Put the ``i``-th item of the plan; the marker object if it is one."""
    if kind == "marker":
        m = Marker(i)
        q.put(m)
        return m
    argument = CrashesWhenLoaded() if kind == "crashes-when-loaded" else None
    q.put(work, i, kind, seconds, announce_fd, argument)
    return None


def expected_outcome(kind, i, task_index, marker):
    """What get() gives for the ``i``-th item (the ``task_index``-th task)."""
    if kind == "marker":
        return ("value", marker)
    if kind in ("victim", "kills-when-pickled", "crashes-when-loaded"):
        return ("lost", task_index)
    if kind == "raise":
        return ("raised", str(i))
    if kind == "will-not-unpickle":
        return ("unpickling", task_index)
    return ("value", i)


def outcome_of(get):
    """``get()``'s result or error, as expected_outcome() says it."""
    try:
        return ("value", get())
    except WorkerLostError as e:
        return ("lost", e.task_index)
    except ValueError as e:
        return ("raised", str(e))
    except pickle.UnpicklingError as e:
        text = str(e)
        return ("unpickling", int(text.split("task #")[1].split()[0]))


@pytest.mark.slow
def test_soak_with_chaos():
    n = int(os.environ.get("PQ_SOAK_TASKS", "20000"))
    rng = random.Random(20261123)
    plan = make_plan(n, rng)
    victims = sum(1 for k, _ in plan if k == "victim")

    announce_r, announce_w = os.pipe()
    killed = []

    def chaos():
        with os.fdopen(announce_r) as f:
            for line in f:
                pid = int(line)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                if len(killed) == victims:
                    return

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    order = []  # (kind, index, marker object) in put order
    order_lock = threading.Lock()
    next_item = iter(range(n))
    with ParallelQueue(num_workers=2, consumer_buffer_max=2, in_q_max=20) as q:

        def produce():
            while True:
                with order_lock:
                    i = next(next_item, None)
                    if i is None:
                        return
                    kind, seconds = plan[i]
                    order.append((kind, i, put_planned(q, i, kind, seconds, announce_w)))

        producers = [threading.Thread(target=produce) for _ in range(3)]
        for t in producers:
            t.start()

        def stop_when_done():
            for t in producers:
                t.join()
            q.stop()

        threading.Thread(target=stop_when_done).start()
        got = []
        while True:
            try:
                got.append(outcome_of(lambda: q.get(timeout=120)))
            except Exception as e:  # QueueStopped ends the run; anything else fails below
                got.append(("end", type(e).__name__))
                break
    os.close(announce_w)
    chaos_thread.join(30)

    assert got[-1] == ("end", "QueueStopped")
    got = got[:-1]
    assert len(got) == n
    task_index = 0
    for (kind, i, marker), (what, value) in zip(order, got):
        want = expected_outcome(kind, i, task_index, marker)
        assert (what, value) == want, (i, kind, what, value)
        if kind == "marker":
            assert value is marker
        else:
            task_index += 1
    assert len(killed) == victims


@pytest.mark.slow
def test_soak_getter_threads_and_coroutines_on_one_queue():
    """Two getter threads with timeouts and three coroutines in an event loop
    take from one queue while a producer puts every kind of task (crashes
    too): every result and error is delivered exactly once, each getter sees
    its share in put order, and every timeout is honoured."""
    n = int(os.environ.get("PQ_SOAK_TASKS", "20000")) // 2
    rng = random.Random(20261130)
    plan = [(k, s) for k, s in make_plan(n, rng) if k != "victim"]
    expected = []
    with ParallelQueue(num_workers=2, consumer_buffer_max=4, in_q_max=50) as q:
        shares: list[list[tuple[int, object]]] = [[] for _ in range(5)]
        # Each result carries its put position, so each getter's share can
        # be checked for order; values identify themselves (i), errors by
        # task index or message.

        def thread_getter(share):
            while True:
                try:
                    share.append(outcome_of(lambda: q.get(timeout=60)))
                except QueueStopped:
                    return
                except queue.Empty:
                    share.append(("timeout", None))
                    return

        async def coroutine_getter(share):
            while True:
                try:
                    share.append(await asyncio.wait_for(_outcome_async(q), 60))
                except QueueStopped:
                    return
                except asyncio.TimeoutError:
                    share.append(("timeout", None))
                    return

        async def coroutines():
            await asyncio.gather(*(coroutine_getter(shares[k]) for k in range(2, 5)))

        threads = [threading.Thread(target=thread_getter, args=(shares[k],)) for k in range(2)]
        threads.append(threading.Thread(target=lambda: asyncio.run(coroutines())))
        for t in threads:
            t.start()
        task_index = 0
        for i, (kind, seconds) in enumerate(plan):
            marker = put_planned(q, i, kind, seconds, -1)
            expected.append(expected_outcome(kind, i, task_index, marker))
            task_index += kind != "marker"
        q.stop()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    got = [x for share in shares for x in share]
    assert ("timeout", None) not in got
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    position = {repr(x): k for k, x in enumerate(expected)}
    for share in shares:
        places = [position[repr(x)] for x in share]
        assert places == sorted(places)


async def _outcome_async(q):
    try:
        return ("value", await q.aget())
    except WorkerLostError as e:
        return ("lost", e.task_index)
    except ValueError as e:
        return ("raised", str(e))
    except pickle.UnpicklingError as e:
        return ("unpickling", int(str(e).split("task #")[1].split()[0]))


def sleepy(i, ms, kind):
    if ms:
        time.sleep(ms / 1000)
    if kind == "raise":
        raise KeyError(i)
    return i


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["ok", "ok", "ok", "raise", "marker"])),
        min_size=1,
        max_size=25,
    )
)
def test_any_mix_of_durations_errors_and_markers(tasks):
    # A queue per example keeps examples independent; tiny windows and one
    # task per packet make the reorder buffer work on every example.
    with ParallelQueue(num_workers=3, consumer_buffer_max=1, max_batch=1) as q:
        for i, (ms, kind) in enumerate(tasks):
            if kind == "marker":
                q.put(("marker", i))
            else:
                q.put(sleepy, i, ms, kind)
        for i, (_, kind) in enumerate(tasks):
            if kind == "marker":
                assert q.get(timeout=60) == ("marker", i)
            elif kind == "raise":
                try:
                    q.get(timeout=60)
                except KeyError as e:
                    assert e.args == (i,)
                else:
                    raise AssertionError(f"task {i} should have raised")
            else:
                assert q.get(timeout=60) == i
