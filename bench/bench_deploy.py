"""Deployment on this CPU: int8 and ONNX Runtime against the fp32 default, tracker latency, camera policies.

    python bench/bench_deploy.py [--rounds 3] [--skip-speed] [--skip-latency] [--skip-fidelity] [--out deploy.json]

1. Speed at batch 8, ViT-B/16 (``vit_b16``, 256x128, stride 16), images/s, timed interleaved (bench/common.py):
   the fp32 default (eager ``model(x)`` in inference mode, whatever CPU path main's default takes), the
   exported ONNX graph under ONNX Runtime (fp32), ``reid_ms.quantize(model)`` (ONNX Runtime int8) and
   ``reid_ms.quantize(model, backend="torch")`` (PyTorch dynamic int8).
2. Fidelity on a trained model: a small ViT (embed 96, depth 2, 128x64, camera table of 4) trained for a short
   loop on the sample set's gallery (examples/sample_data, ids from the Market-1501 names; this branch has no
   ``reid-ms train``), then query-vs-gallery mAP and embedding cosine, fp32 against both int8 backends, and the
   mAP under each camera choice of FeatureExtractor (true cameras, "mean", "none").
3. Tracker latency: ``FeatureExtractor.from_boxes`` on a 1080p frame with 1, 10 and 50 boxes, ViT-B/16 size.

Results go to bench/results/deploy.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import reid_ms
from reid_ms.data import list_images, parse_market_name
from reid_ms.export import export_onnx
from reid_ms.metrics import evaluate
from reid_ms.deploy import OnnxRuntimeModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import interleaved  # noqa: E402

SAMPLE = reid_ms.sample_data().root


def speed(rounds: int) -> dict:
    torch.manual_seed(0)
    model = reid_ms.build("vit_b16").eval()
    x = torch.randn(8, 3, 256, 128)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, f"{tmp}/m.onnx")
        ort_fp32 = OnnxRuntimeModel(f"{tmp}/m.onnx", model)
    ort_int8 = reid_ms.quantize(model)
    torch_int8 = reid_ms.quantize(model, backend="torch")
    with torch.inference_mode():
        ref = model(x)
        fns = {"fp32 default (eager)": lambda: model(x), "onnxruntime fp32": lambda: ort_fp32(x),
               "onnxruntime int8": lambda: ort_int8(x), "torch dynamic int8": lambda: torch_int8(x)}
        cos = {name: float(F.cosine_similarity(fn(), ref).min()) for name, fn in fns.items()}
        times = interleaved(fns, rounds=rounds)
    base = times["fp32 default (eager)"]
    out = {}
    for name, sec in times.items():
        out[name] = {"seconds_per_batch8": sec, "images_per_s": 8 / sec, "speedup_vs_fp32_default": base / sec,
                     "time_vs_eager": sec / base, "min_cosine_vs_fp32": cos[name]}
        print(f"{name:24s} {8 / sec:7.2f} img/s  {base / sec:5.2f}x the fp32 default  (time {sec / base:.2f}x eager; "
              f"min cosine {cos[name]:.5f})", flush=True)
    return out


def _sample(split: str) -> tuple[list[Path], np.ndarray, np.ndarray]:
    files = [p for p in list_images(SAMPLE / split) if parse_market_name(p)[0] != -1]
    ids = [parse_market_name(p) for p in files]
    return files, np.array([i for i, _ in ids]), np.array([c for _, c in ids])


def fidelity() -> dict:
    torch.manual_seed(0)
    kw = dict(embed_dim=96, depth=2, num_heads=4, img_size=(128, 64), camera_num=4, drop_path_rate=0.0)
    g_files, g_pids, g_cams = _sample("gallery")
    q_files, q_pids, q_cams = _sample("query")
    labels = {p: i for i, p in enumerate(sorted(set(g_pids.tolist())))}
    model = reid_ms.build("vit_b16", num_classes=len(labels), **kw)
    fx = reid_ms.FeatureExtractor(model)
    images = torch.stack([fx._prepare(p, False, i) for i, p in enumerate(g_files)])
    targets = torch.tensor([labels[p] for p in g_pids.tolist()])
    cams = torch.as_tensor(g_cams)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(150):
        flip = torch.rand(len(images)) < 0.5
        batch = torch.where(flip[:, None, None, None], images.flip(-1), images)
        logits, _ = model(batch, cam_label=cams)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"trained the small model: final loss {float(loss.detach()):.3f}", flush=True)
    fx = reid_ms.FeatureExtractor(model)
    result: dict = {"final_loss": float(loss.detach())}
    choices = {"true cameras": (q_cams.tolist(), g_cams.tolist()), "mean": ("mean", "mean"), "none": ("none", "none")}
    for name, (qc, gc) in choices.items():
        qf, gf = fx(q_files, cam_label=qc), fx(g_files, cam_label=gc)
        r = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
        result[f"mAP cam_label={name}"] = r.mAP
        print(f"mAP with cam_label={name:13s} {100 * r.mAP:6.2f}  rank-1 {100 * r.rank(1):6.2f}", flush=True)
    x_q = torch.stack([fx._prepare(p, False, i) for i, p in enumerate(q_files)])
    with torch.inference_mode():
        fp32 = (model(x_q, cam_label=torch.as_tensor(q_cams)), model(images, cam_label=cams))
    base = evaluate(*fp32, q_pids, g_pids, q_cams, g_cams).mAP
    for backend in ("onnxruntime", "torch"):
        q = reid_ms.quantize(model, backend=backend)
        with torch.inference_mode():
            int8 = (q(x_q, cam_label=torch.as_tensor(q_cams)), q(images, cam_label=cams))
        m = evaluate(*int8, q_pids, g_pids, q_cams, g_cams).mAP
        cos = float(torch.cat([F.cosine_similarity(a, b) for a, b in zip(int8, fp32)]).min())
        result[backend] = {"mAP_fp32": base, "mAP_int8": m, "min_cosine": cos}
        print(f"int8 {backend:12s} mAP {100 * m:6.2f} (fp32 {100 * base:6.2f}, {100 * (m - base):+.2f} points); "
              f"min cosine {cos:.5f}", flush=True)
    return result


def latency(rounds: int) -> dict:
    torch.manual_seed(0)
    fx = reid_ms.FeatureExtractor("vit_b16", device="cpu")
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    out = {}
    for n in (1, 10, 50):
        x1 = rng.uniform(0, 1800, n)
        y1 = rng.uniform(0, 800, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(40, 120, n), y1 + rng.uniform(120, 280, n)], 1)
        fx.from_boxes(frame, boxes)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fx.from_boxes(frame, boxes)
            times.append(time.perf_counter() - start)
        out[n] = {"median_ms": 1000 * float(np.median(times)), "min_ms": 1000 * float(min(times))}
        print(f"from_boxes, {n:2d} boxes: median {out[n]['median_ms']:8.1f} ms per frame (min {out[n]['min_ms']:.1f})",
              flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--out", default="deploy.json", help="file name under bench/results")
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads()}
    if not args.skip_fidelity:
        result["fidelity"] = fidelity()
    if not args.skip_speed:
        result["speed_batch8_vit_b16"] = speed(args.rounds)
    if not args.skip_latency:
        result["from_boxes_latency_vit_b16"] = latency(args.rounds)
    out = HERE / "results" / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
