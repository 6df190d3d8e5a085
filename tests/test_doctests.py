"""The examples in the docstrings and in the documentation's pages (docs/)
run, as written (with the fixture that checks no process is left behind,
and the tests' timeout)."""

from __future__ import annotations

import doctest
import glob
import importlib
import os
import pkgutil

import pytest
from conftest import ROOT

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


DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(
    os.path.relpath(path, DOCS)
    for path in glob.glob(os.path.join(DOCS, "**", "*.rst"), recursive=True)
    if not os.path.relpath(path, DOCS).startswith("_build")
)


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_examples(page):
    """Every >>> example of a page, in order, in one namespace (as a reader
    would type them), compared with ELLIPSIS."""
    path = os.path.join(DOCS, page)
    with open(path, encoding="utf-8") as f:
        examples = doctest.DocTestParser().get_examples(f.read())
    result = doctest.testfile(
        path, module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False, encoding="utf-8"
    )
    assert result.failed == 0, result
    if examples:
        assert result.attempted > 0, result


def test_the_tutorials_have_examples():
    """The pages are found (a run that found none would pass without them),
    and each tutorial but the command line's has examples that run."""
    assert "index.rst" in PAGES
    tutorials = [p for p in PAGES if p.startswith("tutorial" + os.sep)]
    assert len(tutorials) >= 6, PAGES
    for page in tutorials:
        if page.endswith("cli.rst"):
            continue
        with open(os.path.join(DOCS, page), encoding="utf-8") as f:
            assert doctest.DocTestParser().get_examples(f.read()), page
