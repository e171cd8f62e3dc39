"""A compact transformer over (gene, expression bin) tokens with a masked-bin objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AtlasTransformer"]


class _Block(nn.Module):
    """Pre-norm encoder block on ``scaled_dot_product_attention`` (fused kernels, no attention dropout)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class AtlasTransformer(nn.Module):
    """Gene embedding + bin embedding → encoder blocks → per-position bin logits and a cls embedding.

    No positional encoding: a cell is a set of genes, not a sequence.
    """

    def __init__(self, *, n_tokens: int, n_bins: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 dropout: float = 0.0, n_cell_types: int = 0) -> None:
        super().__init__()
        self.gene = nn.Embedding(n_tokens, d_model, padding_idx=0)
        self.bin = nn.Embedding(n_bins + 1, d_model)  # the extra bin is <mask>
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_bins)
        self.cell_head = nn.Linear(d_model, n_cell_types) if n_cell_types else None
        self.mask_bin = n_bins

    def forward(self, tokens: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = tokens != 0
        x = self.gene(tokens) + self.bin(bins)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        return self.head(x), x[:, 0]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
