"""The loglikelihood engine against a brute-force reference (one plain forward per request), on every Falcon layout
and Falcon-Mamba: shared prefixes, forked caches, batching, time slices and left truncation change the work, never
the numbers. Plus lm-eval's tokenization conventions for (context, continuation) pairs."""

from __future__ import annotations

import random

import pytest
import torch

from gyrfalcon.config import from_hf
from gyrfalcon.eval.scoring import MIN_SHARED_PREFIX, Request, Scorer, encode_pair, encode_pairs
from gyrfalcon.models import build_model

from .conftest import FALCON_LAYOUTS, hf_falcon
from .test_falcon import ours_from

ATOL = 1e-4  # nats, on sums of a few log-probabilities (fp32)


def reference(model, req: Request, max_length: int) -> tuple[float, bool]:
    """lm-eval's HFLM arithmetic: (ctx + cont)[-(max_length + 1):][:-1] in one forward, log_softmax, gather."""
    whole = list(req.context) + list(req.continuation)
    inp = whole[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = model(torch.tensor([inp]))[0].float().log_softmax(-1)[-len(req.continuation):]
    cont = torch.tensor(req.continuation)
    return float(logp.gather(-1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all())


def greedy_continuation(model, ctx: list[int], n: int) -> tuple[int, ...]:
    out, ids = [], list(ctx)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
    return tuple(out)


def make_requests(model, vocab: int, seed: int = 0) -> list[Request]:
    """A mix: a group of contexts behind a long shared prefix (plus one-token continuations, as MMLU), ungrouped
    contexts with several continuations each (as ARC), some continuations the model's own greedy tokens (so that
    is_greedy is sometimes True), a long continuation and an exact duplicate."""
    rnd = random.Random(seed)

    def toks(n):
        return tuple(rnd.randrange(1, vocab) for _ in range(n))

    shared = toks(MIN_SHARED_PREFIX + 9)
    reqs = []
    for i in range(4):  # group "g": shared prefix + own question, 1-3 token answers
        ctx = shared + toks(3 + 2 * i)
        for _ in range(3):
            reqs.append(Request(ctx, toks(1 + i % 3), group="g"))
    for i in range(4):  # ungrouped items: own context, four choices of different lengths
        ctx = toks(4 + 3 * i)
        for j in range(4):
            reqs.append(Request(ctx, toks(1 + (i + j) % 5)))
        reqs.append(Request(ctx, greedy_continuation(model, list(ctx), 3)))
    reqs.append(Request(toks(7), toks(23)))  # long: time-sliced with a small logit budget
    reqs.append(reqs[3])
    reqs.append(Request(shared[:5], toks(2), group="lonely"))  # a group of one context: joins the ungrouped
    return reqs


def check(model, reqs, max_length=2048, **kw):
    scorer = Scorer(model, None, max_length=max_length, **kw)
    got = scorer.loglikelihood_tokens(reqs)
    want = [reference(model, r, max_length) for r in reqs]
    for i, ((lp, g), (lp_ref, g_ref)) in enumerate(zip(got, want, strict=True)):
        assert abs(lp - lp_ref) < ATOL, (i, lp, lp_ref)
        assert g == g_ref, (i, reqs[i])
    return scorer, got, want


@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_layouts_equal_one_plain_forward(layout):
    hf, raw = hf_falcon(layout)
    model = ours_from(hf, raw)
    reqs = make_requests(model, raw["vocab_size"])
    scorer, got, want = check(model, reqs, batch_size=3, logit_budget=8)
    plan = scorer.plan(reqs)
    assert len(plan.groups[0].prefix) >= MIN_SHARED_PREFIX  # the group's prefix is shared
    assert any(g for _, g in want), "some continuations should be greedy"


def test_batching_does_not_change_the_numbers():
    hf, raw = hf_falcon("7b-multi-query")
    model = ours_from(hf, raw)
    reqs = make_requests(model, raw["vocab_size"], seed=3)
    a = Scorer(model, None, batch_size=1, logit_budget=1).loglikelihood_tokens(reqs)
    b = Scorer(model, None, batch_size=64, logit_budget=4096).loglikelihood_tokens(reqs)
    assert [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True)) < ATOL


def test_left_truncation_as_lm_eval():
    hf, raw = hf_falcon("40b-grouped")
    model = ours_from(hf, raw)
    rnd = random.Random(5)
    ctx = tuple(rnd.randrange(1, 131) for _ in range(40))
    reqs = [Request(ctx, (5, 6, 7)), Request(ctx, (9,)), Request(ctx[:10], (3, 4))]
    check(model, reqs, max_length=16, batch_size=2)
    with pytest.raises(ValueError, match="exceeds max_length"):
        Scorer(model, None, max_length=4).loglikelihood_tokens([Request(ctx, tuple(range(1, 6)))])


def test_falcon_mamba():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                         conv_kernel=4, time_step_rank=4, use_conv_bias=True,
                                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    hf = transformers.FalconMambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = build_model(from_hf(hf.config.to_dict()), device="cpu")
    model.load_state_dict(hf.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    check(model, make_requests(model, 97, seed=1), batch_size=4, logit_budget=8)


# ------------------------------------------------------------------------------------------------------------------
# lm-eval's (context, continuation) tokenization


@pytest.fixture(scope="module")
def tokenizer(falcon_dir):
    from gyrfalcon.tokenizer import Tokenizer

    return Tokenizer.from_dir(falcon_dir)


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: 2+2?\nAnswer: ", "4", 11)
    assert ctx == tokenizer.encode("Question: 2+2?\nAnswer:")
    assert ctx + cont == tokenizer.encode("Question: 2+2?\nAnswer: 4")
    # the continuation is cut from the joint encoding, not encoded alone
    ctx, cont = encode_pair(tokenizer, "The cat sa", "t on the mat", 11)
    whole = tokenizer.encode("The cat sat on the mat")
    assert ctx == tokenizer.encode("The cat sa") and cont == whole[len(ctx):]
    # ... so a continuation that merges into the context's last token leaves nothing to score (lm-eval asserts)
    with pytest.raises(ValueError, match="no tokens to score"):
        encode_pair(tokenizer, "Hello wor", "ld", 11)


def test_empty_context_is_the_prefix_token(tokenizer):
    ctx, cont = encode_pair(tokenizer, "", "Hello world", 11)
    assert ctx == [11] and cont == tokenizer.encode("Hello world")
    ctx, cont = encode_pair(tokenizer, "", "<|endoftext|>Hello", 11)
    assert ctx == [11] and cont == tokenizer.encode("Hello")


def test_encode_pairs_errors(tokenizer):
    with pytest.raises(ValueError, match="only of whitespace"):
        encode_pairs(tokenizer, [("   ", "x")], 11)
    with pytest.raises(ValueError, match="no tokens"):
        encode_pairs(tokenizer, [("abc", "")], 11)
    with pytest.raises(TypeError):
        encode_pairs(tokenizer, [("abc", 3)], 11)
