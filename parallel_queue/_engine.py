"""The process engine: who runs where, and the pipes between them.

::

    main process                                                     main process
   ----------------------------------------------------------------------------------
    put() --> pending --> [dispatcher thread] ==tasks==> worker 0 --results--+
    (any        (deque,     batches, pickles,  ==tasks==> worker 1 --results--+
     thread)    bounded     assigns PacketIDs,    ...                        |
                in_q_max)   supervises workers ==tasks==> worker N-1 -------+
                               ^       |                  ^   |              |
                               |       | ctrl (DRAIN,     |   | WAIT         v
                               |       |  LAST)      wake-up  +--------> [consumer process]
                               |       +-------------> pipes <-----------  reorder buffer (heap
                               |                                           of PacketIDs), publishes
                               +---- credits (CREDIT, DRAINED, FATAL) ---  max_packet_id (shared)
                                                                                  |
    get() <-- [delivery: markers merged in their places, payloads unpickled] <-- output

- **put()** (caller's thread) appends a task to ``pending``, without a lock
  on its common path (the protocol is in ``_front``); a marker (a
  non-callable) never leaves the main process: it waits in ``markers`` with
  the number of tasks put before it, and ``get()`` hands it back (the same
  object) in that place.
- **dispatcher** (a thread of the main process) takes batches from
  ``pending`` and writes them as packets to workers that have credit (at
  most ``CREDITS_PER_WORKER`` packets each), sized from measured task times.
  It also starts replacement workers, kills timed-out tasks and, after a
  worker ends, re-sends the packets it took with it (the task that was
  running gets ``WorkerLostError`` in its slot).  It is the only thread that
  writes to workers or starts processes after construction, and the only
  one that reaps them: ``join()`` waits for its byte on the ``done`` pipe.
- **workers** (processes, one per slot) run packets and send results to the
  consumer, never past ``max_packet_id``; past it they WAIT and sleep on
  their wake-up pipe until the consumer wakes them.
- **consumer** (one process) owns the reorder buffer: the seed's algorithm.
  It forwards packets to ``get()`` in id order without unpickling them and
  credits the dispatcher for every packet received.
- **delivery** (``get()``, caller's thread) reads the output pipe, unpickles
  a packet's results, and hands out values, errors and markers in put order.

Every pipe has a single writer process; readers never block on a frame half
written (see ``_wire``), so a process that dies at any instant loses at most
its own unfinished work, and that is detected from its process sentinel.
"""

from __future__ import annotations

import atexit
import errno
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import multiprocessing.util  # before our atexit handler: see _terminate_all_at_exit
import os
import threading
import weakref
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any, Callable, Optional, Union

from . import _wire
from ._consumer import ConsumerSpec, consumer_main
from ._front import Front
from ._threads import helper_thread, sigint_held_back
from ._wire import Fd
from ._worker import PROGRESS_FIELDS, Inherited, WorkerSpec, worker_main

# Packets a worker may hold at once (running + queued in its pipe).  One
# would leave it idle while the next packet travels; more would let one
# worker hoard work that an idle one could have taken, and lengthen the
# list of packets a crash takes with it.
CREDITS_PER_WORKER = 2


class Options:
    """The resolved constructor options of a queue."""

    def __init__(
        self,
        num_workers: Optional[int],
        daemon: bool,
        in_q_max: int,
        out_q_max: int,
        worker_q_max: int,
        worker_init_f: Optional[Callable[[], Any]],
        consumer_buffer_max: Optional[int],
        mp_context: Union[None, str, BaseContext],
        task_timeout: Optional[float],
        max_tasks_per_worker: Optional[int],
        max_batch: Optional[int],
        progress: bool = False,
    ) -> None:
        self.progress = progress
        self.explicit_workers = num_workers
        self.explicit_buffer = consumer_buffer_max
        self.num_workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.num_workers > 60000:
            raise ValueError("num_workers must be below 60000")
        self.daemon = daemon
        for name, v in (("in_q_max", in_q_max), ("out_q_max", out_q_max), ("worker_q_max", worker_q_max)):
            if v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        self.in_q_max = in_q_max
        self.out_q_max = out_q_max
        self.worker_q_max = worker_q_max
        self.worker_init_f = worker_init_f
        self.consumer_buffer_max = consumer_buffer_max if consumer_buffer_max is not None else 10 * self.num_workers
        if self.consumer_buffer_max < 1:
            raise ValueError(f"consumer_buffer_max must be at least 1, got {self.consumer_buffer_max}")
        # Any: typeshed's BaseContext lacks Process, which every real context has.
        self.ctx: Any = (
            multiprocessing.get_context(mp_context) if mp_context is None or isinstance(mp_context, str) else mp_context
        )
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be a positive number of seconds, got {task_timeout}")
        self.task_timeout = task_timeout
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be at least 1, got {max_tasks_per_worker}")
        self.max_tasks_per_worker = max_tasks_per_worker or 0
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        # imap's chunksize: packets of exactly this many tasks (when that many
        # wait), instead of sizes derived from measured task times.
        self.chunksize: Optional[int] = None
        # What a task item is (_worker.CALL, ARGS, STAR, ONE): set by the
        # queue class before the engine starts.
        self.form = 0

    @property
    def window(self) -> int:
        """Every packet id alive at once lies within [next, next + window): the
        reorder buffer plus what workers hold, plus one for the packet being
        re-sent after a crash."""
        return self.consumer_buffer_max + self.num_workers * CREDITS_PER_WORKER + 1

    @property
    def max_markers(self) -> int:
        """Markers that may wait for get() before put(marker) blocks.

        As many as tasks may wait (``in_q_max``) plus the results' window: a
        marker costs nothing to hold, and 0.5 held markers in its pipeline's
        buffers, so 0.5 code that puts several markers with small buffers
        before its first get() runs unchanged.
        """
        return self.in_q_max + self.window


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
    # thread of the parent can have left held.  Nor are the parent's queues
    # its own to end at exit.
    global _parent_alive, _parent_alive_lock
    _parent_alive = None
    _parent_alive_lock = threading.Lock()
    _live_engines.clear()


os.register_at_fork(after_in_child=_forget_parent_alive)

# ------------------------------------------------------------------ at exit

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _terminate_all_at_exit() -> None:
    # Must run before multiprocessing's own exit handler, which joins every
    # non-daemonic child and would wait forever for the workers of a queue
    # nobody stopped.  Exit handlers run last-registered first, and
    # multiprocessing.util registers its handler when first imported, which
    # can be lazily, after us: hence the explicit import above.
    for engine in list(_live_engines):
        engine.terminate()


atexit.register(_terminate_all_at_exit)


class Child:
    """A process of ours, and the descriptor that becomes readable when it ends.

    That descriptor is a pidfd where the system has them (Linux 5.3 and
    later): it belongs to the process itself.  multiprocessing's sentinel is
    a pipe whose write end the child holds, so a task that forks a helper
    without exec hands the helper a copy, and the worker's death went
    unnoticed until the helper exited.  Elsewhere the sentinel is used.

    Only the dispatcher thread reaps (``join``) while it runs: when two
    threads reap one child, the loser gets ECHILD and multiprocessing reports
    exit code None, which reads as a crash.  ``ended()`` never reaps.
    ``release()`` and every ``ended()`` from outside the dispatcher happen
    under the queue's lock, so no one polls a descriptor number closed (and
    reused) under its feet.
    """

    __slots__ = ("proc", "pidfd", "released")

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pidfd: Optional[int] = None
        self.released = False

    def watch(self) -> None:
        """Open the pidfd (kept apart from __init__: the caller records the
        Child first, so a failure here, EMFILE say, still leaves it killable)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.proc.pid)
            except OSError as e:
                if e.errno == errno.EMFILE or e.errno == errno.ENFILE:
                    raise
                # ENOSYS and the like: an older kernel, or a sandbox.

    @property
    def exit_fd(self) -> int:
        return self.pidfd if self.pidfd is not None else int(self.proc.sentinel)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def exitcode(self) -> Optional[int]:
        return self.proc.exitcode  # type: ignore[no-any-return]

    def ended(self) -> bool:
        """Whether the process has exited (reaped or not)."""
        return self.released or _wire.readable(self.exit_fd, 0)

    def kill(self) -> None:
        if not self.ended():
            self.proc.kill()

    def join(self) -> None:
        if not self.released:
            self.proc.join()

    def release(self) -> None:
        """(it has ended and was reaped) Close its descriptors."""
        if self.released:
            return
        self.released = True
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        try:
            self.proc.close()
        except ValueError:  # still running: only after a failed kill
            pass


class Slot:
    """One worker position: its shared pipes, its current process and its packets."""

    __slots__ = (
        "index",
        "results_w",
        "go_r",
        "proc",
        "tasks_w",
        "writer",
        "outstanding",
        "sent_items",
        "state",
        "stop_sent",
        "kill_seq",
        "kill_reason",
        "incarnation",
    )

    def __init__(self, index: int, results_w: Fd, go_r: Fd) -> None:
        self.index = index
        self.results_w = results_w  # kept to hand to each new worker in this slot
        self.go_r = go_r
        self.proc: Optional[Child] = None
        self.tasks_w: Optional[Fd] = None
        self.writer: Optional[_wire.FrameWriter] = None
        self.outstanding: deque[Any] = deque()  # PacketRecords, oldest first
        self.sent_items = 0
        self.state = "idle"  # running | draining | ended
        self.stop_sent = False
        self.kill_seq = 0  # progress sequence number of the task we killed
        self.kill_reason = ""
        self.incarnation = 0


class Engine(Front):
    """Owns the processes, pipes and threads of one queue.

    The public queue classes hold an Engine; the Engine never refers back
    to them, so a queue dropped without ``stop()`` is collected and its
    finalizer terminates the Engine.
    """

    def __init__(self, opts: Options, task_fn: Optional[Callable[..., Any]]) -> None:
        super().__init__(opts)
        self.ctx = opts.ctx
        self.task_fn = task_fn
        self.slots: list[Slot] = []
        self.consumer: Optional[Child] = None
        self.thread = helper_thread(self.run_dispatcher, "parallel_queue-dispatcher")
        try:
            method = self.ctx.get_start_method()
            if method != "fork":
                # multiprocessing's helper processes, started lazily by the
                # first spawn or forkserver start, are started now, before
                # SIGINT is held back: the fork server would hand a blocked
                # mask to every process it forks (the program's own ones
                # too), and starting the resource tracker unblocks SIGINT in
                # the calling thread, which would let it reach our children.
                multiprocessing.resource_tracker.ensure_running()
                if method == "forkserver":
                    multiprocessing.forkserver.ensure_running()
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
        from ._delivery import Delivery
        from ._dispatcher import Dispatcher

        opts, ctx = self.opts, self.ctx
        n = opts.num_workers
        # [packets, tasks] in the consumer's reorder buffer, written by it.
        self.reorder = ctx.RawArray("q", 2)
        self.max_packet_id = ctx.RawValue("q", 0)
        self.progress = ctx.RawArray("q", PROGRESS_FIELDS * n)
        self.alive_r, _ = parent_alive_pipe()
        pipe = self.fds.pipe
        self.done_r, self.done_w = pipe()  # the dispatcher has returned
        results = [pipe(big=True) for _ in range(n)]
        gos = [pipe() for _ in range(n)]
        ctrl_r, self.ctrl_w = pipe()
        self.credits_r, credits_w = pipe()
        self.output_r, output_w = pipe(big=True)
        self.slots = [Slot(i, results[i][1], gos[i][0]) for i in range(n)]

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
        consumer = ctx.Process(target=consumer_main, args=(spec,), name="parallel_queue-consumer", daemon=opts.daemon)
        self.delivery = Delivery(self, _wire.FrameReader(self.output_r))
        self.fds.disown(self.output_r)  # the delivery's to close (see Delivery.close)
        self.dispatcher = Dispatcher(self)
        consumer.start()
        self.consumer = Child(consumer)
        self.consumer.watch()
        for fd in (*spec.results_in, *spec.go_out, ctrl_r, credits_w, output_w):
            _wire.close_fd(fd)  # the consumer's ends: held by it alone from now on
        for slot in self.slots:
            self.start_worker(slot)
        self.thread.start()
        _live_engines.add(self)
        if opts.progress:
            self.show_progress()

    def abandon(self) -> None:
        """The construction failed or was interrupted: end every process it
        started, close every descriptor it opened."""
        if self.thread.ident is not None:  # it got to the end: the usual way out
            self.terminate()
            return
        self.kill_processes()
        with self.lock:
            self.closed = True
            for p in self.processes():
                p.release()
        for slot in self.slots:
            _wire.close_fd(slot.tasks_w)
        self.fds.close_all()
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            delivery.close()  # (nobody can be watching yet)

    def run_dispatcher(self) -> None:
        self.dispatcher.run()

    # -------------------------------------------------------------- workers

    def start_worker(self, slot: Slot) -> None:
        """Start a new worker process in ``slot`` (its pipes are clean)."""
        tasks_r, tasks_w = _wire.make_pipe(big=True)
        p0 = slot.index * PROGRESS_FIELDS
        for f in range(PROGRESS_FIELDS):
            self.progress[p0 + f] = -1 if f == 0 else 0
        spec = WorkerSpec(
            slot.index,
            tasks_r,
            slot.results_w,
            slot.go_r,
            self.alive_r,
            self.max_packet_id,
            self.progress,
            self.opts.window,
            self.task_fn,
            self.opts.worker_init_f,
            self.opts.max_tasks_per_worker,
            self.opts.task_timeout is not None,
        )
        slot.incarnation += 1
        proc = self.ctx.Process(
            target=worker_main,
            args=(Inherited(spec),),
            name=f"parallel_queue-worker-{slot.index}.{slot.incarnation}",
            daemon=self.opts.daemon,
        )
        try:
            proc.start()
            slot.proc = Child(proc)  # recorded at once: whatever comes next, terminate() sees it
            slot.proc.watch()
        finally:
            _wire.close_fd(tasks_r)
            if proc.pid is None:
                _wire.close_fd(tasks_w)
        slot.tasks_w = tasks_w
        _wire.set_nonblocking(tasks_w)
        slot.writer = _wire.FrameWriter(tasks_w)
        slot.sent_items = 0
        slot.state = "running"
        slot.stop_sent = False
        slot.kill_seq = 0
        slot.kill_reason = ""

    # ----------------------------------------------------------- lifecycle

    def terminate(self) -> None:
        """Tear everything down at once; undelivered results are lost."""
        if self.begin_terminate():
            self.end_dispatcher_then_kill(self.thread)
            self.close()

    def kill_processes(self) -> None:
        """SIGKILL and reap every process (from the dispatcher, or once it is gone)."""
        procs = self.processes()
        for p in procs:
            p.kill()
        for p in procs:
            p.join()

    def close(self) -> None:
        """Release every descriptor and process handle (all processes have ended)."""
        if self.progress_bar is not None:
            self.progress_bar.close()
        self.delivery.close()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            # Wake-up writes happen under this lock too, so none can hit a
            # descriptor number reused after this close.
            for slot in self.slots:
                _wire.close_fd(slot.tasks_w)
            self.fds.close_all()
            self.getters.close()
            self.putters.close()
            for p in self.processes():
                p.release()
        _live_engines.discard(self)

    def processes(self) -> list[Child]:
        """Every process started: the workers now in their slots, then the consumer."""
        procs = [s.proc for s in self.slots if s.proc is not None]
        if self.consumer is not None:
            procs.append(self.consumer)
        return procs

    def is_alive(self) -> bool:
        self.check_owner()
        with self.lock:  # see Child
            return not all(p.ended() for p in self.processes())

    def left_behind_by_fork(self) -> None:
        """In a forked child (see Front): also, the child's multiprocessing
        must not believe it owns our processes.  Its exit handler would
        SIGTERM the daemonic ones and join the others (an AssertionError, as
        they are not its children)."""
        super().left_behind_by_fork()
        children = getattr(multiprocessing.process, "_children", None)
        if children is not None:
            for p in self.processes():
                children.discard(p.proc)

    def join(self, timeout: Optional[float]) -> bool:
        """Wait for every process to end; True if they all did within ``timeout``.

        Results still coming out are read into memory meanwhile, so the
        consumer never waits for a get() that is not coming.  Once everything
        has ended, any further join() returns True at once.
        """
        import time
        from multiprocessing.connection import wait

        self.check_owner()
        if self.closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        in_dispatcher = self.thread is threading.current_thread()
        while True:
            # The dispatcher reaps every process before it returns, and then
            # writes to ``done``: wait for that, not for the processes
            # themselves (two threads woken by every exit only pass the GIL
            # back and forth).  From the dispatcher's own thread (a callback),
            # wait for the processes.
            if in_dispatcher:
                alive = [p.exit_fd for p in self.processes() if not p.ended()]
                if not alive:
                    break
            elif _wire.readable(self.done_r.fd, 0) or not self.thread.is_alive():
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            waitables: list[Any] = alive if in_dispatcher else [self.done_r.fd]
            if not self.delivery.closed and not self.delivery.reader.eof:
                waitables.append(self.output_r.fd)
            wait(waitables, remaining)
            self.delivery.pump()
        if not in_dispatcher:
            self.thread.join()  # it has returned (or is returning): no wait
            # After a break or terminate() the dispatcher returns before the
            # processes are reaped; kill_processes() reaps them.
            for p in self.processes():
                if not p.ended():
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    wait([p.exit_fd], remaining)
                    if not p.ended():
                        return False
        while self.delivery.pump():
            _wire.readable(self.output_r.fd, None)
        self.close()
        return True

    def workers_alive(self) -> int:
        with self.lock:  # see Child
            return sum(1 for s in self.slots if s.state == "running" and s.proc is not None and not s.proc.ended())

    def workers_replaced(self) -> int:
        return self.dispatcher.replaced

    def reorder_counts(self) -> tuple[int, int]:
        return self.reorder[0], self.reorder[1]
