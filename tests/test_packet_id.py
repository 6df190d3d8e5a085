import heapq

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallel_queue import PacketID


def test_values_wrap_at_base():
    a = PacketID(5, 10)
    assert a._base == 11
    assert a.next().value == 0
    assert (a + 3).value == 2
    assert (PacketID(5, 1) - 3).value == 9
    assert PacketID(5, 11).value == 0


def test_comparisons_across_the_wrap():
    assert PacketID(5, 0) > PacketID(5, 10)
    assert PacketID(5, 10) < PacketID(5, 0)
    assert PacketID(5, 3) <= PacketID(5, 3)
    assert PacketID(5, 3) >= PacketID(5, 3)
    assert PacketID(5, 3) == PacketID(5, 3)
    assert PacketID(5, 3) != PacketID(5, 4)
    assert PacketID(5, 8) < PacketID(5, 2)  # 8 -> 9 -> 10 -> 0 -> 1 -> 2
    assert not PacketID(5, 2) < PacketID(5, 8)


def test_difference_is_signed_steps():
    assert PacketID(5, 1) - PacketID(5, 9) == 3
    assert PacketID(5, 9) - PacketID(5, 1) == -3


def test_different_windows_do_not_compare():
    with pytest.raises(ValueError):
        PacketID(5, 1) < PacketID(6, 2)  # noqa: B015


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        PacketID(0)


@given(
    window=st.integers(1, 50),
    start=st.integers(0, 10_000),
    alive=st.data(),
)
def test_heap_orders_any_live_window(window, start, alive):
    """Any set of at most ``window`` consecutive-ish ids pops in sequence order."""
    span = alive.draw(st.integers(1, window))
    offsets = alive.draw(st.permutations(range(span)))
    heap = []
    for off in offsets:
        heapq.heappush(heap, PacketID(window, start + off))
    popped = [heapq.heappop(heap).value for _ in range(span)]
    assert popped == [(start + i) % (2 * window + 1) for i in range(span)]


@given(window=st.integers(1, 100), a=st.integers(0, 10**6), d=st.integers(1, 100))
def test_later_is_greater_within_window(window, a, d):
    d = min(d, window)
    x, y = PacketID(window, a), PacketID(window, a + d)
    assert y > x and x < y and y >= x and x <= y and x != y
    assert y - x == d
