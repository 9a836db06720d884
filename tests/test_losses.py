"""reid_ms.losses against oracles written from the originals' formulas (loops in float64) or by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reid_ms import losses
from reid_ms.errors import ConfigError, InputError


def _dist(a: list[float], b: list[float]) -> float:
    squared = sum((x - y) ** 2 for x, y in zip(a, b))
    return math.sqrt(max(squared, 1e-12))


def _triplet_oracle(feats: torch.Tensor, pids: list[int], margin, hard_factor=0.0, normalize=False) -> float:
    rows = feats.double().tolist()
    if normalize:
        rows = [[x / (math.sqrt(sum(v * v for v in r)) + 1e-12) for x in r] for r in rows]
    total = 0.0
    for i, anchor in enumerate(rows):
        d_ap = max(_dist(anchor, rows[j]) for j in range(len(rows)) if pids[j] == pids[i]) * (1 + hard_factor)
        d_an = min(_dist(anchor, rows[j]) for j in range(len(rows)) if pids[j] != pids[i]) * (1 - hard_factor)
        if margin is None:
            total += math.log(1 + math.exp(-(d_an - d_ap)))
        else:
            total += max(0.0, d_ap - d_an + margin)
    return total / len(rows)


def test_triplet_worked_by_hand():
    # points on a line: ids 0 at 0 and 1, id 1 at 3 and 6
    feats = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    pids = torch.tensor([0, 0, 1, 1])
    # d_ap = 1, 1, 3, 3; d_an = 3, 2, 2, 5 -> hinge(0.3) = 0, 0, 1.3, 0
    assert losses.TripletLoss(margin=0.3)(feats, pids).item() == pytest.approx(1.3 / 4, abs=1e-6)
    soft = sum(math.log1p(math.exp(-(an - ap))) for ap, an in ((1, 3), (1, 2), (3, 2), (3, 5))) / 4
    assert losses.TripletLoss(margin=None)(feats, pids).item() == pytest.approx(soft, abs=1e-6)


@settings(max_examples=25, derandomize=True, deadline=None)
@given(ids=st.integers(2, 5), k=st.integers(1, 4), dim=st.integers(1, 9),
       margin=st.sampled_from([None, 0.0, 0.3, 1.0]), hard=st.sampled_from([0.0, 0.1, 0.5]),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_triplet_matches_formula(ids, k, dim, margin, hard, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(ids * k, dim, generator=g, dtype=torch.float64)
    pids = torch.arange(ids).repeat_interleave(k)[torch.randperm(ids * k, generator=g)]
    got = losses.TripletLoss(margin=margin, hard_factor=hard, normalize_feature=normalize)(feats, pids)
    assert got.item() == pytest.approx(_triplet_oracle(feats, pids.tolist(), margin, hard, normalize), rel=1e-9, abs=1e-12)


def test_triplet_unbalanced_batch_and_gradient():
    # an id with one image (its d_ap is the self-distance, sqrt(1e-12)) and an id with three
    feats = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    pids = [0, 1, 1, 1, 2, 2]
    loss = losses.TripletLoss(margin=None)(feats, torch.tensor(pids))
    assert loss.item() == pytest.approx(_triplet_oracle(feats.detach(), pids, None), rel=1e-9)
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_triplet_errors():
    with pytest.raises(InputError, match="two identities"):
        losses.TripletLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[B, D\]"):
        losses.TripletLoss()(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="one identity label per feature"):
        losses.TripletLoss()(torch.randn(4, 3), torch.tensor([0, 1, 0]))
    with pytest.raises(ConfigError):
        losses.TripletLoss(margin=-1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smooth_matches_formula(eps):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    expected = 0.0
    for row, y in zip(logits.tolist(), pids.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        target = [(1 - eps) * (c == y) + eps / 5 for c in range(5)]
        expected += -sum(t * (v - log_z) for t, v in zip(target, row))
    got = losses.CrossEntropyLabelSmooth(num_classes=5, epsilon=eps)(logits, pids)
    assert got.item() == pytest.approx(expected / 7, rel=1e-10)


def test_label_smooth_by_hand():
    # two classes, logits (0, 0): log p = log 1/2 for both, whatever the smoothing
    loss = losses.CrossEntropyLabelSmooth(2, 0.1)(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_label_smooth_errors():
    ce = losses.CrossEntropyLabelSmooth(num_classes=3)
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        ce(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"\[B, 3\]"):
        ce(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="integer"):
        ce(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError):
        losses.CrossEntropyLabelSmooth(3, epsilon=1.0)


def test_center_loss():
    center = losses.CenterLoss(num_classes=3, feat_dim=2)
    assert center.centers.shape == (3, 2) and center.centers.requires_grad
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    feats = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, 1.0]], requires_grad=True)
    # |(3,4)-(0,0)|^2 = 25, |(1,1)-(1,1)|^2 = 0 -> clamped to 1e-12, |(2,1)-(1,1)|^2 = 1
    loss = center(feats, torch.tensor([0, 1, 1]))
    assert loss.item() == pytest.approx((25 + 1e-12 + 1) / 3, abs=1e-6)
    loss.backward()
    # d/dc_0 of 25/3 is -2 (x - c) / 3
    assert torch.allclose(center.centers.grad[0], torch.tensor([-2.0, -8.0 / 3]))
    assert torch.equal(center.centers.grad[2], torch.zeros(2))
    with pytest.raises(InputError, match="2-wide"):
        center(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        center(torch.randn(2, 2), torch.tensor([0, -1]))


def _supcon_oracle(a: torch.Tensor, b: torch.Tensor, a_pids: list[int], b_pids: list[int], t: float) -> float:
    total = 0.0
    for i, row in enumerate(a.double().tolist()):
        scores = [sum(x * y for x, y in zip(row, col)) / t for col in b.double().tolist()]
        log_z = math.log(sum(math.exp(s) for s in scores))
        pos = [s - log_z for s, p in zip(scores, b_pids) if p == a_pids[i]]
        total += -sum(pos) / len(pos)
    return total / len(a_pids)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_supcon_matches_formula(temperature):
    g = torch.Generator().manual_seed(3)
    text = torch.randn(4, 6, generator=g, dtype=torch.float64)
    image = torch.randn(8, 6, generator=g, dtype=torch.float64)
    t_pids, i_pids = [0, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3]
    loss = losses.SupConLoss(temperature)
    got_t2i = loss(text, image, torch.tensor(t_pids), torch.tensor(i_pids))
    got_i2t = loss(image, text, torch.tensor(i_pids), torch.tensor(t_pids))
    assert got_t2i.item() == pytest.approx(_supcon_oracle(text, image, t_pids, i_pids, temperature), rel=1e-10)
    assert got_i2t.item() == pytest.approx(_supcon_oracle(image, text, i_pids, t_pids, temperature), rel=1e-10)
    assert got_t2i.item() != pytest.approx(got_i2t.item())


def test_supcon_by_hand_and_errors():
    # one row, two columns with scores 0 and 0, the first positive: -log(1/2)
    got = losses.SupConLoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, -1.0]]),
                              torch.tensor([7]), torch.tensor([7, 8]))
    assert got.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(InputError, match=r"identities \[5\]"):
        losses.SupConLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="same width"):
        losses.SupConLoss()(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_reid_loss_single_branch():
    g = torch.Generator().manual_seed(4)
    logits, feats = torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    crit = losses.ReIDLoss(4, id_weight=0.25, triplet_weight=1.0, label_smoothing=0.1, margin=0.3)
    expected = 0.25 * losses.CrossEntropyLabelSmooth(4, 0.1)(logits, pids) + losses.TripletLoss(0.3)(feats, pids)
    assert torch.allclose(crit(logits, feats, pids), expected)
    # label_smoothing 0 is plain cross-entropy
    plain = losses.ReIDLoss(4, triplet_weight=0.0)(logits, feats, pids)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, pids))


def test_reid_loss_jpm_weighting():
    g = torch.Generator().manual_seed(5)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = tuple(torch.randn(6, 3, generator=g) for _ in range(5))
    feats = tuple(torch.randn(6, 4, generator=g) for _ in range(5))
    ce, tri = torch.nn.functional.cross_entropy, losses.TripletLoss(None)
    # TransReID: 0.5 * global + 0.5 * mean of the four local branches
    id_expected = 0.5 * ce(logits[0], pids) + 0.5 * sum(ce(x, pids) for x in logits[1:]) / 4
    tri_expected = 0.5 * tri(feats[0], pids) + 0.5 * sum(tri(x, pids) for x in feats[1:]) / 4
    crit = losses.ReIDLoss(3)
    terms = crit.terms(logits, feats, pids)
    assert torch.allclose(terms["id"], id_expected) and torch.allclose(terms["triplet"], tri_expected)
    assert torch.allclose(crit(list(logits), list(feats), pids), id_expected + tri_expected)


def test_reid_loss_center_and_errors():
    crit = losses.ReIDLoss(3, center_weight=0.0005, feat_dim=4)
    assert crit.center.centers.shape == (3, 4)
    feats, pids = (torch.randn(6, 4), torch.randn(6, 4)), torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.randn(6, 3)
    terms = crit.terms(logits, feats, pids)
    assert torch.allclose(terms["center"], crit.center(feats[0], pids))
    assert torch.allclose(crit(logits, feats, pids), terms["id"] + terms["triplet"] + 0.0005 * terms["center"])
    with pytest.raises(ConfigError, match="feat_dim"):
        losses.ReIDLoss(3, center_weight=1.0)
    with pytest.raises(InputError, match="no logits"):
        losses.ReIDLoss(3)(None, feats[0], pids)
    assert torch.allclose(losses.ReIDLoss(3, id_weight=0)(None, feats[0], pids), losses.TripletLoss(None)(feats[0], pids))
