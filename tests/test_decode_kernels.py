"""The decode-step kernels (kernels/decode_cpu.c, through models/fast_decode.py) against the torch reference.

Tolerances, written down:
* GELU: 1e-6 absolute. The kernel's erf (Abramowitz & Stegun 7.1.26, the formula torch's vectorized erf uses) and
  exp are each within ~2e-7 absolute, so x * 0.5 * (1 + erf) differs from torch's by a few fp32 ulps of 1 + erf.
* Attention: 2e-6 times the largest |value| (a softmax-weighted mean of the values: fp32 dot products and sums in
  another order than torch's baddbmm / softmax / bmm).
* The rotated key written to the cache: bit for bit (the same products and sum, each rounded to fp32).
* A whole model: logits within 1e-4 of the reference path's, greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

from gyrfalcon.kernels import cpu as cpu_kernels
from gyrfalcon.models import fast_decode, fast_linear
from gyrfalcon.models.cache import KVCache
from gyrfalcon.models.layers import Rotary, apply_rotary_rolled
from gyrfalcon.runtime.generate import Generation
from gyrfalcon.runtime.kv_pool import PagedKVPool
from gyrfalcon.runtime.sampling import SamplingParams

from .conftest import gyrfalcon_from_hf

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 100, 4096, 4099])
def test_gelu_kernel_matches_torch(n: int) -> None:
    torch.manual_seed(n)
    x = torch.randn(n) * 3
    x[0] = 0.0
    if n > 4:
        x[1:5] = torch.tensor([-12.0, 12.0, 1e-30, -1e-3])
    ref = torch.nn.functional.gelu(x)
    got = cpu_kernels.gelu_(x.clone())
    assert (got - ref).abs().max().item() <= 1e-6


def test_gelu_kernel_over_a_dense_range() -> None:
    x = torch.linspace(-9, 9, 200_001)
    assert (cpu_kernels.gelu_(x.clone()) - torch.nn.functional.gelu(x)).abs().max().item() <= 1e-6


def _reference(qkv, h, g, d, cos, sin, lengths, k_hist, v_hist):
    """Plain torch: per row, rotate this token's queries and key, append key and value, softmax(q k^T / sqrt d) v."""
    b = qkv.shape[0]
    grp = qkv.view(b, g, h // g + 2, d)
    out = torch.empty(b, h, d)
    new_k = torch.empty(b, g, d)
    for r in range(b):
        p = int(lengths[r])
        rot = apply_rotary_rolled(grp[r, :, :-1], cos[p], sin[p])  # [g, h/g + 1, d]
        new_k[r] = rot[:, -1]
        keys = torch.cat([k_hist[r][:, :p], rot[:, -1:, :]], dim=1)  # [g, p + 1, d]
        values = torch.cat([v_hist[r][:, :p], grp[r, :, -1:, :]], dim=1)
        q = rot[:, :-1]  # [g, h/g, d]
        w = torch.softmax(q @ keys.transpose(1, 2) * d**-0.5, dim=-1)
        out[r] = (w @ values).reshape(h, d)
    return out.reshape(b, h * d), new_k


@pytest.mark.parametrize("h,g,lengths", [
    (4, 1, [0, 5, 17]),          # multi-query; a row's first token attends to itself only
    (8, 2, [33, 1]),             # grouped
    (6, 6, [9, 9, 9]),           # one KV head per query head (per-head [q, k, v])
    (16, 1, [300, 250, 10, 299]),  # enough work for the threaded path
])
@pytest.mark.parametrize("store", ["kv_cache", "paged"])
def test_attention_kernel_matches_reference(h, g, lengths, store) -> None:
    torch.manual_seed(h * 100 + g)
    d, b = 64 if h == 16 else 8, len(lengths)
    qkv = torch.randn(b, (h + 2 * g) * d)
    cos, sin = Rotary(d, 10000.0).rolled_table(max(lengths) + 1, torch.device("cpu"), torch.float32)
    hist_k = [torch.randn(g, n, d) for n in lengths]
    hist_v = [torch.randn(g, n, d) for n in lengths]
    lens = torch.tensor(lengths)
    if store == "kv_cache":
        cache = KVCache(1, b, g, d, max(lengths) + 3, torch.float32, "cpu")
        for r, n in enumerate(lengths):
            cache.k[0][r, :, :n], cache.v[0][r, :, :n] = hist_k[r], hist_v[r]
        cache.lengths_list, cache.lengths = list(lengths), lens
        lay = cache.kv_layout()
    else:
        bs = 4
        pool = PagedKVPool(1, 400, bs, g, d, torch.float32, "cpu")
        order = torch.randperm(400).tolist()  # blocks scattered over the pool
        tables = [[order.pop() for _ in range(n // bs + 1)] for n in lengths]
        for r, n in enumerate(lengths):
            for p in range(n):
                slot = tables[r][p // bs] * bs + p % bs
                pool.k[0][slot], pool.v[0][slot] = hist_k[r][:, p], hist_v[r][:, p]
        lay = pool.view(tables, list(lengths), [1] * b, 1).kv_layout()
    got = cpu_kernels.attn_decode(qkv, h, g, d, cos, sin, lens, lay.tables, lay.block_size, lay.slot_stride,
                                  lay.head_stride, lay.k[0], lay.v[0])
    ref, new_k = _reference(qkv, h, g, d, cos, sin, lens, hist_k, hist_v)
    assert (got - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())
    for r, p in enumerate(lengths):  # the new key (rotated) and value went where the cache keeps position p
        slot = int(lay.tables[r, p // lay.block_size]) * lay.block_size + p % lay.block_size
        idx = torch.tensor([slot * lay.slot_stride + j * lay.head_stride + i for j in range(g) for i in range(d)])
        k_at, v_at = lay.k[0].view(-1)[idx].view(g, d), lay.v[0].view(-1)[idx].view(g, d)
        assert torch.equal(k_at, new_k[r])
        assert torch.equal(v_at, qkv[r].view(g, h // g + 2, d)[:, -1])


def ragged_prefill_then_greedy(model, ids: torch.Tensor, lengths: list[int], steps: int,
                               capacity: int) -> list[torch.Tensor]:
    """Last-token logits of a right-padded prefill of `ids` ([B, T], row b has lengths[b] tokens), then of `steps`
    greedy one-token decode steps."""
    cache = model.new_cache(ids.shape[0], capacity)
    with torch.inference_mode():
        out = [model(ids, cache, input_lengths=lengths, last_only=True)]
        for _ in range(steps):
            out.append(model(out[-1].argmax(-1)[:, None], cache, last_only=True))
    return out


@pytest.fixture
def count_kernel_calls(monkeypatch):
    calls = {"attn": 0, "gelu": 0}
    attn, gelu = cpu_kernels.attn_decode, cpu_kernels.gelu_

    def counted_attn(*a, **k):
        calls["attn"] += 1
        return attn(*a, **k)

    def counted_gelu(*a, **k):
        calls["gelu"] += 1
        return gelu(*a, **k)

    monkeypatch.setattr(cpu_kernels, "attn_decode", counted_attn)
    monkeypatch.setattr(cpu_kernels, "gelu_", counted_gelu)
    return calls


@pytest.mark.parametrize("layout", ["7b-multi-query", "40b-grouped", "11b-one-norm"])
def test_model_decode_with_kernels_equals_reference(layout, count_kernel_calls, monkeypatch) -> None:
    model = gyrfalcon_from_hf(layout)
    torch.manual_seed(1)
    ids = torch.randint(3, 131, (3, 11))

    def run() -> list[torch.Tensor]:
        return ragged_prefill_then_greedy(model, ids, [7, 3, 11], steps=6, capacity=8)  # the cache grows

    got = run()
    assert count_kernel_calls["attn"] == 6 * model.config.num_layers
    assert count_kernel_calls["gelu"] >= 6 * model.config.num_layers
    monkeypatch.setattr(fast_decode, "ENABLED", False)
    ref = run()
    assert count_kernel_calls["attn"] == 6 * model.config.num_layers  # the reference run did not call it
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-4


def test_generation_through_the_paged_pool_equals_reference(count_kernel_calls, monkeypatch) -> None:
    model = gyrfalcon_from_hf("40b-grouped")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)

    def run() -> list[list[int]]:
        gen = Generation(model, prompts, params)
        for _ in gen:
            pass
        return [s.tokens for s in gen.sequences]

    got = run()
    assert count_kernel_calls["attn"] > 0
    monkeypatch.setattr(fast_decode, "ENABLED", False)
    assert run() == got


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
@pytest.mark.parametrize("layout", ["7b-multi-query", "40b-grouped", "11b-one-norm"])
def test_parallel_layer_in_two_kernel_calls_equals_the_general_path(layout, quantize, monkeypatch) -> None:
    """A parallel layer's decode step through linear_pair / linear_sum (fp32 or quantized linears): bit for bit the
    layer's general path (the same kernels, the additions in the same order), and the fused calls did run."""
    from gyrfalcon.models import falcon
    from gyrfalcon.quant import quantize_model

    model = gyrfalcon_from_hf(layout)
    if quantize:
        quantize_model(model, quantize)
    calls = {"pair": 0, "sum": 0}
    pair, summed = falcon._linear_pair, falcon._linear_sum

    def counted_pair(*a):
        out = pair(*a)
        calls["pair"] += out is not None
        return out

    def counted_sum(*a):
        out = summed(*a)
        calls["sum"] += out is not None
        return out

    monkeypatch.setattr(falcon, "_linear_pair", counted_pair)
    monkeypatch.setattr(falcon, "_linear_sum", counted_sum)
    torch.manual_seed(2)
    ids = torch.randint(3, 131, (2, 9))

    def run() -> list[torch.Tensor]:
        return ragged_prefill_then_greedy(model, ids, [5, 9], steps=5, capacity=16)

    got = run()
    layers = model.config.num_layers
    assert calls["sum"] == 5 * layers
    assert calls["pair"] == (0 if model.transformer.h[0].two_norms else 5 * layers)
    monkeypatch.setattr(fast_linear, "PAIRS", False)
    ref = run()
    assert calls["sum"] == 5 * layers
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_a_hooked_attention_or_mlp_keeps_the_general_path() -> None:
    model = gyrfalcon_from_hf("7b-multi-query")
    seen = []
    model.transformer.h[0].self_attention.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    ragged_prefill_then_greedy(model, torch.randint(3, 131, (2, 5)), [5, 4], steps=2, capacity=8)
    assert len(seen) == 3  # the prefill and both decode steps ran the hooked module
