"""Large payloads: out-of-band buffers, large frames, and faults mid-transfer."""

from __future__ import annotations

import ctypes
import fcntl
import gc
import mmap
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import NamedTuple

import numpy
import pytest
from conftest import ROOT, live_processes, run_python, wait_until
from test_soak import LoadsOnlyInWorkers  # a result that will not unpickle in the main process

from parallel_queue import ParallelQueue, QueueBrokenError, _region, _wire
from parallel_queue._payload import OOB_MIN, dumps_results_oob, loads_results
from parallel_queue._region import RING_BYTES

MAIN_PID = os.getpid()
SIZES = [OOB_MIN - 1, OOB_MIN, OOB_MIN + 1, 3 * OOB_MIN]


def make(spec):
    kind, size, i = spec
    if kind == "bytes":
        return bytes([i % 256]) * size
    if kind == "bytearray":
        return bytearray([i % 256]) * size
    if kind == "tuple":
        return (i, bytes([i % 256]) * size, "text")
    if kind == "numpy":
        return numpy.full(size // 8, float(i))
    if kind == "fortran":
        return numpy.asfortranarray(numpy.full((size // 64, 8), float(i)))
    if kind == "strided":  # not contiguous: pickled in the stream
        return numpy.full(size // 4, float(i))[::2]
    raise ValueError(kind)


@pytest.mark.parametrize("size", SIZES)
def test_buffers_of_at_least_the_threshold_travel_out_of_band(size):
    """The pickler's buffers and large bytes leave the stream from the
    threshold on, and come back equal, of their own type."""
    values = [make((kind, size, 7)) for kind in ("bytes", "bytearray", "tuple", "numpy", "strided")]
    payload, buffers = dumps_results_oob(values, {}, values, 0)
    sizes = sorted(b.nbytes for b in buffers)
    expected = sorted(n for n in (size, size, size, size // 8 * 8) if n >= OOB_MIN)
    assert sizes == expected
    back, errors = loads_results(payload, [memoryview(bytearray(b)) for b in buffers])
    assert errors == {}
    for got, want in zip(back, values):
        assert type(got) is type(want)
        if isinstance(want, numpy.ndarray):
            assert numpy.array_equal(got, want)
        else:
            assert got == want


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "tuple", "numpy", "fortran", "strided"])
def test_large_results_come_back_whole_in_order_and_of_their_type(kind):
    specs = [(kind, size, i) for i, size in enumerate(SIZES * 3)]
    with ParallelQueue(num_workers=2) as q:
        got = list(q.imap(make, specs))
    assert len(got) == len(specs)
    for value, spec in zip(got, specs):
        want = make(spec)
        assert type(value) is type(want)
        if isinstance(want, numpy.ndarray):
            assert numpy.array_equal(value, want)
            assert value.flags.writeable  # as Pool gives them
            value[0] = -1  # (and writing to it is fine)
        else:
            assert value == want


class RingRead(NamedTuple):
    memory: bytearray
    size: int


@pytest.fixture
def ring_reads(monkeypatch):
    """What the main process read from the workers' rings: each copy's
    memory and size (see _region.RingReader.read; the memory is the
    bytearray behind the window read into, see _wire.BodyPool)."""
    reads = []
    real = _region.RingReader.read

    def read(self, data, end, into):
        real(self, data, end, into)
        reads.append(RingRead(into.obj, end - data))

    monkeypatch.setattr(_region.RingReader, "read", read)
    return reads


def test_a_large_array_result_is_not_copied_out_of_what_was_received(ring_reads):
    """An array of the threshold or more comes through the worker's ring, and
    is rebuilt on the memory the main process read it into (its own), not
    copied again; a small one (in the pickle stream) has a copy of its own."""
    with ParallelQueue(num_workers=2) as q:
        small, big = q.imap(make, [("numpy", OOB_MIN // 2, 1), ("numpy", 4 * OOB_MIN, 2)])
    assert numpy.array_equal(big, numpy.full(4 * OOB_MIN // 8, 2.0))
    assert any(_memory_of(big) is r.memory for r in ring_reads)
    assert big.flags.writeable
    assert len(_memory_of(small)) == small.nbytes


def _not_copied(array):
    """Whether an array's memory is the frame it came in (larger than itself)."""
    held = _memory_of(array)
    return type(held) is bytearray and len(held) > array.nbytes


def _memory_of(array):
    """What holds an array's data, past the arrays and views it was made by."""
    base = array
    while isinstance(base, numpy.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def mixed(i):
    if i == 1:
        return LoadsOnlyInWorkers(i)
    return numpy.full(OOB_MIN // 4, float(i)) if i % 2 == 0 else bytes([i]) * OOB_MIN


def test_a_result_that_will_not_load_fails_alone_beside_out_of_band_buffers():
    """The salvage of a packet (see _salvage) is given its buffers: the
    result that will not load fails in its slot, the large ones beside it in
    the same packet come out whole."""
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(mixed, range(4), chunksize=4)
        first = next(it)
        with pytest.raises(pickle.UnpicklingError, match="task #1"):
            next(it)
        rest = list(it)
    assert numpy.array_equal(first, numpy.full(OOB_MIN // 4, 0.0))
    assert numpy.array_equal(rest[0], numpy.full(OOB_MIN // 4, 2.0))
    assert rest[1] == bytes([3]) * OOB_MIN


def big_result(n):
    return bytes([n % 256]) * n


def kill_the_worker_blocked_writing(engine):
    """SIGKILL the worker that is blocked writing to its full pipe (the
    consumer is stopped); its pid."""
    writer = []

    def blocked_writing():
        for slot in engine.slots:
            try:
                with open(f"/proc/{slot.proc.pid}/wchan") as f:
                    if "pipe_w" in f.read():  # pipe_write, pipe_wait_writable
                        writer.append(slot.proc.pid)
                        return True
            except OSError:
                pass
        return False

    wait_until(blocked_writing)
    os.kill(writer[0], signal.SIGKILL)
    return writer[0]


def test_a_worker_killed_while_it_writes_a_large_result_loses_nothing():
    """The worker is killed half-way through writing a result larger than
    its ring, so in its frame (the consumer is stopped, so the pipe fills and
    the write blocks).  The frame cut short is dropped, and the packet goes
    again, careful (as for any death after its tasks ran: see _supervisor):
    the slot has its value, whole, in its place, and the queue goes on."""
    size = RING_BYTES + (8 << 20)
    q = ParallelQueue(num_workers=2, max_batch=1)
    engine = q._core.engine
    try:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        os.kill(engine.consumer.pid, signal.SIGSTOP)
        q.put(big_result, size)
        q.put(abs, -2)
        kill_the_worker_blocked_writing(engine)
        os.kill(engine.consumer.pid, signal.SIGCONT)
        assert q.get(timeout=60) == big_result(size)
        assert q.get(timeout=60) == 2
        assert q.stats().workers_replaced == 1
        q.put(big_result, 1 << 20)
        assert q.get(timeout=60) == big_result(1 << 20)
    finally:
        os.kill(engine.consumer.pid, signal.SIGCONT)
        q.terminate()


def half_in_the_ring(n):
    """16 MiB that fit in the ring, and more than the ring, in the frame."""
    return bytes([1]) * (16 << 20), bytes([2]) * (RING_BYTES + n)


def assert_the_ring_has_its_whole_size(q, ring_reads):
    """(one worker, whose dead predecessor's range was [0, 16 MiB) of the
    ring) Two results of 12 MiB both go through the ring: the first after
    that range, the second only fits at the ring's start, where that range
    was, so only if it was given back."""
    third = RING_BYTES * 3 // 8
    del ring_reads[:]
    q.put(make, ("numpy", third, 1))
    first = q.get(timeout=60)
    q.put(make, ("numpy", third, 2))
    second = q.get(timeout=60)
    assert numpy.array_equal(first, numpy.full(third // 8, 1.0))
    assert numpy.array_equal(second, numpy.full(third // 8, 2.0))
    assert [r.size for r in ring_reads] == [third, third]  # both through the ring


def test_a_worker_killed_between_its_ring_and_its_frame_gives_the_ring_back(ring_reads):
    """The worker put half a result in its ring and is killed while the rest
    is written in its frame (the consumer is stopped): nobody will ever read
    the range it took in the ring.  The value comes out whole (the packet goes
    again), and the range is given back: the next worker's results use the
    ring's whole size again.  Before the range was given back, the ring
    stayed short of it for the queue's life."""
    q = ParallelQueue(num_workers=1, max_batch=1)
    engine = q._core.engine
    try:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        os.kill(engine.consumer.pid, signal.SIGSTOP)
        q.put(half_in_the_ring, 1)
        kill_the_worker_blocked_writing(engine)
        os.kill(engine.consumer.pid, signal.SIGCONT)
        assert q.get(timeout=60) == half_in_the_ring(1)
        assert q.stats().workers_replaced == 1
        assert_the_ring_has_its_whole_size(q, ring_reads)
    finally:
        os.kill(engine.consumer.pid, signal.SIGCONT)
        q.terminate()


def test_a_worker_killed_writing_a_packets_first_frame_gives_the_ring_back(ring_reads):
    """As above, for the first frame of a packet whose results go in several
    (see _worker.SPLIT_BYTES): a packet of two such results, the worker
    killed as it writes the first one's frame.  Its range in the ring is
    keyed by packet and first task, and given back: the consumer never had
    that frame.  Both values come out whole, and the ring has its whole size
    again."""
    q = ParallelQueue(num_workers=1)
    engine = q._core.engine
    try:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        # The consumer publishes that the next packet (id 1) is its next
        # just after it passed packet 0 on: stopped before that, it would
        # leave the worker waiting for its turn, not writing.
        wait_until(lambda: engine.max_packet_id.value == engine.opts.consumer_buffer_max)
        os.kill(engine.consumer.pid, signal.SIGSTOP)
        it = q.imap(half_in_the_ring, [1, 2], chunksize=2)
        kill_the_worker_blocked_writing(engine)
        os.kill(engine.consumer.pid, signal.SIGCONT)
        assert list(it) == [half_in_the_ring(1), half_in_the_ring(2)]
        assert q.stats().workers_replaced == 1
        assert_the_ring_has_its_whole_size(q, ring_reads)
    finally:
        os.kill(engine.consumer.pid, signal.SIGCONT)
        q.terminate()


def test_results_kept_hold_nothing_of_the_ring(ring_reads):
    """A caller that keeps every result keeps copies of its own: the ring
    goes round under them (8 results of a quarter ring each), every one
    whole and in its place, and once they are taken every range of the ring
    is free again (before, kept arrays were views of the ring and held it)."""
    size = RING_BYTES // 4
    with ParallelQueue(num_workers=1, max_batch=1) as q:
        kept = list(q.imap(make, [("numpy", size, k) for k in range(8)]))
        results = q._core.engine.rings[0].results
        assert results.tail == results.cell(_region.HEAD)  # every range given back
        q.put(make, ("numpy", size, 8))
        again = q.get(timeout=60)
    for k, a in enumerate(kept):
        assert numpy.array_equal(a, numpy.full(size // 8, float(k)))
    assert numpy.array_equal(again, numpy.full(size // 8, 8.0))
    assert ring_reads and ring_reads[-1].size == size and len(ring_reads) > 1


def forks_a_reader(arg, report):
    """Fork a helper that reads the argument after the task has returned
    (and later packets came through the ring); it writes to ``report``
    whether it saw the argument unchanged."""
    first = float(arg[0])
    if os.fork() == 0:
        time.sleep(0.5)
        same = float(arg[0]) == first and float(arg[-1]) == first
        with open(report, "a") as f:
            f.write("same\n" if same else f"changed {first} {float(arg[0])}\n")
        os._exit(0)
    return first


def test_what_a_process_forks_has_a_copy_not_a_view_of_the_ring(ring_reads, tmp_path):
    """A child forked while the program holds a result has its own copy: the
    child writing to it changes nothing here, and results that come later
    through the ring change nothing there.  So does a helper a task forks
    with its argument.  (Views of the ring itself were shared: found by
    adversarial testing.)"""
    size = RING_BYTES // 4
    with ParallelQueue(num_workers=1, max_batch=1) as q:
        q.put(make, ("numpy", size, 1))
        held = q.get(timeout=60)
        assert ring_reads
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            held[:] = 99.0
            os.write(w, b"x")
            time.sleep(1)  # while the parent streams more through the ring
            os._exit(0 if float(held[0]) == 99.0 and float(held[-1]) == 99.0 else 1)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        for k in range(8):
            q.put(make, ("numpy", size, k + 2))
            assert q.get(timeout=60)[0] == float(k + 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert numpy.array_equal(held, numpy.full(size // 8, 1.0))
        report = tmp_path / "helpers"
        args = [(numpy.full(size // 8, float(k)), str(report)) for k in range(6)]
        assert list(q.imap(forks_a_reader, *zip(*args))) == [float(k) for k in range(6)]
        wait_until(lambda: report.exists() and len(report.read_text().splitlines()) == 6)
    assert report.read_text().splitlines() == ["same"] * 6


def test_the_main_process_killed_with_large_payloads_in_flight_leaves_nothing():
    """SIGKILL of the main process while 8 MB results stream: no process of
    the queue is left, and nothing new in /dev/shm."""
    shm_before = set(os.listdir("/dev/shm"))
    tests = os.path.join(ROOT, "tests")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {tests!r})
        from test_payloads import big_result
        from parallel_queue import ParallelQueue
        q = ParallelQueue(num_workers=2)
        for _ in range(50):
            q.put(big_result, 8 << 20)
        q.get()
        print("streaming", flush=True)
        while True:
            q.get()
            q.put(big_result, 8 << 20)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline() == "streaming\n"
        queue_processes = live_processes(parent=child.pid)
        assert len(queue_processes) == 3  # two workers and the consumer
        child.kill()
        child.wait()
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in queue_processes))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    # Nothing left: other tests running beside this one make short-lived
    # entries there (multiprocessing's semaphores, unlinked at once).
    wait_until(lambda: set(os.listdir("/dev/shm")) - shm_before == set())


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_large_payloads_need_no_numpy():
    """numpy stays optional: large bytes and bytearray results go out of band
    in an interpreter where numpy cannot be imported, and nothing imports it."""
    r = run_python(
        textwrap.dedent(
            """
        import sys
        sys.modules["numpy"] = None  # any import of it fails
        from parallel_queue import ParallelQueue

        def make(n):
            return bytes([n % 256]) * n, bytearray(n)

        if __name__ == "__main__":
            with ParallelQueue(num_workers=2) as q:
                got = list(q.imap(make, [1 << 16, 1 << 20, 5]))
            assert [(len(a), type(b).__name__, len(b)) for a, b in got] == [
                (1 << 16, "bytearray", 1 << 16), (1 << 20, "bytearray", 1 << 20), (5, "bytearray", 5)
            ], got
            print("ok")
        """
        )
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"


def test_a_large_frame_is_read_straight_into_its_body():
    """FrameReader: a frame of BIG_FRAME or more that a read did not bring
    whole is completed by reads into its own body (a window of a bytearray,
    page-aligned: see BodyPool); the frames after it
    come as usual; a writer dying half-way leaves a partial frame that
    discard_partial() drops."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        reader = _wire.FrameReader(_wire.Fd(r), _wire.scratch_buffer(1 << 12))
        big = bytes(range(256)) * (_wire.BIG_FRAME // 256 + 3)
        bodies = []
        for body in (b"small", big, b"after"):
            data = b"".join(bytes(x) for x in _wire.frame((body,)))
            for k in range(0, len(data), 3000):
                os.write(w, data[k : k + 3000])
                bodies += reader.read_ready()
        assert bodies == [b"small", big, b"after"]
        assert type(bodies[1].obj) is bytearray and not bodies[1].readonly
        assert _page_offset(bodies[1]) == 0
        # A writer that dies half-way through a large frame.
        data = b"".join(bytes(x) for x in _wire.frame((big,)))
        for k in range(0, len(data) // 2, 3000):
            os.write(w, data[k : k + 3000])
            assert reader.read_ready() == []
        os.close(w)
        w = -1
        while not reader.eof:
            assert reader.read_ready() == []
        reader.discard_partial()
        assert reader._big is None and not reader._buf
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_body_goes_back_to_the_pool_only_when_nothing_uses_its_memory():
    pool = _wire.BodyPool()
    body = pool.take(_wire.BIG_FRAME * 2)
    view = memoryview(body)[10:20]  # as a zero-copy array's buffer would
    view[:] = b"0123456789"
    pool.give(body)
    assert pool.free == []
    assert bytes(view) == b"0123456789"  # still the caller's
    view.release()
    body = pool.take(_wire.BIG_FRAME * 2)
    memory = body.obj
    pool.give(body)
    assert len(pool.free) == 1 and pool.free[0] is memory
    # Taken again for a frame a little smaller, or a little larger: the same
    # memory, resized in place.
    smaller = pool.take(_wire.BIG_FRAME * 2 - 100)
    assert smaller.obj is memory and len(smaller) == _wire.BIG_FRAME * 2 - 100
    pool.give(smaller)
    again = pool.take(_wire.BIG_FRAME * 2)
    assert again.obj is memory and len(again) == _wire.BIG_FRAME * 2
    pool.give(again)
    pool.give(again)  # (given twice: the second is ignored)
    # Not for a frame of another size altogether, and small bodies are not kept.
    assert pool.take(_wire.BIG_FRAME * 5).obj is not memory
    pool.give(memoryview(bytearray(100)))
    assert len(pool.free) == 1 and pool.free[0] is memory


def _page_offset(window):
    return ctypes.addressof(ctypes.c_char.from_buffer(window)) % mmap.PAGESIZE


@pytest.mark.parametrize("phase", [0, 16, 64, mmap.PAGESIZE - 8])
def test_a_body_begins_where_its_bytes_lie_in_their_page(phase):
    """A copy into memory a few bytes past the same place in a page as its
    source runs several times slower (4 KiB aliasing): a body begins at the
    place in a page it is asked for, new or taken again from the pool."""
    pool = _wire.BodyPool()
    for size in (_wire.BIG_FRAME, _wire.BIG_FRAME + 1, 3 * _wire.BIG_FRAME):
        for _ in range(2):  # new, then from the pool
            window = pool.take(size, phase)
            assert len(window) == size and _page_offset(window) == phase
            pool.give(window)


def test_what_the_pool_keeps_is_bounded():
    pool = _wire.BodyPool()
    bodies = [_wire.BodyPool().take(_wire.BIG_FRAME) for _ in range(_wire.MAX_POOLED + 2)]
    for b in bodies:
        pool.give(b)
    assert len(pool.free) == _wire.MAX_POOLED
    pool = _wire.BodyPool()
    pool.give(memoryview(bytearray(_wire.MAX_POOLED_BYTES + 1)))
    assert pool.free == []


def describe(arg):
    """What a task saw of its argument, and whether its memory is what the
    worker received it in (the frame, or its copy of the ring: zero-copy)
    rather than a copy of its own."""
    if isinstance(arg, numpy.ndarray):
        held = _memory_of(arg)
        zero_copy = _not_copied(arg) or any(held is r for r in WORKER_RING_INTOS)
        arg[0] = -1.0  # writable, as Pool gives it
        return "ndarray", arg.nbytes, float(arg[1:].sum()), zero_copy
    if isinstance(arg, tuple):
        return tuple(describe(a) for a in arg)
    return type(arg).__name__, len(arg), sum(arg[:3])


def with_keyword(x, data=None):
    return describe(data)


@pytest.mark.parametrize("size", SIZES)
def test_large_arguments_arrive_whole_and_of_their_type(size):
    """Arguments go out of band too, from the threshold on: a numpy array
    that is most of its frame is rebuilt in the worker on the frame itself;
    bytes, bytearray and keyword arguments arrive as they were."""
    args = [
        numpy.full(size // 8, 2.0),
        bytes([3]) * size,
        bytearray([4]) * size,
        (bytes([5]) * size, numpy.full(size // 8, 1.0)),
    ]
    with ParallelQueue(num_workers=2, worker_init_f=count_ring_reads) as q:
        got = list(q.imap(describe, args))
        q.put(with_keyword, 0, data=bytes([6]) * size)
        keyword = q.get(timeout=60)
    n = size // 8
    large = n * 8 >= OOB_MIN
    assert got[0] == ("ndarray", n * 8, 2.0 * (n - 1), large)
    assert got[1] == ("bytes", size, 9)
    assert got[2] == ("bytearray", size, 12)
    # (Half of its frame, beside the bytes: copied out, see _wire._split_buffers.)
    assert got[3] == (("bytes", size, 15), ("ndarray", n * 8, 1.0 * (n - 1), False))
    assert keyword == ("bytes", size, 18)
    assert args[0][0] == 2.0  # the caller's array is its own


class FailsToLoadInWorkers:
    def __reduce__(self):
        return _refuse_in_worker, ()


def _refuse_in_worker():
    if os.getpid() != MAIN_PID:
        raise ValueError("this argument does not load in a worker")


def test_an_argument_that_will_not_load_fails_alone_beside_large_ones():
    """The batch will not load whole in the worker: it is sent again, one
    pickle per task, and only the bad argument's task fails."""
    args = [numpy.full(OOB_MIN // 8 * 2, 1.0), FailsToLoadInWorkers(), bytes(OOB_MIN * 2)]
    with ParallelQueue(num_workers=2) as q:
        it = q.imap(describe, args, chunksize=3)
        first = next(it)
        with pytest.raises(pickle.UnpicklingError):
            next(it)
        last = next(it)
    assert first[:3] == ("ndarray", OOB_MIN * 2, OOB_MIN // 8 * 2 - 1.0)
    assert last == ("bytes", OOB_MIN * 2, 0)


@pytest.mark.parametrize("size", [100, _wire.BIG_FRAME + 100])
def test_a_frame_split_across_reads_is_joined(size):
    """Regression: a frame whose start a read left in the partial buffer, and
    the next read completed, was cut out of that buffer through a view that
    was still alive when the buffer was trimmed: BufferError, and the
    consumer process died (the payload benchmark's 1 KB cells)."""
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for every frame at once
    os.set_blocking(r, False)
    try:
        reader = _wire.FrameReader(_wire.Fd(r), _wire.scratch_buffer(1 << 20))
        bodies = [bytes([k]) * size for k in range(1, 4)]
        data = b"".join(b"".join(bytes(x) for x in _wire.frame((body,))) for body in bodies)
        got = []
        cuts = [0, 5, len(data) // 2, len(data) - 3, len(data)]
        for start, end in zip(cuts, cuts[1:]):
            os.write(w, data[start:end])  # (the pipe holds it all, and one read takes it)
            got += reader.read_ready()
        assert [bytes(b) for b in got] == bodies
    finally:
        os.close(r)
        os.close(w)


def echo_size(arg):
    """A large argument's size and first value, and a large result."""
    return numpy.full(arg.size, arg[0] + 1.0)


WORKER_RING_READS = []
WORKER_RING_INTOS = []


def count_ring_reads():
    """worker_init_f: record, in the worker, what it reads from its ring."""
    real = _region.RingReader.read

    def read(self, data, end, into):
        real(self, data, end, into)
        WORKER_RING_READS.append(end - data)
        WORKER_RING_INTOS.append(into.obj)  # (the bytearray behind the window: see _wire.BodyPool)

    _region.RingReader.read = read


def ring_reads_here(arg):
    """The sizes this worker read from its ring so far; and a large result."""
    return list(WORKER_RING_READS), numpy.full(arg.size, arg[0])


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_large_payloads_under_every_start_method(method, ring_reads):
    """Every start method hands the workers their rings: large arguments and
    results travel in them."""
    args = [numpy.full((k + 1) * OOB_MIN // 8, float(k)) for k in range(6)]
    with ParallelQueue(num_workers=2, mp_context=method, worker_init_f=count_ring_reads) as q:
        got = list(q.imap(echo_size, args))
        q.put(ring_reads_here, numpy.full(1 << 20, 7.0))
        worker_reads, result = q.get(timeout=60)
    for k, value in enumerate(got):
        assert numpy.array_equal(value, numpy.full((k + 1) * OOB_MIN // 8, k + 1.0))
    assert 8 << 20 in worker_reads  # the argument came through the worker's ring
    assert any(r.size == 8 << 20 for r in ring_reads)  # the result through the main process's
    assert numpy.array_equal(result, numpy.full(1 << 20, 7.0))


def test_a_result_outlives_its_queue():
    """An array result stays valid after its queue is ended and collected
    (its memory is its own)."""
    q = ParallelQueue(num_workers=2)
    q.put(make, ("numpy", 4 << 20, 5))
    kept = q.get(timeout=60)
    q.terminate()
    del q
    gc.collect()
    assert numpy.array_equal(kept, numpy.full((4 << 20) // 8, 5.0))


KEPT_ARGUMENTS = []


def keeps_its_argument(arg):
    KEPT_ARGUMENTS.append(arg)
    return float(arg[0]), float(sum(float(a[-1]) for a in KEPT_ARGUMENTS))


def test_a_task_that_keeps_its_arguments_keeps_copies():
    """Arguments a task keeps are its own copies: later packets through the
    ring change none of them; every task sees its own argument whole."""
    size = RING_BYTES // 4 // 8
    with ParallelQueue(num_workers=1) as q:
        got = list(q.imap(keeps_its_argument, [numpy.full(size, float(k)) for k in range(8)]))
    assert got == [(float(k), float(sum(range(k + 1)))) for k in range(8)]


def big_then_slow(n):
    if n < 0:
        time.sleep(60)  # past the task_timeout below
    return numpy.full(n, 1.0)


def test_large_results_beside_a_timed_out_task_and_worker_recycling():
    """task_timeout and max_tasks_per_worker with large results: the slow task
    fails in its slot, every large result beside it arrives whole."""
    sizes = [OOB_MIN, 4 * OOB_MIN, -1, 2 * OOB_MIN, 16 * OOB_MIN, OOB_MIN + 8]
    with ParallelQueue(num_workers=2, task_timeout=2, max_tasks_per_worker=2) as q:
        for n in sizes:
            q.put(big_then_slow, n)
        for n in sizes:
            if n < 0:
                with pytest.raises(TimeoutError):
                    q.get(timeout=60)
            else:
                assert numpy.array_equal(q.get(timeout=60), numpy.full(n, 1.0))


def many_arrays(n):
    return [numpy.full(OOB_MIN // 8, float(k)) for k in range(n)]


def test_a_result_of_more_buffers_than_one_write_takes_runs_once():
    """Regression: a result of 1,100 arrays of 64 KiB was written with one
    writev() of 1,100 buffers, past the kernel's limit (EINVAL): the worker
    died, and the task ran again, careful, in a new worker (silently run
    twice).  Writes now take at most WRITEV_MAX buffers at a time."""
    with ParallelQueue(num_workers=2) as q:
        q.put(many_arrays, 1100)
        got = q.get(timeout=120)
        assert q.stats().workers_replaced == 0
    assert len(got) == 1100 and all(float(a[0]) == k for k, a in enumerate(got))


def numbered(i):
    return bytes([i % 251]) * (200_000 + i)


def test_a_press_as_a_read_of_results_returns_breaks_the_queue_and_garbles_nothing(monkeypatch):
    """Regression: a Ctrl-C landing as the main process's read of the
    consumer's pipe returned lost the bytes it took, and every frame after
    them was read out of step: a program that caught the KeyboardInterrupt
    and went on getting had wrong values with no error (large buffers are
    not checked by any unpickling), then a MemoryError from a garbage length.
    Now the reader is marked cut: the results read before it still come
    out, then get() raises QueueBrokenError, and join() ends the processes."""
    real = _wire.os.readv
    armed = []

    def readv_then_press(fd, buffers):
        n = real(fd, buffers)
        if armed and threading.current_thread() is threading.main_thread() and n > 0:
            armed.clear()
            raise KeyboardInterrupt  # as a press landing as readv returns
        return n

    q = ParallelQueue(num_workers=2)
    try:
        for i in range(40):
            q.put(numbered, i)
        assert q.get(timeout=60) == numbered(0)
        monkeypatch.setattr(_wire.os, "readv", readv_then_press)
        armed.append(1)
        got = []
        with pytest.raises(KeyboardInterrupt):
            while True:
                got.append(q.get(timeout=60))
        with pytest.raises(QueueBrokenError, match="Ctrl-C"):
            while True:
                got.append(q.get(timeout=60))
        assert got == [numbered(i) for i in range(1, len(got) + 1)]  # never a wrong one
        monkeypatch.undo()
        q.stop()
        q.join(timeout=60)
        assert not q.is_alive()
    finally:
        q.terminate()


def small_beside_big(i):
    return numpy.full(OOB_MIN // 8, float(i)), bytes(16 * OOB_MIN)


def test_a_small_array_beside_a_large_result_does_not_keep_the_frame():
    """Regression: each task returned a 64 KiB array and 8 MiB of bytes; a
    caller keeping only the arrays kept every 8 MiB frame (200 arrays: 1.6
    GB).  A buffer that is a small part of its frame is copied out."""
    with ParallelQueue(num_workers=2) as q:
        kept = [a for a, _ in q.imap(small_beside_big, range(4))]
        big = list(q.imap(make, [("numpy", 8 * OOB_MIN, 3)]))[0]
    for k, a in enumerate(kept):
        assert numpy.array_equal(a, numpy.full(OOB_MIN // 8, float(k)))
        assert len(_memory_of(a)) < 2 * a.nbytes  # its own memory, not the frame
    assert len(_memory_of(big)) < 2 * big.nbytes


def test_results_in_the_rings_are_taken_after_the_queue_closed():
    """Regression (found while writing this stop's note): join() closed the
    rings' descriptors while packets read before it still pointed into the
    rings, and every get() after stop() and join() (or after a with block)
    raised OSError (EBADF).  The receiver now closes them once the last
    packet read is taken; after terminate() at once (nothing will take
    them).  No descriptor is left either way."""
    with ParallelQueue(num_workers=2) as q:  # (what a process makes once, at its first queue)
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
    fds = len(os.listdir("/proc/self/fd"))
    q = ParallelQueue(num_workers=2)
    for k in range(6):
        q.put(make, ("bytes", 1 << 20, k))
    q.stop()
    q.join()
    assert [q.get(timeout=60) for _ in range(6)] == [bytes([k]) * (1 << 20) for k in range(6)]
    with ParallelQueue(num_workers=2) as q:
        for k in range(3):
            q.put(make, ("numpy", 2 << 20, k))
    assert [float(q.get(timeout=60)[0]) for _ in range(3)] == [0.0, 1.0, 2.0]
    q = ParallelQueue(num_workers=2)
    for k in range(3):
        q.put(make, ("bytes", 1 << 20, k))
    q.get(timeout=60)
    q.terminate()
    del q
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
