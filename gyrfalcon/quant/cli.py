"""`gyrfalcon quantize MODEL OUT --mode nf4`: stream a float checkpoint in, quantized, and write it back.

The output directory holds the config and tokenizer files of MODEL and `model.safetensors` (or shards) whose
metadata records the quantization (`gyrfalcon.quantization`), so `gyrfalcon.load(OUT)` and every command load it
quantized with no flag. The directory is written under a temporary name and only then put in place: a failed or
interrupted run leaves any earlier OUT as it was.
"""

from __future__ import annotations

import argparse
import re
import sys
import time


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    unit = m.group(2).rstrip("b").rstrip("i")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    from .swap import MODES

    p.add_argument("model", metavar="MODEL", help="float checkpoint: model dir or hub id")
    p.add_argument("out", metavar="OUT", help="output directory (replaced atomically if it exists)")
    p.add_argument("--mode", choices=MODES, default="nf4", help="quantization format (default: nf4)")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="keep this module in full precision (name, suffix such as lm_head, or pattern; repeatable)")
    p.add_argument("--revision", help="hub revision for a hub id")
    p.add_argument("--max-shard-size", type=_size, help="split the weights into shards of at most this size")


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..models import build_model
    from ..weights import resolve_model_dir
    from . import weight_bytes
    from .swap import checkpoint_quantization, load_into, save_quantized

    src = resolve_model_dir(args.model, revision=args.revision)
    if checkpoint_quantization(src) is not None:
        raise ValueError(f"{src} is already quantized; quantize its float checkpoint instead")
    t0 = time.perf_counter()
    model = build_model(load_config(src))
    load_into(model, src, torch.float32, "cpu", args.mode, args.skip)
    loaded = time.perf_counter() - t0
    out = save_quantized(model, args.out, src, max_shard_bytes=args.max_shard_size)
    info = model._gyrfalcon_quant  # noqa: SLF001
    kinds: dict[str, int] = {}
    for fmt in info["modules"].values():
        kinds[fmt] = kinds.get(fmt, 0) + 1
    print(f"quantized {src} -> {out} ({args.mode}; "
          + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) + f"); weights "
          f"{weight_bytes(model) / 2**20:.1f} MiB; {loaded:.1f}s to load and quantize, "
          f"{time.perf_counter() - t0 - loaded:.1f}s to write", file=sys.stderr)
    return 0
