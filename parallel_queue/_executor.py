"""The executor engine: the same ordered queue on an executor the caller owns.

::

    put() --> intake --> [dispatcher thread] --submit(packet)--> executor (a backend:
                               |  ^                              threads, a process pool,
                               |  |  done callbacks (in the      a Dask cluster; _backends)
                               |  +---- executor's threads) <---------+
                               v
                        reorder buffer --in order--> LocalSource --> delivery --> get()

- **dispatcher** (a thread here) takes batches from the intake and submits
  one call per packet, never more than ``window`` packets submitted and not
  yet taken by ``get()``: an endless producer is held back exactly as with
  our own processes.
- **done callbacks** run in the executor's threads; they only append the
  outcome and ring the dispatcher's doorbell.
- the dispatcher keeps packets that finish early in the reorder buffer
  (``_reorder``) and hands them to the delivery in order through
  ``LocalSource``.

Everything but the calls runs in the main process; the queue never shuts the
executor down.
"""

from __future__ import annotations

import os
import selectors
from collections import deque
from typing import Any, Callable, Optional

from . import _wire
from ._backends import Backend, Outcome
from ._core import Core
from ._delivery import Delivery
from ._errors import QueueBrokenError
from ._intake import TaskBatch
from ._reorder import ReorderBuffer
from ._sizing import packet_limit, running_mean
from ._threads import helper_thread, sigint_held_back

__all__ = ["ExecutorEngine", "LocalSource"]

# How much measured work a packet should carry: as for our own workers (see
# _scheduler), but a submit costs more (a future, a callback, for Dask a
# scheduler round trip), so packets aim a little longer.
TARGET_PACKET_SECONDS = 0.01


class LocalSource:
    """The delivery's source here: decoded packets, in order, plus a pipe to poll.

    ``taken`` counts the packets get() has picked up: the window is packets
    submitted and not yet taken, so results nobody reads hold the producer
    back (as the consumer's output pipe does for our own processes).
    """

    def __init__(self, on_taken: Callable[[], None], fds: _wire.FdSet) -> None:
        self.fd, self.fd_w = fds.pipe()
        # Written under the queue's lock: never block there.  A pipe too full
        # to take the byte is readable already, which is all a byte is for.
        os.set_blocking(self.fd_w.fd, False)
        self.packets: deque[Outcome] = deque()
        self.eof = False
        self.taken = 0
        self.on_taken = on_taken

    def push(self, packet: Outcome) -> None:
        self.packets.append(packet)
        try:
            os.write(self.fd_w.fd, b"\0")  # readable: a get() sleeping in poll() wakes
        except BlockingIOError:
            pass  # full, so readable

    def read_ready(self) -> list[Any]:
        os.read(self.fd.fd, 65536)  # called only when readable: never blocks
        out = list(self.packets)
        for _ in out:
            self.packets.popleft()
        if out:
            self.taken += len(out)
            self.on_taken()
        return out

    def give_back(self, body: Any) -> None:
        """(packets here are not read into buffers: nothing to take back)"""


class _Packet(TaskBatch):
    __slots__ = ("seq", "first", "careful")

    def __init__(self, seq: int, first: int, batch: TaskBatch) -> None:
        super().__init__(batch.items, batch.form, batch.map_fn)
        self.seq = seq  # submission order: the reorder buffer's id (it wraps there)
        self.first = first  # its first task's index (for errors that name it)
        self.careful = False  # sent one pickle per task (it would not unpickle whole)


class ExecutorEngine:
    """Runs a queue's tasks on an executor, through ``backend``."""

    def __init__(self, core: Core, backend: Backend) -> None:
        self.core = core
        self.backend = backend
        self.intake = core.intake
        self.lifecycle = core.lifecycle
        self.packets_max = core.opts.consumer_buffer_max  # submitted and not yet taken by get()
        self.fds = _wire.FdSet()
        self.finished: deque[tuple[_Packet, Any, Optional[BaseException]]] = deque()
        self.futures: dict[int, Any] = {}  # seq -> future, submitted and not finished
        self.buffer: ReorderBuffer[Outcome] = ReorderBuffer(self.packets_max)
        self.seq = 0
        self.item_seconds = 0.0
        self.thread = helper_thread(self.run, "parallel_queue-executor-dispatcher")
        core.engine = self
        try:
            self.source = LocalSource(self.window_freed, self.fds)
            core.delivery = Delivery(core, self.source)
            self.fds.disown(self.source.fd)  # the delivery's to close (see Delivery.close)
            with sigint_held_back():  # a Ctrl-C comes once the thread is recorded (see _threads)
                self.thread.start()
                core.running()
                if core.opts.progress:
                    core.show_progress(core.opts.progress)
        except BaseException:
            if self.thread.ident is not None:
                core.terminate()
            else:
                core.close_unstarted()
            raise

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        core = self.core
        doorbell = core.wakeups.dispatcher
        sel = selectors.DefaultSelector()
        sel.register(doorbell.fileno(), selectors.EVENT_READ)
        try:
            while True:
                with core.lock:
                    if self.lifecycle.gone:
                        return
                self.collect()
                self.submit_more()
                if self.finished_all():
                    return
                with core.lock:
                    # As the process engine's dispatcher (see there and
                    # _intake): sleep only where a put() must wake us.  With
                    # a full window, puts need not wake us: a finished call
                    # or get() taking a packet does.
                    if self.finished:
                        continue
                    if self.in_window() and not self.intake.may_dispatcher_sleep():
                        continue
                sel.select()
                with core.lock:
                    self.intake.dispatcher_awake()
                doorbell.clear()
        except BaseException as exc:  # noqa: BLE001 - a dead dispatcher must not hang get()
            err = QueueBrokenError(f"internal error in the executor dispatcher: {exc!r}")
            err.__cause__ = exc
            core.fail(err)
        finally:
            sel.close()
            if self.lifecycle.gone:
                self.cancel_calls()

    def finished_all(self) -> bool:
        with self.core.lock:
            stopping = self.lifecycle.stopped_at is not None and not self.intake.takeable()
        return stopping and not self.futures and not len(self.buffer) and not self.finished

    def batch_size(self, waiting: int) -> int:
        """(lock held) How many of the ``waiting`` tasks the next packet takes."""
        fixed = self.intake.fixed_batch()
        if fixed:
            return min(fixed, waiting)
        limit = packet_limit(self.core.opts.max_batch, self.item_seconds, TARGET_PACKET_SECONDS)
        free = max(1, self.packets_max - (self.seq - self.source.taken))
        return max(1, min(limit, waiting, -(-waiting // free)))

    def in_window(self) -> bool:
        return self.seq - self.source.taken < self.packets_max

    def window_freed(self) -> None:
        """get() took packets (in its thread): the dispatcher may submit more."""
        with self.core.lock:
            self.core.wakeups.dispatcher.ring()

    def submit_more(self) -> None:
        while self.in_window():
            with self.core.lock:
                waiting = self.intake.takeable()
                if not waiting:
                    return
                first = self.intake.dispatched
                batch = self.intake.take_tasks(self.batch_size(waiting))
            pkt = _Packet(self.seq, first, batch)
            self.seq += 1
            self.submit(pkt)

    def submit(self, pkt: _Packet) -> None:
        try:
            fut = self.backend.submit(pkt, pkt.careful, pkt.seq, pkt.first)
        except BaseException as e:  # noqa: BLE001 - a shut-down or broken executor
            self.finished.append((pkt, None, e))
            return
        self.futures[pkt.seq] = fut
        fut.add_done_callback(lambda f, pkt=pkt: self.on_done(pkt, f))

    def on_done(self, pkt: _Packet, fut: Any) -> None:
        """In an executor thread: record the outcome and wake the dispatcher."""
        try:
            returned, error = fut.result(), None
        except BaseException as e:  # noqa: BLE001 - the whole call failed (lost worker, broken pool)
            returned, error = None, e
        with self.core.lock:
            if self.lifecycle.closed:
                return
            self.finished.append((pkt, returned, error))
            self.core.wakeups.dispatcher.ring()

    def collect(self) -> None:
        """Move finished packets into the reorder buffer; hand out those in order."""
        while self.finished:
            pkt, returned, error = self.finished.popleft()
            self.futures.pop(pkt.seq, None)
            if error is not None:
                outcome = self.backend.failed(pkt, error)
            else:
                ns, result = self.backend.outcome(pkt, pkt.first, returned)
                if result is None and not pkt.careful:  # it would not unpickle as a whole there
                    pkt.careful = True
                    self.submit(pkt)
                    continue
                if pkt.items and ns:
                    self.item_seconds = running_mean(self.item_seconds, ns / len(pkt.items) / 1e9)
                outcome = result if result is not None else self.backend.failed(pkt, RuntimeError("rejected twice"))
            self.buffer.add(pkt.seq, len(pkt.items), outcome)
        for outcome in self.buffer.pop_ready():
            with self.core.lock:
                if self.lifecycle.closed:
                    return
                self.source.push(outcome)

    def cancel_calls(self) -> None:
        """Stop waiting for submitted calls (the executor is the caller's: not shut down)."""
        for fut in list(self.futures.values()):
            fut.cancel()

    # ---------------------------------------------------------- the Engine

    def wind_down(self) -> None:
        if self.thread.ident is not None:
            self.thread.join()
        self.cancel_calls()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until every task put before stop() is done and handed over."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        self.core.delivery.pump()  # keep what the source holds for get()
        return True

    def close(self) -> None:
        """(lock held) Release every descriptor."""
        self.fds.close_all()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def workers_alive(self) -> int:
        return self.backend.workers if self.thread.is_alive() else 0

    def workers_replaced(self) -> int:
        return 0

    def reorder_counts(self) -> tuple[int, int]:
        return len(self.buffer), self.buffer.items

    def left_behind_by_fork(self) -> None:
        pass  # no process of ours to forget
