"""A nanoGPT-shaped model, tiny: what tests/test_compiled.py and benchmarks/compiled.py compile."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _MLP(nn.Module):
    def __init__(self, d: int, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.c_fc = nn.Linear(d, 4 * d)
        if not functional:
            self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(F.gelu(h) if self.functional else self.gelu(h))


class _Block(nn.Module):
    def __init__(self, d: int, functional: bool, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), _Attention(d, heads)
        self.ln_2, self.mlp = nn.LayerNorm(d), _MLP(d, functional)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape, tiny: token and position embeddings, pre-LN blocks, a tied head; returns the loss.

    `functional=True` calls F.gelu in the MLP instead of its nn.GELU module.
    """

    def __init__(
        self, vocab: int = 32, block: int = 8, d: int = 16, layers: int = 2, functional: bool = False, heads: int = 2
    ) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(_Block(d, functional, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
