"""The main-process end of the output pipe: packets read, decoded, waited for.

Packets arrive whole and in order (the consumer, or the executor engine's
``LocalSource``, writes them).  The receiver reads what the pipe holds
without blocking, keeps the bodies until ``get()`` reaches them, and decodes
each once (``decode``: a value that will not unpickle here fails in its own
slot).  When nothing is in hand, one getter thread at a time waits in
``poll()`` on the pipe and its bell (the *poller*); other blocking getters
wait for their turn (``turns``).  A non-blocking reader (``aget``) reads the
pipe itself, and rings everyone listening when it found something.

Every method runs with the delivery's lock held, which the receiver shares
(see _delivery), unless it says otherwise.

The output pipe is closed by ``close()`` only if nobody watches it (the
``poller``, and the ``watchers``: coroutines, ``join()``); otherwise by the
last of them to leave.  Closing a descriptor that a ``poll()`` or an event loop still
watches would let its number be reused under their feet.
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections import deque
from typing import Any, Callable, Optional

from . import _wire
from ._payload import TaskError, loads_results_careful
from ._salvage import load_results
from ._threads import Waiters, run_whole, sigint_deferred
from ._wakeups import Bell, Bells
from ._wire import ResultHeader, decode_result, split_result

__all__ = ["Receiver"]

_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


class Receiver:
    """Reads, decodes and waits for packets (see the module docstring)."""

    def __init__(self, reader: Any, lock: Any, queue_lock: Any, getters: Bells) -> None:
        """``reader``: a ``FrameReader`` on the consumer's output pipe, or the
        executor engine's local source; either has ``fd`` (to poll),
        ``read_ready()`` and ``eof``.  ``lock``: the delivery's;
        ``queue_lock`` and ``getters``: the queue's lock and getters' bells."""
        self.reader = reader
        self.lock = lock
        self.queue_lock = queue_lock
        self.getters = getters
        self.bodies: deque[Any] = deque()  # packets read but not yet decoded
        self.decoded = 0  # task results decoded (the next packet's first task)
        self.turns = Waiters(lock)  # getters waiting for the poller to finish
        self.poller: Optional[int] = None  # the thread waiting in poll(), if any
        self.bell = Bell()  # the poller's (one poller at a time)
        self.watchers = 0  # threads and coroutines watching the output pipe now
        self.closed = False
        self.cut = False  # a Ctrl-C cut a read short: what follows cannot be trusted (read_available)
        # Each slot's results ring (see _region), if the engine has them; and
        # the first packet's buffers read from one, with where they were,
        # until that packet is taken: a peek() cut short by Ctrl-C decodes
        # it again from the same copy (the range goes back to the worker,
        # to be written over, once the packet is taken).
        self.rings: list[Any] = []
        # While a packet's first frames come in (see _wire.ResultHeader):
        # its id and how many of its tasks' results were taken.  Should its
        # worker die, the packet runs again and its frames start again at
        # its first task: those results are dropped (see decode).
        self.partial: Optional[tuple[int, int]] = None
        self.held: Optional[tuple[Any, memoryview, Any, int, int]] = None
        self.to_give: Optional[tuple[Any, memoryview, Any, int, int]] = None

    @property
    def eof(self) -> bool:
        """The writer (the consumer) is gone and everything it wrote was read."""
        return bool(self.reader.eof)

    def fileno(self) -> int:
        return int(self.reader.fd.fd)

    # --------------------------------------------------------------- packets

    def peek(self) -> Optional[tuple[Any, tuple[list[Any], dict[int, TaskError]], int]]:
        """The first packet read, if any: ``(body, (values, errors), decoded)``,
        the packet still first in line; ``decoded`` is what ``self.decoded``
        becomes once it is taken (``taken``).  Changes nothing: a Ctrl-C
        while it loads leaves the packet where it was, and the next get()
        decodes it again (nothing is lost)."""
        if not self.bodies:
            return None
        body = self.bodies[0]
        packet, n_items = self.decode(body, self.decoded)
        return body, packet, self.decoded + n_items

    def taken(self, body: Any, decoded: int) -> None:
        """The packet ``body`` (from ``peek``) is in the taker's hands: drop it.
        Idempotent, for a hand-over that may run again (see
        Delivery.take_packet): only drops ``body`` while it is first."""
        bodies = self.bodies
        if bodies and bodies[0] is body:
            self.decoded = decoded  # (before the pop: a run cut short between them runs again)
            if type(body) is not tuple:
                header = decode_result(body)
                if header.more:
                    had = self.already_taken(header) + header.start
                    self.partial = (header.packet_id, max(had, header.start + header.n_items))
                else:
                    self.partial = None
            held = self.held
            if held is not None and held[0] is body:
                # Its buffers' range of the ring goes back to the worker once
                # the packet is gone from the line, not as it is read: a
                # peek cut short by Ctrl-C reads it again.
                self.to_give = held
                self.held = None
            bodies.popleft()
            self.reader.give_back(body)  # (kept for the next frame only if nothing uses it)
        self.give_pending()
        if self.closed and not bodies and self.rings:
            self.let_go_of_rings()

    def give_pending(self) -> None:
        """Give back the ring range of the packet last taken, and the copy it
        was read into (that once: see BodyPool)."""
        pending = self.to_give
        if pending is None:
            return
        _, into, ring, start, end = pending
        del pending
        ring.give_back(start, end)  # (again after a cut: a no-op)
        self.to_give = None
        self.reader.give_back(into)

    def already_taken(self, header: ResultHeader) -> int:
        """How many tasks of the packet of frame ``header`` have had their
        results taken before the frame's first (from frames of an earlier
        run of the packet, whose worker died); 0 for a new packet."""
        partial = self.partial
        if partial is None or partial[0] != header.packet_id:
            return 0
        return partial[1] - header.start

    def decode(self, body: Any, first: int) -> tuple[tuple[list[Any], dict[int, TaskError]], int]:
        """(packets in order) A packet's ``(values, errors)``, and its number
        of task results; ``first`` is the number of its first task.

        A value that will not unpickle here fails in its own slot: the fast
        load of the whole packet is tried first, then each value on its own
        (a careful packet's are pickled one by one; any other is salvaged,
        see _salvage).  Results that came before, from an earlier run of
        the packet (see ``partial``), are left out."""
        if type(body) is tuple:  # from the executor engine: already (values, errors)
            return body, 0
        header = decode_result(body)
        skip = min(max(self.already_taken(header), 0), header.n_items)
        if skip:
            (values, errors), n = self.decode_frame(body, header, first - skip)
            kept = {k - skip: e for k, e in errors.items() if k >= skip}
            return (values[skip:], kept), n - skip
        return self.decode_frame(body, header, first)

    def decode_frame(
        self, body: Any, header: ResultHeader, first: int
    ) -> tuple[tuple[list[Any], dict[int, TaskError]], int]:
        """decode(), for the whole frame."""
        view_of = None
        if header.n_buffers and self.rings:
            ring = self.rings[header.slot]

            def view_of(start: int, data: int, end: int) -> memoryview:
                held = self.held
                if held is not None and held[0] is body:
                    return memoryview(held[1])
                into = self.reader.pool.take(end - data, ring.phase(data))
                ring.read(data, end, into)
                self.held = (body, into, ring, start, end)
                return memoryview(into)

        payload, buffers = split_result(body, header, view_of)
        if header.careful:
            packet = loads_results_careful(payload, first)
        else:
            packet = load_results(payload, header.n_items, first, buffers)
        return packet, header.n_items

    def read_available(self) -> bool:
        """Read what the output pipe holds now, without waiting; True if a
        packet came (or the end): then whoever sleeps watching the pipe (the
        poller, coroutines) is rung, as it is empty again."""
        reader = self.reader
        if self.closed or reader.eof or self.cut or not _wire.readable(reader.fd.fd, 0):
            return False
        # A Ctrl-C landing after the read took bytes from the pipe and before
        # they are accounted for (as ``readv`` returns, say) loses them, and
        # every frame after them would be read out of step: results silently
        # wrong, or a length that is garbage.  Reads into a large frame's
        # body (see _wire.FrameReader), which is where the time goes when
        # results too large for a ring come through the pipe, defer a press
        # to the end of the step, and it is raised with what the read
        # brought in hand.  (Every read so, some 18 us each, would slow
        # small results.)  An exception from inside the step marks the pipe
        # cut, and nothing more is read from it (get() raises once what was
        # read before is handed out: see Delivery.raise_if_finished).
        hold = getattr(reader, "in_large_frame", False)
        got: list[Any] = []
        done = False
        try:
            with sigint_deferred() if hold else contextlib.nullcontext():
                # (A press as the deferral begins is raised before this try:
                # nothing was read, nothing is cut.)
                try:
                    got = reader.read_ready()
                    self.bodies.extend(got)
                    done = True
                except BaseException:
                    # Any exception, not only KeyboardInterrupt: a program's
                    # own SIGINT handler may raise what it likes.
                    if not done:
                        self.cut = True
                    raise
        except BaseException:
            if done and got:
                self.ring_getters()  # what came is in hand: others may take it
            raise
        if got or reader.eof:
            self.ring_getters()
            return True
        return False

    def ring_getters(self) -> None:
        with self.queue_lock:
            self.getters.ring()

    def pump(self) -> bool:
        """(lock not held) Move what the output pipe holds into memory; False
        once at end-of-file.  join() does this so the consumer can finish
        even when nobody is calling get()."""
        with self.lock:
            while self.read_available():
                pass
            return not (self.closed or self.reader.eof or self.cut)

    # --------------------------------------------------------------- waiting

    def poller_elsewhere(self) -> bool:
        """Whether another thread waits in poll() now."""
        return self.poller is not None and self.poller != threading.get_ident()

    def wait_for_more(self, timeout: Optional[float], may_sleep: Callable[[], bool]) -> None:
        """(lock not held) Become the poller and wait for the output pipe or
        the bell (or ``timeout``), if no one else polls and, asked with both
        locks held once listening, ``may_sleep()`` (it raises if nothing
        ever will come; False if something is due now).

        Ctrl-C can land at any call, including in a ``finally``, and a
        poller left marked would keep every other getter waiting for its
        turn.  So the mark is made inside the ``try`` whose ``finally``
        clears it, and the clearing is repeated until it has run whole (see
        _threads.run_whole).  Only the poller undoes what the poller did: a
        getter that returned early (someone else polls) must not take the
        poller's bell out of the getters' bells, or the poller would sleep
        through every ring meant for it.
        """
        me = threading.get_ident()

        def stop_polling() -> None:
            with self.lock:
                if self.poller == me:
                    with self.queue_lock:
                        self.getters.stop_listening(self.bell)  # (idempotent)
                    self.poller = None  # last: a repeat finds the mark until here
                    self.close_if_unwatched()
                    self.turns.release_all()

        try:
            with self.lock:
                if self.poller is not None or self.bodies:
                    return  # someone else polls, or something arrived: look again
                self.poller = me
                with self.queue_lock:
                    self.getters.listen(self.bell)
                    if not may_sleep():
                        return
            self.wait(timeout)
        finally:
            run_whole(stop_polling)

    def wait(self, timeout: Optional[float]) -> None:
        """(the poller, listening; lock not held) Sleep until the output pipe
        or the bell is readable, or ``timeout`` seconds pass.  The bell is
        emptied when the poller listens again."""
        p = select.poll()
        p.register(self.reader.fd.fd, _POLL_IN)
        p.register(self.bell.fileno(), _POLL_IN)
        p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))

    def watch(self) -> None:
        """A coroutine is about to watch the output pipe (see _aio)."""
        self.watchers += 1

    def unwatch(self) -> None:
        """A watcher of the output pipe left."""
        self.watchers -= 1
        self.close_if_unwatched()

    def close_if_unwatched(self) -> None:
        """The last one to stop watching the output pipe after close() closes
        it and the poller's bell (idempotent)."""
        if self.closed and not self.watchers and self.poller is None:
            self.close_descriptors()

    def close_descriptors(self) -> None:
        _wire.close_fd(self.reader.fd)
        self.bell.close()

    def close(self) -> None:
        """No more reading.  Whoever still watches the output pipe was woken by
        whoever closes the queue; the last of them closes it (see unwatch)."""
        if self.closed:
            return
        self.closed = True
        self.close_if_unwatched()
        if not self.bodies:
            self.let_go_of_rings()  # (else once the last packet read is taken: see taken)

    def let_go_of_rings(self) -> None:
        """(closed; no packet read is left) The rings' descriptors: nothing
        will be read from them any more."""
        for ring in self.rings:
            _wire.close_fd(ring.fd)
        self.rings = []
