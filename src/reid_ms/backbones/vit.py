"""TransReID's Vision Transformer: overlapping patches and a camera/view (SIE) embedding on every token.

The blocks are timm's, so parameter names are timm's ViT names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.*``, ``norm``) plus ``sie_embed``; ImageNet and TransReID checkpoints
load through :func:`reid_ms.load_vit_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from reid_ms._validate import real_number
from reid_ms.backbones._common import BlockBackbone, Label, check_transformer, grid_size
from reid_ms.kernels.attention import self_attention


class OverlapPatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution; the stride may be smaller than the patch.

    timm's ``PatchEmbed`` ties the stride to the patch size, TransReID's stride 12 needs them apart.
    """

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], stride_size: tuple[int, int],
                 in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid_size = grid_size(img_size, patch_size, stride_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride_size, bias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, img_h, img_w]`` -> ``[B, H*W, D]``, tokens row by row."""
        return self.proj(images).flatten(2).transpose(1, 2)


class VitAttention(Attention):
    """timm's ``Attention`` (same parameters, same results) computing through
    :func:`reid_ms.kernels.attention.self_attention`, which is faster for CPU training.

    :class:`VitTrans` builds its timm blocks with this class as their ``attn_layer`` (it adds no state).
    Anything this forward does not cover (masks, causal attention, q/k norms, gates) is timm's own forward.
    """

    def _plain(self) -> bool:
        return (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
                and getattr(self, "gate", None) is None)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if not self._plain():
            return super().forward(x)  # older timm versions take no mask arguments: none passed when none given
        x = self_attention(self.qkv(x), self.num_heads, self.attn_drop.p if self.training else 0.0)
        norm = getattr(self, "norm", None)  # older timm versions have no output norm
        return self.proj_drop(self.proj(x if norm is None else norm(x)))


class VitTrans(BlockBackbone):
    """TransReID's ViT backbone (defaults: ViT-B/16), returning every token after the final LayerNorm.

    ``tokens = cat(cls, patches) + pos_embed + sie_coef * sie_embed[row]``, the camera/view vector added
    to every token; ``row = cam * view_num + view`` with both labels, else the one label. Then the
    blocks and ``norm``. For JPM-style heads the pieces are usable alone: :meth:`embed`,
    :meth:`forward_blocks` (optionally stopping early) and ``norm``.
    """

    def __init__(self, img_size: int | Sequence[int] = (256, 128), patch_size: int | Sequence[int] = 16,
                 stride_size: int | Sequence[int] = 16, *, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 camera_num: int = 0, view_num: int = 0, sie_coef: float = 3.0) -> None:
        super().__init__(img_size, patch_size, stride_size, in_chans, camera_num, view_num, sie_coef)
        check_transformer("VitTrans", ("embed_dim", embed_dim), ("num_heads", num_heads), mlp_ratio,
                          "ViT-B: embed_dim=768, num_heads=12", depth=depth)
        for name, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                            ("drop_path_rate", drop_path_rate)):
            real_number(value, name, low=0.0, high=1.0, high_open=True, owner="VitTrans")
        self.embed_dim = self.out_dim = embed_dim
        self.patch_embed = OverlapPatchEmbed(self.img_size, self.patch_size, self.stride_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.sie_embed = nn.Parameter(torch.zeros(self.table_rows, 1, embed_dim)) if self.table_rows else None
        self.pos_drop = nn.Dropout(drop_rate)

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        # on the CPU explicitly, so the model can also be built under `with torch.device("meta")`
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=nn.GELU,
                  norm_layer=norm_layer,  # type: ignore[arg-type]  # timm annotates a class, calls any factory
                  attn_layer=VitAttention)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # TransReID's initialisation, so a model trained from these starting points behaves like theirs.
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.sie_embed is not None:
            trunc_normal_(self.sie_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        conv = self.patch_embed.proj
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers should not decay (timm's convention)."""
        return {"pos_embed", "cls_token", "sie_embed"}

    block_fields = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                    "mlp.fc2.bias", "norm1.eps")

    def block_stack(self) -> nn.Sequential:
        return self.blocks

    def embed(self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> tokens before the blocks ``[B, 1 + H*W, D]``, CLS first."""
        side = self._side_info(images, cam_label, view_label, self.sie_embed, self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        if side is not None:
            x = x + side  # [B, 1, D] broadcast: the same camera/view vector on CLS and every patch
        return self.pos_drop(x)

    def forward_features(self, images: torch.Tensor, cam_label: Label = None,
                         view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> every token after the final norm ``[B, 1 + H*W, D]``."""
        return self.norm(self.forward_blocks(self.embed(images, cam_label, view_label)))

    def forward(self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> every token after the final norm ``[B, 1 + H*W, D]``."""
        return self.forward_features(images, cam_label, view_label)
