"""Falcon-Mamba against transformers' FalconMambaForCausalLM, on tiny random models (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gyrfalcon.config import from_hf  # noqa: E402
from gyrfalcon.models import build_model  # noqa: E402
from gyrfalcon.models.cache import MambaCache  # noqa: E402

VOCAB = 97


def make_hf(tie: bool = True, seed: int = 0, **overrides):
    """A small random transformers Falcon-Mamba, every weight pushed well off its init: norm weights are ones and
    the conv bias is zero at init, which would hide a missing term, and the init model's greedy output is one token
    repeated, which would make comparing generations meaningless."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                  time_step_rank=4, use_conv_bias=True, use_bias=False, tie_word_embeddings=tie,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    hf = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name != "lm_head.weight" or not tie:
                p.add_(0.3 * torch.randn_like(p))
    hf.generation_config.eos_token_id = None  # generate the full length, never stop on a random EOS
    return hf


def make_ours(hf):
    config = from_hf(hf.config.to_dict())
    model = build_model(config, device="cpu")
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    hf = make_hf()
    return hf, make_ours(hf)


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache = model.new_cache(prompt.shape[0], 0)
    logits = model(prompt, cache, last_only=True)
    out = []
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)  # [B, 1]
        out.append(tok)
        logits = model(tok, cache, last_only=True)
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_state_dict_names_match(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.lm_head.weight is ours.backbone.embeddings.weight


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours = pair
    x = ids(2, 21)
    ref = hf(x, use_cache=False).logits
    got = ours(x)
    assert got.shape == (2, 21, VOCAB)
    assert (got - ref).abs().max().item() < 1e-4


@torch.no_grad()
def test_greedy_matches_transformers_generate(pair):
    hf, ours = pair
    prompt = ids(1, 7, seed=3)
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    assert ref.shape[1] == 32
    assert len(set(ref[0].tolist())) >= 8  # a varied continuation, not one token repeated
    assert torch.equal(greedy(ours, prompt, 32), ref)


@torch.no_grad()
def test_cached_decode_equals_full_forward(pair):
    _, ours = pair
    x = ids(2, 20, seed=4)
    full = ours(x)
    cache = ours.new_cache(2, 0)
    prompt = 5
    out = [ours(x[:, :prompt], cache)]  # scan from an empty state, then one O(1) step per token
    for i in range(prompt, x.shape[1]):
        out.append(ours(x[:, i : i + 1], cache))
    stepped = torch.cat(out, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5, rtol=0)
    assert cache.lengths_list == [20, 20]
    # Continuing with a multi-token chunk reads the cached state too.
    cache2 = ours.new_cache(2, 0)
    chunked = torch.cat([ours(x[:, :9], cache2), ours(x[:, 9:], cache2)], dim=1)
    assert torch.allclose(chunked, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_rows_equal_unbatched(pair):
    _, ours = pair
    x = ids(3, 12, seed=5)
    batched = ours(x)
    for r in range(3):
        assert torch.allclose(batched[r], ours(x[r : r + 1])[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_right_padding_leaves_state_untouched(pair):
    _, ours = pair
    lengths = [9, 4, 1]
    rows = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    t = max(lengths)
    padded = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    cache = ours.new_cache(len(rows), 0)
    last = ours(padded, cache, input_lengths=lengths, last_only=True)
    assert cache.lengths_list == lengths
    nxt = torch.tensor([[5], [6], [7]])
    after = ours(nxt, cache, last_only=True)
    for i, r in enumerate(rows):
        c = ours.new_cache(1, 0)
        ref_last = ours(r[None], c, last_only=True)
        ref_after = ours(nxt[i : i + 1], c, last_only=True)
        assert torch.allclose(last[i], ref_last[0], atol=1e-5, rtol=0)
        assert torch.allclose(after[i], ref_after[0], atol=1e-5, rtol=0)
        for layer in range(len(cache.conv)):
            assert torch.allclose(cache.conv[layer][i], c.conv[layer][0], atol=1e-5, rtol=0)
            assert torch.allclose(cache.ssm[layer][i], c.ssm[layer][0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_row_with_no_new_token_keeps_its_state(pair):
    _, ours = pair
    cache = ours.new_cache(2, 0)
    ours(ids(2, 6, seed=11), cache)
    conv, ssm = [c.clone() for c in cache.conv], [s.clone() for s in cache.ssm]
    ours(torch.tensor([[3], [0]]), cache, input_lengths=[1, 0])
    assert cache.lengths_list == [7, 6]
    for layer in range(len(conv)):
        assert torch.equal(cache.conv[layer][1], conv[layer][1]) and torch.equal(cache.ssm[layer][1], ssm[layer][1])
        assert not torch.equal(cache.ssm[layer][0], ssm[layer][0])


@torch.no_grad()
def test_new_cache_shapes(pair):
    _, ours = pair
    cache = ours.new_cache(3, 123)
    assert isinstance(cache, MambaCache)
    assert cache.conv[0].shape == (3, 64, 3) and cache.conv[0].dtype == torch.float32
    assert cache.ssm[0].shape == (3, 64, 8) and cache.ssm[0].dtype == torch.float32
    assert len(cache.conv) == len(cache.ssm) == 2


@torch.no_grad()
def test_untied_embeddings_with_biases():
    hf = make_hf(tie=False, seed=2, use_bias=True)
    ours = make_ours(hf)
    assert ours.lm_head.weight is not ours.backbone.embeddings.weight
    x = ids(2, 10, seed=6)
    assert (ours(x) - hf(x, use_cache=False).logits).abs().max().item() < 1e-4
    prompt = ids(1, 5, seed=7)
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(greedy(ours, prompt, 12), ref)


def test_meta_build_then_assign_load(pair):
    hf, _ = pair
    model = build_model(from_hf(hf.config.to_dict()))  # meta
    model.load_state_dict({k: v.clone() for k, v in hf.state_dict().items()}, strict=True, assign=True)
    model.tie_weights()
    x = ids(1, 6, seed=8)
    with torch.no_grad():
        assert (model(x) - hf(x, use_cache=False).logits).abs().max().item() < 1e-4


def test_training_backward(pair):
    hf, _ = pair
    model = make_ours(hf).train()
    x = ids(2, 8, seed=9)
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.layers[0].mixer.A_log.grad.abs().sum() > 0
