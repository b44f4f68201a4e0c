"""Load this rank's slice of a Falcon checkpoint and turn the built model into its tensor-parallel form.

Each rank reads only its own part of every tensor, straight from the memory-mapped safetensors shards (the byte
ranges come from the header), so peak memory per rank is about 1/N of the model plus the replicated norms and
biases (and, for multi-query models, the one KV head that every rank keeps). Not `safe_open(...).get_slice`: in
safetensors 0.8 a slice of it is a view of the whole tensor read into memory (a [256, 1024] tensor's [0:10] slice
keeps a 1 MiB storage), which would make every rank hold every full matrix.
With `quantize`, each local slice is quantized as soon as it is read, by gyrfalcon.quant's own plan and swap, so
only one float tensor exists at a time.

Three stages on a model built on the meta device (`build_model`):
  1. local shapes: every split `nn.Linear`/`nn.Embedding` is replaced by one of the local shape, under the
     checkpoint's name, and loaded (row-parallel biases are kept aside: they are added after the all-reduce);
  2. quantization (optional): gyrfalcon.quant plans and swaps on those names, so `--skip`, the 8-bit head and
     the tied embedding behave exactly as on one device;
  3. parallel modules: blocks, embedding and head are wrapped (`modules.py`) around the local (maybe quantized)
     modules; `model.config.num_kv_heads` becomes the local count, which is what a cache on this rank holds.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import FalconConfig, ModelConfig
from ..models import build_model
from ..weights import WeightsError, find_checkpoint, read_safetensors_header
from ..weights.load import TensorInfo
from .modules import ParallelDecoderLayer, VocabParallelEmbedding, VocabParallelHead
from .shard import Split, TensorParallelError, local_shape, plan_split, tensor_slice

_ROW_BIASES = (".self_attention.dense.bias", ".mlp.dense_4h_to_h.bias")
_IGNORED = (".inv_freq",)


@dataclass
class ParallelInfo:
    """What a tensor-parallel model is: its rank, group, the full config, and what it read from disk."""

    rank: int
    world: int
    split: Split
    full_config: FalconConfig
    group: object = None
    bytes_read: int = 0  # bytes of tensor data read from the checkpoint (in the file's dtype)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> local shape read


def _read_slice(mm: mmap.mmap, info: TensorInfo, kind: str, ranges) -> torch.Tensor:
    """Copy this rank's part of one tensor out of the mapped file: only those bytes are read (the page cache holds
    them, reclaimable), and the result owns exactly its own elements."""
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    full = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start).view(info.shape)
    if kind == "full":
        return full.clone()
    if kind == "cols":
        (a, b), = ranges
        return full[:, a:b].clone(memory_format=torch.contiguous_format)
    return torch.cat([full[a:b] for a, b in ranges])  # rows: contiguous byte ranges


def _release(mm: mmap.mmap, start: int, end: int) -> None:
    """Drop the mapped pages of one tensor from this process once its slice is copied out. The mapping is private
    and never written, so they are clean copies of the file: a column slice touches every page of its matrix, and
    without this the resident set would hold the whole file although the rank keeps only its part."""
    page = mmap.PAGESIZE
    lo, hi = start // page * page, -(-end // page) * page
    if hi > lo and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(mm)) - lo)


def _checkpoint_index(model_dir: Path) -> dict[str, TensorInfo]:
    ckpt = find_checkpoint(model_dir)
    if ckpt.format != "safetensors":
        raise WeightsError(f"{model_dir}: tensor-parallel loading reads safetensors shards (each rank maps them and "
                           "reads only its slice); this checkpoint is pickled .bin files: convert it to safetensors "
                           "first (e.g. load it once with transformers and save_pretrained)")
    where: dict[str, TensorInfo] = {}
    for path in ckpt.files:
        header, _ = read_safetensors_header(path)  # validated: offsets inside the file, known dtypes
        where.update(header)
    return where


def load_parallel_model(model_dir: str | Path, config: ModelConfig, rank: int, world: int, group,
                        dtype: torch.dtype, device: torch.device | str, quantize: str | None = None,
                        skip=()) -> nn.Module:
    """This rank's part of the model in `model_dir`, ready to run in lockstep with the other ranks of `group`.

    The returned model has the ordinary interface (`forward(ids, cache, input_lengths=, last_only=)`, `new_cache`,
    `config`) and returns full logits on every rank; `model.tensor_parallel` is its `ParallelInfo`.
    """
    from ..quant.swap import QuantConfig, StreamQuantizer, checkpoint_quantization, describe, install, parse_skip
    from ..quant.swap import plan_model as plan_quant

    split = plan_split(config, world, rank)  # raises for Falcon-Mamba and for heads/groups that do not divide
    model_dir = Path(model_dir)
    device = torch.device(device)
    if checkpoint_quantization(model_dir) is not None:
        raise TensorParallelError(f"{model_dir} is a quantized checkpoint; tensor parallelism slices float weights: "
                                  "load the float checkpoint with --quantize instead (each rank quantizes its slice)")
    model = build_model(config)  # meta device

    # Stage 1: local shapes, then the slices.
    specs = {}
    expected = model.state_dict(keep_vars=True)
    for name, t in expected.items():
        kind, ranges = tensor_slice(name, config, split)
        specs[name] = (kind, ranges, local_shape(kind, ranges, tuple(t.shape)))
    _local_modules(model, config, split)

    where = _checkpoint_index(model_dir)
    tied = config.tie_word_embeddings
    want = [n for n in expected if not (tied and n == "lm_head.weight")]
    missing = [n for n in want if n not in where]
    wrong = [f"{n}: {where[n].shape} (expected {tuple(expected[n].shape)})" for n in want
             if n in where and where[n].shape != tuple(expected[n].shape)]
    extra = [n for n in where if n not in expected and not n.endswith(_IGNORED)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:10])}")
    if extra:
        problems.append(f"unexpected keys ({len(extra)}): {', '.join(extra[:10])}")
    if problems:
        raise WeightsError(f"checkpoint {model_dir} does not match the model:\n  " + "\n  ".join(problems))

    hook = None
    if quantize is not None:
        qc = QuantConfig(quantize, parse_skip(skip))
        plan = plan_quant(model, qc)
        hook = StreamQuantizer(plan, qc, dtype)
    elif parse_skip(skip):
        raise ValueError("skip= needs quantize=")

    info = ParallelInfo(rank, world, split, config)
    state: dict[str, torch.Tensor] = {}
    row_bias: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[TensorInfo]] = {}
    for name in want:
        by_file.setdefault(where[name].file, []).append(where[name])
    for path, entries in by_file.items():
        try:
            with open(path, "rb") as fh:
                # Private and copy-on-write, like the single-device loader: nothing is read until a slice is copied.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: cannot map: {exc}") from None
        for entry in sorted(entries, key=lambda e: e.start):  # file order: sequential reads
            name = entry.name
            kind, ranges, shape = specs[name]
            raw = _read_slice(mm, entry, kind, ranges)
            info.bytes_read += raw.numel() * raw.element_size()
            info.shapes[name] = tuple(raw.shape)
            if tuple(raw.shape) != shape:  # pragma: no cover - the slicing arithmetic and the header disagree
                raise WeightsError(f"{path}: {name}: read {tuple(raw.shape)}, expected the local {shape}")
            t = raw.to(device=device, dtype=dtype if raw.is_floating_point() else raw.dtype)
            del raw
            _release(mm, entry.start, entry.start + entry.nbytes)
            if name.endswith(_ROW_BIASES):
                row_bias[name] = t
                continue
            state[name] = hook.convert(name, t) if hook is not None else t
        del mm  # every slice is a copy: the mapping goes with the last reference
    if tied:
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if tied:  # assign=True gives each name its own Parameter: share the one local slice again
        model.lm_head.weight = model.transformer.word_embeddings.weight
    if hook is not None:
        install(model, plan, hook.weights)
        model._gyrfalcon_quant = describe(plan, qc)  # noqa: SLF001 - what the quant tools read

    # Stage 3: the parallel modules.
    for i, old in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}"
        model.transformer.h[i] = ParallelDecoderLayer(old, config, split, group,
                                                      row_bias.get(f"{prefix}.self_attention.dense.bias"),
                                                      row_bias.get(f"{prefix}.mlp.dense_4h_to_h.bias"))
    model.transformer.word_embeddings = VocabParallelEmbedding(model.transformer.word_embeddings, split, group)
    model.lm_head = VocabParallelHead(model.lm_head, split, config.vocab_size, group)
    # The cache on this rank holds its own KV heads; everything else the model reads from its config (heads for
    # alibi and rotary, head size, vocabulary) stays global.
    model.config = replace(config, num_kv_heads=split.kv_heads)
    info.group = group
    model.tensor_parallel = info
    return model.eval()


def _local_modules(model: nn.Module, config: FalconConfig, split: Split) -> None:
    """Stage 1: replace the split modules by meta modules of the local shape (same names)."""
    d, D = config.head_dim, config.hidden_size  # noqa: N806 - the glossary's names
    qkv = sum(b - a for a, b in split.qkv_rows)
    attn_in = split.local_heads * d
    f = split.ffn[1] - split.ffn[0]
    v = split.vocab[1] - split.vocab[0]
    bias = config.bias
    with torch.device("meta"):
        for layer in model.transformer.h:
            layer.self_attention.query_key_value = nn.Linear(D, qkv, bias=bias)
            layer.self_attention.dense = nn.Linear(attn_in, D, bias=False)  # bias: added after the all-reduce
            layer.mlp.dense_h_to_4h = nn.Linear(D, f, bias=bias)
            layer.mlp.dense_4h_to_h = nn.Linear(f, D, bias=False)
        model.transformer.word_embeddings = nn.Embedding(v, D, _weight=torch.empty(v, D))
        model.lm_head = nn.Linear(D, v, bias=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.word_embeddings.weight
