"""Salvage a packet of results that will not unpickle as a whole.

A worker pickles a packet's ``(values, errors)`` in one go, and the main
process normally unpickles it in one go too.  When that fails (a result's
class is importable only in the workers, a ``__setstate__`` that raises
here), one bad value must not fail its neighbours.  The whole pickle is then
read again by a tolerant unpickler: Python's own pure-Python ``Unpickler``,
with every opcode that runs user code (finding a class, calling a
constructor, ``__setstate__``, filling a container) wrapped so that a
failure leaves a stand-in (``Unloadable``) where its object would have been,
and the stack as the opcode would have left it.  Afterwards each top-level
value is searched for stand-ins; those values fail in their own slots.

This is the slow path of a rare case: it runs only after the fast load
failed, and reads at pure-Python speed.
"""

from __future__ import annotations

import gc
import io
import pickle
import types
from typing import Any, Callable, Optional

from ._payload import TaskError, every_slot_fails, loads_results, result_unpickling_error

__all__ = ["salvage_results", "Unloadable"]


class Unloadable:
    """Stands where an object of a result could not be rebuilt: ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


# How each opcode that can fail in user code leaves the stack: (entries it
# takes, what stays): "new", a stand-in for the object it failed to make;
# "target", the object it was working on (kept in place, but marked broken).
_P = pickle
_RECOVERY: dict[bytes, tuple[int, str]] = {
    _P.GLOBAL: (0, "new"),
    _P.STACK_GLOBAL: (2, "new"),
    _P.EXT1: (0, "new"),
    _P.EXT2: (0, "new"),
    _P.EXT4: (0, "new"),
    _P.REDUCE: (2, "new"),
    _P.NEWOBJ: (2, "new"),
    _P.NEWOBJ_EX: (3, "new"),
    _P.BUILD: (2, "target"),
    _P.APPEND: (2, "target"),
    _P.SETITEM: (3, "target"),
}
# These pop a mark first; a failure after that leaves their target on top.
_AFTER_MARK = {_P.APPENDS, _P.SETITEMS, _P.ADDITEMS}
# Reading the memo: an object that broke while it was built must not be
# handed out again as if it were whole.
_MEMO_GETS = {_P.GET, _P.BINGET, _P.LONG_BINGET}


class _SalvagingUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    dispatch: dict[int, Callable[..., Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined,misc]
    # The pure-Python unpickler's state (set by load()), as it names it.
    stack: list[Any]
    append: Callable[[Any], None]

    def __init__(self, data: bytes | memoryview, buffers: Optional[list[memoryview]] = None) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.broken: dict[int, tuple[Any, BaseException]] = {}  # id -> (object, why)


def _guard(opcode: bytes, load: Callable[[Any], None]) -> Callable[[Any], None]:
    taken, stays = _RECOVERY.get(opcode, (0, "target"))

    def guarded(self: _SalvagingUnpickler) -> None:
        stack_before = self.stack
        depth = len(stack_before)
        # What the opcode works on: if one of those is already a stand-in, its
        # error is the cause, not the one this opcode raises on it.
        inputs = stack_before[:] if opcode in _AFTER_MARK else stack_before[max(0, depth - taken) :]
        try:
            load(self)
        except Exception as raised:
            e = _cause(self, inputs) or raised
            if opcode in _AFTER_MARK:
                if self.stack is stack_before:
                    raise  # the mark itself was missing: not a value's fault
                _mark_broken(self, self.stack[-1], e)
                return
            base = depth - taken
            if self.stack is not stack_before or base < 0 or len(self.stack) < base:
                raise  # not a shape we know how to mend
            if stays == "new":
                del self.stack[base:]
                self.append(Unloadable(e))
            else:
                del self.stack[base + 1 :]
                _mark_broken(self, self.stack[base], e)

    return guarded


def _guard_memo(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def guarded(self: _SalvagingUnpickler) -> None:
        load(self)
        found = self.broken.get(id(self.stack[-1]))
        if found is not None and found[0] is self.stack[-1]:
            self.stack[-1] = Unloadable(found[1])

    return guarded


def _mark_broken(self: _SalvagingUnpickler, obj: Any, error: BaseException) -> None:
    if type(obj) is not Unloadable:
        self.broken[id(obj)] = (obj, error)


def _cause(self: _SalvagingUnpickler, inputs: list[Any]) -> Optional[BaseException]:
    for obj in inputs:
        if type(obj) is Unloadable:
            return obj.error  # type: ignore[no-any-return]
        found = self.broken.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
    return None


for _op in (*_RECOVERY, *_AFTER_MARK):
    _SalvagingUnpickler.dispatch[_op[0]] = _guard(_op, _SalvagingUnpickler.dispatch[_op[0]])
for _op in _MEMO_GETS:
    _SalvagingUnpickler.dispatch[_op[0]] = _guard_memo(_SalvagingUnpickler.dispatch[_op[0]])

# Objects whose contents are never results' own (so not searched).
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _first_failure(value: Any, broken: dict[int, tuple[Any, BaseException]]) -> Optional[BaseException]:
    """The error behind a stand-in or a broken object reachable from ``value``."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj) is Unloadable:
            return obj.error
        found = broken.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
        if not isinstance(obj, _OPAQUE):
            todo.extend(gc.get_referents(obj))
    return None


def salvage_results(
    payload: bytes | memoryview, count: int, buffers: Optional[list[memoryview]] = None
) -> Optional[tuple[list[Any], dict[int, Any]]]:
    """``(values, errors)`` of a packet's results, with each value that could
    not be rebuilt here replaced by None and its error (the exception that
    stopped it) in ``errors``: ``errors[k]`` is an exception for those, and
    whatever the packet carried for the others.  None if even this fails."""
    unpickler = _SalvagingUnpickler(payload, buffers)
    try:
        loaded = unpickler.load()
        values, errors = loaded
        if not isinstance(values, list) or not isinstance(errors, dict) or len(values) != count:
            return None
    except Exception:
        return None
    out: dict[int, Any] = {}
    for k, value in enumerate(values):
        error = _first_failure(value, unpickler.broken)
        if error is not None:
            values[k] = None
            out[k] = error
    for k, err in errors.items():
        if _first_failure(err, unpickler.broken) is None:
            out.setdefault(k, err)
        else:  # the task's own error would not load: still that slot's failure
            out[k] = _first_failure(err, unpickler.broken)
    return values, out


def load_results(
    payload: bytes | memoryview, count: int, first: int, buffers: Optional[list[memoryview]] = None
) -> tuple[list[Any], dict[int, Any]]:
    """A packet's ``(values, errors)``, ``count`` results from task ``first``
    on: loaded whole if it can be; if not, each value that will not unpickle
    here fails in its own slot (salvaged, see salvage_results), and only if
    even that fails does every slot fail.  ``buffers``: the packet's
    out-of-band buffers (see _payload.dumps_results_oob)."""
    try:
        return loads_results(payload, buffers)
    except KeyboardInterrupt:
        # Here, in the main process, that is a Ctrl-C landing while the
        # results load (a loader's Python code, or a collection's callback,
        # gives it a place to land): taken as a failure of the packet, the
        # press was lost and the program went on.  The caller keeps the
        # packet (see _receiver.Receiver.peek).
        raise
    except BaseException as exc:  # noqa: BLE001 - a loader's SystemExit is the packet's failure
        salvaged = salvage_results(payload, count, buffers)
        if salvaged is None:
            err = TaskError.for_failure(exc, "could not unpickle the results", pickle.UnpicklingError)
            return every_slot_fails(count, err)
        values, errors = salvaged
        for k, err in errors.items():
            if isinstance(err, BaseException):
                errors[k] = result_unpickling_error(err, first + k)
        return values, errors
