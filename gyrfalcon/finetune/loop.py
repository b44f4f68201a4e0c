"""Supervised fine-tuning on packed chat rows, run by the same loop as `gyrfalcon train` (`gyrfalcon.train.loop`).

What this module adds to that loop:

* `PackedCausalLM`: the forward pass over packed rows. A Falcon's blocks are run with a block-diagonal causal
  mask and rotary positions that restart per document (`packed_context`), so documents sharing a row never see
  each other; a row holding one document takes the plain causal path (no mask tensor at all). Falcon-Mamba has no
  way to reset its state mid-row, so its rows hold one document each (padding; see `data.pack_examples`).
* `linear_cross_entropy`: the output head and the loss fused, a chunk of rows at a time, on the target rows only
  (assistant tokens). The gradient with respect to the hidden states (and the head, when it trains) is computed in
  the forward pass while each chunk's logits are at hand, so the [tokens, vocab] logits never exist in full and
  the backward pass is a multiplication by the incoming scalar. `reference_loss` is the plain
  logits-then-cross-entropy definition it is tested against.
* `make_quantized_differentiable`: a quantized base (QLoRA) is frozen, but the gradient must still flow through
  it to the adapters below; each quantized Linear's backward multiplies by its dequantized weight.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE

# Rows of logits materialized at once by `linear_cross_entropy` (times the vocabulary, times 4 bytes).
LOSS_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 logits


# ---------------------------------------------------------------------------------------------------------------
# matrix products of frozen weights


def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch built without oneDNN
        return False


_ONEDNN = _onednn_available()
USE_ONEDNN = True  # False: plain torch products everywhere (the reference path, for tests and comparisons)


def matmul_wt(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) for x [..., k] and w [n, k] (w may be a transposed view), no autograd.

    On the CPU in fp32 this goes through oneDNN's GEMM, not `torch.mm`'s (MKL): on the AMD EPYC machines we
    measure on, MKL runs these training shapes at 60-95 GFLOP/s per core and oneDNN at 145-210 (see
    benchmarks/finetune_perf.py). Elsewhere (GPU, bf16, oneDNN missing) it is `F.linear`.
    """
    if USE_ONEDNN and _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 == w.dtype:
        with torch.no_grad():
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    with torch.no_grad():
        return F.linear(x, w, bias)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W (no gradient for W or b): the input gradient is g W, both products through
    `matmul_wt` (W's transpose is a view, never copied)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return matmul_wt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return matmul_wt(grad.contiguous(), weight.t()), None, None


def _frozen_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return F.linear(x, module.weight, module.bias)  # trained after all (full mode): the ordinary path
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, module.weight, module.bias)
    return matmul_wt(x, module.weight, module.bias)


def use_fast_frozen_linears(model: nn.Module) -> int:
    """Route every frozen `nn.Linear` that is called as a module (the bases inside LoRA wrappers) through
    `_FrozenLinear`; returns how many. Only where it pays: CPU fp32 with oneDNN. The module's parameters,
    state dict and results (to rounding) are unchanged."""
    if not _ONEDNN:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and not m.weight.requires_grad and "forward" not in m.__dict__:
            m.forward = functools.partial(_frozen_linear_forward, m)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# the loss


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h @ W^T + b, target), gradients computed in the forward pass (see the module doc)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, need_h: bool, need_w: bool, compute_dtype: torch.dtype) -> torch.Tensor:
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(n, h.shape[1], dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_w and bias is not None \
            else None
        w = weight.to(compute_dtype)
        for a in range(0, n, chunk):
            hc, tc = h[a: a + chunk].to(compute_dtype), targets[a: a + chunk]
            logits = matmul_wt(hc, w).float()
            if bias is not None:
                logits += bias.float()
            rows = torch.arange(hc.shape[0], device=h.device)
            top = logits.amax(dim=-1, keepdim=True)
            target = logits[rows, tc] - top[:, 0]
            # exp(x - max), in the logits' memory. Clamped at -80 so no result is a subnormal float (e^-80 is
            # 1.8e-35, above fp32's smallest normal 1.2e-38): subnormal arithmetic is ~100x slower on x86, and a
            # trained model's softmax has many such tails. What is dropped is below 1e-34 per token.
            probs = logits.sub_(top).clamp_(min=-80.0).exp_()
            norm = probs.sum(dim=-1)
            total += (norm.log() - target).sum()
            if need_h or need_w:
                probs.div_(norm[:, None])  # softmax
                probs[rows, tc] -= 1.0  # d CE / d logits
                p = probs.to(compute_dtype)
                if need_h:
                    grad_h[a: a + chunk] = matmul_wt(p, w.t()).to(h.dtype)
                if need_w:
                    grad_w += (p.t() @ hc).float()
                    if grad_b is not None:
                        grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        gb = grad_b * grad_out if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def _head_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's float weight (a quantized head is dequantized: it is frozen, nothing flows into it)."""
    w = head.weight
    if not isinstance(w, torch.Tensor):
        return w.dequantize(torch.float32), getattr(head, "bias", None)
    return w, head.bias


def linear_cross_entropy(h: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(h)` against `targets` ([N, D], [N]; every target valid)."""
    weight, bias = _head_weight(head)
    chunk = max(1, chunk_elements // weight.shape[0])
    dev = h.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk,
                                     need_h, need_w, compute)


# ---------------------------------------------------------------------------------------------------------------
# the packed forward


def _is_falcon(model: nn.Module) -> bool:
    return hasattr(model, "transformer") and hasattr(model.transformer, "h")


def packed_context(model: nn.Module, positions: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype):
    """The per-call context a Falcon's blocks read, for packed rows: rotary tables indexed by each token's position
    in its document, and a mask letting a token see earlier tokens of its own document only."""
    from ..models.falcon import _StepContext
    from ..models.layers import alibi_bias, alibi_slopes

    b, t = positions.shape
    device = positions.device
    config = model.config
    single = bool((segments == 0).all()) and bool((positions == torch.arange(t, device=device)).all())
    cos = sin = None
    if model.rotary is not None:
        cos_table, sin_table = model.rotary.rolled_table(t, device, dtype)
        if single:
            cos, sin = cos_table[:t, None][None], sin_table[:t, None][None]
        else:
            cos, sin = cos_table[positions][:, :, None], sin_table[positions][:, :, None]  # [B, T, 1, d]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask = None if single else ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
    bias = None
    if config.alibi:
        # Alibi's bias grows with the key's position in the row, but a softmax does not change when the same
        # amount is added to a query's every score, so the row position serves as well as the document position.
        bias = alibi_bias(alibi_slopes(config.num_heads).to(device), t, config.head_dim, dtype)
        visible = mask if mask is not None else causal[None, None]
        bias = bias.masked_fill(~visible, float("-inf"))
    return _StepContext(cos, sin, mask, bias, single and bias is None, None)


def packed_hidden(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                  segments: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, D] (after the last norm) of packed rows."""
    if not _is_falcon(model):
        raise TypeError("packed rows need a Falcon; run Falcon-Mamba on one document per row (pack=False)")
    x = model.transformer.word_embeddings(input_ids)
    ctx = packed_context(model, positions, segments, x.dtype)
    for i, layer in enumerate(model.transformer.h):
        x = layer(x, ctx, i)
    return model.transformer.ln_f(x)


def packed_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of packed rows (for tests and evaluation tools; training uses `PackedCausalLM`)."""
    if not _is_falcon(model):
        return model(batch["input_ids"])
    return model.lm_head(packed_hidden(model, batch["input_ids"], batch["positions"], batch["segments"]))


class PackedCausalLM(nn.Module):
    """`forward(batch) -> (mean loss over target tokens, number of target tokens)` for batches of `data`'s packed
    rows (input_ids, targets, positions, segments). Holds the model as `.model` (its parameters keep their names
    under that prefix)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.chunk_elements = LOSS_CHUNK_ELEMENTS

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        targets = batch["targets"]
        keep = targets != IGNORE
        n = int(keep.sum())
        if _is_falcon(self.model):
            h = packed_hidden(self.model, batch["input_ids"], batch["positions"], batch["segments"])
            total = linear_cross_entropy(h[keep], self.model.lm_head, targets[keep], self.chunk_elements)
        else:  # one document per row, right-padded: causal, so padding never reaches a real token
            logits = self.model(batch["input_ids"])
            total = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        # A micro-batch with no target (all prompt) contributes zero loss and zero gradient rather than NaN.
        return total / max(n, 1), n


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The loop's loss function: `model` is a `PackedCausalLM` (or anything called the same way)."""
    return model(batch)


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The plain definition: full logits [B, T, V], then mean cross-entropy over target tokens (slow path)."""
    logits = packed_logits(model, batch).float()
    targets = batch["targets"]
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss / max(n, 1), n


# ---------------------------------------------------------------------------------------------------------------
# quantized bases


class _FrozenQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return module.weight.linear(x, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.module.weight.dequantize(grad.dtype)
        return matmul_wt(grad.contiguous(), w.t()), None


def _quant_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantLinear.apply(x, module)
    return module.weight.linear(x, module.bias)


def make_quantized_differentiable(model: nn.Module) -> int:
    """Let gradients flow through every frozen quantized Linear (their fast kernels have no backward of their
    own): the input gradient is grad @ dequantized W. Returns how many modules were changed."""
    from ..quant.linear import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and "forward" not in m.__dict__:
            m.forward = functools.partial(_quant_forward, m)
            n += 1
    return n


def prepare_for_training(model: nn.Module) -> None:
    """What `gyrfalcon finetune` does to a model with adapters (or a quantized base) before training: gradients
    through quantized Linears, and frozen Linears on the fast GEMM."""
    make_quantized_differentiable(model)
    use_fast_frozen_linears(model)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a quantized weight counts its logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        w = m.__dict__.get("weight")
        if w is not None and not isinstance(w, torch.Tensor) and hasattr(w, "shape") and not getattr(m, "tied", False):
            total += int(w.shape[0]) * int(w.shape[1])
    return trainable, total


def describe(x: Any) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e5 else str(x)
