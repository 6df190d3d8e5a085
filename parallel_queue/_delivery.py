"""Delivery: ``get()`` and ``join()`` on the main-process end of the output pipe.

Results arrive as whole packets, already in order.  ``get()`` unpickles one
packet at a time and hands out its values one by one; an error in a slot is
raised in its turn; a marker is handed back (the very object that was put)
once the tasks put before it have come out.  Nothing here waits on a timer:
a blocked ``get()`` sleeps in ``poll()`` on the output pipe and a wake-up
pipe that ``put(marker)``, ``stop()`` and a breaking queue write to.
"""

from __future__ import annotations

import pickle
import queue
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from . import _wire
from ._errors import QueueBrokenError, QueueStopped, fresh_copy
from ._payload import TaskError, loads_results

if TYPE_CHECKING:
    from ._front import Front as Engine

_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


class Delivery:
    def __init__(self, engine: Engine, reader: Any) -> None:
        """``reader``: where packets come from, in order.  A ``FrameReader``
        on the consumer's output pipe, or the executor engine's local
        source; either has ``fd`` (to poll), ``read_ready()`` and ``eof``."""
        self.e = engine
        self.markers = engine.markers
        self.reader = reader
        self.bodies: deque[bytes] = deque()  # packets read but not yet unpickled
        self.values: list[Any] = []
        self.errors: dict[int, TaskError] = {}
        self.pos = 0
        self.delivered = 0  # tasks handed out by get()
        self.errors_raised = 0
        self.markers_delivered = 0
        self.latency = engine.latency
        self.lock = threading.Lock()  # one get() at a time
        self.closed = False

    # ----------------------------------------------------------------- get

    def get(self, block: bool, timeout: Optional[float]) -> Any:
        deadline = self.acquire(block, timeout)
        try:
            if self.next_in_hand(block, deadline):
                return self.take_marker()
            return self.take_value()
        finally:
            self.lock.release()

    def get_batch(self, block: bool, timeout: Optional[float]) -> tuple[list[Any], dict[int, TaskError]]:
        """Every task result in hand (at least one): ``(values, errors)``.

        ``errors`` maps an index of ``values`` to its error; those values are
        None.  For queues without markers (``imap``): it hands out whole
        packets, so a caller pays per packet what ``get()`` pays per result.
        """
        deadline = self.acquire(block, timeout)
        try:
            if self.next_in_hand(block, deadline):
                raise TypeError("get_batch() on a queue with markers")
            start, end = self.pos, len(self.values)
            values = self.values[start:end] if start else self.values
            errors = self.errors
            if start and errors:
                errors = {k - start: v for k, v in errors.items() if k >= start}
            self.values, self.errors, self.pos = [], {}, 0
            with self.e.lock:
                self.latency.got_range(self.delivered, end - start)
            self.delivered += end - start
            return values, errors
        finally:
            self.lock.release()

    def acquire(self, block: bool, timeout: Optional[float]) -> Optional[float]:
        """Take the get() lock (``queue.Empty`` if not in time); returns the deadline."""
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        deadline = None if not block or timeout is None else time.monotonic() + timeout
        if not self.lock.acquire(block, -1 if deadline is None else max(0.0, timeout or 0.0)):
            raise queue.Empty
        return deadline

    def next_in_hand(self, block: bool, deadline: Optional[float]) -> bool:
        """Wait (lock held) until a marker is due (True) or a result is in hand (False).

        Raises ``queue.Empty`` when ``deadline`` passes, ``QueueStopped`` or
        ``QueueBrokenError`` when nothing will ever come.
        """
        e = self.e
        markers = e.markers
        while True:
            if markers and markers[0][0] == self.delivered:
                return True
            if self.pos < len(self.values):
                return False
            if self.bodies:
                self.decode(self.bodies.popleft())
                continue
            if self.read_available():
                continue
            with e.lock:
                if markers and markers[0][0] == self.delivered:
                    continue
                self.raise_if_finished()
                e.getter_waiting = True
            try:
                if not block:
                    raise queue.Empty
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self.wait(remaining)
            finally:
                with e.lock:
                    e.getter_waiting = False

    def take_marker(self) -> Any:
        e = self.e
        with e.lock:
            marker = e.markers.popleft()[1]
            self.markers_delivered += 1
            if len(e.markers) + 1 >= e.opts.in_q_max:
                e.room_freed()
        return marker

    def take_value(self) -> Any:
        k = self.pos
        self.pos += 1
        with self.e.lock:
            self.latency.got_range(self.delivered, 1)
        self.delivered += 1
        value = self.values[k]
        self.values[k] = None  # do not keep results alive after handing them out
        if self.errors:
            err = self.errors.pop(k, None)
            if err is not None:
                self.errors_raised += 1
                raise err.to_exception()
        return value

    def raise_if_finished(self) -> None:
        """Nothing in hand and nothing in the pipe: raise if nothing ever will be (lock held)."""
        e = self.e
        stop_at = e.tasks_at_stop
        if e.broken is not None:
            raise fresh_copy(e.broken)
        if stop_at is not None and self.delivered >= stop_at:
            raise QueueStopped("the queue was stopped and every result was delivered")
        if e.terminated:
            raise QueueStopped("the queue was terminated")
        if self.reader.eof:
            err = QueueBrokenError("the consumer process died; results still in flight are lost")
            e.broken = err
            e.accepting = False
            raise err

    def decode(self, body: Any) -> None:
        from ._wire import RESULT, decode_result

        if type(body) is tuple:  # from the executor engine: already (values, errors)
            self.values, self.errors, self.pos = body[0], body[1], 0
            return
        count = decode_result(body).n_items
        try:
            values, errors = loads_results(memoryview(body)[RESULT.size :])
        except Exception as exc:
            values = [None] * count
            errors = {
                k: TaskError.for_failure(exc, "could not unpickle the result", pickle.UnpicklingError)
                for k in range(count)
            }
        self.values, self.errors, self.pos = values, errors, 0

    # --------------------------------------------------------------- reading

    def read_available(self) -> bool:
        """Read what the output pipe holds now, without waiting; True if a packet came."""
        if self.closed or self.reader.eof or not _wire.readable(self.reader.fd.fd, 0):
            return False
        got = self.reader.read_ready()
        self.bodies.extend(got)
        return bool(got) or self.reader.eof

    def wait(self, timeout: Optional[float]) -> None:
        p = select.poll()
        p.register(self.reader.fd.fd, _POLL_IN)
        p.register(self.e.get_wake_r.fd, _POLL_IN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        for fd, _ in p.poll(ms):
            if fd == self.e.get_wake_r.fd:
                _drain_wake(fd)

    def pump(self, block: bool = False) -> bool:
        """Move what the output pipe holds into memory; False once at end-of-file.

        join() does this so the consumer can finish even when nobody is
        calling get().  A get() in progress reads the pipe itself.
        """
        if self.lock.acquire(blocking=block):
            try:
                while self.read_available():
                    pass
            finally:
                self.lock.release()
        return not (self.closed or self.reader.eof)

    def close(self) -> None:
        # Under the get() lock: a get() waiting in poll() is woken first (by
        # whoever closes us) and must not be left polling closed descriptors.
        with self.lock:
            if not self.closed:
                self.closed = True
                _wire.close_fd(self.reader.fd)


def _drain_wake(fd: int) -> None:
    import os

    try:
        os.read(fd, 4096)
    except OSError:
        pass
