"""Ranked-list pictures (show_ranks and reid-ms eval --show-ranks), reid-ms eval --rerank / --aqe, export's default name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reid_ms
from reid_ms import InputError
from reid_ms.cli import main
from reid_ms.visualize import BORDER, GAP, GREEN, QUERY_FRAME, RED, show_ranks

SAMPLE = reid_ms.sample_data().root
TINY = ["--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2", "--img-size", "32", "16", "-q"]


def _images(tmp_path, n, prefix):
    paths = []
    for i in range(n):
        p = tmp_path / f"{prefix}{i}.png"
        Image.new("RGB", (20, 40), (10 * i, 100, 200)).save(p)
        paths.append(p)
    return paths


def test_show_ranks_frames_right_green_wrong_red_and_skips_same_camera(tmp_path):
    q_paths, g_paths = _images(tmp_path, 2, "q"), _images(tmp_path, 5, "g")
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.5, 0.4, 0.3, 0.2, 0.1]])
    q_pids, g_pids = [7, 8], [7, 9, 7, 8, 8]
    q_cams, g_cams = [0, 1], [0, 1, 1, 1, 0]
    # query 0 (person 7, camera 0): gallery 0 is its own camera and left out -> 1 (wrong), 2 (right)
    # query 1 (person 8, camera 1): 4 (right), 3 is its own camera -> left out, then 2 (wrong)
    img = show_ranks(dist, q_paths, g_paths, q_pids, g_pids, q_cams, g_cams, k=2, cell=(40, 20),
                     out=tmp_path / "r.png")
    assert (tmp_path / "r.png").is_file()
    tile_w, tile_h, label_h = 20 + 2 * BORDER, 40 + 2 * BORDER, 14
    assert img.size == (tile_w * 3 + GAP, (tile_h + label_h) * 2)
    corner = lambda col, row: img.getpixel((0 if col < 0 else tile_w + GAP + col * tile_w, row * (tile_h + label_h)))
    assert corner(-1, 0) == QUERY_FRAME
    assert [corner(0, 0), corner(1, 0)] == [RED, GREEN]
    assert [corner(0, 1), corner(1, 1)] == [GREEN, RED]
    # without cameras nothing is skipped: query 0's first is gallery 0, right
    img = show_ranks(dist, q_paths, g_paths, q_pids, g_pids, k=2, cell=(40, 20), num_queries=1)
    assert img.size[1] == tile_h + label_h and corner(0, 0) == GREEN
    with pytest.raises(InputError, match="dist must be"):
        show_ranks(dist[:, :4], q_paths, g_paths, q_pids, g_pids)


def test_eval_rerank_aqe_and_show_ranks(tmp_path, capsys):
    common = ["eval", "vit_b16", "--query", str(SAMPLE / "query"), "--gallery", str(SAMPLE / "gallery"), *TINY]
    assert main(common) == 0
    plain = capsys.readouterr().out
    out = tmp_path / "ranks.png"
    assert main([*common, "--set", "camera_num=4", "--rerank", "--show-ranks", "3", "--num-queries", "4",
                 "--out", str(out)]) == 0
    reranked = capsys.readouterr().out
    assert "mAP" in reranked and reranked != plain
    with Image.open(out) as img:
        assert img.size[1] > 4 * 100
    assert main([*common, "--aqe", "2"]) == 0
    assert "mAP" in capsys.readouterr().out


def test_export_without_out_writes_name_onnx(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "vit_b16", *TINY]) == 0
    assert (tmp_path / "vit_b16.onnx").is_file()
