"""A task's exception comes back in its slot, with the worker's traceback."""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import queue
import sys
import threading
import traceback

import pytest

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, RemoteError


def inner(x):
    raise ValueError(f"bad value {x}")


def outer(x):
    try:
        inner(x)
    except ValueError as e:
        raise KeyError(x) from e


class TwoArgError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_two_arg():
    raise TwoArgError(1, 2)


class LockedError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_locked():
    raise LockedError("has a lock")


def return_lock():
    return threading.Lock()


def test_exception_type_message_and_worker_traceback():
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        q.put(inner, 7)
        q.put(abs, -3)
        assert q.get(timeout=30) == 1
        with pytest.raises(ValueError, match="bad value 7") as info:
            q.get(timeout=30)
        assert q.get(timeout=30) == 3
    err = info.value
    # 0.5 compatibility: the worker's formatted traceback as a string
    assert "in inner" in err.stack_trace and "ValueError: bad value 7" in err.stack_trace
    # and a real traceback that includes the worker's frames
    names = [fs.name for fs in traceback.extract_tb(err.__traceback__)]
    assert names[-1] == "inner"
    assert "worker_main" not in names and "run_packet" not in names and "run_items" not in names


def test_exception_chain_survives():
    with ParallelQueue(num_workers=1) as q:
        q.put(outer, 3)
        with pytest.raises(KeyError) as info:
            q.get(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "bad value 3"
    assert [fs.name for fs in traceback.extract_tb(cause.__traceback__)][-1] == "inner"
    text = "".join(traceback.format_exception(type(info.value), info.value, info.value.__traceback__))
    assert "direct cause" in text and "in outer" in text


def test_exception_that_cannot_be_rebuilt_becomes_remote_error():
    with ParallelQueue(num_workers=2) as q:
        q.put(raise_two_arg)
        q.put(raise_locked)
        q.put(abs, -9)
        with pytest.raises(RemoteError) as two:
            q.get(timeout=30)
        with pytest.raises(RemoteError) as locked:
            q.get(timeout=30)
        assert q.get(timeout=30) == 9
    assert two.value.type_name.endswith("TwoArgError") and two.value.message == "1/2"
    assert "raise_two_arg" in two.value.stack_trace
    assert locked.value.type_name.endswith("LockedError") and "has a lock" in str(locked.value)
    assert "raise_locked" in [fs.name for fs in traceback.extract_tb(locked.value.__traceback__)]


def test_unpicklable_argument_fails_in_its_slot_only():
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        q.put(abs, threading.Lock())
        q.put(abs, -3)
        assert q.get(timeout=30) == 1
        with pytest.raises(pickle.PicklingError, match="could not pickle task builtins.abs"):
            q.get(timeout=30)
        assert q.get(timeout=30) == 3


def test_unpicklable_result_fails_in_its_slot_only():
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        q.put(return_lock)
        q.put(abs, -3)
        assert q.get(timeout=30) == 1
        with pytest.raises(pickle.PicklingError, match=r"could not pickle the result of task #1 \(.*return_lock"):
            q.get(timeout=30)
        assert q.get(timeout=30) == 3


def test_lambdas_and_closures_travel():
    k = 5
    with ParallelQueue(num_workers=2) as q:
        q.put(lambda x: x + k, 1)

        def closure(y):
            return y * k

        q.put(closure, 2)
        assert q.get(timeout=30) == 6
        assert q.get(timeout=30) == 10


def make_waiter(ev):
    def wait_then(i):
        assert ev.wait(30)
        return i

    return wait_then


def test_get_timeout_and_nonblocking_raise_empty():

    ev = multiprocessing.get_context().Event()
    # The Event reaches the workers at process start (it cannot be pickled
    # into a task), which is what ParallelSingleTaskQueue is for.
    with ParallelSingleTaskQueue(make_waiter(ev), num_workers=1) as q:
        q.put(1)
        with pytest.raises(queue.Empty):
            q.get(timeout=0.1)
        with pytest.raises(queue.Empty):
            q.get(block=False)
        ev.set()
        assert q.get(timeout=30) == 1


def test_put_timeout_raises_full_and_loses_nothing():

    ev = multiprocessing.get_context().Event()
    with ParallelSingleTaskQueue(make_waiter(ev), num_workers=1, in_q_max=1, max_batch=1) as q:
        accepted = 0
        with pytest.raises(queue.Full):
            for i in range(50):
                q.put(i, timeout=0.2)
                accepted += 1
        # at most: one task running, one queued at the worker, in_q_max waiting
        assert 1 <= accepted <= 3
        ev.set()
        assert [q.get(timeout=30) for _ in range(accepted)] == list(range(accepted))


class RaisesWhenPickled:
    """An argument whose own pickling code raises ``what``."""

    def __init__(self, what):
        self.what = what

    def __reduce__(self):
        raise self.what("from __reduce__")


@pytest.mark.parametrize("what", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_argument_whose_pickling_raises_a_base_exception_fails_in_its_slot(what):
    """Regression: SystemExit from an argument's __reduce__ escaped the
    dispatcher thread, broke the whole queue ("internal error in the
    dispatcher thread") and lost an earlier task's result.  Any
    BaseException from user pickling code is that task's error."""
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        q.put(abs, RaisesWhenPickled(what))
        q.put(abs, -3)
        assert q.get(timeout=60) == 1
        with pytest.raises(pickle.PicklingError, match=f"could not pickle task builtins.abs.*{what.__name__}"):
            q.get(timeout=60)
        assert q.get(timeout=60) == 3
        q.put(abs, -4)
        assert q.get(timeout=60) == 4


class ResultRaisesWhenPickled:
    def __init__(self, what):
        self.what = what

    def __reduce__(self):
        raise self.what("from the result's __reduce__")


def return_raising_result(what):
    return ResultRaisesWhenPickled(what)


@pytest.mark.parametrize("what", [SystemExit, KeyboardInterrupt])
def test_result_whose_pickling_raises_a_base_exception_fails_in_its_slot(what, capfd):
    """Regression: SystemExit or KeyboardInterrupt from a result's __reduce__
    killed the worker, printed its traceback and ran the packet again,
    forever.  It is that task's error, and the worker goes on."""
    with ParallelQueue(num_workers=2) as q:
        q.put(pow, 2, 2)
        q.put(return_raising_result, what)
        q.put(pow, 3, 2)
        assert q.get(timeout=60) == 4
        with pytest.raises(pickle.PicklingError, match=f"could not pickle the result.*{what.__name__}"):
            q.get(timeout=60)
        assert q.get(timeout=60) == 9
        assert q.stats().workers_replaced == 0
    assert "Traceback" not in capfd.readouterr().err


WORKER_ONLY_MODULE = """
class Thing:
    def __init__(self, v):
        self.v = v
"""


def make_worker_only_thing(i):
    if i % 50 == 7:
        import workeronly  # importable in the workers only

        return workeronly.Thing(i)
    if i % 50 == 9:
        import workeronly

        return [i, {"nested": workeronly.Thing(i)}]
    return i


@pytest.mark.parametrize("batch", [None, 1])
def test_result_that_will_not_unpickle_here_fails_in_its_slot_only(tmp_path, batch):
    """Regression: one result that could not be unpickled in the main process
    (its class importable only in the workers: worker_init_f extends
    sys.path) failed its whole packet, 191 slots where 1 should fail.  Now
    only the results that hold such an object fail, each in its own slot."""
    (tmp_path / "workeronly.py").write_text(WORKER_ONLY_MODULE)
    init = functools.partial(sys.path.insert, 0, str(tmp_path))
    with ParallelQueue(num_workers=2, worker_init_f=init, max_batch=batch) as q:
        for i in range(200):
            q.put(make_worker_only_thing, i)
        got = []
        for _ in range(200):
            try:
                got.append(q.get(timeout=60))
            except pickle.UnpicklingError as e:
                got.append(str(e))
    assert "workeronly" not in sys.modules
    for i, x in enumerate(got):
        if i % 50 in (7, 9):
            assert x.startswith(f"could not unpickle the result of task #{i} in the main process"), x
            assert "No module named 'workeronly'" in x
        else:
            assert x == i


def test_a_task_holding_a_multiprocessing_lock_says_where_it_can_go():
    """A closure over a multiprocessing Lock (or Event, or Value) cannot be
    pickled with its task; the error says how to hand it to the workers."""
    lock = multiprocessing.Lock()
    value = multiprocessing.Value("i", 0)

    def uses_lock():
        with lock:
            return 1

    with ParallelQueue(num_workers=1) as q:
        q.put(uses_lock)
        q.put(lambda: value.value)
        for _ in range(2):
            with pytest.raises(pickle.PicklingError, match="ParallelSingleTaskQueue") as info:
                q.get(timeout=60)
            assert "worker_init_f" in str(info.value)
