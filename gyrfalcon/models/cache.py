"""Decoding state that the runtime owns and passes into a model's forward.

Both caches hold `lengths`: how many tokens of each row the model has already seen. A forward call appends
`input_lengths[b]` tokens to row b (all T when not given) and advances `lengths` by that much. Rows can be
dropped or reordered with `select`, so finished sequences leave a batch at once.
"""

from __future__ import annotations

import sys

import torch


class KVCache:
    """Keys and values of every Falcon layer, sized by KV heads (a multi-query model stores one head).

    Shapes: k[layer], v[layer]: [batch, kv_heads, capacity, head_dim]; lengths: [batch] (int64, on the
    cache's device) and the same numbers as a Python list in `lengths_list` to avoid device syncs.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths_list = [0] * batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._layout = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths_list)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def kv_layout(self):
        """Where position s of row b, KV head g lies, for the decode kernel (models/fast_decode.py): one block of
        `capacity` positions a row, at slot b * G. Kept until the buffers change (`ensure_capacity`, `select`)."""
        layout = getattr(self, "_layout", None)
        if layout is None and self.k:
            from .fast_decode import KVLayout

            b, g, cap, d = self.k[0].shape
            tables = torch.arange(b, dtype=torch.long)[:, None] * g
            layout = self._layout = KVLayout(tables, cap, d, cap * d, self.k, self.v)
        return layout

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def ensure_capacity(self, needed: int) -> None:
        """Grow every layer's buffers (doubling) so that `needed` positions fit."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        self._layout = None
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[i] = grown

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k_new/v_new ([B, kv_heads, T, d]) after each row's current length; return the keys and values
        of positions [0, max(lengths) + T) for attention."""
        t = k_new.shape[2]
        start = self.lengths_list
        end = max(start) + t
        k, v = self.k[layer], self.v[layer]
        if min(start) == max(start):  # uniform rows: one slice copy
            s = start[0]
            k[:, :, s : s + t] = k_new
            v[:, :, s : s + t] = v_new
        else:
            for b, s in enumerate(start):
                k[b, :, s : s + t] = k_new[b]
                v[b, :, s : s + t] = v_new[b]
        return k[:, :, :end], v[:, :, :end]

    def advance(self, counts: list[int]) -> None:
        self.lengths_list = [n + c for n, c in zip(self.lengths_list, counts, strict=True)]
        self.lengths = torch.tensor(self.lengths_list, dtype=torch.long, device=self.lengths.device)

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a row may repeat, e.g. to fork one prompt into n samples)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self._layout = None
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.lengths_list = [self.lengths_list[r] for r in rows]
        self.lengths = self.lengths.index_select(0, idx)


class MambaCache:
    """Falcon-Mamba's fixed-size state per layer: the last (kernel-1) inputs of the causal conv and the SSM state.

    Shapes: conv[layer]: [batch, d_inner, kernel - 1]; ssm[layer]: [batch, d_inner, d_state].
    Its size does not depend on the sequence length: that is the point of a state-space model.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        d_inner: int,
        d_state: int,
        conv_kernel: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.conv = [torch.zeros(batch_size, d_inner, conv_kernel - 1, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        # The recurrence accumulates over the whole sequence: keep it in fp32 whatever the compute dtype.
        self.ssm = [torch.zeros(batch_size, d_inner, d_state, dtype=torch.float32, device=device)
                    for _ in range(num_layers)]
        self.lengths_list = [0] * batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths_list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    @property
    def capacity(self) -> int:
        """Unbounded: the state has the same size whatever the sequence length."""
        return sys.maxsize

    def ensure_capacity(self, needed: int) -> None:
        """A state-space cache never grows."""

    def advance(self, counts: list[int]) -> None:
        self.lengths_list = [n + c for n, c in zip(self.lengths_list, counts, strict=True)]
        self.lengths = torch.tensor(self.lengths_list, dtype=torch.long, device=self.lengths.device)

    def select(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.conv = [t.index_select(0, idx) for t in self.conv]
        self.ssm = [t.index_select(0, idx) for t in self.ssm]
        self.lengths_list = [self.lengths_list[r] for r in rows]
        self.lengths = self.lengths.index_select(0, idx)


Cache = KVCache | MambaCache
