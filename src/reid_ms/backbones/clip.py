"""CLIP-ReID's visual encoder: CLIP's ViT with overlapping patches and a camera/view embedding on the CLS.

Parameter names are OpenAI CLIP's visual names (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``, ``proj``) plus CLIP-ReID's ``cv_embed``, so
OpenAI, open_clip and CLIP-ReID checkpoints load through :func:`reid_ms.load_clip_weights` by name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU, trunc_normal_
from torch import nn

from reid_ms.backbones._common import BlockBackbone, Label, check_transformer
from reid_ms.kernels.attention import self_attention

# CLIP's LayerNorm epsilon (PyTorch's default); TransReID's ViT uses 1e-6.
CLIP_NORM_EPS = 1e-5


class ClipAttention(nn.Module):
    """Multi-head self-attention on batch-first tokens with CLIP's parameter names.

    Written here instead of using ``nn.MultiheadAttention`` (whose names CLIP's files carry): that module
    is sequence-first by default and its general path is slower; this one keeps the names
    (``in_proj_weight`` q/k/v stacked, ``in_proj_bias``, ``out_proj``) and calls
    :func:`reid_ms.kernels.attention.self_attention` (SDPA, or a faster per-image path in CPU training).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``."""
        return self.out_proj(self_attention(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.num_heads))


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with QuickGELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.attn = ClipAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, width]`` -> ``[B, N, width]``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    """The stack of ``block``s, under CLIP's name ``transformer.resblocks``; :class:`ClipVisual` runs them."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 block: type[ResidualAttentionBlock] = ResidualAttentionBlock) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[block(width, heads, mlp_ratio) for _ in range(layers)])

    def init_weights(self) -> None:
        """CLIP's initialisation of the blocks (OpenAI / open_clip standard deviations, zero attention biases)."""
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        stds = {"attn.in_proj_weight": attn_std, "attn.out_proj.weight": proj_std,
                "mlp.c_fc.weight": (2 * self.width) ** -0.5, "mlp.c_proj.weight": proj_std}
        for block in self.resblocks:
            for name, param in block.named_parameters():
                if name in stds:
                    nn.init.normal_(param, std=stds[name])
                elif name in ("attn.in_proj_bias", "attn.out_proj.bias"):
                    nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, width]`` -> ``[B, N, width]`` through the blocks' own modules."""
        return self.resblocks(x)


class ClipVisual(BlockBackbone):
    """CLIP-ReID's image encoder (defaults: CLIP ViT-B/16 at 256x128), returning every token.

    ``cls = class_embedding + sie_coef * cv_embed[row]`` (the camera/view vector on the CLS token only,
    before the position embedding; ``row = cam * view_num + view`` with both labels, else the one label),
    ``tokens = ln_pre(cat(cls, patches) + positional_embedding)``, then the blocks and ``ln_post`` on every
    token; ``forward(..., project=True)`` multiplies all tokens by ``proj`` (CLIP-ReID's ``xproj``),
    ``project=False`` returns them before it (CLIP-ReID's ``x12``).

    Args:
        img_size: input ``(height, width)``; an int means square.
        patch_size: patch (kernel) size of ``conv1``.
        stride_size: stride of ``conv1``; smaller than the patch gives overlapping patches (CLIP-ReID's 12).
        width: token width inside the encoder.
        layers: number of residual attention blocks.
        heads: attention heads; must divide ``width``.
        output_dim: width after the projection ``proj``.
        camera_num: cameras in the camera/view table (0: no camera labels).
        view_num: views in the camera/view table (0: no view labels).
        sie_coef: scale of the camera/view vector (CLIP-ReID uses 1.0).
        in_chans: image channels.
        mlp_ratio: hidden width of the MLP relative to ``width``.
    """

    def __init__(self, img_size: int | Sequence[int] = (256, 128), patch_size: int | Sequence[int] = 16,
                 stride_size: int | Sequence[int] = 16, *, width: int = 768, layers: int = 12, heads: int = 12,
                 output_dim: int = 512, camera_num: int = 0, view_num: int = 0, sie_coef: float = 1.0,
                 in_chans: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__(img_size, patch_size, stride_size, in_chans, camera_num, view_num, sie_coef)
        check_transformer("ClipVisual", ("width", width), ("heads", heads), mlp_ratio,
                          "CLIP ViT-B/16: width=768, heads=12", layers=layers, output_dim=output_dim)
        self.width = self.embed_dim = width
        self.layers, self.heads = layers, heads
        self.output_dim = self.out_dim = output_dim
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=self.patch_size, stride=self.stride_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(1 + self.num_patches, width))
        self.cv_embed = nn.Parameter(torch.empty(self.table_rows, width)) if self.table_rows else None
        self.ln_pre = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.transformer = ClipTransformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation (OpenAI/open_clip text-tower standard deviations); ``cv_embed`` as CLIP-ReID."""
        scale = self.width ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()
        if self.cv_embed is not None:
            trunc_normal_(self.cv_embed, std=0.02)

    activation = "quick_gelu"
    block_fields = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_1.eps")

    def block_stack(self) -> nn.Sequential:
        return self.transformer.resblocks

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Additive embeddings, excluded from weight decay like open_clip's position and class embeddings."""
        return {"positional_embedding", "class_embedding", "cv_embed"}

    def forward_features(
        self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None, project: bool = True,
    ) -> torch.Tensor:
        """``[B, in_chans, img_h, img_w]`` -> ``[B, 1 + H*W, output_dim]`` (``[B, 1 + H*W, width]`` unprojected).

        The CLS token comes first, then the patches row by row.
        """
        side = self._side_info(images, cam_label, view_label, self.cv_embed, self.conv1.weight.dtype)
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(images.shape[0], 1, -1)
        if side is not None:
            cls = cls + side
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.forward_blocks(self.ln_pre(x)))
        return x @ self.proj if project else x

    def forward(
        self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None, project: bool = True,
    ) -> torch.Tensor:
        """Every token after ``ln_post``, projected by ``proj`` unless ``project=False``; see the class docstring."""
        return self.forward_features(images, cam_label, view_label, project)
