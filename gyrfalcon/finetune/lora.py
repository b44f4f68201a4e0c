"""LoRA as a module swap: each target Linear becomes a `LoraLinear` that holds the frozen original (`base`) and
two small trainable matrices.

    y = base(x) + scaling * B(A(dropout(x)))       A: [r, in], B: [out, r], scaling = alpha / r

`base` may be a plain `nn.Linear` or one of gyrfalcon's quantized Linears (int8 / nf4 / fp4, from
`gyrfalcon.quant`): a LoRA over a frozen 4-bit base is QLoRA. A starts like an `nn.Linear` (Kaiming-uniform,
a = sqrt(5)) and B at zero, as PEFT does, so a fresh adapter leaves the model's output unchanged.

Target names follow PEFT's rules, so one list means the same modules here and on transformers' models (our module
names are the checkpoint's names): a name in the list matches a module whose full dotted name equals it or ends with
"." + it; a single string is a regular expression the full name must match; "all-linear" is every Linear but the
output head.

    cfg = LoraConfig(r=16, alpha=32)                   # default targets per family (`default_targets`)
    apply_lora(model, cfg)                             # in place; only the adapters require grad
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# x_proj -> dt_proj is a rank-`time_step_rank` product already; dt_proj stays frozen as in PEFT's Mamba examples.
FALCON_MAMBA_TARGETS = ("in_proj", "x_proj", "out_proj")

# Wrappers that insert a path component into module names (DDP, torch.compile, activation checkpointing, FSDP);
# adapter names never contain them.
_WRAPPER_PARTS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


class LoraError(ValueError):
    """A LoRA configuration that does not fit the model (reported without a traceback by the CLI)."""


@dataclass
class LoraConfig:
    """r: rank; alpha: scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`); dropout: on
    the adapter's input while training; target_modules: names (PEFT's matching, see the module doc), a regex
    string, "all-linear", or None for the family default."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)  # unknown keys kept from an adapter_config.json, written back as is

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoraError(f"LoRA alpha must be a number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise LoraError(f"target_modules={self.target_modules!r} is not a valid regular expression "
                                f"({exc}); give a list of names for plain matching") from None
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            names = tuple(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise LoraError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
            self.target_modules = names

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def resolved(self, model: nn.Module) -> LoraConfig:
        """This config with the family default filled in for `target_modules=None`."""
        if self.target_modules is not None:
            return self
        return LoraConfig(self.r, self.alpha, self.dropout, default_targets(model), self.use_rslora, dict(self.extra))


def default_targets(config_or_model) -> tuple[str, ...]:
    """The default target modules of a model family: a gyrfalcon config (`FalconConfig`, `FalconMambaConfig`), a
    model built from one, or a `model_type` string."""
    cfg = getattr(config_or_model, "config", config_or_model)
    model_type = cfg if isinstance(cfg, str) else getattr(cfg, "model_type", None)
    if model_type in ("falcon", "RefinedWeb", "RefinedWebModel"):
        return FALCON_TARGETS
    if model_type == "falcon_mamba":
        return FALCON_MAMBA_TARGETS
    raise LoraError(f"no default LoRA targets for model_type={model_type!r}: give target_modules explicitly")


# ---------------------------------------------------------------------------------------------------------------
# The module


def _is_quant_linear(mod: nn.Module) -> bool:
    from ..quant.linear import QuantLinear

    return isinstance(mod, QuantLinear)


def is_linear(mod: nn.Module) -> bool:
    """A module LoRA can wrap: `nn.Linear` or a gyrfalcon quantized Linear."""
    return isinstance(mod, nn.Linear) or _is_quant_linear(mod)


class LoraLinear(nn.Module):
    """A frozen Linear (`base`, float or quantized) plus a trainable rank-r update `scaling * lora_B @ lora_A`.

    The adapters may have their own dtype (fp32 while training over a bf16 or 4-bit base): the input is cast to it
    for the low-rank path and the result cast back to the base output's dtype."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not is_linear(base):
            raise LoraError(f"LoRA wraps a Linear, not {type(base).__name__}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        in_f, out_f = base.in_features, base.out_features
        device = base.weight.device
        if dtype is None:
            dtype = base.weight.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear's own default init (what PEFT uses), B = 0: the adapter starts as the identity update.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # Model code sometimes reads a Linear's attributes directly (dtype checks); they are the base's.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.weight
        h = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (h * self.scaling).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling * B @ A as an [out, in] matrix (computed in fp32)."""
        b = self.lora_B.weight.detach().float()
        a = self.lora_A.weight.detach().float()
        return (b @ a * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------------------------------
# Finding and swapping modules


def clean_name(name: str) -> str:
    """A module name without the path components that wrappers insert (DDP's `module.`, `_orig_mod.` ...)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def target_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry equals it or is a dotted suffix of it."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return name.rpartition(".")[2] != "lm_head"
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _tied_weight_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None) if not isinstance(mod, LoraLinear) else None
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    return owners


def find_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Names of the modules `targets` selects, checked: every target must match a Linear, nothing else."""
    modules = dict(model.named_modules())
    chosen: list[str] = []
    not_linear: list[str] = []
    for name, mod in modules.items():
        if not name:
            continue
        if target_matches(clean_name(name), targets):
            (chosen if is_linear(mod) else not_linear).append(name)
    if isinstance(targets, str):
        if not chosen:
            raise LoraError(f"target_modules={targets!r} matches no Linear module of this "
                            f"{type(model).__name__}; {_linear_hint(modules)}")
    else:
        for t in targets:
            hits = [n for n in chosen if target_matches(clean_name(n), (t,))]
            if not hits:
                bad = [n for n in not_linear if target_matches(clean_name(n), (t,))]
                what = (f"matches only modules that are not Linear ({', '.join(bad[:3])}: "
                        f"{type(modules[bad[0]]).__name__})" if bad else "matches no module")
                raise LoraError(f"LoRA target {t!r} {what} of this {type(model).__name__}; {_linear_hint(modules)}")
    tied = _tied_weight_owners(model)
    for name in chosen:
        mod = modules[name]
        shared = tied.get(id(mod.weight), [name])
        if len(shared) > 1 or getattr(mod, "tied", False):
            others = [n for n in shared if n != name] or ["another module"]
            raise LoraError(f"LoRA target {name!r} shares its weight with {', '.join(others)} (tied embeddings); "
                            "an adapter there could not be merged without changing both: leave it out")
    return chosen


def _linear_hint(modules: dict[str, nn.Module]) -> str:
    leaves = sorted({clean_name(n).rpartition(".")[2] for n, m in modules.items() if n and is_linear(m)})
    return f"its Linear modules are named {', '.join(leaves) or '(none)'}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


def apply_lora(model: nn.Module, cfg: LoraConfig, *, dtype: torch.dtype | None = None,
               modules: Iterable[str] | None = None) -> nn.Module:
    """Wrap every target Linear of `model` in a `LoraLinear` (in place; returns the model) and freeze everything
    but the adapters.

    dtype: of the adapter matrices (default: the base weight's dtype, its compute dtype for a quantized base; pass
    torch.float32 to train fp32 adapters over a bf16 or 4-bit base). modules: exact module names to wrap instead of
    matching `cfg.target_modules` (used when loading an adapter, whose file says where its matrices go).
    Raises LoraError naming the target when a target matches nothing, or only non-Linear modules, and when the
    model already has adapters."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LoraError("the model already has LoRA adapters (merge them with merge_lora first, or load new adapter "
                        "weights into them with load_adapter)")
    if modules is None:
        names = find_targets(model, cfg.resolved(model).target_modules)
    else:
        table = dict(model.named_modules())
        names = list(modules)
        for n in names:
            if n not in table:
                raise LoraError(f"the model has no module {n!r}")
            if not is_linear(table[n]):
                raise LoraError(f"module {n!r} is a {type(table[n]).__name__}, not a Linear: LoRA cannot wrap it")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        wrapped = LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype)
        wrapped.train(base.training)
        _set_module(model, name, wrapped)
    model._gyrfalcon_lora = cfg.resolved(model) if modules is None else cfg  # noqa: SLF001 - what save_adapter writes
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(clean module name, LoraLinear) for every adapter of `model`, in module order."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield clean_name(name), mod


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (what an optimizer over a LoRA model takes)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The LoraConfig `apply_lora` / `load_adapter` used on `model` (None when it has no adapters)."""
    inner = model
    for _ in range(8):  # through DDP (`module`) and torch.compile (`_orig_mod`) wrappers
        cfg = getattr(inner, "_gyrfalcon_lora", None)
        if cfg is not None:
            return cfg
        nxt = inner._modules.get("module")  # noqa: SLF001
        if nxt is None:
            nxt = inner._modules.get("_orig_mod")  # noqa: SLF001
        if not isinstance(nxt, nn.Module):
            return None
        inner = nxt
    return None
