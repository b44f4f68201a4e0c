"""Model configuration, normalized once at the edge.

Falcon checkpoints on the hub carry `config.json` in three historical forms:

* ``model_type: falcon``: the in-library keys (``num_attention_heads``, ``num_kv_heads``,
  ``new_decoder_architecture``, ``multi_query``, ``parallel_attn``, ``num_ln_in_parallel_attn``, ...);
* ``model_type: RefinedWeb`` / ``RefinedWebModel``: the original remote-code keys (``n_head``, ``n_layer``,
  ``n_head_kv``, ``n_embed``). ``RefinedWeb`` is the 40B/180B "new decoder architecture";
* ``model_type: falcon_mamba``: the state-space family.

`from_hf` turns each into one explicit frozen dataclass. Nothing below this module reads raw keys, and every
value we cannot run is rejected here with an error that names the key and the value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot be turned into a model we can run."""


@dataclass(frozen=True)
class FalconConfig:
    """Every Falcon layout, with the choices spelled out.

    `num_kv_heads` is the number of key/value heads actually stored: 1 for multi-query (7B),
    `num_kv_heads` of the config for the new decoder architecture (40B/180B/11B), all heads for RW.
    `qkv_layout` says how the fused `query_key_value` output is ordered:
      * "multi_query": [q_0 .. q_{H-1}, k, v]
      * "grouped":     per KV group g: [q_{g,0} .. q_{g,H/G-1}, k_g, v_g]
      * "interleaved": per head h: [q_h, k_h, v_h]   (multi-head RW)
    `num_ln` is 2 when attention and MLP read separate norms (`ln_attn`, `ln_mlp`), else 1 (`input_layernorm`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    layer_norm_epsilon: float
    new_decoder_architecture: bool
    parallel_attn: bool
    num_ln: int
    bias: bool
    alibi: bool
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None

    model_type = "falcon"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_layout(self) -> str:
        if self.new_decoder_architecture:
            return "grouped"
        return "multi_query" if self.num_kv_heads == 1 and self.num_heads > 1 else "interleaved"

    @property
    def qkv_out_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def layout(self) -> str:
        """A short human name for the architecture variant."""
        if self.new_decoder_architecture:
            return "new-decoder (40B/180B style, 2 norms)" if self.num_ln == 2 else "new-decoder (Falcon2-11B style)"
        if self.alibi:
            return "RW (alibi, sequential)" if not self.parallel_attn else "RW (alibi, parallel)"
        if self.qkv_layout == "multi_query":
            return "multi-query (7B style)"
        return "multi-head" + (" (parallel)" if self.parallel_attn else " (sequential)")

    def to_hf(self) -> dict[str, Any]:
        """The in-library `falcon` config.json that transformers (and we) load."""
        return {
            "model_type": "falcon",
            "architectures": ["FalconForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads if self.new_decoder_architecture else self.num_heads,
            "multi_query": self.qkv_layout == "multi_query",
            "new_decoder_architecture": self.new_decoder_architecture,
            "parallel_attn": self.parallel_attn,
            "num_ln_in_parallel_attn": self.num_ln if self.new_decoder_architecture else None,
            "ffn_hidden_size": self.ffn_hidden_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bias": self.bias,
            "alibi": self.alibi,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "activation": "gelu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        }


@dataclass(frozen=True)
class FalconMambaConfig:
    """Falcon-Mamba (Mamba-1 mixer with weightless RMS norms on B, C and dt)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    state_size: int
    intermediate_size: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    layer_norm_epsilon: float
    mixer_rms_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    model_type = "falcon_mamba"
    layout = "falcon-mamba (state space)"

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "falcon_mamba",
            "architectures": ["FalconMambaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "state_size": self.state_size,
            "expand": self.intermediate_size // self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "conv_kernel": self.conv_kernel,
            "time_step_rank": self.time_step_rank,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "mixer_rms_eps": self.mixer_rms_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "residual_in_fp32": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


ModelConfig = FalconConfig | FalconMambaConfig

_FALCON_TYPES = {"falcon", "RefinedWeb", "RefinedWebModel"}
_MAMBA_TYPES = {"falcon_mamba"}


class _Keys:
    """Reads a raw config dict, remembering the key names so errors can cite them."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                return self.raw[name]
        return default

    def require(self, *names: str) -> Any:
        value = self.get(*names)
        if value is None:
            raise ConfigError(f"config.json is missing {' / '.join(repr(n) for n in names)}")
        return value

    def int_(self, *names: str, default: Any = None, minimum: int = 1) -> int:
        value = self.get(*names, default=default) if default is not None else self.require(*names)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"config.json: {names[0]}={value!r} must be an integer >= {minimum}")
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.get(name, default=default)
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: {name}={value!r} must be true or false")
        return value

    def float_(self, *names: str, default: float) -> float:
        value = self.get(*names, default=default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config.json: {names[0]}={value!r} must be a positive number")
        return float(value)

    def token_id(self, name: str, default: int | None) -> int | None:
        value = self.get(name, default=default)
        if isinstance(value, list):  # several EOS ids: the first is the canonical one
            value = value[0] if value else None
        return value


def _falcon_from_hf(raw: dict[str, Any]) -> FalconConfig:
    k = _Keys(raw)
    model_type = raw.get("model_type")
    legacy = model_type in {"RefinedWeb", "RefinedWebModel"}

    hidden = k.int_("hidden_size", "n_embed", "d_model")
    heads = k.int_("num_attention_heads", "n_head")
    layers = k.int_("num_hidden_layers", "n_layer")
    vocab = k.int_("vocab_size")
    if hidden % heads:
        raise ConfigError(f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")

    # RefinedWeb is the 40B/180B decoder; RefinedWebModel the 7B/RW one. The remote-code defaults differ from
    # the in-library ones (multi_query and parallel_attn default to false there).
    new_arch = k.bool_("new_decoder_architecture", default=model_type == "RefinedWeb")
    multi_query = k.bool_("multi_query", default=not legacy)
    parallel = k.bool_("parallel_attn", default=not legacy)
    if k.get("apply_residual_connection_post_layernorm", default=False):
        raise ConfigError("config.json: apply_residual_connection_post_layernorm=true is not supported")

    if new_arch:
        kv_heads = k.int_("num_kv_heads", "n_head_kv", default=heads)
        if heads % kv_heads:
            raise ConfigError(f"config.json: num_kv_heads={kv_heads} does not divide num_attention_heads={heads}")
        parallel = True  # the new decoder is always parallel; its parallel_attn key is ignored (as documented)
        num_ln = k.get("num_ln_in_parallel_attn", default=2)
        if num_ln not in (1, 2):
            raise ConfigError(f"config.json: num_ln_in_parallel_attn={num_ln!r} must be 1 or 2")
    else:
        kv_heads = 1 if multi_query else heads
        num_ln = 1

    activation = k.get("activation", default="gelu")
    if activation != "gelu":
        raise ConfigError(f"config.json: activation={activation!r} is not supported (Falcon uses 'gelu')")

    rope = k.get("rope_scaling") or {}
    rope_params = k.get("rope_parameters") or {}
    for source, name in ((rope, "rope_scaling"), (rope_params, "rope_parameters")):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"config.json: {name}.rope_type={rope_type!r} is not supported (only default RoPE)")
    theta = rope_params.get("rope_theta", k.get("rope_theta", default=10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: rope_theta={theta!r} must be a positive number")

    return FalconConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=k.int_("ffn_hidden_size", default=4 * hidden),
        layer_norm_epsilon=k.float_("layer_norm_epsilon", default=1e-5),
        new_decoder_architecture=new_arch,
        parallel_attn=parallel,
        num_ln=num_ln,
        bias=k.bool_("bias", default=False),
        alibi=k.bool_("alibi", default=False),
        rope_theta=float(theta),
        max_position_embeddings=k.int_("max_position_embeddings", default=2048),
        tie_word_embeddings=k.bool_("tie_word_embeddings", default=True),
        bos_token_id=k.token_id("bos_token_id", 11),
        eos_token_id=k.token_id("eos_token_id", 11),
    )


def _mamba_from_hf(raw: dict[str, Any]) -> FalconMambaConfig:
    k = _Keys(raw)
    hidden = k.int_("hidden_size", "d_model")
    expand = k.int_("expand", default=2)
    rank = k.get("time_step_rank", default="auto")
    if rank == "auto":
        rank = math.ceil(hidden / 16)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"config.json: time_step_rank={rank!r} must be 'auto' or a positive integer")
    if not k.bool_("residual_in_fp32", default=True):
        raise ConfigError("config.json: residual_in_fp32=false is not supported (Falcon-Mamba keeps it in fp32)")
    act = k.get("hidden_act", default="silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported (Falcon-Mamba uses 'silu')")
    return FalconMambaConfig(
        vocab_size=k.int_("vocab_size"),
        hidden_size=hidden,
        num_layers=k.int_("num_hidden_layers", "n_layer"),
        state_size=k.int_("state_size", default=16),
        intermediate_size=k.int_("intermediate_size", default=expand * hidden),
        conv_kernel=k.int_("conv_kernel", default=4),
        time_step_rank=rank,
        use_bias=k.bool_("use_bias", default=False),
        use_conv_bias=k.bool_("use_conv_bias", default=True),
        layer_norm_epsilon=k.float_("layer_norm_epsilon", default=1e-5),
        mixer_rms_eps=k.float_("mixer_rms_eps", default=1e-6),
        tie_word_embeddings=k.bool_("tie_word_embeddings", default=True),
        bos_token_id=k.token_id("bos_token_id", 0),
        eos_token_id=k.token_id("eos_token_id", 0),
        pad_token_id=k.token_id("pad_token_id", 0),
    )


def from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Normalize any supported config.json dict into a frozen config dataclass."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type in _FALCON_TYPES:
        return _falcon_from_hf(raw)
    if model_type in _MAMBA_TYPES:
        return _mamba_from_hf(raw)
    raise ConfigError(
        f"config.json: model_type={model_type!r} is not supported "
        f"(expected one of {sorted(_FALCON_TYPES | _MAMBA_TYPES)})"
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a file or a model directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return from_hf(raw)


def config_dict(config: ModelConfig) -> dict[str, Any]:
    """The dataclass fields, for reports and result files."""
    return {"model_type": config.model_type, **asdict(config)}
