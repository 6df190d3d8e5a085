"""Side-by-side benchmarks: parallel_queue against the ordered maps people use.

Usage::

    python -m benchmarks            # the full suite (a few minutes on 2 cores)
    python -m benchmarks --quick    # smaller workloads, fewer rounds
    python -m benchmarks --only trivial,latency

Every workload runs for every peer in the same run, several rounds each; the
table shows medians and parallel_queue's ratio to each peer, then checks the
targets of the performance issue.  Results go to ``benchmarks/results/``
(JSON, and a PNG chart when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Union

from parallel_queue import ParallelQueue

from . import payloads, peers, workloads

Result = dict[str, Any]


def _throughput(
    factories: list[Callable[[], peers.Peer]],
    fn: Callable[[Any], Any],
    items: Union[list[Any], Callable[[], list[Any]]],
    rounds: int,
) -> dict[str, list[float]]:
    """Tasks per second of each peer, ``rounds`` times.

    Every peer is started first; then each round runs every peer once, in
    turn, so a machine that speeds up or slows down during the run (shared
    machines do) weighs on all of them alike.  A first round warms every
    peer up and is not counted.  ``items`` given as a function makes new
    items for every run, before its timer starts (see payloads.cell_items).
    """
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(f()) for f in factories]
        for r in range(rounds + 1):
            for peer in started:
                run_items = items() if callable(items) else items
                t0 = time.perf_counter()
                n = 0
                for _ in peer.map(fn, run_items):
                    n += 1
                dt = time.perf_counter() - t0
                assert n == len(run_items)
                if r:
                    rates.setdefault(peer.name, []).append(len(run_items) / dt)
    return rates


def throughput_workloads(quick: bool) -> dict[str, tuple[Callable[[Any], Any], list[Any], str]]:
    return {
        "trivial": (abs, list(range(-20000, 0)), "20,000 calls of abs()"),
        "cpu_3ms": (workloads.cpu_3ms, list(range(300 if quick else 1000)), "CPU-bound tasks of 3 ms"),
        "heavy_tail": (workloads.heavy_tail, list(range(300 if quick else 1000)), "1 ms tasks, every 50th takes 50 ms"),
        # Distinct objects: one object repeated would be pickled once per batch.
        "payload_1mb": (
            workloads.payload,
            [bytes([i % 256]) * (1 << 20) for i in range(50 if quick else 200)],
            "1 MB of bytes per task",
        ),
    }


def run_throughput(name: str, quick: bool, rounds: int) -> Result:
    fn, items, what = throughput_workloads(quick)[name]
    factories: list[Callable[[], peers.Peer]] = [peers.PQPutGet]
    m = peers.pq_map_peer()
    if m is not None:
        factories.append(m)
        if name == "trivial":
            factories += [peers.PQQueueImap, peers.PoolImapOneShot]
    factories += [
        lambda: peers.PoolImap(1),
        lambda: peers.PoolImap(100),
        lambda: peers.ExecutorMap(1),
        lambda: peers.ExecutorMap(100),
    ]
    if name in ("cpu_3ms", "heavy_tail", "payload_1mb") and quick:
        factories = [f for f in factories if "100" not in f().name]  # coarse chunks add nothing here
    factories += peers.optional_peers()
    out: Result = {"workload": name, "what": what, "tasks": len(items), "unit": "tasks/s", "peers": {}}
    for peer_name, rates in _throughput(factories, fn, items, rounds).items():
        out["peers"][peer_name] = {"median": statistics.median(rates), "rounds": rates}
        print(f"  {name:12s} {peer_name:42s} {statistics.median(rates):12,.0f} tasks/s", flush=True)
    if name == "cpu_3ms":
        sequential = len(items) * 0.003
        for p in out["peers"].values():
            wall = len(items) / p["median"]
            p["efficiency"] = sequential / (peers.WORKERS * wall)
    return out


def _pq_put_get(client: Any, fn: Callable[[Any], Any], items: list[Any]) -> None:
    q = ParallelQueue(executor=client)
    t = threading.Thread(target=lambda: [q.put(fn, x) for x in items])
    t.start()
    for _ in items:
        q.get()
    t.join()
    q.terminate()


def _pq_imap(client: Any, fn: Callable[[Any], Any], items: list[Any]) -> None:
    from parallel_queue import imap

    for _ in imap(fn, items, executor=client):
        pass


def _dask_map(client: Any, fn: Callable[[Any], Any], items: list[Any]) -> None:
    for f in client.map(fn, items, pure=False):
        f.result()


def _pq_own(client: Any, fn: Callable[[Any], Any], items: list[Any]) -> None:
    from parallel_queue import imap

    for _ in imap(fn, items, num_workers=peers.WORKERS):
        pass


def run_dask(quick: bool, rounds: int) -> list[Result]:
    """The same workloads on a 2-worker LocalCluster: through parallel_queue
    (``executor=client``) and through the plain Dask idiom (``client.map``,
    then the results in order)."""
    try:
        import distributed
    except ImportError:
        print("  dask: distributed is not installed (pip install 'parallel-queue[dask]'); skipped")
        return []

    sizes = {"trivial": 2000, "cpu_3ms": 200 if quick else 500, "heavy_tail": 200 if quick else 500}
    fns = {"trivial": abs, "cpu_3ms": workloads.cpu_3ms, "heavy_tail": workloads.heavy_tail}
    out = []
    with (
        distributed.LocalCluster(
            n_workers=peers.WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        for name, n in sizes.items():
            fn, items = fns[name], list(range(-n, 0)) if name == "trivial" else list(range(n))
            r: Result = {"workload": f"dask_{name}", "what": f"{n} tasks on a 2-worker LocalCluster", "unit": "tasks/s"}

            r["peers"] = {}
            for label, call in (
                ("parallel_queue put/get on Dask", _pq_put_get),
                ("parallel_queue.imap on Dask", _pq_imap),
                ("Dask client.map + results in order", _dask_map),
                ("parallel_queue.imap, own processes", _pq_own),
            ):
                rates = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    call(client, fn, items)
                    rates.append(n / (time.perf_counter() - t0))
                r["peers"][label] = {"median": statistics.median(rates), "rounds": rates}
                print(f"  {r['workload']:12s} {label:42s} {statistics.median(rates):12,.0f} tasks/s", flush=True)
            out.append(r)
    return out


def run_latency(rounds: int) -> Result:
    """Median idle round trip: one task in, its result out, nothing else queued."""
    reps = 300
    out: Result = {"workload": "latency", "what": "idle round trip of one trivial task", "unit": "µs", "peers": {}}

    def measure(call: Callable[[], Any]) -> float:
        call()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    q = ParallelQueue(num_workers=peers.WORKERS)
    try:

        def pq_call() -> Any:
            q.put(abs, -1)
            return q.get()

        out["peers"]["parallel_queue put+get"] = {"median": statistics.median(measure(pq_call) for _ in range(rounds))}
    finally:
        q.terminate()
    with multiprocessing.Pool(peers.WORKERS) as pool:
        out["peers"]["Pool.apply_async().get()"] = {
            "median": statistics.median(measure(lambda: pool.apply_async(abs, (-1,)).get()) for _ in range(rounds))
        }
    with concurrent.futures.ProcessPoolExecutor(peers.WORKERS) as ex:
        out["peers"]["ProcessPoolExecutor.submit().result()"] = {
            "median": statistics.median(measure(lambda: ex.submit(abs, -1).result()) for _ in range(rounds))
        }
    for name, p in out["peers"].items():
        print(f"  {'latency':12s} {name:42s} {p['median']:12,.0f} µs", flush=True)
    return out


def _pq_first(q: Any) -> None:
    q.put(abs, -1)
    q.get()


def _pq_end(q: Any) -> None:
    q.stop()
    q.join()


def _pool_end(pool: Any) -> None:
    pool.close()
    pool.join()


# The work done before the second stop: every worker has started and run
# tasks by then, as in a queue that has been in use.
LIFECYCLE_WORK = range(2000)

# Per peer: start it, get a first result from it, run some work through its
# ordered map, stop it and wait for its end.
LIFECYCLES: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Any], Callable[[Any], Any]]] = {
    "parallel_queue": (
        lambda: ParallelQueue(num_workers=peers.WORKERS),
        _pq_first,
        lambda q: list(q.imap(abs, LIFECYCLE_WORK)),
        _pq_end,
    ),
    "multiprocessing.Pool": (
        lambda: multiprocessing.Pool(peers.WORKERS),
        lambda p: p.apply(abs, (-1,)),
        lambda p: list(p.imap(abs, LIFECYCLE_WORK, chunksize=100)),
        _pool_end,
    ),
    "ProcessPoolExecutor": (
        lambda: concurrent.futures.ProcessPoolExecutor(peers.WORKERS),
        lambda ex: ex.submit(abs, -1).result(),
        lambda ex: list(ex.map(abs, LIFECYCLE_WORK, chunksize=100)),
        lambda ex: ex.shutdown(),
    ),
}


def run_lifecycle(rounds: int) -> Result:
    """For a fresh pool each time (the peers take turns within each round):
    start to first result, then stop + join at once; and stop + join of a
    pool that has run some work first."""
    out: Result = {"workload": "lifecycle", "what": "start to first result; stop and join", "unit": "ms", "peers": {}}
    times: dict[str, tuple[list[float], list[float], list[float]]] = {name: ([], [], []) for name in LIFECYCLES}
    for _ in range(rounds):
        for name, (start, first, work, end) in LIFECYCLES.items():
            t0 = time.perf_counter()
            peer = start()
            first(peer)
            t1 = time.perf_counter()
            end(peer)
            t2 = time.perf_counter()
            times[name][0].append(t1 - t0)
            times[name][1].append(t2 - t1)
            peer = start()
            first(peer)
            work(peer)
            t0 = time.perf_counter()
            end(peer)
            times[name][2].append(time.perf_counter() - t0)
    for name, (starts, stops, used_stops) in times.items():
        start_ms, stop_ms, used_ms = (statistics.median(x) * 1e3 for x in (starts, stops, used_stops))
        out["peers"][name] = {"start": start_ms, "stop": stop_ms, "stop_used": used_ms}
        print(
            f"  {'lifecycle':12s} {name:42s} start {start_ms:7.1f} ms   stop+join {stop_ms:7.1f} ms"
            f"   after work {used_ms:7.1f} ms",
            flush=True,
        )
    return out


# ------------------------------------------------------------------ targets


def check_targets(results: dict[str, Result]) -> list[tuple[str, float, float, bool]]:
    """(target, measured ratio, required, met) for each target of the performance issue."""
    checks = []

    def med(w: str, p: str) -> float:
        return float(results[w]["peers"][p]["median"])

    if "trivial" in results:
        checks.append(
            (
                "trivial put/get >= 0.5x Pool.imap(chunksize=100)",
                med("trivial", "parallel_queue put/get") / med("trivial", "Pool.imap(chunksize=100)"),
                0.5,
            )
        )
        imap_name = "parallel_queue.imap (incl. start-up)"
        if imap_name in results["trivial"]["peers"]:
            checks.append(
                (
                    "trivial imap >= 1.0x Pool.imap(chunksize=100), both warm",
                    med("trivial", "ParallelQueue.imap (warm)") / med("trivial", "Pool.imap(chunksize=100)"),
                    1.0,
                )
            )
            checks.append(
                (
                    "trivial imap >= 1.0x Pool.imap(chunksize=100), both incl. start-up",
                    med("trivial", imap_name) / med("trivial", "Pool.imap(chunksize=100) (incl. start-up)"),
                    1.0,
                )
            )
    if "cpu_3ms" in results:
        checks.append(
            (
                "cpu_3ms parallel efficiency >= 90%",
                results["cpu_3ms"]["peers"]["parallel_queue put/get"]["efficiency"],
                0.9,
            )
        )
        checks.append(
            (
                "cpu_3ms >= 1.0x Pool.imap(chunksize=1)",
                med("cpu_3ms", "parallel_queue put/get") / med("cpu_3ms", "Pool.imap(chunksize=1)"),
                1.0,
            )
        )
    if "heavy_tail" in results:
        checks.append(
            (
                "heavy_tail >= 0.9x Pool.imap(chunksize=1)",
                med("heavy_tail", "parallel_queue put/get") / med("heavy_tail", "Pool.imap(chunksize=1)"),
                0.9,
            )
        )
    if "latency" in results:
        checks.append(
            (
                "idle round trip <= 1.5x Pool.apply_async().get()",
                med("latency", "parallel_queue put+get") / med("latency", "Pool.apply_async().get()"),
                1.5,
            )
        )
    if "lifecycle" in results:
        p = results["lifecycle"]["peers"]
        checks.append(
            ("start to first result <= Pool's", p["parallel_queue"]["start"] / p["multiprocessing.Pool"]["start"], 1.0)
        )
        checks.append(("stop+join <= Pool's", p["parallel_queue"]["stop"] / p["multiprocessing.Pool"]["stop"], 1.0))
        checks.append(
            (
                "stop+join after work <= Pool's",
                p["parallel_queue"]["stop_used"] / p["multiprocessing.Pool"]["stop_used"],
                1.0,
            )
        )
    if "payloads" in results:
        # The large-payload issue's targets: parallel_queue's warm map against
        # Pool.imap at its best chunksize (1, 4 or 16), in MB/s.
        cells = {(c["direction"], c["kind"], c["size"]): c for c in results["payloads"]["cells"]}
        for (direction, kind, size), need in (
            (("results", "bytes", "1MB"), 1.5),
            (("results", "numpy", "8MB"), 2.0),
            (("arguments", "numpy", "8MB"), 2.0),
            (("results", "bytes", "100KB"), 1.2),
            (("arguments", "bytes", "100KB"), 1.2),
            (("results", "text", "1MB"), 1.0),
        ):
            c = cells.get((direction, kind, size))
            if c is not None:
                ratio = c["peers"][peers.PQQueueImap.name] / c["pool_best"]
                checks.append((f"{kind} {size} {direction} >= {need}x Pool.imap at its best chunksize", ratio, need))
        # And ahead of joblib (which memory-maps large numpy inputs) where installed.
        for direction in ("results", "arguments"):
            c = cells.get((direction, "numpy", "8MB"))
            joblib = [v for k, v in c["peers"].items() if k.startswith("joblib")] if c is not None else []
            if c is not None and joblib:
                ratio = c["peers"][peers.PQQueueImap.name] / max(joblib)
                checks.append((f"numpy 8MB {direction} >= 1.0x joblib", ratio, 1.0))
    out = []
    for name, ratio, need in checks:
        lower_is_better = "<=" in name
        out.append((name, ratio, need, ratio <= need if lower_is_better else ratio >= need))
    return out


def print_report(results: dict[str, Result], checks: list[tuple[str, float, float, bool]]) -> None:
    print()
    print("Ratios: parallel_queue's speed / the peer's (above 1: parallel_queue is faster)")
    for name, r in results.items():
        if r["unit"] != "tasks/s":
            continue
        mine = next(iter(r["peers"].values()))["median"]
        print(f"  {name}:")
        for peer, p in r["peers"].items():
            extra = f"  efficiency {p['efficiency']:.0%}" if "efficiency" in p else ""
            print(f"    {peer:42s} {p['median']:12,.0f} tasks/s   put/get ratio {mine / p['median']:6.2f}{extra}")
    if "payloads" in results:
        print()
        print(
            "Payload sweep, MB/s (machine: memcpy {memcpy:,.0f} MB/s, pipe {pipe:,.0f} MB/s):".format(
                **results["payloads"]["machine"]
            )
        )
        print(payloads.table(results["payloads"]))
    print()
    print("Targets:")
    for name, ratio, need, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {ratio:.2f} (needs {need})")


def chart(results: dict[str, Result], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    tp = [r for r in results.values() if r["unit"] == "tasks/s" and not r["workload"].startswith("dask")]
    if not tp:
        return False
    fig, axes = plt.subplots(1, len(tp), figsize=(4.2 * len(tp), 4.5))
    if len(tp) == 1:
        axes = [axes]
    for ax, r in zip(axes, tp):
        names = list(r["peers"])
        vals = [r["peers"][n]["median"] for n in names]
        colors = ["tab:green" if n.startswith(("parallel_queue", "ParallelQueue")) else "tab:gray" for n in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace("ProcessPoolExecutor", "PPE") for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{r['workload']}\n{r['what']}", fontsize=9)
        ax.set_xlabel("tasks/s (median)")
        ax.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k" if v >= 10000 else f"{v:.0f}")
        )
    fig.suptitle(
        f"2 workers, {platform.processor() or platform.machine()}, Python {platform.python_version()}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads and 3 rounds (for CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default="", help="comma-separated workloads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    names = ["trivial", "cpu_3ms", "heavy_tail", "payload_1mb", "latency", "lifecycle", "payloads", "dask"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(
        f"parallel_queue benchmarks: {os.cpu_count()} CPUs, {peers.WORKERS} workers,"
        f" Python {platform.python_version()}, start method {multiprocessing.get_start_method()}, {rounds} rounds",
        flush=True,
    )
    results: dict[str, Result] = {}
    for name in names:
        if name == "dask":
            for r in run_dask(args.quick, rounds):
                results[r["workload"]] = r
        elif name == "latency":
            results[name] = run_latency(rounds)
        elif name == "payloads":
            results[name] = payloads.run_payloads(args.quick, rounds, _throughput)
        elif name == "lifecycle":
            # A round takes tens of milliseconds and one start or stop moves
            # by a millisecond or two on a shared machine: more of them.
            results[name] = run_lifecycle(rounds * 6)
        else:
            results[name] = run_throughput(name, args.quick, rounds)
    checks = check_targets(results)
    print_report(results, checks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "results": results, "targets": checks}, f, indent=1
        )
    if chart(results, os.path.join(args.out, "latest.png")):
        print(f"chart: {os.path.join(args.out, 'latest.png')}")
    if "payloads" in results and payloads.chart(results["payloads"], os.path.join(args.out, "payloads.png")):
        print(f"chart: {os.path.join(args.out, 'payloads.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
