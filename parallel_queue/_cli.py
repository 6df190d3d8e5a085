"""``python -m parallel_queue MODULE:FUNCTION [FILE ...]``: GNU ``parallel -k`` for a Python function.

Reads lines from the files (or stdin), calls the function on each line
(without its line ending) in worker processes, and writes each result's
``str()`` on its own line, in input order.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import os
import signal
import sys
from collections import deque
from typing import Any, BinaryIO, Callable, Iterator, Optional

from . import __version__
from ._imap import imap
from ._maps import NothingInHand

# Output is written in chunks of about this many characters, and whenever
# the next result is not in hand yet (a slow input still shows each result
# as it comes): one write() a line cost 2.7x the run's time where Python's
# output is unbuffered (PYTHONUNBUFFERED=1, as in many containers).
CHUNK = 1 << 16


class CommandLineError(Exception):
    """A mistake in the command line itself: reported in one line, exit status 2."""


class InputError(Exception):
    """An input file that cannot be read to its end: reported in one line, exit status 2."""


def load_function(spec: str) -> Callable[..., Any]:
    """``module:function`` (``function`` may be dotted: ``module:Class.method``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandLineError(f"expected MODULE:FUNCTION, got {spec!r}")
    # Like ``python -m``: modules in the current directory can be named.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module raised while importing
        raise CommandLineError(
            f"cannot import module {module_name!r} (from {spec!r}): {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CommandLineError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})") from None
    if not callable(obj):
        raise CommandLineError(f"{spec!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def _call(fn: Callable[[Any], Any], jsonl: bool, line: str) -> str:
    """Run in the worker: parse, call, format, so each failure is the line's own."""
    result = fn(json.loads(line)) if jsonl else fn(line)
    return json.dumps(result) if jsonl else str(result)


def _lines(files: list[str], where: deque[tuple[str, int]]) -> Iterator[str]:
    """Every input line, decoded from UTF-8, without its line ending (lines
    end at ``\\n`` only, as for ``parallel`` and ``wc -l``); ``where`` gets
    (file, number) of each.

    Files and standard input are read the same way.  A line that is not
    UTF-8 stops the input there, with its own number, after every line
    before it: bytes that do not decode are kept as lone surrogates while
    whole chunks are decoded (fast), and a line found to hold one is the
    bad line (a strict decode of whole chunks lost the lines of the chunk
    before the bad byte, and named the last line handed out)."""
    for name in files or ["-"]:
        label = "<stdin>" if name == "-" else name
        number = 0
        try:
            raw: BinaryIO = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
        except OSError as e:
            raise InputError(f"cannot open {label}: {e.strerror or e}") from None
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="\n")
        try:
            for number, line in enumerate(stream, 1):
                if not line.isascii():
                    _check_utf8(line, label, number)
                where.append((label, number))
                yield line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
        except OSError as e:
            raise InputError(f"cannot read {label} after line {number}: {e.strerror or e}") from None
        finally:
            if raw is sys.stdin.buffer:
                stream.detach()  # (leaves stdin open)
            else:
                stream.close()


def _check_utf8(line: str, label: str, number: int) -> None:
    """Raise InputError if ``line`` holds bytes that were not UTF-8 (kept as
    lone surrogates by the decoding, see _lines).  Raised where the input
    ends (imap raises the input's error after every result before it): not
    any line's own failure."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00
        raise InputError(f"{label}:{number}: not UTF-8 (byte {byte:#04x} at column {e.start + 1})") from None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="parallel-queue",
        description="Call a Python function on every input line in parallel processes; print results in input order.",
        epilog="Example: seq 1000 | parallel-queue -j 4 mymodule:process > out.txt",
    )
    parser.add_argument("function", metavar="MODULE:FUNCTION", help="the function to call on each line")
    # (default=[]: without one, argparse lists FILE among the required
    # arguments when MODULE:FUNCTION is missing)
    parser.add_argument(
        "files", metavar="FILE", nargs="*", default=[], help="input files (default: standard input; - for stdin)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr (needs tqdm)")
    parser.add_argument(
        "--jsonl", action="store_true", help="parse each line as JSON, write each result as one line of JSON"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="report a failing line on stderr and go on (exit status 1 at the end if any failed)",
    )
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        fn = load_function(args.function)
        for name in args.files:
            if name == "-":
                continue
            if os.path.isdir(name):
                raise CommandLineError(f"{name} is a directory, not a file")
            if not os.path.exists(name):
                raise CommandLineError(f"no such file: {name}")
    except CommandLineError as e:
        print(f"parallel-queue: error: {e}", file=sys.stderr)
        return 2
    where: deque[tuple[str, int]] = deque()
    failed = 0
    out = sys.stdout
    results = imap(
        functools.partial(_call, fn, args.jsonl),
        _lines(args.files, where),
        num_workers=args.jobs,
        progress=args.progress,
    )
    chunk: list[str] = []
    held = 0

    def write_out() -> None:
        nonlocal held
        if chunk:
            out.write("".join(chunk))
            chunk.clear()
            held = 0
        out.flush()

    try:
        with results:
            while True:
                try:
                    try:
                        text = results.next_in_hand()
                    except NothingInHand:
                        write_out()  # (before waiting: what is done shows now)
                        text = next(results)
                except (StopIteration, StopAsyncIteration):
                    break
                except InputError as e:
                    write_out()
                    print(f"parallel-queue: error: {e}", file=sys.stderr)
                    return 2
                except Exception as e:  # the line's own failure
                    name, number = where.popleft()
                    failed += 1
                    write_out()
                    print(f"parallel-queue: {name}:{number}: {type(e).__name__}: {e}", file=sys.stderr)
                    if not args.keep_going:
                        return 1
                    continue
                where.popleft()
                chunk.append(text)
                chunk.append("\n")
                held += len(text) + 1
                if held >= CHUNK:
                    write_out()
            write_out()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 1 if failed else 0
