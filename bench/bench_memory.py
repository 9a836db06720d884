"""Peak memory of one training step with and without gradient checkpointing (CPU, fp32, 256x128).

Each configuration runs in a fresh subprocess so that the high-water mark is its own: the child builds
the backbone, an SGD optimiser and the batch, runs one warm-up step (so the gradients exist), records
its resident memory, runs one more step and reports ``ru_maxrss - resident before the step``: the
memory the step itself needed on top of weights, gradients and inputs (activations, saved tensors,
workspaces). The output of both runs is compared too: checkpointing must not change it.

    python bench/bench_memory.py --batch 32 --strides 16

Target: with checkpointing <= 0.5x the peak without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("bench_memory")
ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(family: str, stride: int, batch: int, ckpt: bool, threads: int) -> None:
    """Run in the subprocess: one warm-up and one measured training step; print a JSON line."""
    import torch

    from reid_ms import ClipVisual, VitTrans

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = (VitTrans(stride_size=stride, drop_path_rate=0.0) if family == "vit"
             else ClipVisual(stride_size=stride)).train()
    model.set_grad_checkpointing(ckpt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, 256, 128, generator=torch.Generator().manual_seed(1))

    def step() -> float:
        out = model(images)
        loss = out.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the step's own memory
        return float(loss)

    step()
    before = rss_bytes()
    loss = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"family": family, "stride": stride, "batch": batch, "checkpointing": ckpt,
                      "resident_before_mb": before / 2**20, "step_peak_mb": (peak - before) / 2**20,
                      "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["vit", "clip"], choices=["vit", "clip"])
    parser.add_argument("--strides", nargs="+", type=int, default=[16])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("FAMILY", "STRIDE", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fam, stride, batch, ckpt = args.child
        child(fam, int(stride), int(batch), ckpt == "1", args.threads)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for fam in args.families:
        for stride in args.strides:
            pair = {}
            for ckpt in (False, True):
                cmd = [sys.executable, __file__, "--threads", str(args.threads),
                       "--child", fam, str(stride), str(args.batch), "1" if ckpt else "0"]
                pair[ckpt] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            ratio = pair[True]["step_peak_mb"] / pair[False]["step_peak_mb"]
            same = pair[True]["loss"] == pair[False]["loss"]
            rows.append({"without": pair[False], "with": pair[True], "ratio": ratio, "same_loss": same})
            logger.info("%s s%d b%d: step peak %.0f MB without, %.0f MB with checkpointing (%.2fx); "
                        "resident before %.0f / %.0f MB; losses %s", fam, stride, args.batch,
                        pair[False]["step_peak_mb"], pair[True]["step_peak_mb"], ratio,
                        pair[False]["resident_before_mb"], pair[True]["resident_before_mb"],
                        "equal" if same else f"{pair[False]['loss']} vs {pair[True]['loss']}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
