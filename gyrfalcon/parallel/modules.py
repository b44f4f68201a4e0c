"""The modules a tensor-parallel Falcon is made of, swapped into a built `FalconForCausalLM` from outside.

Each wraps this rank's slice (a plain `nn.Linear`/`nn.Embedding`, or the quantized module that replaced one) and
adds the communication: one all-reduce per block half (one per block for the parallel-attention layouts, whose
attention and MLP partial sums are added before it), a masked lookup plus an all-reduce for the vocabulary-parallel
embedding, and an all-gather of the logits for the vocabulary-parallel head. The model's own `forward` and
`_context` run unchanged around them. With a group of one, every collective is skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import FalconConfig
from ..models.falcon import FalconAttention, FalconMLP
from .shard import Split, local_attention_config


def all_reduce_(t: torch.Tensor, group) -> torch.Tensor:
    """Sum `t` over the group, in place (every rank ends with the same bits: the collectives reduce each element
    once and broadcast it)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


class VocabParallelEmbedding(nn.Module):
    """Rows [v0, v1) of the embedding on this rank: ids outside them give zeros here and their row elsewhere."""

    def __init__(self, local: nn.Module, split: Split, group):
        super().__init__()
        self.local = local
        self.v0, self.v1 = split.vocab
        self.group = group

    @property
    def weight(self):
        """The local rows (the model reads the embedding's dtype and device from it)."""
        return self.local.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return self.local(ids)
        inside = (ids >= self.v0) & (ids < self.v1)
        out = self.local(torch.where(inside, ids - self.v0, torch.zeros_like(ids)))
        out = out.masked_fill(~inside[..., None], 0)
        return all_reduce_(out, self.group)


class VocabParallelHead(nn.Module):
    """The output head's rows [v0, v1) on this rank; the full logits are gathered on every rank (so every rank
    samples the same token from the same numbers)."""

    def __init__(self, local: nn.Module, split: Split, vocab_size: int, group):
        super().__init__()
        self.local = local
        self.chunk = split.vocab_chunk
        self.vocab_size = vocab_size
        self.group = group

    @property
    def weight(self):
        return self.local.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        world = 1 if self.group is None else dist.get_world_size(self.group)
        if world == 1:
            return y
        if y.shape[-1] < self.chunk:  # the last rank's shorter slice: padded so every rank sends the same size
            y = F.pad(y, (0, self.chunk - y.shape[-1]))
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


class _HeadSlice:
    """A view of a step context whose alibi bias holds only this rank's heads (everything else delegated)."""

    def __init__(self, ctx, h0: int, h1: int):
        self._ctx = ctx
        self.bias = ctx.bias[:, h0:h1]

    def __getattr__(self, name):
        return getattr(self._ctx, name)


_NORMS = ("ln_attn", "ln_mlp", "input_layernorm", "post_attention_layernorm")


class ParallelDecoderLayer(nn.Module):
    """A Falcon block over this rank's heads and MLP columns.

    The attention and MLP are the model's own `FalconAttention`/`FalconMLP`, built for the local head count
    (`local_attention_config`) and holding the local slices, so the fast single-device paths run unchanged on each
    rank; they return partial sums (their row-parallel output layers have no bias), which are all-reduced here and
    the replicated biases added once.
    """

    def __init__(self, old: nn.Module, config: FalconConfig, split: Split, group,
                 attn_bias: torch.Tensor | None, mlp_bias: torch.Tensor | None):
        super().__init__()
        lc = local_attention_config(config, split)
        with torch.device("meta"):  # shells: their linears are replaced by the loaded local ones right below
            attn, mlp = FalconAttention(lc), FalconMLP(lc)
        for name, child in old.self_attention.named_children():
            setattr(attn, name, child)
        for name, child in old.mlp.named_children():
            setattr(mlp, name, child)
        self.self_attention = attn
        self.mlp = mlp
        for name in _NORMS:
            if hasattr(old, name):
                setattr(self, name, getattr(old, name))
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        self.two_norms = config.num_ln == 2
        self.h0, self.h1 = split.heads
        self.group = group
        if self.parallel:
            both = [b for b in (attn_bias, mlp_bias) if b is not None]
            self.register_buffer("out_bias", sum(both[1:], both[0]) if both else None)
        else:
            self.register_buffer("attn_bias", attn_bias)
            self.register_buffer("mlp_bias", mlp_bias)

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        actx = ctx if ctx.bias is None else _HeadSlice(ctx, self.h0, self.h1)
        attn = self.self_attention(attn_in, actx, layer)
        if self.parallel:
            out = all_reduce_(self.mlp(mlp_in) + attn, self.group)  # one all-reduce for the whole block
            if self.out_bias is not None:
                out = out + self.out_bias
            return out + x
        attn = all_reduce_(attn, self.group)
        if self.attn_bias is not None:
            attn = attn + self.attn_bias
        x = x + attn
        out = all_reduce_(self.mlp(self.post_attention_layernorm(x)), self.group)
        if self.mlp_bias is not None:
            out = out + self.mlp_bias
        return out + x
