"""Draw docs/img/architecture.png: both backbones, the optional DimAdapter, the multi-scale neck, the BNNeck.

    python docs/make_figure.py                  # needs matplotlib: pip install 'reid-ms[docs]'
    python docs/make_figure.py --out fig.png

Boxes are laid out on a 0-130 x 0-64 canvas; every label states what the code computes (see
docs/architecture.md for the same in words).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).resolve().parent / "img" / "architecture.png"

VIT = "#dbe9f6"        # TransReID's ViT
CLIP = "#fde2c8"       # CLIP-ReID's visual encoder
SHARED = "#e3f1df"     # neck, adapter and head: the same modules for both backbones
EDGE = "#333333"
NOTE = "#555555"


def box(ax, x, y, w, h, text, color, size=8.5, dashed=False, bold=False):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.25,rounding_size=0.8", fc=color, ec=EDGE,
                                lw=1.0, ls="--" if dashed else "-"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight="bold" if bold else "normal", linespacing=1.3)


def arrow(ax, start, end, text="", color=EDGE, text_offset=(0.0, 1.2), size=7.5, style="-|>", dashed=False,
          rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=1.1,
                                 ls="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=1, shrinkB=1))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="center", fontsize=size, color=NOTE, linespacing=1.2)


def lane_label(ax, x, y, title, subtitle, color):
    ax.text(x, y, title, fontsize=11, fontweight="bold", va="bottom", color=EDGE,
            bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="none"))
    ax.text(x + 0.5, y - 1.6, subtitle, fontsize=8, va="top", color=NOTE, style="italic")


def backbones(ax):
    # VitTrans lane
    y, h = 42, 8
    lane_label(ax, 1, 54, "VitTrans", "TransReID's ViT-B/16  ·  reid_ms.VitTrans  ·  vit_b16*", VIT)
    box(ax, 1, y, 9, h, "images\n[B, 3, 256, 128]", "white")
    box(ax, 13, y, 12, h, "patch conv 16×16\nstride 16 or 12\n(overlapping, bias)", VIT)
    box(ax, 28, y, 11, h, "prepend CLS\n+ pos_embed\n(resized bilinear)", VIT)
    box(ax, 42, y, 13, h, "+ sie_coef · sie_embed[row]\non EVERY token\nrow = cam·view_num + view", VIT)
    box(ax, 58, y, 12, h, "12 blocks\n(timm Block, GELU)\nLayerNorm (eps 1e-6)", VIT)
    for x0, x1 in ((10, 13), (25, 28), (39, 42), (55, 58)):
        arrow(ax, (x0 + 0.3, y + h / 2), (x1 - 0.3, y + h / 2))

    # ClipVisual lane
    y = 20
    lane_label(ax, 1, 32, "ClipVisual", "CLIP-ReID's visual encoder, ViT-B/16  ·  reid_ms.ClipVisual  ·  clip_b16*",
               CLIP)
    box(ax, 1, y, 9, h, "images\n[B, 3, 256, 128]", "white")
    box(ax, 13, y, 12, h, "conv1 16×16\nstride 16 or 12\n(no bias)", CLIP)
    box(ax, 28, y, 11, h, "CLS + sie_coef\n· cv_embed[row]\non the CLS ONLY", CLIP)
    box(ax, 42, y, 13, h, "+ positional_embedding\nln_pre", CLIP)
    box(ax, 58, y, 12, h, "12 blocks (QuickGELU)\nln_post (eps 1e-5)\n× proj: 768 → 512", CLIP)
    for x0, x1 in ((10, 13), (25, 28), (39, 42), (55, 58)):
        arrow(ax, (x0 + 0.3, y + h / 2), (x1 - 0.3, y + h / 2))
    ax.text(48.5, y - 2.2, "width 768 inside; project=False returns\nthe 768-wide tokens before proj (x12)",
            fontsize=7, color=NOTE, ha="center", va="top")


def adapter_and_routes(ax):
    # token widths leaving the backbones
    arrow(ax, (70.3, 46), (95.7, 46), "tokens [B, 1 + H·W, 768]", text_offset=(0, 1.3))
    arrow(ax, (70.3, 24), (95.7, 28.5), "clip_b16_ms: tokens [B, 1 + H·W, 512]\n(neck at 512)",
          text_offset=(-1.5, 2.6))
    box(ax, 76, 7, 14, 7, "DimAdapter 512 → 768\nLinear per token\n(+ LayerNorm optional)", SHARED, dashed=True)
    arrow(ax, (68, 19.7), (76.5, 13.0), "clip_b16_adapt_ms", text_offset=(-4.6, -2.6), dashed=True, rad=0.15)
    arrow(ax, (90.3, 10.5), (95.7, 20.5), dashed=True, rad=-0.2)
    ax.text(83, 15.9, "[B, 1 + H·W, 768]", ha="center", va="bottom", fontsize=7.5, color=NOTE)


def neck(ax):
    x, y, w, h = 96, 14, 33, 44
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=1.2", fc=SHARED, ec=EDGE, lw=1.2))
    ax.text(x + w / 2, y + h - 1.6, "MultiScaleSlidingWindow(feat_dim=D)", ha="center", va="top", fontsize=10,
            fontweight="bold")
    ax.text(x + w / 2, y + h - 4.6, "any width D (512 or 768), any H × W grid", ha="center", va="top",
            fontsize=7.5, color=NOTE, style="italic")
    ax.text(x + w / 2, y + h - 7.0, "patch tokens pass through unchanged; only the CLS is enhanced",
            ha="center", va="top", fontsize=7.5, color=NOTE)

    # the patch grid, with the scale-4 windows over the zero-padded 16 x 8 grid
    gx, gy, cell = x + 2.5, y + 15.5, 1.05
    rows, cols = 16, 8
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((gx + c * cell, gy + (rows - 1 - r) * cell * 0.92), cell, cell * 0.92,
                                   fc="white", ec="#bbbbbb", lw=0.3))
    for r in range(0, rows, 4):
        for c in range(0, cols, 4):
            ax.add_patch(Rectangle((gx + c * cell, gy + (rows - 4 - r) * cell * 0.92), 4 * cell, 4 * cell * 0.92,
                                   fc="none", ec="#c0392b", lw=1.0))
    ax.text(gx + cols * cell / 2, gy - 0.8, "patch tokens → H × W grid\n(16 × 8 at 256×128, s16)\nzero-padded "
            "to a multiple of s\n(16 × 16 for the 16 × 16 window)", ha="center", va="top", fontsize=7, color=NOTE)

    # per-scale windows, pooled, averaged
    bx = x + 12.8
    for i, (s, note) in enumerate(((4, "4 × 2 windows"), (8, "2 × 1 windows"), (16, "1 window"))):
        by = y + 27.5 - i * 6.2
        box(ax, bx, by, 9.6, 4.2, f"window {s}×{s}, stride {s}\n{note}", "white", size=7.0)
        arrow(ax, (bx + 9.9, by + 2.1), (bx + 11.9, y + 19.5))
        arrow(ax, (gx + cols * cell + 0.3, gy + 7.4), (bx - 0.3, by + 2.1))
    box(ax, bx + 12, y + 17.2, 7, 4.8, "GAP each,\nmean over\nscales", "white", size=7.5)
    box(ax, bx + 12, y + 4.2, 7, 4.8, "CLS +\ncontext\n[B, D]", "white", size=7.5, bold=True)
    arrow(ax, (bx + 15.5, y + 16.9), (bx + 15.5, y + 9.3))
    ax.text(x + 10.5, y + 4.0, "dense: Conv2d(D, D, s, stride=s)\nlight: depthwise s×s, then one\n"
            "shared pointwise Linear(D, D)", ha="center", va="center", fontsize=7, color=NOTE)


def head(ax):
    box(ax, 96, 2, 16, 7.5, "BNNeck: BatchNorm1d(D)\n(bias frozen at 0)\nclassifier Linear(D, ids) in train", SHARED,
        size=7.8)
    box(ax, 116, 2, 13, 7.5, "embedding [B, D]\neval: before BN (default)\nor after (neck_feat)", "white",
        size=7.8, bold=False)
    arrow(ax, (124.3, 17.9), (104, 9.9), "CLS [B, D]", text_offset=(1.8, -2.1))
    arrow(ax, (112.3, 5.75), (115.7, 5.75))


def draw(out: Path) -> None:
    fig = plt.figure(figsize=(17, 8.4), dpi=130)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, 130.5)
    ax.set_ylim(-0.5, 64)
    ax.axis("off")
    ax.text(65, 62.5, "reid_ms: one signature for two backbones, a neck of any width",
            ha="center", va="top", fontsize=14, fontweight="bold")
    ax.text(65, 59.6, "backbone(images, cam_label=None, view_label=None) → tokens [B, 1 + H·W, out_dim], CLS first"
            "  ·  H = (img_h − 16) // stride + 1, W likewise", ha="center", va="top", fontsize=9, color=NOTE)
    backbones(ax)
    adapter_and_routes(ax)
    neck(ax)
    head(ax)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, facecolor="white")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    draw(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
