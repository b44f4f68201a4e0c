"""`gyrfalcon finetune`: LoRA / QLoRA / full-parameter fine-tuning of a Falcon or Falcon-Mamba on a local file.

    gyrfalcon finetune [MODEL] --data oasst_en_100_trees/en_100_tree.jsonl --out adapter/ [--quantize nf4]

MODEL defaults to the bundled tiny Falcon. Chat and instruction files (OASST trees, Guanaco text, Alpaca JSON,
messages JSONL; see `gyrfalcon.finetune.data`) train on the assistant's tokens only; with `--full` a plain text
file is continued pretraining. The loop is `gyrfalcon.train.loop.train`, as for `gyrfalcon train`.

OUT receives: the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) or, with `--full`, a
whole model dir; train_log.jsonl (one record per step, evals interleaved); loss_curve.png; finetune.json (the run's
settings and results); checkpoints/checkpoint.pt (trainable weights, optimizer, schedule, data position and RNG,
written atomically every --save-every steps), which `--resume` continues from.

Data parallel: run under torchrun (`torchrun --nproc-per-node N -m gyrfalcon.cli finetune ...`): each process
takes every N-th micro-batch and gradients are averaged once per step, so N processes with --grad-accum A train
exactly like one process with --grad-accum N*A (same global batch). gloo on CPU, NCCL on GPU. `--fsdp` (GPU only)
shards parameters, gradients and optimizer state across the processes instead of replicating them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..train.loop import (
    PRECISIONS,
    GradSync,
    TrainConfig,
    TrainResult,
    atomic_write_text,
    evaluate,
    load_checkpoint,
    train,
)
from .data import (
    FORMATS,
    DataFormatError,
    PackedBatches,
    detect_format,
    encode_records,
    eval_batches,
    load_records,
    split_records,
)
from .loop import PackedCausalLM, prepare_for_training, sft_loss, trainable_parameters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="base model dir or hub id (default: bundled model)")
    p.add_argument("--model", "-m", help="base model dir or hub id (default: the bundled tiny Shakespeare Falcon)")
    p.add_argument("--revision", help="hub revision for a hub id")
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="chat/instruction file (OASST trees, Guanaco, Alpaca, messages "
                                                  "JSONL), or with --full a plain text corpus")
    io.add_argument("--format", choices=[*FORMATS, "text"], help="data format (default: detected)")
    io.add_argument("--oasst-paths", choices=["best", "all"], default="best",
                    help="OASST trees: the best-ranked reply path per tree (Guanaco's recipe) or every path")
    io.add_argument("--out", required=True, help="output dir: the adapter (PEFT format) or, with --full, a model")
    io.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of conversations (default 0.1)")
    io.add_argument("--no-packing", action="store_true", help="one example per row (padding) instead of packing")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=16, help="adapter rank (default 16)")
    lo.add_argument("--lora-alpha", type=float, default=32.0, help="scaling numerator: scaling = alpha / r")
    lo.add_argument("--lora-dropout", type=float, default=0.05)
    lo.add_argument("--targets", help="comma-separated module names to adapt (default: query_key_value, dense, "
                                      "dense_h_to_4h, dense_4h_to_h; Falcon-Mamba: in_proj, x_proj, out_proj), "
                                      "or all-linear")
    lo.add_argument("--quantize", choices=["nf4", "fp4", "int8"], help="quantize the frozen base (nf4: QLoRA)")
    lo.add_argument("--full", action="store_true", help="train every parameter (no adapters)")

    t = p.add_argument_group("optimization")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (per process)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    t.add_argument("--min-lr", type=float, help="final learning rate (default lr / 10)")
    t.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine",
                   help="warmup + cosine, or warmup-stable-decay (wsd)")
    t.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of steps spent decaying")
    t.add_argument("--decay-shape", choices=["linear", "exp"], default="linear", help="wsd: decay shape")
    t.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: 10, or a tenth of --steps when that is fewer)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a dynamic loss scale (CUDA)")
    t.add_argument("--grad-checkpointing", "--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    t.add_argument("--fsdp", action="store_true", help="shard the model across torchrun processes (CUDA only)")

    r = p.add_argument_group("evaluation and checkpoints")
    r.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (0 = at the end)")
    r.add_argument("--eval-batches", type=int, default=0, help="held-out batches per eval (0 = all)")
    r.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0 = at the end)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_args(a: argparse.Namespace) -> None:
    _require(Path(a.data).is_file(), f"--data {a.data}: no such file")
    for dest in ("lora_r", "steps", "batch_size", "grad_accum", "seq_len"):
        _require(getattr(a, dest) >= 1, f"--{dest.replace('_', '-')} {getattr(a, dest)}: must be >= 1")
    if a.warmup is None:  # a short run (e.g. --steps 10) should not fail on the default warmup
        a.warmup = min(10, a.steps // 10) if a.steps >= 1 else 0
    for dest in ("warmup", "eval_every", "eval_batches", "save_every"):
        _require(getattr(a, dest) >= 0, f"--{dest.replace('_', '-')} {getattr(a, dest)}: must be >= 0")
    _require(math.isfinite(a.lr) and a.lr > 0, f"--lr {a.lr}: must be a positive number")
    if a.min_lr is not None:
        _require(0 <= a.min_lr <= a.lr, f"--min-lr {a.min_lr}: must be in [0, --lr]")
    _require(a.warmup < a.steps or a.warmup == 0, f"--warmup {a.warmup}: must be below --steps {a.steps}")
    _require(0 <= a.lora_dropout < 1, f"--lora-dropout {a.lora_dropout}: must be in [0, 1)")
    _require(math.isfinite(a.lora_alpha) and a.lora_alpha > 0, f"--lora-alpha {a.lora_alpha}: must be > 0")
    _require(0 <= a.val_fraction < 1, f"--val-fraction {a.val_fraction}: must be in [0, 1)")
    _require(0 < a.decay_fraction <= 1, f"--decay-fraction {a.decay_fraction}: must be in (0, 1]")
    _require(a.grad_clip >= 0, f"--grad-clip {a.grad_clip}: must be >= 0")
    _require(a.weight_decay >= 0, f"--weight-decay {a.weight_decay}: must be >= 0")
    _require(not (a.full and a.quantize), "--full trains every weight; it cannot be combined with --quantize")
    _require(not (a.full and a.targets), "--targets chooses LoRA modules; it has no meaning with --full")
    _require(a.format != "text" or a.full, "--format text is continued pretraining: add --full")
    if a.threads is not None:
        _require(a.threads >= 1, f"--threads {a.threads}: must be >= 1")
    out = Path(a.out)
    _require(not out.exists() or out.is_dir(), f"--out {a.out}: exists and is not a directory")
    if a.device is not None:
        try:
            dev = torch.device(a.device)
        except RuntimeError as e:
            raise ValueError(f"--device {a.device}: {e}") from None
        _require(dev.type != "cuda" or torch.cuda.is_available(), f"--device {a.device}: CUDA is not available")
    if a.fsdp:
        _require(torch.cuda.is_available(), "--fsdp needs CUDA (use plain torchrun data parallelism on CPU)")
        _require(not a.resume, "--fsdp runs keep no checkpoints: --resume is not available with it")


# ---------------------------------------------------------------------------------------------------------------
# distributed


def init_distributed(device_arg: str | None, force: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process without it (unless `force`:
    FSDP needs a process group even for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is not None:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1 and not force:
        return 0, 1, device
    if "MASTER_ADDR" not in os.environ:
        raise ValueError("--fsdp runs under torchrun: torchrun --nproc-per-node N -m gyrfalcon.cli finetune ...")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------------------------
# data


class _TextRows:
    """Random windows of a token stream (continued pretraining) as packed-row batches; checkpointable."""

    def __init__(self, windows: Any, seq_len: int, rank: int, world: int):
        self.windows, self.seq_len, self.rank, self.world = windows, seq_len, rank, world
        self.positions = torch.arange(seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # Every process draws every global micro-batch and keeps its own: the stream is the same for any world size.
        batch = None
        for r in range(self.world):
            w = next(self.windows)
            if r == self.rank:
                batch = w
        return _window_batch(batch, self.positions)

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


def _window_batch(w: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    b, t = w.shape[0], w.shape[1] - 1
    return {"input_ids": w[:, :-1], "targets": w[:, 1:], "positions": positions[:t].expand(b, t),
            "segments": torch.zeros(b, t, dtype=torch.long)}


def build_data(a: argparse.Namespace, tokenizer, pack: bool, rank: int, world: int):
    """(train batch stream, held-out batches, description)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fmt = a.format
    if fmt is None:
        try:
            fmt = detect_format(a.data)
        except DataFormatError:
            if not a.full:
                raise
            fmt = "text"
    if fmt == "text":
        from ..train.data import RandomWindows, eval_windows, split_tokens, tokenize_file

        tokens = tokenize_file(a.data, lambda s: tokenizer.encode(s, add_special_tokens=False))
        train_tokens, val_tokens = split_tokens(tokens, a.val_fraction)
        windows = RandomWindows(train_tokens, a.seq_len, a.batch_size, a.seed)
        positions = torch.arange(a.seq_len)
        held = [_window_batch(w, positions) for w in
                eval_windows(val_tokens, a.seq_len, a.batch_size, a.eval_batches or None)]
        return _TextRows(windows, a.seq_len, rank, world), held, {"format": "text", "tokens": len(tokens)}
    records = load_records(a.data, fmt, a.oasst_paths)
    train_recs, val_recs = split_records(records, a.val_fraction, a.seed)
    train_ex = encode_records(tokenizer, train_recs, a.seq_len)
    val_ex = encode_records(tokenizer, val_recs, a.seq_len)
    stream = PackedBatches(train_ex, a.seq_len, a.batch_size, pad, a.seed, pack=pack, rank=rank, world=world)
    held = eval_batches(val_ex, a.seq_len, a.batch_size, pad, pack, a.eval_batches or None)
    info = {"format": fmt, "conversations": len(records), "train_conversations": len(train_recs),
            "heldout_conversations": len(val_recs), "train_target_tokens": sum(e.n_targets for e in train_ex),
            "train_rows_per_epoch": len(stream._rows_of(0))}
    return stream, held, info


# ---------------------------------------------------------------------------------------------------------------
# model


def build_model(a: argparse.Namespace, device: torch.device):
    """(llm, trainable module): the base loaded in fp32 (quantized with --quantize), with adapters unless --full."""
    from ..api import load

    model_id = a.model_pos or a.model
    llm = load(model_id, device=device, dtype="fp32", revision=a.revision, quantize=a.quantize)
    model = llm.model
    lora_cfg = None
    if a.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from .lora import LoraConfig, apply_lora

        targets = None
        if a.targets:
            targets = a.targets if a.targets == "all-linear" else tuple(t.strip() for t in a.targets.split(",")
                                                                       if t.strip())
        lora_cfg = LoraConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=targets)
        torch.manual_seed(a.seed)  # the adapters' initialization
        apply_lora(model, lora_cfg, dtype=torch.float32)
        prepare_for_training(model)
    model.train()
    return llm, model, lora_cfg


def run_fingerprint(a: argparse.Namespace) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    h = hashlib.sha256(Path(a.data).read_bytes()).hexdigest()
    keys = ("lora_r", "lora_alpha", "lora_dropout", "targets", "quantize", "full", "batch_size", "grad_accum",
            "seq_len", "seed", "format", "oasst_paths", "val_fraction", "no_packing")
    return {"data_sha256": h, "model": str(a.model_pos or a.model or "bundled"), **{k: getattr(a, k) for k in keys}}


# ---------------------------------------------------------------------------------------------------------------
# outputs


def write_loss_curve(history: list[dict[str, Any]], path: Path, title: str, eval_before: float | None = None) -> bool:
    """Training loss per step and held-out loss at each eval, as a PNG (False when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in history if "loss" in r]
    losses = [r["loss"] for r in history if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if eval_before is not None:
        ev.insert(0, (0, eval_before))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1, label="train (assistant tokens)")
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def save_outputs(a: argparse.Namespace, llm, model, lora_cfg, out: Path) -> None:
    if a.full:
        from ..train.cli import save_model_dir

        save_model_dir(model, llm.config, out, "fp32", llm.tokenizer.eos_token_id)
        src = Path(llm.path) if getattr(llm, "path", None) is not None else None
        if src is not None:
            for name in TOKENIZER_FILES:
                if (src / name).is_file() and src.resolve() != out.resolve():
                    shutil.copyfile(src / name, out / name)
        return
    try:
        from .peft_io import save_adapter
    except ImportError as e:  # pragma: no cover - the adapter writer is part of the package
        raise ValueError(f"cannot write the adapter: {e}") from None
    base_name = str(a.model_pos or a.model or "gyrfalcon/tiny-falcon-shakespeare")
    save_adapter(model, lora_cfg, out, base_model_name=base_name)


# ---------------------------------------------------------------------------------------------------------------
# the command


def run_finetune(args: argparse.Namespace) -> int:
    validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args.device, force=args.fsdp)
    try:
        result = _run(args, rank, world, device)
    finally:
        if world > 1 or args.fsdp:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0 if result is not None else 1


def _run(a: argparse.Namespace, rank: int, world: int, device: torch.device) -> TrainResult:
    out = Path(a.out)
    main = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    fingerprint = run_fingerprint(a)
    saved = load_checkpoint(ckpt_dir) if a.resume and (ckpt_dir / "checkpoint.pt").is_file() else None
    if saved is not None:
        old = saved["extra"].get("run", {})
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff:
            raise ValueError(f"--resume: this run differs from the checkpointed one in {', '.join(diff)}")
        if main:
            print(f"resuming from step {saved['step']} of {ckpt_dir}", file=sys.stderr)
    elif a.resume and main:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0", file=sys.stderr)

    llm, model, lora_cfg = build_model(a, device)
    is_falcon = hasattr(model, "transformer")
    stream, held, data_info = build_data(a, llm.tokenizer, pack=is_falcon and not a.no_packing, rank=rank,
                                         world=world)
    wrapped = PackedCausalLM(model)
    sync = None
    if a.fsdp:
        wrapped = _fsdp_wrap(wrapped)
    elif world > 1:
        sync = GradSync()
    trainable, total = trainable_parameters(model)
    if main:
        what = "full" if a.full else f"LoRA r={a.lora_r}" + (f" over {a.quantize}" if a.quantize else "")
        print(f"finetune: {what}, {trainable:,} of {total:,} parameters trainable; data {data_info}; "
              f"{world} process(es) on {device}", file=sys.stderr)
    cfg = TrainConfig(
        steps=a.steps, lr=a.lr, min_lr=a.min_lr if a.min_lr is not None else a.lr / 10, warmup=a.warmup,
        schedule=a.schedule, decay_fraction=a.decay_fraction, decay_shape=a.decay_shape,
        weight_decay=a.weight_decay, grad_accum=a.grad_accum, grad_clip=a.grad_clip, eval_every=a.eval_every,
        # Sharded (FSDP) state would need a collective checkpoint writer: such runs keep no checkpoints.
        save_every=a.save_every, checkpoint_dir=None if a.fsdp else str(ckpt_dir),
        log_path=str(out / "train_log.jsonl"),
        resume=a.resume, seed=a.seed, device=str(device), gradient_checkpointing=a.grad_checkpointing,
        precision=a.precision,
        progress=not a.no_progress, checkpoint_trainable_only=not a.full,
    )
    commands = [*(saved["extra"].get("commands", []) if saved else []), shlex.join(["gyrfalcon", *sys.argv[1:]])]
    t0 = time.perf_counter()
    # The held-out loss of the untouched model, the "before" of every comparison (a resumed run has it already).
    eval_before = saved["extra"].get("eval_loss_before") if saved is not None else None
    if held and saved is None:
        eval_before = evaluate(wrapped, held, sft_loss, device, a.precision)
        if main:
            print(f"held-out loss before training: {eval_before:.4f}", file=sys.stderr)
    result = train(wrapped, stream, sft_loss, cfg, eval_batches=held or None,
                   extra_state={"run": fingerprint, "commands": commands, "eval_loss_before": eval_before},
                   sync=sync)
    if a.fsdp:
        _fsdp_gather(wrapped)  # every process takes part; afterwards the parameters are whole everywhere
    if main:
        save_outputs(a, llm, model, lora_cfg, out)
        png = write_loss_curve(result.history, out / "loss_curve.png",
                               f"{'full' if a.full else 'LoRA'} fine-tune, {a.steps} steps", eval_before)
        summary = {
            "commands": commands, "run": fingerprint, "data": data_info, "world_size": world,
            "trainable_parameters": trainable, "total_parameters": total, "steps": result.step,
            "tokens": result.tokens, "train_loss": result.train_loss, "eval_loss_before": eval_before,
            "eval_loss": result.eval_loss,
            "seconds": result.seconds, "session_seconds": time.perf_counter() - t0,
            "loss_curve": "loss_curve.png" if png else None,
        }
        atomic_write_text(out / "finetune.json", json.dumps(summary, indent=2) + "\n")
        ev = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        print(f"finetune: {result.step} steps, {result.tokens:,} target tokens, final loss "
              f"{result.train_loss if result.train_loss is None else round(result.train_loss, 4)}{ev}; wrote {out}",
              file=sys.stderr)
    return result


def _fsdp_wrap(wrapped: torch.nn.Module) -> torch.nn.Module:
    """Shard every decoder block, then the rest (FSDP2's `fully_shard`); gradients are reduce-scattered in the
    backward pass, so no `GradSync`."""
    from torch.distributed.fsdp import fully_shard

    blocks = wrapped.model.transformer.h if hasattr(wrapped.model, "transformer") else wrapped.model.backbone.layers
    for block in blocks:
        fully_shard(block)
    fully_shard(wrapped)
    return wrapped


def _fsdp_gather(wrapped: torch.nn.Module) -> None:
    """All-gather every sharded module's parameters in place (FSDP2 swaps the whole tensors in until `reshard`)."""
    from torch.distributed.fsdp import FSDPModule

    for m in wrapped.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
