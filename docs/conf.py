"""Sphinx configuration for parallel_queue's documentation.

Build it with ``tox -e docs``, or ``sphinx-build -W --keep-going -b html docs
docs/_build/html`` with the ``docs`` extra installed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# The package documented is the one in this tree, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import parallel_queue  # noqa: E402

project = "parallel_queue"
author = "parallel_queue developers"
copyright = "parallel_queue developers"
version = release = parallel_queue.__version__

extensions = ["sphinx.ext.autodoc"]

# The reference documents every public object under the package's own name
# (parallel_queue.ParallelQueue), not the private module that defines it.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
add_module_names = False
# A long signature (the queues' options) shows one parameter a line.
python_maximum_signature_line_length = 88

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"parallel_queue {release}"
html_show_sourcelink = True


def _public_titles(app: Any, doctree: Any, docname: str) -> None:
    """Autodoc registers each public object under its defining module's name
    too (``parallel_queue._maps.IMapIterator``, the target of a type hint or a
    base class); a link to it shows the public name, also on hover."""
    from docutils import nodes

    for ref in doctree.findall(nodes.reference):
        title = ref.get("reftitle", "")
        if title.startswith("parallel_queue._"):
            name = title.rsplit(".", 1)[-1]
            if name in parallel_queue.__all__:
                ref["reftitle"] = f"parallel_queue.{name}"


def _no_constructor(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: Any, return_annotation: Any
) -> Any:
    """The map iterators are made by ``imap`` and ``aimap``, never by the
    caller: their constructors' internal arguments are not shown."""
    if what == "class" and name in ("parallel_queue.IMapIterator", "parallel_queue.AsyncIMapIterator"):
        return "", None
    return None


def setup(app: Any) -> None:
    app.connect("autodoc-process-signature", _no_constructor)
    app.connect("doctree-resolved", _public_titles)
