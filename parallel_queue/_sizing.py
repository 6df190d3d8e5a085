"""How many tasks a packet carries: what both dispatchers share.

A packet costs a few system calls and wake-ups (or, on an executor, a
future and a callback) whatever it holds, so packets should be big; but a
big packet holds results back, gives one worker work another could share,
and makes a crash re-run more of its neighbours.  The dispatchers size each
packet from running means of the measured task time (and size), aiming at a
few milliseconds of work.
"""

from __future__ import annotations

from typing import Optional

# The most tasks in one packet.  More amortises the per-packet cost further,
# but holds more results back at once and makes a crash re-run more
# neighbours of the task that crashed.
MAX_BATCH = 1024

# Weight of the newest measurement in a running mean of task time or size.
# Higher follows changes in the workload faster, lower is steadier.
EWMA_WEIGHT = 0.3


def running_mean(mean: float, sample: float) -> float:
    """The running mean after ``sample``; a ``mean`` of 0 means none yet."""
    return sample if mean == 0 else mean + EWMA_WEIGHT * (sample - mean)


def packet_limit(max_batch: Optional[int], item_seconds: float, target_seconds: float) -> int:
    """The most tasks the next packet may take: ``max_batch`` (or
    ``MAX_BATCH``), no more than about ``target_seconds`` of measured work,
    and one while no task time is known yet (so the first worker does not
    take everything)."""
    limit = max_batch or MAX_BATCH
    if item_seconds > 0:
        return min(limit, max(1, int(target_seconds / item_seconds)))
    return 1
