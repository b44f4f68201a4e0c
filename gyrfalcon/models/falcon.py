"""Falcon decoder, every layout, in plain PyTorch.

Glossary
    B  batch rows             T  new tokens in this call        S  keys attended (cache + new)
    H  query heads            G  key/value heads (1 for multi-query, H for RW)
    d  head dimension         D  hidden size                    V  vocabulary

Layouts (see `FalconConfig`):
    7B      multi-query (G=1), attention and MLP in parallel off one `input_layernorm`, rotary
    40B/180B new decoder: grouped KV (G = num_kv_heads), parallel, separate `ln_attn` / `ln_mlp`
    11B     new decoder with one norm (`num_ln_in_parallel_attn=1`)
    RW      multi-head (G=H) with alibi, biases, sequential residual with `post_attention_layernorm`

Module attribute names are the checkpoint's names (`transformer.h.{i}.self_attention.query_key_value`, ...)
so loading is a strict `load_state_dict` with no renaming table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FalconConfig
from .cache import KVCache
from .layers import Rotary, alibi_bias, alibi_slopes, apply_rotary


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.layout = config.qkv_layout
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_out_features, bias=config.bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, (H + 2G) d] -> q [B, H, T, d], k and v [B, G, T, d], following the checkpoint's ordering."""
        b, t, _ = qkv.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.layout == "multi_query":
            qkv = qkv.view(b, t, h + 2, d)
            q, k, v = qkv[:, :, :h], qkv[:, :, h : h + 1], qkv[:, :, h + 1 :]
        elif self.layout == "grouped":
            qkv = qkv.view(b, t, g, h // g + 2, d)
            q = qkv[:, :, :, :-2].reshape(b, t, h, d)
            k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        else:  # interleaved: per head [q, k, v]
            qkv = qkv.view(b, t, h, 3, d)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: _StepContext, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.split_qkv(self.query_key_value(x))
        if ctx.cos is not None:
            q = apply_rotary(q, ctx.cos, ctx.sin)
            k = apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(layer, k, v)

        if t == 1 and g < h and ctx.bias is None:
            # Decoding one token: fold the H/G query heads that share a KV head into the query axis, so each
            # KV head is read once and never copied out to H heads. The mask (if any) is per row only.
            q = q.reshape(b, g, h // g, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
            out = out.reshape(b, h * d).unsqueeze(1)
        else:
            if g < h:
                k = k.repeat_interleave(h // g, dim=1)
                v = v.repeat_interleave(h // g, dim=1)
            mask = ctx.mask if ctx.bias is None else ctx.bias
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ctx.is_causal)
            out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.dense(out)


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        self.two_norms = config.num_ln == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(config.hidden_size, eps=eps)
            self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = FalconAttention(config)
        self.mlp = FalconMLP(config)

    def forward(self, x: torch.Tensor, ctx: _StepContext, layer: int) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, ctx, layer)
        if self.parallel:
            return self.mlp(mlp_in) + attn + x
        x = x + attn
        return self.mlp(self.post_attention_layernorm(x)) + x


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class _StepContext:
    """What every layer of one forward call shares: rotary tables, the attention mask or bias, the cache."""

    __slots__ = ("cos", "sin", "mask", "bias", "is_causal", "cache")

    def __init__(self, cos, sin, mask, bias, is_causal, cache):
        self.cos, self.sin, self.mask, self.bias, self.is_causal, self.cache = cos, sin, mask, bias, is_causal, cache


class FalconForCausalLM(nn.Module):
    """forward(input_ids [B, T], cache) -> logits. See the module docstring for the layouts."""

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = None if config.alibi else Rotary(config.head_dim, config.rope_theta)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        ref = self.transformer.word_embeddings.weight
        c = self.config
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, c.head_dim, capacity,
                       dtype or ref.dtype, device or ref.device)

    def _context(self, b: int, t: int, cache: KVCache | None, device: torch.device, dtype: torch.dtype) -> _StepContext:
        starts = cache.lengths_list if cache is not None else [0] * b
        uniform = min(starts) == max(starts)
        key_len = max(starts) + t
        positions = (cache.lengths[:, None] if cache is not None else torch.zeros(b, 1, dtype=torch.long,
                     device=device)) + torch.arange(t, device=device)[None, :]  # [B, T]
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, dtype)

        mask = None
        is_causal = False
        if uniform and starts[0] == 0 and t > 1:
            is_causal = True
        elif not (uniform and t == 1):
            # Key j is visible to the query at position p of the same row iff j <= p. This also hides whatever a
            # shorter row has past its own end.
            mask = torch.arange(key_len, device=device)[None, None, :] <= positions[:, :, None]  # [B, T, S]
            mask = mask[:, None]  # [B, 1, T, S]
            if t == 1 and self.config.num_kv_heads < self.config.num_heads:
                mask = mask.reshape(b, 1, 1, key_len)  # folded decode: the query axis holds heads, one position

        bias = None
        if self.config.alibi:
            bias = alibi_bias(alibi_slopes(self.config.num_heads).to(device), key_len, self.config.head_dim, dtype)
            visible = mask if mask is not None else (
                torch.ones(t, key_len, dtype=torch.bool, device=device).tril(key_len - t)[None, None])
            bias = bias.masked_fill(~visible, float("-inf"))
            is_causal = False
        return _StepContext(cos, sin, mask, bias, is_causal, cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        input_lengths: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run T new tokens of each row.

        input_ids: [B, T], right-padded when rows carry different numbers of new tokens (`input_lengths`).
        cache: appended to and advanced; None runs a plain causal forward from position 0 (training, scoring).
        last_only: return logits [B, V] at each row's last real token only (prefill needs nothing else), instead
        of [B, T, V].
        """
        b, t = input_ids.shape
        x = self.transformer.word_embeddings(input_ids)
        if cache is not None:
            cache.ensure_capacity(max(cache.lengths_list) + t)
        ctx = self._context(b, t, cache, x.device, x.dtype)
        for i, layer in enumerate(self.transformer.h):
            x = layer(x, ctx, i)
        counts = input_lengths if input_lengths is not None else [t] * b
        if cache is not None:
            cache.advance(counts)
        if last_only:
            if all(c == t for c in counts):
                x = x[:, -1]
            else:
                x = x[torch.arange(b, device=x.device), torch.tensor(counts, device=x.device) - 1]
        return self.lm_head(self.transformer.ln_f(x))
