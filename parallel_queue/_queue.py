"""The public queue classes: ParallelQueue and ParallelSingleTaskQueue."""

from __future__ import annotations

import weakref
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any, AsyncIterator, Callable, Generic, Iterable, Iterator, Optional, TypeVar, Union

from . import _aio
from ._engine import Engine, Options
from ._errors import QueueStopped
from ._front import Front
from ._stats import SAMPLE_EVERY, QueueStats
from ._worker import ARGS, CALL

_SAMPLE_MASK = SAMPLE_EVERY - 1

R = TypeVar("R")
R2 = TypeVar("R2")

_DOC_OPTIONS = """
    Options (all keyword arguments, the first eight as in 0.5):

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
    - ``task_timeout``: seconds a single task may run; past it the task's
      worker is killed and replaced, and its slot raises ``TaskTimeoutError``.
    - ``max_tasks_per_worker``: replace each worker after this many tasks.
    - ``max_batch``: the most tasks sent to a worker in one packet (default:
      sized automatically, at most 1024).
    - ``progress``: show a tqdm progress bar of delivered results on stderr
      (needs ``pip install 'parallel-queue[progress]'``).
    - ``executor``: run the tasks on a ``concurrent.futures`` executor (threads
      or processes) or a Dask ``distributed.Client`` instead of the queue's own
      processes; same ordering, markers, errors and back-pressure.  The queue
      never shuts it down.  ``num_workers`` defaults to its size.
"""


def _check_executor_options(executor: Any, opts: Options) -> None:
    """Options that need the queue's own processes make no sense with an executor."""
    from ._executor import describe_executor

    _, workers = describe_executor(executor)
    for name, value in (
        ("task_timeout", opts.task_timeout),
        ("max_tasks_per_worker", opts.max_tasks_per_worker or None),
        ("worker_init_f", opts.worker_init_f),
        ("daemon", opts.daemon or None),
    ):
        if value is not None:
            raise ValueError(f"{name} needs the queue's own worker processes; it cannot be used with executor=")
    if opts.explicit_workers is None:
        opts.num_workers = workers
    if opts.explicit_buffer is None:
        opts.consumer_buffer_max = 10 * opts.num_workers


def _marker_with_arguments(task: Any) -> ValueError:
    return ValueError(
        f"a non-callable put is a marker and takes no arguments; got {type(task).__name__} with arguments"
    )


class _QueueBase(Generic[R]):
    # What the engine's task items are (see _worker): each class's own put().
    _form = CALL

    def __init__(
        self,
        task_fn: Optional[Callable[..., Any]],
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
        progress: bool = False,
        executor: Any = None,
    ) -> None:
        opts = Options(
            num_workers,
            daemon,
            in_q_max,
            out_q_max,
            worker_q_max,
            worker_init_f,
            consumer_buffer_max,
            mp_context,
            task_timeout,
            max_tasks_per_worker,
            max_batch,
            progress,
        )
        opts.form = self._form
        self._engine: Front
        if executor is None:
            self._engine = Engine(opts, task_fn)
        else:
            from ._executor import ExecutorEngine

            _check_executor_options(executor, opts)
            self._engine = ExecutorEngine(opts, task_fn, executor)
        self._delivery = self._engine.delivery
        self._ready = self._delivery.ready
        # Collected without stop(): end the processes quietly.  The finalizer
        # holds the engine, never the queue, so it does not keep it alive.
        self._finalizer = weakref.finalize(self, self._engine.terminate)

    @property
    def num_workers(self) -> int:
        """How many worker processes the queue runs."""
        return self._engine.opts.num_workers

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

    def stats(self) -> QueueStats:
        """A snapshot of the queue's counters and put-to-get latency (see ``QueueStats``)."""
        return self._engine.stats()

    def stop(self) -> None:
        """Accept no more tasks; finish the ones put so far, then end the processes.

        Returns at once.  Everything put before ``stop()`` still comes out of
        ``get()`` (or iteration), after which ``get()`` raises
        ``QueueStopped``.
        """
        self._engine.stop()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the worker and consumer processes have ended (after ``stop()``).

        ``timeout`` is shared by all of them; check ``is_alive()`` to learn
        whether they ended in time.  Results not yet collected stay
        available to ``get()``.
        """
        self._engine.join(timeout)

    def terminate(self) -> None:
        """End all processes now, even with tasks running; undelivered results are lost."""
        self._engine.terminate()

    def is_alive(self) -> bool:
        """True while any worker or the consumer process is running."""
        return self._engine.is_alive()

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
        return await _aio.aget(self._engine, lambda: self.get(block=False))  # type: ignore[no-any-return]

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
        progress: bool = False,
        executor: Any = None,
    ) -> None:
        super().__init__(
            None,
            num_workers,
            daemon,
            in_q_max,
            out_q_max,
            worker_q_max,
            worker_init_f,
            consumer_buffer_max,
            mp_context=mp_context,
            task_timeout=task_timeout,
            max_tasks_per_worker=max_tasks_per_worker,
            max_batch=max_batch,
            progress=progress,
            executor=executor,
        )

    def put(self, task: Any, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:
        """Queue ``task(*args, **kwargs)``, or a marker if ``task`` is not callable.

        The task and its arguments travel with cloudpickle, so lambdas and
        closures work.  Blocks while ``in_q_max`` tasks wait to be sent;
        raises ``queue.Full`` after ``timeout`` seconds.  A marker with
        arguments raises ``ValueError``.  Thread-safe: the order of results
        is the order in which ``put()`` calls returned.
        """
        if callable(task):
            e = self._engine
            item = (task, args, kwargs or None)
            # Fast path, without the lock (see _front): room, running, nobody
            # to wake, not sampled.  Append, then look at fast_put again.
            if e.fast_put and len(e.pending) < e.in_q_max:
                if next(e.put_ticket) & _SAMPLE_MASK:
                    e.pending.append(item)
                    if not e.fast_put:
                        e.settle_put(item)
                    return
                e.put_task(item, timeout, True)
                return
            e.put_task(item, timeout)
        elif args or kwargs:
            raise _marker_with_arguments(task)
        else:
            self._engine.put_marker(task, timeout)

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
        from ._map import IMapIterator

        return IMapIterator(fn, iterables, None, chunksize, {}, queue=self)

    async def aput(self, task: Any, *args: Any, **kwargs: Any) -> None:
        """``put()`` for asyncio: waits for room without blocking the event loop."""
        if callable(task):
            item = (task, args, kwargs or None)
            await _aio.aput(self._engine, lambda: self._engine.put_task(item, 0))
        elif args or kwargs:
            raise _marker_with_arguments(task)
        else:
            await _aio.aput(self._engine, lambda: self._engine.put_marker(task, 0))


class ParallelSingleTaskQueue(_QueueBase[R]):
    """An ordered process pool with one task function, handed over at process start.

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
        task_fn: Callable[..., R],
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
        progress: bool = False,
        executor: Any = None,
    ) -> None:
        if not callable(task_fn):
            raise TypeError(f"task_fn must be callable, got {type(task_fn).__name__}")
        super().__init__(
            task_fn,
            num_workers,
            daemon,
            in_q_max,
            out_q_max,
            worker_q_max,
            worker_init_f,
            consumer_buffer_max,
            mp_context=mp_context,
            task_timeout=task_timeout,
            max_tasks_per_worker=max_tasks_per_worker,
            max_batch=max_batch,
            progress=progress,
            executor=executor,
        )

    async def aput(self, *args: Any, **kwargs: Any) -> None:
        """``put()`` for asyncio: waits for room without blocking the event loop."""
        item = (args, kwargs or None)
        await _aio.aput(self._engine, lambda: self._engine.put_task(item, 0))

    def put(self, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> None:
        """Queue one call ``task_fn(*args, **kwargs)`` (``timeout`` is put's own)."""
        e = self._engine
        item = (args, kwargs or None)
        if e.fast_put and len(e.pending) < e.in_q_max:  # see ParallelQueue.put
            if next(e.put_ticket) & _SAMPLE_MASK:
                e.pending.append(item)
                if not e.fast_put:
                    e.settle_put(item)
                return
            e.put_task(item, timeout, True)
            return
        e.put_task(item, timeout)
