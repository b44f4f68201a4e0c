"""Rank 0 leads, the other ranks follow: every forward pass rank 0 runs is replayed on every rank.

Rank 0 runs the command itself (prints, the HTTP server and its scheduler, evaluation): it calls the model as
on one device. A forward pre-hook broadcasts each call's inputs first, on the group's control channel: the token
ids, `input_lengths`, `last_only`, which cache the call uses, and the cache bookkeeping done since the last call.
The followers (`follow`) wait for these headers and run the same call on their own slice and their own cache,
and the collectives inside the forward pass keep them in lockstep.

Caches live on each rank (each holds its own KV heads), so each follower keeps a mirror of every cache rank 0 has
alive, keyed by rank 0's identity for it:
* `KVCache` (evaluation's scorer, direct use): made by `model.new_cache`, which rank 0 turns into a tracked
  cache that logs what changes it outside a forward pass (`copy.copy`, `select`, being freed);
* the engine's paged pool (`PagedKVPool`, generate/serve): mirrored on first use, freed with rank 0's; each pass's
  `PagedKVView` is rebuilt on the follower from the slot indices rank 0's view computed.
Everything that happens inside a forward pass (writes, `ensure_capacity`, `advance`) the followers do themselves.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import threading
import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..models.cache import KVCache
from .shard import TensorParallelError

# The PagedKVView attributes a follower needs to rebuild rank 0's view (runtime/kv_pool.py): its constructor's.
_VIEW_FIELDS = ("tables", "lengths_list", "counts", "width")


class _TrackedKVCache(KVCache):
    """A KVCache on rank 0 whose changes outside the forward pass are logged for the followers."""

    _leader: Leader
    key: int

    def select(self, rows: list[int]) -> None:
        self._leader.log(("select", self.key, list(rows)))
        super().select(rows)

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        self._leader.track(new, ("copy", self.key))
        return new


class Leader:
    """Rank 0's side: install with `Leader(model, group).install()`; `close()` releases the followers."""

    def __init__(self, model: nn.Module, control_group):
        self.model = model
        self.group = control_group
        self._ops: list[tuple] = []
        self._lock = threading.RLock()  # re-entrant: a finalizer may log while ops are taken
        self._keys = itertools.count(1)
        self._pools: dict[int, int] = {}  # id(pool) -> key, while rank 0's pool lives
        self.closed = False
        self.healthy = True

    def install(self) -> Leader:
        self._new_cache = self.model.new_cache
        self.model.new_cache = self.new_cache  # instance attribute: shadows the class's method
        self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.model.register_forward_hook(self._after_forward)
        atexit.register(self.close)
        return self

    # ---- bookkeeping -----------------------------------------------------------------------------------------

    def log(self, op: tuple) -> None:
        with self._lock:
            self._ops.append(op)

    def track(self, cache: _TrackedKVCache, origin: tuple) -> None:
        cache.key = next(self._keys)
        cache._leader = self
        self.log((*origin, cache.key))
        weakref.finalize(cache, self.log, ("free", cache.key))

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        cache = self._new_cache(batch_size, capacity, dtype, device)
        cache.__class__ = _TrackedKVCache
        self.track(cache, ("new", batch_size, capacity, dtype))
        return cache

    def _cache_desc(self, cache) -> tuple | None:
        if cache is None:
            return None
        if isinstance(cache, _TrackedKVCache):
            return ("kv", cache.key)
        pool = getattr(cache, "pool", None)
        if pool is not None and all(hasattr(cache, f) for f in _VIEW_FIELDS):
            key = self._pools.get(id(pool))
            if key is None:
                key = next(self._keys)
                self._pools[id(pool)] = key
                geometry = (len(pool.k), pool.num_blocks, pool.block_size, pool.k[0].shape[1], pool.k[0].shape[2],
                            pool.k[0].dtype)
                self.log(("pool", key, geometry))
                weakref.finalize(pool, self._free_pool, id(pool), key)
            state = {f: _to_cpu(getattr(cache, f)) for f in _VIEW_FIELDS}
            return ("paged", key, state)
        raise TensorParallelError(
            f"tensor parallelism: a forward pass with a {type(cache).__name__} that rank 0 cannot mirror on the other "
            "ranks: make caches with model.new_cache (or run through the engine)"
        )

    def _free_pool(self, pool_id: int, key: int) -> None:
        self._pools.pop(pool_id, None)
        self.log(("free", key))

    def _take_ops(self) -> list[tuple]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops

    # ---- the header ------------------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        if self.closed:
            raise TensorParallelError("tensor parallelism: the group was closed; the model cannot run any more")
        ids = args[0] if args else kwargs["input_ids"]
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        header = ("forward", _to_cpu(ids), self._cache_desc(cache), kwargs.get("input_lengths"),
                  bool(kwargs.get("last_only", False)), self._take_ops())
        self.healthy = False  # until this call returns: a failed pass leaves the followers mid-collective
        _broadcast(header, self.group)

    def _after_forward(self, module, args, output):
        self.healthy = True

    def close(self) -> None:
        """Tell the followers to exit (idempotent; skipped when a pass failed: torchrun stops them then)."""
        if self.closed:
            return
        self.closed = True
        if self.healthy and dist.is_initialized():
            try:
                _broadcast(("stop",), self.group)
            except RuntimeError:  # a follower is gone (torchrun is stopping the group and says which one)
                return
            release_groups(self.model)


def release_groups(model: nn.Module) -> None:
    """Destroy the process groups and drop every reference to them now, while the interpreter is whole: a gloo
    group freed during interpreter teardown (still referenced by the model's modules) can abort the process
    ("terminate called without an active exception") after a run that succeeded."""
    import gc

    for m in model.modules():
        if getattr(m, "group", None) is not None:
            m.group = None
    info = getattr(model, "tensor_parallel", None)
    if info is not None:
        info.group = None
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _to_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _broadcast(obj, group) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def follow(model: nn.Module, control_group, device: torch.device) -> None:
    """A follower's loop: run every forward pass rank 0 runs, until rank 0 closes the group."""
    from ..runtime.kv_pool import PagedKVPool, PagedKVView

    caches: dict[int, object] = {}
    while True:
        header = _broadcast(None, control_group)
        if header[0] == "stop":
            return
        _, ids, desc, input_lengths, last_only, ops = header
        for op in ops:
            kind = op[0]
            if kind == "new":
                _, batch, capacity, dtype, key = op
                caches[key] = model.new_cache(batch, capacity, dtype)
            elif kind == "copy":
                _, src, key = op
                caches[key] = copy.copy(caches[src])
            elif kind == "select":
                caches[op[1]].select(op[2])
            elif kind == "free":
                caches.pop(op[1], None)
            elif kind == "pool":
                _, key, (layers, blocks, block_size, kv_heads, head_dim, dtype) = op
                caches[key] = PagedKVPool(layers, blocks, block_size, kv_heads, head_dim, dtype, device)
        cache = None
        if desc is not None and desc[0] == "kv":
            cache = caches[desc[1]]
        elif desc is not None:
            _, key, state = desc
            pool = caches[key]
            cache = PagedKVView(pool, state["tables"], list(state["lengths_list"]), state["counts"], state["width"])
        with torch.inference_mode():
            model(ids.to(device), cache, input_lengths=input_lengths, last_only=last_only)
