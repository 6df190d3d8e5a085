"""parallel_queue: a multi-process task queue that returns results in put order.

>>> from parallel_queue import ParallelQueue
>>> with ParallelQueue(num_workers=2) as q:
...     q.put(sum, [1, 2])
...     q.get()
3
"""

from ._errors import (
    ParallelQueueError,
    QueueBrokenError,
    QueueClosedError,
    QueueStopped,
    RemoteError,
    TaskTimeoutError,
    WorkerInitError,
    WorkerLostError,
)
from ._imap import aimap, imap
from ._maps import AsyncIMapIterator, IMapIterator
from ._packet_id import PacketID
from ._queue import ParallelQueue, ParallelSingleTaskQueue
from ._stats import QueueStats

__version__ = "1.0.0.dev0"

__all__ = [
    "ParallelQueue",
    "ParallelSingleTaskQueue",
    "PacketID",
    "imap",
    "IMapIterator",
    "aimap",
    "AsyncIMapIterator",
    "QueueStats",
    "ParallelQueueError",
    "QueueStopped",
    "QueueClosedError",
    "QueueBrokenError",
    "WorkerInitError",
    "WorkerLostError",
    "TaskTimeoutError",
    "RemoteError",
]
