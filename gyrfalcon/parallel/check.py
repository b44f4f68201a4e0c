"""Check tensor parallelism against one process: run under torchrun, prints (and writes) what it measured.

    torchrun --standalone --nproc-per-node 2 -m gyrfalcon.parallel.check MODEL_DIR [MODEL_DIR@nf4 ...] [--out r.json]

For each model: the full logits of a 2-row prompt without a cache, then a prefill and a few decode steps through
a KV cache, each compared with the same model loaded whole in every process (fp32), and what each rank read from
the checkpoint (bytes, local shapes). `DIR@MODE` (int8, nf4, ...): the tensor-parallel model is quantized slice
by slice, and both it and the whole model quantized the same way are compared with the float model (they are not
bit-equal: a row-parallel slice has its own scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _steps(model, ids: torch.Tensor, decode: list[int]) -> list[torch.Tensor]:
    """Logits of: the whole prompt (no cache), its last position after a cached prefill, each decode step."""
    out = [model(ids)]
    cache = model.new_cache(ids.shape[0], ids.shape[1] + len(decode) + 1)
    out.append(model(ids, cache, last_only=True))
    for t in decode:
        out.append(model(torch.full((ids.shape[0], 1), t, dtype=torch.long), cache, last_only=True))
    return out


def _memory(model) -> dict:
    """Bytes of the model's tensors, and bytes of the storages behind them: equal when no tensor is a view into
    something bigger (a whole matrix kept alive behind a slice)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return {"tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "storage_bytes": sum(storages.values())}


def check_model(model_dir: str, group, quantize: str | None = None) -> dict:
    from ..config import load_config
    from ..models import build_model
    from ..quant.swap import load_into
    from .load import load_parallel_model
    from .shard import TensorParallelError

    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(model_dir)
    row: dict = {"model": str(model_dir), "layout": config.layout, "quantize": quantize}
    try:
        tp = load_parallel_model(model_dir, config, rank, world, group, torch.float32, "cpu", quantize)
    except TensorParallelError as exc:
        row["error"] = str(exc)
        return row
    ref = load_into(build_model(config), model_dir, torch.float32, "cpu", quantize).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=gen)
    decode = torch.randint(0, config.vocab_size, (3,), generator=gen).tolist()
    with torch.inference_mode():
        got, want = _steps(tp, ids, decode), _steps(ref, ids, decode)
        if quantize is not None:  # how far each quantized model is from the float one
            exact = _steps(load_into(build_model(config), model_dir, torch.float32, "cpu").eval(), ids, decode)
            row["quant_error_tp"] = max(float((a - b).abs().max()) for a, b in zip(got, exact, strict=True))
            row["quant_error_single"] = max(float((a - b).abs().max()) for a, b in zip(want, exact, strict=True))
    info = tp.tensor_parallel
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "bytes_read": info.bytes_read, "shapes": info.shapes,
                                      **_memory(tp),
                                      "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(got, want,
                                                                                                      strict=True)),
                                      "logit_scale": float(want[0].abs().max())})
    row["ranks"] = gathered
    from ..weights import find_checkpoint, read_safetensors_header

    row["checkpoint_bytes"] = sum(i.nbytes for f in find_checkpoint(model_dir).files
                                  for i in read_safetensors_header(f)[0].values())
    row["argmax_equal"] = all(bool((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(got, want, strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gyrfalcon.parallel.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model dirs; DIR@MODE checks DIR quantized to MODE")
    p.add_argument("--out", help="write the results as JSON (rank 0)")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = []
    for m in args.models:
        path, _, mode = m.partition("@")
        rows.append(check_model(path, dist.group.WORLD, mode or None))
    if dist.get_rank() == 0:
        text = json.dumps(rows, indent=1, default=str)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        for r in rows:
            if "error" in r:
                print(f"{r['model']}: {r['error']}")
            else:
                diff = max(x["max_abs_diff"] for x in r["ranks"])
                read = [x["bytes_read"] for x in r["ranks"]]
                print(f"{r['model']} ({r['layout']}, {r['quantize'] or 'fp32'}): max |logit diff| {diff:.2e}, "
                      f"argmax equal {r['argmax_equal']}, bytes read per rank {read}"
                      + f" of {r['checkpoint_bytes']}"
                      + (f", error vs fp32: tp {r['quant_error_tp']:.3f} single {r['quant_error_single']:.3f}"
                         if r["quantize"] else ""))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
