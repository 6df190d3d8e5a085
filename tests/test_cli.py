"""The command line, run as a user would: a child interpreter, stdin, files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import parallel_queue

MODULE = """
import os, time

def upper(line):
    return line.upper()

def double(x):
    if x == 7:
        raise ValueError("seven is not allowed")
    return {"n": x, "double": 2 * x}

def slow_reverse(line):
    time.sleep(0.001 * (hash(line) % 5))
    return line[::-1]

class Tools:
    @staticmethod
    def length(line):
        return len(line)

NOT_CALLABLE = 3
"""


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "clitools.py").write_text(MODULE)
    return tmp_path


def cli(workdir, *args, stdin="", timeout=60):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "parallel_queue", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=timeout,
    )


def test_lines_in_results_out_in_order(workdir):
    lines = [f"line {i} " + "x" * (i % 13) for i in range(2000)]
    r = cli(workdir, "-j", "2", "clitools:slow_reverse", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [s[::-1] for s in lines]
    assert r.stderr == ""


def test_line_endings_and_dotted_function(workdir):
    r = cli(workdir, "clitools:Tools.length", stdin="ab\r\nabc\nlast-without-newline")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2\n3\n20\n"


def test_files_in_order_and_dash_for_stdin(workdir):
    (workdir / "a.txt").write_text("a1\na2\n")
    (workdir / "b.txt").write_text("b1\n")
    r = cli(workdir, "clitools:upper", "a.txt", "-", "b.txt", stdin="s1\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["A1", "A2", "S1", "B1"]


def test_jsonl(workdir):
    r = cli(workdir, "--jsonl", "clitools:double", stdin="1\n2\n3\n")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [{"n": i, "double": 2 * i} for i in (1, 2, 3)]


def test_failure_stops_after_writing_everything_before_it(workdir):
    stdin = "\n".join(str(i) for i in range(1, 11)) + "\n"
    r = cli(workdir, "--jsonl", "clitools:double", stdin=stdin)
    assert r.returncode == 1
    assert [json.loads(x)["n"] for x in r.stdout.splitlines()] == [1, 2, 3, 4, 5, 6]
    assert r.stderr.strip() == "parallel-queue: <stdin>:7: ValueError: seven is not allowed"


def test_keep_going_reports_and_goes_on(workdir):
    (workdir / "in.jsonl").write_text("\n".join(str(i) for i in range(1, 11)) + "\n")
    r = cli(workdir, "--jsonl", "--keep-going", "clitools:double", "in.jsonl")
    assert r.returncode == 1  # something failed, even though we went on
    assert [json.loads(x)["n"] for x in r.stdout.splitlines()] == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert r.stderr.strip() == "parallel-queue: in.jsonl:7: ValueError: seven is not allowed"


def test_bad_json_is_that_line_failing(workdir):
    r = cli(workdir, "--jsonl", "--keep-going", "clitools:double", stdin="1\nnot json\n3\n")
    assert r.returncode == 1
    assert len(r.stdout.splitlines()) == 2
    assert "<stdin>:2: JSONDecodeError" in r.stderr


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuchmodule:f", "cannot import module 'nosuchmodule'"),
        ("clitools:nothere", "module 'clitools' has no attribute 'nothere'"),
        ("clitools", "expected MODULE:FUNCTION"),
        ("clitools:NOT_CALLABLE", "is a int, not a function"),
    ],
)
def test_bad_function_is_one_line_exit_2(workdir, spec, message):
    r = cli(workdir, spec, stdin="x\n")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file_is_exit_2(workdir):
    r = cli(workdir, "clitools:upper", "nope.txt")
    assert r.returncode == 2 and "no such file: nope.txt" in r.stderr


@pytest.mark.parametrize("where", ["file", "stdin"])
def test_a_line_that_is_not_utf8_ends_the_input_after_every_line_before_it(workdir, where):
    """Undecodable bytes far into the input: every line before them comes
    out, then one line names the bad line by its own number (no traceback);
    a file and stdin behave the same.  Before, a file lost the lines decoded
    in the same chunk as the bad byte and named the last line handed out
    (3,498 lines out, "after line 3498", for a bad line 5001), and stdin
    took the bytes silently."""
    lines = [f"line {i}" for i in range(20000)]
    data = ("\n".join(lines) + "\n").encode() + b"ok \xc3\xa9\xff\xfe\n" + b"after\n"
    if where == "file":
        (workdir / "in.txt").write_bytes(data)
        r = subprocess.run(
            [sys.executable, "-m", "parallel_queue", "clitools:upper", "in.txt"],
            capture_output=True,
            cwd=workdir,
            env=dict(os.environ, PYTHONPATH=ROOT),
            timeout=60,
        )
        label = "in.txt"
    else:
        r = subprocess.run(
            [sys.executable, "-m", "parallel_queue", "clitools:upper"],
            input=data,
            capture_output=True,
            cwd=workdir,
            env=dict(os.environ, PYTHONPATH=ROOT),
            timeout=60,
        )
        label = "<stdin>"
    assert r.returncode == 2
    assert r.stdout.decode().splitlines() == [x.upper() for x in lines]
    assert r.stderr.decode() == f"parallel-queue: error: {label}:20001: not UTF-8 (byte 0xff at column 5)\n"


def test_usage_version_and_a_directory(workdir):
    """--version; FILE is optional (argparse listed it as required when the
    function was missing); a directory is said to be one."""
    r = cli(workdir, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"parallel-queue {parallel_queue.__version__}"
    r = cli(workdir)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "parallel-queue: error: the following arguments are required: MODULE:FUNCTION"
    (workdir / "adir").mkdir()
    r = cli(workdir, "clitools:upper", "adir")
    assert r.returncode == 2 and r.stderr == "parallel-queue: error: adir is a directory, not a file\n"


def test_each_result_comes_out_while_the_input_waits(workdir):
    """Output goes in chunks, but never waits for more input: a producer that
    writes its next line only once it has read the previous result (a
    conversation) goes through to the end; were results held back for a
    chunk, this would wait for ever (the test's timeout)."""
    tool = subprocess.Popen(
        [sys.executable, "-m", "parallel_queue", "-j", "2", "clitools:upper"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
        text=True,
    )
    try:
        for i in range(20):
            tool.stdin.write(f"word {i}\n")
            tool.stdin.flush()
            assert tool.stdout.readline() == f"WORD {i}\n"
        tool.stdin.close()
        assert tool.stdout.read() == ""
        assert tool.wait(timeout=60) == 0
    finally:
        tool.kill()
        tool.wait()
        tool.stdout.close()


def test_progress_bar(workdir):
    r = cli(workdir, "--progress", "clitools:upper", stdin="a\nb\nc\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "A\nB\nC\n"
    assert "3task" in r.stderr  # counted: a stream has no total


def test_reader_going_away_is_quiet(workdir):
    env = dict(os.environ, PYTHONPATH=ROOT)
    producer = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfor i in range(200000): sys.stdout.write(f'{i}\\n')"],
        stdout=subprocess.PIPE,
    )
    tool = subprocess.Popen(
        [sys.executable, "-m", "parallel_queue", "clitools:upper"],
        stdin=producer.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
    )
    assert producer.stdout is not None and tool.stdout is not None and tool.stderr is not None
    producer.stdout.close()
    first = tool.stdout.readline()
    tool.stdout.close()  # like `| head -1`
    err = tool.stderr.read()
    tool.wait(60)
    producer.kill()
    producer.wait()
    assert first == b"0\n"
    assert b"Traceback" not in err
    assert tool.returncode != 0
