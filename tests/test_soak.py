"""Soak: many tasks, random durations, errors, markers, several producers,
tiny buffers so ids wrap constantly, and workers SIGKILLed along the way.

``PQ_SOAK_TASKS`` sets the number of tasks (default 20,000, kept short for
CI); ``python -m pytest tests/test_soak.py`` with ``PQ_SOAK_TASKS=500000`` is
the long run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallel_queue import ParallelQueue, WorkerLostError


class Marker(int):
    pass


def work(i, kind, seconds, announce_fd):
    if kind == "victim":
        # Tell the chaos thread which process to kill, then wait to be killed.
        os.write(announce_fd, f"{os.getpid()}\n".encode())
        threading.Event().wait()
    if seconds:
        time.sleep(seconds)
    if kind == "raise":
        raise ValueError(str(i))
    return i


def test_soak_with_chaos():
    n = int(os.environ.get("PQ_SOAK_TASKS", "20000"))
    rng = random.Random(20261123)
    plan = []
    for _ in range(n):
        r = rng.random()
        if r < 0.001:
            plan.append(("victim", 0.0))
        elif r < 0.021:
            plan.append(("raise", 0.0))
        elif r < 0.031:
            plan.append(("marker", 0.0))
        elif r < 0.131:
            plan.append(("ok", rng.random() * 0.001))
        else:
            plan.append(("ok", 0.0))
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
                    if kind == "marker":
                        m = Marker(i)
                        q.put(m)
                        order.append(("marker", i, m))
                    else:
                        q.put(work, i, kind, seconds, announce_w)
                        order.append((kind, i, None))

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
                got.append(("value", q.get(timeout=120)))
            except WorkerLostError as e:
                got.append(("lost", e.task_index))
            except ValueError as e:
                got.append(("raised", str(e)))
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
        if kind == "marker":
            assert what == "value" and value is marker, (i, what, value)
            continue
        if kind == "victim":
            assert (what, value) == ("lost", task_index), (i, what, value)
        elif kind == "raise":
            assert (what, value) == ("raised", str(i)), (i, what, value)
        else:
            assert (what, value) == ("value", i), (i, what, value)
        task_index += 1
    assert len(killed) == victims


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
