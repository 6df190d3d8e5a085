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
import time
from collections import ChainMap
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, NamedTuple, Optional

import cloudpickle

from . import _wire
from ._child import start_child
from ._packet_id import ahead
from ._payload import TaskError, dumps_results, every_slot_fails, loads_tasks
from ._wire import Fd, Kind

# What a task item is, by queue (Options.form):
CALL = 0  # ParallelQueue: (fn, args, kwargs or None)
ARGS = 1  # ParallelSingleTaskQueue: (args, kwargs or None)
STAR = 2  # imap over several iterables: the args tuple
ONE = 3  # imap over one iterable: the one argument itself (cheapest to pickle)

# The exit status of a worker whose own pipes failed (see worker_main).
EXIT_PIPE_LOST = 3

# Layout of one slot in the shared progress array.
PROGRESS_FIELDS = 4
P_PACKET, P_ITEM, P_START_NS, P_SEQ = range(PROGRESS_FIELDS)


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


def worker_main(handed: Inherited) -> None:
    """The worker process's entry point.

    The whole spec comes in one ``Inherited`` pickle: the user's function and
    our own shared memory then share one pickle memo, so a shared-memory
    arena used by both is handed over once (handing the same descriptor
    over twice makes a ``spawn`` start fail).
    """
    spec: WorkerSpec = handed.obj
    start_child({spec.tasks_in.fd, spec.results_out.fd, spec.go_in.fd}, spec.parent_alive)
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


def _report_init_failure(spec: WorkerSpec, e: BaseException) -> None:
    if e.__traceback__ is not None:
        e = e.with_traceback(e.__traceback__.tb_next)
    payload = cloudpickle.dumps(TaskError.from_exception(e))
    _wire.write_frame_blocking(spec.results_out.fd, bytes([Kind.INIT_FAILED]), payload)


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.base = 2 * spec.window + 1
        self.fn = spec.task_fn
        # A memoryview of the shared array: a store through it costs a
        # fraction of a ctypes item assignment, and one happens per task.
        self.prog = memoryview(spec.progress).cast("B").cast("q")
        self.p0 = spec.slot * PROGRESS_FIELDS
        self.seq = 0
        self.done = 0
        # Packets read while waiting for a re-sent (individually pickled)
        # packet: they are run after it, in the order they came.
        self.stash: list[bytearray] = []

    def run(self) -> None:
        fd = self.spec.tasks_in.fd
        while True:
            body = self.stash.pop(0) if self.stash else _wire.read_frame_blocking(fd)
            if body is None or body[0] == Kind.STOP:
                return
            self.run_packet(_wire.decode_tasks(body))
            if self.spec.max_tasks and self.done >= self.spec.max_tasks:
                return

    def run_packet(self, pkt: _wire.TaskPacket) -> None:
        prog, p0 = self.prog, self.p0
        prog[p0 + P_ITEM] = 0
        prog[p0 + P_PACKET] = pkt.packet_id
        try:
            items = loads_tasks(pkt.payload, pkt.individually)
        except Exception:
            items = self.fetch_individually(pkt.packet_id)
        t0 = time.perf_counter_ns()
        fn, items = packet_function(self.fn, pkt.form, items)
        values, errors, self.seq = run_items(fn, pkt.form, items, capture_error, prog, p0, self.seq, self.spec.timed)
        compute_ns = time.perf_counter_ns() - t0
        self.done += len(items)
        payload = dumps_results(values, errors, items)
        self.wait_for_window(pkt.packet_id)
        _wire.write_frame_blocking(
            self.spec.results_out.fd, _wire.encode_result(pkt.packet_id, len(items), compute_ns), payload
        )

    def fetch_individually(self, packet_id: int) -> list[Any]:
        """The batch would not unpickle here: ask for it again, one pickle per task.

        The re-sent packet comes down the same pipe, possibly behind packets
        sent after it; those are kept and run after it, so ids still go out
        in order (running a later packet first could wait forever on the
        window this one holds back).
        """
        _wire.write_frame_blocking(self.spec.results_out.fd, _wire.encode_id(Kind.REJECT, packet_id))
        while True:
            body = _wire.read_frame_blocking(self.spec.tasks_in.fd)
            if body is None:
                os._exit(0)
            if body[0] == Kind.TASKS:
                pkt = _wire.decode_tasks(body)
                if pkt.packet_id == packet_id and pkt.individually:
                    return loads_tasks(pkt.payload, True)
            self.stash.append(body)

    def wait_for_window(self, packet_id: int) -> None:
        spec = self.spec
        if not ahead(packet_id, spec.max_packet_id.value, self.base, spec.window):
            return
        _wire.write_frame_blocking(spec.results_out.fd, _wire.encode_id(Kind.WAIT, packet_id))
        # The consumer answers each WAIT with one byte, written after it
        # published the max_packet_id that lets this packet through.
        while ahead(packet_id, spec.max_packet_id.value, self.base, spec.window):
            if not os.read(spec.go_in.fd, 1):
                os._exit(0)  # the consumer is gone; the main process sees to the rest


def packet_function(fn: Optional[Any], form: int, items: list[Any]) -> tuple[Optional[Any], list[Any]]:
    """``(function, task items)`` of a packet: a map's packet on a queue that
    runs any task (ParallelQueue.imap) carries its function first."""
    if fn is None and form >= STAR:
        return items[0], items[1:]
    return fn, items


def run_items(
    fn: Optional[Callable[..., Any]],
    form: int,
    items: list[Any],
    capture: Callable[[BaseException], Any],
    prog: Any = None,
    p0: int = 0,
    seq: int = 0,
    timed: bool = False,
) -> tuple[list[Any], dict[int, Any], int]:
    """Run a packet's tasks (items of ``form``) in order: ``(values, errors, seq)``.

    A task that raises gets ``capture(exception)`` in ``errors`` at its index
    (SystemExit too: it is that task's error); a TaskError in place of a task
    (it already failed) passes through.  ``prog``: where a process worker
    records, before each task, which one runs (its slot of the shared
    progress array), for crash attribution.  ``timed`` (task_timeout is
    set): also each task's start time and sequence number, for the timeout
    check; otherwise the sequence number is written once per packet (it only
    tells then whether the worker ever started a task), which keeps the cost
    per task at one store.
    """
    if prog is None:
        prog, p0 = [0] * PROGRESS_FIELDS, 0
    if isinstance(fn, TaskError):  # a map's function that could not be pickled or unpickled
        return (*every_slot_fails(len(items), fn), seq)
    at_item = p0 + P_ITEM
    if not timed:
        prog[p0 + P_SEQ] = seq + 1
    values: list[Any] = []
    errors: dict[int, Any] = {}
    for k, item in enumerate(items):
        prog[at_item] = k
        if timed:
            prog[p0 + P_START_NS] = time.monotonic_ns()
            seq += 1
            prog[p0 + P_SEQ] = seq
        if type(item) is TaskError:
            errors[k] = item
            values.append(None)
            continue
        try:
            if form == ONE:
                values.append(fn(item))  # type: ignore[misc]
            elif form == STAR:
                values.append(fn(*item))  # type: ignore[misc]
            elif form == CALL:
                f, args, kwargs = item
                values.append(f(*args, **kwargs) if kwargs else f(*args))
            else:
                args, kwargs = item
                values.append(fn(*args, **kwargs) if kwargs else fn(*args))  # type: ignore[misc]
        except BaseException as e:  # noqa: BLE001 - SystemExit in a task is its error too
            errors[k] = capture(e)
            values.append(None)
    prog[at_item] = len(items)
    if not timed:
        seq += len(items)
        prog[p0 + P_SEQ] = seq
    return values, errors, seq


def capture_error(e: BaseException) -> TaskError:
    """A task's exception as a TaskError, without our own frame on top."""
    # Drop our own frame: the traceback starts in the task.
    if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
        e = e.with_traceback(e.__traceback__.tb_next)
    try:
        return TaskError.from_exception(e)
    except BaseException as f:  # noqa: BLE001 - never lose the slot
        return TaskError(None, type(e).__name__, "<could not describe the exception>", repr(f))
