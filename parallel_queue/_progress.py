"""``progress=True``: a tqdm bar on stderr counting delivered results.

A small thread redraws the bar from the queue's counters ten times a
second; nothing is added to put() or get().  tqdm is an optional extra
(``pip install 'parallel-queue[progress]'``).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Optional

from ._threads import helper_thread

# Seconds between redraws: a display rate, not a wait for anything.
REFRESH_SECONDS = 0.1


def require_tqdm() -> Any:
    """The tqdm class, or an ImportError that says what to install."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs tqdm: pip install 'parallel-queue[progress]' (or pip install tqdm)"
        ) from None
    return tqdm


class ProgressBar:
    def __init__(
        self,
        delivered: Callable[[], int],
        tasks_put: Callable[[], int],
        total: Optional[int] = None,
        desc: Optional[str] = None,
    ) -> None:
        """``delivered()`` and ``tasks_put()``: the queue's counts, read ten
        times a second; ``total``: the number of results, if known (else
        the bar's total grows as tasks are put)."""
        tqdm = require_tqdm()
        self.delivered = delivered
        self.tasks_put = tasks_put
        self.fixed_total = total
        self.bar: Any = tqdm(total=total, desc=desc, unit="task", file=sys.stderr, dynamic_ncols=True)
        self.done = threading.Event()
        self.thread = helper_thread(self.run, "parallel_queue-progress")
        self.thread.start()

    def update(self) -> None:
        tasks_put = self.tasks_put()
        if self.fixed_total is None and self.bar.total != tasks_put:
            self.bar.total = tasks_put  # grows as tasks are put
        self.bar.n = self.delivered()
        self.bar.refresh()

    def run(self) -> None:
        while not self.done.wait(REFRESH_SECONDS):
            self.update()
        self.update()
        self.bar.close()

    def close(self) -> None:
        """Draw the final count and close the bar (idempotent)."""
        self.done.set()
        if self.thread is not threading.current_thread():
            self.thread.join()
