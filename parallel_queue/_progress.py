"""``progress=True``: a tqdm bar on stderr counting delivered results.

A small thread redraws the bar from the queue's counters ten times a
second; nothing is added to put() or get().  tqdm is an optional extra
(``pip install 'parallel-queue[progress]'``).

The bar has a total only when it is known: a map over inputs that have a
length, or ``progress={"total": n}``.  A queue fed by ``put()`` counts
results with no total (a total that grew as tasks were put made the
percentage and the time left wrong).  ``progress`` may be a dict of tqdm's
keywords (``desc``, ``total``, ``position``, ``leave``, ...).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Mapping, Optional, Union

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


def tqdm_options(progress: Union[bool, Mapping[str, Any]], total: Optional[int] = None) -> dict[str, Any]:
    """The keywords the bar is made with: ours, then the program's own."""
    options: dict[str, Any] = {"total": total, "unit": "task", "file": sys.stderr, "dynamic_ncols": True}
    if isinstance(progress, Mapping):
        options.update(progress)
    return options


def check_progress(progress: Any) -> None:
    """TypeError (or tqdm's own error) now, before anything starts, for a
    ``progress`` that is neither a bool nor tqdm's keywords; ImportError
    without tqdm."""
    if isinstance(progress, bool) or progress is None:
        if progress:
            require_tqdm()
        return
    if not isinstance(progress, Mapping) or not all(isinstance(k, str) for k in progress):
        raise TypeError(f"progress must be True, False or a dict of tqdm keywords, got {progress!r}")
    require_tqdm()(**dict(tqdm_options(progress), disable=True)).close()  # (unknown keywords raise here)


class ProgressBar:
    def __init__(self, delivered: Callable[[], int], options: dict[str, Any]) -> None:
        """``delivered()``: the queue's count of results handed out, read ten
        times a second; ``options``: tqdm's keywords (see tqdm_options)."""
        tqdm = require_tqdm()
        self.delivered = delivered
        self.bar: Any = tqdm(**options)
        self.done = threading.Event()
        self.thread = helper_thread(self.run, "parallel_queue-progress")
        self.thread.start()

    def update(self) -> None:
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
