"""asyncio: ``aput``, ``aget``, ``async for``, and ``aimap``.

Nothing here blocks the event loop and no thread is involved: a coroutine
first tries the non-blocking call, and if it must wait, sleeps until one of
the queue's pipes becomes readable (``loop.add_reader``): the output pipe or
the get wake-up pipe for ``aget``, the room pipe for ``aput``.  A cancelled
``aget`` has taken nothing, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import queue
import weakref
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Callable, Iterable, Optional, TypeVar, Union

from ._errors import QueueStopped
from ._map import NothingInHand

if TYPE_CHECKING:
    from ._front import Front as Engine

R = TypeVar("R")

# One reader callback per fd per event loop is all asyncio allows, so the
# coroutines of one loop wait on a queue's pipes one at a time: a lock per
# event loop, per queue, per kind ("get", "put"), gone with either.
_loop_locks: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, dict[str, asyncio.Lock]]] = (
    weakref.WeakKeyDictionary()
)


def _lock_for(engine: Engine, kind: str) -> asyncio.Lock:
    per_loop = _loop_locks.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    per_queue = per_loop.setdefault(engine, {})
    lock = per_queue.get(kind)
    if lock is None:
        lock = per_queue[kind] = asyncio.Lock()
    return lock


async def wait_readable(*fds: int) -> None:
    """Sleep until any of ``fds`` is readable (or at end-of-file)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    for fd in fds:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def _call_when_ready(engine: Engine, call: Callable[[], Any], kind: str) -> Any:
    """Run ``call`` (non-blocking; raises ``queue.Empty``/``queue.Full`` when it
    would wait) until it succeeds, sleeping in between on this event loop's
    bell (see _wakeups) and, for a get, the output pipe."""
    try:
        return call()  # the common case: no wait
    except (queue.Empty, queue.Full) as e:
        if isinstance(e, QueueStopped):
            raise
    loop = asyncio.get_running_loop()
    getting = kind == "get"
    bells = engine.getters if getting else engine.putters
    delivery = engine.delivery
    async with _lock_for(engine, kind):
        while True:
            bell = None
            watching = False
            try:
                # Listening first, then one more try: whatever happens from
                # now on rings the bell we are about to watch.  (Each step is
                # recorded in the statement that makes it, so the finally
                # below undoes exactly what was done, whenever a Ctrl-C or a
                # cancellation comes.)
                if getting:
                    with delivery.lock:
                        if delivery.closed:
                            raise QueueStopped("the queue was closed")
                        delivery.watchers += 1
                        watching = True
                with engine.lock:
                    bell = bells.for_owner(loop)
                    bells.listen(bell)
                try:
                    return call()
                except (queue.Empty, queue.Full) as e:
                    if isinstance(e, QueueStopped):
                        raise
                if getting:
                    await wait_readable(bell.fileno(), delivery.reader.fd.fd)
                else:
                    await wait_readable(bell.fileno())
            finally:
                # Repeated until it ran whole (each step is idempotent): a
                # Ctrl-C landing in here must not leave the output pipe
                # watched for ever (see Delivery.wait_for_more).
                interrupted: Optional[BaseException] = None
                while True:
                    try:
                        if bell is not None:
                            with engine.lock:
                                bells.stop_listening(bell)
                        with delivery.lock:
                            if watching:
                                watching = False
                                delivery.unwatch()
                        break
                    except KeyboardInterrupt as k:
                        interrupted = k
                if interrupted is not None:
                    raise interrupted


async def aget(engine: Engine, get: Callable[[], Any]) -> Any:
    """``get()`` for coroutines (``get`` must not block)."""
    return await _call_when_ready(engine, get, "get")


async def aput(engine: Engine, put: Callable[[], None]) -> None:
    """``put()`` for coroutines (``put`` raises ``queue.Full`` instead of waiting)."""
    await _call_when_ready(engine, put, "put")


class AsyncIMapIterator(AsyncIterator[R]):
    """What ``aimap`` returns: results in input order, as an async iterator."""

    def __init__(
        self,
        fn: Callable[..., R],
        source: Union[Iterable[Any], AsyncIterable[Any]],
        num_workers: Optional[int],
        chunksize: Optional[int],
        options: dict[str, Any],
    ) -> None:
        from ._map import IMapIterator

        # A synchronous input is read by the feeder thread, as imap does; an
        # async one by a task on the event loop (created on first use).
        self._async_source = isinstance(source, AsyncIterable)
        inputs: tuple[Iterable[Any], ...] = () if isinstance(source, AsyncIterable) else (source,)
        self._it: IMapIterator[R] = IMapIterator(
            fn, inputs, num_workers, chunksize, options, feed=not self._async_source
        )
        self._source = source
        self._feeder: Optional[asyncio.Task[None]] = None

    def __aiter__(self) -> AsyncIMapIterator[R]:
        return self

    async def __anext__(self) -> R:
        it = self._it
        if self._async_source and self._feeder is None:
            feed = _feed(it._q._engine, self._source, it._input_error)  # type: ignore[arg-type]
            self._feeder = asyncio.get_running_loop().create_task(feed)
        while True:
            try:
                return it._next_in_hand()
            except NothingInHand:
                pass
            engine = it._q._engine
            try:
                values, errors = await aget(engine, lambda: it._delivery.get_batch(False, None))
            except QueueStopped:
                break  # (ended outside the except, as imap does)
            except BaseException:
                await self.aclose()
                raise
            it._take(values, errors)
        await self._end_feeder()
        it._at_end()
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


async def _feed(engine: Engine, source: AsyncIterable[Any], input_error: list[BaseException]) -> None:
    """The feeder task of an aimap over an async input.

    It holds the queue's engine, never the iterator: an iterator dropped
    after ``break`` is collected, its finalizer ends the queue, and this
    task's aput() then raises QueueStopped and it returns.  (Holding the
    iterator, it kept it alive, and the queue, as long as the loop ran.)
    """
    try:
        async for x in source:
            # imap's queue over one iterable: the item is the argument.
            await aput(engine, lambda x=x: _put_nowait(engine, x))  # type: ignore[misc]
    except QueueStopped:
        return
    except BaseException as e:  # noqa: BLE001 - the input's own error, raised in its place
        input_error.append(e)
    engine.stop()


def _put_nowait(engine: Engine, item: Any) -> None:
    engine.put_task(item, 0)


def aimap(
    fn: Callable[..., R],
    iterable: Union[Iterable[Any], AsyncIterable[Any]],
    *,
    num_workers: Optional[int] = None,
    chunksize: Optional[int] = None,
    **options: Any,
) -> AsyncIMapIterator[R]:
    """``imap`` for asyncio: ``async for result in aimap(fn, items)``.

    ``iterable`` may be a plain or an async iterable.  The compute runs in
    worker processes; the event loop never blocks.  Options as for ``imap``.

    >>> import asyncio
    >>> from parallel_queue import aimap
    >>> async def main():
    ...     return [r async for r in aimap(abs, [-1, -2, -3], num_workers=2)]
    >>> asyncio.run(main())
    [1, 2, 3]
    """
    return AsyncIMapIterator(fn, iterable, num_workers, chunksize, options)


__all__ = ["aimap", "AsyncIMapIterator", "aget", "aput"]
