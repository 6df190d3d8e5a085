"""The ordered queue on a Dask cluster (a real LocalCluster per test)."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time

import pytest
from conftest import drain, wait_until
from test_executors import EXPECTED_CAREFUL, identity, inputs_with_one_that_will_not_unpickle_there, kinds

from parallel_queue import ParallelQueue, imap

distributed = pytest.importorskip("distributed")


@pytest.fixture
def dask_client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_dask_order_markers_errors_and_no_merged_calls(dask_client):
    with ParallelQueue(executor=dask_client) as q:
        for i in range(300):
            q.put(jitter, i)
        q.put("marker")
        q.put(fresh_token)
        q.put(fresh_token)  # the same call twice: two tasks, run twice
        q.put(divmod, 1, 0)
        out = [q.get(timeout=120) for _ in range(303)]
        with pytest.raises(ZeroDivisionError) as info:
            q.get(timeout=120)
    assert out[:300] == list(range(300)) and out[300] == "marker"
    assert out[301] != out[302]
    assert "divmod" in info.value.stack_trace or "ZeroDivisionError" in info.value.stack_trace
    assert list(imap(double, range(40), executor=dask_client)) == [2 * i for i in range(40)]


def slow_pid(i):
    time.sleep(0.3)
    return i, os.getpid()


def test_dask_back_pressure(dask_client):
    q = ParallelQueue(executor=dask_client, in_q_max=5, consumer_buffer_max=3, max_batch=1)
    try:
        accepted = 0
        with pytest.raises(Exception) as info:
            for i in range(10_000):
                q.put(slow_pid, i, timeout=0.5)
                accepted += 1
        assert type(info.value).__name__ == "Full"
        assert accepted <= 5 + 3  # pending plus the window of submitted calls
        assert [q.get(timeout=120)[0] for _ in range(accepted)] == list(range(accepted))
    finally:
        q.terminate()


def hang_then_return(i):
    time.sleep(2)
    return i


def test_dask_worker_killed_mid_task_never_hangs(dask_client):
    pids = dask_client.run(os.getpid)  # address -> pid of each worker process
    with ParallelQueue(executor=dask_client, max_batch=1) as q:
        for i in range(4):
            q.put(hang_then_return, i)
        wait_until(lambda: any(dask_client.processing().values()))  # tasks are on the workers
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append(q.get(timeout=120))
            except Exception as e:  # Dask's KilledWorker, if its retries ran out
                outcomes.append(type(e).__name__)
    # Every task either ran (Dask re-ran it elsewhere) or reports the loss in
    # its own slot, in order: nothing hangs, nothing is skipped.
    assert len(outcomes) == 4
    for i, o in enumerate(outcomes):
        assert o == i or isinstance(o, str), outcomes


def jitter(i):
    time.sleep(random.random() * 0.002)
    return i


def double(x):
    return 2 * x


def fresh_token():
    """Different on every run.  (Not random.random: pickling that bound method
    carries the caller's Random state, so every copy draws the same number.)"""
    return os.urandom(16)


def test_dask_client_by_scheduler_address(dask_client):
    """A Client made from a scheduler address, as for a remote cluster."""
    address = dask_client.scheduler.address
    with distributed.Client(address) as remote:
        with ParallelQueue(executor=remote) as q:
            for i in range(50):
                q.put(double, i)
            q.put("done")
            assert [q.get(timeout=60) for _ in range(51)] == [2 * i for i in range(50)] + ["done"]
            assert list(q.imap(double, range(40))) == [2 * i for i in range(40)]  # a map on the same queue
            q.stop()
            assert list(q) == []


def test_dask_packet_that_will_not_unpickle_there_fails_one_slot(dask_client):
    """Regression: the careful retry of a rejected packet went out under the
    first call's key, and Dask handed back that call's future (its REJECTED
    result): every task of the packet failed ("rejected twice"), not only
    the one whose argument would not unpickle."""
    with ParallelQueue(executor=dask_client) as q:
        it = q.imap(identity, inputs_with_one_that_will_not_unpickle_there(), chunksize=8)
        out = drain(it, pickle.UnpicklingError)
    assert kinds(out) == EXPECTED_CAREFUL
