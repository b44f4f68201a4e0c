"""`--device-map auto`: a model too big for one device, its layers spread over several (a pipeline, one device
busy at a time), for machines whose GPUs differ and tensor parallelism (which wants equal shards) does not fit.

`plan_layers` is pure arithmetic: contiguous runs of layers per device, in proportion to each device's memory.
`dispatch` moves the modules and wraps every layer placed on a device other than its predecessor's in `_OnDevice`,
which moves the hidden state and the step context there. The embedding is on the first device (the engine puts
the input ids and the cache where the embedding is), the final norm and the head on the last.

Caches stay on the first device: a layer elsewhere writes its new keys/values there and reads its keys/values back
through `_CacheOnDevice`. That is correct but moves a layer's whole context over the bus every step, so this path
is for fitting a model at all, not for speed; per-layer cache placement needs the cache (models/cache.py,
runtime/kv_pool.py) to allocate layer l on its layer's device.

With one device (every CPU-only machine) `dispatch` moves the model there and changes nothing else.
"""

from __future__ import annotations

import torch
from torch import nn


def available_devices() -> list[torch.device]:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def plan_layers(num_layers: int, capacities: list[float]) -> list[int]:
    """Index of the device of each layer: contiguous runs, sized in proportion to `capacities` (every device with
    capacity gets at least one layer while layers last)."""
    if not capacities or any(c < 0 for c in capacities) or sum(capacities) <= 0:
        raise ValueError(f"device map: no usable device capacities in {capacities}")
    total = sum(capacities)
    bounds, acc = [], 0.0
    for c in capacities:
        acc += c
        bounds.append(round(num_layers * acc / total))
    out, start = [], 0
    for i, end in enumerate(bounds):
        end = max(end, start + (1 if capacities[i] > 0 and start < num_layers else 0))
        end = min(end, num_layers)
        out += [i] * (end - start)
        start = end
    out += [len(capacities) - 1] * (num_layers - len(out))
    return out


def _move(x, device: torch.device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) and x.device != device else x


class _CacheOnDevice:
    """The cache protocol for a layer on `device` over a cache held elsewhere."""

    def __init__(self, cache, device: torch.device):
        self._cache = cache
        self._device = device

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        dev = self._cache_device()
        k, v = self._cache.write(layer, _move(k, dev), _move(v, dev))
        return _move(k, self._device), _move(v, self._device)

    def _cache_device(self) -> torch.device:
        store = getattr(self._cache, "k", None) or getattr(getattr(self._cache, "pool", None), "k", None)
        return store[0].device if store else self._device

    def __getattr__(self, name):
        return getattr(self._cache, name)


class _ContextOnDevice:
    """A step context with its tensors (rotary tables, mask, alibi bias) on `device`."""

    _TENSORS = ("cos", "sin", "mask", "bias")

    def __init__(self, ctx, device: torch.device):
        self._ctx = ctx
        for name in self._TENSORS:
            setattr(self, name, _move(getattr(ctx, name, None), device))
        cache = getattr(ctx, "cache", None)
        self.cache = None if cache is None else _CacheOnDevice(cache, device)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class _OnDevice(nn.Module):
    """A decoder layer on `device` whose inputs may come from another one."""

    def __init__(self, layer: nn.Module, device: torch.device):
        super().__init__()
        self.layer = layer
        self.device = device
        self._ctx_key = None
        self._ctx_moved = None

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        if self._ctx_key is not ctx:  # one move of the context per forward pass, shared by the layers after it
            self._ctx_key, self._ctx_moved = ctx, _ContextOnDevice(ctx, self.device)
        return self.layer(_move(x, self.device), self._ctx_moved, layer)


class _InputTo(nn.Module):
    """`module(x)` with x first moved to `device` (the final norm, back on the first device)."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(_move(x, self.device))


def dispatch(model: nn.Module, device_map: str = "auto", devices: list | None = None,
             capacities: list[float] | None = None) -> nn.Module:
    """Spread `model`'s layers over `devices` (default: every visible GPU, else the CPU): a list of pipeline
    stages (the same device may appear twice). `capacities` (default: free memory of each) sizes each one's share.
    Returns the model, changed in place; `model.device_map` lists each layer's device."""
    from ..config import FalconConfig

    if device_map != "auto":
        raise ValueError(f"--device-map {device_map!r}: only 'auto' is supported")
    devices = [torch.device(d) for d in (devices or available_devices())]
    if len(devices) == 1:  # nothing to spread: the model on that device, as it is
        return model.to(devices[0])
    if not isinstance(getattr(model, "config", None), FalconConfig):
        raise ValueError(f"--device-map over {len(devices)} devices is supported for Falcon, not "
                         f"{type(model).__name__}; Falcon-Mamba-7B fits one GPU in bf16")
    layers = model.transformer.h
    caps = capacities if capacities is not None else [float(_free_bytes(d)) for d in devices]
    where = plan_layers(len(layers), caps)
    first = devices[0]
    # Embedding, final norm and head (which may share the embedding's matrix) stay on the first device, with the
    # cache: only the [B, D] hidden state of each layer boundary crosses over, and the logits come back where the
    # engine reads them.
    model.to(first)
    for i, stage in enumerate(where):
        layers[i] = _OnDevice(layers[i].to(devices[stage]), devices[stage])
    model.transformer.ln_f = _InputTo(model.transformer.ln_f, first)
    model.device_map = [str(devices[s]) for s in where]
    return model
