"""What travels inside packets: task batches, results and error records.

Tasks go out with cloudpickle (lambdas, closures and ``__main__`` functions
work), a whole batch in one call so a callable repeated in the batch is
pickled once.  Results come back with plain pickle, falling back to
cloudpickle for what plain pickle refuses.  Every failure is narrowed down
to the one item that caused it, which gets an error in its own slot; the
others go through.
"""

from __future__ import annotations

import itertools
import pickle
import traceback
from types import TracebackType
from typing import Any, Optional

import cloudpickle
from tblib import Traceback

from ._errors import RemoteError
from ._wire import BIG_FRAME

PROTOCOL = pickle.HIGHEST_PROTOCOL

# A chain of causes deeper than this is cut (a cycle, or an absurd chain):
# each link costs a pickle and a traceback in the worker.
MAX_CHAIN = 8


class TaskError:
    """An exception raised by (or on behalf of) one task, ready to travel.

    Built in the worker from the live exception; rebuilt in the main process
    by ``to_exception()``: the original type when it survives pickling,
    otherwise a ``RemoteError`` with its type name, message and traceback
    text.  Either way the exception gets the worker's frames as its
    ``__traceback__`` and the formatted traceback as ``stack_trace``.
    """

    __slots__ = ("exc_bytes", "type_name", "message", "stack_trace", "tb", "cause", "context", "suppress", "reason")

    def __init__(
        self,
        exc_bytes: Optional[bytes],
        type_name: str,
        message: str,
        stack_trace: str,
        tb: Optional[dict[str, Any]] = None,
        cause: Optional[TaskError] = None,
        context: Optional[TaskError] = None,
        suppress: bool = False,
        reason: str = "",
    ) -> None:
        self.exc_bytes = exc_bytes
        self.type_name = type_name
        self.message = message
        self.stack_trace = stack_trace
        self.tb = tb
        self.cause = cause
        self.context = context
        self.suppress = suppress
        self.reason = reason

    def __reduce__(self) -> tuple[type[TaskError], tuple[Any, ...]]:
        return TaskError, tuple(getattr(self, s) for s in TaskError.__slots__)

    @classmethod
    def from_exception(cls, exc: BaseException, depth: int = 0) -> TaskError:
        """Capture ``exc`` (with its traceback and causes) in the worker."""
        exc_bytes, reason = _pickle_exception(exc)
        try:
            tb = Traceback(exc.__traceback__).to_dict() if exc.__traceback__ else None
        except Exception:  # a frame tblib cannot describe: the text still travels
            tb = None
        cause = context = None
        if depth < MAX_CHAIN:
            if exc.__cause__ is not None:
                cause = cls.from_exception(exc.__cause__, depth + 1)
            elif exc.__context__ is not None and not exc.__suppress_context__:
                context = cls.from_exception(exc.__context__, depth + 1)
        return cls(
            exc_bytes,
            _qualified_name(type(exc)),
            _safe_str(exc),
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            tb,
            cause,
            context,
            exc.__suppress_context__,
            reason,
        )

    @classmethod
    def for_failure(
        cls, exc: BaseException, what: str, error_type: type[Exception] = pickle.PicklingError
    ) -> TaskError:
        """An error raised on a task's behalf (``what`` failed), caused by ``exc``."""
        try:
            raise error_type(f"{what}: {type(exc).__name__}: {_safe_str(exc)}") from exc
        except Exception as wrapped:
            return cls.from_exception(wrapped)

    @classmethod
    def from_message(cls, exc: BaseException) -> TaskError:
        """An error made in the main process for a task (worker lost, timeout)."""
        return cls(
            _dumps_or_none(exc), _qualified_name(type(exc)), _safe_str(exc), f"{_qualified_name(type(exc))}: {exc}\n"
        )

    def to_exception(self) -> BaseException:
        """The exception to raise in ``get()``, with the worker's traceback.

        The traceback's frames are made by running code here (tblib), so each
        keeps a reference to its caller's frame, and so on up the stack: this
        frame, and whoever called it (a map's iterator, get()).  None of
        those frames may hold the exception or its traceback once they
        return, or the exception would be in a reference cycle, and with it
        everything up the stack (a dropped map, its queue) would live on
        until the cyclic garbage collector ran: hence the ``del`` below, and
        callers raise or return the result without naming it.
        """
        exc: BaseException
        reason = self.reason
        if self.exc_bytes is not None:
            try:
                exc = pickle.loads(self.exc_bytes)
                if not isinstance(exc, BaseException):
                    raise TypeError(f"unpickled a {type(exc).__name__}, not an exception")
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                exc = RemoteError(self.type_name, self.message, self.stack_trace, reason)
        else:
            exc = RemoteError(self.type_name, self.message, self.stack_trace, reason)
        try:
            exc.stack_trace = self.stack_trace  # type: ignore[attr-defined]
        except Exception:  # exception types with __slots__ refuse new attributes
            pass
        tb = _rebuild_traceback(self.tb)
        if tb is not None:
            exc = exc.with_traceback(tb)
        if self.cause is not None:
            exc.__cause__ = self.cause.to_exception()
        elif self.context is not None:
            exc.__context__ = self.context.to_exception()
        exc.__suppress_context__ = self.suppress
        try:
            return exc
        finally:
            del exc, tb


def _qualified_name(t: type) -> str:
    mod = getattr(t, "__module__", None)
    name = getattr(t, "__qualname__", t.__name__)
    return name if mod in (None, "builtins") else f"{mod}.{name}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as e:  # a broken __str__ must not lose the error
        return f"<str() failed: {type(e).__name__}: {e}>"


def _dumps_or_none(obj: Any) -> Optional[bytes]:
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return None


def _pickle_exception(exc: BaseException) -> tuple[Optional[bytes], str]:
    """Pickle ``exc`` if it will also unpickle; otherwise say why not.

    The round trip runs here in the worker, on the error path only: an
    exception whose ``__init__`` needs more than its args pickles fine but
    fails to unpickle, and it is better to learn that here than in ``get()``.
    """
    saved_tb = exc.__traceback__
    try:
        exc.__traceback__ = None  # frames do not pickle; tblib carries them
        for dumps in (pickle.dumps, cloudpickle.dumps):
            try:
                data = dumps(exc, PROTOCOL)
            except BaseException as e:  # noqa: BLE001 - its __reduce__ is user code
                reason = f"cannot be pickled: {type(e).__name__}: {_safe_str(e)}"
                continue
            try:
                pickle.loads(data)
            except BaseException as e:  # noqa: BLE001
                return None, f"cannot be unpickled: {type(e).__name__}: {_safe_str(e)}"
            return data, ""
        return None, reason
    finally:
        exc.__traceback__ = saved_tb


def _rebuild_traceback(d: Optional[dict[str, Any]]) -> Optional[TracebackType]:
    if d is None:
        return None
    try:
        return Traceback.from_dict(d).as_traceback()  # type: ignore[no-any-return]
    except Exception:
        return None


# ------------------------------------------------------------------- tasks
#
# An item of a ParallelQueue packet is ``(fn, args, kwargs_or_None)``; of a
# ParallelSingleTaskQueue packet, ``(args, kwargs_or_None)``.  A TaskError in
# place of an item is a task that already failed (it could not be pickled, or
# its worker died): the worker passes the error through in its slot.


def dumps_tasks(items: list[Any]) -> tuple[bytes, bool]:
    """Pickle a batch; returns (payload, careful).

    The fast path pickles the whole list at once.  If that fails, each item
    is pickled on its own (a careful packet, see _worker) and the ones that
    fail become TaskErrors, so one unpicklable argument costs only its own
    slot.
    """
    try:
        return bytes(cloudpickle.dumps(items, PROTOCOL)), False
    except BaseException:  # noqa: BLE001 - user pickling code may raise SystemExit too
        return dumps_individually(items), True


def dumps_tasks_oob(items: list[Any], large: bool) -> tuple[bytes, list[memoryview], bool]:
    """As dumps_tasks, with every buffer of ``OOB_MIN`` bytes or more out of
    band (see dumps_results_oob): ``(pickle, buffers, careful)``.  ``large``:
    the tasks may carry large ``bytes`` (looked for in the arguments, which
    tiny tasks are spared)."""
    out = _OutOfBand()
    if large:
        items = [_big_bytes_in_task(item) for item in items]
    try:
        return bytes(cloudpickle.dumps(items, PROTOCOL, buffer_callback=out)), out.buffers, False
    except BaseException:  # noqa: BLE001 - user pickling code may raise SystemExit too
        return dumps_individually(items), [], True


def _big_bytes_in_task(item: Any) -> Any:
    """A task item with its large ``bytes`` arguments wrapped to travel out of
    band (transparently: they load as they were).  An item is an argument,
    a tuple of them, or ``(fn, args, kwargs)``."""
    if type(item) is tuple and len(item) == 3 and type(item[1]) is tuple and type(item[2]) is dict:
        fn, args, kwargs = item
        if any(_is_big_bytes(v) for v in kwargs.values()):
            kwargs = {k: _wrap_big_bytes(v) for k, v in kwargs.items()}
        return fn, _wrap_big_bytes(args), kwargs
    return _wrap_big_bytes(item)


# What multiprocessing's Locks, Semaphores, Events, Conditions and shared
# Values say when pickled outside a process start (their memory is an mmap).
_SHARED_OBJECT_SIGNS = ("mmap", "SemLock", "synchronized objects", "should only be shared between processes")


def _hint(e: BaseException) -> str:
    """For a task that will not pickle because it holds a multiprocessing
    synchronisation object: where such objects can go instead."""
    if any(sign in str(e) for sign in _SHARED_OBJECT_SIGNS):
        return (
            " (a multiprocessing Lock, Event, Condition, Semaphore or Value cannot travel with a task:"
            " give it to the workers as they start instead, in ParallelSingleTaskQueue's task_fn, a"
            " closure over it, or in worker_init_f)"
        )
    return ""


def dumps_individually(items: list[Any]) -> bytes:
    """A careful packet's payload: one pickle per item, in a plain list."""
    parts: list[Any] = []
    for item in items:
        if isinstance(item, TaskError):
            parts.append(item)
            continue
        try:
            parts.append(cloudpickle.dumps(item, PROTOCOL))
        except BaseException as e:  # noqa: BLE001 - SystemExit from a __reduce__ is that task's error
            parts.append(TaskError.for_failure(e, f"could not pickle task {describe_task(item)}{_hint(e)}"))
    return pickle.dumps(parts, PROTOCOL)


def loads_tasks(payload: bytes | memoryview, careful: bool, buffers: Optional[list[memoryview]] = None) -> list[Any]:
    """Unpickle a batch in the worker (``buffers``: its out-of-band buffers).
    Raises if a whole batch cannot be loaded; a careful one fails item by
    item instead."""
    if not careful:
        return pickle.loads(payload, buffers=buffers)  # type: ignore[no-any-return]
    return [load_one_task(part) for part in loads_tasks_envelope(payload)]


def loads_tasks_envelope(payload: bytes | memoryview) -> list[Any]:
    """A careful packet's list of per-task pickles (or TaskErrors): our own
    plain list, so it always loads."""
    return pickle.loads(payload)  # type: ignore[no-any-return]


def load_one_task(part: Any) -> Any:
    """One task of a careful packet; a TaskError if it will not unpickle."""
    if isinstance(part, TaskError):
        return part
    try:
        return pickle.loads(part)
    except BaseException as e:  # noqa: BLE001 - a loader's SystemExit is that task's error too
        return TaskError.for_failure(e, "could not unpickle the task in the worker", pickle.UnpicklingError)


def describe_task(item: Any) -> str:
    """A short, safe description of a task item for error messages."""
    fn = item[0] if isinstance(item, tuple) and len(item) == 3 else None
    if fn is None:
        return "(arguments of the queue's task function)"
    name = getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", "?")
    mod = getattr(fn, "__module__", None)
    return f"{mod}.{name}" if mod else str(name)


# ----------------------------------------------------------------- results
#
# A result payload is ``(values, errors)``: ``values[k]`` is task k's return
# value (None where it failed) and ``errors`` maps k to its TaskError, empty
# on the happy path so delivery checks one dict lookup at most.


def every_slot_fails(n: int, error: Any) -> tuple[list[Any], dict[int, Any]]:
    """The ``(values, errors)`` of a packet of ``n`` tasks that all fail with ``error``."""
    return [None] * n, dict.fromkeys(range(n), error)


# A buffer this large (a numpy array's data, a bytearray, a large bytes
# result) travels out of band: after the pickle, as it is, with no copy into
# the pickle stream on the way out, and on the way in none out of it (a
# numpy array is rebuilt on the received bytes themselves).
# (No smaller than a large frame: a frame with buffers is read into a
# bytearray, so its arrays load writable, see _wire.FrameReader.)
OOB_MIN = BIG_FRAME


class _BigBytes:
    """A large ``bytes`` or ``bytearray`` result, pickled as an out-of-band
    buffer (pickle writes both into the stream, and never offers them to a
    buffer callback).  It loads as what it was, with one copy."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self.data), (pickle.PickleBuffer(self.data),)


_BYTES = (bytes, bytearray)


def _is_big_bytes(x: Any) -> bool:
    return type(x) in _BYTES and len(x) >= OOB_MIN


def _wrap_big_bytes(x: Any) -> Any:
    """``x`` wrapped to travel out of band if it is a large ``bytes`` or
    ``bytearray``; a tuple with those of its items wrapped; else ``x``
    itself (the very object: nothing was wrapped)."""
    if _is_big_bytes(x):
        return _BigBytes(x)
    if type(x) is tuple and any(_is_big_bytes(a) for a in x):
        return tuple(_BigBytes(a) if _is_big_bytes(a) else a for a in x)
    return x


def _big_bytes_out_of_band(values: list[Any]) -> list[Any]:
    """``values``, with each large ``bytes`` or ``bytearray`` (a value, or an
    item of a tuple value) wrapped to travel out of band; ``values`` itself
    if none is."""
    out: Optional[list[Any]] = None
    for k, v in enumerate(values):
        w = _wrap_big_bytes(v)
        if w is not v:
            out = out or list(values)
            out[k] = w
    return values if out is None else out


def dumps_results(values: list[Any], errors: dict[int, TaskError], items: list[Any], first: int) -> bytes:
    """Pickle the results of a packet of ``items``, all in one stream; a value
    that will not pickle fails in its slot (``first``: the number of the
    packet's first task, for the message)."""
    return _dumps_results(values, errors, items, None, first)


def dumps_results_oob(
    values: list[Any], errors: dict[int, TaskError], items: list[Any], first: int
) -> tuple[bytes, list[memoryview]]:
    """As dumps_results, with every buffer of ``OOB_MIN`` bytes or more out of
    band: ``(pickle, buffers)``; ``loads_results(pickle, buffers)`` loads it."""
    out = _OutOfBand()
    payload = _dumps_results(_big_bytes_out_of_band(values), errors, items, out, first)
    return payload, out.buffers


class _OutOfBand:
    """A pickler's buffer callback: keeps the large buffers out of the stream."""

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: in the stream
            return True
        if raw.nbytes < OOB_MIN:
            return True
        self.buffers.append(raw)
        return False

    def fresh(self) -> _OutOfBand:
        """For a new attempt at pickling: what a failed one gave is forgotten."""
        self.buffers.clear()
        return self


def _dumps_results(
    values: list[Any], errors: dict[int, TaskError], items: list[Any], out: Optional[_OutOfBand], first: int
) -> bytes:
    # BaseException throughout: a result's __reduce__ raising SystemExit or
    # KeyboardInterrupt is that task's error, not the worker's end.
    try:
        return pickle.dumps((values, errors), PROTOCOL, buffer_callback=out and out.fresh())
    except BaseException:  # noqa: BLE001
        pass
    try:
        return bytes(cloudpickle.dumps((values, errors), PROTOCOL, buffer_callback=out and out.fresh()))
    except BaseException:  # noqa: BLE001
        pass
    for k, v in enumerate(values):
        if k in errors:
            continue
        try:
            pickle.dumps(v, PROTOCOL)
        except BaseException:  # noqa: BLE001
            try:
                cloudpickle.dumps(v, PROTOCOL)
            except BaseException as e:  # noqa: BLE001
                what = f"task #{first + k} ({describe_task(items[k])})"
                errors[k] = TaskError.for_failure(e, f"could not pickle the result of {what}")
                values[k] = None
    return cloudpickle.dumps((values, errors), PROTOCOL, buffer_callback=out and out.fresh())  # type: ignore[no-any-return]


def loads_results(
    payload: bytes | memoryview, buffers: Optional[list[memoryview]] = None
) -> tuple[list[Any], dict[int, TaskError]]:
    return pickle.loads(payload, buffers=buffers)  # type: ignore[no-any-return]


def dump_one_result(value: Any, item: Any) -> tuple[Optional[bytes], Optional[TaskError]]:
    """One result of a careful packet, pickled on its own: ``(pickle, None)``,
    or ``(None, error)`` if it will not pickle."""
    try:
        return pickle.dumps(value, PROTOCOL), None
    except BaseException:  # noqa: BLE001 - see dumps_results
        pass
    try:
        return bytes(cloudpickle.dumps(value, PROTOCOL)), None
    except BaseException as e:  # noqa: BLE001
        return None, TaskError.for_failure(e, f"could not pickle the result of {describe_task(item)}")


def dumps_results_envelope(results: list[Optional[bytes]], errors: dict[int, TaskError]) -> bytes:
    """A careful packet's results: one pickle per value (None where it failed)."""
    return pickle.dumps((results, errors), PROTOCOL)


def loads_results_careful(payload: bytes | memoryview, first: int) -> tuple[list[Any], dict[int, TaskError]]:
    """A careful packet's ``(values, errors)``: each value unpickled on its own,
    so one that will not load here fails in its own slot (``first``: the
    index of the packet's first task, for the message)."""
    parts, errors = pickle.loads(payload)
    values: list[Any] = []
    for k, part in enumerate(parts):
        value = None
        if part is not None and k not in errors:
            try:
                value = pickle.loads(part)
            except KeyboardInterrupt:
                raise  # a Ctrl-C in the main process (see _salvage.load_results)
            except BaseException as e:  # noqa: BLE001 - a loader's SystemExit is that slot's error
                errors[k] = result_unpickling_error(e, first + k)
        values.append(value)
    return values, errors


def result_unpickling_error(exc: BaseException, index: int) -> TaskError:
    """The error in the slot of task ``index``, whose result would not
    unpickle in the main process (``exc``: why)."""
    return TaskError.for_failure(
        exc, f"could not unpickle the result of task #{index} in the main process", pickle.UnpicklingError
    )


# What a result is taken to weigh without pickling it (see weigh).
SMALL_TYPES: frozenset[type] = frozenset({int, float, bool, type(None), complex})
_LEN, _NBYTES, _BUFFER, _SEQ, _MAP, _OBJ, _NOTHING = range(7)
_HOW: dict[type, int] = {bytes: _LEN, str: _LEN, bytearray: _LEN, tuple: _SEQ, list: _SEQ, dict: _MAP}
_HOW.update(dict.fromkeys(SMALL_TYPES, _NOTHING))
_HOW_MAX = 4096  # types remembered (a program that makes classes on the fly does not grow it for ever)
_DEPTH = 3  # levels of containers looked into
_SAMPLE = 8  # elements looked at per container; the rest are taken to weigh as much


def weigh(value: Any) -> int:
    """About how many bytes ``value`` will pickle to, cheaply, for a worker
    deciding whether a packet's results have grown large (see
    _worker.SPLIT_BYTES).  ``bytes``, ``str``, ``bytearray`` (and their
    subclasses) count their length; arrays and memoryviews (``nbytes``) and
    any other buffer (``array.array``) their size; tuples, lists, sets,
    dicts and objects' attributes what they hold, three levels deep, from at
    most 8 elements of each spread over it (a list of a million numbers
    costs 8 looks).  It runs no code of the value's own but an ``nbytes``
    property or a ``__getattr__``; should those fail, the value weighs 0.
    What it cannot see is found only when the packet's results are
    pickled."""
    t = type(value)
    how = _HOW.get(t)
    if how == _LEN:  # (the usual large result: no call further)
        return len(value)
    if t is tuple and len(value) <= _SAMPLE:  # (the usual small tuple: no call either)
        total = 0
        for x in value:
            h = _HOW.get(type(x))
            if h == _LEN:
                total += len(x)
            elif h != _NOTHING:
                break
        else:
            return total
    try:
        return _weigh(value, _DEPTH)
    except BaseException:  # noqa: BLE001 - a result's own code failing is not the worker's end
        return 0


def _weigh(v: Any, depth: int) -> int:
    how = _HOW.get(type(v))
    if how is None:
        how = _how_to_weigh(type(v), v)
    if how == _LEN:
        return len(v)
    if how == _NOTHING:
        return 0
    if how == _NBYTES:
        return int(v.nbytes)
    if how == _BUFFER:
        with memoryview(v) as view:
            return view.nbytes
    if not depth:
        return 0
    if how == _OBJ:
        v = getattr(v, "__dict__", None)
        if type(v) is not dict:
            return 0
        how = _MAP
    n = len(v)
    if how == _MAP:
        v = v.values()
    if n <= _SAMPLE:
        sample = v
    elif how == _SEQ and isinstance(v, (tuple, list)):
        step = n / _SAMPLE
        sample = [v[int(k * step)] for k in range(_SAMPLE)]
    else:
        sample = list(itertools.islice(v, _SAMPLE))
    total = 0
    for x in sample:
        h = _HOW.get(type(x))
        if h == _NOTHING:
            continue
        total += len(x) if h == _LEN else _weigh(x, depth - 1)
    return total if n <= _SAMPLE else total * n // _SAMPLE


def _how_to_weigh(t: type, v: Any) -> int:
    """How values of type ``t`` (``v`` one of them) are weighed; remembered."""
    if issubclass(t, (bytes, str, bytearray)):
        how = _LEN
    elif issubclass(t, (int, float, complex)):
        how = _NOTHING
    elif getattr(t, "nbytes", None) is not None:
        how = _NBYTES
    elif issubclass(t, (tuple, list, set, frozenset)):
        how = _SEQ
    elif issubclass(t, dict):
        how = _MAP
    else:
        try:
            with memoryview(v):
                how = _BUFFER
        except TypeError:
            how = _OBJ if getattr(t, "__dictoffset__", 0) else _NOTHING
    if len(_HOW) < _HOW_MAX:
        _HOW[t] = how
    return how
