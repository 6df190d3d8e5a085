"""A queue's options: checked and resolved once, then frozen.

``Options`` is made with keywords only and cannot change afterwards: every
part of a queue (the put side, the dispatcher, the workers, the consumer)
reads the same values for the queue's whole life.  The meaning of each
option is documented once, on the public queue classes (``_queue``).
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext
from typing import Any, Callable, Mapping, Optional, Union

__all__ = ["Options", "CREDITS_PER_WORKER"]

# Packets a worker may hold at once (running + queued in its pipe).  One
# would leave it idle while the next packet travels; more would let one
# worker hoard work that an idle one could have taken, and lengthen the
# list of packets a crash takes with it.
CREDITS_PER_WORKER = 2

# The most worker processes: slot numbers travel in 16 bits (see _wire).
MAX_WORKERS = 60000


class Options:
    """The resolved options of one queue: keyword-only, frozen once built.

    ``default_workers`` is how many workers to use when ``num_workers`` is
    not given (an executor's size; the CPU count otherwise).
    """

    __slots__ = (
        "num_workers",
        "daemon",
        "in_q_max",
        "out_q_max",
        "worker_q_max",
        "worker_init_f",
        "consumer_buffer_max",
        "ctx",
        "task_timeout",
        "max_tasks_per_worker",
        "max_batch",
        "progress",
        "window",
        "max_markers",
    )

    # Every field, with its type (mypy reads these; __slots__ holds them).
    num_workers: int
    daemon: bool
    in_q_max: int
    out_q_max: int
    worker_q_max: int
    worker_init_f: Optional[Callable[[], Any]]
    consumer_buffer_max: int  # packets the reorder buffer may hold
    ctx: Any  # a multiprocessing context (typeshed's BaseContext lacks Process)
    task_timeout: Optional[float]
    max_tasks_per_worker: int  # 0: no limit
    max_batch: Optional[int]
    progress: Union[bool, Mapping[str, Any]]
    # Every packet id alive at once lies within [next, next + window): the
    # reorder buffer, plus what workers hold, plus one for the packet being
    # re-sent after a crash.
    window: int
    # Markers that may wait for get() before put(marker) blocks: as many as
    # tasks may wait, plus the results' window.  A marker costs nothing to
    # hold, and 0.5 held markers in its pipeline's buffers, so 0.5 code that
    # puts several markers with small buffers before its first get() runs
    # unchanged.
    max_markers: int

    def __init__(
        self,
        *,
        num_workers: Optional[int],
        daemon: bool,
        in_q_max: int,
        out_q_max: int,
        worker_q_max: int,
        worker_init_f: Optional[Callable[[], Any]],
        consumer_buffer_max: Optional[int],
        mp_context: Union[None, str, BaseContext],
        task_timeout: Optional[float],
        max_tasks_per_worker: Optional[int],
        max_batch: Optional[int],
        progress: Union[bool, Mapping[str, Any]],
        default_workers: Optional[int] = None,
    ) -> None:
        # Every option is given: their defaults are the public constructors'
        # (``_queue``), written nowhere else.
        workers = num_workers if num_workers is not None else (default_workers or os.cpu_count() or 1)
        _at_least(1, num_workers=workers, in_q_max=in_q_max, out_q_max=out_q_max, worker_q_max=worker_q_max)
        if workers >= MAX_WORKERS:
            raise ValueError(f"num_workers must be below {MAX_WORKERS}")
        buffer = consumer_buffer_max if consumer_buffer_max is not None else 10 * workers
        _at_least(1, consumer_buffer_max=buffer)
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be a positive number of seconds, got {task_timeout}")
        if max_tasks_per_worker is not None:
            _at_least(1, max_tasks_per_worker=max_tasks_per_worker)
        if max_batch is not None:
            _at_least(1, max_batch=max_batch)
        ctx: Any = mp_context
        if mp_context is None or isinstance(mp_context, str):
            ctx = multiprocessing.get_context(mp_context)
        window = buffer + workers * CREDITS_PER_WORKER + 1
        for name, value in (
            ("num_workers", workers),
            ("daemon", daemon),
            ("in_q_max", in_q_max),
            ("out_q_max", out_q_max),
            ("worker_q_max", worker_q_max),
            ("worker_init_f", worker_init_f),
            ("consumer_buffer_max", buffer),
            ("ctx", ctx),
            ("task_timeout", task_timeout),
            ("max_tasks_per_worker", max_tasks_per_worker or 0),
            ("max_batch", max_batch),
            ("progress", progress),
            ("window", window),
            ("max_markers", in_q_max + window),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a queue's options are frozen once built (tried to set {name!r})")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Options({fields})"


def _at_least(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
