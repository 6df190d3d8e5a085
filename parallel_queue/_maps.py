"""Ordered maps on a queue: the map's lease, and its iterators.

A map takes a queue over for its duration (a ``MapLease``, see _intake):
only its feeder puts, only its iterator gets.  It may run on a queue of its
own (``imap``: the queue's workers were given the function at start, and the
map ends the queue when it is done) or on a queue the caller keeps
(``ParallelQueue.imap``: each of the map's packets carries the function, and
the map gives the queue back when it is done).

The feeder reads the input only as fast as the queue takes it (``feed``
waits while ``in_q_max`` tasks wait), outside the queue's lock, so an endless generator runs in flat
memory; results are taken a whole packet at a time, so the cost per item is
a list index, not a ``get()`` call.  Each task's exception is raised in its
place; the iterator goes on after it, as ``Pool.imap``'s does.

``IMapIterator`` is the iterator; ``AsyncIMapIterator`` its asyncio twin,
fed by a task on the event loop when the input is an async iterable.
"""

from __future__ import annotations

import array
import asyncio
import functools
import threading
import weakref
from collections import deque
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, NamedTuple, Optional, TypeVar

from ._aio import aget, aput
from ._core import Core
from ._errors import QueueBrokenError, QueueClosedError, QueueStopped
from ._intake import MapLease
from ._reaper import Watch, watch
from ._threads import helper_thread, sigint_held_back

__all__ = ["IMapIterator", "AsyncIMapIterator", "NothingInHand", "Source", "check_chunksize", "length", "source_of"]

R = TypeVar("R")


_EMPTY: Iterator[Any] = iter(())
_RUN: Any = type(iter([]))  # a run of values in a map's hands


class NothingInHand(Exception):
    """No result is in hand yet.  Its own type: a task may raise any builtin."""


# ---------------------------------------------------------------- the lease


def end_map_input(core: Core, lease: MapLease) -> None:
    """The map's input ran out: its results end at the count put so far."""
    with core.lock:
        core.intake.end_lease_input(lease)


def _feed(core: Core, source: Source, input_error: list[BaseException], lease: MapLease, own: bool) -> None:
    """Feeder thread: read the input, as fast as the queue takes it."""
    try:
        core.intake.feed(source.items, lease, source.in_memory)
    except (QueueStopped, QueueClosedError):
        return  # closed: stop reading
    except QueueBrokenError:
        return  # the consumer side reports it
    except BaseException as e:  # noqa: BLE001 - the input's own error, raised in its place
        input_error.append(e)
    if own:
        core.stop()
    else:
        end_map_input(core, lease)


# ------------------------------------------------------------- the iterator


class IMapIterator(Iterator[R]):
    """The iterator ``imap`` returns: results in input order.

    ``close()`` (or leaving a ``with`` block, or dropping the iterator)
    stops the workers; the input is not read any further.  For
    ``ParallelQueue.imap``, it gives the queue back instead: tasks already
    sent run to their end, and their results are dropped.
    """

    def __init__(
        self,
        queue: Any,
        fn: Optional[Callable[..., Any]],
        form: int,
        inputs: Optional[Source],
        chunksize: Optional[int],
        own: bool,
    ) -> None:
        """Map over ``queue`` (a public queue: its own if ``own``, the
        caller's otherwise).  ``fn`` travels in each packet (None: the
        workers have it); ``inputs`` is read by a feeder thread (None: fed
        by the caller, see AsyncIMapIterator)."""
        check_chunksize(chunksize)
        core: Core = queue._core
        self._q = queue
        self._own = own
        self._core = core
        self._delivery = core.delivery
        self._lease = MapLease(fn, form, chunksize)
        if not own:
            # Read by whoever wants the queue next, should this iterator be
            # collected unclosed (see MapLease.abandoned).
            self._lease.holder = weakref.ref(self)
        # Results in hand, in order (see _advance): runs of plain values, as
        # iterators, and task errors; ``_cur`` is the current run (the first
        # in ``_steps``), or used up.
        self._cur: Iterator[Any] = _EMPTY
        self._steps: deque[Any] = deque()
        self._input_error: list[BaseException] = []
        self._done = False
        self._feeder: Optional[threading.Thread] = None
        self._input_waits = inputs is not None and not inputs.in_memory  # (see close)
        self._watch: Optional[Watch] = None
        core.begin_map(self._lease)
        try:
            # Dropped without close(): a queue of its own is dropped with it
            # (the reaper ends it); a caller's queue is given back, by the
            # reaper too (see _reaper).  Either way the feeder stops on its
            # next put.  The action holds the core, not this iterator.
            if not own:
                with sigint_held_back():
                    self._watch = watch(self, functools.partial(core.end_map, self._lease))
            if inputs is not None:
                # Made, recorded and started whole, a press raising after (see
                # below): a press inside threading.Thread()'s constructor left
                # a half-made Thread behind (1 press in ~50 at random moments
                # of a loop of small maps under fork, Python 3.9).
                with sigint_held_back():
                    self._feeder = helper_thread(
                        _feed, "parallel_queue-imap-feeder", (core, inputs, self._input_error, self._lease, own)
                    )
                    self._feeder.start()
        except BaseException:
            # Interrupted (a Ctrl-C caught by the program) or failed: the map
            # never began for its caller, so undo it; the queue stays usable.
            self.close()
            raise

    def __iter__(self) -> IMapIterator[R]:
        # Itself, as every iterator (and Pool.imap's): iteration may go on
        # after a task's error, through ``for`` or ``next()`` alike.  (A
        # generator here ran ``for`` loops some 10% faster, but one kept by
        # the caller, ``g = iter(it)``, ended for good at the first error:
        # ``next(g)`` then said StopIteration, and the results after it were
        # silently lost.)
        return self

    def __next__(self) -> R:
        while True:
            for value in self._cur:
                return value  # type: ignore[no-any-return]
            self._advance(True)

    def next_in_hand(self) -> R:
        """The next result if one is in hand; ``NothingInHand`` if not (for aimap)."""
        while True:
            for value in self._cur:
                return value  # type: ignore[no-any-return]
            if not self._steps:
                if self._done:
                    raise StopAsyncIteration
                raise NothingInHand
            self._advance(False)

    def _advance(self, block: bool) -> None:
        """The current run is used up: make the next run current, or raise
        the next task's error, or (``block``) fetch the next packet.

        Results stay where they are until taken, so that a Ctrl-C landing in
        here loses none, for a program that catches it and goes on: a run is
        an iterator, first in ``_steps`` as long as it is current (values
        are taken from it in place, by ``__next__``), and dropped from there
        once used up; an error is dropped only as it is raised."""
        steps = self._steps
        while True:
            if not steps:
                if not block:
                    raise NothingInHand
                self._fetch()
                continue
            step = steps[0]
            if type(step) is _RUN:
                if step is not self._cur:
                    self._cur = step
                    return
                steps.popleft()  # used up
                continue
            # A task's error (a TaskError, or a thread's LiveError).
            error = step.to_exception()
            try:
                self._delivery.count_error()
                steps.popleft()
                raise error
            finally:
                del error  # (its traceback holds this frame: no cycle to keep the map alive)

    def _fetch(self) -> None:
        """Wait for the next packet's results, and move them onto ``_steps``
        (StopIteration at the end)."""
        if self._done:
            raise StopIteration
        try:
            self._delivery.take_batch_into(self._steps, True, None)
            return
        except QueueStopped:
            pass  # (ended outside the except: a Ctrl-C in the join must not chain onto this)
        except KeyboardInterrupt:
            # The map goes on: a program that catches it and goes on gets
            # every result (closing here ended the map: the next next() said
            # StopIteration).  Left alone, the map is closed as it is dropped.
            raise
        except BaseException:
            self.close()
            raise
        self.at_end()
        raise StopIteration

    def at_end(self) -> None:
        """Every result was taken: end the workers (or give the queue back),
        and raise the input's own error, if reading the input failed."""
        self._done = True
        if self._feeder is not None:
            self._feeder.join()  # (every result taken: it has put its last task, and returns)
            self._let_go_of_feeder()
        if not self._own:
            if self._watch is not None:
                self._watch.cancel()
            self._core.end_map(self._lease)  # every result was taken
        else:
            self._q.join()
        if self._input_error:
            raise self._input_error.pop() from None

    def close(self) -> None:
        """Stop the workers now (or give the queue back); results not yet
        taken are dropped."""
        self._done = True
        self._cur, self._steps = _EMPTY, deque()
        if self._own:
            self._q.terminate()
        else:
            if self._watch is not None:
                self._watch.cancel()
            self._core.end_map(self._lease)
        # The feeder of an input that may wait is not waited for: it may be
        # waiting inside the input (a generator blocked on a pipe), and
        # close() would wait with it (found by adversarial testing).  The
        # map is closed, so it returns at its next item, putting nothing.
        feeder = self._feeder
        if feeder is None or feeder.ident is None or feeder is threading.current_thread():
            return
        if not self._input_waits:
            feeder.join()  # (an input in memory: a chunk at most)
        if not feeder.is_alive():
            del feeder
            self._let_go_of_feeder()

    def _let_go_of_feeder(self) -> None:
        """The feeder has ended: its Thread object is dropped here, with Ctrl-C
        held back (see _engine.ProcessEngine.let_go for why)."""
        with sigint_held_back():
            self._feeder = None

    def __enter__(self) -> IMapIterator[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncIMapIterator(AsyncIterator[R]):
    """What ``aimap`` returns: results in input order, as an async iterator."""

    def __init__(self, it: IMapIterator[R], source: Optional[AsyncIterable[Any]]) -> None:
        """``it``: the map, fed by its own thread from a plain iterable, or by
        a task on the event loop (made on first use) from ``source``."""
        self._it = it
        self._source = source
        self._feeder: Optional[asyncio.Task[None]] = None

    def __aiter__(self) -> AsyncIMapIterator[R]:
        return self

    async def __anext__(self) -> R:
        it = self._it
        core = it._core
        if self._source is not None and self._feeder is None:
            feed = _feed_async(core, self._source, it._input_error, it._lease)
            self._feeder = asyncio.get_running_loop().create_task(feed)
        while True:
            try:
                return it.next_in_hand()
            except NothingInHand:
                pass
            try:
                await aget(core, lambda: it._delivery.take_batch_into(it._steps, False, None))
            except QueueStopped:
                break  # (ended outside the except, as imap does)
            except BaseException:
                await self.aclose()
                raise
        await self._end_feeder()
        it.at_end()
        raise StopAsyncIteration

    async def _end_feeder(self) -> None:
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()
        if self._feeder is not None:
            try:
                await self._feeder
            except BaseException:  # noqa: BLE001 - cancelled, or already reported
                pass

    async def aclose(self) -> None:
        """Stop the workers; results not yet taken are dropped."""
        await self._end_feeder()
        self._it.close()

    async def __aenter__(self) -> AsyncIMapIterator[R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _feed_async(
    core: Core, source: AsyncIterable[Any], input_error: list[BaseException], lease: MapLease
) -> None:
    """The feeder task of an aimap over an async input.

    It holds the queue's core, never the iterator: an iterator dropped after
    ``break`` is collected, the reaper ends the queue, and this task's
    aput() then raises QueueStopped and it returns.  (Holding the iterator,
    it kept it alive, and the queue, as long as the loop ran.)
    """
    intake = core.intake
    try:
        async for x in source:
            # A map's own queue over one iterable: the item is the argument.
            await aput(core, functools.partial(_put_one, intake, x, lease))
    except (QueueStopped, QueueClosedError):
        return
    except QueueBrokenError:
        return  # the consumer side reports it (as _feed)
    except BaseException as e:  # noqa: BLE001 - the input's own error, raised in its place
        input_error.append(e)
    core.stop()


def _put_one(intake: Any, item: Any, lease: MapLease) -> None:
    """Put one task of a map's own queue without waiting (``queue.Full``: no room)."""
    intake.put_many(iter((item,)), 1, 0, lease)


def length(iterables: tuple[Iterable[Any], ...]) -> Optional[int]:
    """How many results map() will give, if the inputs know their length."""
    try:
        return min(len(x) for x in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no length, or no iterables (aimap's async input)
        return None


class Source(NamedTuple):
    """What a map's feeder reads: ``items``; ``in_memory`` if no read of it
    can wait (every input is a list, tuple, range, array, ...: see
    _IN_MEMORY), so it may be read in chunks (see Intake.feed)."""

    items: Iterator[Any]
    in_memory: bool


def source_of(iterables: tuple[Iterable[Any], ...]) -> Source:
    """What a map's feeder reads: the inputs themselves (one iterable) or
    zip's tuples.  No Python code of ours runs per item of an input in
    memory, and the items pickle as compactly as they can.  TypeError
    without any iterable, as the builtin map()."""
    if not iterables:
        raise TypeError("imap() must have at least two arguments.")
    items = iter(iterables[0]) if len(iterables) == 1 else zip(*iterables)
    return Source(items, all(_in_memory(i) for i in iterables))


# Inputs whose iteration never waits.  Not "anything with a length": a
# dataset class with __len__ may read each item from disk or a network,
# and was read under the queue's lock (found by adversarial testing).
_IN_MEMORY = (list, tuple, range, str, bytes, bytearray, dict, set, frozenset, deque, array.array, memoryview)


def _in_memory(iterable: Any) -> bool:
    kind = type(iterable)
    if kind in _IN_MEMORY:
        return True
    return kind.__module__ == "numpy" and kind.__name__ == "ndarray"


def check_chunksize(chunksize: Optional[int]) -> None:
    """ValueError for a chunksize that is not a positive count (before
    anything starts)."""
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"chunksize must be at least 1, got {chunksize}")
