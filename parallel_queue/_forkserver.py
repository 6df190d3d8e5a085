"""The package's own fork server, for queues made with ``mp_context="forkserver"``.

A terminal's Ctrl-C goes to every process of the foreground group, children
included.  multiprocessing's fork server let such a press through twice:

- it is a new interpreter the first time a program uses it, and a press
  during its own start-up killed it (it printed its own error);
- it gives every process it forks Python's Ctrl-C handler, and a press
  before that process had read its start-up data and set SIGINT to ignored
  ended it: the consumer dead, the queue broken for a program that catches
  the KeyboardInterrupt and goes on (11 presses in 12, 0.05 to 0.2 s after
  a queue was made, in an adversarial run).

Ours runs the same server program, but is started with SIGINT blocked in
the starting thread (see ``_threads.sigint_held_back``).  The mask goes
through exec and every fork: the server and every process it forks hold a
press pending, blocked, until that process sets SIGINT to ignored
(``_child.ignore_sigint``), which discards it.  multiprocessing's own server
is left as the program has it: a mask inherited there would reach the
program's own processes, which should take a Ctrl-C as usual.

Only the instance that starts the server and asks it for processes is ours;
the server, its protocol and the child's side are multiprocessing's.
"""

from __future__ import annotations

import io
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
from multiprocessing import reduction, spawn, util
from typing import Any, Optional

__all__ = ["ForkServerProcess"]

_server: Optional[multiprocessing.forkserver.ForkServer] = None
_server_lock = threading.Lock()


def _connect(fds: list[int]) -> tuple[int, int]:
    """Ask our server for a new process (starting the server first if need
    be, SIGINT blocked); returns multiprocessing's (status_r, data_w)."""
    global _server
    # The resource tracker unblocks SIGINT in the calling thread as it
    # starts: it must run before the block, not inside it.
    multiprocessing.resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with _server_lock:
            if _server is None:
                _server = multiprocessing.forkserver.ForkServer()
                # The program's choice of modules to preload holds for ours.
                preload = getattr(multiprocessing.forkserver._forkserver, "_preload_modules", None)
                if preload is not None:
                    _server.set_forkserver_preload(list(preload))
            server = _server
        server.ensure_running()
        return server.connect_to_new_process(fds)  # type: ignore[no-any-return]
    finally:
        if signal.SIGINT not in old_mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _Popen(multiprocessing.popen_forkserver.Popen):  # type: ignore[misc]
    """multiprocessing's fork-server Popen, asking our server."""

    def _launch(self, process_obj: Any) -> None:
        data = io.BytesIO()
        multiprocessing.context.set_spawning_popen(self)  # descriptors pickled now go in self._fds
        try:
            reduction.dump(spawn.get_preparation_data(process_obj._name), data)
            reduction.dump(process_obj, data)
        finally:
            multiprocessing.context.set_spawning_popen(None)
        self.sentinel, data_w = _connect(self._fds)  # type: ignore[attr-defined]
        # The child takes the end of its data pipe as its parent's death: a
        # copy of the write end stays open for as long as this object lives.
        alive_w = os.dup(data_w)
        self.finalizer = util.Finalize(self, _close_all, (alive_w, self.sentinel))
        with open(data_w, "wb", closefd=True) as f:
            f.write(data.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class ForkServerProcess(multiprocessing.context.ForkServerProcess):  # type: ignore[misc]
    """A process started by our fork server (see the module docstring)."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


def _forget_server() -> None:
    # A forked child of the program starts a server of its own if it makes
    # a queue (the parent's server is not its child to watch); its copy of
    # the parent's "alive" descriptor would only keep that server running.
    global _server, _server_lock
    server, _server, _server_lock = _server, None, threading.Lock()
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_server)
