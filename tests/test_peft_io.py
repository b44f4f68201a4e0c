"""Adapters in PEFT's format, both ways: peft loads what we write onto transformers' models with our logits, we load
what peft writes with its logits; `gyrfalcon.load(adapter=)`, `gyrfalcon merge`, `--adapter`; bad adapter dirs."""

from __future__ import annotations

import json

import pytest
import torch

from gyrfalcon.api import DEFAULT_MODEL
from gyrfalcon.cli import main
from gyrfalcon.finetune import (
    AdapterError,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    save_adapter,
)
from gyrfalcon.finetune.peft_io import CONFIG_NAME, WEIGHTS_NAME

from .conftest import hf_falcon
from .test_lora import ids, ours_falcon, randomize_b

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PEFT_ATOL = 1e-4  # fp32 logits, ours against transformers + peft (the bound)
FALCON_ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def peft_model(hf, targets, r=4, alpha=8, seed=7, **kw):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **kw)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


@pytest.mark.parametrize("layout", ["7b-multi-query", "40b-grouped", "rw-alibi"])
def test_peft_loads_our_adapter_with_our_logits(layout, tmp_path):
    ours = ours_falcon(layout)
    x = ids(131)
    with torch.no_grad():
        base_logits = ours(x)
    apply_lora(ours, LoraConfig(r=4, alpha=8))
    randomize_b(ours)
    save_adapter(ours, None, tmp_path)  # no base name: peft would try to fetch its config from the hub
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(FALCON_ALL)

    hf, _ = hf_falcon(layout)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    # every tensor we wrote landed in peft's model (peft only warns about keys it cannot place)
    from peft.utils import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(pm)
    assert set(theirs) == set(lora_state_dict(ours))
    for k, v in lora_state_dict(ours).items():
        assert torch.equal(theirs[k], v), k
    with torch.no_grad():
        ref = pm(x).logits
        got = ours(x)
    assert (got - base_logits).abs().max() > 0.1
    assert (got - ref).abs().max().item() < PEFT_ATOL


@pytest.mark.parametrize("layout", ["7b-multi-query", "11b-one-norm"])
def test_we_load_an_adapter_peft_wrote(layout, tmp_path):
    hf, _ = hf_falcon(layout)
    pm = peft_model(hf, FALCON_ALL, r=4, alpha=16)
    x = ids(131)
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(str(tmp_path))
    ours = load_adapter(ours_falcon(layout), tmp_path)
    assert len(list(lora_modules(ours))) == 4 * 2
    assert all(not p.requires_grad for p in ours.parameters())  # inference by default
    with torch.no_grad():
        got = ours(x)
    assert (got - ref).abs().max().item() < PEFT_ATOL
    # rsLoRA changes the scaling to alpha / sqrt(r): read from the config, not assumed
    hf2, _ = hf_falcon(layout)
    pm2 = peft_model(hf2, ["query_key_value"], r=4, alpha=16, use_rslora=True)
    pm2.save_pretrained(str(tmp_path / "rs"))
    with torch.no_grad():
        ref2 = pm2(x).logits
        got2 = load_adapter(ours_falcon(layout), tmp_path / "rs")(x)
    assert (got2 - ref2).abs().max().item() < PEFT_ATOL


def test_our_names_are_peft_names():
    hf, _ = hf_falcon("40b-grouped")
    pm = peft_model(hf, FALCON_ALL)
    from peft.utils import get_peft_model_state_dict

    ours = apply_lora(ours_falcon("40b-grouped"), LoraConfig(r=4))
    theirs = get_peft_model_state_dict(pm)
    mine = lora_state_dict(ours)
    assert set(mine) == set(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)


def _mamba_pair(seed: int = 0):
    from .test_lora import ours_mamba

    ours = ours_mamba(seed)
    torch.manual_seed(seed)
    cfg = transformers.FalconMambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                         conv_kernel=4, time_step_rank=4, use_conv_bias=True, use_bias=False)
    hf = transformers.FalconMambaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return ours, hf.eval()


def test_falcon_mamba_round_trip_with_peft(tmp_path):
    # peft refuses LoRA on a Mamba `out_proj` (its CUDA path reads that weight directly), so the round trip uses
    # the two input projections; our default targets add out_proj (documented in gyrfalcon/finetune/peft_io.py).
    ours, hf = _mamba_pair()
    x = ids(97)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < PEFT_ATOL
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=("in_proj", "x_proj")))
    randomize_b(ours)
    save_adapter(ours, None, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert (ours(x) - pm(x).logits).abs().max().item() < PEFT_ATOL

    ours2, hf2 = _mamba_pair()
    pm2 = peft_model(hf2, ["in_proj", "x_proj"], r=4, alpha=8, seed=11)
    pm2.save_pretrained(str(tmp_path / "theirs"))
    load_adapter(ours2, tmp_path / "theirs")
    with torch.no_grad():
        assert (ours2(x) - pm2(x).logits).abs().max().item() < PEFT_ATOL


def test_default_mamba_adapter_warns_that_peft_refuses_out_proj(tmp_path):
    from .test_lora import ours_mamba

    model = apply_lora(ours_mamba(), LoraConfig(r=2))
    with pytest.warns(UserWarning, match="out_proj"):
        save_adapter(model, None, tmp_path)
    # it still round-trips here
    randomize_b(model)
    save_adapter(model, None, tmp_path)
    again = load_adapter(ours_mamba(), tmp_path)
    x = ids(97)
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max().item() < PEFT_ATOL


def test_legacy_bin_adapter(tmp_path):
    hf, _ = hf_falcon("7b-multi-query")
    pm = peft_model(hf, ["dense_h_to_4h"])
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    x = ids(131)
    with torch.no_grad():
        assert (load_adapter(ours_falcon(), tmp_path)(x) - pm(x).logits).abs().max().item() < PEFT_ATOL


def test_resume_loads_into_existing_adapters(tmp_path):
    a = apply_lora(ours_falcon(), LoraConfig(r=4))
    randomize_b(a, seed=9)
    save_adapter(a, None, tmp_path, base_model_name="tiiuae/falcon-7b")
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model_name_or_path"] == "tiiuae/falcon-7b"
    b = apply_lora(ours_falcon(), LoraConfig(r=4))
    load_adapter(b, tmp_path, trainable=True)
    for k, v in lora_state_dict(a).items():
        assert torch.equal(lora_state_dict(b)[k], v)
    assert all(p.requires_grad for n, p in b.named_parameters() if ".lora_" in n)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = apply_lora(ours_falcon(), LoraConfig(r=4))
    save_adapter(model, None, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_b(model)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, None, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing new, no temporaries


# ---------------------------------------------------------------------------------------------------------------
# Bad adapters


def _write(d, config: dict | None = None, tensors: dict | None = None):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / CONFIG_NAME).write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / WEIGHTS_NAME))
    return d


GOOD = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["dense"],
        "bias": "none"}
KEY = "base_model.model.transformer.h.0.self_attention.dense"


@pytest.mark.parametrize("config, tensors, words", [
    (None, None, "has no adapter_config.json"),
    ("not json", None, "not valid JSON"),
    ({**GOOD, "peft_type": "IA3"}, None, "only LoRA adapters"),
    ({**GOOD, "use_dora": True}, None, "DoRA"),
    ({**GOOD, "rank_pattern": {"dense": 8}}, None, "rank_pattern"),
    ({**GOOD, "bias": "all"}, None, "bias"),
    ({**GOOD, "modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({**GOOD, "task_type": "SEQ_CLS"}, None, "CAUSAL_LM"),
    (GOOD, None, "no adapter_model.safetensors"),
    (GOOD, {f"{KEY}.lora_A.weight": torch.zeros(4, 64), f"{KEY}.lora_B.weight": torch.zeros(48, 4)},
     r"shape mismatches.*lora_A: adapter \[4, 64\] vs model \[4, 48\]"),
    (GOOD, {f"{KEY}.lora_A.weight": torch.zeros(4, 48)}, "only one of lora_A / lora_B"),
    (GOOD, {"base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight": torch.zeros(4, 48),
            "base_model.model.backbone.layers.0.mixer.in_proj.lora_B.weight": torch.zeros(96, 4)},
     "does not have: backbone.layers.0.mixer.in_proj"),
    (GOOD, {f"{KEY}.lora_magnitude_vector": torch.zeros(48)}, "DoRA magnitude vectors"),
    (GOOD, {"base_model.model.transformer.ln_f.lora_A.weight": torch.zeros(4, 48),
            "base_model.model.transformer.ln_f.lora_B.weight": torch.zeros(48, 4)}, "not Linear here"),
])
def test_bad_adapter_dirs_are_clear_errors(tmp_path, config, tensors, words):
    d = tmp_path / "adapter"
    d.mkdir()
    if config == "not json":
        (d / CONFIG_NAME).write_text("{oops")
    else:
        _write(d, config, tensors)
    model = ours_falcon()
    with pytest.raises(AdapterError, match=words):
        load_adapter(model, d)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # a failed load changes nothing


def test_missing_dir_and_file_instead_of_dir(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(ours_falcon(), tmp_path / "nope")
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(AdapterError, match="is not a directory"):
        load_adapter(ours_falcon(), f)
    _write(tmp_path / "bad", GOOD)
    (tmp_path / "bad" / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="cannot read the adapter weights"):
        load_adapter(ours_falcon(), tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------------------
# gyrfalcon.load(adapter=), merge, --adapter


@pytest.fixture(scope="module")
def bundled_adapter(tmp_path_factory):
    """A random non-zero adapter for the bundled tiny Shakespeare Falcon."""
    import gyrfalcon

    llm = gyrfalcon.load()
    apply_lora(llm.model, LoraConfig(r=4, alpha=8))
    randomize_b(llm.model, std=0.05)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(llm.model, None, out, base_model_name="tiny-falcon-shakespeare")
    prompt = llm.encode("ROMEO:\nWhat light")
    with torch.no_grad():
        ref = llm.model(torch.tensor([prompt]))[0]
    return out, prompt, ref


def test_load_with_adapter_merges_into_a_float_base(bundled_adapter):
    import gyrfalcon

    adapter, prompt, ref = bundled_adapter
    llm = gyrfalcon.load(adapter=adapter)
    assert not any(isinstance(m, LoraLinear) for m in llm.model.modules())
    assert (llm.logits(prompt) - ref).abs().max().item() < 1e-4
    q = gyrfalcon.load(adapter=adapter, quantize="nf4")  # over a quantized base the adapter stays separate
    assert isinstance(q.model.transformer.h[0].mlp.dense_h_to_4h, LoraLinear)


def test_cli_merge_then_generate_with_and_without_adapter(bundled_adapter, tmp_path, capsys):
    import gyrfalcon
    from gyrfalcon.quant import QuantLinear

    adapter, prompt, ref = bundled_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(DEFAULT_MODEL), str(adapter), str(out)]) == 0
    merged = gyrfalcon.load(out)  # no flags
    assert (merged.logits(prompt) - ref).abs().max().item() < 1e-4

    argv = ["generate", "ROMEO:", "-n", "12", "-t", "0", "--json", "--ignore-eos"]
    capsys.readouterr()
    assert main([*argv, "--adapter", str(adapter)]) == 0
    with_adapter = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*argv, "--model", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == with_adapter
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] != with_adapter  # the adapter changes the text

    qout = tmp_path / "merged-nf4"
    assert main(["merge", str(DEFAULT_MODEL), str(adapter), str(qout), "--quantize", "nf4"]) == 0
    q = gyrfalcon.load(qout)
    assert isinstance(q.model.transformer.h[0].mlp.dense_h_to_4h, QuantLinear)
    rel = (q.logits(prompt) - ref).abs().max() / ref.abs().max()
    assert rel < 0.35  # nf4 rounding of the merged weights (tests/test_quant.py's bound for nf4)


def test_cli_merge_into_a_quantized_checkpoint(bundled_adapter, tmp_path, capsys):
    import gyrfalcon
    from gyrfalcon.quant import QuantLinear

    adapter, prompt, _ = bundled_adapter
    qdir = tmp_path / "int8"
    assert main(["quantize", str(DEFAULT_MODEL), str(qdir), "--mode", "int8"]) == 0
    unmerged = gyrfalcon.load(qdir, adapter=adapter)  # adapter kept separate over the quantized base
    assert isinstance(unmerged.model.transformer.h[0].self_attention.dense, LoraLinear)
    out = tmp_path / "merged"
    assert main(["merge", str(qdir), str(adapter), str(out)]) == 0
    merged = gyrfalcon.load(out)
    assert isinstance(merged.model.transformer.h[0].self_attention.dense, QuantLinear)
    ref = unmerged.logits(prompt)
    # one more int8 rounding of the merged weights (per-row absmax: ~1/254 of a row's largest weight)
    assert (merged.logits(prompt) - ref).abs().max() / ref.abs().max() < 0.05
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["merge", str(qdir), str(adapter), str(tmp_path / "x"), "--quantize", "nf4"])
    assert "already quantized (int8)" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_bad_adapter_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "-n", "2", "--adapter", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "adapter directory" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["merge", "x", str(tmp_path), str(tmp_path / "o")])
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_adapter_flag_on_every_model_command():
    from gyrfalcon.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "x"], ["chat"], ["serve"], ["eval", "--tasks", "arc_easy"]):
        assert parser.parse_args([*argv, "--adapter", "A"]).adapter == "A", argv[0]
