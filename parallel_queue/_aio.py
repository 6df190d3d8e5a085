"""asyncio: ``aget`` and ``aput``, waiting without blocking the event loop.

Nothing here blocks the event loop and no thread is involved: a coroutine
first tries the non-blocking call, and if it must wait, sleeps until its
event loop's bell (see _wakeups) or, for ``aget``, the output pipe becomes
readable (``loop.add_reader``).  A cancelled ``aget`` has taken nothing, so
nothing is lost.  The maps' async iterator is in ``_maps``.
"""

from __future__ import annotations

import asyncio
import queue
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._errors import QueueStopped
from ._threads import run_whole

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["aget", "aput", "wait_readable"]

# One reader callback per fd per event loop is all asyncio allows, so the
# coroutines of one loop wait on a queue's pipes one at a time: a lock per
# event loop, per queue, per kind ("get", "put"), gone with either.
_loop_locks: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, dict[str, asyncio.Lock]]] = (
    weakref.WeakKeyDictionary()
)


def _lock_for(core: Core, kind: str) -> asyncio.Lock:
    per_loop = _loop_locks.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    per_queue = per_loop.setdefault(core, {})
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


async def _call_when_ready(core: Core, call: Callable[[], Any], kind: str) -> Any:
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
    bells = core.wakeups.getters if getting else core.wakeups.putters
    receiver = core.delivery.receiver
    async with _lock_for(core, kind):
        while True:
            bell = None
            watching = False

            def stop_waiting() -> None:  # (called in this turn's finally only)
                nonlocal watching
                if bell is not None:  # noqa: B023
                    with core.lock:
                        bells.stop_listening(bell)  # noqa: B023
                with receiver.lock:
                    if watching:
                        watching = False
                        receiver.unwatch()

            try:
                # Listening first, then one more try: whatever happens from
                # now on rings the bell we are about to watch.  (Each step is
                # recorded in the statement that makes it, so the finally
                # below undoes exactly what was done, whenever a Ctrl-C or a
                # cancellation comes.)
                if getting:
                    with receiver.lock:
                        if receiver.closed:
                            raise QueueStopped("the queue was closed")
                        receiver.watch()
                        watching = True
                with core.lock:
                    bell = bells.for_owner(loop)
                    bells.listen(bell)
                try:
                    return call()
                except (queue.Empty, queue.Full) as e:
                    if isinstance(e, QueueStopped):
                        raise
                if getting:
                    await wait_readable(bell.fileno(), receiver.fileno())
                else:
                    await wait_readable(bell.fileno())
            finally:
                # A Ctrl-C landing in here must not leave the output pipe
                # watched for ever (see _threads.run_whole).
                run_whole(stop_waiting)


async def aget(core: Core, get: Callable[[], Any]) -> Any:
    """``get()`` for coroutines (``get`` must not block)."""
    return await _call_when_ready(core, get, "get")


async def aput(core: Core, put: Callable[[], None], timeout: Optional[float] = None) -> None:
    """``put()`` for coroutines (``put`` raises ``queue.Full`` instead of
    waiting); ``queue.Full`` after ``timeout`` seconds without room.  A
    cancelled or timed-out wait has put nothing."""
    if timeout is None:
        await _call_when_ready(core, put, "put")
        return
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    try:
        await asyncio.wait_for(_call_when_ready(core, put, "put"), timeout)
    except asyncio.TimeoutError:
        raise queue.Full from None
