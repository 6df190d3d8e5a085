"""The scheduler alone: which slot gets the next packet, and how big it is.

Pure logic over slots and measured means: no process, no pipe.
"""

from __future__ import annotations

from parallel_queue._intake import TaskBatch
from parallel_queue._options import CREDITS_PER_WORKER
from parallel_queue._scheduler import GROWTH, TARGET_PACKET_BYTES, TARGET_PACKET_SECONDS, Scheduler, free_credits
from parallel_queue._sizing import MAX_BATCH
from parallel_queue._slots import Child, PacketRecord, Slot, SlotState
from parallel_queue._wire import Fd


def running_slots(n: int) -> list[Slot]:
    slots = [Slot(i, Fd(-1), Fd(-1)) for i in range(n)]
    for slot in slots:
        slot.started(Child(None), Fd(-1))
    return slots


def hold(slot: Slot, packets: int) -> None:
    for _ in range(packets):
        slot.outstanding.append(PacketRecord(0, 0, TaskBatch([None], 0, None)))


def test_picks_the_running_slot_with_the_fewest_packets():
    slots = running_slots(3)
    hold(slots[0], 1)
    hold(slots[1], 0)
    hold(slots[2], 1)
    assert Scheduler(None, 0).pick_slot(slots) is slots[1]


def test_no_slot_without_credit_or_running_or_with_a_half_written_packet():
    slots = running_slots(4)
    hold(slots[0], CREDITS_PER_WORKER)  # no credit left
    slots[1].stop_sent()  # told to stop
    slots[2].worker_ended()  # its worker ended
    slots[3].writer._out.append(memoryview(b"x"))  # a packet still being written
    slots[3].writer.pending_bytes = 1
    assert Scheduler(None, 0).pick_slot(slots) is None
    assert [s.state for s in slots[1:3]] == [SlotState.STOPPING, SlotState.DRAINING]
    assert free_credits(slots) == CREDITS_PER_WORKER  # (the one with a write pending)


def test_quota_closes_a_slot_and_caps_its_packet():
    slots = running_slots(1)
    s = Scheduler(None, max_tasks_per_worker=10)
    slots[0].sent_items = 7
    assert s.pick_slot(slots) is slots[0]
    assert s.batch_size(slots[0], waiting=100, fixed=None, free_credits=2) <= 3
    assert s.batch_size(slots[0], waiting=100, fixed=50, free_credits=2) == 3
    slots[0].sent_items = 10
    assert s.pick_slot(slots) is None


def test_one_task_until_task_time_is_measured():
    s = Scheduler(None, 0)
    slot = running_slots(1)[0]
    assert s.batch_size(slot, waiting=500, fixed=None, free_credits=4) == 1


def test_tiny_tasks_go_in_one_big_packet():
    s = Scheduler(None, 0)
    slot = running_slots(1)[0]
    s.measured_time(1000, 1000 * 1000)  # 1 µs a task
    assert s.batch_size(slot, waiting=500, fixed=None, free_credits=4) == 500
    assert s.batch_size(slot, waiting=5000, fixed=None, free_credits=4) == MAX_BATCH


def test_slow_tasks_spread_over_the_free_credits():
    s = Scheduler(None, 0)
    slot = running_slots(1)[0]
    s.measured_time(1, int(TARGET_PACKET_SECONDS * 1e9))  # one task is a packet's worth
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=4) == 1
    s = Scheduler(None, 0)
    s.measured_time(50, int(TARGET_PACKET_SECONDS * 1e9))  # 50 a packet's worth
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=4) == 25  # 100 over 4 credits


def test_packets_grow_from_one_task_by_steps():
    """Regression: a map whose first results were small (an int, then 8 MB
    results every other task) was sized from one measured packet: 195 tasks
    in the next one (784 MB).  A packet is at most GROWTH times the largest
    one measured, so a size that tasks hide at first is measured in time."""
    s = Scheduler(None, 0)
    slot = running_slots(1)[0]
    sizes = []
    for _ in range(6):
        n = s.batch_size(slot, waiting=5000, fixed=None, free_credits=1)
        sizes.append(n)
        s.measured_time(n, n * 1000)  # 1 us a task
    assert sizes == [1, GROWTH, GROWTH**2, GROWTH**3, MAX_BATCH, MAX_BATCH]


def test_large_tasks_are_capped_by_size_and_max_batch():
    s = Scheduler(max_batch=8, max_tasks_per_worker=0)
    slot = running_slots(1)[0]
    s.measured_time(100, 100)
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=1) == 8
    s = Scheduler(None, 0)
    s.measured_time(100, 100)
    s.measured_size(1, TARGET_PACKET_BYTES // 4)  # four tasks fill a packet
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=1) == 4


def test_large_results_cap_a_packet_as_large_tasks_do():
    """A packet's results travel together, once its last task has run: large
    ones (tiny tasks making arrays) are capped by their measured size too,
    the larger of the two sizes counting."""
    slot = running_slots(1)[0]
    s = Scheduler(None, 0)
    s.measured_time(100, 100)
    s.measured_size(100, 1000)  # tiny arguments
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=1) == 100
    s.measured_result_size(2, TARGET_PACKET_BYTES)  # two results fill a packet
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=1) == 2
    s.measured_result_size(5, 0)  # (a packet whose size is unknown changes nothing)
    assert s.batch_size(slot, waiting=100, fixed=None, free_credits=1) == 2


def test_a_new_map_is_sized_afresh():
    """Regression: a queue warmed up on tiny tasks sized a map's first packet
    from their means: 200 tasks of 8 MB results went in one packet (1.6 GB,
    one worker).  A new workload (a map's function, or put() after a map)
    starts again from one task per packet; a map of the same function after
    another keeps its pace."""
    slot = running_slots(1)[0]
    s = Scheduler(None, 0)
    for _ in range(5):
        s.measured_time(100, 100)
    s.measured_size(100, 1000)
    assert s.batch_size(slot, waiting=200, fixed=None, free_credits=1) == 200
    fn = object()
    s.work_on(fn)
    assert s.batch_size(slot, waiting=200, fixed=None, free_credits=4) == 1
    s.measured_time(1, 100)
    s.measured_result_size(1, TARGET_PACKET_BYTES // 2)  # its results are large: two fill a packet
    assert s.batch_size(slot, waiting=200, fixed=None, free_credits=1) == 2
    s.work_on(fn)  # the same function again: its measures stay
    assert s.batch_size(slot, waiting=200, fixed=None, free_credits=1) == 2
    s.work_on(None)
    assert s.batch_size(slot, waiting=200, fixed=None, free_credits=4) == 1
