"""The public queue classes: ParallelQueue and ParallelSingleTaskQueue.

Each is a thin face over a ``_core.Core`` and the engine that runs its
tasks: our own processes (``_engine``) or an executor the caller owns
(``_executor``).  ``put()`` and ``get()`` keep their common paths here, in
a handful of C calls each (see ``_intake`` and ``_delivery``).
"""

from __future__ import annotations

import sys
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Generic,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    TypeVar,
    Union,
    overload,
)

from . import _aio
from ._backends import backend_for
from ._core import Core
from ._engine import ProcessEngine
from ._errors import QueueStopped
from ._executor import ExecutorEngine
from ._maps import IMapIterator, source_of
from ._options import Options
from ._reaper import watch
from ._stats import SAMPLE_EVERY, QueueStats
from ._tasks import ARGS, CALL, ONE, STAR
from ._threads import sigint_held_back

__all__ = ["ParallelQueue", "ParallelSingleTaskQueue"]

_SAMPLE_MASK = SAMPLE_EVERY - 1

R = TypeVar("R")
R2 = TypeVar("R2")
if TYPE_CHECKING or sys.version_info >= (3, 10):
    from typing import ParamSpec

    P = ParamSpec("P")
else:  # Python 3.9 has no ParamSpec: a stand-in keeps ParallelSingleTaskQueue generic in two parameters
    P = TypeVar("P")

_DOC_OPTIONS = """
    Options (the first seven as in 0.5, which may also be given by position; the rest by keyword only):

    - ``num_workers``: worker processes (default: the CPU count).
    - ``daemon``: make the worker and consumer processes daemonic.
    - ``in_q_max``: tasks that may wait to be sent to a worker; ``put()``
      blocks beyond that (producer threads that pass the check at the same
      moment may each add one more).  Markers waiting for ``get()`` are
      bounded by ``in_q_max`` plus the results' window (see
      ``consumer_buffer_max``), as in 0.5, where they sat in its buffers.
    - ``out_q_max``, ``worker_q_max``: accepted for 0.5 compatibility.  Here
      results in flight are bounded by the reorder window instead (see
      ``consumer_buffer_max``), so these do not change anything.
    - ``worker_init_f``: called with no arguments once in each worker before
      it takes tasks; if it raises, the queue breaks with ``WorkerInitError``.
    - ``consumer_buffer_max``: packets the consumer's reorder buffer may hold
      (default ``10 * num_workers``).  A worker whose packet is further ahead
      of the oldest unfinished one waits.
    - ``mp_context``: a ``multiprocessing`` context or its name (``"fork"``,
      ``"spawn"``, ``"forkserver"``); default: multiprocessing's default.
      Under ``"forkserver"`` the processes come from the package's own fork
      server, which holds Ctrl-C back from them as they start.
    - ``task_timeout``: seconds a single task may run; past it the task's
      worker is killed and replaced, and its slot raises ``TaskTimeoutError``.
    - ``max_tasks_per_worker``: replace each worker after this many tasks.
    - ``max_batch``: the most tasks sent to a worker in one packet (default:
      sized automatically, at most 1024).
    - ``progress``: show a tqdm progress bar of delivered results on stderr
      (needs ``pip install 'parallel-queue[progress]'``): ``True``, or a dict
      of tqdm's keywords (``desc``, ``total``, ``position``, ``leave``...).
      A queue fed by ``put()`` counts results with no total unless given one.
    - ``executor``: run the tasks on a ``concurrent.futures`` executor (threads
      or processes) or a Dask ``distributed.Client`` instead of the queue's own
      processes; same ordering, markers, errors and back-pressure.  The queue
      never shuts it down.  ``num_workers`` defaults to its size.
"""

# The options of both constructors, by name: each public class writes its
# signature once (ParallelSingleTaskQueue's starts with task_fn), and hands
# its arguments on by these names (``locals()``) to the queue's making.
_OPTIONS = (
    "num_workers",
    "daemon",
    "in_q_max",
    "out_q_max",
    "worker_q_max",
    "worker_init_f",
    "consumer_buffer_max",
    "mp_context",
    "task_timeout",
    "max_tasks_per_worker",
    "max_batch",
    "progress",
)

# Options that need the queue's own processes: refused with an executor.
_PROCESS_ONLY = ("task_timeout", "max_tasks_per_worker", "worker_init_f", "daemon")


def _marker_with_arguments(task: Any) -> ValueError:
    return ValueError(
        f"a non-callable put is a marker and takes no arguments; got {type(task).__name__} with arguments"
    )


class _QueueBase(Generic[R]):
    # What the engine's task items are (see _tasks): each class's own put().
    _form = CALL

    def _open(self, task_fn: Optional[Callable[..., Any]], arguments: dict[str, Any]) -> None:
        """Make the queue from its constructor's ``arguments`` (by name) and start it."""
        options = {name: arguments[name] for name in _OPTIONS}
        executor = arguments["executor"]
        if executor is None:
            core = Core(Options(**options), self._form)
            ProcessEngine(core, task_fn)
        else:
            for name in _PROCESS_ONLY:
                if options[name]:
                    raise ValueError(f"{name} needs the queue's own worker processes; it cannot be used with executor=")
            backend = backend_for(executor, task_fn)
            core = Core(Options(**options, default_workers=backend.workers), self._form)
            ExecutorEngine(core, backend)
        self._core = core
        self._intake = core.intake
        self._delivery = core.delivery
        self._ready = core.delivery.ready
        # Collected unclosed: the reaper thread ends the processes (see
        # _reaper: not in the garbage collection).  The action holds the
        # core, never the queue.
        try:
            with sigint_held_back():
                self._watch = watch(self, core.terminate)
        except BaseException:
            core.terminate()
            raise

    @property
    def num_workers(self) -> int:
        """How many worker processes the queue runs."""
        return self._core.opts.num_workers

    def get(self, block: bool = True, timeout: Optional[float] = None) -> R:
        """The next result, in the order the tasks were put.

        If the task raised, its exception is raised here, with the worker's
        frames in its traceback and the formatted traceback in
        ``stack_trace``.  Raises ``queue.Empty`` when nothing arrives within
        ``timeout`` (or at once if ``block`` is false), and ``QueueStopped``
        (a ``queue.Empty``) once the queue was stopped and everything put
        before ``stop()`` was delivered.  Thread-safe.
        """
        # Fast path: a plain value is ready.  No lock: popleft() is atomic,
        # and ``ready`` only ever holds values that come next (see _delivery).
        try:
            return self._ready.popleft()  # type: ignore[no-any-return]
        except IndexError:
            pass  # (not the slow path in here: its exceptions would chain this one)
        return self._delivery.get(block, timeout)  # type: ignore[no-any-return]

    def get_nowait(self) -> R:
        """``get(block=False)``: the next result if it is ready, else ``queue.Empty``."""
        return self.get(False)

    def qsize(self) -> int:
        """How many results ``get()`` has yet to hand out: tasks and markers
        put whose result (or error, or the marker itself) it has not
        returned, whether waiting, running or ready.  As for
        ``queue.Queue``, a snapshot that other threads' puts and gets may
        change at once; 0 after ``terminate()``."""
        return self._core.backlog()

    def empty(self) -> bool:
        """``qsize() == 0``: every result put so far was handed out, so
        ``get()`` would wait for a task not yet put (or raise
        ``QueueStopped`` once stopped).  Unlike ``queue.Queue.empty()``,
        results still being computed count as in the queue: ``while not
        q.empty(): q.get()`` collects every result put before it."""
        return self._core.backlog() == 0

    def full(self) -> bool:
        """True if a task put now would wait: ``in_q_max`` tasks wait to be
        sent to the workers.  A snapshot, as ``qsize()``."""
        return self._core.full()

    def stats(self) -> QueueStats:
        """A snapshot of the queue's counters and put-to-get latency (see ``QueueStats``)."""
        return self._core.stats()

    def stop(self) -> None:
        """Accept no more tasks; finish the ones put so far, then end the processes.

        Returns at once.  Everything put before ``stop()`` still comes out of
        ``get()`` (or iteration), after which ``get()`` raises
        ``QueueStopped``.  Any number of times, in any state.
        """
        self._core.stop()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the worker and consumer processes have ended (after ``stop()``).

        ``timeout`` is shared by all of them; check ``is_alive()`` to learn
        whether they ended in time.  Results not yet collected stay
        available to ``get()``.  Any number of times, in any order with
        ``stop()`` and ``terminate()``, but not before either (nor a fault
        that broke the queue): then it raises ``ValueError``, as
        ``multiprocessing.Pool.join()`` does, for it would wait for ever.
        """
        self._core.lifecycle.check_owner()
        if self._core.lifecycle.accepting:
            raise ValueError("join() before stop() or terminate(): the queue still takes tasks, it would wait for ever")
        if self._core.join(timeout):
            self._watch.cancel()

    def terminate(self) -> None:
        """End all processes now, even with tasks running; undelivered results are lost."""
        self._core.terminate()
        self._watch.cancel()

    def is_alive(self) -> bool:
        """True while any worker or the consumer process is running."""
        return self._core.is_alive()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None:
            self.stop()
            self.join()
        else:
            self.terminate()

    def __iter__(self) -> Iterator[R]:
        """Results in order, until the queue is stopped and drained."""
        while True:
            try:
                yield self.get()
            except QueueStopped:
                return

    async def aget(self) -> R:
        """``get()`` for asyncio: waits without blocking the event loop.

        Cancelling it takes nothing out of the queue.
        """
        return await _aio.aget(self._core, lambda: self.get(block=False))  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[R]:
        """``async for result in q``: results in order until stopped and drained."""
        return self._async_results()

    async def _async_results(self) -> AsyncIterator[R]:
        while True:
            try:
                yield await self.aget()
            except QueueStopped:
                return


class ParallelQueue(_QueueBase[Any]):
    """A process pool that returns results in exactly the order tasks were put.

    ``put(task, *args, **kwargs)`` sends ``task(*args, **kwargs)`` to a worker
    process; ``get()`` returns results in put order while tasks run in
    parallel.  A non-callable put alone is a *marker*: ``get()`` returns it,
    the same object, in its place.

    >>> from parallel_queue import ParallelQueue
    >>> with ParallelQueue(num_workers=2) as q:
    ...     for i in range(3):
    ...         q.put(pow, i, 2)
    ...     q.put("done")
    ...     [q.get() for _ in range(4)]
    [0, 1, 4, 'done']
    """

    __doc__ = (__doc__ or "") + _DOC_OPTIONS

    def __init__(
        self,
        num_workers: Optional[int] = None,
        daemon: bool = False,
        in_q_max: int = 1000,
        out_q_max: int = 1000,
        worker_q_max: int = 100,
        worker_init_f: Optional[Callable[[], Any]] = None,
        consumer_buffer_max: Optional[int] = None,
        *,
        mp_context: Union[None, str, BaseContext] = None,
        task_timeout: Optional[float] = None,
        max_tasks_per_worker: Optional[int] = None,
        max_batch: Optional[int] = None,
        progress: Union[bool, Mapping[str, Any]] = False,
        executor: Any = None,
    ) -> None:
        self._open(None, locals())

    # For type checkers: a task's arguments are checked against the task
    # (ParamSpec), unless put() is given timeout= (a task keyword cannot
    # stand beside put()'s own: PEP 612), or it is a marker (anything alone).
    @overload
    def put(self, task: Callable[..., object], /, *args: Any, timeout: Optional[float], **kwargs: Any) -> None: ...

    @overload
    def put(self, task: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> None: ...

    @overload
    def put(self, task: object, /, *, timeout: Optional[float] = None) -> None: ...

    # (mypy: a task keyword named timeout would land in put()'s own, which is
    # the documented rule; a call that passes timeout= matches the first
    # overload, so the ParamSpec one never sees it.)
    def put(self, task: Any, /, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:  # type: ignore[misc]
        """Queue ``task(*args, **kwargs)``, or a marker if ``task`` is not callable.

        The task and its arguments travel with cloudpickle, so lambdas and
        closures work.  Blocks while ``in_q_max`` tasks wait to be sent;
        raises ``queue.Full`` after ``timeout`` seconds.  ``timeout`` is
        put()'s own, never the task's (as in 0.5); to hand the task a
        keyword named ``timeout``, put a ``functools.partial``:
        ``q.put(functools.partial(fetch, url, timeout=5))``.  A marker with
        arguments raises ``ValueError``; a put after ``stop()`` or
        ``terminate()`` raises ``QueueClosedError``.  Thread-safe: the order
        of results is the order in which ``put()`` calls returned.
        """
        if callable(task):
            i = self._intake
            item = (task, args, kwargs or None)
            # Fast path, without the lock (see _intake): room, running, nobody
            # to wake, not sampled.  Append, then look at fast_put again.
            if i.fast_put and len(i.pending) < i.in_q_max:
                if next(i.put_ticket) & _SAMPLE_MASK:
                    i.pending.append(item)
                    if not i.fast_put and i.settle_put(item):
                        i.put_task(item, timeout)  # withdrawn: it raises why, or waits
                    return
                i.put_task(item, timeout, True)
                return
            i.put_task(item, timeout)
        elif args or kwargs:
            raise _marker_with_arguments(task)
        else:
            self._intake.put_marker(task, timeout)

    def imap(self, fn: Callable[..., R2], *iterables: Iterable[Any], chunksize: Optional[int] = None) -> Iterator[R2]:
        """``map(fn, *iterables)`` on this queue's workers, lazily, in order.

        Like the module's ``imap``, without starting processes: a queue kept
        for several maps pays its start-up once.  The queue must be idle
        (every result put before taken); until the map's iterator is
        exhausted or closed, the map has the queue to itself, and ``put()``
        and ``get()`` raise ``RuntimeError``.  Closing the iterator early
        (or dropping it) stops reading the input; tasks already sent still
        run, and their results are dropped.

        >>> with ParallelQueue(num_workers=2) as q:
        ...     list(q.imap(pow, range(4), [2] * 4)), list(q.imap(abs, [-1, -2]))
        ([0, 1, 4, 9], [1, 2])
        """
        source = source_of(iterables)
        # Its packets carry the function ahead of their items (the workers
        # of a queue that runs any task do not have it).
        form = STAR if len(iterables) > 1 else ONE
        return IMapIterator(self, fn, form, source, chunksize, own=False)

    def put_nowait(self, task: Any, *args: Any, **kwargs: Any) -> None:
        """``put()`` that never waits: ``queue.Full`` at once if there is no room."""
        self.put(task, *args, timeout=0, **kwargs)

    async def aput(self, task: Any, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:
        """``put()`` for asyncio: waits for room without blocking the event
        loop; ``queue.Full`` after ``timeout`` seconds (put()'s own, as for
        ``put()``: see there for a task's keyword of that name)."""
        if callable(task):
            item = (task, args, kwargs or None)
            await _aio.aput(self._core, lambda: self._intake.put_task(item, 0), timeout)
        elif args or kwargs:
            raise _marker_with_arguments(task)
        else:
            await _aio.aput(self._core, lambda: self._intake.put_marker(task, 0), timeout)


class ParallelSingleTaskQueue(_QueueBase[R], Generic[P, R]):
    """An ordered process pool with one task function, handed over at process start.

    Generic in the function's parameters and result: the type checker
    checks each ``put()`` against ``task_fn`` (but one that passes
    ``timeout=``, see ``put()``), and ``get()`` gives its result type;
    spelled ``ParallelSingleTaskQueue[[int, str], bytes]`` for a function
    of ``(int, str)`` returning ``bytes``.

    ``task_fn`` is given to each worker when it starts (inherited under
    ``fork``, pickled while the process starts otherwise), so closures over
    multiprocessing Locks, Events and Values work under every start method.

    >>> from parallel_queue import ParallelSingleTaskQueue
    >>> with ParallelSingleTaskQueue(abs, num_workers=2) as q:
    ...     q.put(-3)
    ...     q.put(-4)
    ...     [q.get(), q.get()]
    [3, 4]
    """

    _form = ARGS

    __doc__ = (__doc__ or "") + _DOC_OPTIONS

    def __init__(
        self,
        task_fn: Callable[P, R],
        num_workers: Optional[int] = None,
        daemon: bool = False,
        in_q_max: int = 1000,
        out_q_max: int = 1000,
        worker_q_max: int = 100,
        worker_init_f: Optional[Callable[[], Any]] = None,
        consumer_buffer_max: Optional[int] = None,
        *,
        mp_context: Union[None, str, BaseContext] = None,
        task_timeout: Optional[float] = None,
        max_tasks_per_worker: Optional[int] = None,
        max_batch: Optional[int] = None,
        progress: Union[bool, Mapping[str, Any]] = False,
        executor: Any = None,
    ) -> None:
        if not callable(task_fn):
            raise TypeError(f"task_fn must be callable, got {type(task_fn).__name__}")
        self._open(task_fn, locals())

    async def aput(self, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:
        """``put()`` for asyncio: waits for room without blocking the event
        loop; ``queue.Full`` after ``timeout`` seconds (put()'s own)."""
        item = (args, kwargs or None)
        await _aio.aput(self._core, lambda: self._intake.put_task(item, 0), timeout)

    def put_nowait(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """``put()`` that never waits: ``queue.Full`` at once if there is no room."""
        self.put(*args, timeout=0, **kwargs)

    # The arguments are checked against task_fn's, unless put() is given
    # timeout= (see ParallelQueue.put).
    @overload
    def put(self, *args: Any, timeout: Optional[float], **kwargs: Any) -> None: ...

    @overload
    def put(self, *args: P.args, **kwargs: P.kwargs) -> None: ...

    def put(self, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:  # type: ignore[misc]
        """Queue one call ``task_fn(*args, **kwargs)``.

        ``timeout`` is put()'s own (``queue.Full`` after that many seconds
        without room), never the task's, as in 0.5.  To hand ``task_fn`` a
        keyword named ``timeout``, give the queue a function that takes it
        by another name, or use ``ParallelQueue`` with a
        ``functools.partial``.  After ``stop()`` or ``terminate()``:
        ``QueueClosedError``."""
        i = self._intake
        item = (args, kwargs or None)
        if i.fast_put and len(i.pending) < i.in_q_max:  # see ParallelQueue.put
            if next(i.put_ticket) & _SAMPLE_MASK:
                i.pending.append(item)
                if not i.fast_put and i.settle_put(item):
                    i.put_task(item, timeout)  # withdrawn: see ParallelQueue.put
                return
            i.put_task(item, timeout, True)
            return
        i.put_task(item, timeout)
