"""Running a packet's tasks, in a worker process or an executor's thread.

What a task item is (its *form*), how a packet's tasks run in order, each
exception captured in its task's slot, and the progress a process worker
records in the shared array as it goes: which packet, which task, since when
and at what stage, so that after a crash or a timeout kill the dispatcher
knows which task to blame (see _supervisor).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ._payload import SMALL_TYPES, TaskError, every_slot_fails, weigh

# What a task item is (a queue's own form, or a map's):
CALL = 0  # ParallelQueue: (fn, args, kwargs or None)
ARGS = 1  # ParallelSingleTaskQueue: (args, kwargs or None)
STAR = 2  # imap over several iterables: the args tuple
ONE = 3  # imap over one iterable: the one argument itself (cheapest to pickle)

# Layout of one slot in the shared progress array: where its worker is, so
# that after a crash or a timeout kill the dispatcher knows which task to
# blame.  P_PACKET: the packet; P_ITEM: the task's index in it (-1: none,
# or a map's function); P_START_NS: when it started (with task_timeout);
# P_SEQ: tasks started so far; P_STAGE: what the worker was doing.
PROGRESS_FIELDS = 5
P_PACKET, P_ITEM, P_START_NS, P_SEQ, P_STAGE = range(PROGRESS_FIELDS)

# Stages (P_STAGE).  Starting (not past worker_init_f yet: a fresh slot of
# the array reads so); between packets; unpickling the tasks (P_ITEM: the
# task's, in a careful packet; -1: the whole batch); running task P_ITEM;
# pickling results (likewise: P_ITEM, or the whole packet); sending them.
STAGE_STARTING, STAGE_IDLE, STAGE_LOADING, STAGE_RUNNING, STAGE_SAVING, STAGE_SENDING = range(6)


def packet_function(fn: Optional[Any], form: int, items: list[Any]) -> tuple[Optional[Any], list[Any]]:
    """``(function, task items)`` of a packet: a map's packet on a queue that
    runs any task (ParallelQueue.imap) carries its function first."""
    if fn is None and form >= STAR:
        return items[0], items[1:]
    return fn, items


def run_items(
    fn: Optional[Callable[..., Any]],
    form: int,
    items: list[Any],
    capture: Callable[[BaseException], Any],
    prog: Any = None,
    p0: int = 0,
    seq: int = 0,
    timed: bool = False,
    lo: int = 0,
    limit: int = 0,
) -> tuple[list[Any], dict[int, Any], int]:
    """Run a packet's tasks (items of ``form``) in order: ``(values, errors, seq)``.

    From task ``lo`` on (``errors`` are keyed by index from ``lo``, the
    progress array by index in the whole packet); with a ``limit``, only
    until the results weigh that much (see _payload.weigh): ``values`` then
    ends early, after the task that reached it (see _worker.SPLIT_BYTES).

    A task that raises gets ``capture(exception)`` in ``errors`` at its index
    (SystemExit too: it is that task's error); a TaskError in place of a task
    (it already failed) passes through.  ``prog``: where a process worker
    records, before each task, which one runs (its slot of the shared
    progress array), for crash attribution.  ``timed`` (task_timeout is
    set): also each task's start time and sequence number, for the timeout
    check; otherwise the sequence number is written once per packet (it only
    tells then whether the worker ever started a task), which keeps the cost
    per task at one store.
    """
    if prog is None:
        prog, p0 = [0] * PROGRESS_FIELDS, 0
    n = len(items)
    if isinstance(fn, TaskError):  # a map's function that could not be pickled or unpickled
        nones, failed = every_slot_fails(n - lo, fn)
        for k in range(lo, n):
            if type(items[k]) is TaskError:  # (its own error: see Supervisor.diagnose)
                failed[k - lo] = items[k]
        return nones, failed, seq
    at_item = p0 + P_ITEM
    if not timed:
        prog[p0 + P_SEQ] = seq + 1
    values: list[Any] = []
    errors: dict[int, Any] = {}
    weight = 0
    for k in range(lo, n):
        item = items[k]
        if timed:
            seq = mark_step(prog, p0, STAGE_RUNNING, k, seq)
        else:
            prog[at_item] = k
        if type(item) is TaskError:
            errors[k - lo] = item
            values.append(None)
            continue
        try:
            if form == ONE:
                value = fn(item)  # type: ignore[misc]
            elif form == STAR:
                value = fn(*item)  # type: ignore[misc]
            elif form == CALL:
                f, args, kwargs = item
                value = f(*args, **kwargs) if kwargs else f(*args)
            else:
                args, kwargs = item
                value = fn(*args, **kwargs) if kwargs else fn(*args)  # type: ignore[misc]
        except BaseException as e:  # noqa: BLE001 - SystemExit in a task is its error too
            errors[k - lo] = capture(e)
            values.append(None)
            continue
        values.append(value)
        if limit and type(value) not in SMALL_TYPES:
            weight += weigh(value)
            if weight >= limit:
                break
    # No task's index (the packet's length): a death before the next step
    # is not this task's (see Supervisor.diagnose).
    prog[at_item] = n
    if not timed:
        seq += len(values)
        prog[p0 + P_SEQ] = seq
    return values, errors, seq


def mark_step(prog: Any, p0: int, stage: int, k: int, seq: int) -> int:
    """Record that ``stage`` starts now for task ``k`` (task_timeout is set:
    each step is timed); the new sequence number.

    The dispatcher reads these fields while the worker writes them, as a
    sequence lock: P_SEQ is 0 while they change, and a reading counts only
    if P_SEQ was the same non-zero number before and after it.  Without the
    0, a reading could pair the next task's index with the previous task's
    start time, and blame the wrong task for a timeout.
    """
    prog[p0 + P_SEQ] = 0
    prog[p0 + P_STAGE] = stage
    prog[p0 + P_ITEM] = k
    prog[p0 + P_START_NS] = time.monotonic_ns()
    prog[p0 + P_SEQ] = seq + 1
    return seq + 1


def run_one(fn: Optional[Callable[..., Any]], form: int, item: Any) -> tuple[Any, Optional[TaskError]]:
    """Run one task (of a careful packet): ``(value, error)``."""
    values, errors, _ = run_items(fn, form, [item], capture_error)
    return values[0], errors.get(0)


def capture_error(e: BaseException) -> TaskError:
    """A task's exception as a TaskError, without our own frame on top."""
    # Drop our own frame: the traceback starts in the task.
    if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
        e = e.with_traceback(e.__traceback__.tb_next)
    try:
        return TaskError.from_exception(e)
    except BaseException as f:  # noqa: BLE001 - never lose the slot
        return TaskError(None, type(e).__name__, "<could not describe the exception>", repr(f))
