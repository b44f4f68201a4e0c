"""The batched token choice (`choose_tokens`, what the engine runs) equals the per-row reference (`choose_token`)
exactly: same tokens, same generator streams, for any mix of parameters in the batch."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon.kernels import cpu as cpu_kernels
from gyrfalcon.runtime import sampling
from gyrfalcon.runtime.sampling import SamplingParams, choose_token, choose_tokens, filter_top_k_top_p

V = 4096

MIXED = [
    SamplingParams(),  # greedy
    SamplingParams(repetition_penalty=1.3),  # greedy with a penalty
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=0.9, top_p=0.9),
    SamplingParams(temperature=1.2, top_k=50, top_p=0.8),
    SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2),
    SamplingParams(temperature=1.5, top_p=0.999),  # a wide nucleus: not settled by the candidates, sorted in full
    SamplingParams(temperature=0.3, top_p=0.01),  # the best token only
    SamplingParams(temperature=1.0, top_k=V + 5),  # top_k beyond the vocabulary: off
    SamplingParams(temperature=2.0, top_k=1),
]


def _logits(rows: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g) * 3
    if ties:
        x = (x * 2).round() / 2  # many equal logits, at the top too
    return x


def _seen(rows: int, params: list[SamplingParams], seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(V, generator=g) < 0.05 if p.repetition_penalty != 1.0 else None for p in params]


def _generators(params: list[SamplingParams], base: int) -> list[torch.Generator | None]:
    return [None if p.greedy else torch.Generator().manual_seed(base + r) for r, p in enumerate(params)]


@pytest.mark.parametrize("ties", [False, True])
def test_batched_choice_equals_per_row_for_mixed_parameters(ties):
    params = MIXED * 2
    gens_ref, gens_batch = _generators(params, 100), _generators(params, 100)
    for step in range(6):  # several draws: the generators must advance alike
        logits = _logits(len(params), step, ties)
        seen = _seen(len(params), params, step)
        ref = [choose_token(logits[r], p, seen[r], gens_ref[r]) for r, p in enumerate(params)]
        got = choose_tokens(logits, params, seen, gens_batch)
        assert got == ref, f"step {step}"
    for a, b in zip(gens_ref, gens_batch, strict=True):
        if a is not None:
            assert torch.equal(a.get_state(), b.get_state())


def test_batched_choice_does_not_depend_on_the_rest_of_the_batch():
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.9)
    logits = _logits(8, 3)
    alone = choose_tokens(logits[5:6], [p], [None], [torch.Generator().manual_seed(1)])
    others = [SamplingParams(temperature=1.5, top_p=0.999)] * 5 + [p] + [SamplingParams()] * 2
    gens = _generators(others, 50)
    gens[5] = torch.Generator().manual_seed(1)
    assert choose_tokens(logits, others, [None] * 8, gens)[5] == alone[0]


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("candidates", [2, 8, 64, V])
def test_top_p_drop_equals_the_sorted_reference(candidates, kernel, monkeypatch):
    """Unsettled rows go to the C radix sort (kernel) or torch.sort; either way the reference's mask, exactly."""
    monkeypatch.setattr(sampling, "USE_KERNEL", kernel)
    for seed in range(4):
        for ties in (False, True):
            logits = _logits(6, seed, ties) * (0.2 + seed)  # flat to peaked rows
            top_p = [0.05, 0.3, 0.6, 0.9, 0.97, 0.9999]
            drop = sampling._top_p_drop(logits, top_p, candidates)
            for r, p in enumerate(top_p):
                ref = filter_top_k_top_p(logits[r], 0, p) == float("-inf")
                assert torch.equal(drop[r], ref), (seed, ties, r, p)


def test_peaked_rows_need_no_full_sort(monkeypatch):
    """The point of the batched path: a nucleus inside the best candidates is found without sorting the
    vocabulary (and the reference does sort)."""
    calls = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: calls.append(1) or real_sort(*a, **k))
    logits = _logits(4, 0) * 4
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 4
    choose_tokens(logits, params, [None] * 4, _generators(params, 0))
    assert calls == []
    choose_token(logits[0], params[0], None, torch.Generator().manual_seed(0))
    assert calls == [1]


def test_choose_tokens_checks_lengths():
    with pytest.raises(ValueError, match="rows of logits"):
        choose_tokens(torch.zeros(2, 4), [SamplingParams()], [None], [None])


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels are not built")


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 7, 100, 65024])
def test_top_p_kernel_equals_the_reference_mask_bit_for_bit(vocab):
    """sampling_cpu.c against filter_top_k_top_p: flat to peaked rows, many ties, +0.0 next to -0.0 (equal for
    torch's sort), -inf entries (after top-k), top_p from tiny to nearly 1. Tolerance: none, the masks are equal."""
    g = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        x = torch.randn(4, vocab, generator=g) * [0.01, 0.3, 2.0, 8.0][trial % 4]
        if trial % 3 == 0:
            x = (x * 4).round() / 4
        if trial % 4 == 1 and vocab > 3:
            x[:, : vocab // 3] = float("-inf")
        if trial % 5 == 0:
            x[0, ::3] = 0.0
            x[0, 1::3] = -0.0
        probs = x.softmax(-1)
        top_p = [0.01, 0.5, 0.95, 0.9999]
        drop = cpu_kernels.top_p_drop(x, probs, top_p)
        for r, p in enumerate(top_p):
            ref = filter_top_k_top_p(x[r], 0, p)
            assert torch.equal(x[r].masked_fill(drop[r], float("-inf")), ref), (trial, r, p)


@needs_kernels
def test_top_p_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="top_p_drop"):
        cpu_kernels.top_p_drop(torch.zeros(2, 4), torch.zeros(2, 5), [0.5, 0.5])
    with pytest.raises(ValueError, match="top_p_drop"):
        cpu_kernels.top_p_drop(torch.zeros(2, 4), torch.zeros(2, 4), [0.5])


@pytest.mark.parametrize("vocab", [7, 65024])  # the Falcon vocabulary, where torch's kernels vectorize and split
def test_batched_draw_equals_draw_one(vocab):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, vocab, generator=g) ** 4
    probs[1, : vocab // 2] = 0  # rows with zero mass in places, as after top-p
    probs = probs / probs.sum(-1, keepdim=True)
    ref_gens = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    for _ in range(3):
        ref = [sampling.draw_one(probs[i], ref_gens[i]) for i in range(5)]
        assert sampling._draw(probs, gens) == ref


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    """20,000 seeded draws from a 6-token distribution with two zero entries: no zero-mass token, and every
    frequency within 5 standard deviations of its probability (a fixed seed: the test is deterministic)."""
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125])
    gen = torch.Generator().manual_seed(7)
    n = 20_000
    counts = torch.zeros(6)
    for _ in range(n // 100):
        for t in sampling._draw(probs.expand(100, 6).contiguous(), [gen] * 100):
            counts[t] += 1
    assert counts[1] == 0 and counts[4] == 0
    freq = counts / n
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sd + 1e-12).all(), freq


def test_draw_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="non-negative"):
        sampling.draw_one(torch.tensor([0.5, -0.1, 0.6]), None)
    with pytest.raises(ValueError, match="sum to zero"):
        sampling._draw(torch.zeros(2, 3), [None, None])
