"""BNNeckHead: the BNNeck of TransReID / CLIP-ReID, checked against BatchNorm written out by hand."""

from __future__ import annotations

import re

import pytest
import torch

import reid_ms
from reid_ms import BNNeckHead, ConfigError, InputError


def batch_norm_by_hand(x, weight, bias, mean, var, eps):
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_init():
    head = BNNeckHead(64, num_classes=5000)
    assert torch.equal(head.bottleneck.weight, torch.ones(64))
    assert torch.equal(head.bottleneck.bias, torch.zeros(64))
    assert not head.bottleneck.bias.requires_grad and head.bottleneck.weight.requires_grad
    assert head.classifier.bias is None
    assert 0.0009 < float(head.classifier.weight.detach().std()) < 0.0011
    assert abs(float(head.classifier.weight.detach().mean())) < 1e-4
    assert BNNeckHead(64).classifier is None


def test_train_mode_returns_logits_and_the_feature_before_bn():
    head = BNNeckHead(16, num_classes=7).train()
    with torch.no_grad():
        head.bottleneck.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 16) * 3 + 1
    logits, feature = head(x)
    assert feature is x
    normed = batch_norm_by_hand(x, head.bottleneck.weight, 0.0, x.mean(0), x.var(0, unbiased=False), 1e-5)
    torch.testing.assert_close(logits, normed @ head.classifier.weight.T)
    assert logits.shape == (6, 7)
    torch.testing.assert_close(head.bottleneck.running_mean, 0.1 * x.mean(0))


def test_train_mode_without_classifier():
    head = BNNeckHead(16).train()
    x = torch.randn(4, 16)
    logits, feature = head(x)
    assert logits is None and feature is x
    assert float(head.bottleneck.running_mean.abs().sum()) > 0  # statistics still tracked for "after"


@pytest.mark.parametrize("neck_feat", ["before", "after"])
def test_eval_embedding(neck_feat):
    head = BNNeckHead(16, num_classes=3, neck_feat=neck_feat)
    with torch.no_grad():
        head.bottleneck.running_mean.uniform_(-1, 1)
        head.bottleneck.running_var.uniform_(0.5, 2)
        head.bottleneck.weight.uniform_(0.5, 1.5)
    head.eval()
    x = torch.randn(3, 16)
    out = head(x)
    bn = head.bottleneck
    expected = x if neck_feat == "before" else batch_norm_by_hand(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(out, expected)


def test_gradients():
    head = BNNeckHead(8, num_classes=4).train()
    x = torch.randn(5, 8, requires_grad=True)
    logits, feature = head(x)
    (logits.square().sum() + feature.square().sum()).backward()
    assert head.bottleneck.bias.grad is None
    assert head.bottleneck.weight.grad is not None and head.classifier.weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(feat_dim=0), "feat_dim"), (dict(feat_dim=8, num_classes=-1), "num_classes"),
    (dict(feat_dim=8, neck_feat="middle"), "neck_feat"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BNNeckHead(**kwargs)


def test_input_errors():
    head = BNNeckHead(8, num_classes=2)
    with pytest.raises(InputError, match=r"\[B, 8\]"):
        head(torch.randn(2, 9))
    with pytest.raises(InputError, match="at least 2"):
        head.train()(torch.randn(1, 8))
    assert head.eval()(torch.randn(1, 8)).shape == (1, 8)


def test_public_name():
    assert reid_ms.BNNeckHead is BNNeckHead


@pytest.mark.parametrize("make", [
    lambda: BNNeckHead(8, 5),
    lambda: reid_ms.MultiBranchBNNeckHead(8, 2, 5),
    lambda: reid_ms.DimAdapter(8, 16, True),
    lambda: reid_ms.MultiScaleSlidingWindow(8, (2,), "light"),
    lambda: reid_ms.ReIDModel(reid_ms.VitTrans(img_size=(32, 16), embed_dim=8, depth=1, num_heads=2), None,
                              BNNeckHead(8)),
])
def test_arguments_after_the_first_few_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional argument"):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: BNNeckHead(0), "BNNeckHead: feat_dim must be a positive int, got 0"),
    (lambda: BNNeckHead(8, num_classes=True), "BNNeckHead: num_classes must be an int >= 0, got True"),
    (lambda: reid_ms.MultiBranchBNNeckHead(8, 2.0), "MultiBranchBNNeckHead: branches must be a positive int"),
    (lambda: reid_ms.DimAdapter(8, -1), "DimAdapter: out_dim must be a positive int, got -1"),
    (lambda: reid_ms.MultiScaleSlidingWindow("8"), "MultiScaleSlidingWindow: feat_dim must be a positive int"),
])
def test_sizes_are_checked_by_name(make, message):
    with pytest.raises(reid_ms.ConfigError, match=re.escape(message)):
        make()
