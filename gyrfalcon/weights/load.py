"""Stream a checkpoint into a model built on the meta device, and save one back.

Loading is a strict `load_state_dict(assign=True)`: module names are the checkpoint's names, so there is no
renaming table, and every mismatch (missing, unexpected, wrong shape, wrong kind of dtype, missing shard, corrupt
file) is collected up front and reported in one `WeightsError` that names the files and keys.

Memory is the point of this module. A model on the meta device owns no storage, so the only memory a load needs
is the weights themselves. We keep it that way:

* safetensors files are memory-mapped privately (copy-on-write, `mmap.ACCESS_COPY`) and read tensor by tensor;
* when the file already holds the target dtype and the target is the CPU, a parameter *is* a view of the mapping
  (`torch.frombuffer`): no copy exists at all, the weights are the page cache, pages are read on first use, and
  under memory pressure the kernel can drop them and re-read the file instead of swapping;
* when a cast is needed (a bf16 file loaded as fp32, say) or the target is a GPU, each tensor is converted in
  bounded chunks into a fresh tensor, and the source pages just read are returned to the kernel with
  `madvise(MADV_DONTNEED)`, so the file does not stay resident beside its converted copy. Peak memory is the
  converted weights plus one chunk.

Legacy `pytorch_model*.bin` checkpoints are read with `torch.load(weights_only=True, mmap=True)`: never a full
unpickler, because a checkpoint is data from the internet and must not run code.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .hub import WeightsError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype names (the format's public spec) -> torch dtypes. Newer torch dtypes are looked up by name so an
# older torch simply does not know them (and such a file is reported as unsupported).
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}

# A safetensors header is a small JSON object; anything near this size is a corrupt length field, and refusing it
# avoids reading (and parsing) gigabytes of tensor data as JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Cast/copy granularity. Bounded so that the source pages resident at any moment (one chunk, then dropped) are a
# small constant next to the converted weights, whatever the largest tensor (the 65k x 8k embedding of 40B).
_CHUNK_BYTES = 16 * 1024 * 1024

# Derived buffers that some old checkpoints saved and that we recompute: ignored when the model has no such key.
_IGNORED_SUFFIXES = (".inv_freq",)

_LIST_LIMIT = 10


def _names(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    """'a, b, c' for up to `limit` items, then '... (N more)', so an error stays readable for a 60-layer model."""
    items = list(items)
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items) - limit} more)"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint files


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of one checkpoint: their format, the files in load order, and the index if sharded."""

    format: str  # "safetensors" or "bin"
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, str] | None = None


def _read_index(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read the shard index: {exc}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{path}: the shard index has no 'weight_map' object")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    # A shard name comes from a downloaded file: it must name a file in this directory, never a path elsewhere.
    bad += [v for v in set(weight_map.values()) if isinstance(v, str) and (Path(v).name != v or v in ("", ".", ".."))]
    if bad:
        raise WeightsError(f"{path}: invalid shard file names in 'weight_map': {_names(map(str, bad))}")
    return weight_map


def find_checkpoint(model_dir: str | Path) -> CheckpointFiles:
    """Locate the weights in `model_dir`, preferring safetensors over pickled `.bin` files (like transformers)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir} is not a directory")
    for fmt, single, index in (("safetensors", SAFE_SINGLE, SAFE_INDEX), ("bin", BIN_SINGLE, BIN_INDEX)):
        if (model_dir / single).is_file():
            return CheckpointFiles(fmt, (model_dir / single,))
        index_path = model_dir / index
        if index_path.is_file():
            weight_map = _read_index(index_path)
            shards = list(dict.fromkeys(weight_map.values()))  # first-seen order, de-duplicated
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise WeightsError(
                    f"{index_path} names {len(missing)} shard file(s) that are not in {model_dir}: {_names(missing)} "
                    "(an interrupted download? fetch the checkpoint again)"
                )
            return CheckpointFiles(fmt, tuple(model_dir / s for s in sorted(shards)), index_path, weight_map)
    present = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    raise WeightsError(
        f"no weights in {model_dir}: expected {SAFE_SINGLE}, {SAFE_INDEX} with shards, {BIN_SINGLE} or {BIN_INDEX}"
        + (f" (found {_names(present)})" if present else "")
    )


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, its dtype and shape, and its byte range in the file (absolute)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading any tensor data.

    The format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (plus an
    optional "__metadata__" string map), then the data; offsets are relative to the start of the data. A truncated
    file (a killed download) shows up here as tensors that end past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise WeightsError(
                    f"{path}: header length {n} does not fit a {size}-byte file (truncated, or not safetensors)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: corrupt safetensors header ('__metadata__' is not an object)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    bad: list[str] = []
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(s, int) and s >= 0 for s in shape) or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            bad.append(name)
            continue
        info = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
        if info.numel * dtype.itemsize != info.nbytes:
            bad.append(name)
            continue
        infos[name] = info
    if bad:
        raise WeightsError(f"{path}: corrupt or unsupported entries in the safetensors header: {_names(bad)}")

    ordered = sorted(infos.values(), key=lambda i: i.start)
    overlapping = [b.name for a, b in zip(ordered, ordered[1:], strict=False) if b.start < a.start + a.nbytes]
    if overlapping:
        raise WeightsError(f"{path}: tensors overlap in the file (corrupt header): {_names(overlapping)}")
    past_end = [i.name for i in ordered if i.start + i.nbytes > size]
    if past_end:
        need = max(i.start + i.nbytes for i in ordered)
        raise WeightsError(
            f"{path}: file is truncated ({size} bytes, the header needs {need}); tensors cut off: {_names(past_end)}"
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _validate_with_safetensors(path: Path) -> None:
    """Second opinion from the reference implementation, on the header only (it maps the file, reads no data)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency; the own parser already validated
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: report them as ours
        raise WeightsError(f"{path}: rejected by the safetensors library: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors


def _page_range(start: int, end: int) -> tuple[int, int]:
    """The whole pages inside [start, end): rounded inwards, so releasing them never touches another tensor's bytes."""
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = end // page * page
    return lo, hi


def _release(mm: mmap.mmap, start: int, end: int) -> None:
    """Drop the mapping's pages for [start, end) from our resident set once their bytes have been copied out.

    Safe because the mapping is private and never written: the dropped pages are clean copies of the file, and a
    later access (there is none: nothing views these bytes) would simply read the file again.
    """
    lo, hi = _page_range(start, end)
    if hi > lo and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _convert_chunked(src: torch.Tensor, dtype: torch.dtype, device: torch.device,
                     done: Callable[[int, int], None] | None) -> torch.Tensor:
    """Copy-convert a flat tensor into a fresh one on `device`, chunk by chunk, calling `done(a, b)` after each
    element range so the caller can release the source pages."""
    out = torch.empty(src.numel(), dtype=dtype, device=device)
    step = max(1, _CHUNK_BYTES // max(src.element_size(), 1))
    for a in range(0, src.numel(), step):
        b = min(src.numel(), a + step)
        # Synchronous copy (non_blocking=False), also host->GPU: the source is not read after this returns.
        out[a:b].copy_(src[a:b])
        if done is not None:
            done(a, b)
    return out


def _tensor_from_mapping(mm: mmap.mmap, info: TensorInfo, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype, device=device)
    itemsize = info.dtype.itemsize
    aligned = info.start % itemsize == 0
    if info.dtype == dtype and device.type == "cpu" and aligned:
        # Zero copy: the parameter is a view of the private mapping. Copy-on-write means an in-place update (training)
        # gets private pages and never writes back to the file; save_weights replaces files by rename, so the
        # mapped inode stays intact even if the checkpoint is overwritten while this model lives.
        return torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start).view(info.shape)
    if aligned:
        src = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start)
    else:
        # Writers align tensors to their item size; a file that does not gets one aligned bounce copy of this tensor.
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        src = raw.clone().view(info.dtype)
        _release(mm, info.start, info.start + info.nbytes)
        return _convert_chunked(src, dtype, device, None).view(info.shape)

    def done(a: int, b: int) -> None:
        _release(mm, info.start + a * itemsize, info.start + b * itemsize)

    return _convert_chunked(src, dtype, device, done).view(info.shape)


def _open_mapping(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        # ACCESS_COPY is MAP_PRIVATE: writable views for torch (which warns on read-only buffers), and writes stay in
        # this process. The mapping outlives the file object; tensors viewing it keep it alive.
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled torch checkpoint, read with the restricted (weights-only) unpickler and memory-mapped."""
    try:
        # mmap needs the zip format (torch >= 1.6 writes it); a pre-zip legacy file is read without it.
        mmap_ok = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError...: one clear error
        raise WeightsError(
            f"{path}: cannot read as a weights-only torch checkpoint ({type(exc).__name__}: {exc}); a truncated "
            "download, or a file that needs a full unpickler, which gyrfalcon never uses"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_names(bad)}")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Matching checkpoint and model


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one tensor (tied weights), in registration order: the first is the canonical name."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _check(
    expected: dict[str, torch.Tensor],
    found: dict[str, tuple[str, torch.Size | tuple[int, ...], torch.dtype]],
    aliases: list[list[str]],
    where: str,
) -> tuple[dict[str, str], list[str]]:
    """Compare the checkpoint's (file, shape, dtype) per key with the model's state dict.

    Returns (alias -> canonical source key for tied names not loaded from the file, checkpoint keys to skip), or
    raises one WeightsError listing every problem.
    """
    fill: dict[str, str] = {}
    skip: list[str] = []
    missing: list[str] = []
    for group in aliases:
        present = [n for n in group if n in found]
        if not present:
            missing.append(" / ".join(group))
            continue
        # Tied: one copy is enough (transformers saves only the first); any other copy in the file is ignored.
        for name in group:
            if name != present[0]:
                fill[name] = present[0]
                if name in found:
                    skip.append(name)
    aliased = {n for g in aliases for n in g}
    missing += [k for k in expected if k not in aliased and k not in found]
    unexpected = [k for k in found if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    skip += [k for k in found if k not in expected and k.endswith(_IGNORED_SUFFIXES)]

    wrong_shape = []
    wrong_kind = []
    for key, (file, shape, dtype) in found.items():
        if key not in expected or key in skip:
            continue
        want = expected[key]
        if tuple(shape) != tuple(want.shape):
            wrong_shape.append(f"{key} in {file}: checkpoint {list(shape)} vs model {list(want.shape)}")
        if want.is_floating_point() and not dtype.is_floating_point:
            wrong_kind.append(f"{key} in {file}: {dtype} where the model has a floating-point {want.dtype}")

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_names(missing)}")
    if unexpected:
        by_file = sorted({found[k][0] for k in unexpected})
        problems.append(f"unexpected keys ({len(unexpected)}) in {_names(by_file, 3)}: {_names(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): " + "; ".join(wrong_shape[:_LIST_LIMIT])
                        + (f"; ... ({len(wrong_shape) - _LIST_LIMIT} more)" if len(wrong_shape) > _LIST_LIMIT else ""))
    if wrong_kind:
        problems.append(f"non-floating dtypes ({len(wrong_kind)}): " + "; ".join(wrong_kind[:_LIST_LIMIT]))
    if problems:
        raise WeightsError(f"checkpoint {where} does not match the model:\n  " + "\n  ".join(problems))
    return fill, skip


def _target_dtype(want: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors take the requested dtype; anything else (integer buffers) keeps the model's own dtype."""
    return dtype if want.is_floating_point() else want.dtype


class LoadHook(Protocol):
    """Sees every tensor as it is read (used by gyrfalcon.quant to quantize while streaming).

    `target_dtype(name, default)` may change the dtype a tensor is read as; `convert(name, tensor)` returns what goes
    into the state dict in its place (e.g. a meta placeholder, after keeping a quantized copy). When it returns a
    different tensor, the source pages of the memory-mapped file are released right away.
    """

    def target_dtype(self, name: str, default: torch.dtype) -> torch.dtype: ...

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


def load_weights(model: nn.Module, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
                 hook: LoadHook | None = None) -> None:
    """Load the checkpoint in `model_dir` into `model` (built on the meta device), as `dtype` on `device`.

    Strict: every key of `model.state_dict()` must be in the checkpoint with the same shape and nothing else may be
    (tied copies such as `lm_head.weight` may be present or not). Raises WeightsError naming the files and keys.
    `hook` (optional) sees each tensor as it is read; see `LoadHook`.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    ckpt = find_checkpoint(model_dir)
    expected = model.state_dict(keep_vars=True)
    aliases = _alias_groups(model)

    if ckpt.format == "safetensors":
        state = _load_safetensors(ckpt, expected, aliases, dtype, device, hook)
    else:
        state = _load_bins(ckpt, expected, aliases, dtype, device, hook)

    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # pragma: no cover - _check has already compared keys and shapes
        raise WeightsError(f"checkpoint {model_dir}: {exc}") from None
    del state
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    else:
        _retie(model, aliases)


def _retie(model: nn.Module, aliases: list[list[str]]) -> None:
    """`assign=True` gives each name its own Parameter object; make tied names share the canonical one again."""
    for group in aliases:
        canonical = model.get_parameter(group[0]) if _is_param(model, group[0]) else model.get_buffer(group[0])
        for name in group[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, canonical)


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in (model.get_submodule(owner) if owner else model)._parameters


def _load_safetensors(ckpt: CheckpointFiles, expected: dict[str, torch.Tensor], aliases: list[list[str]],
                      dtype: torch.dtype, device: torch.device, hook: LoadHook | None = None
                      ) -> dict[str, torch.Tensor]:
    # Pass 1, headers only: validate every file and key before any tensor is read, so a bad checkpoint fails fast
    # and with the full list of problems rather than after minutes of loading.
    infos: dict[str, TensorInfo] = {}
    per_file: dict[Path, list[TensorInfo]] = {}
    duplicated: list[str] = []
    for path in ckpt.files:
        header, _ = read_safetensors_header(path)
        _validate_with_safetensors(path)
        for name, info in header.items():
            if name in infos:
                duplicated.append(f"{name} ({infos[name].file.name} and {path.name})")
            infos[name] = info
        per_file[path] = sorted(header.values(), key=lambda i: i.start)  # file order: sequential reads
    if duplicated:
        raise WeightsError(f"{ckpt.files[0].parent}: keys stored in more than one shard: {_names(duplicated)}")
    if ckpt.weight_map is not None:
        astray = [f"{k} (index says {v})" for k, v in ckpt.weight_map.items()
                  if k not in infos or infos[k].file.name != v]
        if astray:
            raise WeightsError(f"{ckpt.index}: keys not in the shard the index names: {_names(astray)}")

    where = str(ckpt.index or ckpt.files[0])
    found = {k: (i.file.name, i.shape, i.dtype) for k, i in infos.items()}
    fill, skip = _check(expected, found, aliases, where)

    # Pass 2: materialize, one file and one tensor at a time.
    state: dict[str, torch.Tensor] = {}
    skip_set = set(skip)
    for path, entries in per_file.items():
        try:
            mm = _open_mapping(path)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: cannot map: {exc}") from None
        for info in entries:
            if info.name in skip_set:
                continue
            want = expected[info.name]
            target = _target_dtype(want, dtype)
            if hook is None:
                state[info.name] = _tensor_from_mapping(mm, info, target, device)
                continue
            tensor = _tensor_from_mapping(mm, info, hook.target_dtype(info.name, target), device)
            out = hook.convert(info.name, tensor)
            if out is not tensor:
                del tensor
                _release(mm, info.start, info.start + info.nbytes)
            state[info.name] = out
        # Our reference to the mapping goes; zero-copy tensors keep it alive, otherwise it is unmapped here.
        del mm
    for alias, source in fill.items():
        state[alias] = state[source]
    return state


def _load_bins(ckpt: CheckpointFiles, expected: dict[str, torch.Tensor], aliases: list[list[str]],
               dtype: torch.dtype, device: torch.device, hook: LoadHook | None = None) -> dict[str, torch.Tensor]:
    # torch.load with mmap maps the file privately and reads no data, so holding every shard open to compare keys
    # costs address space, not memory.
    shards = {path: _load_bin(path) for path in ckpt.files}
    found: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    duplicated = []
    for path, sd in shards.items():
        for k, v in sd.items():
            if k in found:
                duplicated.append(f"{k} ({found[k][0]} and {path.name})")
            found[k] = (path.name, tuple(v.shape), v.dtype)
    if duplicated:
        raise WeightsError(f"{ckpt.files[0].parent}: keys stored in more than one shard: {_names(duplicated)}")
    fill, skip = _check(expected, found, aliases, str(ckpt.index or ckpt.files[0]))

    state: dict[str, torch.Tensor] = {}
    skip_set = set(skip)
    for path in list(shards):
        sd = shards.pop(path)
        for k in list(sd):
            t = sd.pop(k)
            if k in skip_set:
                continue
            target = _target_dtype(expected[k], dtype)
            if hook is not None:
                target = hook.target_dtype(k, target)
            if t.dtype == target and device.type == "cpu":
                # Zero copy out of torch's private mapping. A view into a larger shared storage is copied so the
                # parameter does not pin unrelated bytes.
                state[k] = t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
            else:
                # No page release here (torch owns the mapping); it is unmapped when this shard's dict goes, so the
                # peak is the converted weights plus one shard.
                state[k] = t.to(device=device, dtype=target)
            if hook is not None:
                state[k] = hook.convert(k, state[k])
        del sd
    for alias, source in fill.items():
        state[alias] = state[source]
    return state


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _state_for_saving(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, one per stored name: tied duplicates dropped, other shared storage un-shared."""
    if isinstance(model_or_state, nn.Module):
        state = dict(model_or_state.state_dict())
        drop = {n for g in _alias_groups(model_or_state) for n in g[1:]}
    else:
        state = dict(model_or_state)
        drop = set()
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"save_weights: entries that are not tensors: {_names(bad)}")
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise WeightsError(f"save_weights: tensors on the meta device have no data: {_names(meta)}")

    # Exact aliases (same storage, offset, shape and strides) are tied weights: keep the first name, as transformers
    # does for `lm_head.weight`. Partial overlaps (views of one storage) get copies: safetensors stores no sharing.
    seen: dict[tuple, str] = {}
    by_storage: dict[tuple, list[str]] = {}
    for k, v in state.items():
        if k in drop or v.numel() == 0:
            continue
        ident = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if ident in seen:
            drop.add(k)
            continue
        seen[ident] = k
        by_storage.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(k)
    out: dict[str, torch.Tensor] = {}
    shared = {k for names in by_storage.values() if len(names) > 1 for k in names[1:]}
    for k, v in state.items():
        if k in drop:
            continue
        v = v.detach().to("cpu")
        out[k] = v.clone(memory_format=torch.contiguous_format) if k in shared else v.contiguous()
    return out


def _tmp_name(path: Path) -> Path:
    # Same directory, so os.replace is an atomic rename on one filesystem; a dot-name loaders never look at.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow it (a lone tensor may exceed)."""
    if not max_shard_bytes:
        return [list(state)]
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def save_weights(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    out_dir: str | Path,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`
    (transformers' names and index format) when `max_shard_bytes` splits the weights.

    Atomic per file: each file is written under a temporary name in `out_dir`, flushed, and renamed over the old one,
    so a killed or failed save leaves the previous checkpoint files intact. With shards, every shard is written
    before any is renamed, and the index is renamed last.
    """
    from safetensors import torch as st_torch  # looked up at call time: tests replace save_file to simulate failures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WeightsError(f"save_weights: metadata must map str to str, got {k!r}: {v!r}")
        meta[k] = v
    state = _state_for_saving(model_or_state)
    shards = _plan_shards(state, max_shard_bytes)

    n = len(shards)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for name, keys in zip(names, shards, strict=True):
            final = out_dir / name
            tmp = _tmp_name(final)
            pending.append((tmp, final))
            st_torch.save_file({k: state[k] for k in keys}, str(tmp), metadata=meta)
            _fsync_file(tmp)
        if n > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(v.numel() for v in state.values()),
                    "total_size": sum(v.numel() * v.element_size() for v in state.values()),
                },
                "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in sorted(keys)},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            final = out_dir / SAFE_INDEX
            tmp = _tmp_name(final)
            pending.append((tmp, final))
            tmp.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            _fsync_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in pending:
            os.chmod(tmp, 0o666 & ~umask)  # the temp file is private (0600); the result gets ordinary permissions
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out_dir)

    # Leftovers of an earlier save in the other layout would shadow or confuse this one (a single file wins over an
    # index when loading), so they go, after the new files are in place.
    stale = [out_dir / SAFE_INDEX, *out_dir.glob("model-*-of-*.safetensors")] if n == 1 else [out_dir / SAFE_SINGLE]
    if n > 1:
        stale += [p for p in out_dir.glob("model-*-of-*.safetensors") if p.name not in names]
    for p in stale:
        p.unlink(missing_ok=True)


# Files that hold weights: what a derived checkpoint (quantized, merged) must not copy from its source.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def write_checkpoint_dir(out_dir: str | Path, write: Callable[[Path], None], source_dir: str | Path | None = None
                         ) -> Path:
    """Build a checkpoint directory in a temporary sibling of `out_dir` (the non-weight files of `source_dir`,
    such as config and tokenizer, then whatever `write(tmp)` adds) and only then put it in place of `out_dir`: a
    failed or killed run leaves an earlier `out_dir` intact and never a half-written one."""
    import shutil

    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = out_dir.with_name(f".{out_dir.name}.{tag}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{tag}.old")
    tmp.mkdir()
    try:
        if source_dir is not None:
            for f in sorted(Path(source_dir).iterdir()):
                if (f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_FILE_SUFFIXES)
                        and not f.name.endswith(".index.json")):
                    shutil.copy2(f, tmp / f.name)
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
