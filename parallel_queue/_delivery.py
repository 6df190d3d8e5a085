"""Delivery: ``get()``, results handed out in put order, markers in their places.

Results arrive as whole packets, already in order (see ``_receiver``).  A
packet is decoded when ``get()`` reaches it and split into *steps*: runs of
plain values, and each task's error in its place.  A run goes into
``ready``, a deque that ``get()``'s fast path pops without a lock
(``popleft`` is atomic): the common case costs one C call.  Everything else
happens under ``lock`` once ``ready`` is empty: a marker is handed back (the
very object that was put) once the tasks put before it have come out, an
error is raised in its turn, the next run is moved into ``ready``.  A run is
cut at the next marker's position, so ``ready`` never holds a value that
must wait for a marker (a marker put later comes after every task already in
a packet).

Nothing here waits on a timer: a blocked ``get()`` sleeps in ``poll()`` on
the output pipe and its bell (see _receiver and _wakeups), which
``put(marker)``, ``stop()``, a breaking queue and a reader of the pipe ring.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Optional, Protocol

from . import _threads
from ._errors import QueueBrokenError, QueueStopped, consumer_died
from ._intake import Intake
from ._lifecycle import Lifecycle
from ._receiver import Receiver
from ._stats import LatencySampler
from ._wakeups import Wakeups

__all__ = ["Delivery", "Parts", "split_results"]


class Parts(Protocol):
    """What the delivery asks of the rest of the queue (``_core.Core`` is it)."""

    lock: Any  # the queue's lock (the delivery's own comes first, when both are held)
    lifecycle: Lifecycle
    intake: Intake  # markers, the map's lease
    wakeups: Wakeups
    latency: LatencySampler

    def fail_locked(self, error: BaseException) -> None:
        """(lock held) The queue cannot go on (its consumer died)."""

    def reclaim_map(self) -> bool:
        """(no lock held) Hand the queue back from a map whose iterator was
        collected; True if no map holds the queue."""


class Delivery:
    """The get() side.  Locking (each rule prevents a hang):

    - ``lock`` is only ever taken with ``with`` and never held while waiting:
      a Ctrl-C arriving just after a bare ``acquire()`` returns would leave
      it held (CPython runs signal handlers when a call returns), and the
      ``terminate()`` that follows would wait for it forever.
    - It comes before the queue's lock when both are held.
    - One getter thread at a time waits in ``poll()``; other blocking
      getters wait for their turn (see _receiver).  Waiting for a turn is
      never Condition.wait() under ``with lock``, which a Ctrl-C can break:
      see _threads.Waiters.
    """

    def __init__(self, parts: Parts, reader: Any) -> None:
        """``reader``: where packets come from, in order (see Receiver);
        ``parts``: the queue's other parts that it asks (see _core)."""
        self.parts = parts
        # The intake's markers, read here without the queue's lock: put()s
        # only append, and only get() takes (Intake.take_marker, under this
        # lock too), so the head seen here stays until this lock says.
        self.markers = parts.intake.markers
        self.lock = threading.Lock()
        self.receiver = Receiver(reader, self.lock, parts.lock, parts.wakeups.getters)
        # Decoded, in order: runs of plain values (lists) and task errors
        # (TaskErrors, or the executor engine's LiveErrors: anything else).
        self.steps: deque[Any] = deque()
        # Plain values get() may hand out as they are, lock-free.
        self.ready: deque[Any] = deque()
        self.moved = 0  # task results moved into ``ready``, raised or dropped
        # Results to drop as they come: those of a closed map's tasks.
        self.discard = 0
        self.errors_raised = 0
        self.latency = parts.latency

    @property
    def delivered(self) -> int:
        """Task results handed out so far (values and errors)."""
        with self.lock:  # ``moved`` and ``ready`` change together under it
            return self.moved - len(self.ready)

    @property
    def closed(self) -> bool:
        return self.receiver.closed

    # ----------------------------------------------------------------- get

    def get(self, block: bool, timeout: Optional[float]) -> Any:
        """get()'s slow path: ``ready`` was empty."""
        self.parts.lifecycle.check_owner()
        deadline = _deadline(block, timeout)
        if self.parts.intake.lease is not None and not self.parts.reclaim_map():
            raise RuntimeError("get() on a queue while its imap() runs (finish or close the map first)")
        while True:
            with self.lock:
                found = self.next_in_hand(block, deadline)
                if found == VALUE:
                    try:
                        return self.ready.popleft()
                    except IndexError:  # a lock-free get() took it first
                        continue
                if found == MARKER:
                    return self.take_marker()
                if found == ERROR:
                    raise self.take_error()
                waiter = self.receiver.turns.add() if found == TURN else None
            self.wait_outside(waiter, block, deadline)

    def take_batch_into(self, dest: deque[Any], block: bool, timeout: Optional[float]) -> None:
        """Move every task result in hand, at least one packet's, onto
        ``dest`` as steps: runs of plain values (lists) and each task's error
        in its place (see split_results).

        For queues without markers whose only reader this is (``imap``): it
        hands out whole packets, so a caller pays per packet what ``get()``
        pays per result.  Moved rather than returned, so that a Ctrl-C
        landing as this returns loses nothing (see move_steps_into).
        """
        self.parts.lifecycle.check_owner()
        deadline = _deadline(block, timeout)
        while True:
            with self.lock:
                if self.markers:
                    raise TypeError("a map on a queue with markers")
                while True:
                    if self.discard:
                        self.drop_discarded()
                    if self.ready or self.steps:
                        self.move_steps_into(dest)
                        return
                    found = self.look_for_more(block, deadline)
                    if found != MORE:
                        break
                waiter = self.receiver.turns.add() if found == TURN else None
            self.wait_outside(waiter, block, deadline)

    def look_for_more(self, block: bool, deadline: Optional[float]) -> Optional[str]:
        """(lock held, nothing in hand) MORE if a packet is now in hand, TURN if
        another thread polls (``queue.Empty`` at once if this one may not
        wait), None if this thread should poll."""
        receiver = self.receiver
        if self.take_packet():
            return MORE
        if block and receiver.poller_elsewhere():
            # A blocking getter waits for the poller's turn (outside the
            # lock) instead of polling too: one thread in poll() at a time.
            _remaining(block, deadline)
            return TURN
        if receiver.read_available():
            return MORE
        return None

    def wait_outside(self, waiter: Any, block: bool, deadline: Optional[float]) -> None:
        """(lock not held) Wait for the poller's turn (``waiter``), or poll for
        more (no waiter).  Either way the caller then looks again, and
        raises ``queue.Empty`` there if time is up.  A non-blocking get()
        found nothing: ``QueueStopped`` if nothing will ever come, else
        ``queue.Empty``."""
        if not block:
            with self.lock, self.parts.lock:
                self.raise_if_finished()
            raise queue.Empty
        if waiter is None:
            self.receiver.wait_for_more(_remaining(block, deadline), self.may_sleep)
        else:
            self.receiver.turns.sleep(waiter, _remaining(block, deadline))

    def may_sleep(self) -> bool:
        """(both locks held; the poller, listening) Whether to wait for more:
        False if something came in meanwhile; raises if nothing ever will."""
        if self.ready or self.steps or (self.markers and self.markers[0][0] == self.moved):
            return False
        self.raise_if_finished()
        return True

    def move_steps_into(self, dest: deque[Any]) -> None:
        """(lock held, something in hand) Move what ``ready`` and ``steps``
        hold onto ``dest``, counted as delivered.  Run whole, idempotent, as
        take_packet's hand-over is, so that a Ctrl-C loses nothing: ``steps``
        is cleared last, and only while it still holds this batch."""
        ready, steps = self.ready, self.steps
        # (``ready`` is empty under a map, the only caller: a map begins on an
        # idle queue, and get() refuses to run while it does.)
        batch: list[Any] = []
        while ready:
            batch.append(ready.popleft())
        counted = len(batch)  # what was in ``ready`` is in ``moved`` already
        if batch:
            steps.appendleft(batch)
        if not steps:
            return
        n = sum(len(step) if type(step) is list else 1 for step in steps) - counted
        batch = [iter(step) if type(step) is list else step for step in steps]  # (the map's runs: see _maps)
        first = self.moved

        def hand_over() -> None:
            if not steps:
                return  # (a run cut short after its last step)
            if not (dest and dest[-1] is batch[-1]):
                dest.extend(batch)
            self.moved = first + n
            self.latency.got_range(first, n)
            steps.clear()

        _threads.run_whole(hand_over)

    def next_in_hand(self, block: bool, deadline: Optional[float]) -> Optional[str]:
        """(lock held) VALUE if ``ready`` holds one, MARKER if a marker is due,
        ERROR if a task's error is next, None if this thread should poll for
        more, TURN if another thread polls (wait for its turn; ``queue.Empty``
        at once if it may not wait)."""
        markers = self.markers
        while True:
            if self.discard:
                self.drop_discarded()
            if self.ready:
                return VALUE
            if markers and markers[0][0] == self.moved:
                return MARKER
            if self.steps:
                if type(self.steps[0]) is not list:
                    return ERROR
                self.move_run()
                continue
            found = self.look_for_more(block, deadline)
            if found != MORE:
                return found

    def drop_discarded(self) -> None:
        """(lock held) Drop what is in hand of the results to discard."""
        while self.discard:
            if not self.steps:
                if not self.take_packet():
                    return
                continue
            step = self.steps[0]
            if type(step) is list and len(step) > self.discard:
                k = self.discard
                self.steps[0] = step[k:]
            else:
                k = len(step) if type(step) is list else 1
                self.steps.popleft()
            self.moved += k
            self.discard -= k

    def move_run(self) -> None:
        """(lock held, ``ready`` empty) Move the next run of values into ``ready``,
        up to the next marker's position.  Run whole and idempotent, as
        take_packet's hand-over is: ``steps`` gives the run up only while
        the run is first in it, and ``ready`` takes it from an iterator,
        which a second extend finds used up."""
        steps, ready = self.steps, self.ready
        run = steps[0]
        markers = self.markers
        first = self.moved
        limit = markers[0][0] - first if markers else len(run)
        head, rest = (run[:limit], run[limit:]) if limit < len(run) else (run, None)
        values = iter(head)

        def hand_over() -> None:
            if steps and steps[0] is run:
                if rest is None:
                    steps.popleft()
                else:
                    steps[0] = rest
            self.latency.got_range(first, len(head))
            # ``moved`` first: a lock-free get() may take from ``ready`` at once.
            self.moved = first + len(head)
            ready.extend(values)

        _threads.run_whole(hand_over)

    def take_packet(self) -> bool:
        """(lock held) The next packet read, decoded and split into steps
        (see split_results); False if none was read.

        The hand-over from the receiver is run whole (see _threads.run_whole),
        for a program that catches a Ctrl-C and goes on getting from the
        queue.  A press can land at any call: had it landed between the
        receiver dropping the packet and the steps taking it, the packet was
        lost; between the steps taking it and the receiver dropping it, it
        would come out twice.  So the hand-over is idempotent (the steps
        take the packet unless their last step is its last; the receiver
        drops it only while it is first) and repeated until one run of it
        was not cut short."""
        peeked = self.receiver.peek()
        if peeked is None:
            return False
        body, packet, decoded = peeked
        # (no results: a frame whose results all came before its worker died, see Receiver.decode)
        new = split_results(*packet) if packet[0] else []
        steps, receiver = self.steps, self.receiver

        def hand_over() -> None:
            if new and not (steps and steps[-1] is new[-1]):  # (steps are fresh objects: ``is`` tells)
                steps.extend(new)
            receiver.taken(body, decoded)

        _threads.run_whole(hand_over)
        return True

    def take_marker(self) -> Any:
        """(lock held) The marker that is due: the very object that was put."""
        with self.parts.lock:
            return self.parts.intake.take_marker()

    def left_behind_by_fork(self) -> None:
        """(in a forked child, no lock: see Core.left_behind_by_fork) Shut the
        lock-free path of get(): values copied from the parent are not the
        child's to take."""
        self.ready.clear()

    def count_error(self) -> None:
        """A map's iterator raised a task's error it took in a batch."""
        with self.lock:
            self.errors_raised += 1

    def take_error(self) -> BaseException:
        """(lock held) The task error that is next, counted as delivered."""
        err = self.steps.popleft()
        self.latency.got_range(self.moved, 1)
        self.moved += 1
        self.errors_raised += 1
        return err.to_exception()  # type: ignore[no-any-return]  # (unnamed: see TaskError.to_exception)

    def raise_if_finished(self) -> None:
        """(both locks held) Nothing in hand and nothing in the pipe: raise if
        nothing ever will be."""
        core = self.parts
        delivered = self.moved - len(self.ready)
        end = core.lifecycle.end_of_results(delivered)
        if end is not None:
            raise end
        lease = core.intake.lease
        if lease is not None and lease.end is not None and delivered >= lease.end:
            raise QueueStopped("the map's every result was delivered")
        if self.receiver.cut:
            err = QueueBrokenError(
                "a Ctrl-C landed while results were read from the consumer's pipe, and what was being"
                " read is lost: the results after it cannot be trusted (end the queue: terminate())"
            )
            core.fail_locked(err)
            raise err
        if self.receiver.eof:
            ctx = getattr(getattr(core, "opts", None), "ctx", None)
            method = ctx.get_start_method() if ctx is not None else "fork"
            err = consumer_died("; results still in flight are lost", method, self.receiver.decoded > 0)
            core.fail_locked(err)
            raise err
        if self.receiver.closed:  # (an executor engine's join() closes it once all is handed over)
            raise QueueStopped("the queue was closed")

    # ------------------------------------------------------------------ maps

    def idle(self, tasks_put: int) -> bool:
        """(both locks held) Every result of the ``tasks_put`` tasks was taken,
        and nothing is in hand (a map may take the queue over).  ``steps``
        may still hold results to discard (a drop cut short by Ctrl-C): every
        result not moved is one of them then, and the next getter drops
        them before it looks at its own."""
        return self.moved + self.discard == tasks_put and not self.ready

    def discard_up_to(self, tasks: int) -> None:
        """(both locks held) The results of the first ``tasks`` tasks that were
        not taken yet are dropped as they come (those of a closed map)."""
        self.discard += tasks - (self.moved + self.discard)

    # ------------------------------------------------------------ the end

    def pump(self) -> bool:
        """Move what the output pipe holds into memory (see Receiver.pump)."""
        return self.receiver.pump()

    def close(self) -> None:
        """No more reading (see Receiver.close).  After terminate(), the
        packets read and not taken are dropped: nothing will take them."""
        with self.lock:
            if self.parts.lifecycle.terminated:
                self.receiver.bodies.clear()
            self.receiver.close()


MARKER = "marker"
VALUE = "value"
ERROR = "error"
TURN = "turn"
MORE = "more"


def split_results(values: list[Any], errors: dict[int, Any]) -> list[Any]:
    """A packet's ``(values, errors)`` as steps, in order: runs of plain values
    (lists), and each task's error (anything but a list) in its place."""
    if not errors:
        return [values]
    steps: list[Any] = []
    start = 0
    for k in sorted(errors):
        if k > start:
            steps.append(values[start:k])
        steps.append(errors[k])
        start = k + 1
    if start < len(values):
        steps.append(values[start:])
    return steps


def _deadline(block: bool, timeout: Optional[float]) -> Optional[float]:
    until = _threads.deadline(timeout)  # checks ``timeout`` even when not blocking
    return until if block else None


def _remaining(block: bool, deadline: Optional[float]) -> Optional[float]:
    """Seconds left to wait; ``queue.Empty`` if none."""
    if not block:
        raise queue.Empty
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise queue.Empty
    return remaining
