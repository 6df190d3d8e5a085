"""The shared-memory rings (see parallel_queue._region), writer and reader in
one process: what the allocator promises, tried at random."""

from __future__ import annotations

import os
import random
import struct
import threading

import pytest

from parallel_queue import _region, _wire
from parallel_queue._region import ALIGN, SHARED_MIN, Region, RingReader, SlotRings, attach
from parallel_queue._wire import NOT_SHARED

RING = 1 << 20


@pytest.fixture
def rings():
    region = Region.create(RING)
    if region is None:
        pytest.skip("no memfd here")
    main = SlotRings(region)
    writer, reader = attach(region.fd, RING)  # (a worker's ends)
    yield main, writer, reader
    region.close()


def pattern(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return rnd.randbytes(n) if hasattr(rnd, "randbytes") else bytes(rnd.getrandbits(8) for _ in range(n))


@pytest.mark.parametrize("seed", range(8))
def test_no_range_not_given_back_is_ever_written_over(rings, seed):
    """Random frames of random buffers go through the results ring; the
    reader gives ranges back in a random order, some only much later.  A
    range not given back yet always reads exactly what was written into it,
    however the ring wrapped; a frame either gets its place or goes in the
    frame (None); once every range is given back, the whole ring is free."""
    main, writer, _ = rings
    reader: RingReader = main.results
    rnd = random.Random(seed)
    held: list[tuple[int, int, list[tuple[int, bytes]]]] = []
    placed = 0
    for step in range(200):
        sizes = [
            rnd.choice([SHARED_MIN - 1, SHARED_MIN, SHARED_MIN + 1, 3 * SHARED_MIN, RING // 5, RING // 2, RING + 1])
            for _ in range(rnd.randint(1, 4))
        ]
        datas = [pattern(n, seed * 1000 + step * 10 + k) for k, n in enumerate(sizes)]
        p = writer.place([memoryview(d) for d in datas])
        if p is None:
            # Refused only when its first large buffer does not fit in one
            # piece: the ring is in use, or (empty) it is larger than the
            # free space either side of where the ring stands.
            at = writer.head % RING
            first = next((n for n in sizes if SHARED_MIN <= n <= RING), None)
            empty = reader.tail == writer.head
            assert first is None or not empty or first > max(at, RING - at)
        else:
            placed += 1
            assert p.end - p.start <= RING
            shared = [(q, d) for q, d in zip(p.positions, datas) if q != NOT_SHARED]
            assert all(len(d) >= SHARED_MIN for _, d in shared)
            assert all(q % ALIGN == 0 for q, _ in shared)
            held.append((p.start, p.end, shared))
        # Every range not given back still holds what was written.
        for _, end, shared in held:
            data = min(q for q, _ in shared)
            copy = bytearray(end - data)
            reader.read(data, end, copy)
            assert all(bytes(copy[q - data : q - data + len(d)]) == d for q, d in shared)
        rnd.shuffle(held)
        for start, end, _ in held[: rnd.randint(0, len(held))]:
            reader.give_back(start, end)
        held = [h for h in held if h[0] >= reader.tail and h[0] not in reader.done]  # (not given back)
    assert placed > 20 and writer.head > 3 * RING  # (the ring went round several times)
    for start, end, _ in held:
        reader.give_back(start, end)
    assert reader.tail == writer.head  # every range given back
    assert writer.place([memoryview(bytes(RING // 2))]) is not None  # (fits either side of any place)


def test_a_forgotten_range_is_given_back_in_its_turn(rings):
    """A range nobody will read (a worker died writing its frame) is given
    back with the others, in ring order."""
    main, writer, _ = rings
    reader = main.results
    a = writer.place([memoryview(bytes(RING // 2))])
    b = writer.place([memoryview(bytes(RING // 4))])
    assert a is not None and b is not None
    reader.give_back(b.start, b.end)
    assert reader.tail == 0  # b waits for a
    reader.forget(a.start, a.end)
    assert reader.tail == b.end
    assert writer.read_tail() == b.end  # the writer sees it


def test_the_arguments_ring_is_emptied_for_a_new_worker(rings):
    """A dead worker's arguments ring is emptied before the next one starts:
    everything its reader never gave back is free again."""
    main, _, _ = rings
    args = _region.RingWriter(main.region.fd, _region.ARGS, RING)  # (buffers of any size, in this small ring)
    while args.place([memoryview(bytes(RING // 3))]) is not None:
        pass
    args.empty()
    _, reader = attach(main.region.fd, RING)
    assert reader.tail == args.head
    assert args.place([memoryview(bytes(RING // 3))]) is not None


def test_a_tail_read_half_written_is_read_again(rings):
    """A read of TAIL that saw part of a write (forced here: a value whose
    check does not match) is not taken; the reader reads again until the
    write is whole."""
    main, writer, _ = rings
    cells = _region.RESULTS * _region._PAGE + _region.TAIL
    torn = struct.pack("QQ", 0x0100_0000, 0x00FF_FFFF ^ ((1 << 64) - 1))  # new value, old check
    os.pwrite(main.region.fd.fd, torn, cells)
    done = threading.Event()

    def finish_the_write():
        done.wait()
        main.results.write_tail(0x0100_0000)

    t = threading.Thread(target=finish_the_write)
    t.start()
    got = []
    reader = threading.Thread(target=lambda: got.append(writer.read_tail()))
    reader.start()
    reader.join(0.2)
    assert got == []  # still reading again: the torn value was not taken
    done.set()
    reader.join(60)
    t.join(60)
    assert got == [0x0100_0000]


def test_a_packets_size_counts_its_buffers_not_the_ring_it_skipped():
    """Regression: the consumer reported a packet's size with the ring range
    its buffers took, which counts the end of the ring skipped to reach its
    start (megabytes): the dispatcher then sent packets of one task."""
    buffers = [memoryview(bytes(100 << 10)), memoryview(bytes(100 << 10))]
    skip = 30 << 20
    placement = _wire.Placement(0, skip + 2 * (100 << 10), [skip, skip + (100 << 10)])
    body = _wire.encode_result(1, 2, 0, False, buffers, placement, 0) + b"pickle"
    header = _wire.decode_result(body)
    assert _wire.result_bytes(body, header) == len(body) + 2 * (100 << 10)
