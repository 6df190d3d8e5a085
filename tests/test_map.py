"""imap: the builtin map, in parallel, in order, lazily."""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import descendants, drain, wait_until

from parallel_queue import ParallelQueue, WorkerLostError, _dispatcher, _executor, _reaper, imap


def square(x):
    return x * x


def fail_on_3(x):
    if x == 3:
        raise ValueError(f"three: {x}")
    return x


def test_same_results_as_builtin_map():
    data = list(range(-500, 500))
    assert list(imap(square, data, num_workers=2)) == list(map(square, data))
    assert list(imap(pow, range(10), itertools.repeat(3), num_workers=2)) == list(
        map(pow, range(10), itertools.repeat(3))
    )
    assert list(imap(pow, [1, 2, 3], [2, 2], num_workers=2)) == [1, 4]  # zipped, shortest wins
    assert list(imap(square, [], num_workers=2)) == []


def test_closure_and_lambda():
    k = 7
    assert list(imap(lambda x: x + k, range(5), num_workers=2)) == [7, 8, 9, 10, 11]


def test_endless_input_is_read_lazily():
    read = []

    def numbers():
        for i in itertools.count():
            read.append(i)
            yield i

    it = imap(square, numbers(), num_workers=2, in_q_max=50)
    first = [next(it) for _ in range(1000)]
    assert first == [i * i for i in range(1000)]
    # Read ahead is bounded by the queue (pending, packets at workers, the
    # reorder window), never the whole input.
    assert len(read) < 1000 + 50 + 2 * 2 * 1024 + 40 * 1024
    it.close()
    assert descendants(os.getpid()) == []


def test_an_input_that_waits_holds_up_nobody():
    """Regression: the feeder read the input under the queue's lock, in
    chunks: while a generator waited (on a pipe, a socket, an event), the
    item it had yielded before did not run, and stats(), terminate() and the
    dispatcher waited with it.  Now the item runs, and the queue answers."""
    go_on = threading.Event()

    def waits_after_one():
        yield -1
        go_on.wait()
        yield -2

    q = ParallelQueue(num_workers=2)
    try:
        it = q.imap(abs, waits_after_one())
        first = []
        getter = threading.Thread(target=lambda: first.append(next(it)))
        getter.start()
        getter.join(60)
        assert first == [1]  # while the input still waits
        assert q.stats().tasks_put == 1
        go_on.set()
        assert list(it) == [2]
        # And terminate() while the input waits:
        go_on.clear()
        it = q.imap(abs, waits_after_one())
        assert next(it) == 1
        ender = threading.Thread(target=q.terminate)
        ender.start()
        ender.join(60)
        assert not ender.is_alive()
    finally:
        go_on.set()  # (the feeder, blocked in the input, reads on and stops)
        q.terminate()


@pytest.mark.parametrize("where", ["imap", "queue"])
def test_closing_a_map_whose_input_waits_returns(where):
    """Regression (adversarial testing): close() waited for the feeder thread,
    which was waiting inside the input: closing a map over a blocked
    generator (or leaving its with block by Ctrl-C) hung until the input
    went on.  The feeder now stops at its next item, putting nothing."""
    go_on = threading.Event()

    def waits_after_one():
        yield -1
        go_on.wait()
        yield -2
        yield -3

    q = ParallelQueue(num_workers=2) if where == "queue" else None
    try:
        it = q.imap(abs, waits_after_one()) if q is not None else imap(abs, waits_after_one(), num_workers=2)
        assert next(it) == 1
        closer = threading.Thread(target=it.close)
        closer.start()
        closer.join(60)
        assert not closer.is_alive()
        go_on.set()  # the feeder reads on, sees the map closed, and stops
        if q is not None:
            assert list(q.imap(abs, [-7, -8])) == [7, 8]  # the queue is whole, nothing of the old map in it
    finally:
        go_on.set()
        if q is not None:
            q.terminate()


class LazyDataset:
    """Has a length, yet its items come from elsewhere (a disk, a network)."""

    def __init__(self, gate):
        self.gate = gate

    def __len__(self):
        return 6

    def __iter__(self):
        for i in range(6):
            if i == 3:
                self.gate.wait()
            yield -i


def test_an_input_with_a_length_that_waits_holds_up_nobody():
    """Regression (adversarial testing): anything with a length was read in
    chunks under the queue's lock, so a dataset class that waited held up
    stats() and the items before the wait."""
    gate = threading.Event()
    q = ParallelQueue(num_workers=2)
    try:
        it = q.imap(abs, LazyDataset(gate))
        first = []
        getter = threading.Thread(target=lambda: first.extend(next(it) for _ in range(3)))
        getter.start()
        getter.join(60)
        assert first == [0, 1, 2]
        assert q.stats().tasks_put == 3
        gate.set()
        assert list(it) == [3, 4, 5]
    finally:
        gate.set()
        q.terminate()


def test_a_producer_that_waits_for_each_result_goes_on():
    """A conversation: the input yields its next item only once the result of
    the one before came out.  Read in chunks (or with an item held back
    until more came), this waited for ever."""
    seen = queue.Queue()

    def conversation():
        x = 0
        for _ in range(50):
            yield x
            x = (seen.get() + 1) % 1000

    it = imap(square, conversation(), num_workers=2)
    out = []
    for r in it:
        out.append(r)
        seen.put(r)
    expected, x = [], 0
    for _ in range(50):
        expected.append(x * x)
        x = (x * x + 1) % 1000
    assert out == expected


def test_exception_in_place_and_iteration_goes_on():
    out = drain(imap(fail_on_3, range(6), num_workers=2), ValueError)
    assert out == [0, 1, 2, "ValueError: three: 3", 4, 5]


def fail_on_multiples_of_7(x):
    if x % 7 == 0:
        raise ValueError(f"multiple of 7: {x}")
    return x


def test_for_loops_and_next_share_one_position():
    # Mixing ``for`` and next(), breaking out and starting a new loop after
    # an error repeats, skips or reorders nothing.  Packets of 5: each
    # next() below comes at the end of a run.
    it = imap(fail_on_multiples_of_7, range(1, 300), num_workers=2, chunksize=5)
    out: list = []
    loops = 0
    while True:
        loops += 1
        try:
            for x in it:
                out.append(x)
                if x % 5 == 0:
                    out.append(next(it))  # a next() inside the loop
                if x % 11 == 0:
                    break  # leave the loop; the next one goes on from here
            else:
                break
        except ValueError as e:
            out.append(str(e))
        except StopIteration:
            break
    assert out == [x if x % 7 else f"multiple of 7: {x}" for x in range(1, 300)]
    assert loops > 300 // 7


def test_the_iterator_is_its_own_iterator_and_goes_on_after_an_error():
    """Regression: iter() of the map made a new generator, which ended for
    good at the first task error; a caller who kept it (``g = iter(it)``,
    as itertools and zip do) got StopIteration from its next next(), and
    every later result was silently lost."""
    for it in (imap(fail_on_3, range(10), num_workers=2), ParallelQueue(num_workers=2).imap(fail_on_3, range(10))):
        try:
            assert iter(it) is it
            out = drain(iter(it), ValueError)
            assert out == [0, 1, 2, "ValueError: three: 3", 4, 5, 6, 7, 8, 9]
        finally:
            it.close()
            it._q.terminate()


def test_input_error_raised_after_earlier_results():
    def broken():
        yield 1
        yield 2
        raise KeyError("input broke")

    it = imap(abs, broken(), num_workers=2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(KeyError, match="input broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_break_close_and_garbage_collection_stop_workers():
    for _ in imap(square, itertools.count(), num_workers=2):
        break
    gc.collect()
    with imap(square, itertools.count(), num_workers=2) as it:
        assert next(it) == 0
    it = imap(square, itertools.count(), num_workers=2)
    next(it)
    del it
    gc.collect()
    # the fixture checks no process is left; the feeder threads end too
    for t in threading.enumerate():
        if t.name == "parallel_queue-imap-feeder":
            t.join(30)
            assert not t.is_alive()


def packet_sizes(monkeypatch):
    """The number of tasks in each packet the dispatchers make from now on
    (they are threads of this process)."""
    sizes = []
    for module, name in ((_dispatcher, "PacketRecord"), (_executor, "_Packet")):
        cls = getattr(module, name)

        class Counted(cls):  # type: ignore[misc, valid-type]
            __slots__ = ()

            def __init__(self, *args, _cls=cls):
                _cls.__init__(self, *args)
                sizes.append(len(self.items))

        monkeypatch.setattr(module, name, Counted)
    return sizes


def test_chunksize_is_honoured_and_order_kept(monkeypatch):
    # Packets take chunksize tasks when that many wait, never more
    # (automatic sizing would send single tasks first, then far bigger packets).
    sizes = packet_sizes(monkeypatch)
    assert list(imap(square, range(1000), num_workers=2, chunksize=7)) == [i * i for i in range(1000)]
    assert sum(sizes) == 1000 and max(sizes) == 7
    with pytest.raises(ValueError):
        imap(square, range(3), chunksize=0)


def test_queue_imap_chunksize_is_its_own_and_ends_with_it(monkeypatch):
    sizes = packet_sizes(monkeypatch)
    with ParallelQueue(num_workers=2) as q:
        assert list(q.imap(square, range(500), chunksize=5)) == [i * i for i in range(500)]
        assert sum(sizes) == 500 and max(sizes) == 5
        sizes.clear()
        assert list(q.imap(square, range(3000))) == [i * i for i in range(3000)]
        assert sum(sizes) == 3000 and max(sizes) > 5  # sized automatically again


def test_chunksize_never_overruns_max_tasks_per_worker():
    pids = list(imap(lambda _: os.getpid(), range(200), num_workers=2, chunksize=7, max_tasks_per_worker=10))
    assert len(pids) == 200
    assert max(pids.count(p) for p in set(pids)) <= 10


def die_on_5(x):
    if x == 5:
        os._exit(1)
    return x


def test_dead_worker_is_an_error_in_place():
    out = drain(imap(die_on_5, range(10), num_workers=2), WorkerLostError)
    assert [x if isinstance(x, int) else x.split(":")[0] for x in out] == [0, 1, 2, 3, 4, "WorkerLostError", 6, 7, 8, 9]


def test_options_reach_the_queue():
    with pytest.raises(ValueError):
        imap(square, range(3), in_q_max=0)


def kind_of(x):
    return type(x).__name__


@pytest.mark.parametrize("several", [False, True])
def test_unpicklable_input_fails_in_its_own_place(several):
    # imap sends the inputs themselves (or zip's tuples) as task items: an
    # input that will not pickle fails in its slot, its neighbours run.

    inputs = [1, "two", threading.Lock(), 4.0]
    if several:
        it = imap(lambda a, b: kind_of(a) + kind_of(b), inputs, inputs, num_workers=2)
        expected = ["intint", "strstr", None, "floatfloat"]
    else:
        it = imap(kind_of, inputs, num_workers=2)
        expected = ["int", "str", None, "float"]
    out = drain(it, pickle.PicklingError)
    assert out[:2] == expected[:2] and out[3] == expected[3]
    assert out[2].startswith("PicklingError: could not pickle task")


# ------------------------------------------------- imap on a queue the caller keeps


def test_queue_imap_runs_maps_back_to_back_on_the_same_workers():

    with ParallelQueue(num_workers=2) as q:
        processes = set(descendants(os.getpid()))
        assert set(q.imap(lambda _: os.getpid(), range(200))) <= processes
        assert list(q.imap(square, range(-300, 300))) == [x * x for x in range(-300, 300)]
        assert list(q.imap(pow, range(10), [3] * 10, chunksize=3)) == [x**3 for x in range(10)]
        q.put(abs, -5)  # the queue is the caller's again between maps
        assert q.get(timeout=60) == 5
        assert list(q.imap(square, [])) == []
        assert set(descendants(os.getpid())) == processes  # no process was started
    with ThreadPoolExecutor(2) as ex, ParallelQueue(executor=ex) as q:
        assert list(q.imap(square, range(50))) == [x * x for x in range(50)]


def test_queue_imap_has_the_queue_to_itself():
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(square, range(1000))
        assert next(it) == 0
        with pytest.raises(RuntimeError, match="imap"):
            q.put(abs, -1)
        with pytest.raises(RuntimeError, match="imap"):
            q.put("a marker")
        with pytest.raises(RuntimeError, match="imap"):
            q.get(timeout=1)
        with pytest.raises(RuntimeError, match="another imap"):
            q.imap(square, range(3))
        assert list(it) == [x * x for x in range(1, 1000)]
        q.put(abs, -1)
        with pytest.raises(RuntimeError, match="not yet taken"):
            q.imap(square, range(3))
        assert q.get(timeout=60) == 1


def test_queue_imap_errors_in_place_and_input_error_last():
    def broken():
        yield from range(5)
        raise KeyError("input broke")

    with ParallelQueue(num_workers=2) as q:
        assert drain(q.imap(fail_on_3, range(6)), ValueError) == [0, 1, 2, "ValueError: three: 3", 4, 5]
        it = q.imap(abs, broken())
        assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(KeyError, match="input broke"):
            next(it)
        q.put(abs, -9)
        assert q.get(timeout=60) == 9


@pytest.mark.parametrize("how", ["close", "drop"])
def test_queue_imap_closed_early_leaves_no_stale_result(how):
    # Tasks already sent when the map is closed still run; their results
    # must never come out of the next get() or map.
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(square, itertools.count())
        assert [next(it) for _ in range(3)] == [0, 1, 4]
        if how == "close":
            it.close()
        else:
            del it
            gc.collect()
        q.put(abs, -7)
        assert q.get(timeout=60) == 7
        assert list(q.imap(abs, [-1, -2, -3])) == [1, 2, 3]
        assert q.stats().in_flight == 0


@pytest.mark.parametrize("then", ["put", "marker", "get", "imap"])
def test_queue_imap_dropped_gives_the_queue_back_to_whoever_wants_it_first(then):
    """A map dropped half-way hands the queue back by itself: the reaper
    does it (see _reaper), and whoever wants the queue before that does it
    first.  Forced: the reaper is kept busy, so only the next call can."""
    busy, release = threading.Event(), threading.Event()

    class Token:
        pass

    token = Token()
    _reaper.watch(token, lambda: (busy.set(), release.wait()))
    del token  # the reaper now waits in that action
    try:
        assert busy.wait(60)
        with ParallelQueue(num_workers=2) as q:
            it = q.imap(square, itertools.count())
            assert [next(it) for _ in range(3)] == [0, 1, 4]
            del it  # collected at once: the reaper is told, but busy
            if then == "put":
                q.put(abs, -7)
                assert q.get(timeout=60) == 7
            elif then == "marker":
                q.put("marker")
                assert q.get(timeout=60) == "marker"
            elif then == "get":
                with pytest.raises(queue.Empty):
                    q.get(timeout=0.1)
            else:
                assert list(q.imap(abs, [-1, -2])) == [1, 2]
            assert q.stats().in_flight == 0
    finally:
        release.set()


def test_a_task_error_does_not_keep_a_dropped_map_alive():
    """Regression: a task's exception, rebuilt with the worker's traceback,
    was in a reference cycle with the frames that made it, the map's
    iterator among them: after ``for`` ended on the error, the iterator
    (and the queue's lease) lived on until the cyclic garbage collector
    ran, and the next imap(), put() or get() was refused.  With that
    collector off, the iterator must go the moment nobody holds it."""
    gc.disable()
    try:
        with ParallelQueue(num_workers=2) as q:
            it = q.imap(fail_on_3, range(10))
            iterator = weakref.ref(it)
            with pytest.raises(ValueError, match="three"):
                for _ in it:
                    pass
            del it
            assert iterator() is None
            assert list(q.imap(abs, [-1, -2])) == [1, 2]

            class Sentinel:
                pass

            def get_holding(sentinel: Sentinel) -> None:
                # This frame is on the stack that made the exception's traceback.
                q.get(timeout=60)

            q.put(fail_on_3, 3)
            sentinel = Sentinel()
            held = weakref.ref(sentinel)
            with pytest.raises(ValueError, match="three"):
                get_holding(sentinel)
            del sentinel
            assert held() is None  # no cycle keeps that stack alive either
    finally:
        gc.enable()


def test_queue_imap_collected_by_a_thread_holding_the_queues_lock():
    """Regression: the map's finalizer took both of the queue's locks in
    whichever thread ran the garbage collection, and deadlocked a thread
    that held one.  Forced: the iterator lives only in a reference cycle,
    collected by a thread that holds the queue's lock."""
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(square, itertools.count())
        assert next(it) == 0
        cycle = [it]
        cycle.append(cycle)
        del it, cycle

        def collect_holding_the_lock() -> None:
            with q._core.lock:
                gc.collect()

        t = threading.Thread(target=collect_holding_the_lock)
        t.start()
        t.join(60)
        assert not t.is_alive()
        q.put(abs, -7)
        assert q.get(timeout=60) == 7


@pytest.mark.parametrize("where", ["registering", "starting the feeder"])
def test_queue_imap_interrupted_while_it_starts_leaves_the_queue_usable(monkeypatch, where):
    """Regression: a Ctrl-C caught by the program (a notebook cell, say)
    that landed while ParallelQueue.imap() started its feeder left the
    queue leased to a map nobody had: every later imap(), put() and get()
    was refused.  Forced at each step after the lease is taken."""
    from parallel_queue import _maps

    real_thread = _maps.helper_thread

    if where == "registering":

        def watch(obj, action):
            raise KeyboardInterrupt

        monkeypatch.setattr(_maps, "watch", watch)
    else:

        class PressedWhileStarting(threading.Thread):
            def start(self) -> None:
                super().start()
                raise KeyboardInterrupt  # the press, just after the thread began

        def helper_thread(target, name, args=()):
            t = real_thread(target, name, args)
            t.__class__ = PressedWhileStarting
            return t

        monkeypatch.setattr(_maps, "helper_thread", helper_thread)
    with ParallelQueue(num_workers=2) as q:
        with pytest.raises(KeyboardInterrupt):
            q.imap(square, itertools.count())
        monkeypatch.undo()
        assert q._core.intake.lease is None
        # The feeder of an input that may wait is not waited for (see
        # IMapIterator.close): it ends at its next item, putting nothing.
        wait_until(lambda: not [t for t in threading.enumerate() if t.name == "parallel_queue-imap-feeder"])
        assert list(q.imap(abs, [-1, -2])) == [1, 2]
        q.put(abs, -3)
        assert q.get(timeout=60) == 3


def test_queue_imap_function_that_will_not_pickle_fails_each_task():

    lock = threading.Lock()
    with ParallelQueue(num_workers=2) as q:
        out = drain(q.imap(lambda x: (lock, x), range(3)), pickle.PicklingError)
        assert len(out) == 3 and all(o.startswith("PicklingError: could not pickle") for o in out)
        assert list(q.imap(square, range(3))) == [0, 1, 4]  # the queue goes on


def test_queue_imap_dead_worker_is_an_error_in_place():
    with ParallelQueue(num_workers=2) as q:
        out = drain(q.imap(die_on_5, range(10)), WorkerLostError)
        kinds = [x if isinstance(x, int) else x.split(":")[0] for x in out]
        assert kinds == [0, 1, 2, 3, 4, "WorkerLostError", 6, 7, 8, 9]
        assert list(q.imap(square, range(3))) == [0, 1, 4]
