"""The lifecycle's state machine and the reorder buffer, on their own.

Every state against every operation (the public promise: stop(), join()
and terminate() in any state, any number of times), on a real queue for
each state; the transitions table itself; and the reorder buffer over many
wraps of its ids, against a plain sort.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel_queue import ParallelQueue, QueueBrokenError, QueueClosedError
from parallel_queue._lifecycle import Lifecycle, State
from parallel_queue._packet_id import modulus
from parallel_queue._reorder import ReorderBuffer

# ---------------------------------------------------------------- the table

# (state, transition) -> (state after, whether it changed anything)
TABLE = {
    (State.OPEN, "stop"): (State.STOPPING, True),
    (State.OPEN, "break"): (State.BROKEN, True),
    (State.OPEN, "terminate"): (State.TERMINATED, True),
    (State.STOPPING, "stop"): (State.STOPPING, False),
    (State.STOPPING, "break"): (State.BROKEN, True),
    (State.STOPPING, "terminate"): (State.TERMINATED, True),
    (State.BROKEN, "stop"): (State.BROKEN, False),
    (State.BROKEN, "break"): (State.BROKEN, False),
    (State.BROKEN, "terminate"): (State.TERMINATED, True),
    (State.TERMINATED, "stop"): (State.TERMINATED, False),
    (State.TERMINATED, "break"): (State.TERMINATED, False),
    (State.TERMINATED, "terminate"): (State.TERMINATED, False),
}

REACH = {
    State.OPEN: [],
    State.STOPPING: ["stop"],
    State.BROKEN: ["break"],
    State.TERMINATED: ["terminate"],
}


def apply(life: Lifecycle, op: str, tasks_put: int = 7) -> bool:
    if op == "stop":
        return life.stop(tasks_put)
    if op == "break":
        return life.break_with(RuntimeError("a fault"))
    return life.terminate(tasks_put)


@pytest.mark.parametrize(("start", "op"), sorted(TABLE, key=str))
def test_each_transition_of_the_table(start, op):
    life = Lifecycle()
    for step in REACH[start]:
        assert apply(life, step)
    assert life.state is start
    after, changed = TABLE[(start, op)]
    assert apply(life, op) is changed
    assert life.state is after
    assert life.accepting is (after is State.OPEN)
    assert life.gone is (after in (State.BROKEN, State.TERMINATED))


def test_the_count_of_the_stream_is_set_once():
    life = Lifecycle()
    life.stop(5)
    life.terminate(9)  # terminate after stop keeps stop()'s count
    assert life.stopped_at == 5
    life = Lifecycle()
    life.terminate(9)
    assert life.stopped_at == 9


def test_closed_is_once_and_ends_every_transition():
    life = Lifecycle()
    life.break_with(RuntimeError("a fault"))
    assert life.close() and not life.close()
    assert not life.terminate(3) and life.state is State.BROKEN


def test_refusal_says_why():
    life = Lifecycle()
    life.stop(0)
    assert "after stop" in str(life.refusal())
    assert "while put() waited" in str(life.refusal(after_wait=True))
    life = Lifecycle()
    error = QueueBrokenError("the consumer died")
    life.break_with(error)
    refusal = life.refusal()
    assert isinstance(refusal, QueueBrokenError) and refusal is not error  # a fresh copy each time


# ------------------------------------------------------- on a real queue


def break_it(q: ParallelQueue) -> None:
    q._core.fail(QueueBrokenError("broken on purpose"))


@pytest.mark.parametrize("state", ["open", "stopping", "broken", "terminated", "joined"])
def test_every_operation_in_every_state_of_a_real_queue(state):
    """stop(), join(timeout), terminate(), is_alive(), stats() in each state,
    twice each: none raises, none hangs, and the state each leaves is the
    documented one."""
    q = ParallelQueue(num_workers=1)
    try:
        q.put(abs, -1)
        assert q.get(timeout=60) == 1
        if state == "stopping":
            q.stop()
        elif state == "broken":
            break_it(q)
        elif state == "terminated":
            q.terminate()
        elif state == "joined":
            q.stop()
            q.join()
        for _ in range(2):
            q.stats()
            q.is_alive()
            q.stop()
            q.join(timeout=60)
            assert not q.is_alive()
        with pytest.raises((QueueClosedError, QueueBrokenError)):
            q.put(abs, -2)
        for _ in range(2):
            q.terminate()
        assert not q.is_alive() and q._core.lifecycle.closed
    finally:
        q.terminate()


# ---------------------------------------------------------- reorder buffer


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 9), n=st.integers(0, 120), seed=st.integers(0, 2**32 - 1))
def test_reorder_buffer_gives_packets_back_in_order_across_wraps(window, n, seed):
    """Packets arrive in any order that keeps fewer than ``window`` ids alive
    (the consumer's max_packet_id guarantees that), over many wraps of the
    ids: they leave in put order, and ``items`` counts what is held."""
    rng = random.Random(seed)
    buf: ReorderBuffer[int] = ReorderBuffer(window)
    base = modulus(window)
    out: list[int] = []
    sent = 0
    held_items = 0
    in_flight: list[int] = []
    while len(out) < n:
        # Send while fewer than ``window`` packets are out and not yet left.
        while sent < n and sent - len(out) < window:
            in_flight.append(sent)
            sent += 1
        k = in_flight.pop(rng.randrange(len(in_flight)))
        size = k % 3 + 1
        buf.add(k % base, size, k)
        held_items += size
        for packet in buf.pop_ready():
            out.append(packet)
            held_items -= packet % 3 + 1
        assert buf.items == held_items
        assert len(buf) == sent - len(out) - len(in_flight)  # arrived, not yet left
    assert out == list(range(n))
    assert len(buf) == 0 and buf.items == 0


def test_reorder_buffer_holds_what_came_early():
    buf: ReorderBuffer[str] = ReorderBuffer(3)
    for packet_id, name in [(2, "c"), (1, "b")]:
        buf.add(packet_id, 1, name)
        assert list(buf.pop_ready()) == []
    assert len(buf) == 2 and buf.items == 2
    buf.add(0, 5, "a")
    assert list(buf.pop_ready()) == ["a", "b", "c"]
    # ids wrap at modulus(3) == 7: packets 3 .. 9 carry ids 3, 4, 5, 6, 0, 1, 2,
    # and each pair arrives later one first.
    got = []
    for first in range(3, 10, 2):
        pair = [k for k in (first + 1, first) if k < 10]
        for k in pair:
            buf.add(k % modulus(3), 1, f"p{k}")
        got.extend(buf.pop_ready())
    assert got == [f"p{k}" for k in range(3, 10)]
