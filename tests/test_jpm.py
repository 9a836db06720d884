"""TransReID's Jigsaw Patch Module: index order, eval feature, loading TransReID JPM and ImageNet checkpoints."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

import reid_ms
from reid_ms import CheckpointError, ConfigError, InputError, JigsawPatchNeck, VitTrans, build

D = 32
# 80x48 at stride 16: a 5x3 grid, 15 patches, so the shuffle pads one token
TINY = dict(img_size=(80, 48), stride_size=16, embed_dim=D, depth=3, num_heads=4)


def expected_groups(n: int, shift: int = 5, groups: int = 2, k: int = 4) -> list[list[int]]:
    """TransReID's order by plain list manipulation: roll, pad an odd count, interleave, split."""
    order = list(range(n))
    order = order[shift - 1:] + order[:shift - 1]
    if len(order) % groups:
        order.append(order[-2])
    per = len(order) // groups
    interleaved = [order[g * per + j] for j in range(per) for g in range(groups)]
    length = n // k
    return [interleaved[i * length:(i + 1) * length] for i in range(k)]


def index_groups(n: int, **jpm) -> list[list[int]]:
    """The patch groups the neck forms from tokens whose value is their patch index (CLS -1)."""
    neck = JigsawPatchNeck(nn.Identity(), nn.Identity(), **jpm)
    tokens = torch.cat([torch.tensor([-1.0]), torch.arange(n, dtype=torch.float)]).reshape(1, 1 + n, 1)
    return neck.local_groups(tokens.expand(2, -1, 3))[1, :, :, 2].long().tolist()


def test_order_written_out_for_an_odd_count():
    # 15 patches: roll 4 -> 4..14, 0..3; pad with the second-to-last (2); interleave the halves
    # [4..11] and [12, 13, 14, 0, 1, 2, 3, 2]; split into 4 groups of 15 // 4 = 3, the last 4 dropped
    assert index_groups(15) == [[4, 12, 5], [13, 6, 14], [7, 0, 8], [1, 9, 2]]
    assert expected_groups(15) == [[4, 12, 5], [13, 6, 14], [7, 0, 8], [1, 9, 2]]


@pytest.mark.parametrize("n", [128, 210])  # 16x8 (stride 16) and 21x10 (stride 12) at 256x128
def test_order_at_transreid_grids(n):
    groups = index_groups(n)
    assert groups == expected_groups(n)
    assert [len(g) for g in groups] == [n // 4] * 4
    half = n // 2
    assert groups[0][:6] == [4, 4 + half, 5, 5 + half, 6, 6 + half]
    if n == 128:
        assert groups[3][-4:] == [66, 2, 67, 3]
        assert sorted(sum(groups, [])) == list(range(128))
    else:
        # 4 groups of 52 from 210 tokens: the interleaved pair (108, 3) is dropped
        assert groups[3][-2:] == [107, 2]
        assert sorted(sum(groups, [])) == sorted(set(range(210)) - {108, 3})


def test_order_options():
    assert index_groups(12, rearrange=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert index_groups(12, shift_num=1, divide_length=3) == [[0, 6, 1, 7], [2, 8, 3, 9], [4, 10, 5, 11]]
    assert index_groups(12, shift_num=2, shuffle_groups=3, divide_length=2) == [[1, 5, 9, 2, 6, 10],
                                                                                  [3, 7, 11, 4, 8, 0]]
    assert index_groups(12, shift_num=2, shuffle_groups=3, divide_length=2) == expected_groups(12, 2, 3, 2)


def test_patch_counts_that_cannot_be_split():
    neck = JigsawPatchNeck(nn.Identity(), nn.Identity(), shuffle_groups=3)
    with pytest.raises(InputError, match="shuffle_groups=3"):
        neck.local_groups(torch.zeros(1, 1 + 10, 4))  # neither 10 nor 11 divides by 3
    with pytest.raises(ConfigError, match="shuffle_groups=3"):
        build("vit_b16_jpm", img_size=(64, 32), stride_size=12, embed_dim=D, depth=2, num_heads=4, shuffle_groups=3)
    with pytest.raises(ConfigError, match="divide_length=20"):
        build("vit_b16_jpm", divide_length=20, **TINY)
    with pytest.raises(ConfigError, match="divide_length must be a positive int"):
        JigsawPatchNeck(nn.Identity(), nn.Identity(), divide_length=0)
    with pytest.raises(ConfigError, match="VitTrans backbone"):
        reid_ms.JPMReIDModel(reid_ms.ClipVisual(img_size=(64, 32), width=32, layers=1, heads=4))


def test_full_size_eval_feature_is_3840_wide():
    with torch.device("meta"):
        model = build("vit_b16_jpm", stride_size=12, num_classes=751).eval()
        emb = model(torch.empty(2, 3, 256, 128))
    assert model.feat_dim == 3840 and model.head.feat_dim == 3840 and emb.shape == (2, 3840)
    # TransReID's layout: the backbone keeps all 12 blocks and its norm, the last block and norm unused and frozen
    assert len(model.backbone.blocks) == 12 and isinstance(model.backbone.norm, nn.LayerNorm)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("backbone.blocks.11.", "backbone.norm."))} | {"head.bottleneck.bias"}
    assert model.grid_size == (21, 10)


def _randomise(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        bn = model.head.bottleneck
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *TINY["img_size"], generator=torch.Generator().manual_seed(seed))


def test_eval_embedding_scales_the_local_features():
    model = build("vit_b16_jpm", num_classes=5, **TINY)
    _randomise(model, 0)
    model.eval()
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        feats = model.forward_head(tokens, pre_logits=True)
        before = model(x)
        model.head.neck_feat = "after"
        after = model(x)
    assert tokens.shape == (3, 5, D) and feats.shape == before.shape == after.shape == (3, 5 * D)
    assert torch.equal(feats, tokens.flatten(1))  # global, then the local features, side by side
    torch.testing.assert_close(before[:, :D], feats[:, :D], rtol=0, atol=0)
    torch.testing.assert_close(before[:, D:], feats[:, D:] / 4)
    bn = model.head.bottleneck
    normed = (feats - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(after, torch.cat([normed[:, :D], normed[:, D:] / 4], dim=1))


def test_one_batchnorm_equals_five_in_training():
    head = reid_ms.MultiBranchBNNeckHead(D, 5, num_classes=7, local_scale=0.25)
    separate = [nn.BatchNorm1d(D) for _ in range(5)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.bottleneck.weight.copy_(torch.rand(5 * D, generator=gen) + 0.5)
        for i, bn in enumerate(separate):
            bn.weight.copy_(head.bottleneck.weight[i * D:(i + 1) * D])
    feats = torch.randn(6, 5 * D, generator=gen) * 3 + 1
    logits, features = head.train()(feats)
    assert len(logits) == len(features) == 5
    for i, bn in enumerate(separate):
        part = feats[:, i * D:(i + 1) * D]
        assert torch.equal(features[i], part)
        torch.testing.assert_close(logits[i], bn.train()(part) @ head.classifiers[i].weight.t())
        torch.testing.assert_close(head.bottleneck.running_mean[i * D:(i + 1) * D], bn.running_mean)
        torch.testing.assert_close(head.bottleneck.running_var[i * D:(i + 1) * D], bn.running_var)
    assert not head.bottleneck.bias.requires_grad


@pytest.mark.parametrize("name", ["vit_b16_jpm", "vit_b16_ms_jpm"])
def test_every_parameter_trains(name):
    torch.manual_seed(0)
    extra = dict(scales=(2, 4)) if "ms" in name else {}
    model = build(name, num_classes=5, camera_num=3, **extra, **TINY)
    if model.neck is not None:
        with torch.no_grad():  # the neck starts at zero (see MultiScaleSlidingWindow); wake it
            for p in model.neck.parameters():
                p.normal_(0, 0.05)
    model.train()
    logits, features = model(images(), cam_label=[0, 2, 1])
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (*logits, *features))
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), pname


def _full_vit(seed: int, **extra) -> VitTrans:
    torch.manual_seed(seed)
    vit = VitTrans(**TINY, **extra)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit.eval()


def test_imagenet_weights_fill_both_branches(tmp_path):
    vit = _full_vit(0)
    state = {k: v for k, v in vit.state_dict().items()}
    state["head.weight"] = torch.randn(10, D)  # ImageNet classifier, ignored
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    model = build("vit_b16_jpm", pretrained=str(path), camera_num=2, **TINY).eval()
    report = model.load_report
    for branch in (model.jpm.b1, model.jpm.b2):
        for k, v in vit.blocks[2].state_dict().items():
            assert torch.equal(branch[0].state_dict()[k], v), k
        assert torch.equal(branch[1].weight, vit.norm.weight) and torch.equal(branch[1].bias, vit.norm.bias)
    assert "backbone.sie_embed" in report.kept_init and "head.bottleneck.weight" in report.kept_init
    assert any(e.startswith("head.weight") for e in report.ignored)
    # the global branch is the plain ViT: blocks[:-1], then the last block and the norm on the whole sequence
    x = images(2)
    camera_free = build("vit_b16_jpm", pretrained=str(path), **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(camera_free(x)[:, :D], vit(x)[:, 0])


def test_multiscale_global_branch_is_vit_b16_ms(tmp_path):
    plain = build("vit_b16_ms", scales=(2, 4), **TINY).eval()
    _randomise(plain, 4)
    path = tmp_path / "vit.pth"
    torch.save(plain.backbone.state_dict(), path)
    jpm = build("vit_b16_ms_jpm", pretrained=str(path), scales=(2, 4), **TINY).eval()
    jpm_fresh = build("vit_b16_jpm", pretrained=str(path), **TINY).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(jpm(x), jpm_fresh(x), rtol=0, atol=0)  # zero neck: the plain JPM
        jpm.neck.load_state_dict(plain.neck.state_dict())
        torch.testing.assert_close(jpm(x)[:, :D], plain(x))
        torch.testing.assert_close(jpm(x)[:, D:], jpm_fresh(x)[:, D:], rtol=0, atol=0)


def _block(state: dict[str, torch.Tensor], prefix: str) -> Block:
    block = Block(D, 4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return block.eval()


def _layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, (D,), state[prefix + "weight"], state[prefix + "bias"], eps=1e-6)


def _transreid_jpm_checkpoint(seed: int, classes: int, cameras: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vit = _full_vit(seed, camera_num=cameras)
    state = {f"base.{k}": v.clone() for k, v in vit.state_dict().items()}
    state["base.fc.weight"] = torch.randn(classes, D, generator=gen)
    for branch in ("b1", "b2"):
        donor = _full_vit(seed + int(branch[1]))
        state.update({f"{branch}.0.{k}": v.clone() for k, v in donor.blocks[-1].state_dict().items()})
        state.update({f"{branch}.1.{k}": v.clone() for k, v in donor.norm.state_dict().items()})
    for i, sfx in enumerate(["", "_1", "_2", "_3", "_4"]):
        state[f"bottleneck{sfx}.weight"] = torch.rand(D, generator=gen) + 0.5
        state[f"bottleneck{sfx}.bias"] = torch.randn(D, generator=gen) * 0.1
        state[f"bottleneck{sfx}.running_mean"] = torch.randn(D, generator=gen)
        state[f"bottleneck{sfx}.running_var"] = torch.rand(D, generator=gen) + 0.5
        state[f"bottleneck{sfx}.num_batches_tracked"] = torch.tensor(100)
        state[f"classifier{sfx}.weight"] = torch.randn(classes, D, generator=gen)
    return state


def _hand_forward(state: dict[str, torch.Tensor], x: torch.Tensor, cams: torch.Tensor, after: bool) -> torch.Tensor:
    """TransReID's JPM eval forward written out: patch conv, SIE, blocks but the last, b1, shuffled b2 groups."""
    t = F.conv2d(x, state["base.patch_embed.proj.weight"], state["base.patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([state["base.cls_token"].expand(len(x), -1, -1), t], dim=1) + state["base.pos_embed"]
    t = t + 3.0 * state["base.sie_embed"][cams]
    for i in range(TINY["depth"] - 1):
        t = _block(state, f"base.blocks.{i}.")(t)
    feats = [_layer_norm(_block(state, "b1.0.")(t), state, "b1.1.")[:, 0]]
    b2 = _block(state, "b2.0.")
    for group in expected_groups(t.shape[1] - 1):
        seq = torch.cat([t[:, :1], t[:, [1 + i for i in group]]], dim=1)
        feats.append(_layer_norm(b2(seq), state, "b2.1.")[:, 0])
    if after:
        feats = [F.batch_norm(f, state[f"bottleneck{s}.running_mean"], state[f"bottleneck{s}.running_var"],
                              state[f"bottleneck{s}.weight"], state[f"bottleneck{s}.bias"], eps=1e-5)
                 for f, s in zip(feats, ["", "_1", "_2", "_3", "_4"])]
    return torch.cat([feats[0]] + [f / 4 for f in feats[1:]], dim=1)


def test_transreid_jpm_checkpoint_reproduces_the_hand_forward(tmp_path):
    state = _transreid_jpm_checkpoint(7, classes=6, cameras=3)
    path = tmp_path / "transreid_jpm.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # saved from DataParallel
    model = build("vit_b16_jpm", pretrained=str(path), camera_num=3, num_classes=6, **TINY).eval()
    report = model.load_report
    assert report.kind == "transreid-jpm"
    assert [k for k in report.ignored if k.startswith("base.")] == ["base.fc.weight"]  # the ViT's classifier
    # the ViT's last block and norm, unused in TransReID as here, load into the backbone's
    assert torch.equal(model.backbone.blocks[2].attn.qkv.weight, state["base.blocks.2.attn.qkv.weight"])
    assert torch.equal(model.backbone.norm.weight, state["base.norm.weight"])
    assert not any(k.startswith(("head.", "jpm.")) for k in report.kept_init)
    for i, sfx in enumerate(["", "_1", "_2", "_3", "_4"]):
        assert torch.equal(model.head.classifiers[i].weight, state[f"classifier{sfx}.weight"])
    x, cams = images(3, seed=2), torch.tensor([2, 0, 1])
    with torch.no_grad():
        for after in (False, True):
            model.head.neck_feat = "after" if after else "before"
            torch.testing.assert_close(model(x, cam_label=cams), _hand_forward(state, x, cams, after),
                                       rtol=1e-5, atol=1e-5)


def test_classifiers_of_another_class_count_are_reported(tmp_path):
    state = _transreid_jpm_checkpoint(8, classes=6, cameras=0)
    path = tmp_path / "jpm.pth"
    torch.save(state, path)
    model = build("vit_b16_jpm", pretrained=str(path), num_classes=4, **TINY)
    assert model.load_report.kept_init == [f"head.classifiers.{i}.weight" for i in range(5)]
    assert sum(e.startswith("classifier") for e in model.load_report.ignored) == 5
    assert torch.equal(model.head.bottleneck.running_mean[D:2 * D], state["bottleneck_1.running_mean"])


def test_damaged_jpm_checkpoints_leave_the_model_untouched(tmp_path):
    state = _transreid_jpm_checkpoint(9, classes=6, cameras=0)
    model = build("vit_b16_jpm", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    no_b2 = {k: v for k, v in state.items() if not k.startswith("b2.")}
    shallow = {k: v for k, v in _full_vit(1).state_dict().items() if not k.startswith(("blocks.2.", "norm."))}
    int_bn = dict(state, **{"bottleneck_3.running_var": torch.ones(D, dtype=torch.int64)})
    for i, (bad, message) in enumerate([(no_b2, "missing.*jpm.b2"), (shallow, "holds 2 blocks.*depth=2"),
                                        (int_bn, "not floating point")]):
        path = tmp_path / f"bad{i}.pth"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=message):
            reid_ms.load_jpm_weights(model, path)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="JPMReIDModel"):
        reid_ms.load_jpm_weights(build("vit_b16", **TINY), tmp_path / "bad0.pth")


@pytest.mark.parametrize("name", ["vit_b16_jpm", "vit_b16_ms_jpm"])
def test_saved_model_without_the_unused_last_block_loads(name, tmp_path):
    # reid_ms saved JPM models without backbone.blocks.{last} / backbone.norm when it cut them off the backbone
    extra = dict(scales=(2, 4)) if "ms" in name else {}
    model = build(name, num_classes=5, camera_num=3, **extra, **TINY)
    _randomise(model, 5)
    model.eval()
    state = model.state_dict()
    path = tmp_path / "split.pth"
    old_layout = {k: v for k, v in state.items() if not k.startswith(("backbone.blocks.2.", "backbone.norm."))}
    torch.save({"model": old_layout}, path)
    loaded = build(name, pretrained=str(path), num_classes=5, camera_num=3, **extra, **TINY).eval()
    assert loaded.load_report.kind == "reid_ms-split-jpm" and loaded.load_report.kept_init == []
    # the unused tensors come from the global branch (TransReID starts b1 as their copy)
    assert torch.equal(loaded.backbone.blocks[2].mlp.fc2.weight, state["jpm.b1.0.mlp.fc2.weight"])
    assert torch.equal(loaded.backbone.norm.bias, state["jpm.b1.1.bias"])
    x, cams = images(3, seed=4), torch.tensor([1, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, cam_label=cams), model(x, cam_label=cams), rtol=0, atol=0)
    # a model saved in today's layout loads as it is
    torch.save(state, path)
    assert build(name, pretrained=str(path), num_classes=5, camera_num=3, **extra, **TINY).load_report.kind == "reid_ms"
