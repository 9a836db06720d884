"""Memory and time of refusing hostile checkpoint files (stride-0 views, zip bombs, deep nesting, odd tensors).

The files are those of ``tests/test_hostile_files.py``: a few KiB to 260 KiB on disk, each declaring
gigabytes or deep nesting. They are loaded in one fresh process whose address space may grow by 2 GiB;
per case it reports the outcome, the seconds taken and how far the peak resident memory grew, next to
the size of the model loaded into (the bound is about twice that, beyond the file's own bytes).

    python bench/bench_hostile_files.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _helpers_hostile import CLIP, MIB, VIT, hostile_cases, probe  # noqa: E402


def main() -> None:
    import reid_ms

    sizes = {kind: sum(t.numel() * t.element_size() for t in model.state_dict().values())
             for kind, model in (("vit", reid_ms.VitTrans(**VIT)), ("clip", reid_ms.ClipVisual(**CLIP)))}
    with tempfile.TemporaryDirectory() as tmp:
        cases = hostile_cases(Path(tmp))
        results = probe([(target, str(path)) for target, path, _ in cases.values()])
        print(f"| case | file | outcome | seconds | peak memory growth | model |")
        print("|---|---|---|---|---|---|")
        for (name, (target, path, _)), r in zip(cases.items(), results):
            kind = "vit" if target.startswith(("vit", "build")) else "clip"
            print(f"| {name} | {path.stat().st_size / 1024:.1f} KiB | {r['outcome']} | {r['seconds']:.2f} | "
                  f"{r['grown'] / MIB:.1f} MiB | {sizes[kind] / MIB:.2f} MiB |")
        print(f"\nworst: {max(r['seconds'] for r in results):.2f} s, "
              f"{max(r['grown'] for r in results) / MIB:.1f} MiB peak growth")


if __name__ == "__main__":
    main()
