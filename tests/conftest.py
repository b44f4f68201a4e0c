"""Shared test helpers: tiny random models built with transformers (the numerical reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Each Falcon layout on the hub, at toy size. Keys are in-library `falcon` config keys.
FALCON_LAYOUTS = {
    "7b-multi-query": dict(multi_query=True, parallel_attn=True, num_attention_heads=4),
    "40b-grouped": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2),
    "40b-grouped-kv1": dict(new_decoder_architecture=True, num_attention_heads=4, num_kv_heads=1),
    "11b-one-norm": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2,
                         num_ln_in_parallel_attn=1, rope_theta=500042.0),
    "rw-alibi": dict(alibi=True, multi_query=False, parallel_attn=False, bias=True, num_attention_heads=6),
    "7b-untied": dict(multi_query=True, num_attention_heads=4, tie_word_embeddings=False),
}


def falcon_config_dict(layout: str, vocab_size: int = 131, hidden_size: int = 48, layers: int = 2) -> dict:
    return dict(model_type="falcon", vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                bos_token_id=1, eos_token_id=2, **FALCON_LAYOUTS[layout])


def hf_falcon(layout: str, seed: int = 0, **kw):
    """A random transformers Falcon for `layout`, in eval mode, fp32."""
    transformers = pytest.importorskip("transformers")
    raw = falcon_config_dict(layout, **kw)
    theta = raw.pop("rope_theta", None)
    config = transformers.FalconConfig(**raw)
    if theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(seed)
    model = transformers.FalconForCausalLM(config).eval()
    # Random init gives near-uniform logits; scale the weights up so argmax is decisive and layouts differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model, raw if theta is None else {**raw, "rope_theta": theta}


def gyrfalcon_from_hf(layout: str):
    """Our model with the weights of `hf_falcon(layout)`, in eval mode, fp32 on the CPU."""
    from gyrfalcon.config import from_hf
    from gyrfalcon.models import build_model

    hf, raw = hf_falcon(layout)
    model = build_model(from_hf(raw), device="cpu")
    state = dict(hf.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def falcon_dir(tmp_path_factory):
    """A random multi-query Falcon with the real Falcon tokenizer, saved as an HF model dir."""
    import shutil

    tok_dir = SHARED_DATA / "falcon_tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("../shared/data/falcon_tokenizer not present")
    transformers = pytest.importorskip("transformers")
    config = transformers.FalconConfig(vocab_size=65024, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       multi_query=True, bos_token_id=11, eos_token_id=11)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("falcon-random")
    model.save_pretrained(out)
    for f in tok_dir.glob("*.json"):
        shutil.copy(f, out)
    return out
