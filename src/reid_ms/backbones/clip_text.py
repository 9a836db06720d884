"""CLIP's text tower and CLIP-ReID's learned identity prompts.

:class:`ClipText` is CLIP ViT-B/16's text transformer under OpenAI's names (``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``), so OpenAI,
open_clip and CLIP-ReID files load through :func:`reid_ms.load_clip_weights`. Its blocks are
:class:`~reid_ms.backbones.clip.ResidualAttentionBlock` (QuickGELU, LayerNorm eps 1e-5) with causal attention.

:class:`PromptLearner` is CLIP-ReID's: the embedded template ("A photo of a X X X X person.") stays fixed,
each identity's ``n_ctx`` learned vectors take the place of its ``X`` tokens, and the text feature is read
at the end-of-text token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from reid_ms._validate import positive_int
from reid_ms.backbones._common import check_transformer
from reid_ms.backbones.clip import CLIP_NORM_EPS, ClipAttention, ClipTransformer, ResidualAttentionBlock
from reid_ms.errors import ConfigError, InputError

logger = logging.getLogger("reid_ms.clip_text")

PERSON_TEMPLATE = "A photo of a X X X X person."
VEHICLE_TEMPLATE = "A photo of a X X X X vehicle."
# Data sets of vehicles (reid_ms.data names and CLIP-ReID's): they get CLIP-ReID's vehicle template.
VEHICLE_DATASETS = frozenset({"veri", "vehicleid", "veri776"})


def template_for(dataset: str) -> str:
    """CLIP-ReID's prompt template for a data set name: the vehicle one for VeRi / VehicleID, else the person one."""
    return VEHICLE_TEMPLATE if dataset.lower() in VEHICLE_DATASETS else PERSON_TEMPLATE


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer  # imported on first use: open_clip is slow to import

    return SimpleTokenizer(context_length=context_length)


class CausalClipAttention(ClipAttention):
    """:class:`ClipAttention` where each token attends to itself and the tokens before it (CLIP's text mask).

    Always SDPA with ``is_causal=True``: the per-image training path of
    :mod:`reid_ms.kernels.attention` has no mask.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class CausalResidualAttentionBlock(ResidualAttentionBlock):
    """CLIP's text block: :class:`ResidualAttentionBlock` with :class:`CausalClipAttention`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(width, heads, mlp_ratio)
        self.attn = CausalClipAttention(width, heads)


class TextTransformer(ClipTransformer):
    """The text blocks under CLIP's name ``transformer.resblocks``; plain module path, optional checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(width, layers, heads, mlp_ratio, block=CausalResidualAttentionBlock)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, width]`` -> ``[B, L, width]``."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.resblocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.resblocks(x)


class ClipText(nn.Module):
    """CLIP's text encoder (defaults: CLIP ViT-B/16's: 77 tokens, width 512, 12 layers, 8 heads, output 512).

    ``encode(token_ids)`` = ``ln_final(blocks(token_embedding(ids) + positional_embedding))`` read at the
    end-of-text token (the largest id of each row) and multiplied by ``text_projection``; equal to
    open_clip's ``encode_text`` with the same weights (QuickGELU models). :meth:`encode_embedded` takes
    already embedded tokens, which is how :class:`PromptLearner` feeds learned vectors in.

    Args:
        context_length: longest token sequence (rows of ``positional_embedding``).
        vocab_size: rows of ``token_embedding`` (CLIP's BPE vocabulary: 49408).
        width: token width inside the encoder.
        layers: number of residual attention blocks.
        heads: attention heads; must divide ``width``.
        output_dim: width after ``text_projection`` (the image side's ``output_dim``).
        mlp_ratio: hidden width of the MLP relative to ``width``.
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, layers: int = 12,
                 heads: int = 8, output_dim: int = 512, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        check_transformer("ClipText", ("width", width), ("heads", heads), mlp_ratio,
                          "CLIP ViT-B/16's text tower: width=512, heads=8", context_length=context_length,
                          vocab_size=vocab_size, layers=layers, output_dim=output_dim)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.width, self.layers, self.heads = width, layers, heads
        self.output_dim = self.out_dim = output_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TextTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's text-tower initialisation (OpenAI / open_clip standard deviations)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)
        self.transformer.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """The additive position embedding, excluded from weight decay as in open_clip."""
        return {"positional_embedding"}

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """open_clip's tokenizer (CLIP's BPE, lower-cased): ``[len(texts), context_length]`` int64 ids,
        start-of-text first, end-of-text after the last word, zeros after; too long a text is cut and
        still ends in end-of-text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return _tokenizer(self.context_length)(texts).to(self.token_embedding.weight.device)

    def _check_ids(self, token_ids: torch.Tensor) -> None:
        if not isinstance(token_ids, torch.Tensor):
            raise InputError(f"ClipText expects token ids [B, L] (int64, from text.tokenize(...)), got "
                             f"{type(token_ids).__name__}")
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"ClipText expects token ids [B, L] (int64, from text.tokenize(...)), got "
                             f"{token_ids.dtype} of shape {tuple(token_ids.shape)}")
        b, length = token_ids.shape
        if b == 0 or length == 0:
            raise InputError(f"ClipText got an empty batch of token ids (shape {tuple(token_ids.shape)})")
        if length > self.context_length:
            raise InputError(f"ClipText takes at most {self.context_length} tokens, got {length}; tokenize with "
                             f"text.tokenize(...), which cuts long texts to the context length")
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.vocab_size}) (vocab_size), got values in "
                             f"[{lo}, {hi}]; use text.tokenize(...) and a model built with CLIP's vocabulary")

    def encode_embedded(self, embedded: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedded tokens ``[B, L, width]`` -> text features ``[B, output_dim]``.

        ``token_ids`` ``[B, L]`` (or ``[1, L]``, shared by every row) only says where each row's
        end-of-text token is: its largest id (CLIP-ReID's ``TextEncoder.forward``).
        """
        if embedded.dim() != 3 or embedded.shape[-1] != self.width or embedded.shape[1] > self.context_length:
            raise InputError(f"ClipText.encode_embedded expects [B, L <= {self.context_length}, {self.width}] "
                             f"embedded tokens, got shape {tuple(embedded.shape)}")
        if token_ids.shape[-1] != embedded.shape[1] or token_ids.shape[0] not in (1, embedded.shape[0]):
            raise InputError(f"token ids of shape {tuple(token_ids.shape)} do not match embedded tokens of "
                             f"shape {tuple(embedded.shape)}: expected [B or 1, {embedded.shape[1]}]")
        x = embedded + self.positional_embedding[: embedded.shape[1]].to(embedded.dtype)
        x = self.ln_final(self.transformer(x))
        eot = token_ids.argmax(dim=-1).expand(x.shape[0])
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection.to(x.dtype)

    def encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` (``L <= context_length``, from :meth:`tokenize`) -> text features ``[B, output_dim]``."""
        self._check_ids(token_ids)
        token_ids = token_ids.long()
        return self.encode_embedded(self.token_embedding(token_ids), token_ids)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(token_ids)


class PromptLearner(nn.Module):
    """CLIP-ReID's learned identity prompts over a frozen-template :class:`ClipText`.

    The template is tokenised and embedded once with ``text.token_embedding``: the tokens before its
    ``X`` run are ``token_prefix`` ``[1, p, width]``, those after it ``token_suffix`` ``[1, s, width]``
    (buffers, CLIP-ReID's names). Identity ``i``'s prompt is ``cat(token_prefix, cls_ctx[i], token_suffix)``
    and ``forward(pids)`` runs it through ``text`` and reads the end-of-text token.

    Args:
        text: the text tower; it becomes the submodule ``text`` (load its weights before building, or load
            the file into this module, which re-embeds the template).
        num_classes: number of identities (rows of ``cls_ctx``).
        template: a sentence with ``n_ctx`` consecutive ``X`` words; CLIP-ReID's person one by default,
            :data:`VEHICLE_TEMPLATE` for vehicle data sets (:func:`template_for`).
        n_ctx: learned vectors per identity (the number of ``X`` in the template).

    Attributes:
        cls_ctx: ``[num_classes, n_ctx, width]`` parameter, normal with std 0.02 (CLIP-ReID's init).
        token_ids: the tokenised template ``[1, context_length]`` (non-persistent buffer).
    """

    token_ids: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor

    def __init__(self, text: ClipText, num_classes: int, template: str = PERSON_TEMPLATE, n_ctx: int = 4) -> None:
        super().__init__()
        if not isinstance(text, ClipText):
            raise ConfigError(f"PromptLearner takes a reid_ms.ClipText, got {type(text).__name__}")
        self.text = text
        self.num_classes = positive_int(num_classes, "num_classes", owner="PromptLearner")
        self.n_ctx = positive_int(n_ctx, "n_ctx", owner="PromptLearner")
        self.template = template
        ids = text.tokenize(template)
        x_id = _tokenizer(text.context_length).encoder["x</w>"]
        where = (ids[0] == x_id).nonzero().flatten().tolist()
        consecutive = bool(where) and where == list(range(where[0], where[0] + len(where)))
        if len(where) != n_ctx or not consecutive:
            raise ConfigError(f"PromptLearner: the template {template!r} must hold exactly n_ctx={n_ctx} "
                              f"consecutive 'X' words where the learned vectors go (found {len(where)}), e.g. "
                              f"{PERSON_TEMPLATE!r}")
        self.prefix_len = where[0]
        self.eot_index = int(ids[0].argmax())  # CLIP's end-of-text id is the largest in the vocabulary
        self.register_buffer("token_ids", ids, persistent=False)
        width = text.width
        param = text.token_embedding.weight
        self.cls_ctx = nn.Parameter(torch.empty(num_classes, n_ctx, width, dtype=param.dtype, device=param.device))
        nn.init.normal_(self.cls_ctx, std=0.02)
        self.register_buffer("token_prefix", param.new_empty(1, self.prefix_len, width))
        self.register_buffer("token_suffix", param.new_empty(1, ids.shape[1] - self.prefix_len - n_ctx, width))
        self.embed_template()

    @property
    def ctx(self) -> nn.Parameter:
        """The learned vectors ``[num_classes, n_ctx, width]`` (the parameter ``cls_ctx``)."""
        return self.cls_ctx

    @torch.no_grad()
    def embed_template(self) -> None:
        """Recompute ``token_prefix`` / ``token_suffix`` from ``text.token_embedding`` (after new text weights)."""
        embedded = self.text.token_embedding(self.token_ids).to(self.token_prefix.dtype)
        self.token_prefix.copy_(embedded[:, : self.prefix_len])
        self.token_suffix.copy_(embedded[:, self.prefix_len + self.n_ctx:])

    def prompts(self, pids: torch.Tensor) -> torch.Tensor:
        """Identity labels ``[B]`` -> embedded prompts ``[B, context_length, width]`` (before the position embedding)."""
        if not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"PromptLearner expects identity labels [B] (int64), got "
                             f"{pids.dtype if isinstance(pids, torch.Tensor) else type(pids).__name__}"
                             f"{' of shape ' + str(tuple(pids.shape)) if isinstance(pids, torch.Tensor) else ''}")
        if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= self.num_classes):
            raise InputError(f"identity labels must lie in [0, {self.num_classes}) (num_classes), got values in "
                             f"[{int(pids.min())}, {int(pids.max())}]")
        b = pids.shape[0]
        return torch.cat([self.token_prefix.expand(b, -1, -1), self.cls_ctx[pids],
                          self.token_suffix.expand(b, -1, -1)], dim=1)

    def forward(self, pids: torch.Tensor) -> torch.Tensor:
        """Identity labels ``[B]`` -> text features ``[B, output_dim]``, one learned prompt per identity.

        Only the tokens up to the end-of-text token go through the transformer: under the causal mask the
        padding after it cannot change the feature read there, so the result is that of the whole sequence.
        """
        length = self.eot_index + 1
        return self.text.encode_embedded(self.prompts(pids)[:, :length], self.token_ids[:, :length])

    @torch.no_grad()
    def all_features(self, batch_size: int = 64) -> torch.Tensor:
        """Every identity's text feature ``[num_classes, output_dim]``, without gradients (CLIP-ReID stage 2)."""
        pids = torch.arange(self.num_classes, device=self.cls_ctx.device)
        return torch.cat([self(chunk) for chunk in pids.split(batch_size)])
