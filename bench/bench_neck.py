"""What the multi-scale necks cost on top of their backbone (fp32 CPU inference, 256x128, batch 8).

For each backbone (ViT-B/16 and CLIP ViT-B/16, stride 16 and 12) the bare model and the model with each
neck are timed in alternation (median of ``--repeats`` rounds; the order flips every round so machine
noise hits all alike). Because a few percent is close to that noise, the neck is also timed alone on
the backbone's tokens (many more repeats); its share is ``neck time / bare model time``.

    python bench/bench_neck.py --repeats 5 --threads 2

Targets: light neck <= 3 %, dense neck <= 10 % of the forward time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch

from reid_ms import ClipVisual, DimAdapter, MultiScaleSlidingWindow, ReIDModel, VitTrans

logger = logging.getLogger("bench_neck")


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function, one warm-up call each, the order reversed every round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def variants(kind: str, stride: int) -> tuple[ReIDModel, dict[str, ReIDModel]]:
    """The bare model and the necked ones, all sharing one backbone (one set of weights in memory)."""
    if kind == "vit":
        backbone = VitTrans(img_size=(256, 128), stride_size=stride)
        necked = {mode: ReIDModel(backbone, MultiScaleSlidingWindow(768, mode=mode)) for mode in ("dense", "light")}
    else:
        backbone = ClipVisual(img_size=(256, 128), stride_size=stride)
        necked = {f"{mode} 512": ReIDModel(backbone, MultiScaleSlidingWindow(512, mode=mode))
                  for mode in ("dense", "light")}
        adapter = DimAdapter(512, 768)
        necked |= {f"adapt+{mode} 768": ReIDModel(backbone, MultiScaleSlidingWindow(768, mode=mode), adapter=adapter)
                   for mode in ("dense", "light")}
    # random weights: the zero initialisation of the neck's output layer must not flatter any kernel
    for model in necked.values():
        for p in model.neck.parameters():
            torch.nn.init.normal_(p, std=0.01)
    return ReIDModel(backbone).eval(), {k: m.eval() for k, m in necked.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the whole models")
    parser.add_argument("--neck-repeats", type=int, default=30, help="rounds of the necks timed alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbones", nargs="+", default=["vit", "clip"], choices=["vit", "clip"])
    parser.add_argument("--strides", nargs="+", type=int, default=[16, 12])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, steadier on a machine other jobs share (with "
                             "more than one thread it also counts threads waiting for each other)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 256, 128)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    logger.info("fp32, %d threads, batch %d, 256x128, %d rounds (models), %d rounds (necks alone), %s clock",
                args.threads, args.batch, args.repeats, args.neck_repeats, args.clock)
    logger.info(f"{'model':<28}{'stride':>7}{'neck params':>14}{'forward ms':>12}{'overhead':>10}"
                f"{'neck ms':>9}{'share':>8}")
    for kind in args.backbones:
        for stride in args.strides:
            bare, necked = variants(kind, stride)
            name = "ViT-B/16" if kind == "vit" else "CLIP ViT-B/16"
            with torch.inference_mode():
                models = {"bare": bare} | necked
                model_times = interleaved({k: (lambda m=m: m(images)) for k, m in models.items()}, args.repeats, clock)
                tokens = bare.backbone(images)
                neck_fns = {}
                for k, m in necked.items():  # the adapter, where there is one, is part of the added cost
                    neck_fns[k] = lambda m=m: m.neck.context(tokens if m.adapter is None else m.adapter(tokens),
                                                             m.grid_size)
                neck_times = interleaved(neck_fns, args.neck_repeats, clock)
            base = model_times["bare"]
            logger.info(f"{name + ' (bare)':<28}{stride:>7}{0:>14,}{base * 1e3:>12.1f}{'':>10}{'':>9}{'':>8}")
            for k, m in necked.items():
                params = count(m.neck) + (count(m.adapter) if m.adapter is not None else 0)
                overhead = model_times[k] / base - 1
                share = neck_times[k] / base
                logger.info(f"{'  + ' + k:<28}{stride:>7}{params:>14,}{model_times[k] * 1e3:>12.1f}"
                            f"{overhead:>9.1%}{neck_times[k] * 1e3:>9.1f}{share:>8.1%}")
            del bare, necked, models, neck_fns


if __name__ == "__main__":
    main()
