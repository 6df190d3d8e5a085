"""Wrap-around packet ids, compared with modular arithmetic.

Packet ids live modulo ``base = 2 * window + 1``.  Two ids at most ``window``
apart are ordered by which comes later, across the wrap-around, so a heap of
ids stays correct as long as no more than ``window`` of them are alive at
once.  The consumer publishes the highest id it will accept in a shared
64-bit value; wrapping keeps that value bounded however long the queue runs.
"""

from __future__ import annotations

from typing import Union

__all__ = ["PacketID", "ahead", "distance", "modulus"]


def modulus(window: int) -> int:
    """The base ids live modulo, for ``window`` ids alive at once: ``2 * window + 1``."""
    return 2 * window + 1


def distance(earlier: int, later: int, base: int) -> int:
    """How many steps ``later`` is past ``earlier`` modulo ``base`` (0..base-1)."""
    return (later - earlier) % base


def ahead(value: int, limit: int, base: int, window: int) -> bool:
    """True when id ``value`` is strictly after id ``limit`` (both within ``window``).

    The hot path of the worker's window check: ``not ahead(packet, max_packet_id)``
    means the consumer will accept the packet now.
    """
    d = (value - limit) % base
    return 0 < d <= window


class PacketID:
    """A packet id modulo ``2 * window + 1`` with wrap-around comparisons.

    >>> a = PacketID(5, 10)
    >>> b = a.next()
    >>> b.value
    0
    >>> b > a
    True
    >>> sorted([PacketID(5, 0), PacketID(5, 9), PacketID(5, 10)])[0].value
    9
    """

    __slots__ = ("value", "_window", "_base")

    def __init__(self, window: int, value: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._window = window
        self._base = modulus(window)  # (``_base``: the 0.5 name, kept)
        self.value = value % self._base

    @property
    def window(self) -> int:
        """How far apart two ids may be and still compare correctly."""
        return self._window

    @property
    def modulus(self) -> int:
        """The base ids live modulo: ``2 * window + 1``."""
        return self._base

    def next(self) -> PacketID:
        """The id that follows this one."""
        return PacketID(self._window, self.value + 1)

    def __add__(self, steps: int) -> PacketID:
        if not isinstance(steps, int):
            return NotImplemented
        return PacketID(self._window, self.value + steps)

    def __sub__(self, other: Union[int, PacketID]) -> PacketID | int:
        """``id - n`` is an id; ``id - id`` is the signed number of steps between them."""
        if isinstance(other, PacketID):
            self._check(other)
            d = distance(other.value, self.value, self._base)
            return d if d <= self._window else d - self._base
        if isinstance(other, int):
            return PacketID(self._window, self.value - other)
        return NotImplemented

    def _check(self, other: PacketID) -> None:
        if other._base != self._base:
            raise ValueError(f"cannot compare packet ids of different windows ({self._window} and {other._window})")

    def _cmp(self, other: object) -> int | None:
        if not isinstance(other, PacketID):
            return None
        self._check(other)
        if self.value == other.value:
            return 0
        return -1 if ahead(other.value, self.value, self._base, self._window) else 1

    def __lt__(self, other: object) -> bool:
        c = self._cmp(other)
        return NotImplemented if c is None else c < 0  # type: ignore[return-value]

    def __le__(self, other: object) -> bool:
        c = self._cmp(other)
        return NotImplemented if c is None else c <= 0  # type: ignore[return-value]

    def __gt__(self, other: object) -> bool:
        c = self._cmp(other)
        return NotImplemented if c is None else c > 0  # type: ignore[return-value]

    def __ge__(self, other: object) -> bool:
        c = self._cmp(other)
        return NotImplemented if c is None else c >= 0  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketID):
            return NotImplemented
        return self._base == other._base and self.value == other.value

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash((self._base, self.value))

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"PacketID(window={self._window}, value={self.value})"

    def __reduce__(self) -> tuple[type[PacketID], tuple[int, int]]:
        return PacketID, (self._window, self.value)
