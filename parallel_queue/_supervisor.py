"""What happens when a worker ends before its packets are done.

The dispatcher thread (``_dispatcher``) sees a worker end on its process's
descriptor, has the consumer read the dead worker's pipe to the end, and
then asks the supervisor what the death means.  The supervisor reads where
the worker was (its slot of the shared progress array, written by the
worker before each step: see ``_tasks``) and decides:

- which task, if any, gets an error in its slot (``WorkerLostError``, or
  ``TaskTimeoutError`` for a task it had the worker killed for);
- whether the packet goes again as a careful one, one task at a time, so
  that a next death names its task;
- whether the workers keep dying before they run anything, which breaks the
  queue (``WorkerInitError``) instead of restarting them for ever;
- which workers ran a task past ``task_timeout``, to be killed.

Nothing here writes to a pipe or starts a process: the dispatcher does, on
the supervisor's word.  Every decision ends: a careful packet's death either
blames one task or counts towards ``MAX_UNEXPLAINED_DEATHS``.
"""

from __future__ import annotations

import pickle
import signal
import time
from typing import Any, Iterable, Optional

from ._errors import TaskTimeoutError, WorkerInitError, WorkerLostError
from ._payload import TaskError, describe_task
from ._slots import Child, PacketRecord, Slot
from ._tasks import (
    P_ITEM,
    P_PACKET,
    P_SEQ,
    P_STAGE,
    P_START_NS,
    PROGRESS_FIELDS,
    STAGE_IDLE,
    STAGE_LOADING,
    STAGE_RUNNING,
    STAGE_SAVING,
    STAGE_STARTING,
)

# The steps a worker takes for a task, timed when task_timeout is set, and
# what a task that took too long at each did.
_TIMED = {
    STAGE_LOADING: "took longer than task_timeout={limit}s to unpickle its arguments",
    STAGE_RUNNING: "ran longer than task_timeout={limit}s",
    STAGE_SAVING: "took longer than task_timeout={limit}s to pickle its result",
}

__all__ = ["Supervisor", "MAX_STARTUP_DEATHS", "MAX_UNEXPLAINED_DEATHS"]

# A worker that dies this many times in a row without starting a task (a
# crashing initializer, a broken interpreter) breaks the queue instead of
# being restarted forever.
MAX_STARTUP_DEATHS = 3

# A packet whose worker died this many times with no task to blame (the
# results were being sent: the OOM killer, a kill from outside) fails every
# task left in it, instead of being sent forever.
MAX_UNEXPLAINED_DEATHS = 3


class Supervisor:
    """Reads the progress array after deaths and decides (module docstring)."""

    def __init__(self, progress: Any, num_slots: int, task_timeout: Optional[float]) -> None:
        self.progress = progress  # the shared array, PROGRESS_FIELDS per slot
        self.task_timeout = task_timeout
        self.startup_deaths = [0] * num_slots

    def field(self, slot: Slot, field: int) -> int:
        return int(self.progress[slot.index * PROGRESS_FIELDS + field])

    # ---------------------------------------------------------------- deaths

    def died_at_start(self, slot: Slot, proc: Child) -> Optional[WorkerInitError]:
        """Its worker ended before it was through worker_init_f, and not
        because it was told to (a clean exit counts: ``os._exit(0)`` in
        worker_init_f would otherwise be restarted forever; a worker killed
        while idle does not).  The error that breaks the queue, once that
        has happened too often in a row; else None."""
        if self.field(slot, P_STAGE) != STAGE_STARTING or slot.told_to_stop:
            return None
        self.startup_deaths[slot.index] += 1
        if self.startup_deaths[slot.index] < MAX_STARTUP_DEATHS:
            return None
        return WorkerInitError(f"worker processes keep dying before running a task (the last {how_it_ended(proc)})")

    def credited(self, slot_index: int) -> None:
        """A worker in the slot finished a packet: it does start."""
        self.startup_deaths[slot_index] = 0

    def diagnose(self, slot: Slot, rec: PacketRecord, proc: Child) -> None:
        """The worker died holding ``rec``, the oldest packet whose results had
        not left it.  From the stage it had reached, blame one task with an
        error in its slot, or mark the packet careful, so that a next death
        names its task (``rec`` is changed in place; it goes again)."""
        stage, k = self.field(slot, P_STAGE), self.field(slot, P_ITEM)
        if self.field(slot, P_PACKET) != rec.packet_id or stage in (STAGE_STARTING, STAGE_IDLE):
            return  # it had not started this packet: it goes again as it was
        n = len(rec.items)
        fresh = 0 <= k < n and not isinstance(rec.items[k], TaskError)
        if slot.timeout_kill:
            if slot.timeout_kill != self.field(slot, P_SEQ):
                return  # the slow step finished in time: the packet goes again as it was
            if fresh and stage in _TIMED:
                blame(rec, k, proc, _TIMED[stage].format(limit=self.task_timeout), timeout=True)
            elif not rec.careful:
                rec.careful = True  # the whole batch was (un)pickled: which task took the time?
            else:
                self.unexplained(rec, proc)
            return
        if stage == STAGE_RUNNING and fresh:
            blame(rec, k, proc, "was running in worker pid {pid}, which {how}")
        elif not rec.careful:
            # Unpickling the batch, pickling the results, or sending them:
            # one of its tasks may be the cause, but which?  Again, one task
            # at a time.  (Its tasks that had run, run again.)
            rec.careful = True
        elif stage == STAGE_LOADING and k == -1 and rec.map_fn is not None:
            # Not loaded again (see _tasks.run_items); each task fails in its
            # own slot, under its own number.
            rec.map_fn = TaskError.from_message(
                WorkerLostError(f"the worker (pid {proc.pid}) {how_it_ended(proc)} while unpickling the map's function")
            )
            for j in range(n):
                if not isinstance(rec.items[j], TaskError):
                    blame(
                        rec, j, proc, "could not run: its worker (pid {pid}) {how} while unpickling the map's function"
                    )
        elif stage == STAGE_LOADING and fresh:
            blame(rec, k, proc, "could not be unpickled: its worker (pid {pid}) {how} while unpickling it")
        elif stage == STAGE_SAVING and fresh:
            blame(
                rec,
                k,
                proc,
                "returned, then its worker (pid {pid}) {how} before the result could leave it"
                " (killed while pickling it, or the task closed the worker's pipes)",
            )
        else:
            self.unexplained(rec, proc)

    def unexplained(self, rec: PacketRecord, proc: Child) -> None:
        """A death no task could be blamed for: after MAX_UNEXPLAINED_DEATHS
        of them, every task left in the packet fails."""
        rec.deaths += 1
        if rec.deaths < MAX_UNEXPLAINED_DEATHS:
            return
        for j in range(len(rec.items)):
            if not isinstance(rec.items[j], TaskError):
                blame(
                    rec,
                    j,
                    proc,
                    f"ran, but the workers running its packet died {rec.deaths} times before the"
                    " results could leave them (last: pid {pid}, which {how})",
                )

    # -------------------------------------------------------------- timeouts

    def overdue(self, slots: Iterable[Slot]) -> tuple[list[Slot], Optional[float]]:
        """With task_timeout: the slots whose worker spent longer than that
        on a task's step (unpickling its arguments, running it, pickling its
        result; for a whole batch's (un)pickling, that many times longer):
        each is marked as killed for that step (kill them).  And the seconds
        until the next look (None: no timeout, or nothing running).

        The progress fields are read as a sequence lock (see
        ``_tasks.mark_step``): a reading counts only if the step's number
        was the same non-zero one before and after it.
        """
        if self.task_timeout is None:
            return [], None
        now = time.monotonic_ns()
        limit_ns = int(self.task_timeout * 1e9)
        soonest: Optional[int] = None
        overdue: list[Slot] = []
        for slot in slots:
            if not slot.running or not slot.outstanding or slot.timeout_kill:
                continue
            seq = self.field(slot, P_SEQ)
            packet, k, start = self.field(slot, P_PACKET), self.field(slot, P_ITEM), self.field(slot, P_START_NS)
            stage = self.field(slot, P_STAGE)
            first = slot.outstanding[0]
            n = len(first.items)
            if seq == 0 or seq != self.field(slot, P_SEQ) or packet != first.packet_id or stage not in _TIMED:
                # Between steps, or switching: no event tells us when the
                # next step starts, so look again one timeout from now.
                deadline = now + limit_ns
            else:
                deadline = start + limit_ns * (1 if 0 <= k < n else n)
                if deadline <= now:
                    slot.killed_for_timeout(seq)
                    overdue.append(slot)
                    continue
            soonest = deadline if soonest is None else min(soonest, deadline)
        return overdue, None if soonest is None else max(0.0, (soonest - now) / 1e9)


def init_failure(payload: bytes) -> WorkerInitError:
    """The error that breaks the queue when worker_init_f raised (``payload``:
    the worker's pickled TaskError)."""
    original = pickle.loads(payload).to_exception()
    err = WorkerInitError(f"worker_init_f raised {type(original).__name__}: {original}")
    err.__cause__ = original
    return err


def blame(rec: PacketRecord, k: int, proc: Child, how: str, timeout: bool = False) -> None:
    """Task ``k`` of ``rec`` fails in its slot and does not run again:
    WorkerLostError, saying ``how`` (with ``{pid}`` and ``{how}`` filled in),
    or TaskTimeoutError (``timeout``: ``how`` says which step)."""
    index = rec.first_task + k
    what = f"task #{index} ({describe_task(rec.items[k])})"
    code = proc.exitcode
    err: Exception
    if timeout:
        err = TaskTimeoutError(f"{what} {how} and was killed with its worker (pid {proc.pid})", index, proc.pid, code)
    else:
        err = WorkerLostError(f"{what} " + how.format(pid=proc.pid, how=how_it_ended(proc)), index, proc.pid, code)
    rec.items[k] = TaskError.from_message(err)


def how_it_ended(proc: Child) -> str:
    code = proc.exitcode
    if code is None:
        return f"ended, how is unknown ({proc.why_unknown})"
    if code is not None and code < 0:
        try:
            name = f"{signal.Signals(-code).name} ({-code})"
        except ValueError:
            name = str(-code)
        return f"was killed by signal {name}"
    return f"exited with code {code}"
