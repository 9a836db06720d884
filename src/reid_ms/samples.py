"""The small synthetic re-ID set shipped inside the package, so every documented command runs after install."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from reid_ms.errors import ConfigError

_ROOT = Path(__file__).resolve().parent / "sample_set"


class SampleData(NamedTuple):
    """Folders of the sample set: ``root`` holds ``query`` (7 images) and ``gallery`` (30 images)."""

    root: Path
    query: Path
    gallery: Path


def sample_data() -> SampleData:
    """Paths of the sample set installed with reid_ms: 37 synthetic 128x64 JPEG crops, Market-1501 naming.

    File names follow Market-1501 (``0001_c2s1_000151_01.jpg``: person 1, camera 2); the gallery holds
    every query person under another camera, two junk images (person ``-1``) and three distractors
    (person ``0``). It shows that a pipeline runs end to end (``reid-ms extract``, ``evaluate``), not how
    good a model is::

        folders = reid_ms.sample_data()
        fx(sorted(folders.query.glob("*.jpg")))
    """
    root = _ROOT
    missing = [p for p in (root / "query", root / "gallery") if not p.is_dir()]
    if missing:
        raise ConfigError(f"the sample set is missing from this installation ({', '.join(map(str, missing))}); "
                          f"reinstall reid-ms from a wheel or a source checkout")
    return SampleData(root, root / "query", root / "gallery")
