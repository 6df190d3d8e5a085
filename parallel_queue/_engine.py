"""The process engine: our own worker and consumer processes, and the pipes between them.

::

     main process                            | other processes
    -----------------------------------------+------------------------------------------
     put() --> intake (pending, markers)     |
                 |                           |
                 v              tasks        |
          [dispatcher thread] ==pipe each===>| workers 0 .. N-1: unpickle, run, pickle
           scheduler: which worker, how many |   (each step noted in the progress
           supervisor: deaths, timeouts,     |   array); never past max_packet_id,
             re-sends                        |   then sleep on the wake-up pipe
             ^      ^      |                 |       |                       ^
             |      |      |                 |       | results (pipe each)   | wake-up
             |      |      |                 |       v                       |
             |      |      +-- ctrl: DRAIN, LAST --> [consumer process] -----+
             |      +------ credits, DRAINED, FATAL -- reorder buffer (_reorder)
             |                               |       |
             +-- shared memory: the progress array (workers write it); max_packet_id
                 and the reorder counts (the consumer writes them)
                                             |       |
     get() <-- delivery <---- output pipe ---|-------+  packets in id order, as
       markers back in their places; each    |          they were pickled
       packet unpickled once                 |
         ^                                   |
         +======= each slot's rings =========|===> large buffers: arguments
                  (shared memory, _region)   |     in, results out, the frames
                                             |     carrying only their places

- **put()** (any thread) appends to the intake, without a lock on its common
  path (the protocol is in ``_intake``); a marker never leaves the main
  process: ``get()`` hands it back in its place (``_delivery``).
- **dispatcher** (a thread here, ``_dispatcher``) takes batches from the
  intake and writes them as packets to workers that have credit, sized by
  the ``_scheduler``.  When a worker ends, the consumer reads its pipe to the
  end, the ``_supervisor`` reads where it was (the progress array) and blames
  a task or has the packet sent again one task at a time, and a new worker
  takes the packets the dead one had not finished (the **re-send path**).
  It also kills workers whose task ran past ``task_timeout``.  It is the only
  thread that writes to workers or starts processes once the queue runs.
- **workers** (``_worker``) run packets and send each packet's results to
  the consumer, never past ``max_packet_id``.  Before each step they write
  where they are into their slot of the shared **progress array** (packet,
  task, stage, start time): that is what pins a crash or a timeout on one
  task while its neighbours run again.
- **consumer** (one process, ``_consumer``) owns the reorder buffer: it
  forwards packets to the main process strictly in id order, without
  unpickling them, and credits the dispatcher for every packet received.
- **delivery** (``get()``, caller's thread) reads the output pipe, unpickles
  a packet's results, and hands out values, errors and markers in put order.
- **rings** (``_region``): one shared-memory region per slot, holding a ring
  for the worker's large results (copied out here with one read, into
  memory of this process's own: nothing maps a ring) and one for its large
  arguments (written by the dispatcher).  The frames that cross the pipes
  say where their buffers are; the consumer forwards them unread.
- Under ``forkserver``, every process comes from the package's own fork
  server (``_forkserver``), which holds Ctrl-C back from them as they start.

Every pipe has a single writer process; readers never block on a frame half
written (see ``_wire``), so a process that dies at any instant loses at most
its own unfinished work.  A death is seen on the process's own descriptor (a
pidfd, see ``_slots.Child``); the main process's death is seen by every
child on a pipe only the main process holds (see ``_child``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

from . import _wire
from ._consumer import ConsumerSpec, consumer_main
from ._core import Core
from ._delivery import Delivery
from ._dispatcher import Dispatcher
from ._forkserver import ForkServerProcess
from ._region import RING_BYTES, Region, SlotRings
from ._scheduler import Scheduler
from ._slots import Child, Slot
from ._supervisor import Supervisor
from ._tasks import PROGRESS_FIELDS
from ._threads import helper_thread, run_whole, sigint_held_back
from ._wakeups import Bell
from ._wire import Fd
from ._worker import Inherited, WorkerSpec, worker_main

__all__ = ["ProcessEngine"]

# Descriptors that starting one process takes at the most, for a moment:
# multiprocessing's pipes (two, plus an error pipe under spawn) and the
# pidfd we keep (see _wire.reserve_descriptors).
DESCRIPTORS_PER_START = 8


# ------------------------------------------------------------ parent alive

_parent_alive: Optional[tuple[Fd, Fd]] = None
_parent_alive_lock = threading.Lock()


def parent_alive_pipe() -> tuple[Fd, Fd]:
    """This process's "I am alive" pipe: children exit when its write end closes."""
    global _parent_alive
    with _parent_alive_lock:
        if _parent_alive is None:
            _parent_alive = _wire.make_pipe()
        return _parent_alive


def _forget_parent_alive() -> None:
    # A forked child is a parent of its own (a task may start a queue): it
    # needs a pipe of its own, not a copy of its parent's, and a lock no
    # thread of the parent can have left held.
    global _parent_alive, _parent_alive_lock
    _parent_alive = None
    _parent_alive_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_alive)


def _fresh_resource_tracker_lock() -> None:
    # Our dispatcher thread starts processes (replacing workers) while the
    # program's other threads run: under spawn and forkserver each start
    # takes multiprocessing's resource tracker lock.  A program that forks
    # (os.fork) at that moment gives its child the lock held by a thread
    # the child does not have, and the child's first spawn or forkserver
    # process (a queue of its own, say) waits for it for ever.  The child
    # has only the forking thread, which cannot hold it: a fresh lock of
    # the same kind is the one it would have had.
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    lock = getattr(tracker, "_lock", None)
    if lock is not None:
        tracker._lock = threading.RLock() if isinstance(lock, type(threading.RLock())) else threading.Lock()  # type: ignore[union-attr]


os.register_at_fork(after_in_child=_fresh_resource_tracker_lock)


class _EndedThread:
    """Stands for a dispatcher thread that has ended, once its Thread object
    is let go (see ProcessEngine.let_go)."""

    ident = 0

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: Optional[float] = None) -> None:
        pass


_ENDED = _EndedThread()


class ProcessEngine:
    """Owns the processes, pipes, shared memory and dispatcher of one queue."""

    def __init__(self, core: Core, task_fn: Optional[Callable[..., Any]]) -> None:
        self.core = core
        self.opts = core.opts
        self.ctx = core.opts.ctx
        self.task_fn = task_fn
        self.fds = _wire.FdSet()
        self.slots: list[Slot] = []
        self.consumer: Optional[Child] = None
        self.thread: threading.Thread | _EndedThread = helper_thread(self.run_dispatcher, "parallel_queue-dispatcher")
        self.dispatcher: Optional[Dispatcher] = None
        # Shared memory (made by start(), let go by let_go()).
        self.reorder: Any = None
        self.max_packet_id: Any = None
        self.progress: Any = None
        self.rings: list[SlotRings] = []  # each slot's shared memory (see _region), if any
        self.done = Bell()  # rung by the dispatcher as it returns (for join)
        # Threads in join() now, and whether close() was called: the
        # descriptors they wait on are released once both say so.
        self.joiners = 0
        self.closing = False
        core.engine = self
        try:
            method = self.ctx.get_start_method()
            # Under forkserver, our own fork server (see _forkserver).
            self.Process: Any = ForkServerProcess if method == "forkserver" else self.ctx.Process
            if method != "fork":
                # multiprocessing's resource tracker, started lazily by the
                # first spawn or forkserver start, is started now, before
                # SIGINT is held back: starting it unblocks SIGINT in the
                # calling thread, which would let a press reach our children.
                multiprocessing.resource_tracker.ensure_running()
            with sigint_held_back():
                self.start()
        except BaseException:
            # EMFILE half-way, a worker that cannot start (its function will
            # not pickle under spawn), a Ctrl-C held back until now: leave
            # nothing behind, then say why.
            self.abandon()
            raise

    def start(self) -> None:
        """Make the pipes and shared memory, start every process and the
        dispatcher, and register for exit clean-up (SIGINT held back)."""
        core, opts, ctx = self.core, self.opts, self.ctx
        n = opts.num_workers
        self.reorder = ctx.RawArray("q", 2)  # [packets, tasks] in the reorder buffer, written by the consumer
        self.max_packet_id = ctx.RawValue("q", 0)
        self.progress = ctx.RawArray("q", PROGRESS_FIELDS * n)
        self.alive_r, _ = parent_alive_pipe()
        pipe = self.fds.pipe
        results = [pipe(big=True) for _ in range(n)]
        gos = [pipe() for _ in range(n)]
        ctrl_r, self.ctrl_w = pipe()
        self.credits_r, credits_w = pipe()
        self.output_r, output_w = pipe(big=True)
        self.slots = [Slot(i, results[i][1], gos[i][0]) for i in range(n)]
        self.rings = self.make_rings(n)
        spec = ConsumerSpec(
            [r for r, _ in results],
            [w for _, w in gos],
            ctrl_r,
            credits_w,
            output_w,
            self.alive_r,
            self.max_packet_id,
            self.reorder,
            opts.window,
            opts.consumer_buffer_max,
        )
        core.delivery = Delivery(core, _wire.FrameReader(self.output_r))
        core.delivery.receiver.rings = [r.results for r in self.rings]
        for r in self.rings:
            # The delivery's to close too: packets read before the queue
            # closed are read from the rings after it (see Receiver.close).
            self.fds.disown(r.region.fd)
        self.fds.disown(self.output_r)  # the delivery's to close (see Delivery.close)
        self.dispatcher = Dispatcher(
            core,
            self,
            Scheduler(opts.max_batch, opts.max_tasks_per_worker),
            Supervisor(self.progress, n, opts.task_timeout),
        )
        consumer = self.Process(target=consumer_main, args=(spec,), name="parallel_queue-consumer", daemon=opts.daemon)
        _wire.reserve_descriptors(DESCRIPTORS_PER_START)
        consumer.start()
        self.consumer = Child(consumer)
        self.consumer.watch()
        for fd in (*spec.results_in, *spec.go_out, ctrl_r, credits_w, output_w):
            _wire.close_fd(fd)  # the consumer's ends: held by it alone from now on
        for slot in self.slots:
            self.start_worker(slot)
        assert isinstance(self.thread, threading.Thread)
        self.thread.start()
        core.running()
        if opts.progress:
            core.show_progress(opts.progress)

    def make_rings(self, n: int) -> list[SlotRings]:
        """A region of shared memory for each of ``n`` slots; none at all
        where the system has none to give (the pipes carry everything)."""
        rings: list[SlotRings] = []
        try:
            # One descriptor each, kept while the queue runs: only where the
            # limit leaves room for them beside every pipe and process start
            # still to come (three descriptors a worker, and a start's own).
            _wire.reserve_descriptors(n + 3 * n + DESCRIPTORS_PER_START)
            for _ in range(n):
                region = Region.create(RING_BYTES)
                if region is None:
                    break
                self.fds.adopt(region.fd)
                rings.append(SlotRings(region))
        except OSError:  # no descriptor or memory left for it: the pipes will do
            pass
        return rings if len(rings) == n else []

    def run_dispatcher(self) -> None:
        assert self.dispatcher is not None
        self.dispatcher.run()

    def dispatcher_returned(self) -> None:
        with self.core.lock:  # (close() closes it under this lock)
            self.done.ring()

    def abandon(self) -> None:
        """The construction failed or was interrupted: end every process it
        started, close every descriptor it opened."""
        if self.thread.ident is not None:  # it got to the end: the usual way out
            self.core.terminate()
            return
        self.kill_processes()
        self.core.close_unstarted()

    # -------------------------------------------------------------- workers

    def start_worker(self, slot: Slot) -> None:
        """Start a new worker process in ``slot`` (its pipes are clean)."""
        tasks_r, tasks_w = _wire.make_pipe(big=True)
        p0 = slot.index * PROGRESS_FIELDS
        for f in range(PROGRESS_FIELDS):
            self.progress[p0 + f] = -1 if f == 0 else 0
        opts = self.opts
        spec = WorkerSpec(
            slot.index,
            tasks_r,
            slot.results_w,
            slot.go_r,
            self.alive_r,
            self.max_packet_id,
            self.progress,
            opts.window,
            self.task_fn,
            opts.worker_init_f,
            opts.max_tasks_per_worker,
            opts.task_timeout is not None,
            self.rings[slot.index].region.fd if self.rings else None,
            RING_BYTES,
            opts.consumer_buffer_max,
        )
        if self.rings:
            self.rings[slot.index].args.empty()  # (no worker reads it now)
        incarnation = slot.new_incarnation()
        proc = self.Process(
            target=worker_main,
            args=(Inherited(spec),),
            name=f"parallel_queue-worker-{slot.index}.{incarnation}",
            daemon=opts.daemon,
        )
        handed_over = False
        try:
            _wire.reserve_descriptors(DESCRIPTORS_PER_START)
            # multiprocessing's resource tracker, started again by spawn or
            # forkserver if it died, unblocks SIGINT in the starting thread:
            # the dispatcher's mask is put back (see _threads.helper_thread).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child = Child(proc)
            slot.started(child, tasks_w)  # recorded at once: whatever comes next, terminate() sees it
            handed_over = True
            child.watch()
            _wire.set_nonblocking(tasks_w)
        finally:
            _wire.close_fd(tasks_r)
            if not handed_over:
                _wire.close_fd(tasks_w)

    def processes(self) -> list[Child]:
        """Every process started: the workers now in their slots, then the consumer."""
        procs = [s.proc for s in self.slots if s.proc is not None]
        if self.consumer is not None:
            procs.append(self.consumer)
        return procs

    def kill_processes(self) -> None:
        """SIGKILL and reap every process (from the dispatcher, or once it is gone)."""
        procs = self.processes()
        for p in procs:
            p.kill()
        for p in procs:
            p.join()

    # ---------------------------------------------------------- the Engine

    def wind_down(self) -> None:
        """(after terminate()) The dispatcher sees it at its next wake-up (rung
        already), kills and reaps, and returns; then whatever is left is
        killed from here."""
        if self.thread is not threading.current_thread() and self.thread.ident is not None:
            self.thread.join()
        self.kill_processes()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait for every process to end; True if they all did within ``timeout``.

        Results still coming out are read into memory meanwhile, so the
        consumer never waits for a get() that is not coming.

        A terminate() may close the queue while this waits: this thread is
        counted among those watching the output pipe (see _receiver) and
        among the ``joiners``, and the descriptors it waits on are closed
        only once it has left (see close), never under its feet.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delivery = self.core.delivery
        receiver = delivery.receiver
        joined = watching = False

        def leave() -> None:
            nonlocal joined, watching
            with delivery.lock:
                if watching:
                    watching = False
                    receiver.unwatch()
            with self.core.lock:
                if joined:
                    joined = False
                    self.joiners -= 1
                    if not self.joiners and self.closing:
                        self.release()

        try:
            with self.core.lock:
                if self.closing:
                    return True  # closed meanwhile: every process has ended
                self.joiners += 1
                joined = True
            with delivery.lock:
                receiver.watch()
                watching = True
                pipe_open = not receiver.closed  # (if closed later, it stays open until we leave)
            # The dispatcher reaps every process before it returns, and then
            # rings ``done``: wait for that, not for the processes themselves
            # (two threads woken by every exit only pass the GIL back and
            # forth).
            while not (_wire.readable(self.done.fileno(), 0) or not self.thread.is_alive()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                waitables = [self.done.fileno()]
                if receiver.cut:
                    # A Ctrl-C cut a read of the output pipe short: nothing
                    # can read it any more, and the consumer would wait for
                    # ever to write the rest (see Receiver.read_available).
                    # Its death ends the rest, as any consumer's death does
                    # (the dispatcher kills and reaps).
                    if self.consumer is not None:
                        self.consumer.kill()
                elif pipe_open and not receiver.eof:
                    waitables.append(self.output_r.fd)
                wait(waitables, remaining)
                delivery.pump()
            self.thread.join()  # it has returned (or is returning): no wait
            # After a fault the dispatcher returns with the processes killed
            # and reaped; should one still run, wait for it here.
            for p in self.processes():
                if not p.ended():
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    wait([p.exit_fd], remaining)
                    if not p.ended():
                        return False
            # Every process has ended, the consumer (the pipe's only writer)
            # too: what it wrote is in the pipe.  Read until it is empty,
            # not until its end: a process the program forked while this
            # queue was made holds a copy of the write end, and the end
            # would not come while that process lives.
            while pipe_open and delivery.pump() and _wire.readable(self.output_r.fd, 0):
                pass
            return True
        finally:
            run_whole(leave)

    def close(self) -> None:
        """(lock held; every process has ended) Release every descriptor and
        process handle: now, or as the last join() leaves, if any waits."""
        self.closing = True
        if not self.joiners:
            self.release()

    def release(self) -> None:
        """(lock held) What close() does, once nobody waits on it."""
        for slot in self.slots:
            _wire.close_fd(slot.tasks_w)
        self.fds.close_all()
        self.done.close()
        for p in self.processes():
            p.release()
        self.let_go()

    def let_go(self) -> None:
        """Drop, with Ctrl-C held back, what dies with a callback in Python:
        the shared arrays (multiprocessing frees each block in a Finalize)
        and the dispatcher's Thread object (threading's set of threads drops
        it in a weak reference's callback).  Otherwise they die in the cyclic
        collector, at any allocation of the main thread later, and a press
        landing in such a callback is swallowed by Python ("Exception
        ignored"): the program goes on; half-way through multiprocessing's
        heap bookkeeping, it also leaves that inconsistent."""
        with sigint_held_back():
            self.rings = []
            self.reorder = self.max_packet_id = self.progress = None
            if self.dispatcher is not None:
                self.dispatcher.supervisor.progress = None
            if self.thread is not threading.current_thread() and not self.thread.is_alive():
                self.thread = _ENDED

    def is_alive(self) -> bool:
        with self.core.lock:  # see _slots.Child
            return not all(p.ended() for p in self.processes())

    def workers_alive(self) -> int:
        with self.core.lock:  # see _slots.Child
            return sum(1 for s in self.slots if s.running and s.proc is not None and not s.proc.ended())

    def workers_replaced(self) -> int:
        dispatcher = getattr(self, "dispatcher", None)
        return 0 if dispatcher is None else dispatcher.replaced

    def reorder_counts(self) -> tuple[int, int]:
        reorder = self.reorder
        return (0, 0) if reorder is None else (reorder[0], reorder[1])  # (None: let go, see let_go)

    def left_behind_by_fork(self) -> None:
        """In a forked child (see Core): the child's multiprocessing must not
        believe it owns our processes.  Its exit handler would SIGTERM the
        daemonic ones and join the others (an AssertionError, as they are
        not its children)."""
        children = getattr(multiprocessing.process, "_children", None)
        if children is not None:
            for p in self.processes():
                children.discard(p.proc)
