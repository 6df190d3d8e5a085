"""The executor engine: the same ordered queue on an executor the caller owns.

::

    put() --> pending --> [dispatcher thread] --submit(packet)--> executor: a ThreadPoolExecutor,
                               |  ^                                a ProcessPoolExecutor or a
                               |  |  done callbacks (executor's    distributed.Client
                               |  +---- threads) -> finished ---------+
                               v
                        reorder heap (PacketID) --in order--> LocalSource --> get()

- **dispatcher** (a thread here) takes batches from ``pending`` and submits
  one call per packet, never more than ``window`` packets submitted and not
  yet delivered: an endless producer is held back exactly as with our own
  processes.
- **done callbacks** run in the executor's threads; they only append the
  outcome and wake the dispatcher.
- the dispatcher keeps early packets in a heap keyed by wrap-around
  ``PacketID`` (the seed's reorder buffer) and hands packets to ``get()`` in
  order through ``LocalSource``.

Threads run tasks in this process, so results and exceptions are handed over
as they are.  Process pools and Dask get each packet as one cloudpickled
payload and return one, with the same per-task error isolation as our own
workers.  The queue never shuts the executor down.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import os
import selectors
import time
import traceback
import uuid
from collections import deque
from typing import Any, Callable, Optional

import cloudpickle

from . import _wire
from ._engine import Options
from ._front import Front, TaskBatch
from ._packet_id import PacketID
from ._payload import (
    TaskError,
    dumps_individually,
    dumps_results,
    dumps_tasks,
    every_slot_fails,
    loads_results,
    loads_tasks,
)
from ._sizing import packet_limit, running_mean
from ._threads import helper_thread, sigint_held_back
from ._worker import capture_error, packet_function, run_items

# How much measured work a packet should carry: as for our own workers (see
# _dispatcher), but a submit costs more (a future, a callback, for Dask a
# scheduler round trip), so packets aim a little longer.
TARGET_PACKET_SECONDS = 0.01

_REJECTED = b"parallel_queue:rejected"


class LiveError:
    """A task's exception from a thread: handed over as the very object."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def to_exception(self) -> BaseException:
        exc = self.exc
        if not hasattr(exc, "stack_trace"):
            try:  # 0.5 compatibility, as for process workers
                exc.stack_trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))  # type: ignore[attr-defined]
            except Exception:
                pass
        return exc


def run_packet_local(
    fn: Optional[Callable[..., Any]], form: int, items: list[Any]
) -> tuple[int, list[Any], dict[int, Any]]:
    """In a thread of the executor: run the packet, hand back live objects."""
    fn, items = packet_function(fn, form, items)
    t0 = time.perf_counter_ns()
    values, errors, _ = run_items(fn, form, items, LiveError)
    return time.perf_counter_ns() - t0, values, errors


def run_packet_remote(fn_bytes: Optional[bytes], form: int, payload: bytes, individually: bool) -> tuple[int, bytes]:
    """In another process (a process pool, a Dask worker): pickled in, pickled out."""
    try:
        items = loads_tasks(payload, individually)
    except Exception:
        return 0, _REJECTED  # the dispatcher sends it again, one pickle per task
    fn = cloudpickle.loads(fn_bytes) if fn_bytes is not None else None
    fn, items = packet_function(fn, form, items)
    t0 = time.perf_counter_ns()
    values, errors, _ = run_items(fn, form, items, capture_error)
    ns = time.perf_counter_ns() - t0
    return ns, dumps_results(values, errors, items)


class LocalSource:
    """Delivery's source here: decoded packets, in order, plus a pipe to poll.

    ``taken`` counts the packets get() has picked up: the window is packets
    submitted and not yet taken, so results nobody reads hold the producer
    back (as the consumer's output pipe does for our own processes).
    """

    def __init__(self, on_taken: Callable[[], None], fds: _wire.FdSet) -> None:
        self.fd, self.fd_w = fds.pipe()
        self.packets: deque[tuple[list[Any], dict[int, Any]]] = deque()
        self.eof = False
        self.taken = 0
        self.on_taken = on_taken

    def push(self, packet: tuple[list[Any], dict[int, Any]]) -> None:
        self.packets.append(packet)
        os.write(self.fd_w.fd, b"\0")  # readable: a get() sleeping in poll() wakes

    def read_ready(self) -> list[Any]:
        os.read(self.fd.fd, 65536)  # called only when readable: never blocks
        out = list(self.packets)
        for _ in out:
            self.packets.popleft()
        if out:
            self.taken += len(out)
            self.on_taken()
        return out


def describe_executor(executor: Any) -> tuple[str, int]:
    """("threads" | "processes" | "dask", how many tasks it runs at once)."""
    if type(executor).__module__.split(".")[0] == "distributed":
        try:
            workers = sum(executor.nthreads().values())
        except Exception:
            workers = 0
        return "dask", workers or (os.cpu_count() or 1)
    if not hasattr(executor, "submit"):
        raise TypeError(f"executor must be a concurrent.futures.Executor or a distributed.Client, got {executor!r}")
    workers = getattr(executor, "_max_workers", 0) or (os.cpu_count() or 1)
    kind = "threads" if isinstance(executor, concurrent.futures.ThreadPoolExecutor) else "processes"
    return kind, workers


class _Packet(TaskBatch):
    __slots__ = ("seq", "pid", "individually")

    def __init__(self, seq: int, pid: int, items: list[Any], form: int, map_fn: Optional[Any]) -> None:
        super().__init__(items, form, map_fn)
        self.seq = seq  # submission order (a plain count: Dask keys, the futures map)
        self.pid = pid  # wrap-around id: the reorder heap's key
        self.individually = False


class ExecutorEngine(Front):
    """Runs a queue's tasks on ``executor``; same semantics as the process engine."""

    def __init__(self, opts: Options, task_fn: Optional[Callable[..., Any]], executor: Any) -> None:
        from ._delivery import Delivery

        super().__init__(opts)
        try:
            self.executor = executor
            self.kind, _ = describe_executor(executor)
            self.task_fn = task_fn
            self.fn_bytes = cloudpickle.dumps(task_fn) if task_fn is not None and self.kind != "threads" else None
            self.source = LocalSource(self.window_freed, self.fds)
        except BaseException:
            self.fds.close_all()
            raise
        self.window = opts.consumer_buffer_max
        self.token = uuid.uuid4().hex  # Dask keys: unique, so no two calls are merged
        self.delivery = Delivery(self, self.source)
        self.fds.disown(self.source.fd)  # the delivery's to close (see Delivery.close)
        self.finished: deque[tuple[_Packet, Any, Optional[BaseException]]] = deque()
        self.futures: dict[int, Any] = {}  # seq -> future, submitted and not finished
        self.heap: list[tuple[PacketID, int, Any]] = []
        self.reorder_items = 0
        self.next_pid = PacketID(self.window, 0)
        self.seq = 0
        self.delivered_packets = 0
        self.item_seconds = 0.0
        self.thread = helper_thread(self.run, "parallel_queue-executor-dispatcher")
        try:
            with sigint_held_back():  # a Ctrl-C comes once the thread is recorded (see _threads)
                self.thread.start()
                if opts.progress:
                    self.show_progress()
        except BaseException:
            self.terminate()
            raise

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.wake_r.fd, selectors.EVENT_READ)
        try:
            while not self.given_up():
                self.collect()
                self.submit_more()
                if self.finished_all():
                    return
                with self.lock:
                    # As the process engine's dispatcher (see there and
                    # _front): sleep only where a put() must wake us.  With
                    # a full window, puts need not wake us: a finished call
                    # or get() taking a packet does.
                    if self.finished:
                        continue
                    if self.in_window() and not self.dispatcher_sleeps():
                        continue
                sel.select()
                with self.lock:
                    self.dispatcher_awake()
                os.read(self.wake_r.fd, 4096)
        except BaseException as exc:  # noqa: BLE001 - a dead dispatcher must not hang get()
            from ._errors import QueueBrokenError

            err = QueueBrokenError(f"internal error in the executor dispatcher: {exc!r}")
            err.__cause__ = exc
            self.break_with(err)
        finally:
            sel.close()

    def finished_all(self) -> bool:
        with self.lock:
            stopping = self.tasks_at_stop is not None and not self.takeable()
        return stopping and not self.futures and not self.heap and not self.finished

    def batch_size(self, waiting: int) -> int:
        """(lock held) How many of the ``waiting`` tasks the next packet takes."""
        fixed = self.fixed_batch()
        if fixed:
            return min(fixed, waiting)
        limit = packet_limit(self.opts.max_batch, self.item_seconds, TARGET_PACKET_SECONDS)
        free = max(1, self.window - (self.seq - self.source.taken))
        return max(1, min(limit, waiting, -(-waiting // free)))

    def in_window(self) -> bool:
        return self.seq - self.source.taken < self.window

    def window_freed(self) -> None:
        """get() took packets (in its thread): the dispatcher may submit more."""
        with self.lock:
            if not self.closed:
                self.wake_dispatcher()

    def submit_more(self) -> None:
        while self.in_window():
            with self.lock:
                waiting = self.takeable()
                if not waiting:
                    return
                items, form, map_fn = self.take_tasks(self.batch_size(waiting))
            pkt = _Packet(self.seq, self.next_pid.value, items, form, map_fn)
            self.seq += 1
            self.next_pid = self.next_pid.next()
            self.submit(pkt)

    def submit(self, pkt: _Packet) -> None:
        try:
            if self.kind == "threads":
                fut = self.executor.submit(run_packet_local, self.task_fn, pkt.form, pkt.payload_items())
            else:
                if pkt.individually:
                    payload, ind = dumps_individually(pkt.payload_items()), True
                else:
                    payload, ind = dumps_tasks(pkt.payload_items())
                if self.kind == "dask":
                    fut = self.executor.submit(
                        run_packet_remote,
                        self.fn_bytes,
                        pkt.form,
                        payload,
                        ind,
                        pure=False,
                        key=f"parallel_queue-{self.token}-{pkt.seq}",
                    )
                else:
                    fut = self.executor.submit(run_packet_remote, self.fn_bytes, pkt.form, payload, ind)
        except BaseException as e:  # noqa: BLE001 - a shut-down or broken executor
            self.finished.append((pkt, None, e))
            return
        self.futures[pkt.seq] = fut
        fut.add_done_callback(lambda f, pkt=pkt: self.on_done(pkt, f))

    def on_done(self, pkt: _Packet, fut: Any) -> None:
        """In an executor thread: record the outcome and wake the dispatcher."""
        try:
            outcome, error = fut.result(), None
        except BaseException as e:  # noqa: BLE001 - the whole call failed (lost worker, broken pool)
            outcome, error = None, e
        with self.lock:
            if self.closed:
                return
            self.finished.append((pkt, outcome, error))
            self.wake_dispatcher()

    def collect(self) -> None:
        """Move finished packets into the reorder heap; hand out those in order."""
        while self.finished:
            pkt, outcome, error = self.finished.popleft()
            self.futures.pop(pkt.seq, None)
            if error is not None:
                packet = self.failed_packet(pkt, error)
            elif self.kind == "threads":
                ns, values, errors = outcome
                self.measure(ns, len(pkt.items))
                packet = (values, errors)
            else:
                ns, payload = outcome
                if payload == _REJECTED and not pkt.individually:
                    pkt.individually = True
                    self.submit(pkt)
                    continue
                self.measure(ns, len(pkt.items))
                try:
                    packet = loads_results(payload)
                except Exception as e:
                    packet = self.failed_packet(pkt, e)
            heapq.heappush(self.heap, (PacketID(self.window, pkt.pid), pkt.seq, packet))
            self.reorder_items += len(pkt.items)
        expected = PacketID(self.window, self.delivered_packets)
        while self.heap and self.heap[0][0] == expected:
            _, seq, packet = heapq.heappop(self.heap)
            self.reorder_items -= len(packet[0])
            with self.lock:
                if self.closed:
                    return
                self.source.push(packet)
            self.delivered_packets += 1
            expected = expected.next()

    def failed_packet(self, pkt: _Packet, error: BaseException) -> tuple[list[Any], dict[int, Any]]:
        """The call itself failed (a lost Dask worker, a broken pool): every task
        of the packet gets that error in its slot."""
        if self.kind == "threads":
            return every_slot_fails(len(pkt.items), LiveError(error))
        err = TaskError.from_exception(error) if error.__traceback__ else TaskError.from_message(error)
        return every_slot_fails(len(pkt.items), err)

    def measure(self, ns: int, n: int) -> None:
        if n and ns:
            self.item_seconds = running_mean(self.item_seconds, ns / n / 1e9)

    # ----------------------------------------------------------- lifecycle

    def kill_processes(self) -> None:
        """Stop waiting for submitted calls (the executor is the caller's: not shut down)."""
        for fut in list(self.futures.values()):
            fut.cancel()

    def terminate(self) -> None:
        if self.begin_terminate():
            self.end_dispatcher_then_kill(self.thread)
            self.close()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until every task put before stop() is done and handed over."""
        self.check_owner()
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        self.delivery.pump()
        self.close()
        return True

    def close(self) -> None:
        if self.progress_bar is not None:
            self.progress_bar.close()
        self.delivery.pump()  # keep what is in the pipe's queue for get()
        self.delivery.close()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.fds.close_all()
            self.getters.close()
            self.putters.close()

    def is_alive(self) -> bool:
        self.check_owner()
        return self.thread.is_alive()

    def workers_alive(self) -> int:
        return describe_executor(self.executor)[1] if self.thread.is_alive() else 0

    def reorder_counts(self) -> tuple[int, int]:
        return len(self.heap), self.reorder_items
