"""The public API on a random Falcon with the real tokenizer: generate, stream, stop strings, logits, errors."""

from __future__ import annotations

import pytest
import torch

import gyrfalcon
from gyrfalcon.runtime.sampling import ParamError


@pytest.fixture(scope="module")
def llm(falcon_dir):
    return gyrfalcon.load(falcon_dir)


def test_load_defaults_to_fp32_on_cpu(llm):
    assert llm.device.type == "cpu" and llm.dtype == torch.float32
    assert llm.config.num_kv_heads == 1 and llm.tokenizer.eos_token_id == 11


def test_generate_text_is_the_decoded_tokens(llm):
    (c,) = llm.generate("Hello world", max_new_tokens=12, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.token_ids) == 12
    assert c.text == llm.tokenizer.decode(c.token_ids)
    assert c.prompt_tokens == 2


def test_stream_concatenates_to_generate(llm):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    events = list(llm.stream("The quick brown fox", **kw))
    (c,) = llm.generate("The quick brown fox", **kw)
    assert "".join(e.text for e in events) == c.text
    assert [e.token_id for e in events] == c.token_ids
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert all("\ufffd" not in e.text for e in events[:-1]) or "\ufffd" in c.text


def test_stop_string_cuts_the_text_and_is_never_streamed(llm):
    (full,) = llm.generate("Once upon a time", max_new_tokens=24, ignore_eos=True)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    expected = text[: text.find(stop)]
    events = list(llm.stream("Once upon a time", max_new_tokens=24, ignore_eos=True, stop=[stop]))
    streamed = "".join(e.text for e in events)
    assert streamed == expected
    assert events[-1].finish_reason == "stop"
    (cut,) = llm.generate("Once upon a time", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.text == expected and cut.finish_reason == "stop"


def test_batch_and_num_return_sequences(llm):
    outs = llm.generate(["a", "b c d"], max_new_tokens=6, temperature=1.0, seed=1, num_return_sequences=2,
                        ignore_eos=True)
    assert [c.prompt_index for c in outs] == [0, 0, 1, 1]
    alone = llm.generate("b c d", max_new_tokens=6, temperature=1.0, seed=1, num_return_sequences=2,
                         ignore_eos=True)
    assert [c.token_ids for c in outs[2:]] == [c.token_ids for c in alone]


def test_token_id_prompts_and_logits(llm):
    ids = llm.tokenizer.encode("Hello world")
    by_text = llm.generate("Hello world", max_new_tokens=4)[0].token_ids
    assert llm.generate(ids, max_new_tokens=4)[0].token_ids == by_text
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), 65024) and logits.dtype == torch.float32
    nxt = llm.generate(ids, max_new_tokens=1, ignore_eos=True)[0].token_ids[0]
    assert nxt == int(logits[-1].argmax())


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(top_k=1.5), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"),
])
def test_bad_parameters_name_the_field(llm, kwargs, field):
    with pytest.raises(ParamError, match=field):
        llm.generate("hi", **kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 70000]])
    with pytest.raises(ValueError, match="context"):
        llm.generate("hi", max_new_tokens=5000)


def test_repetition_penalty_demotes_seen_tokens():
    from gyrfalcon.runtime.sampling import SamplingParams, choose_token

    logits = torch.tensor([3.0, 2.0, -1.0, -0.5])
    seen = torch.tensor([True, False, False, True])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert choose_token(logits, SamplingParams(), seen, None) == 0
    assert choose_token(logits, greedy, seen, None) == 1  # 3.0 / 2 < 2.0
    # a seen negative logit is pushed further down (multiplied), an unseen one is untouched
    neg = torch.tensor([-1.0, -1.5])
    assert choose_token(neg, greedy, torch.tensor([True, False]), None) == 1


def test_top_k_one_is_greedy(llm):
    g = llm.generate("Hello", max_new_tokens=8, ignore_eos=True)[0].token_ids
    s = llm.generate("Hello", max_new_tokens=8, ignore_eos=True, temperature=1.5, top_k=1, seed=5)[0].token_ids
    assert g == s


def test_falcon_mamba_loads_and_generates_like_transformers(tmp_path):
    import shutil

    from .conftest import SHARED_DATA

    transformers = pytest.importorskip("transformers")
    tok = SHARED_DATA / "falcon_tokenizer"
    if not tok.is_dir():
        pytest.skip("shared tokenizer absent")
    config = transformers.FalconMambaConfig(vocab_size=65024, hidden_size=32, num_hidden_layers=2, state_size=8,
                                            eos_token_id=11, bos_token_id=11, pad_token_id=11)
    torch.manual_seed(0)
    hf = transformers.FalconMambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    for f in tok.glob("*.json"):
        shutil.copy(f, tmp_path)
    llm = gyrfalcon.load(tmp_path)
    assert llm.config.model_type == "falcon_mamba"
    ids = llm.tokenizer.encode("The state space")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
        ref_logits = hf(torch.tensor([ids])).logits[0]
    assert llm.generate(ids, max_new_tokens=16, ignore_eos=True)[0].token_ids == ref
    assert (llm.logits(ids) - ref_logits).abs().max().item() < 1e-4
