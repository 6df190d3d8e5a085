"""The reorder buffer: packets that arrive early wait for the ones before.

The ordering at the heart of the queue: packets carry wrap-around ``PacketID``s, a heap keeps
those that arrive ahead of the next one expected, and they leave strictly in
id order.  The consumer process keeps one (``_consumer``); so does the
executor engine, which runs in the main process (``_executor``).  Whoever
holds one bounds what may arrive (the consumer publishes ``max_packet_id``;
the executor engine submits no more than a window of packets), so no more
than ``window`` ids are ever alive at once and the modular comparisons hold.
"""

from __future__ import annotations

import heapq
from typing import Generic, Iterator, TypeVar

from ._packet_id import PacketID

__all__ = ["ReorderBuffer"]

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Packets by id; ``pop_ready()`` gives them back in id order, from 0.

    ``items`` counts the tasks in the packets held (for ``stats()``): each
    packet is added with its task count.
    """

    __slots__ = ("window", "next_id", "_heap", "_seq", "items")

    def __init__(self, window: int) -> None:
        self.window = window
        self.next_id = PacketID(window, 0)  # the id that leaves next
        self._heap: list[tuple[PacketID, int, int, T]] = []
        self._seq = 0  # ties never happen; this keeps the heap off comparing packets
        self.items = 0

    def __len__(self) -> int:
        """Packets held."""
        return len(self._heap)

    def add(self, packet_id: int, n_items: int, packet: T) -> None:
        heapq.heappush(self._heap, (PacketID(self.window, packet_id), self._seq, n_items, packet))
        self._seq += 1
        self.items += n_items

    def next_is_ready(self) -> bool:
        """Whether the packet that leaves next is here."""
        return bool(self._heap) and self._heap[0][0] == self.next_id

    def pop_next(self) -> T:
        """(next_is_ready()) The packet that leaves next; the next id moves on."""
        _, _, n_items, packet = heapq.heappop(self._heap)
        self.items -= n_items
        self.next_id = self.next_id.next()
        return packet

    def pop_ready(self) -> Iterator[T]:
        """Every packet that may leave now, in order."""
        while self.next_is_ready():
            yield self.pop_next()
