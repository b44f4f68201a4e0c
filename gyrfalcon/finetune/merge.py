"""Fold LoRA adapters into the base weights: W' = W + scaling * B @ A, leaving plain modules.

    merge_lora(model)                                   # in place: every LoraLinear becomes its base, updated
    gyrfalcon merge BASE ADAPTER OUT [--quantize nf4]   # an ordinary checkpoint dir, loadable with no flags

A quantized base is dequantized, the update added in fp32, and the sum quantized again in the same format (int8
with the same LLM.int8() threshold, nf4/fp4 with the same double quantization), so the merged model keeps its
quantization record and saves and loads like any quantized checkpoint. That costs one more rounding of the base
weights; `--quantize` on a float base merges first and quantizes once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .lora import LoraLinear, _set_module


def _requantize(base: nn.Module, w: torch.Tensor) -> nn.Module:
    """A new quantized Linear like `base` (same class, format and options) holding the float matrix `w`."""
    from ..quant.linear import Int4Weight, Int8Weight

    old = base.weight
    if isinstance(old, Int8Weight):
        qw = Int8Weight.from_float(w, old.dtype, old.threshold)
    elif isinstance(old, Int4Weight):
        qw = Int4Weight.from_float(w, old.quant_type, old.dtype, old.double_quant)
    else:  # pragma: no cover - a new QuantWeight kind must be added here
        raise TypeError(f"cannot merge into a {type(old).__name__} weight")
    bias = None if base.bias is None else base.bias.detach()
    return type(base)(qw, bias)


def merged_module(lora: LoraLinear) -> nn.Module:
    """The base module of `lora` with its update folded in (a float base is updated in place)."""
    base = lora.base
    delta = lora.delta_weight(torch.float32).to(base.weight.device)
    if isinstance(base, nn.Linear):
        with torch.no_grad():
            w = base.weight
            w.copy_((w.float() + delta).to(w.dtype))
        return base
    merged = _requantize(base, base.weight.dequantize(torch.float32) + delta)
    merged.train(base.training)
    return merged


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place; returns the model): LoraLinear modules are replaced by
    plain `nn.Linear` / quantized Linear modules, so the state dict has the base checkpoint's names again."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if not wrapped:
        raise ValueError("the model has no LoRA adapters to merge")
    for name, mod in wrapped:
        _set_module(model, name, merged_module(mod))
    if hasattr(model, "_gyrfalcon_lora"):
        del model._gyrfalcon_lora
    return model


# ---------------------------------------------------------------------------------------------------------------
# `gyrfalcon merge`


def _stored_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint's weights are stored in (fp32 when it cannot tell)."""
    from ..weights import find_checkpoint, read_safetensors_header

    ckpt = find_checkpoint(model_dir)
    if ckpt.format == "safetensors":
        infos, _ = read_safetensors_header(ckpt.files[0])
        for info in infos.values():
            if info.dtype.is_floating_point:
                return info.dtype
    return torch.float32


def _write_dir(out_dir: Path, source_dir: Path, write, config_dtype: str | None) -> Path:
    """`write_checkpoint_dir` with the copied config's dtype entry set to what the weights are saved in."""
    from ..weights.load import write_checkpoint_dir

    def write_all(tmp: Path) -> None:
        cfg_path = tmp / "config.json"
        if config_dtype and cfg_path.is_file():
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            for key in ("torch_dtype", "dtype"):
                if key in raw:
                    raw[key] = config_dtype
            cfg_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        write(tmp)

    return write_checkpoint_dir(out_dir, write_all, source_dir)


def merge_checkpoint(base: str | Path, adapter: str | Path, out: str | Path, *, quantize: str | None = None,
                     skip=(), dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                     revision: str | None = None) -> Path:
    """Load BASE, merge ADAPTER into it and write an ordinary checkpoint dir at OUT.

    A float base is saved in its stored dtype (or `dtype`), or quantized after merging with `quantize` (a
    `gyrfalcon.quant` mode). A quantized base (written by `gyrfalcon quantize`) stays in its format."""
    from ..config import load_config
    from ..models import build_model
    from ..quant.swap import checkpoint_quantization, load_into, parse_skip, quantize_model, save_quantized
    from ..weights import resolve_model_dir, save_weights
    from .peft_io import load_adapter, read_adapter_config

    adapter = Path(adapter)
    read_adapter_config(adapter)  # a bad adapter fails before the base is looked up or read
    src = resolve_model_dir(base, revision=revision)
    out = Path(out)
    for what, p in (("base model", src), ("adapter", adapter)):
        if out.exists() and out.resolve() == p.resolve():
            raise ValueError(f"refusing to overwrite the {what} {p}: choose another output directory")
    info = checkpoint_quantization(src)
    if info is not None and quantize is not None:
        raise ValueError(f"{src} is already quantized ({info['mode']}); merge into it without --quantize, or "
                         "merge into its float checkpoint with --quantize")
    if quantize is None and parse_skip(skip):
        raise ValueError("--skip needs --quantize")
    dtype = dtype or (torch.float32 if info is not None else _stored_dtype(src))
    model = build_model(load_config(src))
    # Merging adds in fp32 whatever the output dtype: load fp32 when the result is quantized or fp32 anyway.
    load_into(model, src, torch.float32 if quantize else dtype, device)
    load_adapter(model, adapter, dtype=torch.float32)
    merge_lora(model)
    if quantize is not None:
        quantize_model(model, quantize, skip)
    if getattr(model, "_gyrfalcon_quant", None) is not None:
        return save_quantized(model, out, src)
    name = str(dtype).replace("torch.", "")
    return _write_dir(out, src, lambda tmp: save_weights(model, tmp), name)


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    from ..quant.swap import MODES

    p.add_argument("base", metavar="BASE", help="base model: dir or hub id (float, or quantized by gyrfalcon)")
    p.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter dir (PEFT format: adapter_config.json + "
                                                      "adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="output checkpoint dir (replaced atomically if it exists)")
    p.add_argument("--quantize", choices=MODES, help="quantize the merged weights (the output head stays 8-bit)")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="with --quantize: keep this module in full precision (repeatable or comma-separated)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of a float output (default: the dtype BASE is stored in)")
    p.add_argument("--device", default="cpu", help="where to merge (default: cpu)")
    p.add_argument("--revision", help="hub revision for a hub id BASE")


def run_merge(args: argparse.Namespace) -> int:
    from ..api import parse_dtype

    t0 = time.perf_counter()
    out = merge_checkpoint(args.base, args.adapter, args.out, quantize=args.quantize, skip=args.skip,
                           dtype=parse_dtype(args.dtype), device=args.device, revision=args.revision)
    print(f"merged {args.adapter} into {args.base} -> {out}"
          + (f" ({args.quantize})" if args.quantize else "") + f" in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0
