"""Which part of each Falcon weight a tensor-parallel rank holds: pure arithmetic on the config, no torch state.

Megatron-style split over N ranks, rank r:

* attention: query heads [r*H/N, (r+1)*H/N) on every layout, so the rank's slice of the attention output is one
  contiguous column range of `dense` (row-parallel). Its key/value heads depend on the layout of the fused
  `query_key_value` (see `FalconConfig.qkv_layout`):
    multi-query  [q_0 .. q_{H-1}, k, v]          the single KV head is replicated on every rank;
    grouped      per group [q.. (H/G of them), k, v]
                   G % N == 0: whole groups per rank (G/N KV heads each),
                   N % G == 0: each group's KV head replicated on N/G ranks, which share out its query heads;
    interleaved  per head [q, k, v] (RW)         whole heads.
* MLP: `dense_h_to_4h` column-parallel (rows of the weight), `dense_4h_to_h` row-parallel (columns).
* vocabulary: the embedding and the output head hold rows [r*ceil(V/N), ...): the last rank may hold fewer.
* the biases of the row-parallel layers (`dense`, `dense_4h_to_h`) and the norms are replicated: a row-parallel
  bias is added once, after the all-reduce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..config import FalconConfig, FalconMambaConfig, ModelConfig


class TensorParallelError(ValueError):
    """A model/rank-count combination tensor parallelism cannot split, or a misused group."""


Range = tuple[int, int]


@dataclass(frozen=True)
class Split:
    """What rank `rank` of `world` holds of a Falcon (every range in rows of the checkpoint's [out, in] weights)."""

    rank: int
    world: int
    heads: Range  # global query-head range
    kv_heads: int  # key/value heads held locally
    qkv_rows: tuple[Range, ...]  # rows of query_key_value (weight and bias), concatenated in this order
    ffn: Range  # rows of dense_h_to_4h / columns of dense_4h_to_h
    vocab: Range  # rows of the embedding and of the output head
    vocab_chunk: int  # ceil(V / N): every rank's logits are padded to this before the all-gather

    @property
    def local_heads(self) -> int:
        return self.heads[1] - self.heads[0]


def plan_split(config: ModelConfig, world: int, rank: int) -> Split:
    """The slice rank `rank` of `world` holds, or a TensorParallelError saying why the model cannot be split so."""
    if isinstance(config, FalconMambaConfig):
        raise TensorParallelError(
            "tensor parallelism is not supported for Falcon-Mamba (not implemented): a Mamba mixer cannot be split "
            "with one all-reduce per block half like attention and the MLP; its x_proj mixes every channel into "
            "dt/B/C (normalized over the full width) in the middle of the mixer, so a split needs an extra "
            "all-reduce there plus per-rank conv and SSM state slots. Falcon-Mamba-7B fits one GPU in bf16; run it "
            "on one device, quantized (--quantize nf4), or with --device-map auto"
        )
    if not isinstance(config, FalconConfig):
        raise TensorParallelError(f"tensor parallelism: no split for {type(config).__name__}")
    if world < 1 or not 0 <= rank < world:
        raise TensorParallelError(f"tensor parallelism: rank {rank} is not in a group of {world}")
    h, g, d = config.num_heads, config.num_kv_heads, config.head_dim
    if h % world:
        raise TensorParallelError(f"--tp {world}: num_attention_heads={h} is not divisible by {world}")
    if config.ffn_hidden_size % world:
        raise TensorParallelError(f"--tp {world}: ffn_hidden_size={config.ffn_hidden_size} is not divisible by "
                                  f"{world}")
    hl = h // world
    h0 = rank * hl
    layout = config.qkv_layout
    if layout == "multi_query":  # one KV head after all the queries: replicated
        rows: tuple[Range, ...] = ((h0 * d, (h0 + hl) * d), (h * d, (h + 2) * d))
        kv = 1
    elif layout == "interleaved":  # [q, k, v] per head
        rows = ((h0 * 3 * d, (h0 + hl) * 3 * d),)
        kv = hl
    else:  # grouped
        per = h // g  # query heads per group
        block = (per + 2) * d  # rows of one group: its queries, its key, its value
        if g % world == 0:
            gl = g // world
            g0 = rank * gl
            rows = ((g0 * block, (g0 + gl) * block),)
            kv = gl
        elif world % g == 0:
            share = world // g  # ranks per group
            grp, j = divmod(rank, share)
            q0 = grp * block + j * hl * d
            rows = ((q0, q0 + hl * d), (grp * block + per * d, (grp + 1) * block))
            kv = 1
        else:
            raise TensorParallelError(
                f"--tp {world}: num_kv_heads={g} must be a multiple of {world} (whole KV groups per rank) or divide "
                f"it (each KV head replicated on {world}/{g} ranks)"
            )
    f = config.ffn_hidden_size // world
    chunk = -(-config.vocab_size // world)
    v0 = min(config.vocab_size, rank * chunk)
    v1 = min(config.vocab_size, v0 + chunk)
    if v1 <= v0:
        raise TensorParallelError(f"--tp {world}: vocab_size={config.vocab_size} is too small to split")
    return Split(rank, world, (h0, h0 + hl), kv, rows, (rank * f, (rank + 1) * f), (v0, v1), chunk)


def local_attention_config(config: FalconConfig, split: Split) -> FalconConfig:
    """A config whose attention has exactly this rank's heads (the same head size), to build its modules with.

    Its `qkv_layout` orders the local fused rows the way `Split.qkv_rows` concatenates them (one query head with one
    KV head reads as [q, k, v] in every layout)."""
    hl = split.local_heads
    return replace(config, num_heads=hl, num_kv_heads=split.kv_heads, hidden_size=hl * config.head_dim,
                   ffn_hidden_size=(split.ffn[1] - split.ffn[0]))


# What each checkpoint tensor of a Falcon is, for slicing: ("rows", ranges) | ("cols", range) | ("full",)
_LAYER = re.compile(r"^transformer\.h\.\d+\.(.+)$")


def tensor_slice(name: str, config: FalconConfig, split: Split) -> tuple[str, tuple[Range, ...]]:
    """How rank `split.rank` reads checkpoint tensor `name`: ("rows"|"cols", ranges) or ("full", ())."""
    d = config.head_dim
    if name in ("transformer.word_embeddings.weight", "lm_head.weight"):
        return "rows", (split.vocab,)
    m = _LAYER.match(name)
    if m:
        part = m.group(1)
        if part.startswith("self_attention.query_key_value."):
            return "rows", split.qkv_rows
        if part == "self_attention.dense.weight":
            return "cols", ((split.heads[0] * d, split.heads[1] * d),)
        if part.startswith("mlp.dense_h_to_4h."):
            return "rows", (split.ffn,)
        if part == "mlp.dense_4h_to_h.weight":
            return "cols", (split.ffn,)
    return "full", ()  # norms, ln_f, and the row-parallel biases


def local_shape(kind: str, ranges: tuple[Range, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    n = sum(b - a for a, b in ranges)
    if kind == "rows":
        return (n, *shape[1:])
    if kind == "cols":
        return (shape[0], n)
    return tuple(shape)
