"""The executors a queue can run its tasks on, each as a backend class.

A backend submits one call per packet and turns the call's outcome into the
packet's ``(values, errors)``, with the same per-task error isolation as our
own workers (``_tasks.run_items``):

- ``ThreadBackend`` (a ``ThreadPoolExecutor``): the tasks run in this
  process, so values and exceptions are handed over as they are.
- ``ProcessPoolBackend`` (a ``ProcessPoolExecutor``, or any
  ``concurrent.futures`` executor): each packet goes as one cloudpickled
  payload and comes back as one, so the function may be a lambda.
- ``DaskBackend`` (a ``distributed.Client``): as a process pool, with a
  unique key per call, so the scheduler never merges two of them.

The queue never shuts the executor down: it is the caller's.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
import traceback
import uuid
from typing import Any, Callable, Optional, Protocol

import cloudpickle

from ._intake import TaskBatch
from ._payload import (
    TaskError,
    dumps_individually,
    dumps_results,
    dumps_tasks,
    every_slot_fails,
    loads_tasks,
)
from ._salvage import load_results
from ._tasks import capture_error, packet_function, run_items

__all__ = ["Backend", "backend_for", "Outcome", "REJECTED"]

# What a process pool's call returns for a batch that would not unpickle
# there as a whole: the engine submits it again, one pickle per task.
REJECTED = b"parallel_queue:rejected"

# A packet's results: (values, errors), errors[k] in place of values[k].
Outcome = tuple[list[Any], dict[int, Any]]


class Backend(Protocol):
    """How the executor engine uses an executor (see the module docstring)."""

    #: How many tasks the executor runs at once (the queue's num_workers).
    workers: int

    def submit(self, batch: TaskBatch, careful: bool, seq: int, first: int) -> Any:
        """Submit one packet; a future (``add_done_callback``, ``result``)."""

    def outcome(self, batch: TaskBatch, first: int, returned: Any) -> tuple[int, Optional[Outcome]]:
        """(ns of compute, the packet's results) from what the call returned
        (``first``: the packet's first task); None for a batch the executor
        could not unpickle (REJECTED)."""

    def failed(self, batch: TaskBatch, error: BaseException) -> Outcome:
        """The call itself failed (a lost Dask worker, a broken pool): every
        task of the packet gets that error in its slot."""


class LiveError:
    """A task's exception from a thread: handed over as the very object."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def to_exception(self) -> BaseException:
        exc = self.exc
        if not hasattr(exc, "stack_trace"):
            try:  # 0.5 compatibility, as for process workers
                exc.stack_trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))  # type: ignore[attr-defined]
            except Exception:
                pass
        return exc


def run_packet_local(
    fn: Optional[Callable[..., Any]], form: int, items: list[Any]
) -> tuple[int, list[Any], dict[int, Any]]:
    """In a thread of the executor: run the packet, hand back live objects."""
    fn, items = packet_function(fn, form, items)
    t0 = time.perf_counter_ns()
    values, errors, _ = run_items(fn, form, items, LiveError)
    return time.perf_counter_ns() - t0, values, errors


def run_packet_remote(
    fn_bytes: Optional[bytes], form: int, payload: bytes, careful: bool, first: int
) -> tuple[int, bytes]:
    """In another process (a process pool, a Dask worker): pickled in, pickled out."""
    try:
        items = loads_tasks(payload, careful)
    except Exception:
        return 0, REJECTED  # the engine sends it again, one pickle per task
    fn = cloudpickle.loads(fn_bytes) if fn_bytes is not None else None
    fn, items = packet_function(fn, form, items)
    t0 = time.perf_counter_ns()
    values, errors, _ = run_items(fn, form, items, capture_error)
    ns = time.perf_counter_ns() - t0
    return ns, dumps_results(values, errors, items, first)


def _pool_size(executor: Any) -> int:
    """How many calls a concurrent.futures executor runs at once."""
    return getattr(executor, "_max_workers", 0) or (os.cpu_count() or 1)


class ThreadBackend:
    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, task_fn: Optional[Callable[..., Any]]) -> None:
        self.executor = executor
        self.task_fn = task_fn
        self.workers = _pool_size(executor)

    def submit(self, batch: TaskBatch, careful: bool, seq: int, first: int) -> Any:
        return self.executor.submit(run_packet_local, self.task_fn, batch.form, batch.payload_items())

    def outcome(self, batch: TaskBatch, first: int, returned: Any) -> tuple[int, Optional[Outcome]]:
        ns, values, errors = returned
        return ns, (values, errors)

    def failed(self, batch: TaskBatch, error: BaseException) -> Outcome:
        return every_slot_fails(len(batch.items), LiveError(error))


class ProcessPoolBackend:
    def __init__(self, executor: Any, task_fn: Optional[Callable[..., Any]]) -> None:
        self.executor = executor
        self.fn_bytes = cloudpickle.dumps(task_fn) if task_fn is not None else None
        self.workers = self.executor_size(executor)

    @staticmethod
    def executor_size(executor: Any) -> int:
        return _pool_size(executor)

    def payload(self, batch: TaskBatch, careful: bool) -> tuple[bytes, bool]:
        if careful:
            return dumps_individually(batch.payload_items()), True
        return dumps_tasks(batch.payload_items())

    def submit(self, batch: TaskBatch, careful: bool, seq: int, first: int) -> Any:
        payload, careful = self.payload(batch, careful)
        return self.executor.submit(run_packet_remote, self.fn_bytes, batch.form, payload, careful, first)

    def outcome(self, batch: TaskBatch, first: int, returned: Any) -> tuple[int, Optional[Outcome]]:
        ns, payload = returned
        if payload == REJECTED:
            return ns, None
        return ns, load_results(payload, len(batch.items), first)

    def failed(self, batch: TaskBatch, error: BaseException) -> Outcome:
        err = TaskError.from_exception(error) if error.__traceback__ else TaskError.from_message(error)
        return every_slot_fails(len(batch.items), err)


class DaskBackend(ProcessPoolBackend):
    def __init__(self, client: Any, task_fn: Optional[Callable[..., Any]]) -> None:
        super().__init__(client, task_fn)
        self.token = uuid.uuid4().hex  # keys unique to this queue: no two calls are merged

    @staticmethod
    def executor_size(client: Any) -> int:
        try:
            workers = sum(client.nthreads().values())
        except Exception:
            workers = 0
        return workers or (os.cpu_count() or 1)

    def submit(self, batch: TaskBatch, careful: bool, seq: int, first: int) -> Any:
        payload, careful = self.payload(batch, careful)
        return self.executor.submit(
            run_packet_remote,
            self.fn_bytes,
            batch.form,
            payload,
            careful,
            first,
            pure=False,
            # The careful retry of a rejected packet needs a key of its own:
            # under the first one Dask hands back the first call's future
            # (its REJECTED result) instead of running the retry.
            key=f"parallel_queue-{self.token}-{seq}{'-careful' if careful else ''}",
        )


def backend_for(executor: Any, task_fn: Optional[Callable[..., Any]]) -> Backend:
    """The backend for ``executor``: a ``concurrent.futures`` executor or a Dask client."""
    if type(executor).__module__.split(".")[0] == "distributed":
        return DaskBackend(executor, task_fn)
    if not hasattr(executor, "submit"):
        raise TypeError(f"executor must be a concurrent.futures.Executor or a distributed.Client, got {executor!r}")
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return ThreadBackend(executor, task_fn)
    return ProcessPoolBackend(executor, task_fn)
