"""The payload sweep: how fast large arguments and results move, in MB/s.

Every cell (a kind of payload, a size, a direction) runs each peer side by
side, as the other workloads do.  Kinds: ``bytes``, numpy arrays (when numpy
is installed) and an indexer's text (a source file's text and its line
count).  Directions: ``results`` (the task makes the payload from a number and
returns it) and ``arguments`` (the payload is the task's argument; the task
returns its size).  Each cell moves about the same number of bytes, so the
small sizes measure per-task cost and the large ones bandwidth.  The
machine's own memcpy and pipe figures are measured first, for scale.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable, Optional, Union

from . import peers

Result = dict[str, Any]

SIZES = {"1KB": 1 << 10, "100KB": 100 << 10, "1MB": 1 << 20, "8MB": 8 << 20}


# --------------------------------------------------------------- the tasks
# (module-level: every peer's workers import them by name)


def make_bytes(spec: tuple[int, int]) -> bytes:
    i, size = spec
    return bytes([i % 256]) * size


def make_array(spec: tuple[int, int]) -> Any:
    import numpy

    i, size = spec
    return numpy.full(size // 8, float(i))


def make_text(spec: tuple[int, int]) -> tuple[str, int]:
    """An indexer's result: a file's text and its line count."""
    i, size = spec
    line = f"def function_{i}(argument):  # a line of source, about 60 characters long\n"
    text = line * max(1, size // len(line))
    return text, text.count("\n")


def size_of(payload: Any) -> int:
    if isinstance(payload, tuple):  # an indexer's text and its count
        return len(payload[0])
    return int(getattr(payload, "nbytes", None) or len(payload))


KINDS: dict[str, Callable[[tuple[int, int]], Any]] = {"bytes": make_bytes, "numpy": make_array, "text": make_text}


def kinds_available() -> list[str]:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return ["bytes", "text"]
    return ["bytes", "numpy", "text"]


# ----------------------------------------------------------- the machine


def machine_figures(mb: int = 256) -> dict[str, float]:
    """MB/s of a memcpy (bytes of a bytearray, into memory already faulted
    in) and of a pipe (1 MiB writes, read by another thread)."""
    src = bytearray(os.urandom(1 << 20)) * mb
    dst = bytearray(len(src))
    t0 = time.perf_counter()
    dst[:] = src
    memcpy = mb / (time.perf_counter() - t0)
    r, w = os.pipe()
    chunk = bytes(1 << 20)

    def reader() -> None:
        left = mb << 20
        while left:
            left -= len(os.read(r, 1 << 20))

    t = threading.Thread(target=reader)
    t0 = time.perf_counter()
    t.start()
    for _ in range(mb):
        os.write(w, chunk)
    t.join()
    pipe = mb / (time.perf_counter() - t0)
    os.close(r)
    os.close(w)
    return {"memcpy": memcpy, "pipe": pipe}


# ---------------------------------------------------------------- the sweep


def factories() -> list[Callable[[], peers.Peer]]:
    out: list[Callable[[], peers.Peer]] = [peers.PQQueueImap, peers.PQPutGet]
    out += [lambda c=c: peers.PoolImap(c) for c in (1, 4, 16)]  # type: ignore[misc]
    out += [lambda: peers.ExecutorMap(1)]
    out += peers.available([peers.Joblib])
    return out


def cell_items(
    kind: str, size: int, direction: str, total: int
) -> tuple[Callable[[Any], Any], Union[list[Any], Callable[[], list[Any]]]]:
    """The task and its items (for arguments: a function that makes new
    ones).  Arguments are made anew for every run: joblib writes a large
    array argument to a file once and, given the same array object again,
    sends only the file's name.  With the same arrays in every round, its
    8 MB numpy argument figure was a cache hit (5,905 MB/s, 721 with new
    arrays each round, in one run); a real workload passes each array once."""
    n = max(4, total // size)
    if direction == "results":
        return KINDS[kind], [(i, size) for i in range(n)]
    make = KINDS[kind]
    return size_of, lambda: [make((i, size)) for i in range(n)]


def run_payloads(quick: bool, rounds: int, throughput: Callable[..., dict[str, list[float]]]) -> Result:
    """The whole sweep.  ``throughput`` is run.py's side-by-side runner."""
    total = (16 if quick else 64) << 20
    sizes = list(SIZES)
    figures = machine_figures(64 if quick else 256)
    print(f"  payloads     machine: memcpy {figures['memcpy']:,.0f} MB/s, pipe {figures['pipe']:,.0f} MB/s", flush=True)
    out: Result = {"workload": "payloads", "what": "MB/s by kind, size and direction", "unit": "MB/s", "cells": []}
    out["machine"] = figures
    makers = factories()
    for direction in ("results", "arguments"):
        for kind in kinds_available():
            for size_name in sizes:
                size = SIZES[size_name]
                fn, items = cell_items(kind, size, direction, total)
                rates = throughput(makers, fn, items, rounds)
                cell: Result = {"kind": kind, "size": size_name, "direction": direction, "peers": {}}
                for name, per_round in rates.items():
                    cell["peers"][name] = statistics.median(per_round) * size / (1 << 20)
                pool_best = max(v for k, v in cell["peers"].items() if k.startswith("Pool.imap"))
                cell["pool_best"] = pool_best
                mine = cell["peers"][peers.PQQueueImap.name]
                print(
                    f"  payloads     {direction:9s} {kind:5s} {size_name:>5s}  parallel_queue {mine:8,.0f} MB/s"
                    f"   Pool best {pool_best:8,.0f} MB/s   ratio {mine / pool_best:5.2f}",
                    flush=True,
                )
                out["cells"].append(cell)
    return out


def table(result: Result) -> str:
    """The sweep as a plain-text table: MB/s of each peer, and the ratio to Pool's best."""
    names: Optional[list[str]] = None
    lines = []
    for cell in result["cells"]:
        if names is None:
            names = list(cell["peers"])
            lines.append("  " + "cell".ljust(26) + "".join(n[:22].rjust(24) for n in names) + "   vs Pool best")
        mine = cell["peers"][peers.PQQueueImap.name]
        label = f"{cell['direction']} {cell['kind']} {cell['size']}"
        lines.append(
            "  "
            + label.ljust(26)
            + "".join(f"{cell['peers'].get(n, float('nan')):24,.0f}" for n in names or [])
            + f"   {mine / cell['pool_best']:5.2f}x"
        )
    return "\n".join(lines)


def chart(result: Result, path: str) -> bool:
    """The sweep as a PNG: MB/s of each peer, per cell, one panel per
    direction, with the machine's memcpy and pipe figures in the title.
    False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    directions = ["results", "arguments"]
    fig, axes = plt.subplots(1, len(directions), figsize=(13, 7.5), sharex=True)
    for ax, direction in zip(axes, directions):
        cells = [c for c in result["cells"] if c["direction"] == direction]
        names = list(cells[0]["peers"]) if cells else []
        height = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            ys = [i + k * height for i in range(len(cells))]
            ours = name.startswith(("parallel_queue", "ParallelQueue"))
            color = ("tab:green", "tab:olive")[k % 2] if ours else plt.cm.Greys(0.35 + 0.5 * k / len(names))
            ax.barh(ys, [c["peers"].get(name, 0) for c in cells], height=height, color=color, label=name)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cells))])
        ax.set_yticklabels([f"{c['kind']} {c['size']}" for c in cells], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("MB/s (median, log scale)")
        ax.set_title(f"{direction}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    m = result["machine"]
    fig.suptitle(
        f"Payload sweep, 2 workers: MB/s moved (this machine: memcpy {m['memcpy']:,.0f} MB/s,"
        f" one pipe {m['pipe']:,.0f} MB/s)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
