"""Run the notebooks of examples/ top to bottom, each in a fresh kernel, as CI does.

    python examples/run_notebooks.py                    # every notebook; fails on an error or a slow one
    python examples/run_notebooks.py --write            # and save the outputs into the notebooks
    python examples/run_notebooks.py quickstart.ipynb   # one

Each runs in an empty temporary folder (what it writes is thrown away) with the ``python3`` kernel, i.e.
the interpreter this script runs under; a notebook over ``--budget`` seconds fails, so the notebooks
stay quick enough to run on a laptop's CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def notebooks() -> list[Path]:
    """The notebooks of examples/, sorted by name."""
    return sorted(HERE.glob("*.ipynb"))


def run(path: Path, budget: float, write: bool) -> float:
    """Execute ``path`` in a fresh kernel; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="reid-ms-nb-") as tmp:
        client = NotebookClient(nb, timeout=int(budget), kernel_name="python3",
                                resources={"metadata": {"path": tmp}})
        start = time.perf_counter()
        client.execute()
        took = time.perf_counter() - start
    if took > budget:
        raise RuntimeError(f"{path.name} took {took:.0f} s, over its budget of {budget:.0f} s")
    if write:
        nbformat.write(nb, path)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names in examples/ (default: all)")
    parser.add_argument("--write", action="store_true", help="save the outputs into the notebooks")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds a notebook may take")
    args = parser.parse_args(argv)
    paths = [HERE / n for n in args.names] if args.names else notebooks()
    for path in paths:
        took = run(path, args.budget, args.write)
        print(f"{path.name}: ran in {took:.1f} s{' (outputs written)' if args.write else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
