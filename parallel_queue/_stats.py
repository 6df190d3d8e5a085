"""Queue statistics: counters kept where they change, read on demand.

Counts are kept where they change anyway (tasks put and delivered are
derived from the queues' lengths, so put()'s and get()'s fast paths count
nothing).  Latency is sampled: one put() in ``SAMPLE_EVERY`` (by a ticket
drawn from an ``itertools.count``, one C call) takes the locked path, which
records the task's put time; its latency, taken when get() reaches the
result's packet, is kept in a bounded window.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any, Optional

# One put() in this many has its task's latency measured (a power of two:
# the test is a bit mask).  Lower measures more tasks, and costs more: a
# sampled put() takes the lock.
SAMPLE_EVERY = 16

# How many recent latency samples p50 and p99 are computed from.
WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue's counters (``q.stats()``).

    >>> from parallel_queue import ParallelQueue
    >>> with ParallelQueue(num_workers=1) as q:
    ...     q.put(abs, -1)
    ...     q.get()
    ...     q.stats().results_delivered
    1
    1
    """

    tasks_put: int  #: tasks accepted by put() (markers not counted)
    results_delivered: int  #: task results (and errors) handed out by get()
    errors: int  #: of those, errors raised in their slots
    markers_put: int  #: markers accepted by put()
    markers_delivered: int  #: markers handed back by get()
    in_flight: int  #: tasks put but not yet delivered
    pending: int  #: tasks waiting to be sent to a worker
    reorder_buffer_packets: int  #: packets waiting for earlier ones (in the consumer; with an executor, here)
    reorder_buffer_items: int  #: tasks in those packets
    workers_alive: int  #: worker processes running now (with an executor: its size while the queue runs)
    workers_replaced: int  #: workers started to replace dead or recycled ones
    latency_mean: Optional[float]  #: seconds from put() until get() reached the result's packet (sampled)
    latency_p50: Optional[float]  #: median of the latest 4096 sampled latencies, in seconds
    latency_p99: Optional[float]  #: 99th percentile of the latest 4096 sampled latencies, in seconds

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (for logging or JSON)."""
        return dataclasses.asdict(self)


class LatencySampler:
    """Put times of sampled tasks, and the latencies of those delivered."""

    __slots__ = ("put_times", "recent", "total", "count")

    def __init__(self) -> None:
        # (task index, put time) in index order: appended under the queue's
        # lock, popped under the delivery lock (opposite ends of a deque).
        self.put_times: deque[tuple[int, float]] = deque()
        # Written under the delivery lock (got_range); summary() is read
        # with both locks held (see Core.stats).
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.total = 0.0
        self.count = 0

    def put_at(self, index: int) -> None:
        """Task ``index`` was just put (a sampled one)."""
        self.put_times.append((index, time.monotonic()))

    def got_range(self, first: int, n: int) -> None:
        """Tasks ``first .. first+n-1`` were just delivered."""
        put_times = self.put_times
        end = first + n
        if put_times and put_times[0][0] < end:
            now = time.monotonic()
            while put_times and put_times[0][0] < end:
                index, t = put_times.popleft()
                if index >= first:  # older ones: tasks withdrawn after stop()
                    lat = now - t
                    self.recent.append(lat)
                    self.total += lat
                    self.count += 1

    def summary(self) -> tuple[Optional[float], Optional[float], Optional[float]]:
        if not self.count:
            return None, None, None
        ordered = sorted(self.recent)
        return (
            self.total / self.count,
            ordered[len(ordered) // 2],
            ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)],
        )
