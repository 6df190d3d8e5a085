"""Shared-memory rings: large buffers cross between processes without a pipe.

Each worker slot has one region: an anonymous memory file (``memfd``, no
name anywhere: its memory goes with the last process that holds it open,
however that process dies) holding two rings::

    page 0    results ring cells  TAIL (main process) | HEAD, FRAME_FROM, FRAME_PACKET (worker)
    page 1    arguments ring cells  TAIL (worker) | HEAD (dispatcher)
    RING_BYTES   results data:   worker --> main process
    RING_BYTES   arguments data: dispatcher --> worker

A frame whose pickle has large out-of-band buffers (see _payload) puts as
many of them as fit into its ring and carries only their places: the
consumer orders a frame of a few hundred bytes while the megabytes go from
the worker to the main process (or from the dispatcher to the worker)
without it.  Buffers that do not fit go in the frame, through the pipes,
as before: a full ring slows nothing down but itself.

Nobody maps a region.  The writer copies its buffers in with one
``pwritev`` (gathered from where they are), the reader copies them out with
one ``preadv`` into memory of its own (the main process into a pooled body,
see _wire.BodyPool); the memory file's pages are used again lap after lap,
never faulted in afresh.  So what a program gets is its own memory, as
from a pipe: a child it forks has a copy, not a view that the next result
overwrites, and a result it keeps holds nothing of the ring.

Positions are bytes since the ring was made (64 bits: they never wrap); a
position's place in the ring is ``position % size``.  One writer advances
HEAD, one reader advances TAIL, each the only writer of its cell (an
aligned 8-byte write, read whole).  A frame's buffers take one contiguous
range ``[start, end)`` (``start`` counts the end of the ring skipped so
that the range does not wrap).  The reader gives a range back once the
frame is taken (the main process: see Receiver.taken; a re-read after a
Ctrl-C must find it unchanged), in ring order.

A worker that dies leaves the slot's region to the next worker in the
slot: it goes on from HEAD.  Before writing a frame, the worker records the
frame's range and packet in FRAME_FROM and FRAME_PACKET, and clears
FRAME_PACKET once the frame is written whole; a worker that died in between
left a range that nobody may read: the dispatcher gives it back unless the
consumer received that packet (see Dispatcher.on_drained).  The arguments
ring is simpler: once its worker is dead nobody reads it, and the
dispatcher empties it before the next worker starts.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from typing import Any, Optional, Sequence

from ._wire import BIG_FRAME, NOT_SHARED, WRITEV_MAX, Fd, Placement, close_fd, own_fd

__all__ = ["RING_BYTES", "SHARED_MIN", "Region", "SlotRings", "RingReader", "RingWriter"]

# A ring's size.  Packets are sized to about a megabyte (see _scheduler), so
# a ring holds dozens of them, or four buffers of 8 MiB; only the pages
# written are ever allocated (the whole ring after its first lap).
RING_BYTES = 32 << 20
# Result buffers this large or larger travel in the ring: every buffer that
# travels out of band at all (smaller ones are copied into the pickle's
# stream, see _payload.OOB_MIN, which is this same size).
SHARED_MIN = BIG_FRAME
# Argument buffers, from this size on.  Arguments do not cross the consumer
# (the dispatcher writes to each worker's pipe itself), so the ring saves
# less there, and a short job pays its first lap of fresh pages: measured,
# 100 KB to 1 MB arguments moved at 0.6x to 0.8x of the pipes in a quick
# benchmark cell, and 8 MB ones at 1.5x.
ARGS_SHARED_MIN = 4 << 20
# Each buffer starts at a multiple of this (an array's items stay aligned in
# the reader's copy, which keeps the same offsets).
ALIGN = 64
_PADDING = bytes(ALIGN)

_PAGE = mmap.PAGESIZE
_CELLS = 2 * _PAGE  # the two pages of cells
_CELL = struct.Struct("Q")
# Cells: TAIL is read while its reader moves it, so it is written with its
# complement beside it, and read again until the two agree (a read of a
# file racing a write of it may see part of each: see _Ring.tail).  The
# others are read only once their writer is gone (or before it starts).
TAIL, HEAD, FRAME_FROM, FRAME_PACKET = 0, 16, 24, 32
_TAIL = struct.Struct("QQ")
_ALL_ONES = (1 << 64) - 1
_FRAME = struct.Struct("QQQ")  # HEAD, FRAME_FROM, FRAME_PACKET, written at once
NO_FRAME = (1 << 64) - 1  # FRAME_PACKET once the frame is written whole
RESULTS, ARGS = 0, 1  # which ring of a region

_MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 1)


class Region:
    """A slot's shared memory: its descriptor."""

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
            for cells in (RESULTS * _PAGE, ARGS * _PAGE):
                os.pwrite(fd, _TAIL.pack(0, _ALL_ONES), cells + TAIL)
            os.pwrite(fd, _CELL.pack(NO_FRAME), RESULTS * _PAGE + FRAME_PACKET)  # (no worker has begun a frame)
        except BaseException:
            os.close(fd)
            raise
        return cls(own_fd(fd), ring_bytes)

    def close(self) -> None:
        close_fd(self.fd)


class _Ring:
    """One ring of a region, read and written through its descriptor."""

    def __init__(self, fd: Fd, which: int, ring_bytes: int) -> None:
        self.fd = fd
        self.size = ring_bytes
        self.base = _CELLS + which * ring_bytes
        self.cells = which * _PAGE

    def cell(self, offset: int) -> int:
        return int(_CELL.unpack(os.pread(self.fd.fd, 8, self.cells + offset))[0])

    def set_cell(self, offset: int, value: int) -> None:
        os.pwrite(self.fd.fd, _CELL.pack(value), self.cells + offset)

    def read_tail(self) -> int:
        """TAIL, whole: a read that saw part of a write is read again."""
        while True:
            value, check = _TAIL.unpack(os.pread(self.fd.fd, 16, self.cells + TAIL))
            if value ^ check == _ALL_ONES:
                return int(value)

    def write_tail(self, value: int) -> None:
        os.pwrite(self.fd.fd, _TAIL.pack(value, value ^ _ALL_ONES), self.cells + TAIL)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class RingWriter(_Ring):
    """The writing end of one ring (a worker's results; the dispatcher's
    arguments for one slot)."""

    def __init__(self, fd: Fd, which: int, ring_bytes: int, min_size: int = SHARED_MIN) -> None:
        super().__init__(fd, which, ring_bytes)
        self.head = self.cell(HEAD)  # (a worker goes on where the one before it stopped)
        self.min_size = max(min_size, SHARED_MIN)

    def place(self, buffers: Sequence[memoryview]) -> Optional[Placement]:
        """Copy into the ring, in one contiguous range, those of ``buffers``
        that are large enough and fit; None if none did."""
        size, head = self.size, self.head
        free = size - (head - self.read_tail())
        at = head % size
        # The first buffer that could fit decides where the range begins.
        least = self.min_size
        first = next((n for n in (_aligned(b.nbytes) for b in buffers if b.nbytes >= least) if n <= free), None)
        if first is None:
            return None
        start = head
        room = min(free, size - at)  # without skipping the ring's end
        if first > room:
            # Skip the end of the ring, if the buffer then fits at its start.
            # (Only then: a range counts what it skips until it is given
            # back, so skipping early, to keep to pages already written,
            # left the ring short by the skip and sent most packets by pipe.)
            skipped = size - at
            if first > free - skipped:
                return None
            head += skipped
            at, room = 0, free - skipped
        positions: list[int] = []
        parts: list[Any] = []
        used = written = 0
        for b in buffers:
            n = b.nbytes
            if n < least or _aligned(n) > room - used:
                positions.append(NOT_SHARED)
                continue
            if written < used:
                parts.append(_PADDING[: used - written])  # (the previous one's alignment)
            parts.append(b)
            positions.append(head + used)
            used += _aligned(n)
            written = used - _aligned(n) + n
        if not used:
            return None
        _write_all(self.fd.fd, parts, self.base + at)
        self.head = end = head + used
        return Placement(start, end, positions)

    def publish(self, placement: Placement, packet_id: int) -> None:
        """(results ring) The frame about to be written took ``placement``:
        recorded, in case the worker dies before it is written whole."""
        os.pwrite(self.fd.fd, _FRAME.pack(placement.end, placement.start, packet_id), self.cells + HEAD)

    def written(self) -> None:
        """(results ring) The frame of the last ``publish`` is written whole."""
        self.set_cell(FRAME_PACKET, NO_FRAME)

    def empty(self) -> None:
        """(arguments ring) Its reader is gone: every range is free again."""
        self.set_cell(HEAD, self.head)
        self.write_tail(self.head)


def _write_all(fd: int, parts: list[Any], offset: int) -> None:
    """Write ``parts`` one after the other from ``offset``, with as few
    system calls as the kernel allows (IOV_MAX)."""
    for k in range(0, len(parts), WRITEV_MAX):
        batch = [memoryview(p).cast("B") for p in parts[k : k + WRITEV_MAX]]
        while batch:
            n = os.pwritev(fd, batch, offset)
            offset += n
            while batch and n >= batch[0].nbytes:
                n -= batch[0].nbytes
                batch.pop(0)
            if n:
                batch[0] = batch[0][n:]


class RingReader(_Ring):
    """The reading end of one ring (the main process's for a slot's
    results; a worker's for its arguments)."""

    def __init__(self, fd: Fd, which: int, ring_bytes: int) -> None:
        super().__init__(fd, which, ring_bytes)
        self.tail = self.read_tail()
        self.done: dict[int, int] = {}  # ranges given back, by start: their end
        self.lock = threading.Lock()  # (the dispatcher gives back too: forget)

    def phase(self, data: int) -> int:
        """Where in its page the ring's position ``data`` lies (see
        _wire.BodyPool: a copy is fastest into the same place in a page)."""
        return (self.base + data % self.size) % _PAGE

    def read(self, data: int, end: int, into: Any) -> None:
        """Copy the ring from position ``data`` to ``end`` into ``into``."""
        view = memoryview(into).cast("B")[: end - data]
        offset = self.base + data % self.size
        while view.nbytes:
            n = os.preadv(self.fd.fd, [view], offset)
            if n <= 0:
                raise OSError("a ring ended early")  # (cannot happen: the file has its size)
            view, offset = view[n:], offset + n

    def give_back(self, start: int, end: int) -> None:
        """The range ``[start, end)`` is read (or will never be): the writer
        may use it again, once every range before it is given back too.
        Idempotent step by step (a Ctrl-C may cut it anywhere): a range is
        recorded first, then the tail moves, then the record goes."""
        with self.lock:
            done = self.done
            done[start] = end
            while True:
                tail = self.tail
                end = done.get(tail, -1)
                if end < 0:
                    return
                self.tail = end
                self.write_tail(end)
                done.pop(tail, None)

    forget = give_back  # a range nobody will read (see Dispatcher.on_drained)


class SlotRings:
    """The main process's ends of a slot's region: it reads the results
    ring, and its dispatcher writes the arguments ring."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.results = RingReader(region.fd, RESULTS, region.ring_bytes)
        self.args = RingWriter(region.fd, ARGS, region.ring_bytes, ARGS_SHARED_MIN)

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


def attach(region: Fd, ring_bytes: int) -> tuple[RingWriter, RingReader]:
    """In a worker: its results writer and its arguments reader."""
    return RingWriter(region, RESULTS, ring_bytes), RingReader(region, ARGS, ring_bytes)
