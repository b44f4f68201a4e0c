"""Every historical config.json form normalizes to the same explicit dataclass; bad values name their key."""

from __future__ import annotations

import json

import pytest

from gyrfalcon.config import ConfigError, FalconConfig, FalconMambaConfig, from_hf, load_config

from .conftest import SHARED_DATA

CONFIGS = SHARED_DATA / "falcon_configs"
needs_configs = pytest.mark.skipif(not CONFIGS.is_dir(), reason="../shared/data/falcon_configs not present")


@needs_configs
def test_falcon_7b_refinedwebmodel():
    c = load_config(CONFIGS / "falcon-7b")
    assert isinstance(c, FalconConfig)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (32, 4544, 71, 1)
    assert c.qkv_layout == "multi_query" and c.parallel_attn and not c.new_decoder_architecture
    assert c.head_dim == 64 and c.vocab_size == 65024 and not c.alibi


@needs_configs
def test_falcon_40b_refinedweb():
    c = load_config(CONFIGS / "falcon-40b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (60, 8192, 128, 8)
    assert c.new_decoder_architecture and c.num_ln == 2 and c.qkv_layout == "grouped"


@needs_configs
def test_falcon_7b_instruct_in_library_form_equals_legacy_form():
    legacy = load_config(CONFIGS / "falcon-7b")
    modern = load_config(CONFIGS / "falcon-7b-instruct")
    # Same architecture; only the token ids differ between the two releases.
    strip = lambda c: {k: v for k, v in c.__dict__.items() if not k.endswith("token_id")}  # noqa: E731
    assert strip(legacy) == strip(modern)


def test_falcon2_11b_style_and_rw_style():
    c = from_hf(dict(model_type="falcon", vocab_size=65024, hidden_size=4096, num_hidden_layers=60,
                     num_attention_heads=32, num_kv_heads=8, new_decoder_architecture=True,
                     num_ln_in_parallel_attn=1, rope_theta=500042, max_position_embeddings=8192))
    assert c.num_ln == 1 and c.num_kv_heads == 8 and c.rope_theta == 500042.0
    rw = from_hf(dict(model_type="RefinedWebModel", vocab_size=50304, hidden_size=2048, n_layer=24, n_head=32,
                      alibi=True, bias=True, multi_query=False, parallel_attn=False))
    assert rw.alibi and rw.bias and rw.num_kv_heads == 32 and rw.qkv_layout == "interleaved" and not rw.parallel_attn


def test_falcon_mamba_config():
    c = from_hf(dict(model_type="falcon_mamba", vocab_size=65024, hidden_size=4096, num_hidden_layers=64,
                     state_size=16, expand=16 // 8, conv_kernel=4, time_step_rank=256, mixer_rms_eps=1e-6))
    assert isinstance(c, FalconMambaConfig)
    assert c.intermediate_size == 8192 and c.time_step_rank == 256
    auto = from_hf(dict(model_type="falcon_mamba", vocab_size=100, hidden_size=64, num_hidden_layers=2))
    assert auto.time_step_rank == 4


def test_round_trip_through_hf_form():
    for raw in (dict(model_type="RefinedWeb", vocab_size=100, n_embed=64, n_layer=2, n_head=8, n_head_kv=2),
                dict(model_type="falcon", vocab_size=100, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, alibi=True, multi_query=False, parallel_attn=False)):
        c = from_hf(raw)
        assert from_hf(c.to_hf()) == c


@pytest.mark.parametrize(
    "patch, key",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(activation="relu"), "activation"),
        (dict(new_decoder_architecture=True, num_kv_heads=3), "num_kv_heads"),
        (dict(new_decoder_architecture=True, num_ln_in_parallel_attn=3), "num_ln_in_parallel_attn"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(hidden_size="big"), "hidden_size"),
        (dict(layer_norm_epsilon=-1), "layer_norm_epsilon"),
        (dict(bias="yes"), "bias"),
        (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    ],
)
def test_unsupported_values_name_the_key(patch, key):
    raw = dict(model_type="falcon", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    raw.update(patch)
    with pytest.raises(ConfigError, match=key):
        from_hf(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(tmp_path)
