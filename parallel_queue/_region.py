"""Shared-memory rings: large buffers cross between processes without a pipe.

Each worker slot has one region: an anonymous memory file (``memfd``, no
name anywhere: its memory goes with the last process that holds it open or
mapped, however that process dies) holding two rings::

    page 0    results ring cells  TAIL (main process) | HEAD, FRAME_FROM, FRAME_PACKET (worker)
    page 1    arguments ring cells  TAIL (worker) | HEAD (dispatcher)
    RING_BYTES   results data:   worker --> main process
    RING_BYTES   arguments data: dispatcher --> worker

A frame whose pickle has large out-of-band buffers (see _payload) puts as
many of them as fit into its ring and carries only their places: the
consumer orders a frame of a few hundred bytes while the megabytes go
straight from the worker to the main process.  Buffers that do not fit go
in the frame, through the pipes, as before: a full ring slows nothing
down but itself.

Positions are bytes since the ring was made (64 bits: they never wrap); a
position's place in the ring is ``position % size``.  One writer advances
HEAD, one reader advances TAIL, each the only writer of its cell; a frame's
buffers take one contiguous range ``[start, end)`` (``start`` counts the
end of the ring skipped so that the range does not wrap), and the reader
gives ranges back in ring order, as the views on them die (an array
loaded on one keeps its range, and every later one, until it is dropped;
the writer then falls back to the pipe).  The reader notices dead views
when it next reads a frame with buffers (``reclaim``), not in a callback:
a Ctrl-C landing in a weak reference's callback is swallowed by Python.

A worker that dies leaves the slot's region to the next worker in the
slot: it goes on from HEAD.  Before writing a frame, the worker records the
frame's range and packet in FRAME_FROM and FRAME_PACKET, and clears
FRAME_PACKET once the frame is written whole; a worker that died in between
left a range that nobody may be reading: the dispatcher gives it back
unless the consumer received that packet (see Dispatcher.on_drained).  The
arguments ring is simpler: once its worker is dead nobody reads it, and
the dispatcher empties it before the next worker starts.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import weakref
from typing import Any, Callable, Optional, Sequence

from ._wire import NOT_SHARED, Fd, Placement, close_fd, own_fd

__all__ = ["RING_BYTES", "SHARED_MIN", "Region", "SlotRings", "RingReader", "RingWriter", "attach"]

# A ring's size.  Packets are sized to about a megabyte (see _scheduler), so
# a ring holds dozens of them, or four buffers of 8 MiB; only the pages
# written are ever allocated (the whole ring after its first lap).
RING_BYTES = 32 << 20
# Buffers this large or larger travel in the ring (smaller ones are copied
# into the pickle's stream anyway, see _payload.OOB_MIN).
SHARED_MIN = 1 << 16
# Each buffer starts at a multiple of this (an array's items are aligned).
ALIGN = 64

_PAGE = mmap.PAGESIZE
_CELL = struct.Struct("Q")  # native: one aligned 8-byte access
_CELLS = 2 * _PAGE  # the two pages of cells
# Cells (64-bit, aligned: a store or a load of one is a single access).
TAIL, HEAD, FRAME_FROM, FRAME_PACKET = 0, 8, 16, 24
NO_FRAME = (1 << 64) - 1  # FRAME_PACKET once the frame is written whole
RESULTS, ARGS = 0, 1  # which ring of a region

_MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 1)
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", None)


class Region:
    """A slot's shared memory, as its owner (the main process) holds it."""

    def __init__(self, fd: Fd, ring_bytes: int) -> None:
        self.fd = fd
        self.ring_bytes = ring_bytes

    @classmethod
    def create(cls, ring_bytes: int = RING_BYTES) -> Optional[Region]:
        """A new region, or None where there is no memfd (the pipes carry
        everything then)."""
        create = getattr(os, "memfd_create", None)
        if create is None or ring_bytes <= 0:
            return None
        fd = create("parallel_queue", _MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _CELLS + 2 * ring_bytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(own_fd(fd), ring_bytes)

    def mapping(self) -> mmap.mmap:
        """The whole region, mapped shared and writable.  (A child forked
        later inherits it, as it does all memory: results the program holds
        on it must stay readable there.)"""
        return _map(self.fd, self.ring_bytes)

    def close(self) -> None:
        """Let go of the descriptor (mappings keep the memory while they live)."""
        close_fd(self.fd)


def _map(fd: Fd, ring_bytes: int) -> mmap.mmap:
    """A region mapped whole, shared and writable; where Python allows it,
    the mapping keeps no descriptor of its own (every mapping would hold
    one otherwise, for as long as results on it live)."""
    try:
        return mmap.mmap(fd.fd, _CELLS + 2 * ring_bytes, trackfd=False)  # type: ignore[call-arg]
    except TypeError:  # before Python 3.13
        return mmap.mmap(fd.fd, _CELLS + 2 * ring_bytes)


class _Ring:
    """One ring of a region's mapping ``mm``: its cells, and its data.

    The cells are read and written with native 8-byte loads and stores at
    aligned places (one access each, not byte by byte), through no lasting
    view of the mapping: a mapping with no view on it can be closed at once
    (see SlotRings.let_go)."""

    def __init__(self, mm: mmap.mmap, which: int, ring_bytes: int) -> None:
        self.mm = mm
        self.size = ring_bytes
        self.base = _CELLS + which * ring_bytes
        self.cells = which * _PAGE

    def cell(self, offset: int) -> int:
        return int(_CELL.unpack_from(self.mm, self.cells + offset)[0])

    def set_cell(self, offset: int, value: int) -> None:
        _CELL.pack_into(self.mm, self.cells + offset, value)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class RingWriter(_Ring):
    """The writing end of one ring (a worker's results; the dispatcher's
    arguments for one slot)."""

    def __init__(self, mm: mmap.mmap, which: int, ring_bytes: int) -> None:
        super().__init__(mm, which, ring_bytes)
        self.head = self.cell(HEAD)  # (a worker goes on where the one before it stopped)

    def place(self, buffers: Sequence[memoryview]) -> Optional[Placement]:
        """Copy into the ring, in one contiguous range, those of ``buffers``
        that are large enough and fit; None if none did."""
        size, head = self.size, self.head
        free = size - (head - self.cell(TAIL))
        at = head % size
        room = min(free, size - at)  # without skipping the ring's end
        # The first buffer that could fit decides where the range begins.
        first = next((n for n in (_aligned(b.nbytes) for b in buffers if b.nbytes >= SHARED_MIN) if n <= free), None)
        if first is None:
            return None
        start = head
        if first > room:
            # Skip the end of the ring, if the buffer then fits at its start.
            skipped = size - at
            if first > free - skipped:
                return None
            head += skipped
            at, room = 0, free - skipped
        positions: list[int] = []
        used = 0
        mm, base = self.mm, self.base + at
        for b in buffers:
            n = b.nbytes
            if n < SHARED_MIN or _aligned(n) > room - used:
                positions.append(NOT_SHARED)
                continue
            mm[base + used : base + used + n] = b
            positions.append(head + used)
            used += _aligned(n)
        if not used:
            return None
        self.head = end = head + used
        return Placement(start, end, positions)

    def publish(self, placement: Placement, packet_id: int) -> None:
        """(results ring) The frame about to be written took ``placement``:
        recorded, in case the worker dies before it is written whole."""
        self.set_cell(FRAME_FROM, placement.start)
        self.set_cell(FRAME_PACKET, packet_id)
        self.set_cell(HEAD, placement.end)

    def written(self) -> None:
        """(results ring) The frame of the last ``publish`` is written whole."""
        self.set_cell(FRAME_PACKET, NO_FRAME)

    def empty(self) -> None:
        """(arguments ring) Its reader is gone: every range is free again."""
        self.set_cell(HEAD, self.head)
        self.set_cell(TAIL, self.head)


class RingReader(_Ring):
    """The reading end of one ring (the main process's for a slot's
    results; a worker's for its arguments)."""

    def __init__(self, mm: mmap.mmap, which: int, ring_bytes: int) -> None:
        super().__init__(mm, which, ring_bytes)
        self.tail = self.cell(TAIL)
        # Ranges read, by start: (end, a weak reference to the view on it,
        # or None for a range given back without one).
        self.ranges: dict[int, tuple[int, Optional[Callable[[], Any]]]] = {}

    def view(self, start: int, data: int, end: int) -> memoryview:
        """A writable view of the ring from ``data`` to ``end``, in the frame
        range starting at ``start``: the range is given back once the view,
        and everything made on it, is gone (see reclaim)."""
        at = self.base + data % self.size
        block = (ctypes.c_ubyte * (end - data)).from_buffer(self.mm, at)
        self.ranges[start] = (end, weakref.ref(block))
        return memoryview(block)

    def close(self) -> None:
        """No more frames will be read: the mapping is closed now (its
        descriptor with it), unless results on it live; then it goes with
        the last of them."""
        try:
            self.mm.close()
        except BufferError:
            pass

    def forget(self, start: int, end: int) -> None:
        """Give the range back: nobody will read it (see Dispatcher.on_drained).
        May be called from another thread than the reader's."""
        self.ranges[start] = (end, None)

    def reclaim(self) -> None:
        """Give back, in ring order, the ranges whose views are gone.

        Idempotent step by step (a Ctrl-C may cut it anywhere): the tail
        moves first, then the range is dropped from the table."""
        ranges = self.ranges
        while True:
            tail = self.tail
            entry = ranges.get(tail)
            if entry is None:
                return
            end, ref = entry
            if ref is not None and ref() is not None:
                return
            self.tail = end
            self.set_cell(TAIL, end)
            ranges.pop(tail, None)


class SlotRings:
    """The main process's ends of a slot's region: it reads the results
    ring, and its dispatcher writes the arguments ring."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.mm = region.mapping()
        self.results = RingReader(self.mm, RESULTS, region.ring_bytes)
        self.results.set_cell(FRAME_PACKET, NO_FRAME)  # (no worker has begun a frame)
        self.args = RingWriter(self.mm, ARGS, region.ring_bytes)

    def let_go(self) -> None:
        """(every worker is gone) The arguments ring's memory goes back to the
        system now; the results ring's stays while results on it live."""
        if _MADV_REMOVE is not None and not self.mm.closed:
            try:
                self.mm.madvise(_MADV_REMOVE, self.args.base, self.args.size)
            except OSError:
                pass

    def in_doubt(self) -> Optional[tuple[int, int, int]]:
        """(the slot's worker is dead) The results range and packet id of a
        frame it began and may not have written whole: ``(start, end,
        packet_id)``, or None."""
        ring = self.results
        packet = ring.cell(FRAME_PACKET)
        if packet == NO_FRAME:
            return None
        ring.set_cell(FRAME_PACKET, NO_FRAME)  # (dealt with: the next worker starts afresh)
        return ring.cell(FRAME_FROM), ring.cell(HEAD), packet


def attach(region_fd: Fd, ring_bytes: int) -> tuple[RingWriter, RingReader]:
    """In a worker: its results writer and its arguments reader."""
    mm = _map(region_fd, ring_bytes)
    return RingWriter(mm, RESULTS, ring_bytes), RingReader(mm, ARGS, ring_bytes)
