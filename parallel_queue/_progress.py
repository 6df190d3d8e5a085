"""``progress=True``: a tqdm bar on stderr counting delivered results.

A small thread redraws the bar from the queue's counters ten times a
second; nothing is added to put() or get().  tqdm is an optional extra
(``pip install 'parallel-queue[progress]'``).
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Optional

from ._threads import helper_thread

if TYPE_CHECKING:
    from ._front import Front as Engine

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
    def __init__(self, engine: Engine, total: Optional[int] = None, desc: Optional[str] = None) -> None:
        tqdm = require_tqdm()
        self.engine = engine
        self.fixed_total = total
        self.bar: Any = tqdm(total=total, desc=desc, unit="task", file=sys.stderr, dynamic_ncols=True)
        self.done = threading.Event()
        self.thread = helper_thread(self.run, "parallel_queue-progress")
        self.thread.start()

    def update(self) -> None:
        e = self.engine
        if self.fixed_total is None and self.bar.total != e.tasks_put:
            self.bar.total = e.tasks_put  # grows as tasks are put
        self.bar.n = e.delivery.delivered
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
