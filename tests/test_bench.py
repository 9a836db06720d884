"""The bench scripts still run against the library: one tiny configuration end to end, and the timing
helper's alternation (the ratios in docs/performance.md rest on it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_backbones  # noqa: E402
from common import interleaved  # noqa: E402


def test_interleaved_alternates_the_order_and_takes_medians(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr("common.time.perf_counter", lambda: next(clock))
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    times = interleaved(fns, rounds=3, warmup=1)
    # one warm-up call each, then rounds in alternating order so drifts in machine load hit all alike
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"] + ["a", "b", "c"]
    assert times == {"a": 1, "b": 1, "c": 1}  # each call spans one tick of the fake clock


@pytest.mark.full
def test_one_configuration_end_to_end():
    cfg = bench_backbones.Config("vit", (256, 128), 16, 1, "fp32", "forward", False)
    result = bench_backbones.run_group(cfg, rounds=1, full=False)
    assert set(result["models"]) == {"reid_ms", "reid_ms frozen", "timm", "explicit"}
    for name, m in result["models"].items():
        # ViT-B/16 at 129 tokens: 22.7 GFLOP per image for every contestant (same layers, same attention)
        assert m["gflop_per_image"] == pytest.approx(22.68, abs=0.01), name
        assert m["ms"] > 0 and 0 < m["peak_share"] < 2
    assert result["models"]["reid_ms"]["time_ratio_reid_ms_over_this"] == 1.0
    table = bench_backbones.markdown([result])
    assert table.count("\n") == 2 + 4 and "vit 256x128 s16 b1 fp32 forward eager" in table


def test_an_earlier_release_runs_beside_the_current_one():
    # --baseline REV times an earlier release in the same process: it must be that revision's own code,
    # under its own names (imports and custom-op namespace), computing on the same weights
    import torch

    import reid_ms
    from common import import_release

    release = import_release("HEAD")
    assert release.__name__ == "reid_ms_HEAD" and release.VitTrans is not reid_ms.VitTrans
    assert Path(release.__file__).parent.name == "reid_ms_HEAD"
    torch.manual_seed(0)
    current = reid_ms.VitTrans(img_size=(32, 16), embed_dim=32, depth=1, num_heads=2).eval()
    earlier = release.VitTrans(img_size=(32, 16), embed_dim=32, depth=1, num_heads=2).eval()
    earlier.load_state_dict(current.state_dict())
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(earlier(images), current(images))
