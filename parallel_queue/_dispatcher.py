"""The dispatcher: the main-process thread that feeds and supervises workers.

It sleeps in one ``select()`` on everything that can need it: its doorbell
(a task was put while it slept, ``stop()``, ``terminate()``), the credits
pipe from the consumer, every worker's and the consumer's exit descriptor,
and the task pipes that could not take a whole packet at once.  Then:

- **hot path** (``dispatch``): while a worker has credit and tasks wait,
  take a batch from the intake (sized by the ``Scheduler``), pickle it once,
  write it to that worker's pipe;
- **credits** (``on_credits``): the consumer received a packet, so its
  worker has credit again (and its task time is measured); or a worker
  could not unpickle a batch (it goes again, careful); or a dead worker's
  pipe was read to the end (``on_drained``); or worker_init_f failed;
- **a worker ended** (``on_worker_end``): the consumer reads its pipe to the
  end, then the ``Supervisor`` says what the death means, a new worker
  starts in the slot and the packets it had not finished go again;
- **the end** (``finish_if_stopped``, ``on_consumer_end``): after ``stop()``,
  once every task is sent, the consumer learns how many packets there are
  and each worker gets STOP when its packets are done.

It is the only thread that writes to workers or starts processes after the
queue started, and the only one that reaps them while it runs.  When the
lifecycle says the queue is gone (terminated or broken) it kills every
process, reaps them and returns.
"""

from __future__ import annotations

import os
import selectors
from typing import TYPE_CHECKING, Optional, Protocol

from . import _wire
from ._errors import QueueBrokenError, consumer_died
from ._packet_id import modulus
from ._payload import OOB_MIN, dumps_individually, dumps_tasks_oob
from ._region import SlotRings
from ._scheduler import Scheduler, free_credits
from ._slots import Child, PacketRecord, Slot, SlotState
from ._supervisor import Supervisor, init_failure
from ._wire import Fd, Kind

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["Dispatcher", "Processes"]


class Processes(Protocol):
    """What the dispatcher drives: the process engine's slots and pipes."""

    slots: list[Slot]
    consumer: Optional[Child]
    credits_r: Fd  # consumer -> dispatcher
    ctrl_w: Fd  # dispatcher -> consumer
    rings: list[SlotRings]  # each slot's shared memory, or none at all

    def start_worker(self, slot: Slot) -> None: ...

    def kill_processes(self) -> None: ...

    def dispatcher_returned(self) -> None:
        """(in the dispatcher thread, last) For join(): it has finished."""


class Dispatcher:
    def __init__(self, core: Core, engine: Processes, scheduler: Scheduler, supervisor: Supervisor) -> None:
        self.core = core
        self.intake = core.intake
        self.lifecycle = core.lifecycle
        self.engine = engine
        self.slots = engine.slots
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.modulus = modulus(core.opts.window)
        self.timed = core.opts.task_timeout is not None
        self.credits_seen = 0  # packets the consumer had from workers
        self.next_id = 0  # the next packet's id (wraps around: see _packet_id)
        self.packets_total = 0
        self.credits_reader = _wire.FrameReader(engine.credits_r, _wire.scratch_buffer(1 << 16))
        self.sel: selectors.BaseSelector  # made by run(): a queue that fails to start has none to close
        self.last_sent = False  # the consumer knows how many packets there are
        # It said it had delivered every packet (Kind.FINISHED), then it
        # exited.  Its saying so, not its exit status: that is lost if the
        # fork server it came from was killed (see _forkserver).
        self.consumer_finished = False
        self.consumer_done = False  # it exited after delivering them all
        self.replaced = 0  # workers started to replace ended ones

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        self.sel = selectors.DefaultSelector()
        try:
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - a dead dispatcher must not hang get()
            err = QueueBrokenError(f"internal error in the dispatcher thread: {exc!r}")
            err.__cause__ = exc
            self.core.fail(err)
        finally:
            self.sel.close()
            if self.lifecycle.gone:
                self.engine.kill_processes()
            self.engine.dispatcher_returned()

    def loop(self) -> None:
        core, sel = self.core, self.sel
        sel.register(core.wakeups.dispatcher.fileno(), selectors.EVENT_READ, "doorbell")
        sel.register(self.engine.credits_r.fd, selectors.EVENT_READ, "credits")
        assert self.engine.consumer is not None
        sel.register(self.engine.consumer.exit_fd, selectors.EVENT_READ, "consumer")
        for slot in self.slots:
            self.watch(slot)
        while True:
            with core.lock:
                if self.lifecycle.gone:
                    return
            self.dispatch()
            self.finish_if_stopped()
            if self.all_done():
                return
            overdue, timeout = self.supervisor.overdue(self.slots)
            for slot in overdue:
                assert slot.proc is not None
                slot.proc.kill()
            with core.lock:
                # With a worker free, sleep only where a put() must wake us:
                # the intake clears fast_put before it looks at pending (see
                # _intake), so a task put from now on is either seen there
                # or settled by its put() under the lock, which rings the
                # doorbell.  With no worker free, a credit wakes us.
                if self.scheduler.pick_slot(self.slots) is not None and not self.intake.may_dispatcher_sleep():
                    timeout = 0
            events = sel.select(timeout)
            with core.lock:
                self.intake.dispatcher_awake()
            registered = sel.get_map()
            for key, _ in events:
                # An earlier handler in this batch may have unregistered this
                # fd (a worker's exit fd and its pipe end together), or even
                # registered a new one under the same number.
                if registered.get(key.fd) is not key:
                    continue
                tag = key.data
                if tag == "doorbell":
                    # Emptied only here, once awake: a ring at any moment
                    # before the next select() makes it return at once.
                    core.wakeups.dispatcher.clear()
                elif tag == "credits":
                    self.on_credits()
                elif tag == "consumer":
                    self.on_consumer_end()
                elif tag[0] == "write":
                    self.on_writable(tag[1])
                else:
                    self.on_worker_end(tag[1])

    def all_done(self) -> bool:
        return self.last_sent and self.consumer_done and all(s.state is SlotState.RETIRED for s in self.slots)

    def watch(self, slot: Slot) -> None:
        """Wake when the slot's (new) worker ends."""
        assert slot.proc is not None
        self.sel.register(slot.proc.exit_fd, selectors.EVENT_READ, ("ended", slot))

    # ------------------------------------------------------------- hot path

    def dispatch(self) -> None:
        core, scheduler = self.core, self.scheduler
        while True:
            slot = scheduler.pick_slot(self.slots)
            if slot is None:
                return
            with core.lock:
                waiting = self.intake.takeable()
                if not waiting:
                    return
                first_task = self.intake.dispatched
                lease = self.intake.lease
                scheduler.work_on(None if lease is None else lease.fn)
                n = scheduler.batch_size(slot, waiting, self.intake.fixed_batch(), free_credits(self.slots))
                batch = self.intake.take_tasks(n)
            rec = PacketRecord(self.next_id, first_task, batch)
            # With task_timeout, each task's every step is timed on its own
            # (see _worker.run_careful): a whole batch's (un)pickling could
            # hide one slow task behind the others' share of the time.
            rec.careful = self.timed
            self.next_id = (self.next_id + 1) % self.modulus
            self.packets_total += 1
            self.hand_over(slot, rec)

    def hand_over(self, slot: Slot, rec: PacketRecord) -> None:
        """Give ``rec`` to the slot's worker: it counts towards the worker's
        quota (max_tasks_per_worker) once, however often it is sent."""
        slot.handed(rec)
        self.send(slot, rec)

    def send(self, slot: Slot, rec: PacketRecord) -> None:
        """Write ``rec`` to the slot's task pipe (again, after a rejection)."""
        buffers: list[memoryview] = []
        if rec.careful:
            payload = dumps_individually(rec.payload_items())
        else:
            # Large bytes arguments are looked for unless tasks are measured small.
            item_bytes = self.scheduler.item_bytes
            large = item_bytes == 0 or item_bytes >= OOB_MIN // 4
            payload, buffers, rec.careful = dumps_tasks_oob(rec.payload_items(), large)
        self.scheduler.measured_size(len(rec.items), len(payload) + sum(b.nbytes for b in buffers))
        writer = slot.writer
        assert writer is not None
        rings = self.engine.rings
        placement = rings[slot.index].args.place(buffers) if rings and buffers else None
        try:
            header = _wire.encode_tasks(
                rec.packet_id, len(rec.items), rec.careful, rec.form, buffers, placement, rec.first_task
            )
            writer.send(header, payload, *_wire.in_frame(buffers, placement))
        except BrokenPipeError:
            writer.clear()  # the worker is gone; its exit fd tells us next
        self.watch_writable(slot)

    def watch_writable(self, slot: Slot) -> None:
        """Wake when the slot's task pipe can take more, exactly while bytes
        wait to be written to it (several packets may be sent at once after
        a crash, each too big for the pipe: one registration for all)."""
        writer = slot.writer
        assert writer is not None
        fd = writer.fd.fd
        watched = fd in self.sel.get_map()
        if writer.pending_bytes and not watched:
            self.sel.register(fd, selectors.EVENT_WRITE, ("write", slot))
        elif watched and not writer.pending_bytes:
            self.sel.unregister(fd)

    def on_writable(self, slot: Slot) -> None:
        writer = slot.writer
        assert writer is not None
        try:
            writer.flush()
        except BrokenPipeError:
            writer.clear()
        self.watch_writable(slot)

    def on_credits(self) -> None:
        if self.credits_reader.eof:
            return
        for body in self.credits_reader.read_ready():
            kind = body[0]
            if kind == Kind.CREDIT:
                self.on_credit(_wire.decode_credit(body))
            elif kind == Kind.DRAINED:
                self.on_drained(self.slots[_wire.decode_slot(body)])
            elif kind == Kind.FATAL:
                self.core.fail(init_failure(bytes(body[1:])))
            elif kind == Kind.FINISHED:
                self.consumer_finished = True
        if self.credits_reader.eof:
            self.sel.unregister(self.engine.credits_r.fd)

    def on_credit(self, c: _wire.Credit) -> None:
        slot = self.slots[c.slot]
        if c.rejected:
            # The worker could not unpickle the batch as a whole: send it
            # again, one pickle per task, so only the guilty task fails.
            rec = slot.outstanding[0]
            rec.careful = True
            self.send(slot, rec)
            return
        self.scheduler.measured_time(c.n_items, c.compute_ns)
        self.scheduler.measured_result_size(c.n_items, c.result_bytes)
        if c.more:
            # One of a packet's first frames (see _wire.ResultHeader): the
            # packet is not done, but new packets are sized by it at once.
            slot.first_frame_credited(c.packet_id, c.start)
            return
        rec = slot.credited()
        self.credits_seen += 1
        assert rec.packet_id == c.packet_id, (rec.packet_id, c.packet_id)
        self.supervisor.credited(c.slot)

    # ------------------------------------------------------------ slow paths

    def on_worker_end(self, slot: Slot) -> None:
        """A worker process ended: have the consumer read its pipe to the end."""
        proc = slot.proc
        assert proc is not None
        proc.join()
        self.sel.unregister(proc.exit_fd)
        if slot.writer is not None and slot.writer.pending_bytes:
            self.sel.unregister(slot.writer.fd.fd)
        slot.worker_ended()
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
            os.write(self.engine.ctrl_w.fd, b"".join(bytes(b) for b in _wire.frame((body,))))
        except BrokenPipeError:
            pass  # the consumer is gone: on_consumer_end deals with it

    def on_drained(self, slot: Slot) -> None:
        """Everything the dead worker sent has been counted: start a new one in
        its slot, and send it the packets the dead one had not finished."""
        lost = slot.take_lost()
        proc = slot.proc
        assert proc is not None
        rings = self.engine.rings
        if rings:
            doubt = rings[slot.index].in_doubt()
            if doubt is not None:
                packet_id, _ = _wire.split_frame_key(doubt[2])
                if doubt[2] != slot.first_frame and any(rec.packet_id == packet_id for rec in lost):
                    # It died writing that frame: the consumer never had it
                    # (it credits every frame it has, before DRAINED), so
                    # nobody will read the range (see _region).
                    rings[slot.index].results.forget(doubt[0], doubt[1])
        if lost:
            self.supervisor.diagnose(slot, lost[0], proc)
        # Wake-ups the dead worker never read (end-of-file once the consumer is gone).
        while _wire.readable(slot.go_r.fd, 0) and os.read(slot.go_r.fd, 4096):
            pass
        with self.core.lock:
            more_work = bool(self.intake.takeable()) or self.lifecycle.accepting
        if not lost and not more_work:
            slot.retired()
            return
        error = self.supervisor.died_at_start(slot, proc)
        if error is not None:
            self.core.fail(error)
            return
        with self.core.lock:  # see _slots.Child
            proc.release()
        try:
            self.engine.start_worker(slot)
        except OSError as e:  # no descriptor left (EMFILE), no memory to fork: the queue cannot go on
            broken = QueueBrokenError(f"cannot start a worker to replace the one that ended: {e}")
            broken.__cause__ = e
            self.core.fail(broken)
            return
        self.replaced += 1
        self.watch(slot)
        for rec in lost:  # in id order, into an empty pipe: nothing waits ahead of them
            self.hand_over(slot, rec)

    def on_consumer_end(self) -> None:
        consumer = self.engine.consumer
        assert consumer is not None
        consumer.join()
        self.sel.unregister(consumer.exit_fd)
        # Its last credits may still be in the pipe: count them first.
        while not self.credits_reader.eof and _wire.readable(self.engine.credits_r.fd, 0):
            self.on_credits()
        if self.consumer_finished:
            self.consumer_done = True
            for slot in self.slots:
                if slot.state is SlotState.DRAINING:
                    self.on_drained(slot)
            return
        with self.core.lock:
            if self.lifecycle.terminated:
                return
        method = self.core.opts.ctx.get_start_method()
        code = consumer.exitcode
        how = f" (exit code {code})"
        if code is None:
            how = f" (how is unknown: {consumer.why_unknown})"
        self.core.fail(consumer_died(how, method, self.credits_seen > 0))

    def finish_if_stopped(self) -> None:
        """After stop(): once every task is sent, tell the consumer and the workers."""
        with self.core.lock:
            if self.lifecycle.stopped_at is None or self.intake.takeable():
                return
        if not self.last_sent:
            self.last_sent = True
            self.send_ctrl(_wire.encode_id(Kind.LAST, self.packets_total))
        for slot in self.slots:
            if slot.running and not slot.outstanding:
                slot.stop_sent()
                assert slot.writer is not None
                try:
                    slot.writer.send(bytes([Kind.STOP]))
                except BrokenPipeError:
                    slot.writer.clear()
                self.watch_writable(slot)
