"""LoRA as a module swap: identity at init, only adapters train, merge equals the unmerged model, QLoRA over a 4-bit
base (gradients through the frozen quantized layers), merge into a quantized base. Tiny random models, CPU, fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gyrfalcon.config import from_hf
from gyrfalcon.finetune import (
    FALCON_MAMBA_TARGETS,
    FALCON_TARGETS,
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    default_targets,
    lora_modules,
    lora_parameters,
    merge_lora,
)
from gyrfalcon.finetune.lora import clean_name, target_matches
from gyrfalcon.models import build_model
from gyrfalcon.quant import Int4Linear, Int4Weight, Int8Linear, quantize_model

from .conftest import hf_falcon

# The base inside a LoraLinear runs through F.linear, the bare model's Linear through the fastest BLAS call for its
# shape (models/falcon.py `_linear`): the same product up to fp32 summation order.
IDENTITY_ATOL = 1e-5
# Merged W + s*B@A against the unmerged two-path sum, fp32 logits of magnitude ~5-10: rounding only.
MERGE_ATOL = 1e-4


def ours_falcon(layout: str = "7b-multi-query", seed: int = 0):
    hf, raw = hf_falcon(layout, seed=seed)
    model = build_model(from_hf(raw), device="cpu")
    state = dict(hf.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()


def ours_mamba(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.FalconMambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                         conv_kernel=4, time_step_rank=4, use_conv_bias=True, use_bias=False)
    hf = transformers.FalconMambaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = build_model(from_hf(hf.config.to_dict()), device="cpu")
    model.load_state_dict(hf.state_dict())
    model.tie_weights()
    return model.eval()


def randomize_b(model: nn.Module, std: float = 0.1, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def ids(vocab: int, b: int = 2, t: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x)


@pytest.mark.parametrize("family", ["falcon", "falcon_mamba"])
def test_fresh_adapter_is_identity_and_only_adapters_train(family):
    model = ours_falcon() if family == "falcon" else ours_mamba()
    x = ids(model.config.vocab_size)
    ref = logits(model, x)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    names = {n.rpartition(".")[2] for n, _ in lora_modules(model)}
    assert names == set(FALCON_TARGETS if family == "falcon" else FALCON_MAMBA_TARGETS)
    assert len(list(lora_modules(model))) == len(names) * model.config.num_layers
    for _, m in lora_modules(model):
        assert not m.lora_B.weight.any() and m.lora_A.weight.abs().sum() > 0  # B = 0, A random (PEFT's init)
    assert (logits(model, x) - ref).abs().max().item() < IDENTITY_ATOL
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == len(lora_parameters(model))


def test_gradients_reach_every_adapter_and_nothing_else():
    model = ours_falcon("40b-grouped")
    apply_lora(model, LoraConfig(r=4))
    randomize_b(model)
    x = ids(131)
    model(x).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("layout", ["7b-multi-query", "rw-alibi", "11b-one-norm"])
def test_merged_equals_unmerged(layout):
    model = ours_falcon(layout)
    apply_lora(model, LoraConfig(r=8, alpha=16))
    randomize_b(model)
    x = ids(131)
    unmerged = logits(model, x)
    base_model = ours_falcon(layout)
    assert (unmerged - logits(base_model, x)).abs().max() > 0.1  # the adapters really change the output
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_model.state_dict())  # the base checkpoint's names again
    assert type(model.transformer.h[0].mlp.dense_h_to_4h) is nn.Linear
    assert (logits(model, x) - unmerged).abs().max().item() < MERGE_ATOL


def test_merged_equals_unmerged_mamba():
    model = ours_mamba()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_b(model)
    x = ids(97)
    unmerged = logits(model, x)
    merge_lora(model)
    assert (logits(model, x) - unmerged).abs().max().item() < MERGE_ATOL


def test_scaling_rslora_and_dropout():
    lin = nn.Linear(16, 12)
    m = LoraLinear(lin, r=4, alpha=8)
    assert m.scaling == 2.0
    assert LoraLinear(nn.Linear(16, 12), r=4, alpha=8, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    expect = lin(x) + 2.0 * (x @ m.lora_A.weight.t() @ m.lora_B.weight.t())
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=1e-5)
    d = LoraLinear(nn.Linear(16, 12), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        d.lora_B.weight.normal_()
    d.train()
    assert not torch.equal(d(x), d(x))  # dropout on the adapter path while training
    d.eval()
    assert torch.equal(d(x), d(x))


def test_target_matching_follows_peft():
    assert target_matches("transformer.h.0.self_attention.dense", ("dense",))
    assert not target_matches("transformer.h.0.mlp.dense_h_to_4h", ("dense",))
    assert target_matches("transformer.h.0.mlp.dense_h_to_4h", ("mlp.dense_h_to_4h",))
    assert target_matches("transformer.h.1.mlp.dense_4h_to_h", r".*\.1\.mlp\..*")
    assert not target_matches("lm_head", "all-linear")
    assert clean_name("module._orig_mod.transformer.h.0._checkpoint_wrapped_module.mlp") == "transformer.h.0.mlp"
    model = ours_falcon()
    apply_lora(model, LoraConfig(target_modules=("query_key_value",)))
    assert [n for n, _ in lora_modules(model)] == ["transformer.h.0.self_attention.query_key_value",
                                                   "transformer.h.1.self_attention.query_key_value"]
    model = ours_falcon()
    apply_lora(model, LoraConfig(target_modules=r"transformer\.h\.1\.mlp\..*"))
    assert len(list(lora_modules(model))) == 2


def test_bad_targets_name_the_module():
    with pytest.raises(LoraError, match="'qkv' matches no module.*query_key_value"):
        apply_lora(ours_falcon(), LoraConfig(target_modules=("qkv",)))
    with pytest.raises(LoraError, match="'ln_f' matches only modules that are not Linear.*LayerNorm"):
        apply_lora(ours_falcon(), LoraConfig(target_modules=("dense", "ln_f")))
    with pytest.raises(LoraError, match="lm_head.*shares its weight with transformer.word_embeddings"):
        apply_lora(ours_falcon(), LoraConfig(target_modules=("lm_head",)))
    model = apply_lora(ours_falcon(), LoraConfig())
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())
    with pytest.raises(LoraError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(LoraError, match="not a valid regular expression"):
        LoraConfig(target_modules="dense[")
    with pytest.raises(LoraError, match="dropout"):
        LoraConfig(dropout=1.5)
    with pytest.raises(LoraError, match="no default LoRA targets"):
        default_targets("llama")


# ---------------------------------------------------------------------------------------------------------------
# QLoRA


def test_quantized_linear_input_gradient_matches_dequantized_reference():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int4Linear.from_linear(lin, "nf4")
    x = torch.randn(3, 5, 96, requires_grad=True)
    gy = torch.randn(3, 5, 40)
    (q(x) * gy).sum().backward()
    w = q.weight.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, gy @ w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.t() + lin.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_wraps_a_quantized_base_and_only_adapters_get_grads(mode):
    model = quantize_model(ours_falcon("40b-grouped"), mode)
    x = ids(131)
    ref = logits(model, x)
    apply_lora(model, LoraConfig(r=4), dtype=torch.float32)
    base = model.transformer.h[0].self_attention.query_key_value.base
    assert isinstance(base, Int4Linear if mode == "nf4" else Int8Linear)
    assert (logits(model, x) - ref).abs().max().item() < IDENTITY_ATOL
    randomize_b(model)
    loss = model(x).logsumexp(-1).mean()  # through the int8 output head and every 4-bit layer
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    # the first layer's adapters too: the gradient went back through every frozen quantized product
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_qlora_training_steps_lower_the_loss():
    model = quantize_model(ours_falcon(), "nf4")
    apply_lora(model, LoraConfig(r=8, alpha=16), dtype=torch.float32)
    x = ids(131, b=4, t=16, seed=5)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)

    def loss_fn():
        out = model(x[:, :-1])
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first


@pytest.mark.parametrize("mode", ["nf4", "llm.int8"])
def test_merge_into_quantized_base_requantizes_the_sum(mode):
    model = quantize_model(ours_falcon(), mode)
    apply_lora(model, LoraConfig(r=4), dtype=torch.float32)
    randomize_b(model, std=0.05)
    x = ids(131)
    unmerged = logits(model, x)
    wrapped = dict(lora_modules(model))
    name = "transformer.h.1.mlp.dense_h_to_4h"
    old = wrapped[name]
    expect_w = old.base.weight.dequantize(torch.float32) + old.delta_weight()
    merge_lora(model)
    new = model.get_submodule(name)
    assert type(new) is type(old.base) and new.weight.format == old.base.weight.format
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    if mode == "nf4":
        assert new.weight.double_quant == old.base.weight.double_quant
        again = Int4Weight.from_float(expect_w, "nf4", torch.float32, old.base.weight.double_quant)
        assert torch.equal(new.weight.q, again.q) and torch.equal(new.weight.absmax, again.absmax)
    else:
        assert new.weight.threshold == old.base.weight.threshold
    # The merged weights are the sum up to one more rounding to the format: blockwise 4-bit codes are coarse
    # (a relative error near 0.1 of the weights), int8 per-row about 1/127 of each row's largest weight.
    err = (new.weight.dequantize(torch.float32) - expect_w).abs().max() / expect_w.abs().max()
    assert err < (0.2 if mode == "nf4" else 0.01)
    merged = logits(model, x)
    rel = (merged - unmerged).abs().max() / unmerged.abs().max()
    assert rel < (0.35 if mode == "nf4" else 0.05)
    assert getattr(model, "_gyrfalcon_quant", None) is not None  # still saves as a quantized checkpoint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda_bf16():
    model = ours_falcon("40b-grouped").to("cuda", torch.bfloat16)  # as gyrfalcon.load(dtype="bf16", quantize=)
    quantize_model(model, "nf4")
    x = ids(131).cuda()
    ref = logits(model, x).float()
    apply_lora(model, LoraConfig(r=4), dtype=torch.float32)
    assert model.transformer.h[0].mlp.dense_h_to_4h.lora_A.weight.device.type == "cuda"
    assert (logits(model, x).float() - ref).abs().max().item() < 1e-2  # bf16 outputs, fp32 zero adapter added
    randomize_b(model)
    model(x).float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    unmerged = logits(model, x).float()
    merge_lora(model)
    rel = (logits(model, x).float() - unmerged).abs().max() / unmerged.abs().max()
    assert rel < 0.35
