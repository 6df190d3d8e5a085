"""Worker slots: one position each, its pipes, its process, its packets.

A slot outlives its workers: when one ends (a crash, a timeout kill,
recycling after ``max_tasks_per_worker``) a new one starts in the same slot,
with the same result and wake-up pipes, and takes the packets the dead one
had not finished.  Its state moves only through the methods below::

    EMPTY --started--> RUNNING --stop_sent--> STOPPING
                          |                      |
                          +--------ended---------+--> DRAINING --started--> RUNNING
                                                          |
                                                          +--retired--> RETIRED

- **RUNNING**: its worker takes packets (up to ``CREDITS_PER_WORKER``).
- **STOPPING**: it was sent STOP (after ``stop()``, once its packets were
  done): it takes none, and exits.
- **DRAINING**: its worker ended; the consumer reads what it had sent to
  the end before the slot's packets are counted or sent again.
- **RETIRED**: it ended, and no worker will start in it again.

Only the dispatcher thread writes a slot and calls its methods.  Other
threads read two things: whether its worker is running and alive
(``ProcessEngine.workers_alive``, for stats, under the queue's lock), and
``Child.ended()``/``Child.release()``: see there.
"""

from __future__ import annotations

import enum
import errno
import multiprocessing.process
import os
from collections import deque
from typing import Any, Optional

from . import _wire
from ._intake import TaskBatch
from ._options import CREDITS_PER_WORKER
from ._wire import Fd

__all__ = ["Child", "Slot", "SlotState", "PacketRecord"]


class Child:
    """A process of ours, and the descriptor that becomes readable when it ends.

    That descriptor is a pidfd where the system has them (Linux 5.3 and
    later): it belongs to the process itself.  multiprocessing's sentinel is
    a pipe whose write end the child holds, so a task that forks a helper
    without exec hands the helper a copy, and the worker's death went
    unnoticed until the helper exited.  Elsewhere the sentinel is used.

    Only the dispatcher thread reaps (``join``) while it runs: when two
    threads reap one child, the loser gets ECHILD and multiprocessing reports
    exit code None, which reads as a crash.  ``ended()`` never reaps.
    ``release()`` and every ``ended()`` from outside the dispatcher happen
    under the queue's lock, so no one polls a descriptor number closed (and
    reused) under its feet.
    """

    __slots__ = ("proc", "pidfd", "released")

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pidfd: Optional[int] = None
        self.released = False

    def watch(self) -> None:
        """Open the pidfd (kept apart from __init__: the caller records the
        Child first, so a failure here, EMFILE say, still leaves it killable)."""
        if getattr(self.proc._popen, "pidfd", None) is not None:
            return  # a fork server's process: its sentinel is a pidfd already (see _forkserver)
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.proc.pid)
            except OSError as e:
                if e.errno == errno.EMFILE or e.errno == errno.ENFILE:
                    raise
                # ENOSYS and the like: an older kernel, or a sandbox.

    @property
    def exit_fd(self) -> int:
        return self.pidfd if self.pidfd is not None else int(self.proc.sentinel)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def exitcode(self) -> Optional[int]:
        """Its exit status once it has ended (negative: killed by that
        signal); None while it runs, and when the status was lost with the
        fork server that started it (see _forkserver)."""
        code = self.proc.exitcode
        if getattr(self.proc._popen, "status_lost", False):
            return None
        return code  # type: ignore[no-any-return]

    @property
    def why_unknown(self) -> str:
        """(exitcode is None, it has ended) Why its exit status is unknown."""
        if getattr(self.proc._popen, "status_lost", False):
            return "the fork server that started it was killed"
        # multiprocessing's _cleanup, run by every Process.start(), reaps
        # children from any thread: a reap between its waitpid() and its
        # storing of the status leaves ours with ECHILD.
        return "another thread of the program took its exit status"

    def ended(self) -> bool:
        """Whether the process has exited (reaped or not)."""
        return self.released or _wire.readable(self.exit_fd, 0)

    def kill(self) -> None:
        if not self.ended():
            self.proc.kill()

    def join(self) -> None:
        if not self.released:
            self.proc.join()

    def release(self) -> None:
        """(it has ended and was reaped) Close its descriptors."""
        if self.released:
            return
        self.released = True
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        popen = self.proc._popen
        if popen is None or popen.poll() is None:  # still running: only after a failed kill
            return
        # Its descriptors, not Process.close(): that sets _popen to None, and
        # another thread's Process.start() may be polling it from a list of
        # children taken before (Python 3.9's _cleanup then raised
        # AttributeError in that thread).
        multiprocessing.process._children.discard(self.proc)  # type: ignore[attr-defined]
        popen.close()


class PacketRecord(TaskBatch):
    """A packet the dispatcher sent and the consumer has not yet credited."""

    __slots__ = ("packet_id", "first_task", "careful", "deaths")

    def __init__(self, packet_id: int, first_task: int, batch: TaskBatch) -> None:
        super().__init__(batch.items, batch.form, batch.map_fn)
        self.packet_id = packet_id
        self.first_task = first_task  # index of items[0] among all tasks put
        # Sent one task at a time (see _worker.run_careful): after it would
        # not unpickle as a batch, or its worker died where no one task could
        # be blamed yet.
        self.careful = False
        self.deaths = 0  # its workers' deaths that no task could be blamed for


class SlotState(enum.Enum):
    EMPTY = "empty"
    RUNNING = "running"
    STOPPING = "stopping"
    DRAINING = "draining"
    RETIRED = "retired"


class Slot:
    """One worker position (see the module docstring)."""

    __slots__ = (
        "index",
        "results_w",
        "go_r",
        "proc",
        "tasks_w",
        "writer",
        "outstanding",
        "sent_items",
        "state",
        "told_to_stop",
        "timeout_kill",
        "incarnation",
        "first_frame",
    )

    def __init__(self, index: int, results_w: Fd, go_r: Fd) -> None:
        self.index = index
        self.results_w = results_w  # kept to hand to each new worker in this slot
        self.go_r = go_r  # its wake-up pipe's read end, likewise
        self.proc: Optional[Child] = None
        self.tasks_w: Optional[Fd] = None
        self.writer: Optional[_wire.FrameWriter] = None
        self.outstanding: deque[PacketRecord] = deque()  # oldest first
        self.sent_items = 0  # tasks sent to its current worker
        self.state = SlotState.EMPTY
        self.told_to_stop = False  # its current worker was sent STOP
        # The progress sequence number of the task its worker was killed
        # for running past task_timeout (0: not killed for that).
        self.timeout_kill = 0
        self.incarnation = 0
        # The last of its worker's packets' first frames (see
        # _wire.ResultHeader) the consumer received, as a frame_key; -1: none
        # since its oldest packet's last frame.
        self.first_frame = -1

    # ----------------------------------------------------------- transitions

    def started(self, proc: Child, tasks_w: Fd) -> None:
        """EMPTY or DRAINING -> RUNNING: a new worker, with a fresh task pipe."""
        assert self.state in (SlotState.EMPTY, SlotState.DRAINING), self.state
        self.proc = proc
        self.tasks_w = tasks_w
        self.writer = _wire.FrameWriter(tasks_w)
        self.sent_items = 0
        self.told_to_stop = False
        self.timeout_kill = 0
        self.first_frame = -1
        self.state = SlotState.RUNNING

    def stop_sent(self) -> None:
        """RUNNING -> STOPPING."""
        assert self.state is SlotState.RUNNING, self.state
        self.told_to_stop = True
        self.state = SlotState.STOPPING

    def worker_ended(self) -> None:
        """RUNNING or STOPPING -> DRAINING: its task pipe is closed."""
        assert self.state in (SlotState.RUNNING, SlotState.STOPPING), self.state
        _wire.close_fd(self.tasks_w)
        self.writer = None
        self.state = SlotState.DRAINING

    def retired(self) -> None:
        """DRAINING -> RETIRED."""
        assert self.state is SlotState.DRAINING, self.state
        self.state = SlotState.RETIRED

    # ------------------------------------------------------------ its packets

    def new_incarnation(self) -> int:
        """A worker is about to start in it: its number in this slot."""
        self.incarnation += 1
        return self.incarnation

    def handed(self, rec: PacketRecord) -> None:
        """``rec`` was given to its worker: it counts towards the worker's
        quota (max_tasks_per_worker) once, however often it is sent."""
        self.outstanding.append(rec)
        self.sent_items += len(rec.items)

    def credited(self) -> PacketRecord:
        """Its worker's oldest packet was received by the consumer."""
        self.first_frame = -1
        return self.outstanding.popleft()

    def first_frame_credited(self, packet_id: int, start: int) -> None:
        """The consumer received one of its oldest packet's first frames."""
        assert self.outstanding and self.outstanding[0].packet_id == packet_id
        self.first_frame = _wire.frame_key(packet_id, start)

    def take_lost(self) -> list[PacketRecord]:
        """(DRAINING) The packets its dead worker had not finished, oldest first."""
        lost = list(self.outstanding)
        self.outstanding.clear()
        return lost

    def killed_for_timeout(self, seq: int) -> None:
        """Its worker is killed for running task step ``seq`` past task_timeout."""
        self.timeout_kill = seq

    # --------------------------------------------------------------- queries

    @property
    def running(self) -> bool:
        return self.state is SlotState.RUNNING

    def credits(self) -> int:
        """Packets it may still take (0 unless RUNNING)."""
        return CREDITS_PER_WORKER - len(self.outstanding) if self.running else 0

    def can_take(self, quota: int) -> bool:
        """Whether it may take a packet now: RUNNING, with credit, its pipe
        empty (a packet half written waits first), under the quota."""
        writer = self.writer
        return (
            self.running
            and len(self.outstanding) < CREDITS_PER_WORKER
            and not (writer is not None and writer.pending_bytes)
            and not (quota and self.sent_items >= quota)
        )
