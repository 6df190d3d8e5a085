"""Checked by mypy (tests/test_typing.py), never run: what a type checker
says of the public API.  A line that must be refused carries
``# type: ignore[...]``, and mypy runs with --warn-unused-ignores: should the
line be accepted, the ignore is unused and the check fails."""

from __future__ import annotations

import functools
from typing import Iterator

from parallel_queue import ParallelQueue, ParallelSingleTaskQueue, imap


def fetch(url: str, retries: int = 3) -> bytes:
    return url.encode() * retries


def square(x: int) -> int:
    return x * x


q = ParallelQueue(num_workers=2)

# A task's arguments are checked against it.
q.put(fetch, "http://example.com")
q.put(fetch, "http://example.com", retries=2)
q.put(fetch, 42)  # type: ignore[call-overload]
q.put(fetch, "u", retri=2)  # type: ignore[call-arg]

# put()'s own timeout (the task's arguments are not checked then), a marker,
# and a task's own keyword named timeout through functools.partial.
q.put(fetch, "u", timeout=5)
q.put("a marker")
q.put(functools.partial(fetch, "u", retries=1))

# Typed results.
results: Iterator[int] = imap(square, [1, 2, 3])
squares: list[int] = list(q.imap(square, range(3)))
not_strings: list[str] = list(imap(square, [1]))  # type: ignore[arg-type]

# A single-task queue is generic in its function's parameters and result.
s: ParallelSingleTaskQueue[[int], int] = ParallelSingleTaskQueue(square)
one: int = s.get()
wrong: str = s.get()  # type: ignore[assignment]
s.put(3)
s.put("3")  # type: ignore[call-overload]
s.put(3, 4)  # type: ignore[call-overload]
s.put_nowait(3)
s.put_nowait("3")  # type: ignore[arg-type]
s.put(3, timeout=5)  # put()'s own timeout (the arguments are not checked then)

f = ParallelSingleTaskQueue(fetch)
f.put("http://example.com", retries=2)
f.put("http://example.com", retri=2)  # type: ignore[call-overload]
page: bytes = f.get()
not_a_page: int = f.get()  # type: ignore[assignment]
mismatched: ParallelSingleTaskQueue[[str], bytes] = ParallelSingleTaskQueue(square)  # type: ignore[arg-type]
