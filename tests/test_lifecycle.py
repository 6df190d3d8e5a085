"""Start methods, threads, context manager, garbage collection, 0.5 examples."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from multiprocessing import heap

import pytest
from conftest import descendants, run_python, sleeping_in, wait_until

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueClosedError, QueueStopped, imap


def make_counter(lock, counter):
    def task(i):
        with lock:  # a multiprocessing Lock and Value reached the worker at start
            counter.value += 1
        return i * i

    return task


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_all_start_methods(method):
    ctx = multiprocessing.get_context(method)
    lock, counter = ctx.Lock(), ctx.Value("i", 0, lock=False)
    with ParallelSingleTaskQueue(make_counter(lock, counter), num_workers=2, mp_context=ctx) as q:
        for i in range(50):
            q.put(i)
        assert [q.get(timeout=60) for _ in range(50)] == [i * i for i in range(50)]
    assert counter.value == 50
    k = 3
    with ParallelQueue(num_workers=2, mp_context=method) as q:
        q.put(lambda x: x * k, 2)  # a lambda over a local
        q.put("marker")
        assert [q.get(timeout=60), q.get(timeout=60)] == [6, "marker"]


def test_many_producer_threads_order_is_put_order():
    """Order is the order in which put() returned: each producer records
    what it put under the same lock, so the record is that order."""
    record = []
    record_lock = threading.Lock()
    with ParallelQueue(num_workers=2, in_q_max=50) as q:

        def produce(t):
            for i in range(400):
                with record_lock:
                    q.put(abs, -(t * 1000 + i))
                    record.append(t * 1000 + i)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        got = []
        consumer = threading.Thread(target=lambda: got.extend(q.get(timeout=60) for _ in range(1600)))
        consumer.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        consumer.join(120)
    assert got == record
    assert sorted(got) == sorted(t * 1000 + i for t in range(4) for i in range(400))


def test_many_consumer_threads_get_each_result_once():
    with ParallelQueue(num_workers=2) as q:
        for i in range(2000):
            q.put(abs, -i)
        q.stop()
        parts: list[list[int]] = [[] for _ in range(3)]

        def consume(part):
            for x in q:
                part.append(x)

        threads = [threading.Thread(target=consume, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(x for p in parts for x in p) == list(range(2000))
    for p in parts:
        assert p == sorted(p)  # each thread sees a subsequence of the order


def test_a_getter_finding_a_poller_leaves_the_pollers_bell_alone(bare_core):
    """Regression: two blocking getters both found nothing in hand; B became
    the poller, listening on the poller's bell; A then saw B polling and
    returned to wait for its turn, and its clean-up took B's bell out of
    the getters' bells.  stop() then rang nobody: B slept on, and A waited
    for B's turn, for ever.  Forced: A's step runs while B polls."""
    core = bare_core
    receiver = core.delivery.receiver
    out = []

    def getter_b() -> None:
        with pytest.raises(QueueStopped):
            core.delivery.get(True, None)
        out.append("stopped")

    b = threading.Thread(target=getter_b)
    b.start()
    wait_until(lambda: receiver.poller is not None and sleeping_in(b, "poll"))
    assert len(core.wakeups.getters) == 1
    receiver.wait_for_more(None, lambda: True)  # A: someone polls, so it returns
    assert len(core.wakeups.getters) == 1  # B still listens
    core.stop()
    b.join(60)
    assert not b.is_alive() and out == ["stopped"]


def test_context_manager_joins_on_normal_exit():
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        assert q.get(timeout=30) == 1
    assert not q.is_alive()
    with pytest.raises(QueueClosedError):
        q.put(abs, 1)


def sleep_forever():
    threading.Event().wait()


def test_context_manager_terminates_on_error_even_with_stuck_tasks():
    with pytest.raises(KeyError):
        with ParallelQueue(num_workers=2) as q:
            q.put(sleep_forever)
            q.put(sleep_forever)
            raise KeyError("boom")
    assert not q.is_alive()


def test_terminate_with_tasks_that_never_return():
    q = ParallelQueue(num_workers=2)
    for _ in range(5):
        q.put(sleep_forever)
    q.terminate()
    assert not q.is_alive()
    with pytest.raises(QueueStopped):
        q.get(timeout=1)


def test_terminate_while_another_thread_joins():
    """terminate() closes the queue while another thread waits in join() on
    the dispatcher's bell and the output pipe: those descriptors are
    released only once the joiner has left (closed under its wait, their
    numbers could be reused by any file the program opens), and the join
    returns, every process ended."""
    q = ParallelQueue(num_workers=2)
    engine = q._core.engine
    delivery = q._core.delivery
    errors: list[BaseException] = []
    go_on = threading.Event()
    real_pump = delivery.pump

    def pump() -> bool:
        # The joiner, woken by the queue's end, is held here until
        # terminate() has returned: the close happens while it is inside.
        if threading.current_thread() is t:
            go_on.wait()
        return real_pump()

    def joiner() -> None:
        try:
            q.join()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    delivery.pump = pump
    t = threading.Thread(target=joiner)
    try:
        q.put(sleep_forever)
        q.stop()
        t.start()
        wait_until(lambda: engine.joiners == 1 and sleeping_in(t, "poll"))
        q.terminate()
        assert not engine.done.closed and delivery.receiver.reader.fd.fd >= 0  # still the joiner's
        go_on.set()
        t.join(60)
        assert not t.is_alive() and errors == []
        assert engine.done.closed and delivery.receiver.reader.fd.fd < 0 and not q.is_alive()
    finally:
        go_on.set()
        q.terminate()


def test_garbage_collected_queue_ends_quietly():
    """A queue dropped without stop() is ended, by the reaper thread (see
    _reaper), which then ends too, and nothing is printed.  The program
    waits for that state, bounded."""
    code = """
import gc, multiprocessing, os, threading, time
from parallel_queue import ParallelQueue
with ParallelQueue(num_workers=2) as q:  # (lazily made globals, once)
    q.put(abs, -1)
    q.get()  # (a closed queue keeps what results not taken need, as long as it lives)
fds = sorted(os.listdir("/proc/self/fd"))
q = ParallelQueue(num_workers=2)
q.put(abs, -1)
assert q.get(timeout=30) == 1
del q
gc.collect()
deadline = time.monotonic() + 30
while (multiprocessing.active_children() or len(threading.enumerate()) > 1) and time.monotonic() < deadline:
    time.sleep(0.01)
assert multiprocessing.active_children() == [], multiprocessing.active_children()
assert threading.enumerate() == [threading.main_thread()], threading.enumerate()
assert sorted(os.listdir("/proc/self/fd")) == fds
print("clean")
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "clean"
    assert r.stderr == ""


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_queue_collected_by_a_thread_holding_its_lock_is_still_ended(engine):
    """Regression: a queue's finalizer took the queue's lock, in whichever
    thread ran the garbage collection; a thread holding that lock at the
    moment (the dispatcher allocates a batch under it, the thread engine a
    result tuple) deadlocked on itself.  Forced: the queue lives only in a
    reference cycle, collected by a thread that holds its lock.  The
    clean-up now runs in the reaper thread, after the lock is let go."""
    code = f"""
import gc, threading
from concurrent.futures import ThreadPoolExecutor
from parallel_queue import ParallelQueue
ex = ThreadPoolExecutor(1)
q = ParallelQueue(num_workers=1) if {engine!r} == "processes" else ParallelQueue(executor=ex)
q.put(abs, -1)
assert q.get(timeout=30) == 1
core = q._core
cycle = [q]
cycle.append(cycle)
del q, cycle
def collect_holding_the_lock():
    with core.lock:
        gc.collect()
t = threading.Thread(target=collect_holding_the_lock)
t.start()
t.join()
for reaper in [t for t in threading.enumerate() if t.name == "parallel_queue-reaper"]:
    reaper.join()  # it ends once nothing is left to watch
assert core.lifecycle.closed and not core.is_alive()
ex.shutdown()
print("ended")
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ended"
    assert r.stderr == ""


def test_unstopped_queue_at_interpreter_exit():
    """Forgetting stop() does not hang the exit, even with non-daemon workers."""
    code = """
from parallel_queue import ParallelQueue
q = ParallelQueue(num_workers=2, daemon=False)
q.put(abs, -1)
print(q.get(timeout=30))
"""
    r = run_python(code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1" and r.stderr == ""


SEED_EXAMPLE = r"""
import threading, time
from parallel_queue import ParallelQueue

class BatchDone(int): pass

def indexing_func(doc):
    return doc.upper()

def get_document_batch(b):
    return ["doc%d-%d" % (b, i) for i in range(5)]

log = []
def producer(queue):
    for b in range(3):
        doc_count = 0
        for document in get_document_batch(b):
            queue.put(indexing_func, document)
            doc_count += 1
        queue.put(BatchDone(doc_count))
    queue.stop()

def consumer(queue):
    while True:
        try:
            result_or_batch_done = queue.get(timeout=1)
        except Exception:
            if not queue.is_alive():
                return
            continue
        if isinstance(result_or_batch_done, BatchDone):
            log.append(("batch", int(result_or_batch_done)))
        else:
            log.append(result_or_batch_done)

queue = ParallelQueue(daemon=True)
t1 = threading.Thread(target=producer, args=(queue,))
t2 = threading.Thread(target=consumer, args=(queue,))
t1.start(); t2.start(); t1.join(); t2.join(60)
queue.join(timeout=2)
if queue.is_alive():
    raise Exception("join() must have timed out!")
print(log)
"""


def test_0_5_batch_indexing_example_runs_unchanged():
    r = run_python(SEED_EXAMPLE, timeout=90)
    assert r.returncode == 0, r.stderr
    expected = []
    for b in range(3):
        expected += [f"DOC{b}-{i}" for i in range(5)] + [("batch", 5)]
    assert r.stdout.strip() == repr(expected)
    assert r.stderr == ""


def test_0_5_quick_start_calls():
    """The quick-start calls of 0.5, with their exact signatures."""
    q = ParallelQueue(daemon=True)
    q.put(str.upper, "data", timeout=5)
    assert q.get(timeout=1) == "DATA"
    q.stop()
    q.join(timeout=2)
    assert not q.is_alive()


@pytest.mark.slow
def test_no_descriptor_leak_across_many_queues():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    with ParallelQueue(num_workers=2) as q:  # warm-up: lazily created globals
        q.put(abs, 1)
        q.get(timeout=30)
    before = fds()
    for _ in range(20):
        with ParallelQueue(num_workers=2) as q:
            q.put(abs, -1)
            assert q.get(timeout=30) == 1
        q2 = ParallelQueue(num_workers=1)
        q2.terminate()
    assert fds() == before
    assert descendants(os.getpid()) == []
    # Shared memory comes from multiprocessing's heap and goes back to it:
    # twenty more queues must not have added arenas.

    arenas = len(heap.BufferWrapper._heap._arenas)
    for _ in range(20):
        ParallelQueue(num_workers=2).terminate()
    assert len(heap.BufferWrapper._heap._arenas) == arenas


def test_failed_start_leaves_nothing_behind():
    """A task function that cannot reach spawned workers: a clear error, no processes, no fds."""
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    for _ in range(2):
        # The first attempt may start multiprocessing's own long-lived helpers
        # (its resource tracker); the second must leave no descriptor behind.
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(pickle.PicklingError, match="task function or worker_init_f"):
            ParallelSingleTaskQueue(uses_lock, num_workers=2, mp_context="spawn")
        assert descendants(os.getpid()) == []
    assert len(os.listdir("/proc/self/fd")) == before


def test_demo_runs_and_logs_batches_in_order():
    r = run_python(
        "from parallel_queue.demo import main; raise SystemExit(main(['--batches', '3', '--batch-size', '40']))",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["batch   1", "batch   2", "batch   3"]
    assert "indexed 120 documents" in lines[3]
    assert lines[4].startswith("stats: 120 tasks, 3 batch markers, 0 errors")
    assert "120/120" in r.stderr  # the progress bar


def test_join_is_idempotent_after_stop_or_terminate():
    """Regression: join() after terminate(), or a second join() (the ``with``
    block's own, after an explicit stop() and join() inside it), raised
    ``ValueError: file descriptor cannot be a negative integer``."""
    with ParallelQueue(num_workers=2) as q:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        q.stop()
        q.join()
        q.join()
        q.join(0)
    q.join()
    assert not q.is_alive()

    q = ParallelQueue(num_workers=2)
    q.put(sleep_forever)
    q.terminate()
    q.join()
    q.join(5)
    q.terminate()
    q.stop()
    q.join()
    assert not q.is_alive()

    q = ParallelQueue(num_workers=1)
    q.stop()
    q.terminate()
    q.join()
    q.stop()
    assert not q.is_alive()


def test_stats_after_terminate_count_nothing_in_flight():
    """Regression: stats() after terminate() said in_flight=5, pending=5 for
    tasks that will never run."""
    q = ParallelQueue(num_workers=1, max_batch=1)
    for _ in range(7):
        q.put(sleep_forever)
    q.terminate()
    s = q.stats()
    assert s.tasks_put == 7
    assert s.in_flight == 0 and s.pending == 0 and s.workers_alive == 0


FORK_CHILD = """
import os, sys, warnings
from parallel_queue import ParallelQueue
# Python 3.12+ warns about this program's own os.fork() while the queue's
# threads run: the warning is Python's, about the fork below; what these
# tests check is that the queue itself prints nothing.
warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
q = ParallelQueue(num_workers=2, daemon={daemon})
q.put(abs, -1)
assert q.get(timeout=60) == 1
pid = os.fork()
if pid == 0:
    {child}
    sys.exit(0)  # a normal exit: atexit handlers and finalizers run
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
q.put(abs, -2)  # the parent's queue is untouched by the child's exit
assert q.get(timeout=60) == 2
q.stop()
q.join()
print("parent ok")
"""


@pytest.mark.parametrize("daemon", [False, True])
def test_forked_child_exiting_normally_leaves_the_parents_queue_alone(daemon):
    """Regression: a child of the user's program made by os.fork() that
    exits normally printed ``AssertionError: can only test a child process``
    from our exit handler; with daemon=True its multiprocessing exit handler
    believed it owned the parent's daemonic processes and SIGTERMed the
    consumer, breaking the parent's queue."""
    r = run_python(FORK_CHILD.format(daemon=daemon, child="pass"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "parent ok"
    assert r.stderr == ""


def test_queue_used_from_a_forked_child_says_it_belongs_to_another_process():
    """Regression: in a forked child, put() was accepted and get() then waited
    forever.  Every call says the queue belongs to another process."""
    child = """
    import queue
    for call in (lambda: q.put(abs, -3), lambda: q.get(timeout=5), lambda: q.put("marker"), q.stop, q.join):
        try:
            call()
        except RuntimeError as e:
            assert "belongs to process" in str(e), e
        else:
            raise AssertionError("no RuntimeError")
    print("child ok", flush=True)"""
    r = run_python(FORK_CHILD.format(daemon=False, child=child))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["child", "ok", "parent", "ok"]
    assert r.stderr == ""


def test_failed_construction_closes_what_it_opened():
    """Regression: under ``ulimit -n 200``, ParallelQueue(num_workers=60)
    failed with EMFILE and leaked every pipe it had opened, so that even a
    2-worker queue could no longer be built in that process."""
    code = """
import errno, gc, os, resource
from parallel_queue import ParallelQueue
with ParallelQueue(num_workers=1) as q:  # lazily made globals, once
    q.put(abs, -1)
    assert q.get(timeout=60) == 1
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
before = sorted(os.listdir("/proc/self/fd"))
for _ in range(3):
    try:
        ParallelQueue(num_workers=60)
    except OSError as e:
        assert e.errno == errno.EMFILE, e
    else:
        raise AssertionError("60 workers fit in 200 descriptors?")
    # The half-built queue is garbage (its parts refer to each other); once
    # collected, its shared memory goes back to multiprocessing's heap, which
    # then needs no new arena (an arena is a file in /dev/shm, so a
    # descriptor) for the next attempt.
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == before
with ParallelQueue(num_workers=2) as q:
    q.put(abs, -2)
    assert q.get(timeout=60) == 2
print("ok")
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok" and r.stderr == ""


def test_our_exit_handler_runs_before_multiprocessings():
    """Exit handlers run last-registered first; multiprocessing's joins every
    non-daemonic child, so ours (which ends every queue nobody stopped) must
    be registered after it, whatever was imported first.  Regression: an
    unused-looking import that ensured this was dropped, and at exit
    multiprocessing joined processes our dispatcher was closing
    (``ValueError: process object is closed``, 1 run in 10)."""
    code = """
import atexit
order = []
register = atexit.register
def recording(f, *args, **kwargs):
    order.append(f.__module__ + "." + f.__qualname__)
    return register(f, *args, **kwargs)
atexit.register = recording
import parallel_queue
print(order.index("parallel_queue._core._terminate_all_at_exit") > order.index("multiprocessing.util._exit_function"))
"""
    r = run_python(code)
    assert r.stdout.strip() == "True", (r.stdout, r.stderr)


@pytest.mark.slow
def test_failed_construction_leaves_nothing_at_any_descriptor_limit():
    """Regression: under some ``ulimit -n`` values a construction failed
    inside multiprocessing's Process.start(), whose first pipe leaks when its
    second fails; every limit from too few descriptors to enough is tried."""
    code = """
import gc, os, resource
from parallel_queue import ParallelQueue
with ParallelQueue(num_workers=1):  # (lazily made globals, once)
    pass
before = sorted(os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
limit = max(int(f) for f in before) + 1
while True:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        q = ParallelQueue(num_workers=3)
    except OSError:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.collect()
        left = sorted(set(os.listdir("/proc/self/fd")) - set(before))
        assert not left, (limit, [os.readlink("/proc/self/fd/" + f) for f in left])
        limit += 1
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        q.terminate()
        break
print("ok")
"""
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_join_ends_while_a_process_the_program_forked_holds_the_results_pipe():
    """Regression (found by adversarial testing): a process the program forks
    (its own, not the queue's) while a queue is being made holds a copy of
    its descriptors, the write end of the consumer's output pipe among them;
    join() read that pipe until its end, which never came while the process
    lived, so join() and a map's end waited for ever.  Every process of the
    queue has ended by then: join() reads what the pipe holds and returns."""
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    q = ParallelQueue(num_workers=2)
    it = imap(abs, range(-20, 0), num_workers=2)
    pipes = [f"/proc/{os.getpid()}/fd/{x._core.engine.output_r.fd}" for x in (q, it._q)]
    pid = os.fork()
    if pid == 0:  # the program's own child, holding both write ends
        # (A process forked while the queues were being made inherits them;
        # forked after, it has its copies closed by the queue's after-fork
        # hook: a write end opened through /proc stands for the first.)
        held = [os.open(p, os.O_WRONLY) for p in pipes]
        os.write(ready_w, b"h")
        os.read(release_r, 1)
        os._exit(len(held) - 2)
    assert os.read(ready_r, 1) == b"h"
    try:
        for i in range(100):
            q.put(abs, -i)
        q.stop()
        assert list(q) == list(range(100))
        q.join(timeout=60)
        assert not q.is_alive()
        assert list(it) == list(range(20, 0, -1))  # a map ends too
    finally:
        it.close()
        q.terminate()
        os.write(release_w, b"x")
        os.waitpid(pid, 0)
        for fd in (release_r, release_w, ready_r, ready_w):
            os.close(fd)
