"""The re-ID training losses of TransReID and CLIP-ReID, equal to their code.

- :class:`TripletLoss`: batch-hard triplet loss on Euclidean distances, hard margin or soft margin.
- :class:`CrossEntropyLabelSmooth`: cross-entropy against label-smoothed targets.
- :class:`CenterLoss`: squared distance of each feature to its identity's learned centre.
- :class:`SupConLoss`: CLIP-ReID's supervised contrastive loss between two sets of features.
- :class:`ReIDLoss`: ID + triplet (+ centre) loss of a training step, including the per-branch weighting
  TransReID applies to the outputs of a JPM model.

Each loss returns a scalar tensor (the mean over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from reid_ms.errors import ConfigError, InputError

__all__ = ["TripletLoss", "CrossEntropyLabelSmooth", "CenterLoss", "SupConLoss", "ReIDLoss",
           "euclidean_dist", "hard_example_mining"]

# A model returns one tensor, or a JPM model one per branch (global first, then the local ones).
Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_features(features: torch.Tensor, pids: torch.Tensor, what: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InputError(f"{what} expects features of shape [B, D], got {shape}")
    if not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.shape[0] != features.shape[0]:
        shape = tuple(pids.shape) if isinstance(pids, torch.Tensor) else type(pids).__name__
        raise InputError(f"{what} expects one identity label per feature ([{features.shape[0]}]), got {shape}")


def _check_labels(pids: torch.Tensor, num_classes: int, what: str) -> None:
    if pids.dtype.is_floating_point or pids.dtype == torch.bool:
        raise InputError(f"{what} expects integer identity labels, got dtype {pids.dtype}")
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= num_classes):
        raise InputError(f"{what}: identity labels must lie in [0, {num_classes}), got labels from "
                         f"{int(pids.min())} to {int(pids.max())}; relabel the training ids 0..P-1 "
                         f"(reid_ms.data.load_dataset does) and build the classifier with num_classes=P")


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``[M, N]`` between ``x [M, D]`` and ``y [N, D]``.

    Computed as ``sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, min=1e-12))``, the form TransReID uses: the clamp keeps
    the square root's gradient finite where a distance is zero (an image against itself).
    """
    squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return squared.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative distance of each anchor: ``(d_ap [N], d_an [N])``.

    ``dist [N, N]`` holds the batch's pairwise distances, ``pids [N]`` its identities. The positives of an
    anchor include the anchor itself, as in TransReID, so an identity with one image in the batch gets
    ``d_ap`` = its self-distance. Every anchor needs at least one negative.
    """
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    if bool(same.all()):
        raise InputError("batch-hard triplet mining needs at least two identities in the batch, got only "
                         f"identity {int(pids[0])}; sample P x K batches (reid_ms.data.RandomIdentitySampler)")
    d_ap = torch.where(same, dist, dist.new_tensor(float("-inf"))).amax(dim=1)
    d_an = torch.where(same, dist.new_tensor(float("inf")), dist).amin(dim=1)
    return d_ap, d_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss, equal to TransReID's ``TripletLoss`` (its first return value).

    For each anchor, the farthest image of its identity (``d_ap``) and the closest image of another
    identity (``d_an``) in the batch; ``hard_factor`` ``h`` scales them to ``d_ap * (1 + h)`` and
    ``d_an * (1 - h)``. The loss is the batch mean of ``max(0, d_ap - d_an + margin)`` with a margin, or
    of ``log(1 + exp(-(d_an - d_ap)))`` with ``margin=None`` (the soft margin, TransReID's ``NO_MARGIN``).

    Args:
        margin: the hard margin, or None for the soft margin.
        hard_factor: ``h`` above; 0 leaves the distances as they are.
        normalize_feature: L2-normalise the features (``x / (|x| + 1e-12)``) before the distances.

    ``forward(features [B, D], pids [B]) -> scalar``.
    """

    def __init__(self, margin: Optional[float] = 0.3, hard_factor: float = 0.0,
                 normalize_feature: bool = False) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ConfigError(f"triplet margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = margin
        self.hard_factor = float(hard_factor)
        self.normalize_feature = normalize_feature

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        _check_features(features, pids, "TripletLoss")
        if self.normalize_feature:
            features = features / (features.norm(p=2, dim=-1, keepdim=True) + 1e-12)
        d_ap, d_an = hard_example_mining(euclidean_dist(features, features), pids)
        d_ap = d_ap * (1.0 + self.hard_factor)
        d_an = d_an * (1.0 - self.hard_factor)
        target = torch.ones_like(d_an)
        if self.margin is None:
            return F.soft_margin_loss(d_an - d_ap, target)
        return F.margin_ranking_loss(d_an, d_ap, target, margin=self.margin)

    def extra_repr(self) -> str:
        margin = "soft" if self.margin is None else self.margin
        return f"margin={margin}, hard_factor={self.hard_factor}, normalize_feature={self.normalize_feature}"


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against smoothed one-hot targets, equal to TransReID's ``CrossEntropyLabelSmooth``.

    The target of a sample of class ``y`` is ``(1 - epsilon) * onehot(y) + epsilon / num_classes``; the loss
    is the batch mean of ``-sum_c target_c * log_softmax(logits)_c``. ``epsilon=0`` is plain cross-entropy.

    ``forward(logits [B, num_classes], pids [B]) -> scalar``.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= epsilon < 1.0:
            raise ConfigError(f"label smoothing epsilon must lie in [0, 1), got {epsilon}")
        self.num_classes = num_classes
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"CrossEntropyLabelSmooth expects logits of shape [B, {self.num_classes}], got {shape}")
        _check_features(logits, pids, "CrossEntropyLabelSmooth")
        _check_labels(pids, self.num_classes, "CrossEntropyLabelSmooth")
        log_probs = F.log_softmax(logits, dim=1)
        true_class = log_probs.gather(1, pids.long().unsqueeze(1)).squeeze(1)
        loss = -(1.0 - self.epsilon) * true_class - (self.epsilon / self.num_classes) * log_probs.sum(1)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"


class CenterLoss(nn.Module):
    """Centre loss, equal to TransReID's ``CenterLoss``: the batch mean of ``|x_i - c_{y_i}|^2``.

    Each squared distance is clamped to ``[1e-12, 1e12]``. The centres are the parameter
    ``centers [num_classes, feat_dim]``, initialised from a standard normal; TransReID trains them with
    their own SGD optimizer (learning rate 0.5) and divides their gradient by the loss weight.

    ``forward(features [B, feat_dim], pids [B]) -> scalar``.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ConfigError(f"CenterLoss needs num_classes >= 1 and feat_dim >= 1, got {num_classes}, {feat_dim}")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        _check_features(features, pids, "CenterLoss")
        if features.shape[1] != self.feat_dim:
            raise InputError(f"CenterLoss was built for {self.feat_dim}-wide features, got {features.shape[1]}")
        _check_labels(pids, self.num_classes, "CenterLoss")
        squared = (features - self.centers[pids.long()]).pow(2).sum(1)
        return squared.clamp(min=1e-12, max=1e12).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"


class SupConLoss(nn.Module):
    """CLIP-ReID's supervised contrastive loss from the features ``a`` to the features ``b``.

    ``forward(a [N, D], b [M, D], a_pids [N], b_pids [M]) -> scalar``. With ``s = a @ b.T / temperature``,
    each row ``i`` scores ``mean over positives j of log softmax(s_i)_j``, the positives being the
    columns with ``b_pids[j] == a_pids[i]``; the loss is minus the mean over rows. CLIP-ReID calls it both
    ways: text-to-image ``(text, image, pids, pids)`` and image-to-text ``(image, text, pids, pids)``. The
    features are used as given (CLIP-ReID passes them unnormalised). Every row needs at least one positive.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_pids: torch.Tensor, b_pids: torch.Tensor) -> torch.Tensor:
        _check_features(a, a_pids, "SupConLoss (a, a_pids)")
        _check_features(b, b_pids, "SupConLoss (b, b_pids)")
        if a.shape[1] != b.shape[1]:
            raise InputError(f"SupConLoss: a and b must have the same width, got {a.shape[1]} and {b.shape[1]}")
        positive = (a_pids.unsqueeze(1) == b_pids.unsqueeze(0)).to(a.dtype)
        counts = positive.sum(1)
        if bool((counts == 0).any()):
            missing = a_pids[counts == 0].unique().tolist()
            raise InputError(f"SupConLoss: identities {missing} of a have no feature in b; every row needs a "
                             f"positive (pass the labels of both sets)")
        logits = a @ b.t() / self.temperature
        # subtracting the detached row maximum changes nothing mathematically; it keeps exp() finite
        logits = logits - logits.amax(dim=1, keepdim=True).detach()
        log_prob = logits - logits.exp().sum(1, keepdim=True).log()
        return -((positive * log_prob).sum(1) / counts).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def _per_branch(loss_fn: nn.Module, outputs: Outputs, pids: torch.Tensor) -> torch.Tensor:
    """One loss over a model's output, or TransReID's JPM weighting over a sequence of branch outputs."""
    if isinstance(outputs, torch.Tensor):
        return loss_fn(outputs, pids)
    outputs = list(outputs)
    if not outputs:
        raise InputError("ReIDLoss got an empty sequence of branch outputs")
    if len(outputs) == 1:
        return loss_fn(outputs[0], pids)
    local = sum(loss_fn(out, pids) for out in outputs[1:]) / (len(outputs) - 1)
    return 0.5 * loss_fn(outputs[0], pids) + 0.5 * local


class ReIDLoss(nn.Module):
    """A training step's loss: ``id_weight * ID + triplet_weight * triplet (+ center_weight * centre)``.

    The ID loss is :class:`CrossEntropyLabelSmooth` (``label_smoothing=0`` is plain cross-entropy), the
    triplet loss :class:`TripletLoss` with ``margin`` (None: soft margin). Called
    ``(logits, features, pids)`` with what a model returns in training: one ``[B, C]`` / ``[B, D]`` tensor
    each, or, for a JPM model, a sequence per branch (global first). A sequence is weighted as TransReID
    does: ``0.5 * loss(global) + 0.5 * mean(loss(local_k))``, for the ID and the triplet loss alike.
    The centre loss (``center_weight > 0``, which needs ``feat_dim``) is taken on the global feature;
    its centres are ``self.center.centers``.

    ``logits`` may be None when ``id_weight`` is 0 (a model built without a classifier).
    """

    def __init__(self, num_classes: int, id_weight: float = 1.0, triplet_weight: float = 1.0,
                 label_smoothing: float = 0.0, margin: Optional[float] = None, center_weight: float = 0.0,
                 feat_dim: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.id_weight = float(id_weight)
        self.triplet_weight = float(triplet_weight)
        self.center_weight = float(center_weight)
        self.id_loss = CrossEntropyLabelSmooth(num_classes, epsilon=label_smoothing)
        self.triplet = TripletLoss(margin=margin)
        self.center: Optional[CenterLoss] = None
        if center_weight:
            if feat_dim is None:
                raise ConfigError("ReIDLoss with center_weight > 0 needs feat_dim (the width of the features)")
            self.center = CenterLoss(num_classes, feat_dim)

    def terms(self, logits: Optional[Outputs], features: Outputs, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms with a non-zero weight: ``{"id", "triplet", "center"}`` (scalars)."""
        out: dict[str, torch.Tensor] = {}
        if self.id_weight:
            if logits is None:
                raise InputError("ReIDLoss got no logits but id_weight is not 0; build the model with "
                                 "num_classes > 0 or set id_weight=0")
            out["id"] = _per_branch(self.id_loss, logits, pids)
        if self.triplet_weight:
            out["triplet"] = _per_branch(self.triplet, features, pids)
        if self.center is not None:
            global_feature = features if isinstance(features, torch.Tensor) else list(features)[0]
            out["center"] = self.center(global_feature, pids)
        return out

    def forward(self, logits: Optional[Outputs], features: Outputs, pids: torch.Tensor) -> torch.Tensor:
        weights = {"id": self.id_weight, "triplet": self.triplet_weight, "center": self.center_weight}
        terms = self.terms(logits, features, pids)
        if not terms:
            raise ConfigError("ReIDLoss has every weight at 0; nothing to train")
        return torch.stack([weights[name] * value for name, value in terms.items()]).sum()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, id_weight={self.id_weight}, "
                f"triplet_weight={self.triplet_weight}, center_weight={self.center_weight}")
