"""Which worker gets the next packet, and how many tasks it carries.

Pure logic over the slots and two running means: no process, no pipe, no
lock (the dispatcher holds the queue's lock when it asks how many tasks to
take).  Batches size themselves: a worker that is idle gets what is there at
once (one task at low load), and while every worker is busy, tasks
accumulate, so the next batch is larger; a measured per-task time caps a
batch at about ``TARGET_PACKET_SECONDS`` of work, so slow tasks still
spread over all workers, and a measured size (of a task, or of its result,
whichever is larger) caps it at about ``TARGET_PACKET_BYTES``.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ._sizing import packet_limit, running_mean
from ._slots import Slot

__all__ = ["Scheduler", "TARGET_PACKET_SECONDS", "TARGET_PACKET_BYTES"]

# How much work (by measured task time) a packet should carry.  Longer packets
# cost less per task; shorter ones balance better when tasks are slow or of
# uneven length, and keep the reorder window (counted in packets) short.
TARGET_PACKET_SECONDS = 0.005

# The most pickled bytes a packet should carry, either way (by the measured
# mean size of a task and of a result).  Bigger packets cost less per task
# for small tasks; for large arguments or results (arrays, documents) a cap
# keeps one packet from holding gigabytes, lets several workers share them,
# and lets results flow on to the main process while the next ones are made
# (a packet's results travel together, once its last task has run).
TARGET_PACKET_BYTES = 1 << 20

# How much larger than the largest packet measured so far the next may be
# (see Scheduler.batch_size).  Larger reaches big packets of tiny tasks in
# fewer round trips (each a few hundred microseconds, at every map's start);
# smaller sends fewer tasks on means that may not hold for them.
GROWTH = 8


class Scheduler:
    """Picks slots and sizes packets from what it has measured."""

    __slots__ = ("max_batch", "quota", "item_seconds", "item_bytes", "result_bytes", "largest", "workload")

    def __init__(self, max_batch: Optional[int], max_tasks_per_worker: int) -> None:
        self.max_batch = max_batch
        self.quota = max_tasks_per_worker  # 0: no limit
        self.item_seconds = 0.0  # running mean of a task's run time; 0 until measured
        self.item_bytes = 0.0  # running mean of a task's pickled size
        self.result_bytes = 0.0  # running mean of a result's pickled size
        self.largest = 0  # the most tasks of a packet measured so far
        self.workload: object = None  # what ``largest`` was measured on (see work_on)

    def work_on(self, workload: object) -> None:
        """The tasks to size from now on are ``workload``'s (a map's function,
        or None for tasks put one by one): if that changed, packets grow from
        one task again (see batch_size), as the sizes measured on the last
        workload may not hold.  (A queue warmed up on tiny tasks once sent a
        map's 200 tasks of 8 MB results in one packet: 1.6 GB, to one
        worker, before any of them was measured.)  Maps of the same function
        one after the other keep their pace."""
        if workload is not self.workload:
            self.workload = workload
            self.largest = 0

    def pick_slot(self, slots: Iterable[Slot]) -> Optional[Slot]:
        """The slot that may take a packet now with the fewest packets held."""
        best: Optional[Slot] = None
        for slot in slots:
            if slot.can_take(self.quota) and (best is None or len(slot.outstanding) < len(best.outstanding)):
                best = slot
        return best

    def batch_size(self, slot: Slot, waiting: int, fixed: Optional[int], free_credits: int) -> int:
        """How many of the ``waiting`` tasks ``slot``'s next packet takes:
        ``fixed`` of them if a map asked for that (its chunksize); never more
        than the worker's quota leaves."""
        if fixed:
            n = min(fixed, waiting)
        else:
            limit = packet_limit(self.max_batch, self.item_seconds, TARGET_PACKET_SECONDS)
            size = max(self.item_bytes, self.result_bytes)
            if size > 0:
                limit = min(limit, max(1, int(TARGET_PACKET_BYTES / size)))
            # Packets grow from one task, by at most GROWTH times the largest
            # one measured: means taken on a few tasks may not hold for many (a
            # map whose first result was small, and every other one 8 MB,
            # sent 195 tasks in its next packet: 784 MB of results).
            limit = min(limit, max(1, GROWTH * self.largest))
            n = min(limit, waiting)
            if waiting * self.item_seconds > TARGET_PACKET_SECONDS or self.item_seconds == 0:
                # Enough work waiting to matter: spread it over the free
                # credits, so idle workers all get a share instead of the
                # first one taking the lot.  (Tiny tasks go in one packet:
                # fewer wake-ups.)
                n = min(n, -(-waiting // max(1, free_credits)))
        if self.quota:  # a worker recycled after max_tasks_per_worker never takes more
            n = min(n, self.quota - slot.sent_items)
        return max(1, n)

    def measured_time(self, n_items: int, compute_ns: int) -> None:
        """A worker ran ``n_items`` tasks in ``compute_ns``."""
        self.largest = max(self.largest, n_items)
        if n_items:
            self.item_seconds = running_mean(self.item_seconds, compute_ns / n_items / 1e9)

    def measured_result_size(self, n_items: int, result_bytes: int) -> None:
        """A packet of ``n_items`` results came to ``result_bytes``."""
        if n_items and result_bytes:
            self.result_bytes = running_mean(self.result_bytes, result_bytes / n_items)

    def measured_size(self, n_items: int, payload_bytes: int) -> None:
        """A packet of ``n_items`` tasks pickled to ``payload_bytes``."""
        if n_items:
            self.item_bytes = running_mean(self.item_bytes, payload_bytes / n_items)


def free_credits(slots: Iterable[Slot]) -> int:
    """Packets the running workers may still take, all told."""
    return sum(slot.credits() for slot in slots)
