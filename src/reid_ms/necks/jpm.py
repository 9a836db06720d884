"""TransReID's Jigsaw Patch Module (JPM): a global branch and shifted, shuffled local branches.

The backbone runs all blocks but the last, without its final norm; two copies of that block + norm make the
branches. The global branch ``b1`` runs on the whole sequence and keeps its CLS. The local branch ``b2``
(shared by the groups) runs once per group of patches, each group preceded by the backbone's CLS:

1. shift: drop the CLS and roll the patches left by ``shift_num - 1``, so the new sequence starts at
   sequence index ``shift_num`` (patch ``shift_num - 1``), the first ``shift_num - 1`` patches moved to
   the end (TransReID's ``begin=1`` arithmetic);
2. shuffle: when the count is not divisible by ``shuffle_groups``, append a copy of the second-to-last
   token; view as ``[groups, N / groups]`` and transpose, which interleaves the groups (new position
   ``j * groups + g`` holds old position ``g * (N / groups) + j``);
3. split: ``divide_length`` consecutive groups of ``L = N // divide_length`` tokens, ``N`` the patch count
   before padding; the remaining tokens are dropped (TransReID's choice: at stride 12 the 210 patches
   plus one pad token give 4 groups of 52, 3 tokens unused).

With ``rearrange=False`` step 1 and 2 are skipped (the patches are split in their raster order).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from reid_ms._validate import positive_int
from reid_ms.errors import ConfigError, InputError


class JigsawPatchNeck(nn.Module):
    """TransReID's JPM over the tokens of a backbone that stopped before its last block (see module doc).

    Args:
        block: the backbone's last transformer block; copied into both branches.
        norm: the backbone's final norm; copied into both branches.
        shift_num: the local sequence starts at sequence index ``shift_num`` (a roll of ``shift_num - 1``
            patches); TransReID's default 5.
        shuffle_groups: interleaved groups of the shuffle; default 2.
        divide_length: number of local branches (patch groups); default 4.
        rearrange: shift and shuffle before splitting (TransReID's default ``True``).

    ``b1`` and ``b2`` are ``nn.Sequential(block, norm)``, so the parameter names are TransReID's
    (``b1.0.*``, ``b1.1.*``, ``b2.0.*``, ``b2.1.*``).
    """

    def __init__(self, block: nn.Module, norm: nn.Module, *, shift_num: int = 5, shuffle_groups: int = 2,
                 divide_length: int = 4, rearrange: bool = True) -> None:
        super().__init__()
        self.shift_num = positive_int(shift_num, "shift_num", owner="JigsawPatchNeck")
        self.shuffle_groups = positive_int(shuffle_groups, "shuffle_groups", owner="JigsawPatchNeck")
        self.divide_length = positive_int(divide_length, "divide_length", owner="JigsawPatchNeck")
        if not isinstance(rearrange, bool):
            raise ConfigError(f"JigsawPatchNeck: rearrange must be True or False, got {rearrange!r}")
        self.rearrange = rearrange
        self.b1 = nn.Sequential(copy.deepcopy(block), copy.deepcopy(norm))
        self.b2 = nn.Sequential(copy.deepcopy(block), copy.deepcopy(norm))

    def patch_count_problem(self, num_patches: int) -> str | None:
        """Why ``num_patches`` patches cannot be split as configured, or ``None`` when they can."""
        n = num_patches
        if n < self.divide_length:
            return f"{n} patches cannot be split into divide_length={self.divide_length} non-empty groups"
        if not self.rearrange:
            return None
        if self.shift_num > n:
            return f"shift_num={self.shift_num} rolls past the {n} patches; use shift_num <= {n}"
        if n % self.shuffle_groups and (n < 2 or (n + 1) % self.shuffle_groups):
            # TransReID pads one copy of the second-to-last token, which suffices for two groups only
            return (f"{n} patches do not divide into shuffle_groups={self.shuffle_groups}, even with the one "
                    f"pad token; use a group count dividing {n} or {n + 1}")
        return None

    def local_groups(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + N, D]`` (CLS first) -> the patch groups ``[B, divide_length, N // divide_length, D]``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"JigsawPatchNeck expects tokens [B, 1 + N, D] (CLS first), got {shape}")
        b, n, d = tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]
        problem = self.patch_count_problem(n)
        if problem is not None:
            raise InputError(f"JigsawPatchNeck: {problem}")
        x = tokens[:, 1:]
        if self.rearrange:
            shift = self.shift_num - 1
            x = torch.cat([x[:, shift:], x[:, :shift]], dim=1)
            if n % self.shuffle_groups:
                x = torch.cat([x, x[:, -2:-1]], dim=1)
            x = x.reshape(b, self.shuffle_groups, -1, d).transpose(1, 2).reshape(b, -1, d)
        length = n // self.divide_length
        return x[:, :length * self.divide_length].reshape(b, self.divide_length, length, d)

    def global_branch(self, tokens: torch.Tensor) -> torch.Tensor:
        """``b1`` on the whole sequence: ``[B, 1 + N, D] -> [B, 1 + N, D]`` (the global feature is token 0)."""
        return self.b1(tokens)

    def local_branch(self, tokens: torch.Tensor) -> torch.Tensor:
        """The local CLS features: ``[B, 1 + N, D] -> [B, divide_length, D]``."""
        groups = self.local_groups(tokens)
        b, k, length, d = groups.shape
        cls = tokens[:, :1].unsqueeze(1).expand(b, k, 1, d)
        # the groups go through the shared b2 as one batch of B * k sequences (per-sequence operations only)
        seqs = torch.cat([cls, groups], dim=2).reshape(b * k, 1 + length, d)
        return self.b2(seqs)[:, 0].reshape(b, k, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` -> ``[B, 1 + divide_length, D]``: the global CLS, then the local CLS features."""
        return torch.cat([self.global_branch(tokens)[:, :1], self.local_branch(tokens)], dim=1)

    def extra_repr(self) -> str:
        return (f"shift_num={self.shift_num}, shuffle_groups={self.shuffle_groups}, "
                f"divide_length={self.divide_length}, rearrange={self.rearrange}")
