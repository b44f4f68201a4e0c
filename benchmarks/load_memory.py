"""Peak resident memory of `load_weights`, relative to the bytes of the weights it loads.

Builds a random Falcon (7B layout by default, scaled down), saves it with `save_weights` in fp32 and in bf16, then
loads each into fp32 on the CPU in a fresh subprocess, so that nothing from building or saving is resident:

    peak delta = ru_maxrss during the load - RSS after imports (the high-water mark is reset before the load)
    ratio      = peak delta / bytes of the loaded weights            (target <= 1.1)

For the zero-copy fp32 -> fp32 case the weights are mapped but not yet read when the load returns, so the row
"after touching" reads every weight once and reports the peak again: then the file pages are resident, once.
The `--reference` rows show the naive route (safetensors.torch.load_file, cast, load_state_dict) for scale.

    python benchmarks/load_memory.py [--hidden 1024 --layers 16 --heads 16 --vocab 65024] [--reference]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gyrfalcon.config import from_hf, load_config
from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from gyrfalcon.models import build_model
from gyrfalcon.weights import load_weights, save_weights

MiB = 1024 * 1024


def _config(args: argparse.Namespace) -> dict:
    return {
        "model_type": "falcon",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "multi_query": True,
        "new_decoder_architecture": False,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
        "tie_word_embeddings": True,
    }


def _write_checkpoints(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    config = from_hf(_config(args))
    torch.manual_seed(0)
    # Built on the meta device and filled tensor by tensor: a real init of a few hundred million parameters would
    # take minutes on a small CPU, and the values do not matter here.
    model = build_model(config)
    state = {}
    for name, p in model.named_parameters():
        state[name] = torch.randn(p.shape) * 0.02
    dirs = {}
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        d = root / tag
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        save_weights({k: v.to(dtype) for k, v in state.items()}, d)
        dirs[tag] = d
    return dirs


def _child(model_dir: Path, method: str) -> None:
    """One measurement, in its own process: load into fp32 on CPU and print a JSON line."""
    model = build_model(load_config(model_dir))
    gc.collect()
    baseline = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    if method == "load_weights":
        load_weights(model, model_dir, torch.float32, "cpu")
    else:  # the naive route, for scale
        from safetensors.torch import load_file

        state = load_file(model_dir / "model.safetensors")
        state = {k: v.to(torch.float32) for k, v in state.items()}
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        del state
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    # Read every weight once (as a forward pass would) and take the peak again.
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())  # no temporaries beyond a scalar
    touched = peak_rss_bytes()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # unique: tied counted once
    print(json.dumps({"baseline": baseline, "peak": peak, "touched": touched, "weight_bytes": weight_bytes,
                      "seconds": seconds, "checksum": checksum}))


def _measure(model_dir: Path, method: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), "--method", method],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=65024)
    parser.add_argument("--reference", action="store_true", help="also measure the naive load_file route")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="load_weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.method)
        return

    with tempfile.TemporaryDirectory(prefix="gyrfalcon-load-memory-") as tmp:
        dirs = _write_checkpoints(args, Path(tmp))
        methods = ["load_weights"] + (["reference"] if args.reference else [])
        print(f"hidden={args.hidden} layers={args.layers} heads={args.heads} vocab={args.vocab} (multi-query, tied)")
        header = (f"{'case':<28}{'weights MiB':>12}{'peak delta MiB':>16}{'ratio':>8}"
                  f"{'after touching MiB':>20}{'ratio':>8}{'load s':>8}")
        print(header)
        print("-" * len(header))
        checksums = set()
        for method in methods:
            for tag in ("fp32", "bf16"):
                r = _measure(dirs[tag], method)
                w = r["weight_bytes"]
                peak, touched = r["peak"] - r["baseline"], r["touched"] - r["baseline"]
                name = f"{tag} -> fp32" + ("" if method == "load_weights" else " (load_file)")
                print(f"{name:<28}{w / MiB:>12.1f}{peak / MiB:>16.1f}{peak / w:>8.3f}"
                      f"{touched / MiB:>20.1f}{touched / w:>8.3f}{r['seconds']:>8.2f}")
                checksums.add((tag, round(r["checksum"], 3)))
        if len({c for t, c in checksums if t == "fp32"}) > 1 or len({c for t, c in checksums if t == "bf16"}) > 1:
            print("WARNING: the loads disagree on the weights' checksum")


if __name__ == "__main__":
    main()
