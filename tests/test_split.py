"""A packet whose results grow large goes in several frames (see
_worker.SPLIT_BYTES): results that grow suddenly are not all held until the
packet's last task ran, and a worker's death after some of them were taken
loses nothing and repeats nothing."""

from __future__ import annotations

import array
import os
import signal
import textwrap
import threading

import numpy
import pytest
from conftest import run_python

from parallel_queue import ParallelQueue, WorkerLostError
from parallel_queue._payload import weigh
from parallel_queue._worker import SPLIT_BYTES

MB = 1 << 20


def test_results_that_grow_suddenly_are_not_all_held():
    """20,000 tiny results, then 1,200 of 1 MB, put one by one: packets sized
    on the tiny ones carry hundreds of the large.  Each process's peak
    memory stays well under the 1.2 GB of results: below 500 MB (typically
    50 MB; 257 MB was seen for 600 of them in a loaded suite run).  Before,
    a packet's results were all held in its worker, then in the consumer
    and the main process: with 600 of them, 555 MB in a child and 684 MB
    in the main process."""
    code = textwrap.dedent(
        """
        import resource, threading
        from parallel_queue import ParallelQueue

        def task(i):
            return bytes([i % 256]) * (1 << 20) if i >= 20000 else i

        if __name__ == "__main__":
            n = 21200
            with ParallelQueue(num_workers=2) as q:
                def produce():
                    for i in range(n):
                        q.put(task, i)
                    q.stop()
                producer = threading.Thread(target=produce)
                producer.start()
                count, wrong = 0, []
                for i, r in enumerate(q):
                    count += 1
                    if r != task(i):
                        wrong.append(i)
                producer.join()
            print(not wrong and count == n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10, count, wrong[:5])
        """
    )
    done = run_python(code, timeout=110)
    assert done.returncode == 0, done.stderr
    ok, main_mb, child_mb = done.stdout.split()[:3]
    assert ok == "True", done.stdout
    assert int(main_mb) < 500, done.stdout
    assert int(child_mb) < 500, done.stdout


def one_mb(i, fifo, raise_at=()):
    """1 MB made of ``i``; ``fifo``: wait at the packet's last task (39) until
    the main process opens it."""
    if i == 39 and fifo:
        with open(fifo) as f:
            f.read()
    if i in raise_at:
        raise ValueError(i)
    return bytes([i]) * MB


@pytest.mark.parametrize("task_timeout", [None, 60], ids=["batch", "careful"])
def test_a_packet_of_large_results_comes_out_before_its_last_task_ran(tmp_path, task_timeout):
    """One packet of 40 tasks of 1 MB results (chunksize=40), its last task
    held until the main process has taken 16 results: they came out of the
    packet before it ended (in frames of SPLIT_BYTES), in order, errors in
    their own places.  Both ways a worker runs a packet (with task_timeout,
    one task at a time)."""
    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    raise_at = (3, 17, 38)
    got = []
    sixteen = threading.Event()
    with ParallelQueue(num_workers=2, task_timeout=task_timeout) as q:
        it = q.imap(one_mb, range(40), [fifo] * 40, [raise_at] * 40, chunksize=40)

        def take_all():
            for _ in range(40):
                try:
                    got.append(next(it))
                except ValueError as e:
                    got.append(e.args)
                if len(got) == 16:
                    sixteen.set()

        taker = threading.Thread(target=take_all)
        taker.start()
        came_first = sixteen.wait(60)
        with open(fifo, "w"):  # let the last task go
            pass
        taker.join()
        assert came_first, f"{len(got)} results came before the packet's last task ran"
        assert next(it, None) is None
    assert got == [(i,) if i in raise_at else bytes([i]) * MB for i in range(40)]


def log_and_return(i, log, fifo):
    """1 MB made of ``i``, each run recorded in ``log``; task 30, the first
    time, waits until the main process took a result, then kills its worker."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if i == 30 and not os.path.exists(fifo + ".done"):
        open(fifo + ".done", "w").close()
        with open(fifo) as f:
            f.read()
        os.kill(os.getpid(), signal.SIGKILL)
    return bytes([i]) * MB


def test_a_worker_killed_after_its_packets_first_results_were_taken_repeats_none(tmp_path):
    """One packet of 40 tasks of 1 MB results; task 30 kills its worker once
    the first result was taken.  The packet runs again (its first tasks ran
    twice), and its frames start again at its first task: the main process
    drops what it had already taken.  Each result comes out once, in order,
    task 30 fails in its place, and the queue goes on."""
    fifo, log = str(tmp_path / "go"), str(tmp_path / "log")
    os.mkfifo(fifo)
    out = []
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(log_and_return, range(40), [log] * 40, [fifo] * 40, chunksize=40)
        taker = threading.Thread(target=lambda: out.append(next(it)))
        taker.start()
        taker.join(60)
        came_first = not taker.is_alive()
        with open(fifo, "w"):  # task 30 kills its worker
            pass
        taker.join()
        assert came_first, "the first result waited for the packet's end"
        for _ in range(1, 30):
            out.append(next(it))
        with pytest.raises(WorkerLostError, match=r"task #30 .*SIGKILL"):
            next(it)
        out.extend(it)
        q.put(abs, -3)
        assert q.get(timeout=60) == 3
        assert q.stats().workers_replaced == 1
    assert out == [bytes([i]) * MB for i in range(40) if i != 30]
    with open(log) as f:
        runs = [int(line) for line in f]
    assert runs.count(0) == 2, runs  # the packet did run again: the first result was dropped there
    assert runs.count(30) == 1


class Holder:
    def __init__(self, data):
        self.data = data


class Blob(bytes):
    pass


class Proxy:
    """Pickles, but any attribute it lacks raises KeyError (a record that
    looks names up in a table)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __getattr__(self, name):
        raise KeyError(name)

    def __reduce__(self):
        return (Proxy, (self.data,))


def test_a_worker_weighs_the_usual_large_results():
    """What a worker weighs its results by, without pickling them."""
    block = b"x" * 1000
    assert [weigh(v) for v in (block, "y" * 500, bytearray(200), Blob(block))] == [1000, 500, 200, 1000]
    assert [weigh(v) for v in (numpy.zeros(100), memoryview(block), array.array("b", block))] == [800, 1000, 1000]
    assert [weigh(v) for v in ((1, block), [block, 2.0], {"text": "y" * 10}, {block})] == [1000, 1000, 10, 1000]
    assert [weigh(v) for v in (Holder(block), (("deep", block),), {"k": [[block]]})] == [1000, 1004, 1000]
    assert weigh(((((block,),),),)) == 0  # four levels down: left to the pickle
    assert weigh([block] * 1000) == 1_000_000 < SPLIT_BYTES  # (8 of them looked at)
    assert weigh(list(range(10**6))) == 0
    assert weigh(Proxy(block)) == 0  # its __getattr__ raised: it weighs nothing, the worker goes on


def test_a_result_whose_own_code_fails_when_weighed_comes_back():
    """A result whose ``__getattr__`` raises for a missing attribute pickles
    and comes back as any other (before, weighing it killed the worker, and
    every such task was reported lost)."""
    with ParallelQueue(num_workers=2) as q:
        for i in range(3):
            q.put(Proxy, i)
        assert [q.get(timeout=60).data for _ in range(3)] == [0, 1, 2]
        assert q.stats().workers_replaced == 0
