"""A compact transformer over (gene, expression bin) tokens, with a gene-level and a cell-level head.

- The **bin head** predicts the bins of masked genes from their context (the masked-bin objective).
- The **expression decoder** predicts every vocabulary gene's log-normalised expression from the
  ``<cls>`` output alone (a cell-level objective, scGPT's MVC taken to the whole vocabulary): the
  cell embedding that ``atlasflow embed`` exports must then summarise the whole cell, including the
  genes that did not fit in its sequence and the ones it does not express.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AtlasTransformer", "ExpressionDecoder", "no_decay"]


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


class ExpressionDecoder(nn.Module):
    """Cell embedding → every gene's expression: ``<W cell, q_g> + b_g`` with a query vector per gene."""

    def __init__(self, n_genes: int, d_model: int) -> None:
        super().__init__()
        self.query = nn.Embedding(n_genes, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.bias = nn.Parameter(torch.zeros(n_genes))

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        return self.proj(cell) @ self.query.weight.T + self.bias


class AtlasTransformer(nn.Module):
    """Gene embedding + bin embedding → encoder blocks → bin logits per position and a cell embedding.

    No positional encoding: a cell is a set of genes, not a sequence.
    """

    def __init__(self, *, n_tokens: int, n_bins: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 dropout: float = 0.0, n_cell_types: int = 0, n_genes: int = 0) -> None:
        super().__init__()
        self.gene = nn.Embedding(n_tokens, d_model, padding_idx=0)
        self.bin = nn.Embedding(n_bins + 1, d_model)  # the extra bin is <mask>
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_bins)
        self.cell_head = nn.Linear(d_model, n_cell_types) if n_cell_types else None
        self.decoder = ExpressionDecoder(n_genes, d_model) if n_genes else None
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


def no_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decayed, not_decayed)`` parameters: embeddings, norms and biases are not decayed.

    Weight decay on an embedding shrinks every row that gets no gradient: the genes absent from
    a batch would fade batch after batch, which is forgetting by construction.
    """
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.LayerNorm):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decayed, kept = [], []
    for name, p in model.named_parameters():
        (kept if id(p) in exempt or p.ndim < 2 or name.endswith("bias") else decayed).append(p)
    return decayed, kept
