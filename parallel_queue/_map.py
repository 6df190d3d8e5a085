"""``imap``: the builtin ``map``, in parallel processes, in order, lazily.

A feeder thread reads the input only as fast as the queue takes it
(``put`` blocks when ``in_q_max`` tasks wait), so an endless generator runs
in flat memory; results are taken a whole packet at a time, so the cost per
item is a list index, not a ``get()`` call.  Each task's exception is raised
in its place; the iterator goes on after it, as ``Pool.imap``'s does.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from ._delivery import split_results
from ._errors import QueueStopped
from ._front import MapLease
from ._payload import TaskError
from ._queue import ParallelSingleTaskQueue
from ._threads import helper_thread
from ._worker import ONE, STAR

R = TypeVar("R")

# Tasks the feeder appends per lock round.  Larger means fewer rounds; the
# queue's in_q_max still bounds what is read ahead of the workers.
FEED_CHUNK = 256


_EMPTY: Iterator[Any] = iter(())


class _OneArgQueue(ParallelSingleTaskQueue[R]):
    """imap's queue over one iterable: a task item is the argument itself."""

    _form = ONE


class _StarQueue(ParallelSingleTaskQueue[R]):
    """imap's queue over several iterables: a task item is the args tuple."""

    _form = STAR


class NothingInHand(Exception):
    """No result is in hand yet.  Its own type: a task may raise any builtin."""


class IMapIterator(Iterator[R]):
    """The iterator ``imap`` returns: results in input order.

    ``close()`` (or leaving a ``with`` block, or dropping the iterator)
    stops the workers; the input is not read any further.  For
    ``ParallelQueue.imap``, it gives the queue back instead: tasks already
    sent run to their end, and their results are dropped.
    """

    def __init__(
        self,
        fn: Callable[..., R],
        iterables: tuple[Iterable[Any], ...],
        num_workers: Optional[int],
        chunksize: Optional[int],
        options: dict[str, Any],
        feed: bool = True,
        queue: Any = None,
    ) -> None:
        if feed and not iterables:
            raise TypeError("imap() must have at least two arguments.")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        self._lease: Optional[MapLease] = None
        if queue is None:
            progress = bool(options.pop("progress", False))
            queue_cls = _StarQueue if len(iterables) > 1 else _OneArgQueue
            self._q: Any = queue_cls(fn, num_workers=num_workers, **options)
            engine = self._q._engine
            engine.opts.chunksize = chunksize
            if progress:
                engine.show_progress(_length(iterables))
        else:
            # A map on a queue the caller owns: its workers take any task, so
            # each of the map's packets carries the function ahead of its
            # items (pickled once per packet).
            self._q = queue
            engine = queue._engine
            self._lease = engine.begin_map(fn, STAR if len(iterables) > 1 else ONE, chunksize)
        self._engine = engine
        self._delivery = engine.delivery
        # Results in hand: ``_cur`` iterates the current run of plain values;
        # ``_steps`` holds what follows in the packet (see split_results).
        self._cur: Iterator[Any] = _EMPTY
        self._steps: deque[Any] = deque()
        self._input_error: list[BaseException] = []
        self._done = False
        self._feeder: Optional[threading.Thread] = None
        if feed:
            # Task items are the inputs themselves (one iterable) or zip's
            # tuples: no Python code runs per item on the way in, and they
            # pickle as compactly as they can.
            source = iter(iterables[0]) if len(iterables) == 1 else zip(*iterables)
            self._feeder = helper_thread(
                _feed, "parallel_queue-imap-feeder", (engine, source, self._input_error, self._lease)
            )
            self._feeder.start()
        # Dropped without close(): end the workers (or give the queue back);
        # the feeder then stops on its next put.  The finalizer holds the
        # queue, not this iterator.
        if self._lease is None:
            self._finalizer = weakref.finalize(self, self._q.terminate)
        else:
            give_back = functools.partial(_give_back, engine, self._lease, self._feeder)
            self._finalizer = weakref.finalize(self, give_back)

    def __iter__(self) -> Iterator[R]:
        # A generator: ``for`` then takes each value at C speed (``yield
        # from`` a list iterator), not through a Python-level __next__.  It
        # shares ``_cur`` with __next__, so mixing the two never repeats or
        # skips a result; a new one is made each time, so a ``for`` loop may
        # resume after a task's error ended the previous one.
        return self._results()

    def _results(self) -> Iterator[R]:
        while True:
            cur = self._cur
            yield from cur
            if cur is self._cur:  # not already moved on by a next() meanwhile
                try:
                    value = self._advance(True)
                except StopIteration:
                    return  # (raised inside a generator it would be a RuntimeError)
                yield value

    def __next__(self) -> R:
        for value in self._cur:
            return value  # type: ignore[no-any-return]
        return self._advance(True)

    def _next_in_hand(self) -> R:
        """The next result if one is in hand; ``NothingInHand`` if not (for aimap)."""
        for value in self._cur:
            return value  # type: ignore[no-any-return]
        if self._steps:
            return self._advance(False)
        if self._done:
            raise StopAsyncIteration
        raise NothingInHand

    def _take(self, values: list[Any], errors: dict[int, Any]) -> None:
        """A packet's results: runs of values, and each error in its place."""
        if not errors:
            self._cur = iter(values)
            return
        self._steps.extend(split_results(values, errors))
        self._cur = _EMPTY

    def _advance(self, block: bool) -> R:
        """The current run is used up: the next run's first value, or an error
        raised in its place, or (``block``) the next packet."""
        while True:
            if self._steps:
                step = self._steps.popleft()
                if type(step) is not list:  # a task's error (a TaskError, or a thread's LiveError)
                    self._delivery.errors_raised += 1
                    raise step.to_exception()
                self._cur = iter(step)
            elif not block:
                raise NothingInHand
            else:
                self._take(*self._next_packet())
            for value in self._cur:
                return value  # type: ignore[no-any-return]

    def _next_packet(self) -> tuple[list[Any], dict[int, TaskError]]:
        if self._done:
            raise StopIteration
        try:
            return self._delivery.get_batch(True, None)
        except QueueStopped:
            pass  # (ended outside the except: a Ctrl-C in the join must not chain onto this)
        except BaseException:
            self.close()
            raise
        self._at_end()
        raise StopIteration

    def _at_end(self) -> None:
        """Every result was taken: end the workers (or give the queue back),
        and raise the input's own error, if reading the input failed."""
        self._finish()
        if self._input_error:
            raise self._input_error.pop() from None

    def _finish(self) -> None:
        self._done = True
        if self._lease is not None:
            self._finalizer()  # _give_back: every result was taken
            return
        if self._feeder is not None:
            self._feeder.join()
        self._q.join()

    def close(self) -> None:
        """Stop the workers now (or give the queue back); results not yet
        taken are dropped."""
        self._done = True
        self._cur, self._steps = _EMPTY, deque()
        if self._lease is not None:
            self._finalizer()
            return
        self._q.terminate()
        if self._feeder is not None:
            self._feeder.join()

    def __enter__(self) -> IMapIterator[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length(iterables: tuple[Iterable[Any], ...]) -> Optional[int]:
    """How many results map() will give, if the inputs know their length."""
    try:
        return min(len(x) for x in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no length, or no iterables (aimap's async input)
        return None


def _feed(engine: Any, source: Iterator[Any], input_error: list[BaseException], lease: Optional[MapLease]) -> None:
    """Feeder thread: read the input, as fast as the queue takes it."""
    try:
        while not engine.put_many(source, FEED_CHUNK, None, lease):
            pass
    except QueueStopped:
        return  # closed: stop reading
    except BaseException as e:  # noqa: BLE001 - the input's own error, raised in its place
        from ._errors import QueueBrokenError

        if isinstance(e, QueueBrokenError):
            return  # the consumer side reports it
        input_error.append(e)
    if lease is None:
        engine.stop()
    else:
        engine.end_map_input(lease)


def _give_back(engine: Any, lease: MapLease, feeder: Optional[threading.Thread]) -> None:
    """End a map on a caller's queue: stop its feeder, hand the queue back."""
    engine.cancel_map(lease)
    if feeder is not None and feeder is not threading.current_thread():
        feeder.join()
    engine.release_map(lease)


def imap(
    fn: Callable[..., R],
    *iterables: Iterable[Any],
    num_workers: Optional[int] = None,
    chunksize: Optional[int] = None,
    **options: Any,
) -> IMapIterator[R]:
    """``map(fn, *iterables)`` in worker processes: lazy, results in input order.

    Several iterables are zipped, as ``map`` does.  The input is read only as
    far ahead as the queue allows (``in_q_max`` tasks waiting), so an endless
    generator runs in flat memory.  A task's exception is raised at its
    place, after the results before it; iteration may go on after it.
    Tasks are batched automatically (``chunksize`` fixes the batch size).
    Other keyword arguments are ``ParallelQueue`` options (``task_timeout``,
    ``mp_context``, ``in_q_max``, ...).  ``fn`` reaches the workers once, at
    process start, so it may be a closure.

    >>> from parallel_queue import imap
    >>> list(imap(pow, range(5), [2] * 5, num_workers=2))
    [0, 1, 4, 9, 16]
    """
    return IMapIterator(fn, iterables, num_workers, chunksize, options)
