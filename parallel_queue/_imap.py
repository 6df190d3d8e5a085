"""``imap`` and ``aimap``: the builtin ``map``, in parallel processes, in order, lazily.

Each call makes a queue of its own, whose workers are given the function
once, at start (so it may be a closure), runs the map on it (see ``_maps``)
and ends it when the map is done, closed or dropped.
"""

from __future__ import annotations

from typing import Any, AsyncIterable, Callable, Iterable, Optional, TypeVar, Union

from ._maps import AsyncIMapIterator, IMapIterator, Source, check_chunksize, length, source_of
from ._progress import check_progress
from ._queue import ParallelSingleTaskQueue
from ._tasks import ONE, STAR

__all__ = ["imap", "aimap"]

R = TypeVar("R")


class _OneArgQueue(ParallelSingleTaskQueue[Any, R]):
    """A map's queue over one iterable: a task item is the argument itself."""

    _form = ONE


class _StarQueue(ParallelSingleTaskQueue[Any, R]):
    """A map's queue over several iterables: a task item is the args tuple."""

    _form = STAR


def _own_map(
    queue_cls: type[ParallelSingleTaskQueue[Any, R]],
    fn: Callable[..., R],
    inputs: Optional[Source],
    total: Optional[int],
    num_workers: Optional[int],
    chunksize: Optional[int],
    options: dict[str, Any],
) -> IMapIterator[R]:
    check_chunksize(chunksize)
    progress = options.pop("progress", False)
    check_progress(progress)  # before anything starts
    q = queue_cls(fn, num_workers=num_workers, **options)
    try:
        it: IMapIterator[R] = IMapIterator(q, None, q._form, inputs, chunksize, own=True)
        if progress:
            q._core.show_progress(progress, total)
    except BaseException:
        q.terminate()
        raise
    return it


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
    source = source_of(iterables)
    queue_cls = _StarQueue if len(iterables) > 1 else _OneArgQueue
    return _own_map(queue_cls, fn, source, length(iterables), num_workers, chunksize, options)


def aimap(
    fn: Callable[..., R],
    iterable: Union[Iterable[Any], AsyncIterable[Any]],
    *,
    num_workers: Optional[int] = None,
    chunksize: Optional[int] = None,
    **options: Any,
) -> AsyncIMapIterator[R]:
    """``imap`` for asyncio: ``async for result in aimap(fn, items)``.

    ``iterable`` may be a plain or an async iterable (read by a task on the
    event loop).  The compute runs in worker processes; the event loop never
    blocks.  Options as for ``imap``.

    >>> import asyncio
    >>> from parallel_queue import aimap
    >>> async def main():
    ...     return [r async for r in aimap(abs, [-1, -2, -3], num_workers=2)]
    >>> asyncio.run(main())
    [1, 2, 3]
    """
    if isinstance(iterable, AsyncIterable):
        it = _own_map(_OneArgQueue, fn, None, None, num_workers, chunksize, options)
        return AsyncIMapIterator(it, iterable)
    it = _own_map(_OneArgQueue, fn, source_of((iterable,)), length((iterable,)), num_workers, chunksize, options)
    return AsyncIMapIterator(it, None)
