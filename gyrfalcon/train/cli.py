"""`gyrfalcon train`: a Falcon or Falcon-Mamba from scratch on one text file, into a Hugging Face model dir.

The output directory is what `gyrfalcon.load` and `transformers.AutoModelForCausalLM.from_pretrained` read:
config.json, model.safetensors, the tokenizer files and generation_config.json, plus train_log.jsonl and a
MODEL_CARD.md recording the exact command, the hardware, the wall time and the final losses. Checkpoints (model,
optimizer, schedule, sampler and RNG state) go to `--checkpoint-dir` (default OUT/checkpoints) so `--resume`
continues an interrupted run to the very losses the uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FalconConfig, FalconMambaConfig, ModelConfig
from .data import RandomWindows, eval_windows, iter_text_chunks, split_tokens, tokenize_file
from .loop import PRECISIONS, TrainConfig, TrainResult, atomic_write_text, evaluate, load_checkpoint, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# arguments


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The `gyrfalcon train` flags."""
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="UTF-8 text file to train on")
    io.add_argument("--out", required=True, help="output model directory (Hugging Face layout)")
    io.add_argument("--tokenizer", help="dir with a tokenizer.json to reuse (default: train a byte-level BPE)")
    io.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one (default 4096)")
    io.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens held out (default 0.1)")
    io.add_argument("--checkpoint-dir", help="where checkpoints go (default OUT/checkpoints)")
    io.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="fp32",
                    help="dtype of model.safetensors (training is fp32 either way)")

    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=["falcon", "falcon-mamba"], default="falcon")
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--hidden", type=int, default=256, help="hidden size")
    m.add_argument("--heads", type=int, default=4, help="falcon: query heads")
    m.add_argument("--kv-heads", type=int, default=1,
                   help="falcon: key/value heads; 1 = multi-query (7B layout), = heads: multi-head, "
                        "in between: grouped (40B layout)")
    m.add_argument("--ffn", type=int, help="falcon: MLP width (default 4 x hidden)")
    m.add_argument("--max-position-embeddings", type=int, help="falcon: context recorded in config (default seq-len)")
    m.add_argument("--state-size", type=int, default=16, help="falcon-mamba: SSM state per channel")
    m.add_argument("--expand", type=int, default=2, help="falcon-mamba: mixer width / hidden")
    m.add_argument("--conv-kernel", type=int, default=4, help="falcon-mamba: causal conv width")

    t = p.add_argument_group("optimization")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    t.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine",
                   help="cosine decay, or warmup-stable-decay (wsd)")
    t.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: fraction of steps spent decaying")
    t.add_argument("--decay-shape", choices=["linear", "exp"], default="linear", help="wsd: decay shape")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a dynamic loss scale (CUDA)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice); 1 is much faster on a busy machine")

    r = p.add_argument_group("evaluation, logging, checkpoints")
    r.add_argument("--eval-every", type=int, default=100, help="held-out eval every N steps (0 = at the end)")
    r.add_argument("--eval-batches", type=int, default=0, help="held-out batches per eval (0 = all)")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0 = at the end)")
    r.add_argument("--log-every", type=int, default=1, help="train_log.jsonl record every N steps")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_args(args: argparse.Namespace) -> None:
    """Every flag checked up front, each error naming the flag (the CLI prints it without a traceback)."""
    data = Path(args.data)
    _require(data.is_file(), f"--data {args.data}: no such file")
    _require(data.stat().st_size > 0, f"--data {args.data}: the file is empty")
    positive = ["layers", "hidden", "seq_len", "batch_size", "grad_accum", "steps"]
    if args.arch == "falcon":
        positive += ["heads", "kv_heads"]
    else:
        positive += ["state_size", "expand", "conv_kernel"]
    for dest in positive:
        value = getattr(args, dest)
        _require(value >= 1, f"--{dest.replace('_', '-')} {value}: must be >= 1")
    for dest in ("warmup", "eval_every", "eval_batches", "save_every", "log_every"):
        value = getattr(args, dest)
        _require(value >= 0, f"--{dest.replace('_', '-')} {value}: must be >= 0")
    if args.arch == "falcon":
        _require(args.hidden % args.heads == 0, f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
        _require((args.hidden // args.heads) % 2 == 0,
                 f"--hidden / --heads = {args.hidden // args.heads}: the head size must be even (rotary)")
        _require(args.kv_heads <= args.heads and args.heads % args.kv_heads == 0,
                 f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
        if args.ffn is not None:
            _require(args.ffn >= 1, f"--ffn {args.ffn}: must be >= 1")
        if args.max_position_embeddings is not None:
            _require(args.max_position_embeddings >= args.seq_len,
                     f"--max-position-embeddings {args.max_position_embeddings} is below --seq-len {args.seq_len}")
    _require(math.isfinite(args.lr) and args.lr > 0, f"--lr {args.lr}: must be a positive number")
    if args.min_lr is not None:
        _require(0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr}: must be in [0, --lr {args.lr}]")
    _require(args.warmup < args.steps or args.warmup == 0,
             f"--warmup {args.warmup}: must be below --steps {args.steps}")
    _require(0 < args.decay_fraction <= 1, f"--decay-fraction {args.decay_fraction}: must be in (0, 1]")
    _require(0 <= args.val_fraction < 1, f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    _require(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be >= 0")
    _require(args.grad_clip >= 0, f"--grad-clip {args.grad_clip}: must be >= 0")
    if args.threads is not None:
        _require(args.threads >= 1, f"--threads {args.threads}: must be >= 1")
    if args.tokenizer is not None:
        _require((Path(args.tokenizer) / "tokenizer.json").is_file(),
                 f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    else:
        _require(args.vocab_size >= 260, f"--vocab-size {args.vocab_size}: must be >= 260 (256 bytes + specials)")
    out = Path(args.out)
    _require(not out.exists() or out.is_dir(), f"--out {args.out}: exists and is not a directory")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device}: {e}") from None
        _require(device.type != "cuda" or torch.cuda.is_available(), f"--device {args.device}: CUDA is not available")


# ---------------------------------------------------------------------------------------------------------------
# model


def build_config(args: argparse.Namespace, vocab_size: int, eos_id: int | None) -> ModelConfig:
    """The model config the flags describe."""
    if args.arch == "falcon-mamba":
        return FalconMambaConfig(
            vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers, state_size=args.state_size,
            intermediate_size=args.expand * args.hidden, conv_kernel=args.conv_kernel,
            time_step_rank=math.ceil(args.hidden / 16), use_bias=False, use_conv_bias=True,
            layer_norm_epsilon=1e-5, mixer_rms_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    # kv_heads 1: Falcon-7B's multi-query layout; == heads: multi-head; otherwise the 40B grouped layout.
    grouped = 1 < args.kv_heads < args.heads
    return FalconConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn or 4 * args.hidden, layer_norm_epsilon=1e-5,
        new_decoder_architecture=grouped, parallel_attn=True, num_ln=2 if grouped else 1, bias=False, alibi=False,
        rope_theta=10000.0, max_position_embeddings=args.max_position_embeddings or args.seq_len,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
    )


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, std: float = 0.02) -> None:
    """From-scratch initialization (the models themselves only build shapes).

    Falcon: GPT-style normal(0, 0.02), with the two projections that write into the residual stream scaled by
    1/sqrt(2 * layers) so its variance does not grow with depth. Falcon-Mamba: the Mamba-1 recipe (S4D-real A,
    D = 1, dt bias giving dt log-uniform in [1e-3, 0.1], out_proj scaled by 1/sqrt(layers)).
    """
    from ..models.falcon_mamba import FalconMambaMixer

    depth_scale = 1 / math.sqrt(2 * config.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.Linear) and isinstance(config, FalconConfig) and name != "lm_head":
            scale = depth_scale if name.endswith(("self_attention.dense", "dense_4h_to_h")) else 1.0
            module.weight.normal_(0.0, std * scale)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, FalconMambaMixer):
            _init_mamba_mixer(module, config)
    if not config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight.normal_(0.0, std)


def _init_mamba_mixer(mixer: nn.Module, config: FalconMambaConfig, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    n, e = config.state_size, config.intermediate_size
    mixer.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
    mixer.D.fill_(1.0)
    nn.init.uniform_(mixer.dt_proj.weight, -config.time_step_rank**-0.5, config.time_step_rank**-0.5)
    dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()
    for lin in (mixer.in_proj, mixer.out_proj):
        if lin.bias is not None:
            lin.bias.zero_()
    mixer.out_proj.weight.div_(math.sqrt(config.num_layers))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and data


def prepare_tokenizer(args: argparse.Namespace, out: Path):
    """The tokenizer to train with, its files written into `out`: reused (--tokenizer), the one a previous session
    of this run trained (--resume), or a new byte-level BPE trained on --data."""
    from ..tokenizer import Tokenizer, train_bpe_tokenizer

    if args.tokenizer is not None:
        src = Path(args.tokenizer)
        if src.resolve() != out.resolve():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
        return Tokenizer.from_dir(out)
    if args.resume and (out / "tokenizer.json").is_file():
        return Tokenizer.from_dir(out)
    return train_bpe_tokenizer(iter_text_chunks(args.data), args.vocab_size, out)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# resume checks

# The flags that define a run: a resume with any of them changed could not reproduce the uninterrupted run.
_RUN_FLAGS = ("arch", "layers", "hidden", "heads", "kv_heads", "ffn", "state_size", "expand", "conv_kernel",
              "seq_len", "batch_size", "grad_accum", "steps", "lr", "min_lr", "warmup", "schedule", "decay_fraction",
              "decay_shape", "weight_decay", "grad_clip", "seed", "val_fraction")


def run_fingerprint(args: argparse.Namespace, data_sha: str, vocab_size: int) -> dict[str, Any]:
    fp = {dest: getattr(args, dest) for dest in _RUN_FLAGS}
    fp["data_sha256"] = data_sha
    fp["vocab_size"] = vocab_size
    return fp


def check_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            flag = {"data_sha256": "--data", "vocab_size": "--tokenizer/--vocab-size"}.get(
                key, "--" + key.replace("_", "-"))
            raise ValueError(f"{flag}: this run has {value!r} but the checkpoint was made with {saved[key]!r}; "
                             f"--resume needs the same settings (or drop --resume to start over)")


# ---------------------------------------------------------------------------------------------------------------
# output


def command_line(args: argparse.Namespace) -> str:
    """The command as typed when run from the CLI; otherwise an equivalent one rebuilt from the arguments."""
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "train":
        return "gyrfalcon " + shlex.join(argv[1:])
    parts = ["gyrfalcon", "train"]
    for key, value in sorted(vars(args).items()):
        if key in ("command",) or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    text = f"CPU: {cpu} ({os.cpu_count()} cores), {threads} torch thread{'s' if threads != 1 else ''}"
    if hasattr(os, "getloadavg"):  # wall times on a shared machine mean little without the load beside them
        text += f", load average {os.getloadavg()[1]:.1f} over the last 5 minutes of the run"
    return text


def save_model_dir(model: nn.Module, config: ModelConfig, out: Path, save_dtype: str, eos_id: int | None) -> None:
    """config.json, model.safetensors and generation_config.json (the tokenizer files are already there)."""
    from ..weights.load import save_weights

    dtype = SAVE_DTYPES[save_dtype]
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)  # deepcopy keeps the tie
    save_weights(to_save, out, metadata={"producer": "gyrfalcon train"})
    hf = config.to_hf()
    hf["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[save_dtype]
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": True,
           "temperature": 0.8}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")


def final_train_loss(history: list[dict[str, Any]], steps: int) -> tuple[float | None, int]:
    """Mean training loss over the last 10% of steps (at least 1, at most 100) and how many steps that is."""
    losses = [r["loss"] for r in history if "loss" in r]
    n = max(1, min(100, steps // 10))
    tail = losses[-n:]
    return (sum(tail) / len(tail), len(tail)) if tail else (None, 0)


def _schedule_text(a: argparse.Namespace) -> str:
    if a.schedule == "wsd":
        return (f"warmup-stable-decay schedule (constant, then a {a.decay_shape} decay over the last "
                f"{a.decay_fraction:.0%} of the steps)")
    return f"{a.schedule} schedule"


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    a = info["args"]
    cfg: ModelConfig = info["config"]
    if isinstance(cfg, FalconConfig):
        arch = (f"Falcon, {cfg.layout}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
                f"(head dim {cfg.head_dim}), {cfg.num_kv_heads} KV head(s), MLP {cfg.ffn_hidden_size}, rotary, "
                f"context {cfg.max_position_embeddings}")
        name = "Falcon"
    else:
        arch = (f"Falcon-Mamba: {cfg.num_layers} layers, hidden {cfg.hidden_size}, mixer width "
                f"{cfg.intermediate_size}, state {cfg.state_size}, conv {cfg.conv_kernel}, "
                f"dt rank {cfg.time_step_rank}")
        name = "Falcon-Mamba"
    train_loss, n_tail = info["train_loss"], info["train_loss_steps"]
    lines = [
        f"# {out.name}",
        "",
        f"A tiny {name} language model trained from scratch with `gyrfalcon train` on `{Path(a.data).name}`. "
        "It is a demonstration and test model: it writes text shaped like its training data, nothing more.",
        "",
        "## Model",
        "",
        f"- Architecture: {arch}",
        f"- Parameters: {info['params']:,} (input embedding tied to the output head)",
        f"- Tokenizer: byte-level BPE, {cfg.vocab_size} tokens, eos `<|endoftext|>`",
        f"- Weights: `model.safetensors` in {a.save_dtype} (trained in fp32)",
        "",
        "## Data",
        "",
        f"- File: `{a.data}` ({info['data_bytes']:,} bytes, sha256 `{info['data_sha']}`)",
        f"- Tokens: {info['n_train']:,} for training, {info['n_val']:,} held out (the last "
        f"{a.val_fraction:.0%} of the file)",
        "",
        "## Training",
        "",
        "```",
        *info["commands"],
        "```",
        "",
        f"- Steps: {info['steps']:,} of {a.batch_size} x {a.grad_accum} sequences of {a.seq_len} tokens; "
        f"tokens seen: {info['tokens']:,} ({info['tokens'] / max(info['n_train'], 1):.1f} passes over the training "
        "tokens)",
        f"- Optimizer: AdamW (betas 0.9, 0.95, weight decay {a.weight_decay} on matrices), peak lr {a.lr}, "
        f"{_schedule_text(a)} to {info['min_lr']} after {a.warmup} warmup steps, gradient clip {a.grad_clip}",
        f"- Seed: {a.seed}",
        f"- Wall time: {info['seconds'] / 60:.1f} min ({info['seconds']:.0f} s)",
        f"- Hardware: {info['hardware']}; torch {torch.__version__}, Python {platform.python_version()}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| final train loss (mean of the last {n_tail} steps) | "
        f"{'n/a' if train_loss is None else f'{train_loss:.4f}'} |",
        f"| held-out loss | {info['eval_loss']:.4f} |",
        f"| held-out perplexity (per token) | {math.exp(min(info['eval_loss'], 700.0)):.2f} |",
        "",
        "The per-step losses and every held-out evaluation are in `train_log.jsonl`.",
        "",
        "## Use",
        "",
        "```",
        f'gyrfalcon generate --model {out} "ROMEO:"',
        "```",
        "",
        "or `transformers.AutoModelForCausalLM.from_pretrained` on this directory.",
        "",
        "## License",
        "",
        "The training text is public domain; the weights are released under the package's license (Apache-2.0).",
        "",
    ]
    atomic_write_text(out / "MODEL_CARD.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# the command


def run_train(args: argparse.Namespace) -> int:
    """Train per `args` (from `add_train_arguments`); returns 0. Bad arguments raise ValueError naming the flag."""
    validate_args(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        # OpenMP workers spin at every barrier: with more threads than free cores each small op waits for a
        # descheduled thread, so on a shared machine one thread can be several times faster than two.
        torch.set_num_threads(args.threads)
    try:
        return _run_train(args)
    finally:
        torch.set_num_threads(threads)


def _run_train(args: argparse.Namespace) -> int:
    from ..models import build_model

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10

    saved = load_checkpoint(ckpt_dir) if args.resume and (ckpt_dir / "checkpoint.pt").is_file() else None
    if args.resume:
        print(f"resuming from step {saved['step']} of {ckpt_dir}" if saved else
              f"--resume: no checkpoint in {ckpt_dir}, starting from step 0", file=sys.stderr)
    tokenizer = prepare_tokenizer(args, out)
    eos_id = tokenizer.eos_token_id
    data_sha = file_sha256(args.data)
    fingerprint = run_fingerprint(args, data_sha, tokenizer.vocab_size)
    if saved is not None:
        check_resume(saved["extra"].get("run", {}), fingerprint)
    commands = [*(saved["extra"].get("commands", []) if saved else []), command_line(args)]

    tokens = tokenize_file(args.data, tokenizer.encode)
    train_tokens, val_tokens = split_tokens(tokens, args.val_fraction)
    _require(len(train_tokens) > args.seq_len,
             f"--seq-len {args.seq_len}: the training split has only {len(train_tokens)} tokens")
    batches = RandomWindows(train_tokens, args.seq_len, args.batch_size, seed=args.seed)
    eval_sets = eval_windows(val_tokens, args.seq_len, args.batch_size, args.eval_batches or None) or None

    config = build_config(args, tokenizer.vocab_size, eos_id)
    torch.manual_seed(args.seed)
    model = build_model(config, device="cpu")
    init_weights(model, config)
    model.to(device)

    cfg = TrainConfig(
        steps=args.steps, lr=args.lr, min_lr=min_lr, warmup=args.warmup, schedule=args.schedule,
        decay_fraction=args.decay_fraction, decay_shape=args.decay_shape, weight_decay=args.weight_decay,
        grad_accum=args.grad_accum, grad_clip=args.grad_clip, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, checkpoint_dir=str(ckpt_dir),
        log_path=str(out / "train_log.jsonl"), resume=args.resume, seed=args.seed, device=str(device),
        gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress,
        precision=args.precision,
    )
    result: TrainResult = train(model, batches, config=cfg, eval_batches=eval_sets,
                                extra_state={"run": fingerprint, "commands": commands})

    eval_loss = result.eval_loss
    if eval_sets is not None and (eval_loss is None or args.eval_batches):  # the card reports the whole split
        eval_loss = evaluate(model, eval_windows(val_tokens, args.seq_len, args.batch_size), device=device,
                             precision=args.precision)
    save_model_dir(model, config, out, args.save_dtype, eos_id)
    train_loss, n_tail = final_train_loss(result.history, args.steps)
    write_model_card(out, {
        "args": args, "config": config, "params": count_parameters(model), "commands": commands,
        "data_bytes": Path(args.data).stat().st_size, "data_sha": data_sha,
        "n_train": len(train_tokens), "n_val": len(val_tokens), "steps": result.step, "tokens": result.tokens,
        "min_lr": min_lr, "seconds": result.seconds, "hardware": hardware(),
        "train_loss": train_loss, "train_loss_steps": n_tail, "eval_loss": eval_loss if eval_loss is not None
        else float("nan"),
    })
    ppl = math.exp(min(eval_loss, 700.0)) if eval_loss is not None else float("nan")
    print(f"trained {result.step} steps ({result.tokens:,} tokens) in {time.perf_counter() - started:.0f} s: "
          f"train loss {train_loss if train_loss is not None else float('nan'):.4f}, held-out loss "
          f"{eval_loss if eval_loss is not None else float('nan'):.4f} (ppl {ppl:.2f}) -> {out}", file=sys.stderr)
    return 0
