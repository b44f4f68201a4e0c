"""`--compile`: the one-token decode step through torch.compile; prefill and scoring stay eager.

    compile_decode(model)                       # inductor, the default backend
    compile_decode(model, backend="aot_eager")  # what the CPU tests use (see tests/test_compile.py)

The decode step is the model's forward with one new token per row and a cache. Its shapes change every step
(the keys attended grow by one), so it is compiled with dynamic shapes: one graph serves every length instead of
one compilation per length. The cache bookkeeping done in Python (lengths, block tables) runs in the
graph-break-free eager parts around it.

Equality: with backend="aot_eager" the compiled step computes the same operations and matches eager within
float rounding; with inductor the kernels are fused and reassociated, so the tolerance is a few ulps of fp32
(tests/test_compile.py states it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def _traceable_linears() -> Iterator[None]:
    """Plain `mod(x)` linears while the compiled step runs: the hand-written CPU kernels (models/fast_linear.py,
    called through ctypes) are opaque to torch.compile and would break the graph at every projection."""
    try:
        from ..models import fast_linear
    except ImportError:  # pragma: no cover - an older model code without the kernels
        yield
        return
    saved = fast_linear.FAST
    fast_linear.FAST = False
    try:
        yield
    finally:
        fast_linear.FAST = saved


def compile_decode(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = True) -> nn.Module:
    """Route `model`'s decode calls (one token a row, with a cache) through torch.compile; returns the model."""
    if getattr(model, "_gyrfalcon_compiled", False):
        return model
    eager = model.forward
    compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=dynamic)

    def forward(input_ids: torch.Tensor, cache=None, **kwargs) -> torch.Tensor:
        if cache is not None and input_ids.shape[1] == 1:
            # The engine's paged view builds its index tensors from Python lists on first use; built in here, the
            # lists' values would become guards of the graph and every step would recompile.
            prepare = getattr(cache, "prepare", None)
            if prepare is not None:
                prepare()
            with _traceable_linears():
                return compiled(input_ids, cache, **kwargs)
        return eager(input_ids, cache, **kwargs)

    model.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) finds it first
    model._gyrfalcon_compiled = True
    return model
