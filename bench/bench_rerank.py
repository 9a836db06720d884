"""Re-ranking time and peak memory: reid_ms.metrics.re_ranking against TransReID's algorithm as it runs it.

    python bench/bench_rerank.py                     # sizes up to Market-1501's 3,368 x 15,913
    python bench/bench_rerank.py --ref-max 3000      # largest query count the reference runs at

Every run is a fresh process (``--one``) so its peak resident memory (``ru_maxrss``) is its own. The
features are synthetic re-ID-like embeddings: 768-d, L2-normalised, about 20 images per identity around
identity centres, query:gallery 1:4.7 as in Market-1501; TransReID's evaluation setting k1=50, k2=15,
lambda=0.3. The reference (``bench/reference_rerank.py``: TransReID's dense N x N arrays, argsort and Python
loops) is run at the sizes it finishes in reasonable time; at Market-1501's size its time is extrapolated by
a power law fitted to its two largest runs and its memory by N^2 (its arrays are N x N), and the ratios
printed say so. Results go to bench/results/rerank.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
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
    parser.add_argument("--ref-max", type=int, default=1200, help="largest query count the reference runs at")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 600, 1200, 3368],
                        help="query counts; gallery = 4.72 x queries (Market-1501's ratio)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = []
    for q in args.sizes:
        g = MARKET[1] if q == MARKET[0] else round(q * MARKET[1] / MARKET[0])
        ours = spawn("reid_ms", q, g)
        ref = spawn("reference", q, g) if q <= args.ref_max else None
        rows.append({"num_q": q, "num_g": g, "reid_ms": ours, "reference": ref})
        line = f"Q {q:5d} G {g:6d}: reid_ms {ours['seconds']:8.2f} s {ours['peak_mb']:8.0f} MB"
        if ref:
            line += (f" | reference {ref['seconds']:8.2f} s {ref['peak_mb']:8.0f} MB | time {ours['seconds'] / ref['seconds']:.3f}x"
                     f" memory {ours['peak_mb'] / ref['peak_mb']:.3f}x")
        print(line, flush=True)
    measured = [r for r in rows if r["reference"]]
    for r in rows:
        if r["reference"] or len(measured) < 2:
            continue
        (n1, t1, m1), (n2, t2, m2) = [(x["num_q"] + x["num_g"], x["reference"]["seconds"], x["reference"]["peak_mb"])
                                      for x in measured[-2:]]
        n = r["num_q"] + r["num_g"]
        power = math.log(t2 / t1) / math.log(n2 / n1)
        t_est = t2 * (n / n2) ** power
        m_est = m2 * (n / n2) ** 2
        r["reference_extrapolated"] = {"seconds": t_est, "peak_mb": m_est, "time_power": power}
        print(f"Q {r['num_q']:5d} G {r['num_g']:6d}: reference EXTRAPOLATED (time ~ N^{power:.2f} from N={n1}, {n2}; "
              f"memory ~ N^2) {t_est:8.1f} s {m_est:8.0f} MB | time {r['reid_ms']['seconds'] / t_est:.3f}x memory "
              f"{r['reid_ms']['peak_mb'] / m_est:.3f}x", flush=True)
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
