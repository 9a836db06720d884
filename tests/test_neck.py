"""MultiScaleSlidingWindow and DimAdapter against their convolutional / linear-algebra definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reid_ms
from reid_ms import ConfigError, DimAdapter, InputError, MultiScaleSlidingWindow
from reid_ms import testing as rt


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero random weights (the neck starts at zero, which would hide every property below)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def definition(neck: MultiScaleSlidingWindow, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The neck as written in the design: pad, convolve, pool, (pointwise), mean over scales, add to CLS."""
    h, w = grid
    x = rearrange(tokens[:, 1:], "b (h w) c -> b c h w", h=h)
    pooled = []
    for s, window in zip(neck.scales, neck.windows):
        padded = F.pad(x, (0, (-w) % s, 0, (-h) % s))  # zeros at the right and bottom to a multiple of s
        y = F.conv2d(padded, window.weight, window.bias, stride=s, groups=window.groups)
        if neck.mode == "light":
            y = F.conv2d(y, neck.pointwise.weight[:, :, None, None], neck.pointwise.bias)
        pooled.append(F.adaptive_avg_pool2d(y, 1).flatten(1))
    cls = tokens[:, 0] + torch.stack(pooled).mean(0)
    return torch.cat([cls[:, None], tokens[:, 1:]], dim=1)


@settings(derandomize=True, deadline=None, max_examples=60)
@given(width=rt.widths(1, 12), grid=rt.grids(max_side=32), scales=rt.scale_sets(max_scale=20),
       mode=st.sampled_from(["dense", "light"]), batch=st.integers(1, 3))
@example(width=8, grid=(16, 8), scales=(4, 8), mode="dense", batch=2)  # divisible
@example(width=8, grid=(16, 8), scales=(4, 8), mode="light", batch=2)
@example(width=8, grid=(16, 8), scales=(16,), mode="dense", batch=2)  # padded to 16 x 16: one window
@example(width=6, grid=(21, 10), scales=(4, 8, 16), mode="dense", batch=2)  # stride-12 grid, all padded
@example(width=6, grid=(21, 10), scales=(4, 8, 16), mode="light", batch=2)
@example(width=5, grid=(1, 1), scales=(3,), mode="dense", batch=1)  # window larger than the whole grid
def test_neck_properties(width, grid, scales, mode, batch):
    h, w = grid
    neck = randomize(MultiScaleSlidingWindow(width, scales, mode=mode).double(), seed=h * 100 + w)
    gen = torch.Generator().manual_seed(width + 7 * len(scales))
    tokens = torch.randn(batch, 1 + h * w, width, dtype=torch.float64, generator=gen, requires_grad=True)

    out = neck(tokens, (h, w))

    assert out.shape == tokens.shape
    assert torch.equal(out[:, 1:], tokens[:, 1:])
    torch.testing.assert_close(out, definition(neck, tokens, (h, w)), rtol=1e-10, atol=1e-10)
    # every patch token reaches the CLS: a non-zero gradient of the CLS output on each of them
    probe = torch.randn(batch, width, dtype=torch.float64, generator=gen)
    (grad,) = torch.autograd.grad((out[:, 0] * probe).sum(), tokens)
    assert (grad[:, 1:].abs().sum(-1) > 0).all()


@settings(derandomize=True, deadline=None, max_examples=10)
@given(width=rt.widths(1, 16), scales=rt.scale_sets(max_scale=20), mode=st.sampled_from(["dense", "light"]))
def test_neck_contract(width, scales, mode):
    rt.check_neck(MultiScaleSlidingWindow(width, scales, mode=mode))


@pytest.mark.parametrize("h, w, s", [(3, 3, 2), (21, 10, 4), (16, 8, 16), (5, 7, 1)])
def test_padding_rule_by_hand(h, w, s):
    # width 1, window of ones, bias 0.25: each window sums its tile, so the pooled value is the sum of all
    # patches over the number of windows of the zero-padded grid, ceil(H/s) * ceil(W/s), plus the bias
    neck = MultiScaleSlidingWindow(1, (s,)).double()
    with torch.no_grad():
        neck.windows[0].weight.fill_(1.0)
        neck.windows[0].bias.fill_(0.25)                   # not the zero it starts at: a bias fault shows
    tokens = torch.rand(2, 1 + h * w, 1, dtype=torch.float64)
    windows = math.ceil(h / s) * math.ceil(w / s)
    expected = tokens[:, 0, 0] + tokens[:, 1:, 0].sum(1) / windows + 0.25
    torch.testing.assert_close(neck(tokens, (h, w))[:, 0, 0], expected, rtol=1e-12, atol=1e-12)


def test_fresh_neck_keeps_the_cls():
    tokens = torch.randn(2, 1 + 6 * 4, 16)
    for mode in ("dense", "light"):
        assert torch.equal(MultiScaleSlidingWindow(16, (2, 4), mode=mode)(tokens, (6, 4)), tokens)
    light = MultiScaleSlidingWindow(16, (2, 4), mode="light")
    assert all(bool(window.weight.abs().sum() > 0) for window in light.windows)  # only the pointwise is zero


def test_state_dict_keys_are_the_convolutions():
    neck = MultiScaleSlidingWindow(8, (2, 4))
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == {
        "windows.0.weight": (8, 8, 2, 2), "windows.0.bias": (8,),
        "windows.1.weight": (8, 8, 4, 4), "windows.1.bias": (8,),
    }
    light = MultiScaleSlidingWindow(8, (2, 4), mode="light")
    assert {k: tuple(v.shape) for k, v in light.state_dict().items()} == {
        "windows.0.weight": (8, 1, 2, 2), "windows.0.bias": (8,),
        "windows.1.weight": (8, 1, 4, 4), "windows.1.bias": (8,),
        "pointwise.weight": (8, 8), "pointwise.bias": (8,),
    }
    assert all(isinstance(window, torch.nn.Conv2d) for window in neck.windows)


def test_parameter_counts_at_768():
    d, scales = 768, (4, 8, 16)
    with torch.device("meta"):
        dense = MultiScaleSlidingWindow(d, scales)
        light = MultiScaleSlidingWindow(d, scales, mode="light")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dense) == d * d * (16 + 64 + 256) + 3 * d
    assert count(light) == d * (16 + 64 + 256) + 3 * d + d * d + d
    assert count(light) < 0.01 * count(dense)


def test_gradients_reach_every_neck_parameter():
    for mode in ("dense", "light"):
        neck = randomize(MultiScaleSlidingWindow(8, (2, 3), mode=mode), seed=1)
        neck(torch.randn(2, 1 + 5 * 4, 8), (5, 4))[:, 0].square().sum().backward()
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in neck.parameters())


def test_float32_matches_float64():
    neck = randomize(MultiScaleSlidingWindow(32, (4, 8, 16)), seed=3)
    tokens = torch.randn(4, 1 + 21 * 10, 32)
    ref = definition(neck.double(), tokens.double(), (21, 10))
    torch.testing.assert_close(neck.float()(tokens, (21, 10)).double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens, grid, match", [
    (torch.randn(2, 33), (4, 8), "expects tokens"),
    (torch.randn(2, 33, 4), (4, 8), "feat_dim=8"),
    (torch.randn(2, 32, 8), (4, 8), "1 \\+ 4\\*8 = 33"),
    (torch.randn(2, 33, 8), (8, 8), "1 \\+ 8\\*8 = 65"),
    (torch.randn(2, 33, 8), (0, 8), "grid_size"),
    (torch.randn(2, 33, 8), (4,), "grid_size"),
    (torch.randn(2, 33, 8), (4.0, 8), "grid_size"),
])
def test_neck_input_errors(tokens, grid, match):
    with pytest.raises(InputError, match=match):
        MultiScaleSlidingWindow(8, (2, 4))(tokens, grid)


@pytest.mark.parametrize("kwargs, match", [
    (dict(feat_dim=0), "feat_dim"),
    (dict(feat_dim=8, scales=()), "scales"),
    (dict(feat_dim=8, scales=(4, 0)), "scales"),
    (dict(feat_dim=8, scales=(4.0,)), "scales"),
    (dict(feat_dim=8, scales=4), "scales"),
    (dict(feat_dim=8, mode="heavy"), "mode"),
])
def test_neck_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MultiScaleSlidingWindow(**kwargs)


@pytest.mark.parametrize("in_dim, out_dim", [(32, 48), (48, 32), (24, 24)])
def test_adapter_is_well_conditioned(in_dim, out_dim):
    adapter = DimAdapter(in_dim, out_dim)
    singular = torch.linalg.svdvals(adapter.proj.weight.detach().double())
    torch.testing.assert_close(singular, torch.ones_like(singular), rtol=0, atol=1e-5)
    assert torch.equal(adapter.proj.bias, torch.zeros(out_dim))
    tokens = torch.randn(3, 1 + 12, in_dim)
    if out_dim >= in_dim:  # widening is an isometry at init
        torch.testing.assert_close(adapter(tokens).norm(dim=-1), tokens.norm(dim=-1), rtol=1e-5, atol=1e-5)
    randomize(adapter, seed=in_dim)                         # the zero bias would hide a fault in using it
    out = adapter(tokens)
    assert out.shape == (3, 13, out_dim)
    torch.testing.assert_close(out, tokens @ adapter.proj.weight.T + adapter.proj.bias)


def test_adapter_norm_and_errors():
    adapter = randomize(DimAdapter(16, 24, norm=True), seed=5)    # bias and LayerNorm shift start at zero
    tokens = torch.randn(2, 5, 16)
    y = tokens @ adapter.proj.weight.T + adapter.proj.bias
    normed = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + adapter.norm.eps)
    torch.testing.assert_close(adapter(tokens), normed * adapter.norm.weight + adapter.norm.bias)
    with pytest.raises(InputError, match=r"\[B, 1 \+ N, 16\]"):
        adapter(torch.randn(2, 5, 12))
    with pytest.raises(ConfigError, match="out_dim"):
        DimAdapter(16, 0)


def test_public_names():
    assert reid_ms.MultiScaleSlidingWindow is MultiScaleSlidingWindow
    assert reid_ms.DimAdapter is DimAdapter
