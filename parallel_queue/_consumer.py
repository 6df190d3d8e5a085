"""The consumer process: the reorder buffer that puts results back in order.

It reads result packets from every worker's pipe, keeps those that arrive
early in the reorder buffer (``_reorder``), and forwards packets to the main
process strictly in id order.  It publishes
``max_packet_id`` (the highest id it will accept: ``next + buffer - 1``),
so the reorder buffer never holds more than ``buffer`` packets; a worker
whose packet is past it has sent a WAIT and sleeps until the consumer writes
to its wake-up pipe.

Payloads are forwarded as received, never unpickled here.  The consumer only
moves a packet out of the buffer when its output pipe has taken the previous
one, so when nobody calls ``get()`` the window stops, workers stop, and
``put()`` finally blocks: memory stays bounded end to end.

For every packet it receives it credits the dispatcher (the main process's
thread that feeds workers), which is how the dispatcher knows a worker is
ready for more and which packets a dead worker took with it.

A packet whose results grew large comes in several frames (see
_wire.ResultHeader), and its worker sends each frame but the last only
while the packet is the next to deliver: those frames are passed on at
once, in the order they came, and the worker's pipe is not read again
until they are written out, so a worker cannot pile its frames up here.
"""

from __future__ import annotations

import os
import select
import selectors
from collections import deque
from typing import Any, NamedTuple, Optional

from . import _wire
from ._child import start_child
from ._packet_id import ahead
from ._reorder import ReorderBuffer
from ._wire import Credit, Fd, Kind


class ConsumerSpec(NamedTuple):
    """Everything the consumer process is given at start."""

    results_in: list[Fd]  # per slot: the worker's result pipe
    go_out: list[Fd]  # per slot: the worker's wake-up pipe
    ctrl_in: Fd  # dispatcher -> consumer
    credits_out: Fd  # consumer -> dispatcher
    output_out: Fd  # consumer -> get()
    parent_alive: Fd
    max_packet_id: Any  # RawValue('q')
    reorder: Any  # RawArray('q', 2): [packets, tasks] in the buffer, for stats()
    window: int
    buffer_max: int


def consumer_main(spec: ConsumerSpec) -> None:
    keep = {f.fd for f in spec.results_in} | {f.fd for f in spec.go_out}
    keep |= {spec.ctrl_in.fd, spec.credits_out.fd, spec.output_out.fd}
    start_child(keep, spec.parent_alive)
    try:
        _Consumer(spec).run()
    except BrokenPipeError:
        # The main process is gone (killed mid-stream: the kernel's signal
        # is on its way) or has closed its ends: nobody is left to tell.
        os._exit(3)


class _Consumer:
    def __init__(self, spec: ConsumerSpec) -> None:
        self.spec = spec
        self.buffer: ReorderBuffer[bytes] = ReorderBuffer(spec.window)
        self.modulus = self.buffer.next_id.modulus
        self.delivered = 0
        self.last_total: Optional[int] = None
        self.waiting: dict[int, int] = {}  # slot -> packet id it waits to send
        scratch = _wire.scratch_buffer()  # one thread here: all readers share it
        # Non-blocking: one select() may report a worker's pipe readable that
        # a DRAIN, handled first in the same batch, has read to its end; a
        # blocking read of it would then wait for ever (the main process
        # keeps the write end, for the slot's next worker).
        for fd in (*spec.results_in, spec.ctrl_in):
            _wire.set_nonblocking(fd)
        # Large bodies, read from the workers' pipes, go back to the pool
        # once written out to the main process (see BodyPool).
        self.pool = _wire.BodyPool()
        self.readers = [_wire.FrameReader(fd, scratch, self.pool) for fd in spec.results_in]
        self.sent: Optional[bytes] = None  # the body being written out, if any
        # The next packet's first frames, to pass on before anything else,
        # and the slots whose pipes are not read until they are passed on.
        self.firsts: deque[bytes] = deque()
        self.held_back: set[int] = set()
        self.ctrl = _wire.FrameReader(spec.ctrl_in, scratch)
        _wire.set_nonblocking(spec.output_out)
        _wire.set_nonblocking(spec.credits_out)
        self.output = _wire.FrameWriter(spec.output_out)
        self.credits = _wire.FrameWriter(spec.credits_out)
        self.sel = selectors.DefaultSelector()
        self.publish_max()

    def publish_max(self) -> int:
        m = (self.buffer.next_id + (self.spec.buffer_max - 1)).value
        self.spec.max_packet_id.value = m
        return m

    def run(self) -> None:
        sel = self.sel
        for slot, r in enumerate(self.readers):
            sel.register(r.fd.fd, selectors.EVENT_READ, slot)
        sel.register(self.ctrl.fd.fd, selectors.EVENT_READ, "ctrl")
        sel.register(self.spec.parent_alive.fd, selectors.EVENT_READ, "parent")
        out_registered = cred_registered = False
        while True:
            for key, _ in sel.select():
                tag = key.data
                if tag == "out":
                    self.output.flush()
                elif tag == "cred":
                    self.credits.flush()
                elif tag == "ctrl":
                    bodies = self.ctrl.read_ready()
                    if self.ctrl.eof:
                        return  # the main process closed us down
                    for body in bodies:
                        self.on_command(body)
                elif tag == "parent":
                    os._exit(3)
                elif tag not in self.held_back:  # (held back by a frame read earlier in this batch)
                    for body in self.readers[tag].read_ready():
                        self.on_worker_frame(tag, body)
            self.deliver()
            if self.held_back and not self.firsts and not self.output.pending_bytes:
                for slot in self.held_back:  # what they sent is out: read them again
                    sel.register(self.readers[slot].fd.fd, selectors.EVENT_READ, slot)
                self.held_back.clear()
            if self.last_total is not None and self.delivered >= self.last_total and not self.output.pending_bytes:
                self.credits.send(bytes([Kind.FINISHED]))
                self.credits_flush_blocking()
                return
            want_out = bool(self.output.pending_bytes)
            if want_out != out_registered:
                _toggle(sel, self.output.fd.fd, want_out, "out")
                out_registered = want_out
            want_cred = bool(self.credits.pending_bytes)
            if want_cred != cred_registered:
                _toggle(sel, self.credits.fd.fd, want_cred, "cred")
                cred_registered = want_cred

    def on_worker_frame(self, slot: int, body: bytes) -> None:
        kind = body[0]
        if kind == Kind.RESULT:
            h = _wire.decode_result(body)
            size = _wire.result_bytes(body, h)
            if h.more:
                # (its worker waited for its turn: it is the next packet)
                assert h.packet_id == self.buffer.next_id.value, (h.packet_id, self.buffer.next_id.value)
                self.firsts.append(body)
                if slot not in self.held_back:
                    self.sel.unregister(self.readers[slot].fd.fd)
                    self.held_back.add(slot)
            else:
                self.buffer.add(h.packet_id, h.n_items, body)
                self.count_buffer()
            self.credit(Credit(slot, h.packet_id, h.n_items, h.compute_ns, False, size, h.more, h.start))
        elif kind == Kind.WAIT:
            pid = _wire.decode_id(body)
            if ahead(pid, self.spec.max_packet_id.value, self.modulus, self.spec.window):
                self.waiting[slot] = pid
            else:
                self.wake(slot)
        elif kind == Kind.REJECT:
            self.credit(Credit(slot, _wire.decode_id(body), 0, 0, True))
        elif kind == Kind.INIT_FAILED:
            self.credits.send(bytes([Kind.FATAL]), memoryview(body)[1:])

    def credit(self, c: Credit) -> None:
        self.credits.send(_wire.encode_credit(c))

    def wake(self, slot: int) -> None:
        try:
            os.write(self.spec.go_out[slot].fd, b"\0")
        except OSError:
            pass  # that worker is gone; a DRAIN for its slot is on the way

    def count_buffer(self) -> None:
        """Publish what the buffer holds, for stats() in the main process."""
        self.spec.reorder[0] = len(self.buffer)
        self.spec.reorder[1] = self.buffer.items

    def deliver(self) -> None:
        buffer = self.buffer
        moved = False
        # One packet at a time, and only when the output pipe took the last
        # one: the window only advances as fast as get() reads.
        while not self.output.pending_bytes:
            if self.sent is not None:  # written out whole: its memory serves the next frame
                self.pool.give(self.sent)
                self.sent = None
            if self.firsts:  # the next packet's first frames, before its last
                self.sent = self.firsts.popleft()
                self.output.send(self.sent)
                continue
            if not buffer.next_is_ready():
                break
            packet = buffer.pop_next()
            self.count_buffer()  # before it can reach get(): stats() then never counts it twice
            self.sent = packet
            self.output.send(packet)
            self.delivered += 1
            moved = True
        if moved:
            m = self.publish_max()
            if self.waiting:
                for slot, pid in list(self.waiting.items()):
                    if not ahead(pid, m, self.modulus, self.spec.window):
                        del self.waiting[slot]
                        self.wake(slot)

    def on_command(self, body: bytes) -> None:
        kind = body[0]
        if kind == Kind.DRAIN:
            slot = _wire.decode_slot(body)
            reader = self.readers[slot]
            for frame in reader.drain():
                if frame[0] != Kind.WAIT:  # a dead worker waits for nothing
                    self.on_worker_frame(slot, frame)
            reader.discard_partial()
            self.waiting.pop(slot, None)
            self.credits.send(_wire.encode_slot(Kind.DRAINED, slot))
        elif kind == Kind.LAST:
            self.last_total = _wire.decode_id(body)

    def credits_flush_blocking(self) -> None:
        """Before exiting: the dispatcher counts on every credit arriving."""
        while not self.credits.flush():
            select.select([], [self.credits.fd.fd], [])


def _toggle(sel: selectors.BaseSelector, fd: int, on: bool, tag: str) -> None:
    if on:
        sel.register(fd, selectors.EVENT_WRITE, tag)
    else:
        sel.unregister(fd)
