"""What an installed wheel relies on: the shipped sample set, py.typed, and the documented calls as typed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import reid_ms
from reid_ms.data import parse_market_name

ROOT = Path(__file__).resolve().parents[1]


def test_sample_data_is_inside_the_package():
    folders = reid_ms.sample_data()
    package = Path(reid_ms.__file__).resolve().parent
    assert folders.root.parent == package and folders.query == folders.root / "query"
    query, gallery = sorted(folders.query.glob("*.jpg")), sorted(folders.gallery.glob("*.jpg"))
    assert len(query) == 7 and len(gallery) == 30
    # every query person is in the gallery, which holds junk (-1) and distractors (0) besides
    q_pids = {parse_market_name(p)[0] for p in query}
    g_pids = {parse_market_name(p)[0] for p in gallery}
    assert q_pids < g_pids and {-1, 0} < g_pids


def test_package_data_and_sdist_rules_name_what_ships():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject and '"sample_set/query/*.jpg"' in pyproject
    assert (Path(reid_ms.__file__).parent / "py.typed").is_file()
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    assert "graft tests" in manifest and "graft src/reid_ms/sample_set" in manifest


def test_the_typed_usage_script_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "typecheck_usage.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "every documented call ran" in proc.stdout


def test_notebooks_are_committed_run_without_errors():
    """CI runs them (examples/run_notebooks.py); what is committed must show a clean top-to-bottom run."""
    import nbformat

    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "examples" / "run_notebooks.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    names = {p.name for p in runner.notebooks()}
    assert {"quickstart.ipynb", "neck_width.ipynb", "training.ipynb"} <= names
    for path in runner.notebooks():
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: not run in order"
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
        assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.data
                   for c in code for o in c.outputs), f"{path.name} shows no figure"
        assert nb.metadata.kernelspec.name == "python3"
