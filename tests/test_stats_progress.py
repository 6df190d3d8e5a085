"""q.stats() and progress=True."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest
from conftest import live_processes, run_python

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueStats, WorkerLostError


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_stats_count_what_happened():
    with ParallelQueue(num_workers=2) as q:
        for i in range(100):
            q.put(abs, -i)
        q.put("m1")
        q.put(divmod, 1, 0)
        q.put(die)
        q.put("m2")
        s = q.stats()
        assert isinstance(s, QueueStats)
        assert s.tasks_put == 102 and s.markers_put == 2
        assert s.results_delivered == 0 and s.in_flight == 102
        for _ in range(101):
            q.get(timeout=60)
        with pytest.raises(ZeroDivisionError):
            q.get(timeout=60)
        with pytest.raises(WorkerLostError):
            q.get(timeout=60)
        assert q.get(timeout=60) == "m2"
        s = q.stats()
    assert s.results_delivered == 102 and s.in_flight == 0 and s.pending == 0
    assert s.errors == 2
    assert s.markers_delivered == 2
    assert s.workers_replaced == 1 and s.workers_alive == 2
    assert s.reorder_buffer_packets == 0 and s.reorder_buffer_items == 0
    assert s.latency_mean is not None and 0 < s.latency_p50 <= s.latency_p99  # type: ignore[operator]
    d = s.as_dict()
    assert d["tasks_put"] == 102 and set(d) == set(QueueStats.__dataclass_fields__)


def make_gate(ev):
    def task(i):
        if i == 0:
            assert ev.wait(60)
        return i

    return task


def test_stats_see_the_reorder_buffer():
    """Task 0 is held back; later ones finish and wait in the reorder buffer."""
    ev = multiprocessing.get_context().Event()
    with ParallelSingleTaskQueue(make_gate(ev), num_workers=2, max_batch=1) as q:
        for i in range(6):
            q.put(i)
        # Wait until the consumer holds packets 1.. (task 0 still running);
        # polling stats() here is the thing under test, bounded by the timeout.
        deadline = threading.Event()
        for _ in range(600):
            s = q.stats()
            if s.reorder_buffer_items >= 1:
                break
            deadline.wait(0.05)
        assert s.reorder_buffer_items >= 1 and s.reorder_buffer_packets >= 1
        ev.set()
        assert [q.get(timeout=60) for _ in range(6)] == list(range(6))
        assert q.stats().reorder_buffer_packets == 0


PROGRESS_CODE = """
import time
from parallel_queue import imap, ParallelQueue

def slow(x):
    time.sleep(0.001)
    return x

assert sum(imap(slow, range(300), num_workers=2, progress=True)) == sum(range(300))
assert sum(imap(slow, range(40), num_workers=2, progress={"desc": "forty", "total": 40})) == sum(range(40))
with ParallelQueue(num_workers=2, progress=True) as q:
    for i in range(200):
        q.put(slow, i)
    for _ in range(200):
        q.get()
print("ok")
"""


def test_progress_bar_on_stderr():
    r = run_python(PROGRESS_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    bars = r.stderr.replace("\r", "\n")
    assert "300/300" in bars  # imap knows the total from len(range)
    assert "forty: 100%" in bars and "40/40" in bars  # tqdm's keywords, passed on
    # A queue fed by put() counts results, with no total: one that grew as
    # tasks were put (108/1110, then 558/1579) made the percentage wrong.
    assert "200task" in bars and "/200" not in bars
    assert "task/s" in bars


def test_progress_without_tqdm_says_what_to_install():
    code = """
import sys
sys.modules["tqdm"] = None   # as if tqdm were not installed
from parallel_queue import ParallelQueue
try:
    ParallelQueue(num_workers=1, progress=True)
except ImportError as e:
    print(e)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "pip install 'parallel-queue[progress]'" in r.stdout


def test_progress_options_that_tqdm_refuses_fail_before_anything_starts():
    before = set(live_processes(parent=os.getpid()))  # (a fork server of an earlier test, say)
    with pytest.raises(TypeError, match="progress must be"):
        ParallelQueue(num_workers=1, progress="yes")
    with pytest.raises(Exception, match="nonsense"):
        ParallelQueue(num_workers=1, progress={"nonsense": 1})
    assert set(live_processes(parent=os.getpid())) == before  # no process was started


def test_aimap_progress_with_an_async_input_has_no_total():
    code = """
import asyncio
from parallel_queue import aimap

async def numbers():
    for i in range(50):
        yield i

async def main():
    return [r async for r in aimap(abs, numbers(), num_workers=2, progress=True)]

print(sum(asyncio.run(main())))
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(sum(range(50)))
    assert "50task" in r.stderr and "/50" not in r.stderr
