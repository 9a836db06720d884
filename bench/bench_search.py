"""Peak memory and time of reid_ms.search.topk on a large gallery (default 20,000 queries x 200,000 gallery, 768-d).

    python bench/bench_search.py [--queries 20000] [--gallery 200000] [--dim 768] [--k 10] [--no-faiss]

The features alone take (Q + G) x D x 4 bytes (0.67 GB at the default size); the full Q x G float32 distance
matrix would take 16 GB. The peak resident memory of the process (``ru_maxrss``, torch's own footprint
included) is printed next to both, and with faiss-cpu installed the exact FAISS index is timed on the same
features and its top-k compared with topk's. Results go to bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from reid_ms.search import FaissIndex, topk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--gallery", type=int, default=200000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-faiss", action="store_true", help="time topk only")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    gf = torch.randn(args.gallery, args.dim, generator=g)
    gf /= gf.norm(dim=1, keepdim=True)                      # in place: one gallery-sized array in memory
    qf = torch.randn(args.queries, args.dim, generator=g)
    qf /= qf.norm(dim=1, keepdim=True)
    features_gb = (qf.numel() + gf.numel()) * 4 / 1e9
    start = time.perf_counter()
    d, i = topk(qf, gf, k=args.k)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    result = {"queries": args.queries, "gallery": args.gallery, "dim": args.dim, "k": args.k,
              "threads": torch.get_num_threads(), "topk_seconds": seconds, "peak_rss_gb": peak_gb,
              "features_gb": features_gb, "full_matrix_gb": args.queries * args.gallery * 4 / 1e9}
    print(f"topk: {args.queries} x {args.gallery} x {args.dim}, k={args.k}: {seconds:.1f} s, peak RSS {peak_gb:.2f} GB "
          f"(features {features_gb:.2f} GB; the full distance matrix would be {result['full_matrix_gb']:.1f} GB)")
    try:
        if args.no_faiss:
            raise RuntimeError("--no-faiss")
        start = time.perf_counter()
        fd, fi = FaissIndex(gf).search(qf, k=args.k)
        result["faiss_seconds"] = time.perf_counter() - start
        result["faiss_same_topk_share"] = float((fi == i).all(dim=1).float().mean())
        print(f"faiss IndexFlatIP: {result['faiss_seconds']:.1f} s; same top-{args.k} as topk for "
              f"{100 * result['faiss_same_topk_share']:.2f} % of the queries")
    except Exception as exc:  # noqa: BLE001  (faiss is optional: report why it did not run)
        print(f"faiss not run: {exc}")
    out = Path(__file__).resolve().parent / "results" / "search.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
