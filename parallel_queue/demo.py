"""The main job, shown: a batch indexer that logs each batch in order.

Run it with ``python -m parallel_queue.demo``.  A producer thread puts
documents in batches, each followed by a ``BatchDone(count)`` marker; a
consumer thread takes results in put order and logs a batch when its marker
comes out.  Some documents are slow: thanks to the ordering, a slow document
holds up only what comes after it, while the workers keep going on the next
batches.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
from typing import Optional

from . import ParallelQueue


class BatchDone(int):
    """Marker: the batch of ``int(self)`` documents before it is complete."""


def index_document(doc_id: int, text: str) -> tuple[int, int, str]:
    """Stand-in for real indexing: some CPU work, a few slow documents."""
    rounds = 3000 if doc_id % 37 else 60000  # every 37th document is slow
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return doc_id, len(text.split()), digest.hex()[:12]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel_queue.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    progress = not args.no_progress
    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            print("(no progress bar: pip install 'parallel-queue[progress]' for one)", file=sys.stderr)
            progress = False
    # The demo knows how many documents it will index: the bar gets a total
    # (a queue fed by put() counts with no total otherwise).
    bar = {"total": args.batches * args.batch_size, "desc": "documents"} if progress else False
    queue = ParallelQueue(num_workers=args.jobs, progress=bar)
    say = print
    if progress:
        import tqdm

        say = tqdm.tqdm.write  # prints above the bar instead of through it
    start = time.perf_counter()

    def producer() -> None:
        doc_id = 0
        for _ in range(args.batches):
            for _ in range(args.batch_size):
                queue.put(index_document, doc_id, f"document number {doc_id} " * (1 + doc_id % 5))
                doc_id += 1
            queue.put(BatchDone(args.batch_size))
        queue.stop()

    totals = {"docs": 0, "words": 0}

    def consumer() -> None:
        batch = 0
        words = 0
        for item in queue:  # results and markers, in put order, until stopped
            if isinstance(item, BatchDone):
                batch += 1
                say(
                    f"batch {batch:3d}: {int(item)} documents, {words} words indexed"
                    f"  ({time.perf_counter() - start:6.2f} s)"
                )
                totals["docs"] += int(item)
                totals["words"] += words
                words = 0
            else:
                words += item[1]

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.join()
    elapsed = time.perf_counter() - start
    print(
        f"indexed {totals['docs']} documents ({totals['words']} words) in {elapsed:.2f} s "
        f"with {queue.num_workers} worker processes"
    )
    s = queue.stats()
    print(
        f"stats: {s.tasks_put} tasks, {s.markers_delivered} batch markers, {s.errors} errors, "
        f"{s.workers_replaced} workers replaced"
    )
    # The producer queues every document at once, so a document's time from
    # put() to get() is mostly its wait in line, not its own work: said so,
    # beside the rate (lines of at most 80 columns).
    rate = totals["docs"] / elapsed if elapsed > 0 else 0.0
    print(f"{rate:,.0f} documents/s; median time from put() to get() {s.latency_p50 or 0:.2f} s")
    print("(most of it waiting in line: every document was put at once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
