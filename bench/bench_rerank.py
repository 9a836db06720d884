"""Re-ranking time and peak memory: reid_ms.metrics.re_ranking against TransReID's algorithm as it runs it.

    python bench/bench_rerank.py                     # sizes up to Market-1501's 3,368 x 15,913
    python bench/bench_rerank.py --ref-max 3000      # largest query count the reference runs at

Every run is a fresh process (``--one``) so its peak resident memory (``ru_maxrss``) is its own. The
features are synthetic re-ID-like embeddings: 768-d, L2-normalised, about 20 images per identity around
identity centres, query:gallery 1:4.7 as in Market-1501; TransReID's evaluation setting k1=50, k2=15,
lambda=0.3. The reference (``bench/reference_rerank.py``: TransReID's dense N x N arrays, argsort and Python
loops) is run at the sizes it finishes in reasonable time; at Market-1501's size its time is extrapolated by
``a N + b N^2`` fitted to its runs (per-row loops plus N x N work) and its memory by ``c + d N^2`` (its
arrays are N x N), and the lines printed say so. Results go to bench/results/rerank.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MARKET = (3368, 15913)
SETTING = dict(k1=50, k2=15, lambda_value=0.3)


def features(num_q: int, num_g: int, dim: int = 768, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = num_q + num_g
    centres = torch.randn(max(1, n // 20), dim, generator=g)
    ids = torch.randint(0, centres.shape[0], (n,), generator=g)
    x = torch.nn.functional.normalize(centres[ids] + 1.2 * torch.randn(n, dim, generator=g), dim=1)
    return x[:num_q], x[num_q:]


def run_one(which: str, num_q: int, num_g: int) -> dict:
    qf, gf = features(num_q, num_g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if which == "reid_ms":
        from reid_ms.metrics import re_ranking
        dist = re_ranking(qf, gf, **SETTING)
    else:
        sys.path.insert(0, str(HERE))
        from reference_rerank import reference_re_ranking
        dist = reference_re_ranking(qf, gf, **SETTING)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"which": which, "num_q": num_q, "num_g": num_g, "seconds": seconds, "peak_mb": peak / 1024,
            "added_mb": (peak - base) / 1024, "shape": list(np.shape(dist))}


def spawn(which: str, num_q: int, num_g: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", which, str(num_q), str(num_g)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3, metavar=("WHICH", "Q", "G"))
    parser.add_argument("--ref-max", type=int, default=2000, help="largest query count the reference runs at")
    parser.add_argument("--reference-from", type=Path,
                        help="reuse the reference's runs from an earlier rerank.json (same sizes) instead of rerunning")
    parser.add_argument("--sizes", type=int, nargs="+", default=[600, 1200, 2000, 3368],
                        help="query counts; gallery = 4.72 x queries (Market-1501's ratio)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = []
    earlier = {}
    if args.reference_from:
        earlier = {r["num_q"]: r["reference"] for r in json.loads(args.reference_from.read_text())["rows"] if r["reference"]}
    for q in args.sizes:
        g = MARKET[1] if q == MARKET[0] else round(q * MARKET[1] / MARKET[0])
        ours = spawn("reid_ms", q, g)
        ref = earlier.get(q) or (spawn("reference", q, g) if q <= args.ref_max else None)
        rows.append({"num_q": q, "num_g": g, "reid_ms": ours, "reference": ref})
        line = f"Q {q:5d} G {g:6d}: reid_ms {ours['seconds']:8.2f} s {ours['peak_mb']:8.0f} MB"
        if ref:
            line += (f" | reference {ref['seconds']:8.2f} s {ref['peak_mb']:8.0f} MB | time {ours['seconds'] / ref['seconds']:.3f}x"
                     f" memory {ours['peak_mb'] / ref['peak_mb']:.3f}x")
        print(line, flush=True)
    measured = [r for r in rows if r["reference"]]
    if len(measured) >= 2:
        # TransReID's cost has a per-row part (its Python loops) and an N x N part (argsort, the column scans of
        # V, the dense arrays): fit t = a N + b N^2 and m = c + d N^2 to the sizes it ran at
        sizes = np.array([x["num_q"] + x["num_g"] for x in measured], dtype=float)
        secs = np.array([x["reference"]["seconds"] for x in measured])
        mems = np.array([x["reference"]["peak_mb"] for x in measured])
        t_coef = np.linalg.lstsq(np.stack([sizes, sizes ** 2], 1), secs, rcond=None)[0]
        m_coef = np.linalg.lstsq(np.stack([np.ones_like(sizes), sizes ** 2], 1), mems, rcond=None)[0]
        for r in rows:
            if r["reference"]:
                continue
            n = r["num_q"] + r["num_g"]
            t_est = float(t_coef[0] * n + t_coef[1] * n * n)
            m_est = float(m_coef[0] + m_coef[1] * n * n)
            r["reference_extrapolated"] = {"seconds": t_est, "peak_mb": m_est, "fit_from_n": sizes.tolist()}
            print(f"Q {r['num_q']:5d} G {r['num_g']:6d}: reference EXTRAPOLATED (t = aN + bN^2, m = c + dN^2 from "
                  f"N = {', '.join(str(int(v)) for v in sizes)}) {t_est:8.1f} s {m_est:8.0f} MB | time "
                  f"{r['reid_ms']['seconds'] / t_est:.3f}x memory {r['reid_ms']['peak_mb'] / m_est:.3f}x", flush=True)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "rerank.json").write_text(json.dumps({"setting": SETTING, "threads": torch.get_num_threads(),
                                                     "rows": rows}, indent=1))
    lines = ["| Q x G | reid_ms s | reid_ms peak MB | reference s | reference peak MB | time ratio | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["reference"] or r.get("reference_extrapolated")
        tag = "" if r["reference"] else " (extrapolated)"
        if ref is None:
            continue
        lines.append(f"| {r['num_q']} x {r['num_g']} | {r['reid_ms']['seconds']:.2f} | {r['reid_ms']['peak_mb']:.0f} | "
                     f"{ref['seconds']:.1f}{tag} | {ref['peak_mb']:.0f}{tag} | {r['reid_ms']['seconds'] / ref['seconds']:.3f} | "
                     f"{r['reid_ms']['peak_mb'] / ref['peak_mb']:.3f} |")
    (results / "rerank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
