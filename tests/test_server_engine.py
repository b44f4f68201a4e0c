"""The serving engine against `Generation` (what llm.generate runs): a tight paged pool that forces preemption,
a small token budget that chunks every prompt, sequences arriving mid-flight: the tokens must not change."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon.config import from_hf
from gyrfalcon.models import build_model
from gyrfalcon.runtime.engine import Engine, EngineConfig
from gyrfalcon.runtime.generate import Generation
from gyrfalcon.runtime.kv_pool import PagedKVPool
from gyrfalcon.runtime.sampling import SamplingParams

from .conftest import gyrfalcon_from_hf

PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34, 35, 36], [40] * 25,
           [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]]  # the last: 2 samples, sharing 2 blocks of its prompt
PARAMS = [
    SamplingParams(max_new_tokens=14, ignore_eos=True),
    SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True),
    SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=11, ignore_eos=True),
    SamplingParams(max_new_tokens=12, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=1.2, seed=3, num_return_sequences=2, ignore_eos=True),
]


def falcon(layout: str):
    return gyrfalcon_from_hf(layout)


def alone(model, prompt, params) -> list[list[int]]:
    g = Generation(model, [prompt], params)
    for _ in g:
        pass
    return [s.tokens for s in g.sequences]


def run_engine(model, config: EngineConfig, arrivals: dict[int, list[int]]) -> tuple[dict[int, list[int]], Engine]:
    """arrivals: step number -> indexes into PROMPTS/PARAMS added before that step."""
    engine = Engine(model, [2], config)
    states = {}
    step = 0
    while step == 0 or engine.has_unfinished() or any(k >= step for k in arrivals):
        for i in arrivals.get(step, []):
            p = PARAMS[i]
            for j in range(p.num_return_sequences):
                sid = 100 * i + j
                states[sid] = engine.add(sid, PROMPTS[i], p, None if p.seed is None else p.seed + j,
                                         same_prompt_as=100 * i if j else None)
        engine.step()
        step += 1
        assert step < 2000
    return {sid: s.tokens for sid, s in states.items()}, engine


@pytest.mark.parametrize("layout", ["7b-multi-query", "40b-grouped", "rw-alibi"])
def test_preempted_chunked_continuous_batching_equals_alone(layout):
    model = falcon(layout)
    expected = {100 * i + j: toks for i in range(len(PROMPTS)) for j, toks in
                enumerate(alone(model, PROMPTS[i], PARAMS[i]))}
    # 12 blocks of 4 slots (48 tokens) for six sequences that end at 16..37 tokens each; 8 tokens a step.
    config = EngineConfig(num_blocks=12, block_size=4, max_batch_size=4, max_batch_tokens=8, watermark_blocks=0)
    got, engine = run_engine(model, config, {0: [0, 1, 2], 3: [3], 7: [4]})
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small to hold everyone"
    assert got == expected
    assert engine.blocks_used == 0


def test_engine_roomy_pool_equals_alone():
    model = falcon("7b-multi-query")
    expected = {100 * i + j: toks for i in range(len(PROMPTS)) for j, toks in
                enumerate(alone(model, PROMPTS[i], PARAMS[i]))}
    got, engine = run_engine(model, EngineConfig(num_blocks=200, block_size=16, max_batch_size=16,
                                                 max_batch_tokens=64), {0: [0, 1, 2, 3, 4]})
    assert got == expected and engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("slack", [0, 5])
def test_prefill_in_several_passes_equals_alone(slack, monkeypatch):
    """Prefill rows of different widths run as several passes (engine.prefill_groups); tokens stay the same."""
    from gyrfalcon.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_PAD_SLACK", slack)
    model = falcon("7b-multi-query")
    expected = {100 * i + j: toks for i in range(len(PROMPTS)) for j, toks in
                enumerate(alone(model, PROMPTS[i], PARAMS[i]))}
    got, _ = run_engine(model, EngineConfig(num_blocks=200, block_size=16, max_batch_size=16, max_batch_tokens=64),
                        {0: [0, 1, 2, 3, 4]})
    assert got == expected


def test_prefill_groups_pad_each_row_by_at_most_the_slack(monkeypatch):
    from gyrfalcon.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_PAD_SLACK", 32)
    rows = [(f"s{n}", n) for n in (7, 480, 470, 30, 449, 40, 2)]
    groups = engine_mod.prefill_groups(rows)
    assert [[n for _, n in g] for g in groups] == [[480, 470, 449], [40, 30], [7, 2]]
    assert sorted(r for g in groups for r in g) == sorted(rows)
    assert engine_mod.prefill_groups([]) == []


def test_falcon_mamba_state_slots_equal_alone():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4,
        use_conv_bias=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name != "lm_head.weight":
                p.add_(0.3 * torch.randn_like(p))
    model = build_model(from_hf(hf.config.to_dict()), device="cpu")
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [40] * 25]
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, ignore_eos=True),
              SamplingParams(max_new_tokens=6, ignore_eos=True)]
    expected = [alone(model, p, q)[0] for p, q in zip(prompts, params, strict=True)]
    # Two state slots for three sequences, 8 tokens a step: chunked prefill and a queue.
    engine = Engine(model, [0], EngineConfig(num_blocks=2, max_batch_size=2, max_batch_tokens=8))
    states = [engine.add(i, p, q, q.seed) for i, (p, q) in enumerate(zip(prompts, params, strict=True))]
    for _ in range(500):
        if not engine.has_unfinished():
            break
        engine.step()
    assert [s.tokens for s in states] == expected
    assert engine.blocks_used == 0


def test_paged_view_returns_what_a_kv_cache_holds():
    torch.manual_seed(0)
    g, d, bs = 2, 8, 4
    pool = PagedKVPool(1, 10, bs, g, d, torch.float32, "cpu")
    tables = [[7, 2, 5], [0]]
    starts, counts, width = [5, 1], [3, 2], 3
    history = [torch.randn(g, 5, d), torch.randn(g, 1, d)]
    for table, hist in zip(tables, history, strict=True):  # what earlier steps wrote
        for p in range(hist.shape[1]):
            pool.k[0][table[p // bs] * bs + p % bs] = hist[:, p]
            pool.v[0][table[p // bs] * bs + p % bs] = -hist[:, p]
    new = torch.randn(2, g, width, d)
    view = pool.view(tables, starts, counts, width)
    k, v = view.write(0, new, -new)
    assert k.shape == (2, g, 8, d)
    assert torch.equal(k[0, :, :5], history[0]) and torch.equal(k[0, :, 5:8], new[0])
    assert torch.equal(k[1, :, :1], history[1]) and torch.equal(k[1, :, 1:3], new[1, :, :2])
    assert torch.equal(k[1, :, 3:], torch.zeros(g, 5, d)), "past a row's end: the zero block"
    assert torch.equal(v, -k)


def test_quantized_model_through_the_engine(falcon_dir):
    import gyrfalcon

    try:
        llm = gyrfalcon.load(falcon_dir, quantize="int8")
    except TypeError:
        pytest.skip("this gyrfalcon.load has no quantize=")
    prompt = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = alone(llm.model, prompt, params)[0]
    engine = Engine(llm.model, llm.eos_token_ids, EngineConfig(num_blocks=8, block_size=4, max_batch_size=2,
                                                               max_batch_tokens=4))
    state = engine.add(0, prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert state.tokens == expected


def test_samples_share_the_prompt_cache():
    model = falcon("7b-multi-query")
    prompt = list(range(3, 40))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=2, num_return_sequences=3, ignore_eos=True)
    g = Generation(model, [prompt], params)
    steps = iter(g)
    assert [e.index for e in next(steps)] == [0]  # sample 0 prefills the prompt ...
    assert [e.index for e in next(steps)] == [0, 1, 2]  # ... the others borrow its 2 full blocks, compute 5 tokens
    tables = g.engine.blocks.tables
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    for _ in steps:
        pass
    separate = [alone(model, prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=2 + j,
                                                    ignore_eos=True))[0] for j in range(3)]
    assert [s.tokens for s in g.sequences] == separate
    assert g.engine.blocks_used == 0
