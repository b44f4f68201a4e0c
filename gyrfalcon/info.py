"""`gyrfalcon info`: what a model is and what it costs in memory, from its config alone (no weights needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import FalconConfig, ModelConfig, load_config
from .models import build_model

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "4-bit": 0.5}


def _config_path(model: str | Path | None, revision: str | None) -> Path:
    from .api import DEFAULT_MODEL
    from .weights import resolve_model_dir

    if model is None:
        return DEFAULT_MODEL
    path = Path(model)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return path
    return resolve_model_dir(str(model), revision=revision)


def count_parameters(config: ModelConfig) -> int:
    """Unique parameters (a tied output head counts once), from a model built on the meta device."""
    model = build_model(config, device="meta")
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> tuple[int, int] | None:
    """(KV bytes per token as stored, the multi-head equivalent) for Falcon; None for a state-space model."""
    if not isinstance(config, FalconConfig):
        return None
    per_head = 2 * config.num_layers * config.head_dim * bytes_per_value  # K and V
    return per_head * config.num_kv_heads, per_head * config.num_heads


def describe(model: str | Path | None = None, revision: str | None = None, context: int = 2048) -> dict[str, Any]:
    path = _config_path(model, revision)
    config = load_config(path)
    params = count_parameters(config)
    report: dict[str, Any] = {
        "path": str(path),
        "model_type": config.model_type,
        "layout": config.layout,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": params,
        "weight_bytes": {k: int(params * v) for k, v in _BYTES.items()},
    }
    if isinstance(config, FalconConfig):
        kv, mha = cache_bytes_per_token(config)
        report.update(
            heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            ffn_hidden_size=config.ffn_hidden_size, positions="alibi" if config.alibi else
            f"rotary (theta {config.rope_theta:g})", context=context,
            kv_cache_bf16={"per_token": kv, "at_context": kv * context,
                           "multi_head_per_token": mha, "multi_head_at_context": mha * context},
        )
    else:
        state = config.num_layers * config.intermediate_size * (
            (config.conv_kernel - 1) * 2 + config.state_size * 4)  # conv state bf16, ssm state fp32
        report.update(state_size=config.state_size, d_inner=config.intermediate_size,
                      recurrent_state_bytes_per_sequence=state)
    return report


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_info(r: dict[str, Any]) -> str:
    lines = [
        f"model        {r['path']}",
        f"type         {r['model_type']}: {r['layout']}",
        f"layers       {r['layers']}   hidden {r['hidden_size']}   vocab {r['vocab_size']}",
    ]
    if "heads" in r:
        lines.append(f"attention    {r['heads']} query heads, {r['kv_heads']} KV heads, head dim {r['head_dim']}, "
                     f"{r['positions']}; MLP {r['ffn_hidden_size']}")
    lines.append(f"parameters   {r['parameters']:,} ({r['parameters'] / 1e9:.2f} B)")
    lines.append("weights      " + "   ".join(f"{k} {_human(v)}" for k, v in r["weight_bytes"].items()))
    if "kv_cache_bf16" in r:
        kv = r["kv_cache_bf16"]
        ratio = kv["multi_head_per_token"] / kv["per_token"]
        lines += [
            f"KV cache (bf16)          per token        at {r['context']} tokens",
            f"  this model ({r['kv_heads']:>3} KV)   {_human(kv['per_token']):>12}   {_human(kv['at_context']):>12}",
            f"  multi-head ({r['heads']:>3} KV)   {_human(kv['multi_head_per_token']):>12}   "
            f"{_human(kv['multi_head_at_context']):>12}   ({ratio:.0f}x more)",
        ]
    else:
        lines.append(f"state        {_human(r['recurrent_state_bytes_per_sequence'])} per sequence, "
                     "whatever its length (no KV cache)")
    return "\n".join(lines)


