"""The dispatcher: the main-process thread that feeds and supervises workers.

Hot path: take a batch from ``pending``, pickle it once, write it to a
worker that has credit.  Batches size themselves: a worker that is idle gets
what is there at once (one task at low load), and while every worker is
busy, tasks accumulate, so the next batch is larger; a measured per-task
time caps a batch at about ``TARGET_PACKET_SECONDS`` of work, so slow tasks
still spread over all workers.

Slow paths, each in its own method: a worker ending (crash, kill, timeout,
recycling), a batch the worker could not unpickle, the consumer dying, and
the orderly end after ``stop()``.
"""

from __future__ import annotations

import os
import selectors
import time
from typing import TYPE_CHECKING, Any, Optional

from . import _wire
from ._engine import CREDITS_PER_WORKER, Slot
from ._errors import QueueBrokenError, TaskTimeoutError, WorkerInitError, WorkerLostError
from ._front import TaskBatch
from ._payload import TaskError, describe_task, dumps_individually, dumps_tasks
from ._sizing import packet_limit, running_mean
from ._wire import Kind
from ._worker import (
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
)

if TYPE_CHECKING:
    from ._engine import Engine

# How much work (by measured task time) a packet should carry.  Longer packets
# cost less per task; shorter ones balance better when tasks are slow or of
# uneven length, and keep the reorder window (counted in packets) short.
TARGET_PACKET_SECONDS = 0.005

# The most pickled bytes a packet should carry (by the measured mean size of
# a task).  Bigger packets cost less per task for small tasks; for large
# arguments (arrays, documents) a cap keeps one packet from holding gigabytes
# and lets several workers share them.
TARGET_PACKET_BYTES = 1 << 20

# A worker that dies this many times in a row without starting a task (a
# crashing initializer, a broken interpreter) breaks the queue instead of
# being restarted forever.
MAX_STARTUP_DEATHS = 3


# A packet whose worker died this many times with no task to blame (the
# results were being sent: the OOM killer, a kill from outside) fails every
# task left in it, instead of being sent forever.
MAX_UNEXPLAINED_DEATHS = 3


class PacketRecord(TaskBatch):
    """A packet the dispatcher sent and the consumer has not yet credited."""

    __slots__ = ("packet_id", "first_task", "careful", "deaths")

    def __init__(self, packet_id: int, first_task: int, items: list[Any], form: int, map_fn: Optional[Any]) -> None:
        super().__init__(items, form, map_fn)
        self.packet_id = packet_id
        self.first_task = first_task  # index of items[0] among all tasks put
        # Sent one task at a time (see _worker.run_careful): after it would
        # not unpickle as a batch, or its worker died where no one task could
        # be blamed yet.
        self.careful = False
        self.deaths = 0  # its workers' deaths that no task could be blamed for


class Dispatcher:
    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.base = 2 * engine.opts.window + 1
        self.next_id = 0
        self.packets_total = 0
        self.item_seconds = 0.0  # running mean of task time; 0 until measured
        self.item_bytes = 0.0  # running mean of a task's pickled size
        self.credits = _wire.FrameReader(engine.credits_r, _wire.scratch_buffer(1 << 16))
        self.sel: selectors.BaseSelector  # made by run(): a queue that fails to start has none to close
        self.last_sent = False
        self.consumer_done = False
        self.startup_deaths = [0] * len(engine.slots)
        self.replaced = 0

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        self.sel = selectors.DefaultSelector()
        try:
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - a dead dispatcher must not hang get()
            err = QueueBrokenError(f"internal error in the dispatcher thread: {exc!r}")
            err.__cause__ = exc
            self.e.break_with(err)
        finally:
            self.sel.close()
            with self.e.lock:  # close() closes descriptors under it
                if not self.e.closed:
                    try:
                        os.write(self.e.done_w.fd, b"\0")  # for join()
                    except OSError:
                        pass

    def loop(self) -> None:
        e = self.e
        sel = self.sel
        sel.register(e.wake_r.fd, selectors.EVENT_READ, "wake")
        sel.register(e.credits_r.fd, selectors.EVENT_READ, "credits")
        assert e.consumer is not None
        sel.register(e.consumer.exit_fd, selectors.EVENT_READ, "consumer")
        for slot in e.slots:
            assert slot.proc is not None
            sel.register(slot.proc.exit_fd, selectors.EVENT_READ, ("ended", slot))
        while not e.given_up():
            self.dispatch()
            self.finish_if_stopped()
            if self.all_done():
                return
            timeout = self.timeouts()
            with e.lock:
                # With a worker free, sleep only where a put() must wake us:
                # dispatcher_sleeps() clears fast_put before it looks at
                # pending, so a task put from now on is either seen there
                # or settled by its put() under the lock, which finds
                # dispatcher_idle set and writes to the wake-up pipe.  With
                # no worker free, a credit wakes us, not a put().
                if self.pick_slot() is not None and not e.dispatcher_sleeps():
                    timeout = 0
            events = sel.select(timeout)
            with e.lock:
                e.dispatcher_awake()
            registered = sel.get_map()
            for key, _ in events:
                # An earlier handler in this batch may have unregistered this
                # fd (a worker's exit fd and its pipe end together), or even
                # registered a new one under the same number.
                if registered.get(key.fd) is not key:
                    continue
                tag = key.data
                if tag == "wake":
                    os.read(e.wake_r.fd, 4096)
                elif tag == "credits":
                    self.on_credits()
                elif tag == "consumer":
                    self.on_consumer_end()
                elif tag[0] == "write":
                    self.on_writable(tag[1])
                else:
                    self.on_worker_end(tag[1])

    def all_done(self) -> bool:
        return self.last_sent and self.consumer_done and all(s.state == "ended" for s in self.e.slots)

    # ------------------------------------------------------------- hot path

    def pick_slot(self) -> Optional[Slot]:
        """The running worker with the fewest packets that can take one more."""
        best: Optional[Slot] = None
        quota = self.e.opts.max_tasks_per_worker
        for slot in self.e.slots:
            if (
                slot.state == "running"
                and not slot.stop_sent
                and len(slot.outstanding) < CREDITS_PER_WORKER
                and not (slot.writer is not None and slot.writer.pending_bytes)
                and not (quota and slot.sent_items >= quota)
                and (best is None or len(slot.outstanding) < len(best.outstanding))
            ):
                best = slot
        return best

    def free_credits(self) -> int:
        return sum(
            CREDITS_PER_WORKER - len(s.outstanding) for s in self.e.slots if s.state == "running" and not s.stop_sent
        )

    def batch_size(self, slot: Slot, waiting: int) -> int:
        """(lock held) How many of the ``waiting`` tasks ``slot``'s next packet takes."""
        opts = self.e.opts
        fixed = self.e.fixed_batch()
        if fixed:
            n = min(fixed, waiting)
        else:
            limit = packet_limit(opts.max_batch, self.item_seconds, TARGET_PACKET_SECONDS)
            if self.item_bytes > 0:
                limit = min(limit, max(1, int(TARGET_PACKET_BYTES / self.item_bytes)))
            n = min(limit, waiting)
            if waiting * self.item_seconds > TARGET_PACKET_SECONDS or self.item_seconds == 0:
                # Enough work waiting to matter: spread it over the free
                # credits, so idle workers all get a share instead of the
                # first one taking the lot.  (Tiny tasks go in one packet:
                # fewer wake-ups.)
                n = min(n, -(-waiting // max(1, self.free_credits())))
        # A worker recycled after max_tasks_per_worker never takes more.
        quota = opts.max_tasks_per_worker
        if quota:
            n = min(n, quota - slot.sent_items)
        return max(1, n)

    def dispatch(self) -> None:
        e = self.e
        while True:
            slot = self.pick_slot()
            if slot is None:
                return
            with e.lock:
                waiting = e.takeable()
                if not waiting:
                    return
                first_task = e.dispatched
                items, form, map_fn = e.take_tasks(self.batch_size(slot, waiting))
            rec = PacketRecord(self.next_id, first_task, items, form, map_fn)
            self.next_id = (self.next_id + 1) % self.base
            self.packets_total += 1
            slot.outstanding.append(rec)
            self.send(slot, rec)

    def send(self, slot: Slot, rec: PacketRecord) -> None:
        if rec.careful:
            payload = dumps_individually(rec.payload_items())
        else:
            payload, rec.careful = dumps_tasks(rec.payload_items())
        size = len(payload) / len(rec.items)
        self.item_bytes = running_mean(self.item_bytes, size)
        slot.sent_items += len(rec.items)
        writer = slot.writer
        assert writer is not None
        try:
            done = writer.send(_wire.encode_tasks(rec.packet_id, len(rec.items), rec.careful, rec.form), payload)
        except BrokenPipeError:
            writer.clear()  # the worker is gone; its exit fd tells us next
            return
        if not done:
            self.sel.register(writer.fd.fd, selectors.EVENT_WRITE, ("write", slot))

    def on_writable(self, slot: Slot) -> None:
        writer = slot.writer
        assert writer is not None
        try:
            done = writer.flush()
        except BrokenPipeError:
            writer.clear()
            done = True
        if done:
            self.sel.unregister(writer.fd.fd)

    def on_credits(self) -> None:
        if self.credits.eof:
            return
        for body in self.credits.read_ready():
            kind = body[0]
            if kind == Kind.CREDIT:
                self.on_credit(_wire.decode_credit(body))
            elif kind == Kind.DRAINED:
                self.on_drained(self.e.slots[_wire.decode_slot(body)])
            elif kind == Kind.FATAL:
                self.on_init_failed(bytes(body[1:]))
        if self.credits.eof:
            self.sel.unregister(self.e.credits_r.fd)

    def on_credit(self, c: _wire.Credit) -> None:
        slot = self.e.slots[c.slot]
        if c.rejected:
            # The worker could not unpickle the batch as a whole: send it
            # again, one pickle per task, so only the guilty task fails.
            rec = slot.outstanding[0]
            rec.careful = True
            self.send(slot, rec)
            return
        rec = slot.outstanding.popleft()
        assert rec.packet_id == c.packet_id, (rec.packet_id, c.packet_id)
        self.startup_deaths[c.slot] = 0
        if c.n_items:
            self.item_seconds = running_mean(self.item_seconds, c.compute_ns / c.n_items / 1e9)

    # ------------------------------------------------------------ slow paths

    def on_worker_end(self, slot: Slot) -> None:
        """A worker process ended: have the consumer read its pipe to the end."""
        proc = slot.proc
        assert proc is not None
        proc.join()
        self.sel.unregister(proc.exit_fd)
        if slot.writer is not None and slot.writer.pending_bytes:
            self.sel.unregister(slot.writer.fd.fd)
        _wire.close_fd(slot.tasks_w)
        slot.writer = None
        slot.state = "draining"
        if self.consumer_done or (not slot.outstanding and proc.exitcode == 0):
            # Nothing to recover: every packet it took was credited, so its
            # pipe holds no whole frame we lack, and a clean exit (after STOP,
            # or recycling) leaves no half frame either.  Skip the round trip.
            self.on_drained(slot)
            return
        self.send_ctrl(_wire.encode_slot(Kind.DRAIN, slot.index))

    def send_ctrl(self, body: bytes) -> None:
        # Control frames are a few bytes and the consumer always reads them,
        # so a plain blocking write cannot stall here.
        try:
            os.write(self.e.ctrl_w.fd, b"".join(bytes(b) for b in _wire.frame((body,))))
        except BrokenPipeError:
            pass  # the consumer is gone: on_consumer_end deals with it

    def on_drained(self, slot: Slot) -> None:
        """Everything the dead worker sent has been counted: re-send the rest."""
        e = self.e
        lost = list(slot.outstanding)
        slot.outstanding.clear()
        proc = slot.proc
        assert proc is not None
        p0 = slot.index * PROGRESS_FIELDS
        # Whether it got as far as a packet (past worker_init_f, that is).
        started_any = e.progress[p0 + P_SEQ] > 0 or e.progress[p0 + P_STAGE] != STAGE_IDLE
        if lost:
            self.diagnose_death(slot, lost[0], proc)
        # Wake-ups the dead worker never read (end-of-file once the consumer is gone).
        while _wire.readable(slot.go_r.fd, 0) and os.read(slot.go_r.fd, 4096):
            pass
        with e.lock:
            more_work = bool(e.takeable()) or e.tasks_at_stop is None
        if not lost and not more_work:
            slot.state = "ended"
            return
        if not started_any and not slot.stop_sent:
            # It ended before running anything, and not because it was told
            # to (a clean exit counts too: os._exit(0) in worker_init_f would
            # otherwise be restarted forever).
            self.startup_deaths[slot.index] += 1
            if self.startup_deaths[slot.index] >= MAX_STARTUP_DEATHS:
                e.break_with(
                    WorkerInitError(
                        f"worker processes keep dying before running a task (last exit code {proc.exitcode})"
                    )
                )
                return
        with e.lock:  # see _engine.Child
            proc.release()
        e.start_worker(slot)
        self.replaced += 1
        assert slot.proc is not None
        self.sel.register(slot.proc.exit_fd, selectors.EVENT_READ, ("ended", slot))
        for rec in lost:  # in id order, into an empty pipe: nothing waits ahead of them
            slot.outstanding.append(rec)
            self.send(slot, rec)

    def diagnose_death(self, slot: Slot, rec: PacketRecord, proc: Any) -> None:
        """The worker died holding ``rec``, the oldest packet whose results had
        not left it.  From the stage it had reached (its slot of the progress
        array, see _worker), blame one task with an error in its slot, or
        send the packet careful, so that a next death names its task.

        Every death of a careful packet either blames one task or counts
        towards MAX_UNEXPLAINED_DEATHS, so no packet is sent forever.
        """
        prog = self.e.progress
        p0 = slot.index * PROGRESS_FIELDS
        stage, k = prog[p0 + P_STAGE], prog[p0 + P_ITEM]
        if prog[p0 + P_PACKET] != rec.packet_id or stage == STAGE_IDLE:
            return  # it had not started this packet: it goes again as it was
        n = len(rec.items)
        if slot.kill_reason == "timeout":
            if stage == STAGE_RUNNING and 0 <= k < n and slot.kill_seq == prog[p0 + P_SEQ]:
                self.blame(rec, k, proc, "timeout")
            return  # (else the slow task finished in time; the packet goes again)
        if stage == STAGE_RUNNING and 0 <= k < n and not isinstance(rec.items[k], TaskError):
            self.blame(rec, k, proc, "was running in worker pid {pid}, which {how}")
        elif not rec.careful:
            # Unpickling the batch, pickling the results, or sending them:
            # one of its tasks may be the cause, but which?  Again, one task
            # at a time.  (Its tasks that had run, run again.)
            rec.careful = True
        elif stage == STAGE_LOADING and k == -1 and rec.map_fn is not None:
            how = _how_it_ended(proc)
            rec.map_fn = TaskError.from_message(
                WorkerLostError(f"the worker (pid {proc.pid}) {how} while unpickling the map's function")
            )
        elif stage == STAGE_LOADING and 0 <= k < n and not isinstance(rec.items[k], TaskError):
            self.blame(rec, k, proc, "could not be unpickled: its worker (pid {pid}) {how} while unpickling it")
        elif stage == STAGE_SAVING and 0 <= k < n and not isinstance(rec.items[k], TaskError):
            self.blame(
                rec,
                k,
                proc,
                "returned, then its worker (pid {pid}) {how} before the result could leave it"
                " (killed while pickling it, or the task closed the worker's pipes)",
            )
        else:
            rec.deaths += 1
            if rec.deaths >= MAX_UNEXPLAINED_DEATHS:
                for j in range(n):
                    if not isinstance(rec.items[j], TaskError):
                        self.blame(
                            rec,
                            j,
                            proc,
                            f"ran, but the workers running its packet died {rec.deaths} times before the"
                            " results could leave them (last: pid {pid}, which {how})",
                        )

    def blame(self, rec: PacketRecord, k: int, proc: Any, how: str) -> None:
        """Task ``k`` of ``rec`` fails in its slot: WorkerLostError, saying
        ``how`` (with ``{pid}`` and ``{how}`` filled in), or TaskTimeoutError
        (``how`` is "timeout").  The task does not run again."""
        index = rec.first_task + k
        what = f"task #{index} ({describe_task(rec.items[k])})"
        code = proc.exitcode
        err: Exception
        if how == "timeout":
            err = TaskTimeoutError(
                f"{what} ran longer than task_timeout={self.e.opts.task_timeout}s"
                f" and was killed with its worker (pid {proc.pid})",
                index,
                proc.pid,
                code,
            )
        else:
            message = f"{what} " + how.format(pid=proc.pid, how=_how_it_ended(proc))
            err = WorkerLostError(message, index, proc.pid, code)
        rec.items[k] = TaskError.from_message(err)

    def timeouts(self) -> Optional[float]:
        """Kill workers whose task ran past task_timeout; seconds until the next check."""
        limit = self.e.opts.task_timeout
        if limit is None:
            return None
        prog = self.e.progress
        now = time.monotonic_ns()
        limit_ns = int(limit * 1e9)
        soonest: Optional[int] = None
        for slot in self.e.slots:
            if slot.state != "running" or not slot.outstanding or slot.kill_reason:
                continue
            p0 = slot.index * PROGRESS_FIELDS
            seq = prog[p0 + P_SEQ]
            packet, k, start = prog[p0 + P_PACKET], prog[p0 + P_ITEM], prog[p0 + P_START_NS]
            running = prog[p0 + P_STAGE] == STAGE_RUNNING
            first = slot.outstanding[0]
            if (
                seq == 0
                or seq != prog[p0 + P_SEQ]
                or packet != first.packet_id
                or not running
                or not 0 <= k < len(first.items)
            ):
                # Between tasks, or switching (see _worker._mark_start): no
                # event tells us when the next task starts, so look again one
                # timeout from now.
                deadline = now + limit_ns
            else:
                deadline = start + limit_ns
                if deadline <= now:
                    slot.kill_seq = seq
                    slot.kill_reason = "timeout"
                    assert slot.proc is not None
                    slot.proc.kill()
                    continue
            soonest = deadline if soonest is None else min(soonest, deadline)
        return None if soonest is None else max(0.0, (soonest - now) / 1e9)

    def on_init_failed(self, payload: bytes) -> None:
        import pickle

        original = pickle.loads(payload).to_exception()
        err = WorkerInitError(f"worker_init_f raised {type(original).__name__}: {original}")
        err.__cause__ = original
        self.e.break_with(err)

    def on_consumer_end(self) -> None:
        e = self.e
        assert e.consumer is not None
        e.consumer.join()
        self.sel.unregister(e.consumer.exit_fd)
        # Its last credits may still be in the pipe: count them first.
        while not self.credits.eof and _wire.readable(e.credits_r.fd, 0):
            self.on_credits()
        if self.last_sent and e.consumer.exitcode == 0:
            self.consumer_done = True
            for slot in e.slots:
                if slot.state == "draining":
                    self.on_drained(slot)
            return
        with e.lock:
            if e.terminated:
                return
        e.break_with(QueueBrokenError(f"the consumer process died (exit code {e.consumer.exitcode})"))

    def finish_if_stopped(self) -> None:
        """After stop(): once every task is sent, tell the consumer and the workers."""
        e = self.e
        with e.lock:
            if e.tasks_at_stop is None or e.takeable():
                return
        if not self.last_sent:
            self.last_sent = True
            self.send_ctrl(_wire.encode_id(Kind.LAST, self.packets_total))
        for slot in e.slots:
            if slot.state == "running" and not slot.outstanding and not slot.stop_sent:
                slot.stop_sent = True
                assert slot.writer is not None
                try:
                    if not slot.writer.send(bytes([Kind.STOP])):
                        self.sel.register(slot.writer.fd.fd, selectors.EVENT_WRITE, ("write", slot))
                except BrokenPipeError:
                    slot.writer.clear()


def _how_it_ended(proc: Any) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        return f"was killed by signal {_signal_name(-code)}"
    return f"exited with code {code}"


def _signal_name(num: int) -> str:
    import signal

    try:
        return f"{signal.Signals(num).name} ({num})"
    except ValueError:
        return str(num)
