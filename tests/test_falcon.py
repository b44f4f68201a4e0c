"""Our Falcon equals transformers' for every layout; cached and batched decoding equal the plain forward."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon.config import from_hf
from gyrfalcon.models import build_model
from gyrfalcon.runtime.generate import Generation, greedy_tokens
from gyrfalcon.runtime.sampling import SamplingParams

from .conftest import FALCON_LAYOUTS, hf_falcon

LOGIT_ATOL = 1e-4  # fp32, max abs difference against transformers


def ours_from(hf_model, raw: dict):
    model = build_model(from_hf(raw), device="cpu")
    state = {k: v for k, v in hf_model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    else:
        model.load_state_dict(state, strict=True)
        missing = set()
    assert not missing
    return model.eval()


@pytest.fixture(params=list(FALCON_LAYOUTS))
def pair(request):
    hf, raw = hf_falcon(request.param)
    return request.param, hf, ours_from(hf, raw)


def test_logits_match_transformers(pair):
    layout, hf, ours = pair
    ids = torch.randint(0, 131, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max().item() < LOGIT_ATOL, layout


def test_greedy_tokens_match_transformers(pair):
    layout, hf, ours = pair
    prompt = [5, 17, 42, 9, 77]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ref) == 32
    assert greedy_tokens(ours, prompt, 32) == ref, layout


def test_cached_decode_equals_full_forward(pair):
    layout, _, ours = pair
    ids = torch.randint(0, 131, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(3, 4)  # small on purpose: the cache must grow
        steps = [ours(ids[:, :7], cache)]
        for t in range(7, 20):
            steps.append(ours(ids[:, t : t + 1], cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5), layout
    assert cache.lengths_list == [20, 20, 20]


def test_ragged_batch_equals_one_at_a_time(pair):
    layout, _, ours = pair
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    params = SamplingParams(max_new_tokens=12)
    batched = Generation(ours, prompts, params)
    for _ in batched:
        pass
    for i, p in enumerate(prompts):
        assert batched.sequences[i].tokens == greedy_tokens(ours, p, 12), (layout, i)


def test_right_padded_prefill_matches_unpadded():
    hf, raw = hf_falcon("7b-multi-query")
    ours = ours_from(hf, raw)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    padded = torch.tensor([a, b + [0, 0, 0]])
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        last = ours(padded, cache, input_lengths=[6, 3], last_only=True)
        ref_a = ours(torch.tensor([a]))[0, -1]
        ref_b = ours(torch.tensor([b]))[0, -1]
        # the next step continues each row from its own length
        nxt = ours(torch.tensor([[11], [12]]), cache, last_only=True)
        ref_b2 = ours(torch.tensor([b + [12]]))[0, -1]
    assert torch.allclose(last[0], ref_a, atol=1e-5) and torch.allclose(last[1], ref_b, atol=1e-5)
    assert torch.allclose(nxt[1], ref_b2, atol=1e-5)
    assert cache.lengths_list == [7, 4]


def test_sampling_is_seeded_and_batch_independent():
    hf, raw = hf_falcon("40b-grouped")
    ours = ours_from(hf, raw)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=1234)

    def run(prompts):
        g = Generation(ours, prompts, params)
        for _ in g:
            pass
        return [s.tokens for s in g.sequences]

    alone = run([[5, 6, 7]])[0]
    assert run([[5, 6, 7]])[0] == alone  # reproducible
    assert run([[9, 9, 9, 9, 9], [5, 6, 7]])[1] == alone  # unaffected by a neighbour
    other_seed = Generation(ours, [[5, 6, 7]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=99))
    for _ in other_seed:
        pass
    assert other_seed.sequences[0].tokens != alone


def test_num_return_sequences_and_eos():
    hf, raw = hf_falcon("7b-multi-query")
    ours = ours_from(hf, raw)
    greedy = greedy_tokens(ours, [5, 6], 8)
    eos = greedy[3]
    g = Generation(ours, [[5, 6]], SamplingParams(max_new_tokens=8, num_return_sequences=3), eos_token_ids=[eos])
    for _ in g:
        pass
    assert len(g.sequences) == 3
    first = greedy.index(eos)
    for s in g.sequences:
        assert s.tokens == greedy[: first + 1] and s.finish_reason == "eos"
    ignore = Generation(ours, [[5, 6]], SamplingParams(max_new_tokens=8, ignore_eos=True), eos_token_ids=[eos])
    for _ in ignore:
        pass
    assert ignore.sequences[0].tokens == greedy and ignore.sequences[0].finish_reason == "length"


def test_context_overflow_is_a_clear_error():
    hf, raw = hf_falcon("7b-multi-query")
    ours = ours_from(hf, raw)
    with pytest.raises(ValueError, match="context"):
        Generation(ours, [[1] * 10], SamplingParams(max_new_tokens=10), max_context=15)


def test_rolled_rotary_equals_the_reference_form_bit_for_bit():
    from gyrfalcon.models.layers import Rotary, apply_rotary, apply_rotary_rolled

    rot = Rotary(64, 10000.0)
    cos, sin = rot.table(40, torch.device("cpu"), torch.float32)
    cos_r, sin_signed = rot.rolled_table(40, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 40, 5, 64)  # [B, T, heads, d]
    c, s, ss = cos[:40, None], sin[:40, None], sin_signed[:40, None]
    assert torch.equal(cos_r, cos)
    assert torch.equal(apply_rotary_rolled(x, c, ss), apply_rotary(x, c, s))
