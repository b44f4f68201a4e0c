"""One training loop, for pretraining here and for fine-tuning (LoRA, SFT) later.

`train(model, batches, loss_fn, config)` knows nothing about where batches come from or what the loss is:

* `batches` is any iterator of batches (a tensor, or a dict/tuple of tensors). If it has `state_dict` /
  `load_state_dict` (like `data.RandomWindows`), its state goes into checkpoints; otherwise a resumed run
  fast-forwards it by drawing and discarding the batches already used.
* `loss_fn(model, batch) -> (mean loss, number of target tokens)`; `causal_lm_loss` is the next-token one.
* only parameters with `requires_grad` are optimized, so a LoRA wrapper just freezes the base weights.

What one optimizer step is: `grad_accum` micro-batches, each loss scaled by 1/grad_accum and back-propagated,
then the gradient norm is clipped, AdamW steps (weight decay on matrices only), and the schedule sets the next lr.

Determinism: nothing in a step draws from a random generator except the batch stream, whose state is saved, so
a run resumed from a checkpoint reproduces the losses of an uninterrupted run exactly (same device, same thread
count). Checkpoints are written to a temporary file in the same directory, fsynced and renamed over the old one:
a kill at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


# ---------------------------------------------------------------------------------------------------------------
# configuration and schedules


@dataclass
class TrainConfig:
    """How to optimize; the model, data and loss are arguments of `train`."""

    steps: int
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    decay_fraction: float = 0.2  # wsd: the last fraction of steps is the decay phase
    decay_shape: str = "linear"  # wsd: "linear" | "exp" (geometric from lr to min_lr)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    eval_every: int = 0  # 0 = only at the end (when eval batches are given)
    save_every: int = 0  # 0 = only at the end (when a checkpoint dir is given)
    log_every: int = 1
    checkpoint_dir: str | None = None
    log_path: str | None = None
    resume: bool = False
    seed: int = 0  # recorded in checkpoints; the caller seeds model init and the batch stream
    device: str = "cpu"
    # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp16": fp16 autocast with a dynamic loss scale (CUDA);
    # "bf16": bf16 autocast; "fp32": none. Master weights and the optimizer stay fp32 in every mode.
    precision: str = "auto"
    gradient_checkpointing: bool = False
    progress: bool = True
    no_decay_names: tuple[str, ...] = ("A_log", "D")  # Mamba's state matrix and skip are not shrunk to zero
    # Checkpoint only the parameters being trained (LoRA adapters): the frozen base is reloaded from its own files.
    checkpoint_trainable_only: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive number")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule={self.schedule!r} must be 'cosine', 'wsd' or 'constant'")
        if self.decay_shape not in ("linear", "exp"):
            raise ValueError(f"decay_shape={self.decay_shape!r} must be 'linear' or 'exp'")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.decay_shape == "exp" and self.schedule == "wsd" and self.min_lr <= 0:
            raise ValueError("an exponential decay needs min_lr > 0")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and torch.device(self.device).type != "cuda":
            raise ValueError("precision='fp16' (autocast with a loss scale) needs a CUDA device")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


@dataclass
class Schedule:
    """lr multiplier (of the peak lr) at a step; a plain object so LambdaLR can checkpoint it.

    cosine: linear warmup, then cosine from 1 to min_lr/lr at the last step.
    wsd:    linear warmup, constant 1, then over the last `decay_fraction` of the steps a linear or exponential
            decay to min_lr/lr (warmup-stable-decay, as Falcon-Mamba was trained).
    """

    steps: int
    warmup: int
    kind: str
    floor: float  # min_lr / lr
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup  # step 0 already learns (1/warmup), none is wasted at lr 0
        if self.kind == "constant":
            return 1.0
        last = max(self.steps - 1, 1)
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(last - self.warmup, 1))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = max(self.warmup, self.steps - round(self.decay_fraction * self.steps))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(last - decay_start, 1))
        if self.decay_shape == "exp":
            return self.floor**progress
        return 1 - (1 - self.floor) * progress


def make_schedule(cfg: TrainConfig) -> Schedule:
    return Schedule(cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr / cfg.lr, cfg.decay_fraction, cfg.decay_shape)


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: matrices (and conv kernels) decay; vectors (norms, biases) and the
    parameters named in `no_decay_names` do not. Tied weights appear once."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() already yields a tied tensor once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and name.rsplit(".", 1)[-1] not in skip:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------------
# losses and batches


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of a [B, T+1] window batch (inputs are the first T, targets the last T)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    # fp32 for the softmax: under bf16 autocast the logits are bf16, too coarse for a loss near its floor.
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, targets.numel()


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The compute dtype of forward passes (master weights and optimizer stay fp32): "auto" is bf16 autocast on
    CUDA and plain fp32 on CPU, where bf16 matrix products are slow; "fp16" also needs `loss_scaler`."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without a loss scale: a dynamic scaler for fp16 on CUDA; otherwise a disabled one,
    whose scale/unscale_/step/update are plain pass-throughs."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn = causal_lm_loss,
             device: torch.device | str = "cpu", precision: str = "auto") -> float:
    """Token-weighted mean loss over `batches` (model put back in its previous train/eval mode)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with autocast_for(device, precision):
                loss, n = loss_fn(model, to_device(batch, device))
            total += loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (memory for compute).

    Wraps every module of the model's largest `nn.ModuleList` (the block stack of both families); returns how many
    were wrapped. Works for any block whose forward takes tensors and plain objects.
    """
    from torch.utils.checkpoint import checkpoint

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return 0
    blocks = max(lists, key=len)
    for block in blocks:
        inner = block.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
    return len(blocks)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened everywhere
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` so that a crash or kill at any moment leaves the old file or the new one, whole.

    Written under a temporary dot-name in the same directory (same filesystem, so the rename is atomic), flushed
    and fsynced before `os.replace`, then the directory entry is fsynced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `train` (tensors and plain data only: loaded with weights_only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    step: int
    tokens: int
    train_loss: float | None  # the last step's loss (None when a resumed run had no step left)
    eval_loss: float | None
    seconds: float  # wall time spent training, summed over resumed sessions
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eval_perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 700.0))


class _Log:
    """The JSONL loss log. On resume, records past the checkpoint's step (written after it, then lost) are cut."""

    def __init__(self, path: str | None, resume_step: int | None):
        self.path = Path(path) if path else None
        self.records: list[dict[str, Any]] = []
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.path, text)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fast_forward(batches: Iterator[Batch], n: int) -> None:
    for _ in range(n):
        next(batches)


def _progress_bar(cfg: TrainConfig, start: int, main: bool = True):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    # Redirected to a log file, a bar redrawn ten times a second would bloat it: refresh every 30 s instead.
    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=not (cfg.progress and main),
                mininterval=0.1 if interactive else 30.0, file=sys.stderr)


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    loss_fn: LossFn = causal_lm_loss,
    config: TrainConfig | None = None,
    eval_batches: Iterable[Batch] | None = None,
    extra_state: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    sync: GradSync | None = None,
) -> TrainResult:
    """Optimize `model` for `config.steps` optimizer steps; see the module docstring.

    `model` must already be on `config.device` in fp32. `eval_batches` is re-iterated at every eval.
    `extra_state` is stored in each checkpoint (the caller's run description, for checking a resume).
    `on_step(step, record)` is called after every optimizer step (step counts from 1), after any checkpoint of
    that step was written.
    With `config.resume` the loop continues from `checkpoint_dir/checkpoint.pt` when it exists.
    `sync` makes the run data-parallel (see `GradSync`): each process accumulates its own micro-batches, the
    gradients are averaged across processes before clipping, and only the main process writes checkpoints, the log
    and the progress bar.
    """
    if config is None:
        raise TypeError("train() needs config=TrainConfig(steps=...)")
    cfg = config
    cfg.validate()
    device = torch.device(cfg.device)
    batches = iter(batches)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.no_decay_names), lr=cfg.lr,
                                  betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg))
    scaler = loss_scaler(device, cfg.precision)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME if cfg.checkpoint_dir else None
    start, tokens, seconds = 0, 0, 0.0
    resumed = None
    if cfg.resume and ckpt_path is not None and ckpt_path.is_file():
        resumed = load_checkpoint(ckpt_path)
        start, tokens, seconds = resumed["step"], resumed["tokens"], resumed["seconds"]
        _restore(resumed, model, optimizer, scheduler, batches, cfg)
        if resumed.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resumed["scaler"])
    main = sync is None or sync.is_main
    log = _Log(cfg.log_path if main else None, start if resumed is not None else None)

    def checkpoint(step: int) -> None:
        if ckpt_path is None or not main:
            return
        atomic_torch_save({
            "step": step,
            "tokens": tokens,
            "seconds": seconds + (time.perf_counter() - t0),
            "model": _model_state(model, cfg.checkpoint_trainable_only),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "sampler": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "rng": _rng_state(),
            "train_config": _plain(asdict(cfg)),
            "extra": extra_state or {},
        }, ckpt_path)

    model.train()
    t0 = time.perf_counter()
    bar = _progress_bar(cfg, start, main)
    train_loss, eval_loss = None, None
    window: list[float] = []
    window_tokens, window_t = 0, time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            loss_sum, n_tokens = _accumulate(model, batches, loss_fn, cfg.grad_accum, device, cfg.precision,
                                             scaler)
            if sync is not None:
                loss_sum, n_tokens = sync(params, loss_sum, n_tokens)
            scaler.unscale_(optimizer)  # (clipping sees the true gradients; a no-op unless fp16)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item() if cfg.grad_clip > 0
                         else float("nan"))
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += n_tokens
            window_tokens += n_tokens
            train_loss = loss_sum
            window.append(loss_sum)
            done = step + 1

            record = {"step": done, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                record["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
                record["elapsed_s"] = seconds + (now - t0)
                log.write(record)
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                window, window_tokens, window_t = [], 0, now
            if eval_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                eval_loss = evaluate(model, eval_batches, loss_fn, device, cfg.precision)
                log.write({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 700.0))})
                if main:
                    bar.write(f"step {done}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 700.0)):.2f})")
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                checkpoint(done)
            bar.update(1)
            if on_step is not None:
                on_step(done, record)
    finally:
        bar.close()
    seconds += time.perf_counter() - t0
    return TrainResult(cfg.steps, tokens, train_loss, eval_loss, seconds, log.records)


def _accumulate(model: nn.Module, batches: Iterator[Batch], loss_fn: LossFn, grad_accum: int,
                device: torch.device, precision: str = "auto",
                scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """Forward and backward `grad_accum` micro-batches; returns the mean micro-batch loss and the token count."""
    total, n_tokens = 0.0, 0
    for _ in range(grad_accum):
        batch = to_device(next(batches), device)
        with autocast_for(device, precision):
            loss, n = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()}: lower --lr or check the data")
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item()
        n_tokens += n
    return total / grad_accum, n_tokens


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterator[Batch], cfg: TrainConfig) -> None:
    if cfg.checkpoint_trainable_only:
        result = model.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = trainable & set(result.missing_keys)
        if missing or result.unexpected_keys:
            raise ValueError(f"the checkpoint does not match the trainable parameters (missing {sorted(missing)[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
    else:
        model.load_state_dict(state["model"])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # LambdaLR restores the schedule object's fields from the checkpoint; the config of this run is authoritative.
    scheduler.lr_lambdas[0] = make_schedule(cfg)
    _set_rng_state(state["rng"])
    if state.get("sampler") is not None and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(state["sampler"])
    else:
        _fast_forward(batches, state["step"] * cfg.grad_accum)


def _model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if not trainable_only:
        return model.state_dict()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class GradSync:
    """Data-parallel gradient averaging over `torch.distributed` (gloo on CPU, NCCL on GPU), once per step.

    The job DistributedDataParallel does, done after the last micro-batch of a step rather than inside backward:
    the loop's forward may go around the wrapped module (packed batches call the blocks directly), and with
    gradient accumulation only the last micro-batch needs a reduction anyway. All gradients travel as one flat
    buffer (one collective per step). `__call__` also averages the logged loss and sums the token count.
    """

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __call__(self, params: list[torch.Tensor], loss: float, tokens: int) -> tuple[float, int]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss, float(tokens)], dtype=grads[0].dtype,
                                                                          device=grads[0].device)])
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(flat[offset: offset + n].view_as(g))
            offset += n
        return flat[offset].item(), round(flat[offset + 1].item() * self.world)


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the config round-trips through weights_only loading and JSON alike."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
