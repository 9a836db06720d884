"""Backbone speed against timm, open_clip and the research code's explicit-attention ViT (CPU).

Every configuration (family, image size, stride, batch, dtype, pass, eager/compiled) is one group: the
reid_ms backbone, its peers that can run the configuration, and an fp32 ``2048 x 2048`` matmul (the
machine's peak *in those same rounds*) are timed in alternation, the order flipped every round; each
result is the median over rounds. A shared, noisy machine slows all contestants of a round alike, so
the ratios and the shares of the peak hold even when the absolute numbers do not.

    python bench/bench_backbones.py                 # --quick: the headline configurations, a few minutes
    python bench/bench_backbones.py --full          # the whole matrix (hours on 2 cores)
    python bench/bench_backbones.py --families vit --strides 12 --batches 8 64 --passes forward
    python bench/bench_backbones.py --baseline 10b6c5c  # adds an earlier release (git revision) as a contestant

Peers: timm's ``VisionTransformer`` (stride 16 only: its patch embedding has stride = patch),
open_clip's visual ``VisionTransformer`` (built at 256x128, i.e. with its position table at that grid,
QuickGELU as OpenAI's weights need; stride 16 only) and ``bench/reference_vit.ExplicitViT`` (TransReID's
explicit softmax attention; every stride). FLOPs per image come from :func:`reid_ms.flops.count_flops`
for each model separately (``ClipVisual`` projects every token, open_clip only the pooled one).
Writes ``bench/results/backbones.json``, ``bench/results/backbones.md`` and ``docs/img/performance.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_release, interleaved  # noqa: E402
from reference_vit import ExplicitViT  # noqa: E402

from reid_ms import ClipVisual, VitTrans, optimize_for_inference  # noqa: E402
from reid_ms.flops import count_flops  # noqa: E402

logger = logging.getLogger("bench_backbones")
ROOT = Path(__file__).resolve().parent.parent
PEAK_N = 2048
# an earlier release (bench --baseline REV): its module, and its contestant name
BASELINE: dict[str, object] = {}


@dataclass(frozen=True)
class Config:
    family: str  # "vit" (VitTrans) or "clip" (ClipVisual)
    img: tuple[int, int]
    stride: int
    batch: int
    dtype: str  # "fp32" or "bf16" (autocast)
    pass_: str  # "forward" (inference mode) or "train" (forward, backward, SGD step)
    compiled: bool

    @property
    def label(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        return (f"{self.family} {self.img[0]}x{self.img[1]} s{self.stride} b{self.batch} {self.dtype} "
                f"{self.pass_} {mode}")


def build(name: str, cfg: Config) -> torch.nn.Module:
    """One contestant with random weights, ViT-B/16 sized; dropout and drop-path off so all do equal work."""
    torch.manual_seed(0)
    if name == "reid_ms" and cfg.family == "vit":
        return VitTrans(img_size=cfg.img, stride_size=cfg.stride, drop_path_rate=0.0)
    if name == "reid_ms":
        return ClipVisual(img_size=cfg.img, stride_size=cfg.stride)
    if name == "reid_ms frozen":  # the explicit inference copy with packed weights
        return optimize_for_inference(build("reid_ms", cfg).eval())
    if name == BASELINE.get("name"):  # the earlier release, on the same weights
        current = build("reid_ms", cfg)
        release = BASELINE["module"]
        cls = release.VitTrans if cfg.family == "vit" else release.ClipVisual
        kwargs = {"drop_path_rate": 0.0} if cfg.family == "vit" else {}
        model = cls(img_size=cfg.img, stride_size=cfg.stride, **kwargs)
        model.load_state_dict(current.state_dict())
        return model
    if name == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=cfg.img, patch_size=16, num_classes=0, global_pool="")
    if name == "open_clip":
        from open_clip.transformer import QuickGELU, VisionTransformer

        return VisionTransformer(image_size=cfg.img, patch_size=16, width=768, layers=12, heads=12,
                                 mlp_ratio=4.0, output_dim=512, act_layer=QuickGELU)
    if name == "explicit":
        return ExplicitViT(img_size=cfg.img, stride_size=cfg.stride)
    raise ValueError(name)


def contestants(cfg: Config, full: bool) -> list[str]:
    """Who runs this configuration: reid_ms always (and its frozen inference copy in forward passes), the peer
    library at stride 16, the explicit ViT."""
    names = ["reid_ms"] + (["reid_ms frozen"] if cfg.pass_ == "forward" and not cfg.compiled else [])
    if "name" in BASELINE:
        names.append(BASELINE["name"])
    if cfg.stride == 16:
        names.append("timm" if cfg.family == "vit" else "open_clip")
    if cfg.family == "vit" or cfg.stride != 16:
        names.append("explicit")
    if cfg.compiled and not full:
        names = ["reid_ms"]  # compiling the peers too takes minutes each on 2 cores
    return names


def forward_of(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # timm's forward pools; its features are the comparable output (every token after the final norm)
    return model.forward_features if name == "timm" else model


def make_step(cfg: Config, model: torch.nn.Module, fwd: Callable, images: torch.Tensor) -> Callable[[], object]:
    """A zero-argument call that runs one forward (inference mode) or one training step."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.dtype == "bf16" \
        else contextlib.nullcontext
    if cfg.pass_ == "forward":
        model.eval()

        def run() -> object:
            with torch.inference_mode(), autocast():
                return fwd(images)
        return run
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> object:
        with autocast():
            out = fwd(images)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def run_group(cfg: Config, rounds: int, full: bool) -> dict:
    names = contestants(cfg, full)
    images = torch.randn(cfg.batch, 3, *cfg.img)
    fns: dict[str, Callable[[], object]] = {}
    flops: dict[str, float] = {}
    for name in names:
        model = build(name, cfg)
        fwd = forward_of(name, model)
        # open_clip's nn.MultiheadAttention takes a fused fast path in eval mode that FlopCounterMode
        # cannot see (projections included): count it in train mode, where it runs plain ops (no dropout)
        if name in ("reid_ms frozen", BASELINE.get("name")):  # the counter cannot see MKL's packed products
            flops[name] = flops["reid_ms"]
        elif name == "timm":
            flops[name] = count_flops(model.eval().forward_features, images[:1])
        else:
            flops[name] = count_flops(model.train() if name == "open_clip" else model.eval(), images[:1])
        if cfg.compiled:
            fns[f"{name} eager"] = make_step(cfg, model, fwd, images)
            model_c = torch.compile(model, fullgraph=name == "reid_ms")
            fwd_c = model_c.forward_features if name == "timm" else model_c
            fns[name] = make_step(cfg, model, fwd_c, images)
            flops[f"{name} eager"] = flops[name]
        else:
            fns[name] = make_step(cfg, model, fwd, images)
    a, b, c = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N), torch.empty(PEAK_N, PEAK_N)
    # into a kept output: a fresh 16 MB result is page-faulted in on every call, which under memory
    # pressure slowed the peak more than the models and put their shares above 100 %
    fns["peak"] = lambda: [torch.mm(a, b, out=c) for _ in range(3)]
    start = time.perf_counter()
    # Compiled inference freezes the weights (Inductor's CPU inference setting: constant folding and
    # packed weights, as PyTorch's CPU inference guide advises); training cannot freeze them.
    import torch._inductor.config as inductor_config

    freeze = inductor_config.patch(freezing=True) if cfg.compiled and cfg.pass_ == "forward" \
        else contextlib.nullcontext()
    with freeze:
        # compiled graphs need their first calls to compile; eager ones one warm-up call to settle the allocator
        times = interleaved(fns, rounds, warmup=2 if cfg.compiled else 1)
    peak = 3 * 2 * PEAK_N**3 / times.pop("peak") / 1e9
    factor = 3 if cfg.pass_ == "train" else 1  # backward costs two forwards' FLOPs
    result = {"config": asdict(cfg) | {"label": cfg.label}, "peak_gflops": peak, "rounds": rounds,
              "seconds": time.perf_counter() - start, "models": {}}
    for name, t in times.items():
        gflops = factor * cfg.batch * flops[name] / t / 1e9
        result["models"][name] = {"ms": t * 1e3, "images_per_s": cfg.batch / t, "gflop_per_image": flops[name] / 1e9,
                                  "gflops": gflops, "peak_share": gflops / peak}
    ref = result["models"]["reid_ms"]["ms"]
    for name, m in result["models"].items():
        m["time_ratio_reid_ms_over_this"] = ref / m["ms"]
    return result


def quick_configs() -> list[Config]:
    img = (256, 128)
    return [Config(family, img, s, b, "fp32", "forward", False)
            for family in ("vit", "clip") for s in (16, 12) for b in (8, 64)]


def selected_configs(args: argparse.Namespace) -> list[Config]:
    cfgs = []
    for fam, stride, batch, dtype, pass_, mode in itertools.product(
            args.families, args.strides, args.batches, args.dtypes, args.passes, args.modes):
        imgs = [(256, 128)] + ([(224, 224)] if fam == "clip" and stride == 16 else [])
        for img in imgs:
            cfgs.append(Config(fam, img, stride, batch, dtype, pass_, mode == "compiled"))
    return cfgs


def markdown(results: list[dict]) -> str:
    lines = ["| configuration | model | ms / batch | images/s | GFLOP/img | share of peak | time / reid_ms time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, m in r["models"].items():
            lines.append(f"| {r['config']['label']} (peak {r['peak_gflops']:.0f} GFLOP/s) | {name} | {m['ms']:.0f} | "
                         f"{m['images_per_s']:.2f} | {m['gflop_per_image']:.2f} | {m['peak_share']:.0%} | "
                         f"{1 / m['time_ratio_reid_ms_over_this']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Share of the peak per fp32 eager forward configuration, one bar per contestant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["config"]["pass_"] == "forward" and r["config"]["dtype"] == "fp32"
            and not r["config"]["compiled"]]
    if not rows:
        return
    names = ["reid_ms", "reid_ms frozen", "timm", "open_clip", "explicit"]
    colors = {"reid_ms": "#1f77b4", "reid_ms frozen": "#17becf", "timm": "#ff7f0e", "open_clip": "#2ca02c",
              "explicit": "#7f7f7f"}
    if "name" in BASELINE:
        names.append(str(BASELINE["name"]))
        colors[names[-1]] = "#c7c7c7"
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, r in enumerate(rows) if name in r["models"]]
        ys = [100 * r["models"][name]["peak_share"] for r in rows if name in r["models"]]
        if xs:
            ax.bar(xs, ys, width, label=name, color=colors[name])
    labels = [f"{r['config']['family']} s{r['config']['stride']}\nb{r['config']['batch']}"
              + ("" if tuple(r["config"]["img"]) == (256, 128) else f"\n{r['config']['img'][0]}px") for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("% of fp32 matmul peak (same rounds)")
    ax.axhline(85, color="k", lw=0.6, ls="--")
    ax.axhline(80, color="k", lw=0.6, ls=":")
    top = max(m["peak_share"] for r in rows for m in r["models"].values())
    ax.set_ylim(0, max(100, 10 * math.ceil(10 * top)))
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(f"fp32 forward, 256x128 unless noted, {torch.get_num_threads()} threads, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="headline configurations only (the default)")
    scope.add_argument("--full", action="store_true", help="every combination of the selection flags")
    parser.add_argument("--families", nargs="+", default=["vit", "clip"], choices=["vit", "clip"])
    parser.add_argument("--strides", nargs="+", type=int, default=[16, 12])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--passes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", metavar="REV", help="also time reid_ms as of this git revision")
    parser.add_argument("--out", default="backbones", help="basename of the files under bench/results/")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "performance.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.baseline:
        BASELINE.update(name=f"reid_ms {args.baseline}", module=import_release(args.baseline))
    selection_given = any(f"--{k}" in sys.argv for k in ("families", "strides", "batches", "dtypes", "passes", "modes"))
    cfgs = selected_configs(args) if (args.full or selection_given) else quick_configs()
    logger.info("%d configurations, %d threads, %d rounds each", len(cfgs), args.threads, args.rounds)

    load_before = os.getloadavg()
    results = []
    for cfg in cfgs:
        r = run_group(cfg, args.rounds, args.full)
        results.append(r)
        parts = [f"{n} {m['ms']:.0f} ms {m['peak_share']:.0%}" for n, m in r["models"].items()]
        r["loadavg"] = os.getloadavg()
        logger.info("%s | peak %.0f GFLOP/s | load %.1f | %s", cfg.label, r["peak_gflops"], r["loadavg"][0],
                    " | ".join(parts))

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "peak_alone_gflops": statistics.median(r["peak_gflops"] for r in results),
            # other jobs on the machine: 1-, 5-, 15-minute load averages (2 cores) around the run
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{args.out}.md").write_text(markdown(results))
    plot(results, Path(args.plot))
    logger.info("wrote %s and %s", out / f"{args.out}.json", args.plot)


if __name__ == "__main__":
    main()
