"""Cache memory the engine owns: a paged KV pool for Falcon, a pool of state slots for Falcon-Mamba.

The models know one cache protocol (models/cache.py): `lengths_list`, `lengths`, `ensure_capacity`, `advance`,
and for Falcon `write(layer, k, v) -> (k, v)`. For each forward pass the engine builds a *view* that speaks it
over the pool, for the rows of that pass:

* `PagedKVView.write` scatters the new keys/values into the rows' blocks and gathers back, per row, the keys and
  values of positions [0, max(start) + T): the same tensor a `KVCache` would return. Positions past a row's own
  end read a reserved all-zero slot (finite, and hidden by the attention mask).
* `StateSlots.gather` copies the rows' Falcon-Mamba states into a `MambaCache` for the pass and `scatter`
  writes them back.

Shapes: KV pool k[layer], v[layer]: [(num_blocks + 1) * block_size, G, d] (the last block is the zero block);
block table of a row: block ids, slot of position p = table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import torch

from ..models.cache import MambaCache


class PagedKVPool:
    """Keys and values of every layer in fixed-size blocks shared by all sequences."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = (num_blocks + 1) * block_size
        # torch.empty: slots are always written before they are read (except the zero block), and untouched
        # pages of a large CPU pool cost no resident memory.
        self.k = [torch.empty(slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pad_slot = num_blocks * block_size
        for t in self.k + self.v:
            t[self.pad_slot :].zero_()
        self.device = torch.device(device)
        self.offsets = torch.arange(block_size)

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def view(self, tables: list[list[int]], starts: list[int], counts: list[int], width: int) -> PagedKVView:
        return PagedKVView(self, tables, starts, counts, width)


class PagedKVView:
    """The cache protocol for one forward pass over rows with block tables `tables`, `starts[b]` tokens
    already cached and `counts[b]` real new tokens (of `width` = T, right-padded)."""

    def __init__(self, pool: PagedKVPool, tables: list[list[int]], starts: list[int], counts: list[int],
                 width: int):
        self.pool = pool
        self.tables = tables
        self.counts = counts
        self.width = width
        self.lengths_list = list(starts)
        self.lengths = torch.tensor(starts, dtype=torch.long, device=pool.device)
        self.fresh = max(starts) == 0  # a first prefill: attention needs only the new keys
        self._write = self._src = self._read = None  # built by `prepare`
        self._layout = None

    def kv_layout(self):
        """Where position s of row b, KV head g lies, for the decode kernel (models/fast_decode.py): the rows' block
        tables over the pool (padded with the zero block)."""
        if self._layout is None:
            from ..models.fast_decode import KVLayout

            width = max(len(t) for t in self.tables)
            pad = self.pool.num_blocks
            tables = torch.tensor([t + [pad] * (width - len(t)) for t in self.tables], dtype=torch.long)
            g, d = self.pool.k[0].shape[1:] if self.pool.k else (0, 0)
            self._layout = KVLayout(tables, self.pool.block_size, g * d, d, self.pool.k, self.pool.v)
        return self._layout

    def prepare(self) -> None:
        """Build the index tensors of the reference `write` now (otherwise on first use: a decode pass through the
        kernel never needs them)."""
        if self._write is not None:
            return
        pool, tables, starts, counts, width = self.pool, self.tables, self.lengths_list, self.counts, self.width
        bs, dev = pool.block_size, pool.device
        # Slots the real new tokens go to, and their rows in the flattened [B * T] new-token axis (plain Python:
        # a decode step has one token a row, and a handful of tensor ops would cost more than the loop).
        write: list[int] = []
        src: list[int] = []
        ragged = min(counts) != width
        for b, (table, s, c) in enumerate(zip(tables, starts, counts, strict=True)):
            write.extend(table[p // bs] * bs + p % bs for p in range(s, s + c))
            if ragged:
                src.extend(range(b * width, b * width + c))
        self._write = torch.tensor(write, dtype=torch.long).to(dev)
        self._src = torch.tensor(src, dtype=torch.long).to(dev) if ragged else None
        if not self.fresh:
            span = max(starts) + width
            cols = -(-span // bs)
            pad = pool.num_blocks  # the zero block
            tab = torch.tensor([t[:cols] + [pad] * (cols - len(t[:cols])) for t in tables], dtype=torch.long)
            read = (tab[:, :, None] * bs + pool.offsets[None, None, :]).reshape(len(tables), cols * bs)[:, :span]
            ends = [s + c for s, c in zip(starts, counts, strict=True)]
            if min(ends) < span:  # positions past a row's end (in its last block or beyond) read the zero slot
                beyond = torch.arange(span)[None, :] >= torch.tensor(ends)[:, None]
                read = read.masked_fill(beyond, pool.pad_slot)
            self._read = read.to(dev)  # [B, S]

    @property
    def batch_size(self) -> int:
        return len(self.lengths_list)

    def ensure_capacity(self, needed: int) -> None:
        """Blocks are allocated by the scheduler before the pass."""

    def advance(self, counts: list[int]) -> None:
        self.lengths_list = [n + c for n, c in zip(self.lengths_list, counts, strict=True)]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: [B, G, T, d] -> k, v: [B, G, S, d] with S = max(start) + T."""
        self.prepare()
        b, g, t, d = k_new.shape
        for store, new in ((self.pool.k[layer], k_new), (self.pool.v[layer], v_new)):
            flat = new.transpose(1, 2).reshape(b * t, g, d)  # [B*T, G, d]
            if self._src is not None:
                flat = flat.index_select(0, self._src)
            store.index_copy_(0, self._write, flat.to(store.dtype))
        if self.fresh:
            return k_new, v_new
        s = self._read.shape[1]
        idx = self._read.reshape(-1)
        k = self.pool.k[layer].index_select(0, idx).view(b, s, g, d).transpose(1, 2)
        v = self.pool.v[layer].index_select(0, idx).view(b, s, g, d).transpose(1, 2)
        return k, v


class _RowsMambaCache(MambaCache):
    """A MambaCache over given state tensors (the rows of one pass), built without allocating new zeros."""

    def __init__(self, conv: list[torch.Tensor], ssm: list[torch.Tensor], starts: list[int], device):
        self.conv = conv
        self.ssm = ssm
        self.lengths_list = list(starts)
        self.lengths = torch.tensor(starts, dtype=torch.long, device=device)


class StateSlots:
    """Falcon-Mamba states for `num_slots` sequences: conv [slots, E, K-1] and ssm [slots, E, N] per layer."""

    def __init__(self, num_layers: int, num_slots: int, d_inner: int, d_state: int, conv_kernel: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_slots = num_slots
        self.conv = [torch.zeros(num_slots, d_inner, conv_kernel - 1, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.ssm = [torch.zeros(num_slots, d_inner, d_state, dtype=torch.float32, device=device)
                    for _ in range(num_layers)]
        self.device = torch.device(device)

    @staticmethod
    def slot_bytes(num_layers: int, d_inner: int, d_state: int, conv_kernel: int, dtype: torch.dtype) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        return num_layers * d_inner * ((conv_kernel - 1) * el + d_state * 4)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    def gather(self, slots: list[int], starts: list[int]) -> MambaCache:
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        conv = [t.index_select(0, idx) for t in self.conv]
        ssm = [t.index_select(0, idx) for t in self.ssm]
        fresh = [r for r, s in enumerate(starts) if s == 0]
        if fresh:  # a sequence (re)starting from its first token starts from the empty state
            f = torch.tensor(fresh, dtype=torch.long, device=self.device)
            for t in conv + ssm:
                t.index_fill_(0, f, 0)
        return _RowsMambaCache(conv, ssm, starts, self.device)

    def scatter(self, slots: list[int], cache: MambaCache) -> None:
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        for store, rows in zip(self.conv + self.ssm, cache.conv + cache.ssm, strict=True):
            store.index_copy_(0, idx, rows)
