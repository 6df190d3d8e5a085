"""The worker process: run packets of tasks, respect the consumer's window.

A worker reads task packets from its own pipe, runs each task, pickles the
packet's results, and sends them to the consumer, but only once the
consumer will accept them: the packet id must not be past ``max_packet_id``.
When it is, the worker tells the consumer which id it waits for (a WAIT
frame) and sleeps on its wake-up pipe; the consumer writes one byte there
when that id becomes acceptable.  The consumer handles the WAIT after any
advance it had already published, so the wake-up cannot be lost, and no
timeout stands in for it.

Before each task the worker writes where it is (packet id, item index, start
time, a sequence number) into its slot of a shared array: after a crash or a
timeout kill, the main process reads there which task was running.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import threading
import time
from collections import ChainMap
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, Optional, Sequence

import cloudpickle

from . import _wire
from ._child import start_child
from ._packet_id import ahead, modulus
from ._payload import (
    TaskError,
    dump_one_result,
    dumps_results_envelope,
    dumps_results_oob,
    load_one_task,
    loads_tasks,
    loads_tasks_envelope,
)
from ._region import RingReader, RingWriter, attach
from ._tasks import (
    P_ITEM,
    P_PACKET,
    P_STAGE,
    PROGRESS_FIELDS,
    STAGE_IDLE,
    STAGE_LOADING,
    STAGE_RUNNING,
    STAGE_SAVING,
    STAGE_SENDING,
    STAR,
    capture_error,
    mark_step,
    packet_function,
    run_items,
    run_one,
)
from ._wire import Fd, Kind

# The exit status of a worker whose own pipes failed (see worker_main).
EXIT_PIPE_LOST = 3

# A packet's results are sent in more than one frame once they pass this
# size: packets are sized by what was measured (see _scheduler), but results
# that grow suddenly (tiny ones, then megabytes each) would otherwise all be
# held until the packet's last task ran, up to max_batch of them, in the
# worker, then in the consumer and the main process.  Each frame but the
# last waits until its packet is the next one delivered, and the consumer
# reads nothing more from the worker until it has passed it on (see
# _consumer), so a worker holds at most this much, plus one result.  The
# results are weighed as they come (see _payload.weigh); what that cannot
# see is left to the packet's size limits (see _scheduler).
SPLIT_BYTES = 8 << 20


class Inherited:
    """An object handed to a child process when it starts, not through a queue.

    Under ``fork`` it is inherited as is.  Under ``spawn``/``forkserver`` it is
    cloudpickled while the process is being started, which is the one moment
    multiprocessing lets its Locks, Events and Values be pickled: so closures
    over such objects work under every start method.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        buf = io.BytesIO()
        try:
            _InheritancePickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(self.obj)
        except Exception as e:
            raise pickle.PicklingError(
                "cannot hand the task function or worker_init_f to a worker process started with"
                f" 'spawn' or 'forkserver' (they are pickled at process start): {type(e).__name__}: {e}"
            ) from e
        return _load_inherited, (buf.getvalue(),)


class _InheritancePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus multiprocessing's reducers for its shared objects.

    multiprocessing registers how to hand over shared ctypes (``Value``,
    ``Array``), connections and the like with its own pickler only; a
    closure over a ``Value`` needs both.  The table is a live view, as
    multiprocessing registers types as they are created.
    """

    dispatch_table = ChainMap(cloudpickle.Pickler.dispatch_table, ForkingPickler._extra_reducers)  # type: ignore[attr-defined]


def _load_inherited(data: bytes) -> Inherited:
    return Inherited(cloudpickle.loads(data))


class WorkerSpec(NamedTuple):
    """Everything one worker process is given at start."""

    slot: int
    tasks_in: Fd
    results_out: Fd
    go_in: Fd
    parent_alive: Fd
    max_packet_id: Any  # a shared 64-bit value (RawValue('q'))
    progress: Any  # shared RawArray('q'), PROGRESS_FIELDS per slot
    window: int
    task_fn: Optional[Any]  # ParallelSingleTaskQueue's function
    init_fn: Optional[Any]
    max_tasks: int  # 0: no limit
    timed: bool  # task_timeout is set: record each task's start (see run_items)
    region: Optional[Fd] = None  # the slot's shared memory (see _region), if any
    ring_bytes: int = 0
    buffer_max: int = 1  # the consumer's (see wait_for_turn)


def worker_main(handed: Inherited) -> None:
    """The worker process's entry point.

    The whole spec comes in one ``Inherited`` pickle: the user's function and
    our own shared memory then share one pickle memo, so a shared-memory
    arena used by both is handed over once (handing the same descriptor
    over twice makes a ``spawn`` start fail).
    """
    spec: WorkerSpec = handed.obj
    keep = {spec.tasks_in.fd, spec.results_out.fd, spec.go_in.fd}
    if spec.region is not None:
        keep.add(spec.region.fd)
    start_child(keep, spec.parent_alive)
    if spec.init_fn is not None:
        try:
            spec.init_fn()
        except BaseException as e:  # noqa: BLE001 - report whatever it was
            _report_init_failure(spec, e)
            return
    try:
        _Worker(spec).run()
    except OSError:
        # One of our own pipes failed (task errors never get here): the
        # consumer is gone (the main process sees to that), or a task closed
        # our descriptors (the dispatcher blames it, see its stage in the
        # progress array).  Either way there is nobody to tell: leave
        # quietly, without a traceback on the terminal.
        os._exit(EXIT_PIPE_LOST)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # A task left a thread running: multiprocessing would wait for it
        # for ever before this process exits (recycling, stop() and join()
        # would hang).  The worker's work is done: exit now.
        _flush_std_streams()
        os._exit(0)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # a closed or broken stream: nothing more to say
            pass


def _report_init_failure(spec: WorkerSpec, e: BaseException) -> None:
    if e.__traceback__ is not None:
        e = e.with_traceback(e.__traceback__.tb_next)
    payload = cloudpickle.dumps(TaskError.from_exception(e))
    _wire.write_frame_blocking(spec.results_out.fd, bytes([Kind.INIT_FAILED]), payload)


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.modulus = modulus(spec.window)
        self.fn = spec.task_fn
        # A memoryview of the shared array: a store through it costs a
        # fraction of a ctypes item assignment, and one happens per task.
        self.prog = memoryview(spec.progress).cast("B").cast("q")
        self.p0 = spec.slot * PROGRESS_FIELDS
        self.seq = 0
        self.done = 0
        # Packets read while waiting for a re-sent (careful) packet: they are
        # run after it, in the order they came.
        self.stash: list[bytearray | memoryview] = []
        # What our own pipes are: a task may close them (os.closerange) and
        # even open files that take their numbers (see check_own_pipes).
        ours = [spec.tasks_in.fd, spec.results_out.fd, spec.go_in.fd]
        # The slot's rings (see _region): results out, arguments in.
        self.results_ring: Optional[RingWriter] = None
        self.args_ring: Optional[RingReader] = None
        if spec.region is not None:
            self.results_ring, self.args_ring = attach(spec.region, spec.ring_bytes)
            ours.append(spec.region.fd)
        self.pipes = {fd: _identity(fd) for fd in ours}
        # What the arguments ring's buffers were copied into, taken back for
        # the next packet's once nothing uses them (see _wire.BodyPool).
        self.pool = _wire.BodyPool()
        self.lent: list[memoryview] = []
        self.prog[self.p0 + P_STAGE] = STAGE_IDLE  # past worker_init_f: a death is no start-up death

    def decode(self, body: bytearray | memoryview) -> _wire.TaskPacket:
        """A task packet, its buffers in the arguments ring copied into
        memory of the worker's own (a helper process a task forks keeps a
        copy of its arguments, not a view of the ring that later packets
        write over); the range goes back to the dispatcher at once."""
        for lent in self.lent:
            self.pool.give(lent)  # (kept only if the packet before let go of it)
        self.lent.clear()
        if type(body) is memoryview:
            self.lent.append(body)  # a large frame, read into the pool (see run)
        ring = self.args_ring
        if ring is None:
            return _wire.decode_tasks(body)

        def view_of(start: int, data: int, end: int) -> memoryview:
            assert ring is not None
            into = self.pool.take(end - data, ring.phase(data))
            ring.read(data, end, into)
            ring.give_back(start, end)
            self.lent.append(into)
            return memoryview(into)

        return _wire.decode_tasks(body, view_of)

    def step(self, stage: int, k: int) -> None:
        """Record that the worker now does ``stage`` for task ``k`` of its
        packet (-1: the whole packet, or a map's function).  With
        task_timeout, each step is timed (see _tasks.mark_step)."""
        if self.spec.timed:
            self.seq = mark_step(self.prog, self.p0, stage, k, self.seq)
        else:
            self.prog[self.p0 + P_STAGE] = stage
            self.prog[self.p0 + P_ITEM] = k

    def run(self) -> None:
        fd = self.spec.tasks_in.fd
        while True:
            body = self.stash.pop(0) if self.stash else _wire.read_frame_blocking(fd, self.pool)
            if body is None or body[0] == Kind.STOP:
                return
            pkt = self.decode(body)
            if pkt.careful:
                self.run_careful(pkt)
            else:
                self.run_packet(pkt)
            self.prog[self.p0 + P_STAGE] = STAGE_IDLE
            if self.spec.max_tasks and self.done >= self.spec.max_tasks:
                return

    def run_packet(self, pkt: _wire.TaskPacket) -> None:
        """The hot path: load the whole batch, run it, pickle its results (in
        more than one frame once they weigh SPLIT_BYTES).

        Should the worker die after the tasks ran (a result that kills it
        while pickled, a task that closed our pipes), the stage it was in
        tells the dispatcher to send the packet again as a careful one,
        which pins the death on one task (see run_careful)."""
        prog, p0 = self.prog, self.p0
        prog[p0 + P_PACKET] = pkt.packet_id
        self.step(STAGE_LOADING, -1)
        try:
            items = loads_tasks(pkt.payload, False, pkt.buffers)
        except BaseException:  # noqa: BLE001 - a loader's SystemExit too: user code
            self.run_careful(self.fetch_careful(pkt.packet_id))
            return
        prog[p0 + P_STAGE] = STAGE_RUNNING
        t0 = time.perf_counter_ns()
        fn, items = packet_function(self.fn, pkt.form, items)
        n, form, timed = len(items), pkt.form, self.spec.timed
        lo = 0
        while True:
            # Until the results weigh SPLIT_BYTES (weighed as they come, see
            # _payload.weigh); the rest, if any, go in the next frame.
            values, errors, self.seq = run_items(
                fn, form, items, capture_error, prog, p0, self.seq, timed, lo, SPLIT_BYTES
            )
            hi = lo + len(values)
            self.send_results(pkt, items, lo, hi, values, errors, time.perf_counter_ns() - t0)
            if hi == n:
                break
            lo = hi
            prog[p0 + P_STAGE] = STAGE_RUNNING
            t0 = time.perf_counter_ns()
        self.done += n

    def send_results(
        self,
        pkt: _wire.TaskPacket,
        items: list[Any],
        lo: int,
        hi: int,
        values: list[Any],
        errors: dict[int, Any],
        compute_ns: int,
    ) -> None:
        """Pickle and send the results of tasks ``lo`` to ``hi`` of ``pkt``
        (the last of its frames if ``hi`` is its end)."""
        # The index of no task (see Supervisor.diagnose): a death from here
        # on is in pickling or sending, which one task at a time will tell.
        self.step(STAGE_SAVING, len(items))
        payload, buffers = dumps_results_oob(
            values, errors, items[lo:hi] if lo or hi < len(items) else items, pkt.first + lo
        )
        self.send(pkt.packet_id, hi - lo, compute_ns, False, payload, buffers, lo, hi < len(items))

    def run_careful(self, pkt: _wire.TaskPacket) -> None:
        """A careful packet: every step one task at a time, each recorded.

        Each task was pickled on its own.  The worker unpickles each, runs
        it, pickles its result on its own and checks that its pipes are
        still its own, with the stage and the task's index in the progress
        array at every step: whatever kills it, the dispatcher knows which
        task it was doing.  An argument or a result that fails without
        killing it fails in its own slot.
        """
        self.prog[self.p0 + P_PACKET] = pkt.packet_id
        self.step(STAGE_LOADING, -1)
        parts = loads_tasks_envelope(pkt.payload)
        # A map's packet on a queue that runs any task carries its function
        # first: its index is -1, the tasks' are 0, 1, ...
        first = -1 if (self.fn is None and pkt.form >= STAR) else 0
        loaded = []
        for k, part in enumerate(parts, first):
            self.step(STAGE_LOADING, k)
            loaded.append(load_one_task(part))
        fn, items = packet_function(self.fn, pkt.form, loaded)
        t0 = time.perf_counter_ns()
        results: list[Optional[bytes]] = []
        errors: dict[int, Any] = {}
        lo = size = 0
        n = len(items)
        for k, item in enumerate(items):
            self.step(STAGE_RUNNING, k)
            value, error = run_one(fn, pkt.form, item)
            self.step(STAGE_SAVING, k)
            if error is None:
                value, error = dump_one_result(value, item)
            results.append(value)
            if error is not None:
                errors[k - lo] = error
            self.check_own_pipes()
            size += len(value) if value is not None else 0
            if size >= SPLIT_BYTES and k + 1 < n:  # (see SPLIT_BYTES)
                ns = time.perf_counter_ns() - t0
                self.step(STAGE_SENDING, n)
                self.send(pkt.packet_id, k + 1 - lo, ns, True, dumps_results_envelope(results, errors), (), lo, True)
                lo, size, results, errors = k + 1, 0, [], {}
                t0 = time.perf_counter_ns()
        compute_ns = time.perf_counter_ns() - t0
        self.done += n
        self.send(pkt.packet_id, n - lo, compute_ns, True, dumps_results_envelope(results, errors), (), lo)

    def send(
        self,
        packet_id: int,
        count: int,
        compute_ns: int,
        careful: bool,
        payload: bytes,
        buffers: Sequence[Any] = (),
        start: int = 0,
        more: bool = False,
    ) -> None:
        """Send a packet's results (tasks ``start`` to ``start + count``; ``more``:
        not its last frame), once the consumer will take them: the
        out-of-band ``buffers`` are written from where they are."""
        self.prog[self.p0 + P_STAGE] = STAGE_SENDING
        self.check_own_pipes()
        if more:
            self.wait_for_turn(packet_id)
        else:
            self.wait_for_window(packet_id)
        ring = self.results_ring
        placement = ring.place(buffers) if ring is not None and buffers else None
        slot = self.spec.slot
        header = _wire.encode_result(packet_id, count, compute_ns, careful, buffers, placement, slot, start, more)
        if placement is None:
            _wire.write_frame_blocking(self.spec.results_out.fd, header, payload, *buffers)
            return
        assert ring is not None
        # (a death from here on leaves the range in doubt: see _region)
        ring.publish(placement, _wire.frame_key(packet_id, start))
        _wire.write_frame_blocking(self.spec.results_out.fd, header, payload, *_wire.in_frame(buffers, placement))
        ring.written()

    def check_own_pipes(self) -> None:
        """Exit if a task closed our pipes, or replaced them with its own files.

        Writing our frames into a file a task opened under a reused
        descriptor number would corrupt it; exiting here, with the stage and
        the task recorded, lets the dispatcher blame that task."""
        for fd, identity in self.pipes.items():
            try:
                same = _identity(fd) == identity
            except OSError:
                same = False
            if not same:
                os._exit(EXIT_PIPE_LOST)

    def fetch_careful(self, packet_id: int) -> _wire.TaskPacket:
        """The batch would not unpickle here: ask for it again, as a careful
        packet (one pickle per task).

        The re-sent packet comes down the same pipe, possibly behind packets
        sent after it; those are kept and run after it, so ids still go out
        in order (running a later packet first could wait forever on the
        window this one holds back).
        """
        _wire.write_frame_blocking(self.spec.results_out.fd, _wire.encode_id(Kind.REJECT, packet_id))
        while True:
            body = _wire.read_frame_blocking(self.spec.tasks_in.fd, self.pool)
            if body is None:
                os._exit(0)
            if body[0] == Kind.TASKS and _wire.tasks_id(body) == (packet_id, True):
                return self.decode(body)
            self.stash.append(body)

    def wait_for_turn(self, packet_id: int) -> None:
        """Wait until ``packet_id`` is the next packet the consumer delivers,
        which it stays until its last frame is in (see SPLIT_BYTES): the
        consumer accepts ids up to ``next + buffer_max - 1``, so this is the
        window's wait for the id ``buffer_max - 1`` past it."""
        self.wait_for_window((packet_id + self.spec.buffer_max - 1) % self.modulus)

    def wait_for_window(self, packet_id: int) -> None:
        spec = self.spec
        if not ahead(packet_id, spec.max_packet_id.value, self.modulus, spec.window):
            return
        _wire.write_frame_blocking(spec.results_out.fd, _wire.encode_id(Kind.WAIT, packet_id))
        # The consumer answers each WAIT with one byte, written after it
        # published the max_packet_id that lets this packet through.
        while ahead(packet_id, spec.max_packet_id.value, self.modulus, spec.window):
            if not os.read(spec.go_in.fd, 1):
                os._exit(0)  # the consumer is gone; the main process sees to the rest


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
