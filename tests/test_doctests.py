"""The examples in the docstrings run, as written (with the fixture that
checks no process is left behind, and the tests' timeout)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import parallel_queue

MODULES = sorted(
    name
    for _, name, _ in pkgutil.iter_modules(parallel_queue.__path__, "parallel_queue.")
    if not name.endswith("__main__")
)


def with_examples() -> list[str]:
    found = []
    for name in ["parallel_queue", *MODULES]:
        tests = doctest.DocTestFinder().find(importlib.import_module(name))
        if any(t.examples for t in tests):
            found.append(name)
    return found


@pytest.mark.parametrize("name", with_examples())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_the_public_objects_have_examples():
    found = with_examples()
    for module in ("_queue", "_imap", "_packet_id", "_stats"):
        assert f"parallel_queue.{module}" in found
