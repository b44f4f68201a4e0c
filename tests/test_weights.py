"""Checkpoint loading and saving against transformers' own Falcon, on tiny random models (CPU, a few seconds)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gyrfalcon.config import load_config
from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes
from gyrfalcon.models import build_model
from gyrfalcon.weights import WeightsError, find_checkpoint, load_weights, resolve_model_dir, save_weights

transformers = pytest.importorskip("transformers")

VOCAB = 300
LAYOUTS = {
    # 7B: multi-query, parallel attention/MLP off one norm, tied embeddings.
    "multi_query": dict(multi_query=True, new_decoder_architecture=False, parallel_attn=True),
    # 40B/180B: grouped KV heads, two norms.
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
    # Multi-head, sequential, with biases and an untied lm_head.
    "untied": dict(multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True,
                   tie_word_embeddings=False),
}


def _hf_model(layout: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=False, **LAYOUTS[layout])
    model = transformers.FalconForCausalLM(cfg).eval()
    with torch.no_grad():  # layer norms start at 1/0; make them random too so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.to(dtype)


def _load(d: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build_model(load_config(d))
    load_weights(model, d, dtype, "cpu")
    return model


def _write_bin(model, d: Path, shards: int = 1) -> None:
    """A legacy pickled checkpoint (transformers 5 no longer writes them): one file, or shards plus an index."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, d / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, d / name)
        weight_map.update(dict.fromkeys(part, name))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def saved(request, tmp_path_factory):
    """One HF model per layout, saved as a single safetensors file, as shards, and as pickled .bin (one and two)."""
    layout = request.param
    model = _hf_model(layout)
    root = tmp_path_factory.mktemp(layout)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    _write_bin(model, root / "bin")
    _write_bin(model, root / "bin_sharded", shards=2)
    return model, root


def test_logits_match_transformers(saved):
    hf, root = saved
    model = _load(root / "single")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4
    tied = hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.transformer.word_embeddings.weight) == tied


def test_every_format_gives_identical_parameters(saved):
    hf, root = saved
    assert len(list((root / "sharded").glob("model-*-of-*.safetensors"))) > 1
    ref = load_file(root / "single" / "model.safetensors")
    loaded = {name: dict(_load(root / name).state_dict()) for name in ("single", "sharded", "bin", "bin_sharded")}
    for name, state in loaded.items():
        for key, value in state.items():
            source = ref.get(key, ref["transformer.word_embeddings.weight"] if key == "lm_head.weight" else None)
            assert value.dtype == torch.float32 and value.device.type == "cpu", (name, key)
            assert torch.equal(value, source), (name, key)  # bit-identical to the reference reader
            assert torch.equal(value, hf.state_dict()[key]), (name, key)


def test_safetensors_preferred_over_bin(tmp_path):
    hf = _hf_model("multi_query")
    hf.save_pretrained(tmp_path)
    torch.save({k: torch.zeros_like(v) for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert find_checkpoint(tmp_path).format == "safetensors"
    model = _load(tmp_path)
    assert torch.equal(model.transformer.ln_f.weight, hf.transformer.ln_f.weight)


def test_same_dtype_cpu_load_is_zero_copy(tmp_path):
    """fp32 file -> fp32 on CPU: parameters live in a mapping of the file itself, not in a copy."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    _hf_model("multi_query").save_pretrained(tmp_path)
    model = _load(tmp_path)
    path = str((tmp_path / "model.safetensors").resolve())
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[-1] == path:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.append((lo, hi))
    assert regions
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in regions), name


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    hf = _hf_model("grouped", torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in ref.values())
    model = _load(tmp_path, torch.float32)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        src = ref.get(key, ref["transformer.word_embeddings.weight"])
        assert torch.equal(value, src.float()), key
    as_bf16 = _load(tmp_path, torch.bfloat16)
    assert all(torch.equal(v, ref.get(k, ref["transformer.word_embeddings.weight"]))
               for k, v in as_bf16.state_dict().items())


def test_tied_checkpoint_with_lm_head_copy_is_accepted(tmp_path):
    hf = _hf_model("multi_query")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = _load(tmp_path)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture()
def single(tmp_path):
    d = tmp_path / "model"
    _hf_model("multi_query").save_pretrained(d)
    return d


def _rewrite(d: Path, edit) -> None:
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_shard(saved, tmp_path):
    _, root = saved
    d = tmp_path / "m"
    shutil.copytree(root / "sharded", d)
    victim = sorted(d.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=victim.name):
        _load(d)


def test_truncated_file(single):
    path = single / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        _load(single)


def test_corrupt_header(single):
    path = single / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors"):
        _load(single)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(WeightsError, match="too short"):
        _load(single)


def test_missing_key(single):
    _rewrite(single, lambda s: s.pop("transformer.h.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): transformer\.h\.1\.mlp\.dense_4h_to_h\.weight"):
        _load(single)


def test_unexpected_key(single):
    _rewrite(single, lambda s: s.update({"transformer.h.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\) in model\.safetensors: transformer\.h\.0\.extra"):
        _load(single)


def test_shape_mismatch(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg["vocab_size"] = VOCAB + 1
    (single / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"transformer\.word_embeddings\.weight in model\.safetensors: "
                                           r"checkpoint \[300, 64\] vs model \[301, 64\]"):
        _load(single)


def test_integer_tensor_where_float_expected(single):
    _rewrite(single, lambda s: s.update({"transformer.ln_f.bias": torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(WeightsError, match=r"transformer\.ln_f\.bias in model\.safetensors: torch\.int32"):
        _load(single)


def test_many_missing_keys_are_summarized(single):
    _rewrite(single, lambda s: [s.pop(k) for k in list(s) if k.startswith("transformer.h.")])
    with pytest.raises(WeightsError, match=r"missing keys \(12\): .*\.\.\. \(2 more\)"):
        _load(single)


def test_index_with_path_outside_directory(saved, tmp_path):
    _, root = saved
    d = tmp_path / "m"
    shutil.copytree(root / "sharded", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="invalid shard file names"):
        _load(d)


def test_no_weights(tmp_path):
    _hf_model("multi_query").config.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="no weights in"):
        _load(tmp_path)


def test_truncated_bin(saved, tmp_path):
    _, root = saved
    d = tmp_path / "m"
    shutil.copytree(root / "bin", d)
    path = d / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(WeightsError, match="pytorch_model.bin"):
        _load(d)


_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def test_bin_with_code_is_refused_not_run(single):
    (single / "model.safetensors").unlink()
    torch.save(_Payload(), single / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="weights-only"):
        _load(single)
    assert not _EXECUTED


# ---------------------------------------------------------------------------------------------------------------
# Hub cache


def _fake_cache(cache: Path, repo_id: str, src: Path, commit: str = "a" * 40) -> Path:
    """The standard hub cache layout: blobs, a snapshot of symlinks to them, refs/main holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def test_hub_id_resolves_from_offline_cache(single, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    snapshot = _fake_cache(cache, "org/name", single)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model_dir("org/name")
    assert resolved.resolve() == snapshot.resolve()
    assert resolve_model_dir("org/name", revision="a" * 40).resolve() == snapshot.resolve()
    model = _load(resolved)
    expected = load_file(single / "model.safetensors")["transformer.ln_f.weight"]
    assert torch.equal(model.transformer.ln_f.weight, expected)

    with pytest.raises(WeightsError, match=r"'org/other' is not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_dir("org/other")


def test_hub_bin_only_snapshot(saved, tmp_path, monkeypatch):
    _, root = saved
    cache = tmp_path / "hub-cache"
    snapshot = _fake_cache(cache, "org/legacy", root / "bin_sharded")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model_dir("org/legacy")
    assert resolved.resolve() == snapshot.resolve() and find_checkpoint(resolved).format == "bin"
    _load(resolved)


def test_hf_home_is_honoured(single, tmp_path, monkeypatch):
    snapshot = _fake_cache(tmp_path / "home" / "hub", "org/name", single)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("org/name").resolve() == snapshot.resolve()


def test_local_paths(single, tmp_path):
    assert resolve_model_dir(single) == single
    assert resolve_model_dir(str(single)) == single
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model_dir("./nope/at/all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# Saving


def test_save_weights_roundtrip_and_transformers_reads_it(tmp_path):
    hf = _hf_model("multi_query")
    hf.config.save_pretrained(tmp_path)
    model = _load_from_hf(hf, tmp_path / "src")
    save_weights(model, tmp_path, metadata={"note": "test"})
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state  # tied, like transformers
    again = _load(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    ref = transformers.FalconForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert (ref(ids).logits - again(ids)).abs().max().item() < 1e-4


def _load_from_hf(hf, d: Path) -> torch.nn.Module:
    hf.save_pretrained(d)
    return _load(d)


def test_save_weights_sharded_then_single(tmp_path):
    hf = _hf_model("untied")
    hf.config.save_pretrained(tmp_path)
    model = _load_from_hf(hf, tmp_path / "src")
    save_weights(model, tmp_path, max_shard_bytes=50_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    assert not (tmp_path / "model.safetensors").exists()
    ref = transformers.FalconForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight)
    again = _load(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())

    save_weights(model, tmp_path)  # back to one file: the old shards and index must not linger
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "model.safetensors").is_file()


def test_save_over_the_checkpoint_a_model_is_mapped_from(single):
    model = _load(single)  # zero-copy: parameters are views of model.safetensors
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_weights(model, single)  # replaced by rename: the mapped old file stays intact underneath
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    again = _load(single)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in before.items())


def test_save_weights_shared_tensors_in_a_dict(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    save_weights({"a": base, "same": base, "view": base[1:], "t": base.t()}, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert set(state) == {"a", "view", "t"}  # the exact alias is a tied copy; views are stored separately
    assert torch.equal(state["view"], base[1:]) and torch.equal(state["t"], base.t())


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    save_weights({"w": torch.ones(4)}, tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights({"w": torch.zeros(4)}, tmp_path)
    with pytest.raises(OSError, match="disk full"):
        save_weights({"w": torch.zeros(4), "v": torch.zeros(4)}, tmp_path, max_shard_bytes=16)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary files left


def test_memory_helpers():
    assert peak_rss_bytes() >= current_rss_bytes() > 0
