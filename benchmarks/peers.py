"""The ordered-map implementations we compare against, each as ``run(fn, items) -> list``.

Each peer is built once per measurement (startup is measured on its own) and
warmed up with one call before the clock starts.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

from parallel_queue import ParallelQueue

WORKERS = 2


class Peer:
    name = ""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        raise NotImplementedError


class PQPutGet(Peer):
    """parallel_queue through put()/get(): one producer thread, results read in this thread."""

    name = "parallel_queue put/get"

    def __enter__(self) -> Peer:
        self.q = ParallelQueue(num_workers=WORKERS)
        self.q.put(abs, -1)
        self.q.get()
        return self

    def __exit__(self, *exc: object) -> None:
        self.q.terminate()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        q = self.q

        def produce() -> None:
            for x in items:
                q.put(fn, x)

        t = threading.Thread(target=produce)
        t.start()
        for _ in range(len(items)):
            yield q.get()
        t.join()


class PoolImap(Peer):
    def __init__(self, chunksize: int) -> None:
        self.chunksize = chunksize
        self.name = f"Pool.imap(chunksize={chunksize})"

    def __enter__(self) -> Peer:
        self.pool = multiprocessing.Pool(WORKERS)
        self.pool.apply(abs, (-1,))
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.terminate()
        self.pool.join()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.imap(fn, items, chunksize=self.chunksize)


class ExecutorMap(Peer):
    def __init__(self, chunksize: int) -> None:
        self.chunksize = chunksize
        self.name = f"ProcessPoolExecutor.map(chunksize={chunksize})"

    def __enter__(self) -> Peer:
        self.ex = concurrent.futures.ProcessPoolExecutor(WORKERS)
        self.ex.submit(abs, -1).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ex.shutdown()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.ex.map(fn, items, chunksize=self.chunksize)


class Joblib(Peer):
    name = "joblib generator"

    def __enter__(self) -> Peer:
        import joblib

        self.joblib = joblib
        self.par = joblib.Parallel(n_jobs=WORKERS, return_as="generator")
        self.par.__enter__()
        list(self.par(joblib.delayed(abs)(-1) for _ in range(1)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.par.__exit__(None, None, None)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        d = self.joblib.delayed(fn)
        return iter(self.par(d(x) for x in items))


class Mpire(Peer):
    name = "mpire imap"

    def __enter__(self) -> Peer:
        from mpire import WorkerPool

        self.pool = WorkerPool(n_jobs=WORKERS)
        self.pool.__enter__()
        self.pool.map(abs, [-1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.__exit__(None, None, None)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.imap(fn, list(items))


def available(factories: list[Callable[[], Peer]]) -> list[Callable[[], Peer]]:
    out = []
    for f in factories:
        try:
            with f():
                pass
        except ImportError:
            continue
        out.append(f)
    return out


def optional_peers() -> list[Callable[[], Peer]]:
    return available([Joblib, Mpire])


def pq_map_peer() -> Optional[Callable[[], Peer]]:
    """parallel_queue's ordered map, once the package has one."""
    try:
        from parallel_queue import imap  # noqa: F401
    except ImportError:
        return None
    return PQImap


class PQImap(Peer):
    """parallel_queue.imap: each call starts (and ends) its own workers."""

    name = "parallel_queue.imap (incl. start-up)"

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        from parallel_queue import imap

        return imap(fn, items, num_workers=WORKERS)  # type: ignore[no-any-return]


class PQQueueImap(Peer):
    """ParallelQueue.imap: maps on one queue's workers, started once (as a Pool)."""

    name = "ParallelQueue.imap (warm)"

    def __enter__(self) -> Peer:
        self.q = ParallelQueue(num_workers=WORKERS)
        list(self.q.imap(abs, [-1]))
        return self

    def __exit__(self, *exc: object) -> None:
        self.q.terminate()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.q.imap(fn, items)


class PoolImapOneShot(Peer):
    """``with Pool() as p: p.imap(...)``: a pool per call, like imap."""

    name = "Pool.imap(chunksize=100) (incl. start-up)"

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        with multiprocessing.Pool(WORKERS) as pool:
            yield from pool.imap(fn, items, chunksize=100)
