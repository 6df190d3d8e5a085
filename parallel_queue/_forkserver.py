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

Nor does a queue depend on the server staying alive.  multiprocessing
learns of a process's end, and its exit status, from the server: with the
server killed (SIGKILL, the OOM killer), every process it had started read
as ended with exit code 255 while it ran on, and a consumer ending normally
as dead.  Ours watches each process's own pidfd instead (see ``_Popen``);
only the exit status goes with the server.  A request the server fails (it
died before or as it was asked) is made again of a new server (``_connect``).

Only the instance that starts the server and asks it for processes is ours;
the server, its protocol and the child's side are multiprocessing's.
"""

from __future__ import annotations

import errno
import io
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import multiprocessing.resource_tracker
import os
import pickle
import signal
import threading
from multiprocessing import reduction, spawn, util
from multiprocessing.connection import wait
from typing import Any, Optional

__all__ = ["ForkServerProcess"]

_server: Optional[multiprocessing.forkserver.ForkServer] = None
_server_lock = threading.Lock()

# What the server's end says about a process it had started: SIGKILL, the
# OOM killer, or a fault of its own (see _request).
_SERVER_GONE = (EOFError, ConnectionError, FileNotFoundError)


def _connect(fds: list[int]) -> tuple[int, int, int]:
    """Have our server fork a new process, starting the server first if need
    be (SIGINT blocked, see the module docstring); returns the status pipe's
    read end, the data pipe's write end, and the new process's pid.

    A server that fails a request (it was killed, or died of a fault of its
    own) is killed, to be sure, and started again, and the request made once
    more: one dead server costs no queue a worker.  A second failure in a row
    raises ConnectionError.  Failures on this side (no descriptor left) are
    raised as they are.
    """
    global _server
    # The resource tracker unblocks SIGINT in the calling thread as it
    # starts: it must run before the block, not inside it.
    multiprocessing.resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # One request at a time: the server forks one at a time anyway, and a
        # thread that restarts a failed server must not kill the new one that
        # another thread has just started.
        with _server_lock:
            if _server is None:
                _server = multiprocessing.forkserver.ForkServer()
            # The program's choice of modules to preload holds for ours, as
            # it stands when ours (re)starts.
            preload = getattr(multiprocessing.forkserver._forkserver, "_preload_modules", None)
            if preload is not None:
                _server.set_forkserver_preload(list(preload))
            try:
                return _request(_server, fds)
            except _SERVER_GONE:
                _end(_server)
            try:
                return _request(_server, fds)
            except _SERVER_GONE as e:
                _end(_server)
                raise ConnectionError(f"the fork server failed twice in a row to start a process: {e!r}") from e
    finally:
        if signal.SIGINT not in old_mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _request(server: multiprocessing.forkserver.ForkServer, fds: list[int]) -> tuple[int, int, int]:
    server.ensure_running()  # starts it again if it has died since
    status_r, data_w = server.connect_to_new_process(fds)
    try:
        # The server writes the pid as soon as it has forked, before the new
        # process reads anything: taken before the data is sent (the reverse
        # of multiprocessing's order), a server that dies in between leaves
        # at most a process told to exit (below), never one that runs a
        # worker nobody knows of.
        pid = multiprocessing.forkserver.read_signed(status_r)
    except BaseException:
        _abandon(status_r, data_w)
        raise
    return status_r, data_w, pid


def _abandon(status_r: int, data_w: int) -> None:
    """Give up a process asked for: it is told to exit, then its pipes are
    closed.  A process forked (just before the server died, or before a
    failure on this side) reads the order first and exits at once, where
    end-of-file would have had it print a traceback.  (If none was forked,
    no one reads it.)"""
    try:
        os.write(data_w, _EXIT_QUIETLY)
    except OSError:
        pass
    os.close(status_r)
    os.close(data_w)


class _ExitQuietly:
    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (0,)


_EXIT_QUIETLY = pickle.dumps(_ExitQuietly())


def _end(server: multiprocessing.forkserver.ForkServer) -> None:
    """Kill a server that failed a request and wait until it is gone (without
    reaping it: its ensure_running() does that, and starts a new one)."""
    pid = server._forkserver_pid  # type: ignore[attr-defined]
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        waitid = getattr(os, "waitid", None)
        if waitid is not None:
            waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        # (Without waitid, macOS before Python 3.13, the new request may find
        # it still dying, fail, and raise ConnectionError.)
    except ChildProcessError:
        pass  # reaped already


class _Popen(multiprocessing.popen_forkserver.Popen):  # type: ignore[misc]
    """multiprocessing's fork-server Popen, asking our server, and whose
    process's end does not depend on the server.

    multiprocessing learns that a process ended, and its exit status, from
    the server, on the status pipe.  When the server is gone (SIGKILL, the
    OOM killer), that pipe ends at once: multiprocessing then reported every
    process it had started as ended, with exit code 255, while they ran on.
    Here a pidfd of the process itself (Linux 5.3 and later) is the
    ``sentinel``, readable when the process ends whoever its parent is then;
    the status still comes from the server, and if the server has gone,
    ``status_lost`` is set and ``returncode`` is 255.
    """

    status_lost = False

    def _launch(self, process_obj: Any) -> None:
        data = io.BytesIO()
        multiprocessing.context.set_spawning_popen(self)  # descriptors pickled now go in self._fds
        try:
            reduction.dump(spawn.get_preparation_data(process_obj._name), data)
            reduction.dump(process_obj, data)
        finally:
            multiprocessing.context.set_spawning_popen(None)
        self._status_lock = threading.Lock()
        self.status_r, data_w, self.pid = _connect(self._fds)  # type: ignore[attr-defined]
        self.pidfd = None
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            if pidfd_open is not None:
                # The process waits for its data, sent below: it cannot have
                # ended and been reaped, so this pid is still it.
                try:
                    self.pidfd = pidfd_open(self.pid)
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        raise
                    # ENOSYS and the like: an older kernel, or a sandbox.
            # The child takes the end of its data pipe as its parent's death:
            # a copy of the write end stays open for as long as this object lives.
            alive_w = os.dup(data_w)
        except BaseException:
            if self.pidfd is not None:
                os.close(self.pidfd)
            _abandon(self.status_r, data_w)
            raise
        owned = (alive_w, self.status_r) if self.pidfd is None else (alive_w, self.status_r, self.pidfd)
        self.finalizer = util.Finalize(self, _close_all, owned)
        self.sentinel = self.status_r if self.pidfd is None else self.pidfd
        with open(data_w, "wb", closefd=True) as f:
            f.write(data.getbuffer())

    def _send_signal(self, sig: int) -> None:
        if self.pidfd is None:
            super()._send_signal(sig)  # type: ignore[misc]
        elif self.returncode is None:
            # Through the pidfd: once the server is gone, nobody of ours
            # reaps the process, and its pid may be another's by now.
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        if self.returncode is not None or self.pidfd is None:
            return super().poll(flag)  # type: ignore[no-any-return]
        if not wait([self.pidfd], 0 if flag == os.WNOHANG else None):
            return None
        if flag == os.WNOHANG and not wait([self.status_r], 0):
            # Ended, but the server has not said how yet (a stopped server
            # never will): not known yet, as multiprocessing's own Popen says.
            # Any thread that starts a process polls this one, and must not
            # wait for the server.
            return None
        # It has ended: the server writes its status as it reaps it, then
        # closes the pipe (or closes it as it dies).  One reader: any thread
        # that starts a process polls every child of the program
        # (multiprocessing's _cleanup), and a second reader would find the
        # pipe's end after the first took the status, and call it lost.
        with self._status_lock:
            if self.returncode is None:
                try:
                    code = multiprocessing.forkserver.read_signed(self.status_r)
                except (OSError, EOFError):
                    self.status_lost = True
                    code = 255
                self.returncode = code
        return self.returncode  # type: ignore[no-any-return]


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
