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
from . import fast_decode, fast_linear
from .cache import KVCache
from .fast_linear import decode_rows as _decode_rows
from .fast_linear import linear as _linear
from .fast_linear import linear_pair as _linear_pair
from .fast_linear import linear_sum as _linear_sum
from .fast_linear import no_grad_needed as _no_grad
from .layers import Rotary, alibi_bias, alibi_slopes, apply_rotary_rolled

# Rows per block of a long prefill's MLP: bounds its 4x-wide activation (16 MiB at hidden 1024). 1024 rather than
# 256: on the AVX2 host, 8 x 1090-token contexts (an ARC scoring batch) ran 1.05-1.10x faster (bigger GEMMs;
# benchmarks/prefill_choices.py).
_MLP_CHUNK = 1024


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.layout = config.qkv_layout
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_out_features, bias=config.bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)

    def split_qkv(self, qkv: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, (H + 2G) d] -> q [B, H, T, d], k and v [B, G, T, d], following the checkpoint's ordering.

        With cos/sin ([B or 1, T, 1, d]; sin sign-folded, see `apply_rotary_rolled`) the rotary embedding is
        applied to the queries and keys together, in one pass over the part of `qkv` that holds them.
        """
        b, t, _ = qkv.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        rope = cos is not None
        if self.layout == "multi_query":
            qkv = qkv.view(b, t, h + 2, d)
            qk = apply_rotary_rolled(qkv[:, :, : h + 1], cos, sin) if rope else qkv
            q, k, v = qk[:, :, :h], qk[:, :, h : h + 1], qkv[:, :, h + 1 :]
        elif self.layout == "grouped":
            qkv = qkv.view(b, t, g, h // g + 2, d)
            qk = apply_rotary_rolled(qkv[:, :, :, :-1], cos[:, :, :, None], sin[:, :, :, None]) if rope else qkv
            q = qk[:, :, :, : h // g].reshape(b, t, h, d)
            k, v = qk[:, :, :, h // g], qkv[:, :, :, -1]
        else:  # interleaved: per head [q, k, v]
            qkv = qkv.view(b, t, h, 3, d)
            qk = apply_rotary_rolled(qkv[:, :, :, :2], cos[:, :, :, None], sin[:, :, :, None]) if rope else qkv
            q, k, v = qk[:, :, :, 0], qk[:, :, :, 1], qkv[:, :, :, 2]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: _StepContext, layer: int) -> torch.Tensor:
        return _linear(self.dense, self.attend(_linear(self.query_key_value, x), ctx, layer))

    def attend(self, qkv: torch.Tensor, ctx: _StepContext, layer: int) -> torch.Tensor:
        """Everything between the two linears: qkv [B, T, (H + 2G) d] -> the heads' outputs [B, T, H d]."""
        b, t, _ = qkv.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        if t == 1 and ctx.bias is None and ctx.one_each:
            # Decoding: rotary, cache write and attention in one compiled kernel where it applies (fast_decode.py);
            # the code below is its reference.
            out = fast_decode.attention(qkv, h, g, d, ctx.rope, ctx.cache, layer)
            if out is not None:
                return out
        q, k, v = self.split_qkv(qkv, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(layer, k, v)

        if t == 1 and g < h and ctx.bias is None:
            # Decoding one token: fold the H/G query heads that share a KV head into the query axis, so each
            # KV head is read once and never copied out to H heads. The mask (if any) is per row only.
            # Three small batched products rather than SDPA: its CPU kernel opens a parallel region even for this
            # one block of work, and on a busy machine waiting for the second thread costs milliseconds per call.
            s = k.shape[2]
            q = q.reshape(b * g, h // g, d)
            scores = torch.baddbmm(q.new_empty(()), q, k.reshape(b * g, s, d).transpose(1, 2), beta=0.0, alpha=d**-0.5)
            if ctx.mask is not None:
                scores = scores.view(b, g, h // g, s).masked_fill_(ctx.mask.logical_not(), float("-inf"))
            out = torch.bmm(scores.view(b * g, h // g, s).softmax(-1), v.reshape(b * g, s, d))
            return out.view(b, 1, h * d)
        if g < h:
            k = k.repeat_interleave(h // g, dim=1)
            v = v.repeat_interleave(h // g, dim=1)
        mask = ctx.mask if ctx.bias is None else ctx.bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ctx.is_causal)
        return out.transpose(1, 2).reshape(b, t, h * d)


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > _MLP_CHUNK and _no_grad(x):
            # A long prefill: run the MLP over blocks of rows, so its 4x-wide activation stays small.
            x2 = x.reshape(rows, x.shape[-1])
            out = torch.cat([self._mlp(x2[i : i + _MLP_CHUNK]) for i in range(0, rows, _MLP_CHUNK)])
            return out.view(*x.shape[:-1], out.shape[-1])
        return self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.dense_4h_to_h, self.activation(_linear(self.dense_h_to_4h, x)))

    @staticmethod
    def activation(h: torch.Tensor) -> torch.Tensor:
        # In place when nothing needs the pre-activation for a backward pass: the widest activation, held once.
        # A decode step's GELU goes to the compiled kernel (fast_decode.py), where torch's erf is slow for the size.
        if _no_grad(h):
            if fast_decode.gelu_(h) is None:
                h = torch._C._nn.gelu_(h)
            return h
        return F.gelu(h)


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
        if self.parallel and x.shape[1] == 1:
            out = self._decode_parallel(x, attn_in, mlp_in, ctx, layer)
            if out is not None:
                return out
        attn = self.self_attention(attn_in, ctx, layer)
        if self.parallel:
            out = self.mlp(mlp_in)
            # (mlp + attn) + x, the reference's order; in place on the fresh MLP output when autograd is off.
            return out.add_(attn).add_(x) if _no_grad(out) else out + attn + x
        x = x + attn
        out = self.mlp(self.post_attention_layernorm(x))
        return out.add_(x) if _no_grad(out) else out + x

    def _decode_parallel(self, x: torch.Tensor, attn_in: torch.Tensor, mlp_in: torch.Tensor, ctx: _StepContext,
                         layer: int) -> torch.Tensor | None:
        """A parallel layer's decode step with its four linears in two kernel calls (query_key_value with
        dense_h_to_4h when they share the input; dense_4h_to_h with dense, summed with the residual): the same
        numbers as `forward`'s general path, which is the reference. None when the fp32 decode kernels are off."""
        attention, mlp = self.self_attention, self.mlp
        if not fast_linear.PAIRS or not _decode_rows(x):
            return None
        if attention._forward_hooks or attention._forward_pre_hooks or mlp._forward_hooks or mlp._forward_pre_hooks:
            return None  # they would not run: the submodules' forwards are bypassed here
        if attn_in is mlp_in:
            pair = _linear_pair(attention.query_key_value, mlp.dense_h_to_4h, attn_in)
            if pair is None:
                return None
            qkv, h = pair
        else:  # two norms (40B/180B): two inputs
            qkv, h = _linear(attention.query_key_value, attn_in), _linear(mlp.dense_h_to_4h, mlp_in)
        attn = attention.attend(qkv, ctx, layer)
        h = mlp.activation(h)
        out = _linear_sum(mlp.dense_4h_to_h, h, attention.dense, attn, x)
        if out is None:  # another module type (LoRA, LLM.int8, a mix): the separate linears, as `forward` adds them
            out = _linear(mlp.dense_4h_to_h, h).add_(_linear(attention.dense, attn)).add_(x)
        return out


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        if torch.empty(0).device.type == "meta":
            # Built to be loaded into: skip the random init, whose meta-device kernel (`normal_`) pulls in ~70 MB of
            # torch's Python decompositions on first use, for nothing.
            weight = torch.empty(config.vocab_size, config.hidden_size)
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class _StepContext:
    """What every layer of one forward call shares: rotary tables (`cos`/`sin` at the new tokens' positions, `rope`
    the whole (cos, sign-folded sin) tables), the attention mask or bias, the cache, and whether every row carries
    all T new tokens (`one_each`; not so in a right-padded, ragged pass)."""

    __slots__ = ("cos", "sin", "mask", "bias", "is_causal", "cache", "rope", "one_each")

    def __init__(self, cos, sin, mask, bias, is_causal, cache, rope=None, one_each=True):
        self.cos, self.sin, self.mask, self.bias, self.is_causal, self.cache = cos, sin, mask, bias, is_causal, cache
        self.rope, self.one_each = rope, one_each


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

    def _context(self, b: int, t: int, cache: KVCache | None, device: torch.device, dtype: torch.dtype,
                 one_each: bool = True) -> _StepContext:
        starts = cache.lengths_list if cache is not None else [0]
        first, last = min(starts), max(starts)
        uniform = first == last
        key_len = last + t
        # Absolute positions of the new tokens, [B, T] (or [1, T] when every row is at the same length). Built from
        # the Python-side lengths, so the common uniform case needs no tensor op and no device sync.
        positions = None
        if not uniform:
            positions = cache.lengths[:, None] + torch.arange(t, device=device)[None, :]

        cos = sin = rope = None
        if self.rotary is not None:
            cos_table, sin_table = rope = self.rotary.rolled_table(key_len, device, dtype)
            if uniform:  # a slice of the table: a view, no copy
                cos, sin = cos_table[first : first + t, None][None], sin_table[first : first + t, None][None]
            else:
                cos, sin = cos_table[positions][:, :, None], sin_table[positions][:, :, None]  # [B, T, 1, d]

        mask = None
        is_causal = False
        if uniform and first == 0 and t > 1:
            is_causal = True
        elif not (uniform and t == 1):
            # Key j is visible to the query at position p of the same row iff j <= p. This also hides whatever a
            # shorter row has past its own end.
            if positions is None:
                positions = torch.arange(first, first + t, device=device)[None, :]
            mask = torch.arange(key_len, device=device)[None, None, :] <= positions[:, :, None]  # [B|1, T, S]
            mask = mask[:, None]  # [B|1, 1, T, S]
            if t == 1 and self.config.num_kv_heads < self.config.num_heads:
                mask = mask.reshape(-1, 1, 1, key_len)  # folded decode: the query axis holds heads, one position

        bias = None
        if self.config.alibi:
            bias = alibi_bias(alibi_slopes(self.config.num_heads).to(device), key_len, self.config.head_dim, dtype)
            visible = mask if mask is not None else (
                torch.ones(t, key_len, dtype=torch.bool, device=device).tril(key_len - t)[None, None])
            bias = bias.masked_fill(~visible, float("-inf"))
            is_causal = False
        return _StepContext(cos, sin, mask, bias, is_causal, cache, rope, one_each)

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
        counts = input_lengths if input_lengths is not None else [t] * b
        ctx = self._context(b, t, cache, x.device, x.dtype, one_each=all(c == t for c in counts))
        for i, layer in enumerate(self.transformer.h):
            x = layer(x, ctx, i)
        if cache is not None:
            cache.advance(counts)
        if last_only:
            if all(c == t for c in counts):
                x = x[:, -1]
            else:
                x = x[torch.arange(b, device=x.device), torch.tensor(counts, device=x.device) - 1]
        return _linear(self.lm_head, self.transformer.ln_f(x))
