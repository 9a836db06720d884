"""Training-time attention (reid_ms.kernels.attention): the per-image path with its hand-written
backward gives PyTorch's SDPA results and gradients, is taken exactly where it should be, and the
backbones' attention modules built on it match timm's and open_clip's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

import reid_ms.dispatch as dispatch
import reid_ms.kernels.attention as attn
from reid_ms import VitTrans
from reid_ms.backbones.vit import VitAttention


def _sdpa_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The plain formula on permuted views, autograd through PyTorch's own kernels (the oracle)."""
    b, t, three_d = qkv.shape
    q, k, v = qkv.reshape(b, t, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, three_d // 3)


def _grads(fn, qkv: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = qkv.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad_out)
    return out.detach(), leaf.grad


@pytest.fixture
def count_per_image(monkeypatch, two_threads) -> list[int]:
    """Counts calls of PerImageAttention.apply (the per-image path) while the test runs, at 2 threads."""
    calls: list[int] = []
    original = attn.PerImageAttention.apply

    def spy(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(attn.PerImageAttention, "apply", spy)
    return calls


@pytest.mark.parametrize("batch, tokens, heads, head_dim", [(3, 17, 4, 16), (1, 50, 2, 8), (2, 129, 12, 8),
                                                            (2, 256, 3, 16)])
def test_per_image_attention_matches_sdpa_values_and_gradients(batch, tokens, heads, head_dim, count_per_image):
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen) * 2  # peaky softmax rows too
    grad_out = torch.randn(batch, tokens, heads * head_dim, generator=gen)
    out, grad = _grads(lambda x: attn.self_attention(x, heads), qkv, grad_out)
    assert len(count_per_image) == 1
    ref_out, ref_grad = _grads(lambda x: _sdpa_reference(x, heads), qkv, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=5e-5)
    # against float64: no less accurate than PyTorch's own fp32 kernels
    exact_out, exact_grad = _grads(lambda x: _sdpa_reference(x, heads), qkv.double(), grad_out.double())
    for mine, theirs, exact in ((out, ref_out, exact_out), (grad, ref_grad, exact_grad)):
        error, reference_error = ((t.double() - exact).abs().max().item() for t in (mine, theirs))
        assert error <= 1.5 * reference_error + 1e-6, (error, reference_error)


def test_per_image_attention_on_a_non_contiguous_product(count_per_image):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(9, 2, 3 * 32, generator=gen)  # [T, B, 3D] transposed to [B, T, 3D]
    grad_out = torch.randn(2, 9, 32, generator=gen)
    out, grad = _grads(lambda x: attn.self_attention(x.transpose(0, 1), 4), base, grad_out)
    ref_out, ref_grad = _grads(lambda x: _sdpa_reference(x.transpose(0, 1), 4), base, grad_out)
    assert count_per_image
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_where_the_per_image_path_is_taken(count_per_image, monkeypatch):
    qkv = torch.randn(2, 10, 48, requires_grad=True)
    attn.self_attention(qkv, 4).sum().backward()
    assert len(count_per_image) == 1, "training on CPU in fp32 takes the per-image path"
    with torch.no_grad():
        attn.self_attention(qkv, 4)
    attn.self_attention(qkv.detach(), 4)
    attn.self_attention(qkv, 4, dropout_p=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn.self_attention(qkv, 4)
    attn.self_attention(qkv.double(), 4)
    monkeypatch.setattr(dispatch, "PER_IMAGE_TRAINING_MAX_TOKENS", 9)
    attn.self_attention(qkv, 4)
    assert len(count_per_image) == 1, "no gradient, dropout, autocast, float64 or long sequences: SDPA"
    monkeypatch.setattr(dispatch, "PER_IMAGE_TRAINING_MAX_TOKENS", 10)
    attn.self_attention(qkv, 4)
    assert len(count_per_image) == 2, "the token limit is inclusive"
    for threads in (1, 5):
        torch.set_num_threads(threads)
        out = attn.self_attention(qkv, 4)
        torch.testing.assert_close(out, _sdpa_reference(qkv, 4))
    assert len(count_per_image) == 2, "1 thread or more than 4: SDPA"


def test_compiled_training_traces_sdpa_not_the_per_image_loop(count_per_image):
    torch._dynamo.reset()
    qkv = torch.randn(2, 10, 48, requires_grad=True)
    compiled = torch.compile(lambda x: attn.self_attention(x, 4), backend="aot_eager", fullgraph=True)
    out = compiled(qkv)
    out.sum().backward()
    assert not count_per_image
    torch.testing.assert_close(out, _sdpa_reference(qkv, 4), rtol=1e-5, atol=1e-6)


def _vit_and_timm_attention() -> tuple[VitAttention, Attention]:
    torch.manual_seed(0)
    ours = VitAttention(32, num_heads=4, qkv_bias=True)
    theirs = Attention(32, num_heads=4, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # PyTorch's vmap fallback
def test_torch_func_transforms_take_sdpa(count_per_image):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 48, generator=gen)
    weight = torch.randn(2, 7, 16, generator=gen)
    grad = torch.func.grad(lambda x: (attn.self_attention(x, 4) * weight).sum())(qkv)
    _, reference = _grads(lambda x: _sdpa_reference(x, 4), qkv, weight)
    torch.testing.assert_close(grad, reference)
    batched = torch.func.vmap(lambda x: attn.self_attention(x, 4))(qkv.unsqueeze(1))
    torch.testing.assert_close(batched.squeeze(1), _sdpa_reference(qkv, 4))
    assert not count_per_image


def test_vit_attention_equals_timms_attention_forward_and_backward():
    ours, theirs = _vit_and_timm_attention()
    x = torch.randn(3, 21, 32)
    grad_out = torch.randn(3, 21, 32)
    results = []
    for module in (ours, theirs):
        module.train()
        inp = x.clone().requires_grad_(True)
        out = module(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, module.qkv.weight.grad, module.proj.weight.grad))
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_vit_attention_hands_masks_to_timm():
    ours, theirs = _vit_and_timm_attention()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask))
    torch.testing.assert_close(ours(x, is_causal=True), theirs(x, is_causal=True))
    assert not torch.allclose(ours(x, attn_mask=mask), ours(x)), "the mask must change the result"


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_backbone_training_gradients_match_the_sdpa_path(kind, count_per_image, monkeypatch, tiny):
    model = tiny.backbone(kind, width=48).train()
    images = tiny.images(3)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(images).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    per_image = grads()
    assert len(count_per_image) == 2, "both blocks take the per-image path"
    monkeypatch.setattr(dispatch, "PER_IMAGE_TRAINING_MAX_TOKENS", 0)
    reference = grads()
    assert len(count_per_image) == 2
    for name, grad in reference.items():
        torch.testing.assert_close(per_image[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_vit_blocks_use_vit_attention_with_timms_parameter_names():
    model = VitTrans(img_size=(32, 32), embed_dim=32, depth=2, num_heads=4)
    assert all(type(b.attn) is VitAttention for b in model.blocks)
    assert {n for n, _ in model.blocks[0].attn.named_parameters()} == {"qkv.weight", "qkv.bias", "proj.weight",
                                                                      "proj.bias"}
