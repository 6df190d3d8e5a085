"""asyncio: aput/aget/async for and aimap, never blocking the event loop."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import select
import threading
import time

import pytest
from conftest import await_until, descendants, wait_until

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, QueueStopped, aimap


def slow(x, seconds=0.3):
    time.sleep(seconds)
    return x


def fail_on_2(x):
    if x == 2:
        raise KeyError(x)
    return x


async def endless():
    i = 0
    while True:
        yield i
        i += 1


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_aput_aget_in_order_with_back_pressure_and_markers():
    async def main():
        with ParallelQueue(num_workers=2, in_q_max=3) as q:

            async def produce():
                for i in range(200):
                    await q.aput(abs, -i)  # waits for room: in_q_max=3
                    if i % 50 == 49:
                        await q.aput(("batch", i))
                q.stop()

            p = asyncio.create_task(produce())
            out = [x async for x in q]
            await p
        return out

    out = run(main())
    expected = []
    for i in range(200):
        expected.append(i)
        if i % 50 == 49:
            expected.append(("batch", i))
    assert out == expected


def test_event_loop_keeps_running_while_waiting():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        with ParallelQueue(num_workers=1) as q:
            await q.aput(slow, 1, 0.5)
            assert await q.aget() == 1
        t.cancel()
        return ticks

    # The loop ran its ticker while aget() waited half a second.  (A lower
    # bound on ticks would be a timing assertion; one tick proves the loop
    # was not blocked, since a blocked loop runs none.)
    assert run(main()) >= 1


def test_cancelled_aget_takes_nothing():
    async def main():
        with ParallelQueue(num_workers=1) as q:
            await q.aput(slow, "kept", 0.3)
            waiter = asyncio.create_task(q.aget())
            await await_until(lambda: len(q._core.wakeups.getters))  # it waits on the pipes now
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            return await q.aget()

    assert run(main()) == "kept"


def test_several_coroutines_get_each_result_once():
    async def main():
        with ParallelQueue(num_workers=2) as q:
            for i in range(300):
                await q.aput(abs, -i)
            q.stop()

            async def take():
                got = []
                while True:
                    try:
                        got.append(await q.aget())
                    except QueueStopped:
                        return got

            parts = await asyncio.gather(take(), take(), take())
        return parts

    parts = run(main())
    assert sorted(x for p in parts for x in p) == list(range(300))
    assert all(p == sorted(p) for p in parts)


def make_waiter(ev):
    def task(i):
        assert ev.wait(60)
        return i

    return task


def test_aput_on_single_task_queue_waits_for_room():
    ev = multiprocessing.get_context().Event()

    async def main():
        with ParallelSingleTaskQueue(make_waiter(ev), num_workers=1, in_q_max=1, max_batch=1) as q:
            returned = []  # the order in which the aput() calls returned

            async def put(i):
                await q.aput(i)
                returned.append(i)  # no await in between: this is put order

            putter = asyncio.gather(*(put(i) for i in range(6)))
            await await_until(lambda: len(q._core.wakeups.putters))  # one waits for room now
            assert not putter.done()  # no room: it waits, the loop does not
            ev.set()
            await putter
            return returned, [await q.aget() for _ in range(6)]

    returned, got = run(main())
    assert sorted(returned) == list(range(6))
    assert got == returned


def test_aimap_sync_and_async_inputs():
    async def numbers():
        for i in range(100):
            if i % 10 == 0:
                await asyncio.sleep(0)
            yield i

    async def main():
        a = [r async for r in aimap(abs, range(-100, 0), num_workers=2)]
        b = [r async for r in aimap(lambda x: x * 3, numbers(), num_workers=2)]
        return a, b

    a, b = run(main())
    assert a == list(range(100, 0, -1))
    assert b == [3 * i for i in range(100)]


def test_aimap_error_in_place_and_input_error_last():
    async def broken():
        yield 0
        yield 1
        raise RuntimeError("input broke")

    async def main():
        out = []
        it = aimap(fail_on_2, range(5), num_workers=2)
        while True:
            try:
                out.append(await it.__anext__())
            except StopAsyncIteration:
                break
            except KeyError:
                out.append("error")
        it2 = aimap(abs, broken(), num_workers=2)
        got = [await it2.__anext__(), await it2.__anext__()]
        with pytest.raises(RuntimeError, match="input broke"):
            await it2.__anext__()
        return out, got

    out, got = run(main())
    assert out == [0, 1, "error", 3, 4]
    assert got == [0, 1]


def test_aimap_aclose_stops_workers():
    async def main():
        async with aimap(abs, endless(), num_workers=2) as it:
            first = [await it.__anext__() for _ in range(10)]
        return first

    assert run(main()) == list(range(10))


def test_breaking_out_of_aimap_over_an_async_input_leaves_nothing_running():
    """Regression: after ``break`` out of ``async for r in aimap(fn, agen)``
    the queue (2 workers, the consumer) and the feeder task lived on for as
    long as the event loop ran: the feeder waited forever in aput() and held
    the iterator.  Dropping the iterator now ends them all."""

    async def main():
        before = asyncio.all_tasks()
        for _ in range(3):
            async for r in aimap(abs, endless(), num_workers=2):
                if r >= 5:
                    break
            gc.collect()
            await await_until(lambda: descendants(os.getpid()) == [])
            # The feeder task ends too.
            await await_until(lambda: all(t.done() for t in asyncio.all_tasks() - before))

    run(main())


def kernel_wait_channel(thread):
    """Where in the kernel ``thread`` sleeps ("poll_schedule_timeout", say)."""
    with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
        return f.read()


def test_thread_and_coroutine_getters_never_take_each_others_wake_up(monkeypatch):
    """Regression: with get() in a thread and aget() in coroutines on one
    queue, a coroutine could take the wake-up byte the thread's poll() had
    seen; the thread then blocked in a read of the wake-up pipe, ignoring
    its timeout, results stayed stranded and the event loop spun.  Forced
    here: a marker wakes both, and the coroutine runs between the thread's
    poll() returning and the thread acting on it."""
    q = ParallelQueue(num_workers=1)
    loop = asyncio.new_event_loop()
    real_poll = select.poll
    thread_polls = threading.Event()
    let_go = threading.Event()  # the coroutine ran; the thread goes on
    hooked: list[int] = []
    outcome: list[object] = []

    async def let_the_loop_run():
        for _ in range(10):
            await asyncio.sleep(0)

    class PollThenLetTheCoroutineRun:
        def __init__(self):
            self.p = real_poll()

        def register(self, *args):
            self.p.register(*args)

        def poll(self, timeout=None):
            mine = threading.current_thread() is getter and (timeout is None or timeout > 0)
            if mine:
                thread_polls.set()
            events = self.p.poll(timeout)
            if mine and events and not hooked:
                hooked.append(1)
                asyncio.run_coroutine_threadsafe(let_the_loop_run(), loop).result(30)
                let_go.set()
            return events

    def get_in_a_thread():
        try:
            outcome.append(q.get(timeout=3))
        except Exception as e:
            outcome.append(type(e).__name__)

    getter = threading.Thread(target=get_in_a_thread)

    async def main():
        waiter = asyncio.ensure_future(asyncio.wait_for(q.aget(), 30))
        await let_the_loop_run()  # the coroutine now sleeps on the pipes
        getter.start()
        assert await loop.run_in_executor(None, thread_polls.wait, 30)
        # Inside the poll() system call, not just about to make it:
        await loop.run_in_executor(None, wait_until, lambda: "poll" in kernel_wait_channel(getter))
        q.put("marker")  # wakes both getters
        got = await waiter
        assert await loop.run_in_executor(None, let_go.wait, 30)
        return got

    monkeypatch.setattr(select, "poll", PollThenLetTheCoroutineRun)
    try:
        got = loop.run_until_complete(main())
        getter.join(30)
        assert not getter.is_alive(), "get(timeout=3) in the thread did not return"
        assert got == "marker" and outcome == ["Empty"]
    finally:
        q.terminate()  # (also lets a thread stuck in a read go)
        getter.join(30)
        loop.close()
