"""Pipes and the frames that cross them.

Every channel is a plain OS pipe carrying length-prefixed frames: an 8-byte
little-endian body length, then the body.  The body starts with one kind byte
and a fixed struct header; the rest is a pickled payload that only the
endpoints decode (the consumer forwards result payloads without unpickling
them, so a result is pickled once and unpickled once).

Why raw pipes and not ``multiprocessing.Queue``: a Queue shares one lock
between all readers, and a worker killed while holding it (SIGKILL, OOM)
deadlocks every other worker; its feeder thread also drops what it cannot
pickle.  Here each pipe has one writer process, readers never block on a
half-written frame (they collect bytes as they come and parse whole frames),
and a dead writer leaves at most a partial tail that the reader discards.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import mmap
import os
import select
import struct
import sys
import threading
from collections import deque
from multiprocessing import reduction
from typing import Any, Callable, NamedTuple, Sequence

_LEN = struct.Struct("<Q")

# Reading: how much to ask the kernel for at once.  Larger means fewer system
# calls for big payloads (a big pipe holds up to 1 MiB, see make_pipe).
READ_CHUNK = 1 << 18
# The most buffers one writev() is given: the kernel refuses more than
# IOV_MAX (1024 on Linux) with EINVAL, and a packet may have more parts than
# that (a result of a thousand arrays).
WRITEV_MAX = 64

# A frame this large that a read did not bring whole is read straight into
# its body (see FrameReader).
BIG_FRAME = 1 << 16

# ---------------------------------------------------------------- fd handling

# Every pipe end a queue in this process owns.  A child started with the
# ``fork`` method inherits all of them; it closes those it was not given, so
# that the only holders of a pipe end are the processes that use it (a worker
# holding another worker's pipe end open would hide that worker's death, or
# keep its input pipe from reporting a broken pipe).
_OWNED_FDS: set[int] = set()
_OWNED_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    # A child forked while another thread held the lock (a worker replaced
    # from the dispatcher thread while put() made a pipe) would inherit it
    # held, and hang in close_inherited_fds(); the child has no other thread.
    global _OWNED_LOCK
    _OWNED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


class Fd:
    """A raw file descriptor that can be handed to a child process.

    Under ``fork`` the child inherits it; under ``spawn`` and ``forkserver``
    pickling it during process start duplicates it into the child (the same
    mechanism ``multiprocessing`` uses for its own connections).  It has no
    finalizer: its owner closes it explicitly, so a copy inherited by a child
    can never close a reused descriptor number by accident.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[..., Fd], tuple[Any]]:
        return _rebuild_fd, (reduction.DupFd(self.fd),)

    def __repr__(self) -> str:
        return f"Fd({self.fd})"


def _rebuild_fd(dup: Any) -> Fd:
    return Fd(dup.detach())


# Pipe capacity to ask for (Linux).  The default 64 KiB makes every large
# payload a string of partial writes, each a wake-up of the writer's event
# loop; 1 MiB (the usual unprivileged limit) takes most packets in one write.
# The kernel allocates pipe pages as data arrives, so an idle pipe costs nothing.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031) if sys.platform.startswith("linux") else None


def make_pipe(big: bool = False) -> tuple[Fd, Fd]:
    """A new pipe (read end, write end), registered as owned by this process.

    ``big`` pipes carry packets (tasks, results) and get a larger buffer
    where the system allows it.
    """
    r, w = os.pipe()
    if big and _F_SETPIPE_SZ is not None:
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above the system's limit: keep the default
            pass
    with _OWNED_LOCK:
        _OWNED_FDS.update((r, w))
    return Fd(r), Fd(w)


def own_fd(n: int) -> Fd:
    """Descriptor ``n``, made by this process outside make_pipe, registered as
    owned (a forked child closes it unless it was given it)."""
    with _OWNED_LOCK:
        _OWNED_FDS.add(n)
    return Fd(n)


def close_fd(fd: Fd | None) -> None:
    """Close an owned descriptor once; closing twice is a no-op."""
    if fd is None or fd.fd < 0:
        return
    n, fd.fd = fd.fd, -1
    with _OWNED_LOCK:
        _OWNED_FDS.discard(n)
    try:
        os.close(n)
    except OSError:
        pass


class FdSet:
    """The pipe ends one queue owns: made through it, closed together.

    A construction that fails half-way closes exactly what it had opened so
    far (under a low ``ulimit -n``, the pipes made before EMFILE); a queue
    that ends closes everything at once.  Closing one end early (a child's
    end, once handed over) is fine: ``close_fd`` is idempotent.
    """

    __slots__ = ("_fds",)

    def __init__(self) -> None:
        self._fds: list[Fd] = []

    def pipe(self, big: bool = False) -> tuple[Fd, Fd]:
        """A new pipe (see make_pipe) that ``close_all()`` will close."""
        r, w = make_pipe(big)
        self._fds += (r, w)
        return r, w

    def adopt(self, fd: Fd) -> None:
        """``fd``, made elsewhere, is closed by ``close_all()`` too."""
        self._fds.append(fd)

    def disown(self, fd: Fd) -> None:
        """``fd`` is closed by another owner from now on (see Delivery.close)."""
        self._fds.remove(fd)

    def close_all(self) -> None:
        for fd in self._fds:
            close_fd(fd)
        self._fds.clear()


def reserve_descriptors(n: int) -> None:
    """Raise OSError (EMFILE) now if fewer than ``n`` descriptors are free.

    multiprocessing's ``Process.start()`` opens two pipes and leaks the first
    when the second fails (CPython's popen_fork, popen_spawn_posix): under a
    low ``ulimit -n`` a failed start would leave descriptors behind that no
    one can close.  Opening (and closing) ``n`` first fails cleanly instead.
    (Another thread may take descriptors in between: this narrows the
    window, it cannot close it.)
    """
    opened: list[int] = []
    try:
        while len(opened) < n:
            opened.extend(os.pipe())
    finally:
        for fd in opened:
            os.close(fd)


def close_inherited_fds(keep: set[int]) -> None:
    """In a freshly forked child: close every inherited queue fd not in ``keep``."""
    with _OWNED_LOCK:
        foreign = _OWNED_FDS - keep
        _OWNED_FDS.clear()
        _OWNED_FDS.update(keep)
    for n in foreign:
        try:
            os.close(n)
        except OSError:
            pass


def set_nonblocking(fd: Fd) -> None:
    os.set_blocking(fd.fd, False)


def readable(fd: int, timeout: float | None) -> bool:
    """Wait until ``fd`` has data or end-of-file (or ``timeout`` seconds pass)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


# ------------------------------------------------------------------ framing


def frame(body_parts: tuple[bytes | memoryview, ...]) -> list[bytes | memoryview]:
    """The buffers of one frame: length prefix, then the body parts as they are."""
    n = sum(len(p) for p in body_parts)
    return [_LEN.pack(n), *body_parts]


def scratch_buffer(size: int = READ_CHUNK) -> memoryview:
    """A buffer for FrameReaders to read into.

    Reading into a buffer kept for the purpose, instead of ``os.read(fd,
    big)``, spares an allocation of ``big`` bytes (often an mmap and munmap)
    per read.  Readers used by one thread at a time may share one.  An
    anonymous mapping, not a bytearray: its pages cost nothing until a read
    touches them, where a bytearray zero-fills all 64 of them up front (a
    page fault each, about 0.3 ms per buffer, at every queue's start).
    """
    return memoryview(mmap.mmap(-1, size))


_PAGE = mmap.PAGESIZE


def _address(buf: bytearray) -> int:
    """Where ``buf``'s bytes are in memory (unchanged while it keeps its size)."""
    cell = ctypes.c_char.from_buffer(buf)  # (an export of buf, gone with cell)
    return ctypes.addressof(cell)


class BodyPool:
    """Memory for large frame bodies and ring copies to be read into, taken
    back once their reader is done with them for the next ones.

    A fresh bytearray of a few megabytes is zero-filled in fresh pages: a
    page fault per 4 KiB, half of the consumer's time on large results (the
    memory that malloc hands back to the kernel as the body is freed comes
    back as fresh pages next time).  So bodies are kept: at most
    ``MAX_POOLED`` of them, ``MAX_POOLED_BYTES`` in all.

    A body is a window of a bytearray (a memoryview, writable: arrays load
    on it writable) that begins at a chosen place in a page, the same as
    where the copied bytes lie in theirs (``phase``).  The kernel copies a
    page to an address a few bytes past the same place in a page several
    times slower (4 KiB aliasing: each load waits on the store 4 KiB
    before it): a bytearray's bytes begin 16 bytes into a page, and ranges
    in a ring begin on a page more often than not (arrays of whole pages):
    8 MiB read out of a ring at 2 GB/s into a bytearray, 7 GB/s here.

    A window is taken back only if nothing still uses its memory: a numpy
    array rebuilt on it (zero-copy) exports it; so does a view kept of it.
    """

    __slots__ = ("free", "held")

    def __init__(self) -> None:
        self.free: list[bytearray] = []
        self.held = 0  # bytes in ``free``

    def _kept_for(self, need: int) -> int:
        """Where in ``free`` a body that can hold ``need`` bytes is (-1: none)."""
        free = self.free
        for i in range(len(free) - 1, -1, -1):
            alloc = free[i].__alloc__()
            # Resized within its allocation (CPython resizes a bytearray in
            # place from half its allocation up): no copy, no fresh page.
            if alloc // 2 <= need < alloc:
                return i
        return -1

    def has(self, size: int) -> bool:
        """Whether ``take(size)`` would use memory kept, not make a body
        (zero-filled: some 10 ms for 40 MB)."""
        return self._kept_for(size + _PAGE) >= 0

    def take(self, size: int, phase: int = 0) -> memoryview:
        """A window of ``size`` bytes, its contents undefined, that begins
        ``phase`` bytes into a page."""
        need = size + _PAGE  # room to begin anywhere in the first page
        i = self._kept_for(need)
        if i >= 0:
            body = self.free.pop(i)
            self.held -= len(body)
            if len(body) > need:
                del body[need:]
            elif len(body) < need:
                body.extend(bytes(need - len(body)))
        else:
            body = bytearray(need)
        skip = (phase - _address(body)) % _PAGE
        return memoryview(body)[skip : skip + size]

    def give(self, window: Any) -> None:
        """``window`` (from ``take``) is no longer needed by its reader: keep
        its memory if nothing else uses it."""
        try:
            body = window.obj
        except (AttributeError, ValueError):  # not a window, or one given back already
            return
        if type(window) is not memoryview or type(body) is not bytearray:
            return
        if len(body) < BIG_FRAME + _PAGE:
            return
        if len(self.free) >= MAX_POOLED or self.held + len(body) > MAX_POOLED_BYTES:
            return
        try:
            window.release()  # refused while an array made on it exports it
            del body[-1:]  # refused while anything else exports the bytearray
        except BufferError:
            return
        body.append(0)  # (both in place: see take)
        self.free.append(body)
        self.held += len(body)


MAX_POOLED = 4
MAX_POOLED_BYTES = 64 << 20


class FrameReader:
    """Collects bytes from a pipe and yields whole frame bodies.

    ``read_ready()`` does at most one read, so it never blocks when the
    caller knows the pipe is readable.  A frame cut short because its writer
    died stays in the buffer; ``discard_partial()`` drops it.  ``scratch``
    (see ``scratch_buffer``) is where reads land before whole frames are
    copied out.

    A large frame (``BIG_FRAME`` bytes or more) that a read did not bring
    whole is not gathered through the scratch buffer: its body is allocated
    once, at its final size, and the rest of it is read straight into it.
    Gathering cost two more copies of every byte (into the partial buffer,
    then out into the body), which is what large results paid here twice,
    in the consumer and in the main process.  Such a body is a window of a
    bytearray, from ``pool`` (see BodyPool), which ``give_back`` refills.
    """

    __slots__ = ("fd", "_buf", "eof", "_scratch", "_big", "_big_pos", "_big_next", "pool")

    def __init__(self, fd: Fd, scratch: memoryview | None = None, pool: BodyPool | None = None) -> None:
        self.fd = fd
        self._buf = bytearray()  # the start of a frame not yet whole
        self.eof = False
        self._scratch = scratch if scratch is not None else scratch_buffer()
        self.pool = pool if pool is not None else BodyPool()
        self._big: memoryview | None = None  # a large frame's body, being read into
        self._big_pos = 0  # how much of it has come
        self._big_next = False  # ``_buf`` holds a large frame's start: its body is made at the next read

    def read_ready(self) -> list[bytes]:
        if self._big is not None:
            return self._read_big()
        if self._big_next:
            return self._start_big()
        try:
            n = os.readv(self.fd.fd, [self._scratch])
        except (BlockingIOError, InterruptedError):
            return []
        if not n:
            self.eof = True
            return []
        buf = self._buf
        if buf:
            buf += self._scratch[:n]
            data = memoryview(buf)
        else:
            data = self._scratch[:n]  # the usual case: frames start at the read
        bodies: list[bytes] = []
        pos = 0
        end = len(data)
        while end - pos >= 8:
            (size,) = _LEN.unpack_from(data, pos)
            if end - pos - 8 < size:
                if size >= BIG_FRAME:
                    if self.pool.has(size):
                        # The rest of the data is this frame's start: the
                        # body takes it, and the next reads go straight in.
                        big = self.pool.take(size)
                        have = end - pos - 8
                        big[:have] = data[pos + 8 : end]
                        self._big, self._big_pos = big, have
                        pos = end
                    else:
                        # A new body: made at the next read (see
                        # in_large_frame), for making it takes long enough
                        # for a Ctrl-C to land in it; the start waits in _buf.
                        self._big_next = True
                break
            with data[pos + 8 : pos + 8 + size] as chunk:  # (released: ``buf`` is trimmed below)
                if size >= BIG_FRAME:  # writable, however it came: its buffers load writable
                    body = self.pool.take(size)
                    body[:] = chunk
                    bodies.append(body)  # type: ignore[arg-type]
                else:
                    bodies.append(bytes(chunk))
            pos += 8 + size
        if buf:
            data.release()  # a bytearray with a view on it cannot shrink
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return bodies

    @property
    def in_large_frame(self) -> bool:
        """Whether the next read goes into a large frame's body (made by that
        read if need be)."""
        return self._big is not None or self._big_next

    def _start_big(self) -> list[bytes]:
        """Make the large frame's body from its start in ``_buf``, then read
        into it."""
        buf = self._buf
        (size,) = _LEN.unpack_from(buf, 0)
        big = self.pool.take(size)
        have = len(buf) - 8
        with memoryview(buf) as start:
            big[:have] = start[8:]
        self._big, self._big_pos, self._big_next = big, have, False
        buf.clear()
        return self._read_big()

    def _read_big(self) -> list[bytes]:
        """One read into the large frame's body; the body once it is whole."""
        big = self._big
        assert big is not None
        with memoryview(big) as view:
            try:
                n = os.readv(self.fd.fd, [view[self._big_pos :]])
            except (BlockingIOError, InterruptedError):
                return []
        if not n:
            self.eof = True
            return []
        self._big_pos += n
        if self._big_pos < len(big):
            return []
        self._big = None
        return [big]  # type: ignore[list-item]  # (a window of a bytearray: bodies are only read)

    def give_back(self, body: Any) -> None:
        """A body this reader gave is no longer needed (see BodyPool)."""
        self.pool.give(body)

    def drain(self) -> list[bytes]:
        """Everything whole that is in the pipe now (the writer is known dead)."""
        bodies: list[bytes] = []
        while not self.eof and readable(self.fd.fd, 0):
            got = self.read_ready()
            bodies.extend(got)
        return bodies

    def discard_partial(self) -> None:
        self._buf.clear()
        self._big = None
        self._big_next = False
        self.eof = False


class FrameWriter:
    """Writes frames to a non-blocking pipe, keeping what the pipe cannot take yet.

    ``send()`` writes as much as the pipe takes at once and returns whether
    everything went out; the owner's event loop calls ``flush()`` when the
    pipe becomes writable again.  Raises ``BrokenPipeError`` when the reader
    is gone.
    """

    __slots__ = ("fd", "_out", "pending_bytes")

    def __init__(self, fd: Fd) -> None:
        self.fd = fd
        self._out: deque[memoryview] = deque()
        self.pending_bytes = 0

    def send(self, *body_parts: bytes | memoryview) -> bool:
        for part in frame(body_parts):
            mv = memoryview(part).cast("B")
            if len(mv):
                self._out.append(mv)
                self.pending_bytes += len(mv)
        return self.flush()

    def flush(self) -> bool:
        out = self._out
        while out:
            try:
                n = os.writev(self.fd.fd, list(itertools.islice(out, WRITEV_MAX)))
            except (BlockingIOError, InterruptedError):
                return False
            self.pending_bytes -= n
            _written(out, n)
        return True

    def clear(self) -> None:
        self._out.clear()
        self.pending_bytes = 0


def _written(bufs: deque[memoryview], n: int) -> None:
    """Drop from the front of ``bufs`` the ``n`` bytes a writev() took."""
    while n:
        head = bufs[0]
        if len(head) <= n:
            n -= len(head)
            bufs.popleft()
        else:
            bufs[0] = head[n:]
            n = 0


def write_frame_blocking(fd: int, *body_parts: bytes | memoryview) -> None:
    """Write one whole frame to a blocking pipe (a worker's result pipe)."""
    bufs = deque(memoryview(p).cast("B") for p in frame(body_parts))
    while bufs:
        _written(bufs, os.writev(fd, list(itertools.islice(bufs, WRITEV_MAX))))


def read_exact(fd: int, n: int, pool: BodyPool | None = None) -> bytearray | memoryview | None:
    """Read exactly ``n`` bytes from a blocking pipe; None at end-of-file.
    With ``pool``, ``n`` bytes from BIG_FRAME on are read into a window of
    it (its memory used again, and page-aligned: see BodyPool)."""
    buf: bytearray | memoryview = pool.take(n) if pool is not None and n >= BIG_FRAME else bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = os.readv(fd, [view[pos:]])
        if got == 0:
            return None
        pos += got
    return buf


def read_frame_blocking(fd: int, pool: BodyPool | None = None) -> bytearray | memoryview | None:
    """Read one whole frame body from a blocking pipe; None at end-of-file
    (``pool``: see read_exact)."""
    head = read_exact(fd, 8)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    return read_exact(fd, n, pool)


# ------------------------------------------------------------ message types
#
# Kinds are one byte.  Hot-path messages (tasks, results, credits) have a
# fixed struct header; the rest is a pickled payload.


class Kind:
    """The first byte of every frame body."""

    TASKS = 1  # dispatcher -> worker: a packet of tasks
    STOP = 2  # dispatcher -> worker: exit after the packets before this
    RESULT = 3  # worker -> consumer -> main: a packet's results
    WAIT = 4  # worker -> consumer: my finished packet is past max_packet_id; wake me
    REJECT = 5  # worker -> consumer: the packet's batch could not be unpickled here; send it careful
    INIT_FAILED = 6  # worker -> consumer: worker_init_f raised
    CREDIT = 7  # consumer -> dispatcher: slot's worker is done with a packet
    DRAINED = 8  # consumer -> dispatcher: a dead worker's pipe is read to the end
    DRAIN = 9  # dispatcher -> consumer: this slot's worker ended; read its pipe out
    LAST = 10  # dispatcher -> consumer: this many packets in all; exit after them
    FATAL = 11  # consumer -> dispatcher: the queue cannot go on (payload: error)
    FINISHED = 12  # consumer -> dispatcher: every packet is delivered; I exit now


class TaskPacket(NamedTuple):
    """Dispatcher -> worker: ``n_items`` tasks under one packet id.

    ``careful`` packets carry a list of per-item pickles, and the worker
    takes each step one task at a time, so a failure, or a death, is pinned
    on one task (see _worker.run_careful).  ``form`` says what an item is
    (_tasks.CALL, ARGS, STAR, ONE); a map's packet on a queue that runs any
    task (ParallelQueue.imap) carries its function first.  ``buffers``: the
    out-of-band buffers of the pickle (None if it has none).
    """

    packet_id: int
    n_items: int
    careful: bool
    form: int
    payload: bytes | memoryview
    buffers: list[Any] | None = None
    first: int = 0  # the number of its first task among all tasks put (for messages)


_TASKS = struct.Struct("<BqIBBIq")

# After a frame's fixed header, when it has out-of-band buffers: the range
# of its shared-memory ring they took (0, 0: none, see _region), then each
# buffer's length and ring position (NOT_SHARED: it follows the pickle, in
# the frame).
_RANGE = struct.Struct("<QQ")
_BUFFER = struct.Struct("<QQ")
NOT_SHARED = (1 << 64) - 1


class Placement(NamedTuple):
    """Where a frame's buffers went: the ring range ``[start, end)`` they
    took, and each buffer's position (``NOT_SHARED``: in the frame)."""

    start: int
    end: int
    positions: list[int]


# A reader's view of its ring: ``view_of(start, data, end)`` is a view of the
# ring from position ``data`` to ``end``, in the range that starts at ``start``.
ViewOf = Callable[[int, int, int], memoryview]


# A buffer's length field, this bit set: its loader copies it (a bytes or
# bytearray value, see _payload._BigBytes), so the reader need not.
LOADED_AS_COPY = 1 << 63
_COPIED_BY_LOADER = (bytes, bytearray)


def _length_field(b: Any) -> int:
    view = b if type(b) is memoryview else memoryview(b)
    return view.nbytes | (LOADED_AS_COPY if type(view.obj) in _COPIED_BY_LOADER else 0)


def buffer_table(buffers: Sequence[Any], placement: Placement | None) -> bytes:
    """What follows a frame's fixed header: where its buffers are."""
    if not buffers:
        return b""
    if placement is None:
        return _RANGE.pack(0, 0) + b"".join(_BUFFER.pack(_length_field(b), NOT_SHARED) for b in buffers)
    return _RANGE.pack(placement.start, placement.end) + b"".join(
        _BUFFER.pack(_length_field(b), p) for b, p in zip(buffers, placement.positions)
    )


def in_frame(buffers: Sequence[Any], placement: Placement | None) -> Sequence[Any]:
    """The buffers that travel in the frame, after the pickle."""
    if placement is None:
        return buffers
    return [b for b, p in zip(buffers, placement.positions) if p == NOT_SHARED]


def encode_tasks(
    packet_id: int,
    count: int,
    careful: bool,
    form: int,
    buffers: Sequence[Any] = (),
    placement: Placement | None = None,
    first: int = 0,
) -> bytes:
    """A task frame's header: the fixed part, then where each out-of-band
    buffer is (the pickle and the buffers in the frame follow, as in a
    result frame).  ``first``: the number of the packet's first task."""
    head = _TASKS.pack(Kind.TASKS, packet_id, count, careful, form, len(buffers), first)
    return head + buffer_table(buffers, placement)


def decode_tasks(body: bytearray | memoryview, view_of: ViewOf | None = None) -> TaskPacket:
    _, pid, count, ind, form, n_buffers, first = _TASKS.unpack_from(body)
    payload, buffers = _split_buffers(body, _TASKS.size, n_buffers, view_of)
    return TaskPacket(pid, count, bool(ind), form, payload, buffers, first)


def tasks_id(body: bytes | bytearray | memoryview) -> tuple[int, bool]:
    """A task frame's packet id, and whether it is careful (nothing else decoded)."""
    _, pid, _, careful, _, _, _ = _TASKS.unpack_from(body)
    return pid, bool(careful)


def _split_buffers(
    body: bytes | bytearray | memoryview, start: int, n: int, view_of: ViewOf | None
) -> tuple[memoryview, list[Any] | None]:
    """A frame's pickle, from ``start`` on, and its ``n`` out-of-band buffers
    (None if it has none), whose places come first (see buffer_table).

    A buffer in the frame that is most of the frame is a view of ``body``,
    which a numpy array loaded from it keeps alive (zero-copy; writable if
    ``body`` is writable, as a frame this large is: see FrameReader); a
    buffer in the ring that is most of the frame's range is a view of the
    ring (see _region.RingReader.view).  A smaller one is a copy of its own:
    an array kept on it would keep the whole frame (a 64 KiB array beside
    an 8 MiB result held 8 MiB), or hold up the ring.  So what is kept is at
    most twice what is used.  (Not a buffer whose loader copies it anyway:
    bytes values, see LOADED_AS_COPY.)"""
    view = memoryview(body)
    if not n:
        return view[start:], None
    ring_start, ring_end = _RANGE.unpack_from(view, start)
    start += _RANGE.size
    table = struct.unpack_from(f"<{2 * n}Q", view, start)
    start += _BUFFER.size * n
    fields, places = table[0::2], table[1::2]
    lengths = [f & ~LOADED_AS_COPY for f in fields]
    end = len(view) - sum(length for length, p in zip(lengths, places) if p == NOT_SHARED)
    ring: Any = None
    data = 0
    if ring_end:
        assert view_of is not None, "a frame with buffers in a ring, read without one"
        data = min(p for p in places if p != NOT_SHARED)
        ring = view_of(ring_start, data, ring_end)
    buffers: list[Any] = []
    pos = end
    for field, length, p in zip(fields, lengths, places):
        if p == NOT_SHARED:
            part: Any = view[pos : pos + length]
            pos += length
            whole = len(view)
        else:
            part = ring[p - data : p - data + length]
            whole = ring_end - data
        if 2 * length <= whole and not field & LOADED_AS_COPY:
            part = bytearray(part)
        buffers.append(part)
    return view[start:end], buffers


class ResultHeader(NamedTuple):
    """Worker -> consumer -> main: the results of packet ``packet_id``.

    ``compute_ns`` is the time the worker spent running the frame's tasks
    (the dispatcher sizes batches from it).  ``careful``: the payload holds
    one pickle per result (see TaskPacket).  ``n_buffers``: how many
    out-of-band buffers follow the pickle (see split_result).

    A packet whose results grow large goes in several frames (see
    _worker.SPLIT_BYTES): each holds the results of tasks ``start`` to
    ``start + n_items`` of the packet, and every frame but the last has
    ``more`` set.  A worker sends such a frame only while its packet is the
    next one the consumer delivers, so it goes straight through.  If the
    worker dies, the packet runs again from its first task and its frames
    start again at 0: the main process drops what it already had (see
    Receiver.decode).
    """

    packet_id: int
    n_items: int
    compute_ns: int
    careful: bool
    n_buffers: int
    slot: int
    start: int = 0
    more: bool = False


RESULT = struct.Struct("<BqIQBIHI")
_CAREFUL, _MORE = 1, 2  # RESULT's flags


def encode_result(
    packet_id: int,
    count: int,
    compute_ns: int,
    careful: bool = False,
    buffers: Sequence[memoryview] = (),
    placement: Placement | None = None,
    slot: int = 0,
    start: int = 0,
    more: bool = False,
) -> bytes:
    """A result frame's header: the fixed part, then where each out-of-band
    buffer is (the pickle and the buffers in the frame follow it, in that
    order).  ``slot``: the worker's, whose ring holds the others; ``start``
    and ``more``: see ResultHeader."""
    flags = (_CAREFUL if careful else 0) | (_MORE if more else 0)
    head = RESULT.pack(Kind.RESULT, packet_id, count, compute_ns, flags, len(buffers), slot, start)
    return head + buffer_table(buffers, placement)


def decode_result(body: bytes | bytearray) -> ResultHeader:
    _, pid, count, ns, flags, n_buffers, slot, start = RESULT.unpack_from(body)
    return ResultHeader(pid, count, ns, bool(flags & _CAREFUL), n_buffers, slot, start, bool(flags & _MORE))


def frame_key(packet_id: int, start: int) -> int:
    """One number for a result frame, unique among a worker's: its packet id
    and its first task's index in the packet (see _region's FRAME_PACKET)."""
    return packet_id | (start << 32)


def split_frame_key(key: int) -> tuple[int, int]:
    """``(packet_id, start)`` of a ``frame_key``."""
    return key & 0xFFFFFFFF, key >> 32


def split_result(
    body: bytes | bytearray, header: ResultHeader, view_of: ViewOf | None = None
) -> tuple[memoryview, list[Any] | None]:
    """A result frame's pickle, and its out-of-band buffers (see _split_buffers)."""
    return _split_buffers(body, RESULT.size, header.n_buffers, view_of)


def result_bytes(body: bytes | bytearray, header: ResultHeader) -> int:
    """How many bytes a packet's results came to: the frame, and its buffers
    in the ring (not the ring range they took: that may count the end of
    the ring skipped, megabytes, and packets were then sized by it)."""
    n = header.n_buffers
    if not n:
        return len(body)
    table = struct.unpack_from(f"<{2 * n}Q", body, RESULT.size + _RANGE.size)
    shared = sum(int(f) & ~LOADED_AS_COPY for f, p in zip(table[0::2], table[1::2]) if p != NOT_SHARED)
    return len(body) + shared


_ID = struct.Struct("<Bq")  # WAIT, REJECT, LAST: a kind and a packet id


def encode_id(kind: int, value: int) -> bytes:
    return _ID.pack(kind, value)


def decode_id(body: bytes | bytearray) -> int:
    return int(_ID.unpack_from(body)[1])


class Credit(NamedTuple):
    """Consumer -> dispatcher: the worker in ``slot`` is done with ``packet_id``.

    ``rejected``: it could not unpickle the batch, so the dispatcher sends
    the packet again with each task pickled on its own.  ``result_bytes``:
    the size of the frame's results (the dispatcher sizes packets by it too).
    ``more``: the frame is one of a packet's first frames (see
    ResultHeader), starting at task ``start``; the packet is not done yet.
    """

    slot: int
    packet_id: int
    n_items: int
    compute_ns: int
    rejected: bool
    result_bytes: int = 0
    more: bool = False
    start: int = 0


_CREDIT = struct.Struct("<BHqIQBQBI")


def encode_credit(c: Credit) -> bytes:
    return _CREDIT.pack(
        Kind.CREDIT, c.slot, c.packet_id, c.n_items, c.compute_ns, c.rejected, c.result_bytes, c.more, c.start
    )


def decode_credit(body: bytes | bytearray) -> Credit:
    _, slot, pid, count, ns, rej, size, more, start = _CREDIT.unpack_from(body)
    return Credit(slot, pid, count, ns, bool(rej), size, bool(more), start)


_SLOT = struct.Struct("<BH")  # DRAIN, DRAINED


def encode_slot(kind: int, slot: int) -> bytes:
    return _SLOT.pack(kind, slot)


def decode_slot(body: bytes | bytearray) -> int:
    return int(_SLOT.unpack_from(body)[1])
