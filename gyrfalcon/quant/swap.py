"""Which modules get quantized, and how: on a built model, while a float checkpoint streams in, or from a
quantized checkpoint.

    quantize_model(model, "nf4")                       # a loaded float model, in place
    load_into(model, model_dir, dtype, device, "nf4")  # a meta-built model: quantize tensor by tensor while loading

The plan (`plan_model`): every `nn.Linear` gets the mode (`int8`, `llm.int8`, `nf4`, `fp4`), except

* the output head (`lm_head`), which is 8-bit in every mode (`QuantConfig.head`), as llama.cpp keeps it: it is
  read in full for every token and 4-bit codes there cost quality out of proportion to the bytes saved;
* the token embedding, only ever gathered, becomes int8 rows (`QuantConfig.embedding`); when it is tied to the
  head (most Falcons) both are one int8 matrix, gathered from by the embedding and multiplied by the head;
* any module matched by `skip` (its name, a dotted suffix of it such as `dense_4h_to_h`, or an fnmatch pattern
  such as `transformer.h.0.*`), which stays in full precision. Skipping one of two tied modules keeps both.

Streaming: `load_weights` calls our hook on each tensor right after reading it; a weight in the plan is quantized
there and then, and only a meta placeholder enters the state dict, so the float copy of a weight lives only
while it is being quantized and peak memory is about the quantized model plus the largest single tensor.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..memory import release_free_heap
from .linear import Int4Linear, Int4Weight, Int8Linear, Int8Weight, QuantEmbedding, QuantWeight

MODES = ("int8", "llm.int8", "nf4", "fp4")
METADATA_KEY = "gyrfalcon.quantization"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    mode: str
    skip: tuple[str, ...] = ()
    head: str = "int8"  # format of the output head (and a tied embedding)
    embedding: str = "int8"  # format of an untied embedding ("none" keeps it)
    double_quant: bool = True
    threshold: float = 6.0  # LLM.int8() outlier threshold (mode "llm.int8")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {', '.join(MODES)}")
        for what, v in (("head", self.head), ("embedding", self.embedding)):
            if v not in (*MODES, "none"):
                raise ValueError(f"{what} format {v!r} is not one of {', '.join(MODES)} or 'none'")


def parse_skip(skip) -> tuple[str, ...]:
    """Accepts None, a comma-separated string, or an iterable of strings (each may hold commas)."""
    if not skip:
        return ()
    items = [skip] if isinstance(skip, str) else list(skip)
    return tuple(s.strip() for item in items for s in str(item).split(",") if s.strip())


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
               or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


@dataclass
class Plan:
    """module name -> format, and the groups of modules that share one weight (tied)."""

    formats: dict[str, str]
    tied: list[list[str]]

    def weight_names(self) -> dict[str, str]:
        """parameter name (`<module>.weight`) -> format."""
        return {f"{m}.weight": f for m, f in self.formats.items()}


def plan_model(model: nn.Module, qc: QuantConfig) -> Plan:
    modules = dict(model.named_modules())
    by_weight: dict[int, list[str]] = {}
    for name, mod in modules.items():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            by_weight.setdefault(id(mod.weight), []).append(name)
    formats: dict[str, str] = {}
    tied: list[list[str]] = []
    for names in by_weight.values():
        kinds = {type(modules[n]) for n in names}
        is_head = any(n.split(".")[-1] == "lm_head" for n in names)
        if any(_skipped(n, qc.skip) for n in names):
            continue
        if is_head or (len(names) > 1 and nn.Embedding in kinds):
            fmt = qc.head
        elif kinds == {nn.Embedding}:
            fmt = qc.embedding
        else:
            fmt = qc.mode
        if fmt == "none":
            continue
        if nn.Embedding in kinds and fmt not in ("int8", "nf4", "fp4"):
            fmt = "int8"  # a gathered matrix has no activations to split: LLM.int8 is a product, not a format
        for n in names:
            formats[n] = fmt
        if len(names) > 1:
            tied.append(list(names))
    return Plan(formats, tied)


def make_weight(w: torch.Tensor, fmt: str, compute_dtype: torch.dtype, qc: QuantConfig | None = None,
                done: Callable[[int, int], None] | None = None) -> QuantWeight:
    """Quantize one float [out, in] matrix to `fmt`. `done(a, b)` (optional) hears when rows a..b were last read."""
    double_quant = qc.double_quant if qc is not None else True
    if fmt == "int8":
        return Int8Weight.from_float(w, compute_dtype, done=done)
    if fmt == "llm.int8":
        return Int8Weight.from_float(w, compute_dtype, threshold=qc.threshold if qc is not None else 6.0, done=done)
    if fmt in ("nf4", "fp4"):
        return Int4Weight.from_float(w, fmt, compute_dtype, double_quant, done=done)
    raise ValueError(f"unknown format {fmt!r}")


def empty_weight(shape: tuple[int, int], fmt: str, compute_dtype: torch.dtype, double_quant: bool = True,
                 threshold: float | None = None) -> QuantWeight:
    """A meta-device shell of the right shapes, to load a quantized checkpoint into."""
    if fmt in ("int8", "llm.int8"):
        return Int8Weight.empty(shape, compute_dtype, threshold=threshold if fmt == "llm.int8" else None)
    return Int4Weight.empty(shape, fmt, compute_dtype, double_quant=double_quant)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


def install(model: nn.Module, plan: Plan, weights: dict[str, QuantWeight]) -> nn.Module:
    """Replace the planned modules by quantized ones using `weights` (module name -> QuantWeight; for a tied group
    one entry under any of its names)."""
    group_of = {n: g for g in plan.tied for n in g}
    for name in plan.formats:
        old = model.get_submodule(name)
        group = group_of.get(name, [name])
        qw = next((weights[n] for n in group if n in weights), None)
        if qw is None:
            raise KeyError(f"no quantized weight for {name}")
        owner = group[0] if name in group_of else name
        # In a tied group the embedding (first registered, the name a checkpoint stores) owns the tensors.
        embeds = [n for n in group if isinstance(model.get_submodule(n), (nn.Embedding, QuantEmbedding))]
        if embeds:
            owner = embeds[0]
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding(qw, old.padding_idx)
        else:
            bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
            cls = Int8Linear if isinstance(qw, Int8Weight) else Int4Linear
            new = cls(qw, bias, tied=name != owner)
        new.train(old.training)
        _set_module(model, name, new)
    return model


def quantize_model(model: nn.Module, mode: str | QuantConfig = "nf4", skip=(),
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize a model whose weights are loaded (in place; returns it)."""
    qc = mode if isinstance(mode, QuantConfig) else QuantConfig(mode, parse_skip(skip))
    plan = plan_model(model, qc)
    weights: dict[str, QuantWeight] = {}
    done: dict[int, QuantWeight] = {}
    for name, fmt in plan.formats.items():
        w = model.get_submodule(name).weight
        if id(w) not in done:
            done[id(w)] = make_weight(w.detach(), fmt, compute_dtype or w.dtype, qc)
        weights[name] = done[id(w)]
    install(model, plan, weights)
    model._gyrfalcon_quant = describe(plan, qc)  # noqa: SLF001 - what `save_quantized` writes
    return model


def describe(plan: Plan, qc: QuantConfig) -> dict:
    return {"format": "gyrfalcon-quant", "version": FORMAT_VERSION, "mode": qc.mode, "blocksize": 64,
            "double_quant": qc.double_quant, "threshold": qc.threshold if qc.mode == "llm.int8" else None,
            "skip": list(qc.skip), "modules": dict(sorted(plan.formats.items())), "tied": plan.tied}


# ---------------------------------------------------------------------------------------------------------------
# Loading


class StreamQuantizer:
    """The `load_weights` hook that quantizes planned weights as they are read."""

    def __init__(self, plan: Plan, qc: QuantConfig, compute_dtype: torch.dtype):
        self.targets = plan.weight_names()
        self.qc = qc
        self.compute_dtype = compute_dtype
        self.weights: dict[str, QuantWeight] = {}

    def target_dtype(self, name: str, default: torch.dtype) -> torch.dtype:
        return default

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Quantize a planned weight; the float `tensor` is consumed (the loader drops it when we return another
        tensor), so the pages of rows already quantized leave the resident set as we go (`_release_rows`)."""
        fmt = self.targets.get(name)
        if fmt is None or tensor.dim() != 2:
            return tensor
        done = None
        if (tensor.device.type == "cpu" and tensor.is_contiguous() and _MADVISE is not None
                and _file_backed(tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes)):
            row = tensor.shape[1] * tensor.element_size()
            base = tensor.data_ptr()
            done = lambda a, b: _release_rows(base + a * row, base + b * row)  # noqa: E731
        self.weights[name[: -len(".weight")]] = make_weight(tensor, fmt, self.compute_dtype, self.qc, done)
        release_free_heap()  # the float temporaries of this tensor: out of the resident set before the next one
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def _file_backed(start: int, end: int) -> bool:
    """True when [start, end) lies inside one mapping of a file (/proc/self/maps): the loader's zero-copy view of a
    checkpoint. Anything else (a converted copy, a tensor that may share its memory with another) is left alone."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= start and end <= hi:
                    return len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/")
    except (OSError, ValueError, IndexError):
        pass
    return False


def _release_rows(start: int, end: int) -> None:
    """Drop the whole pages inside [start, end) (bytes of a tensor we have finished reading) from the resident set.

    Why: the loader hands us a zero-copy view of the privately mapped checkpoint; its pages stay resident once read,
    so without this, quantizing the 65k-row embedding would keep all of its fp32 bytes in memory until the end of
    the tensor (the loader releases a tensor only after the hook returns). MADV_DONTNEED on clean pages of a
    private file mapping just unmaps them (a later read would fetch the file again); on anonymous memory (a
    converted copy) the pages would read back as zeros, so only file-backed views are released (`_file_backed`). Rounded
    inwards, so no byte outside [start, end) is affected.
    """
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = end // page * page
    if hi > lo:
        _MADVISE(lo, hi - lo, mmap.MADV_DONTNEED)


class _KeepScalesFp32:
    """The `load_weights` hook for a quantized checkpoint: scales stay fp32 whatever the compute dtype."""

    _SUFFIXES = (".weight_scale", ".weight_absmax", ".weight_absmax2", ".weight_offset")

    def target_dtype(self, name: str, default: torch.dtype) -> torch.dtype:
        return torch.float32 if default.is_floating_point and name.endswith(self._SUFFIXES) else default

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def checkpoint_quantization(model_dir: str | Path) -> dict | None:
    """The quantization a checkpoint was saved with (from its safetensors metadata), or None for a float one."""
    from ..weights import WeightsError, find_checkpoint, read_safetensors_header

    try:
        ckpt = find_checkpoint(model_dir)
    except WeightsError:
        return None
    if ckpt.format != "safetensors":
        return None
    _, meta = read_safetensors_header(ckpt.files[0])
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ckpt.files[0]}: unreadable '{METADATA_KEY}' metadata: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != "gyrfalcon-quant":
        raise ValueError(f"{ckpt.files[0]}: '{METADATA_KEY}' metadata is not a gyrfalcon quantization record")
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{ckpt.files[0]}: quantization format version {info.get('version')} is newer than this "
                         f"gyrfalcon understands ({FORMAT_VERSION}); upgrade gyrfalcon")
    return info


def shells_from_description(model: nn.Module, info: dict, compute_dtype: torch.dtype) -> Plan:
    """Swap in meta-device quantized modules matching a checkpoint's quantization record."""
    plan = Plan({k: str(v) for k, v in info["modules"].items()}, [list(g) for g in info.get("tied", [])])
    modules = dict(model.named_modules())
    unknown = [n for n in plan.formats if n not in modules]
    if unknown:
        raise ValueError(f"the checkpoint's quantization names modules this model does not have: {unknown[:5]}")
    weights: dict[str, QuantWeight] = {}
    done: set[str] = set()
    for name, fmt in plan.formats.items():
        group = next((g for g in plan.tied if name in g), [name])
        if group[0] in done:
            continue
        done.add(group[0])
        shape = tuple(modules[name].weight.shape)
        weights[name] = empty_weight(shape, fmt, compute_dtype, bool(info.get("double_quant", True)),
                                     info.get("threshold"))
    install(model, plan, weights)
    return plan


def load_into(model: nn.Module, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
              quantize: str | QuantConfig | None = None, skip=()) -> nn.Module:
    """Load a checkpoint into a meta-built model: as is, quantizing while streaming (`quantize`), or a quantized
    checkpoint (recognized from its metadata; `quantize` must then be None or the mode it was saved with)."""
    from ..weights.load import load_weights

    device = torch.device(device)
    info = checkpoint_quantization(model_dir)
    if info is not None:
        mode = quantize.mode if isinstance(quantize, QuantConfig) else quantize
        if mode is not None and mode != info["mode"]:
            raise ValueError(f"{model_dir} is already quantized as {info['mode']}; load it without quantize= (or "
                             f"quantize the float checkpoint to {mode})")
        if parse_skip(skip):
            raise ValueError(f"{model_dir} is already quantized; skip= applies only when quantizing a float model")
        shells_from_description(model, info, dtype)
        load_weights(model, model_dir, dtype, device, hook=_KeepScalesFp32())
        model._gyrfalcon_quant = info  # noqa: SLF001
        return model
    if quantize is None:
        if parse_skip(skip):
            raise ValueError("skip= needs quantize=")
        load_weights(model, model_dir, dtype, device)
        return model
    qc = quantize if isinstance(quantize, QuantConfig) else QuantConfig(quantize, parse_skip(skip))
    plan = plan_model(model, qc)
    hook = StreamQuantizer(plan, qc, dtype)
    load_weights(model, model_dir, dtype, device, hook=hook)
    install(model, plan, hook.weights)
    model._gyrfalcon_quant = describe(plan, qc)  # noqa: SLF001
    return model


# ---------------------------------------------------------------------------------------------------------------
# Saving

def save_quantized(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None,
                   max_shard_bytes: int | None = None) -> Path:
    """Write a quantized model as a checkpoint directory that `gyrfalcon.load` reads with no flag: the weights
    (safetensors, with the quantization record in the metadata) plus the config and tokenizer files of
    `source_dir`. Atomic as a directory: everything is written into a temporary sibling of `out_dir` and only a
    complete result replaces it, so a failed or killed run never leaves a half-written or mixed checkpoint."""
    from ..weights import save_weights
    from ..weights.load import write_checkpoint_dir

    info = getattr(model, "_gyrfalcon_quant", None)
    if info is None:
        raise ValueError("the model is not quantized (use quantize_model or gyrfalcon.load(..., quantize=...))")
    out_dir = Path(out_dir).absolute()
    if source_dir is not None and out_dir.exists() and out_dir.resolve() == Path(source_dir).resolve():
        raise ValueError(f"refusing to overwrite the source checkpoint {source_dir}: choose another output directory")
    return write_checkpoint_dir(
        out_dir, lambda tmp: save_weights(model, tmp, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)},
                                          max_shard_bytes=max_shard_bytes), source_dir)
