"""A small decoder-only transformer over characters (the `gpt` model of `fqtsim run`).

    embed     token and position embeddings, added
    h.i       pre-norm blocks: x + proj(attention(ln1(x))), then x + mlp(ln2(x)); attention is
              qkv (one Linear), scores = Q K^T per head, softmax over the causal past (scaled
              by 1/sqrt(head width)), context = P V, heads merged
    ln_f      the final LayerNorm, then head: a Linear over the vocabulary (no bias)

Shapes are `fqtsim.simulation.workloads.GPTShape`'s; module names are the workload's layer names,
so that the cost model plans the same GEMMs (`workloads.gpt`). `convert` swaps the Linears for
FQT ones and the two products of activations (`Product`) and the embeddings (`Embedding`) for
their twins in `fqtsim.training.attention`; LayerNorm, softmax and GELU stay float.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fqtsim.simulation.workloads import GPTShape


class Product(nn.Module):
    """a @ b over the last two dimensions: a GEMM of two activations per sequence and head."""

    def forward(self, a, b):
        return a @ b

    def fqt(self, sim, name: str) -> nn.Module:
        from fqtsim.training.attention import FQTProduct
        return FQTProduct(sim, name)


class Embedding(nn.Module):
    """Each token's row plus its position's: (batch, tokens) ids -> (batch, tokens, width)."""

    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, idx):
        return self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))

    def fqt(self, sim, name: str) -> nn.Module:
        from fqtsim.training.attention import FQTEmbedding
        return FQTEmbedding(self, sim, name)


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.gelu, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(self.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        width = shape.width
        self.heads = shape.heads
        self.ln1, self.qkv = nn.LayerNorm(width), nn.Linear(width, 3 * width)
        self.scores, self.context = Product(), Product()
        self.proj, self.ln2, self.mlp = nn.Linear(width, width), nn.LayerNorm(width), MLP(width)
        self.register_buffer("causal", torch.ones(shape.context, shape.context).tril().bool(),
                             persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        heads = (part.view(b, t, self.heads, c // self.heads).transpose(1, 2)   # (B, H, T, d)
                 for part in self.qkv(self.ln1(x)).split(c, dim=2))
        q, k, v = heads
        s = self.scores(q, k.transpose(-2, -1)) / math.sqrt(c // self.heads)   # (B, H, T, T)
        p = F.softmax(s.masked_fill(~self.causal[:t, :t], float("-inf")), dim=-1)
        y = self.context(p, v).transpose(1, 2).reshape(b, t, c)   # (B, H, T, d) -> (B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """(batch, tokens) ids -> (batch, tokens, vocab) logits of each next token."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.embed = Embedding(shape.vocab, shape.context, shape.width)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.blocks))
        self.ln_f = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab, bias=False)
        for name, param in self.named_parameters():   # small normal weights, zero biases; the
            if name.endswith("bias"):                 # residual projections scaled by depth
                nn.init.zeros_(param)
            elif param.dim() > 1:
                std = 0.02 / math.sqrt(2 * shape.blocks) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))
