"""Task functions the benchmarks run (importable by every peer's workers)."""

from __future__ import annotations

import time


def spin(seconds: float) -> float:
    """Busy CPU work for ``seconds`` of wall time (a pure-Python task)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def heavy_tail(i: int) -> int:
    """1 ms of CPU work; every 50th task takes 50 ms."""
    spin(0.050 if i % 50 == 49 else 0.001)
    return i


def cpu_3ms(i: int) -> int:
    spin(0.003)
    return i


def payload(data: bytes) -> int:
    return len(data)
