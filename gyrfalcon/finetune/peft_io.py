"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What PEFT writes for a LoRA on a causal LM (checked against peft's `save_pretrained` in tests/test_peft_io.py):

* tensor names `base_model.model.<module path>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]), the
  adapter name ("default") left out. Our module paths are the checkpoint's, hence transformers' (for
  FalconForCausalLM `transformer.h.0.self_attention.query_key_value`, for FalconMambaForCausalLM
  `backbone.layers.0.mixer.in_proj`), so the mapping is the prefix alone;
* a config with `peft_type: LORA`, `task_type: CAUSAL_LM`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`,
  `bias: none` and the options that change the arithmetic (`use_rslora`, `use_dora`, `rank_pattern`, ...).

Loading is driven by the tensor names: they say exactly which modules carry an adapter, whatever pattern
produced them. Options we do not implement (DoRA, per-module rank or alpha patterns, trained biases, extra full
modules, token adapters) are refused by name rather than silently ignored.

Note for Falcon-Mamba: peft refuses LoRA on `out_proj` of Mamba models (its CUDA fast path reads that weight
directly), so an adapter over the default Falcon-Mamba targets loads here but not into peft; target
`in_proj, x_proj` for one that does.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path

import torch
from torch import nn

from .lora import LoraConfig, LoraError, apply_lora, clean_name, is_linear, lora_config_of, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PARTS = ("lora_A", "lora_B")


class AdapterError(LoraError):
    """An adapter directory that cannot be read or does not fit the model."""


def peft_key(module_name: str, part: str) -> str:
    """Our module name + "lora_A" / "lora_B" -> PEFT's tensor name."""
    return f"{PREFIX}{clean_name(module_name)}.{part}.weight"


def _parse_key(key: str) -> tuple[str, str] | None:
    """PEFT's tensor name -> (module name, part), or None for a name that is not a plain LoRA matrix."""
    if not key.startswith(PREFIX) or not key.endswith(".weight"):
        return None
    body = key[len(PREFIX) : -len(".weight")]
    module, _, part = body.rpartition(".")
    if part not in PARTS or not module:
        return None
    return module, part


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter matrices under PEFT's tensor names (detached; on the model's device, in the adapters' dtype)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in lora_modules(model):
        out[peft_key(name, "lora_A")] = mod.lora_A.weight.detach()
        out[peft_key(name, "lora_B")] = mod.lora_B.weight.detach()
    return out


# ---------------------------------------------------------------------------------------------------------------
# adapter_config.json

def peft_config_dict(cfg: LoraConfig, target_modules: list[str] | str, base_model_name: str | None = None) -> dict:
    """The adapter_config.json that peft's LoraConfig reads."""
    d = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return {**cfg.extra, **d}


# option -> why we refuse it when it is set (not None / False / empty)
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "adapters with trained biases (lora_bias) are not supported",
    "modules_to_save": "adapters that also save full modules (modules_to_save) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights) does not apply to Falcon",
    "trainable_token_indices": "token adapters (trainable_token_indices) are not supported",
    "target_parameters": "adapters on parameters (target_parameters) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer replication is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "megatron_config": "Megatron-parallel adapters are not supported",
}


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """Read and validate an adapter_config.json; raises AdapterError naming the file and the problem."""
    adapter_dir = _check_dir(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no {CONFIG_NAME}: not a PEFT adapter directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type={raw.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{path}: task_type={raw.get('task_type')!r}; only CAUSAL_LM adapters apply to a "
                           "causal language model")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={raw['bias']!r}; only adapters with bias 'none' are supported")
    for key, why in _UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterError(f"{path}: {why}")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise AdapterError(f"{path}: missing {key!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    known = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"}
    extra = {k: v for k, v in raw.items() if k not in known}
    try:
        return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
                          target_modules=targets or None, use_rslora=bool(raw.get("use_rslora", False)),
                          extra=extra)
    except LoraError as exc:
        raise AdapterError(f"{path}: {exc}") from None


def _check_dir(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter {adapter_dir} is not a directory (give the folder holding {CONFIG_NAME})")
    return adapter_dir


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _atomic_write(path: Path, write) -> Path:
    """Write through `write(tmp_path)` to a hidden temporary sibling, fsync it; returns the temporary path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_adapter(model: nn.Module, cfg: LoraConfig | None, out_dir: str | Path, *,
                 base_model_name: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's names and format) into `out_dir`.

    cfg: the LoraConfig the adapters were made with (None: the one `apply_lora` recorded on the model); its
    target_modules are written as the list of module-name suffixes that carry adapters, so peft re-targets
    exactly the same modules. dtype: of the stored matrices (default: as trained).
    Both files are written to temporary names and fsynced before either is renamed into place, so a failed or
    killed save leaves the previous adapter files as they were (at worst a rename apart)."""
    from safetensors.torch import save_file

    cfg = cfg if cfg is not None else lora_config_of(model)
    state = lora_state_dict(model)
    if not state:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    if cfg is None:
        raise AdapterError("save_adapter needs the LoraConfig the adapters were made with")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    if ranks != {cfg.r}:
        raise AdapterError(f"the model's adapters have rank {sorted(ranks)}, the config says r={cfg.r}")
    tensors = {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    # The suffixes PEFT should match: the leaf names of the wrapped modules, unless the config says more precisely
    # (a regex or dotted names); either way peft's matching picks exactly the modules we wrapped.
    leaves = sorted({clean_name(n).rpartition(".")[2] for n, _ in lora_modules(model)})
    targets: list[str] | str = cfg.target_modules if isinstance(cfg.target_modules, str) else leaves
    if not isinstance(cfg.target_modules, str) and cfg.target_modules is not None:
        if any("." in t for t in cfg.target_modules):
            targets = sorted(cfg.target_modules)
    config = peft_config_dict(cfg, targets, base_model_name)
    if getattr(getattr(model, "config", None), "model_type", None) == "falcon_mamba" and "out_proj" in leaves:
        warnings.warn("this Falcon-Mamba adapter targets out_proj, which peft refuses on Mamba models: it loads in "
                      "gyrfalcon but not in peft; target in_proj,x_proj for an adapter peft loads too", stacklevel=2)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    try:
        pending.append((_atomic_write(out_dir / WEIGHTS_NAME,
                                      lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
                        out_dir / WEIGHTS_NAME))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        pending.append((_atomic_write(out_dir / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8")),
                        out_dir / CONFIG_NAME))
        for tmp, final in pending:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsynced everywhere
        pass
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Loading


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors (or a legacy adapter_model.bin, read without unpickling code)."""
    adapter_dir = _check_dir(adapter_dir)
    st, legacy = adapter_dir / WEIGHTS_NAME, adapter_dir / LEGACY_WEIGHTS_NAME
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if legacy.is_file():
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise AdapterError(f"{legacy}: expected a dict of tensors")
            return state
    except AdapterError:
        raise
    except Exception as exc:  # a corrupt file: safetensors and torch raise several kinds
        raise AdapterError(f"{st if st.is_file() else legacy}: cannot read the adapter weights ({exc})") from None
    raise AdapterError(f"{adapter_dir} has {CONFIG_NAME} but no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME})")


def _by_module(state: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    unknown = [k for k in state if _parse_key(k) is None]
    if unknown:
        dora = [k for k in unknown if "lora_magnitude_vector" in k]
        embed = [k for k in unknown if "lora_embedding_" in k]
        what = ("DoRA magnitude vectors" if dora else "LoRA on embeddings" if embed else
                "tensors that are not plain LoRA matrices (base_model.model.<module>.lora_A/lora_B.weight)")
        raise AdapterError(f"{where}: {what} are not supported: {', '.join(sorted(unknown)[:5])}"
                           + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else ""))
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        module, part = _parse_key(k)
        mods.setdefault(module, {})[part] = v
    half = [m for m, parts in mods.items() if set(parts) != set(PARTS)]
    if half:
        raise AdapterError(f"{where}: modules with only one of lora_A / lora_B: {', '.join(sorted(half)[:5])}")
    if not mods:
        raise AdapterError(f"{where}: the adapter holds no LoRA matrices")
    return mods


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, dtype: torch.dtype | None = None,
                 trainable: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or peft's) onto `model`, in place; returns the model.

    A model without adapters gets them (module swap, base frozen); one that already has adapters with the same
    modules and rank (resuming training) gets the new matrices. dtype: of the adapter matrices (default: each
    base's weight dtype). trainable: leave the adapters requiring grad (default: frozen, for inference).
    Raises AdapterError for a missing or unreadable directory, unsupported options, modules the model lacks, and
    shape mismatches, naming them."""
    adapter_dir = _check_dir(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    where = adapter_dir / WEIGHTS_NAME
    mods = _by_module(read_adapter_weights(adapter_dir), where)

    existing = dict(lora_modules(model))
    table = {clean_name(n): n for n, _ in model.named_modules()}
    if existing:
        if set(existing) != set(mods):
            raise AdapterError(f"{where}: adapter modules differ from the model's adapters "
                               f"(only in file: {sorted(set(mods) - set(existing))[:3]}, only in model: "
                               f"{sorted(set(existing) - set(mods))[:3]})")
    else:
        absent = sorted(m for m in mods if m not in table)
        if absent:
            raise AdapterError(f"{where}: the adapter targets modules this {type(model).__name__} does not have: "
                               f"{', '.join(absent[:5])}" + (f" ... ({len(absent)} in all)" if len(absent) > 5
                                                             else "") + " (an adapter for another model family?)")
        modules = dict(model.named_modules())
        not_linear = sorted(m for m in mods if not is_linear(modules[table[m]]))
        if not_linear:
            raise AdapterError(f"{where}: the adapter targets modules that are not Linear here: "
                               f"{', '.join(not_linear[:5])}")

    wrong = []
    for m, parts in mods.items():
        base = existing[m] if existing else dict(model.named_modules())[table[m]]
        want_a = (cfg.r, base.in_features)
        want_b = (base.out_features, cfg.r)
        for part, want in (("lora_A", want_a), ("lora_B", want_b)):
            got = tuple(parts[part].shape)
            if got != want:
                wrong.append(f"{m}.{part}: adapter {list(got)} vs model {list(want)}")
        if not all(parts[p].is_floating_point() for p in PARTS):
            wrong.append(f"{m}: non-floating adapter tensors")
    if wrong:
        raise AdapterError(f"{where}: shape mismatches ({len(wrong)}), r={cfg.r} in {CONFIG_NAME}: "
                           + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else "")
                           + " (an adapter for another model size?)")
    if existing and any(mod.r != cfg.r for mod in existing.values()):
        raise AdapterError(f"{where}: rank r={cfg.r} differs from the model's adapters")

    if not existing:
        apply_lora(model, cfg, dtype=dtype, modules=[table[m] for m in sorted(mods)])
    else:
        model._gyrfalcon_lora = cfg  # noqa: SLF001
    for m, mod in lora_modules(model):
        if existing:
            mod.scaling = cfg.scaling
            mod.alpha = cfg.alpha
        with torch.no_grad():
            for part in PARTS:
                p: nn.Parameter = getattr(mod, part).weight
                p.copy_(mods[m][part].to(p.dtype))
        for part in PARTS:
            getattr(mod, part).weight.requires_grad_(trainable)
    return model


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    """Bytes of the adapter's weight file."""
    p = Path(adapter_dir) / WEIGHTS_NAME
    return p.stat().st_size if p.is_file() else (Path(adapter_dir) / LEGACY_WEIGHTS_NAME).stat().st_size


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterError",
    "adapter_size_bytes",
    "lora_state_dict",
    "load_adapter",
    "peft_config_dict",
    "peft_key",
    "read_adapter_config",
    "read_adapter_weights",
    "save_adapter",
]
