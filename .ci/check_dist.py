"""Check the built sdist and wheel: the files each must carry.

The sdist must run its own tests (conftest.py and the pytest settings in
setup.cfg, and the doctests of the documentation's pages), build the
documentation site (docs/conf.py, its pages and charts, no local build of
it) and carry the license; the wheel, the package with its py.typed marker
and the license.  Usage: python .ci/check_dist.py DIST_DIR
"""

from __future__ import annotations

import glob
import os
import sys
import tarfile
import zipfile


def main(dist: str) -> int:
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = {
        "LICENSE",
        "README.rst",
        "setup.cfg",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_payloads.py",
        "parallel_queue/py.typed",
        "parallel_queue/__init__.py",
        "tests/test_doctests.py",
        "docs/conf.py",
        "docs/index.rst",
        "docs/api.rst",
        "docs/benchmarks.png",
        "docs/payloads.png",
    } - names
    if any(n.startswith("docs/_build/") for n in names):
        missing.add("sdist: no docs/_build (a local build of the site)")
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
        metadata = next(z.read(n).decode() for n in wnames if n.endswith(".dist-info/METADATA"))
    missing |= {n for n in ("parallel_queue/py.typed", "parallel_queue/__init__.py") if n not in wnames}
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames):
        missing.add("wheel: licenses/LICENSE")
    if "License-Expression: MIT" not in metadata:
        missing.add("wheel METADATA: License-Expression: MIT")
    if missing:
        print("missing from the distributions:", ", ".join(sorted(missing)))
        return 1
    print(f"distributions OK: {os.path.basename(sdist)}, {os.path.basename(wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
