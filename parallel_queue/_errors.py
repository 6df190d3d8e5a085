"""The exceptions parallel_queue raises, each a precise type."""

from __future__ import annotations

import queue

__all__ = [
    "ParallelQueueError",
    "QueueStopped",
    "QueueClosedError",
    "QueueBrokenError",
    "WorkerInitError",
    "WorkerLostError",
    "TaskTimeoutError",
    "RemoteError",
]


class ParallelQueueError(Exception):
    """Base class of the errors that parallel_queue itself raises."""


class QueueStopped(queue.Empty, ParallelQueueError):
    """The queue was stopped: nothing more will ever come out.

    ``get()`` raises it once ``stop()`` was called and every result put
    before it was delivered (waiting would never end), or after
    ``terminate()``.  It subclasses ``queue.Empty`` so a 0.5-style loop that
    ends on ``Empty`` ends here too.  A loop that goes on after
    ``queue.Empty`` must catch it first, or it spins for ever once the queue
    is stopped::

        while True:
            try:
                result = q.get(timeout=1)
            except QueueStopped:
                break  # every result is out
            except queue.Empty:
                continue  # nothing yet: do something else, then wait again
    """


class QueueClosedError(ParallelQueueError, RuntimeError):
    """``put()`` (or a map) on a queue that takes no more tasks: ``stop()``
    or ``terminate()`` was called.  (Not a ``queue.Empty``, as
    ``QueueStopped`` is: a put that fails says why.)"""


class QueueBrokenError(ParallelQueueError, RuntimeError):
    """The queue can no longer deliver results (its consumer died, or worse).

    Raised by ``get()`` after every result that had already arrived was
    delivered, and by ``put()``.  The message says what broke it;
    ``__cause__`` carries the original error where there is one.
    """


class WorkerInitError(QueueBrokenError):
    """``worker_init_f`` raised in a worker: no task can run.

    ``__cause__`` is the initializer's exception, with the worker's
    traceback.
    """


class WorkerLostError(ParallelQueueError, RuntimeError):
    """The worker running this task died (signal, ``os._exit``, out of memory).

    Raised by ``get()`` in exactly that task's place in the order; a new
    worker replaced the dead one and the other tasks went on.  Attributes:
    ``task_index`` (the task's position among the tasks put, from 0),
    ``pid`` and ``exitcode`` (negative: the signal number; None if unknown,
    when the fork server that started the worker was killed) of the worker.
    """

    def __init__(self, message: str, task_index: int = -1, pid: int = 0, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.task_index = task_index
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (str(self), self.task_index, self.pid, self.exitcode)


class TaskTimeoutError(WorkerLostError, TimeoutError):
    """The task ran longer than ``task_timeout`` seconds and was killed with its worker."""


class RemoteError(ParallelQueueError):
    """A task raised an exception that could not travel back as itself.

    The exception could not be pickled, or not rebuilt from its pickle (an
    ``__init__`` with extra required arguments, a lock in an attribute).
    ``type_name`` is the original type's qualified name, ``message`` its
    ``str()``, and ``stack_trace`` the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, stack_trace: str = "", reason: str = "") -> None:
        text = f"{type_name}: {message}" if message else type_name
        if reason:
            text += f" (raised in a worker; could not be rebuilt here: {reason})"
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.stack_trace = stack_trace
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.type_name, self.message, self.stack_trace, self.reason)


def fresh_copy(error: BaseException) -> BaseException:
    """A new exception like ``error`` (same type, message and cause) to raise again.

    Raising one exception object from many calls would pile every call's
    frames onto its traceback.
    """
    try:
        copy = type(error)(*error.args)
    except Exception:
        copy = QueueBrokenError(str(error))
    copy.__cause__ = error.__cause__
    return copy


def consumer_died(what: str, start_method: str, delivered_any: bool) -> QueueBrokenError:
    """The error for a consumer process that died (``what``: how it was seen).

    Dead before it delivered anything under spawn or forkserver, the usual
    cause is a script that makes a queue at import time: each child imports
    the main script again, and multiprocessing refuses to start processes
    from there (the child prints why).  The message says so."""
    message = f"the consumer process died{what}"
    if not delivered_any and start_method != "fork":
        message += (
            f'.  It died before it delivered anything.  If it printed "An attempt has been made to start a'
            ' new process before the current process has finished its bootstrapping phase", the script makes'
            f" queues at import time: under {start_method!r} every child imports the main script again, so"
            ' make queues only under  if __name__ == "__main__":'
        )
    return QueueBrokenError(message)
