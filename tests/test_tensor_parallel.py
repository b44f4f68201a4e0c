"""Tensor parallelism (gyrfalcon/parallel), the pipeline device map, and the --tp commands.

Multi-process tests run real torchrun groups of 2 gloo processes on the CPU, fp32, on tiny random Falcons of each
layout (tests/conftest.py). Tolerance: TP=2 logits equal one process within 1e-5 absolute; they differ only by
the order of fp32 sums (partial attention/MLP outputs added across ranks), measured ~2e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gyrfalcon.config import FalconConfig, from_hf, load_config
from gyrfalcon.parallel.shard import TensorParallelError, plan_split, tensor_slice

from .conftest import falcon_config_dict, hf_falcon

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "gyrfalcon" / "assets" / "tiny-falcon-shakespeare"
TINY_MAMBA = ROOT / "gyrfalcon" / "assets" / "tiny-falcon-mamba-shakespeare"
LAYOUTS = ["7b-multi-query", "40b-grouped", "40b-grouped-kv1", "rw-alibi", "7b-untied"]
TOL = 1e-5


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)  # never join an outer group by accident
    return env


def _cfg(layout: str, **kw) -> FalconConfig:
    return from_hf(falcon_config_dict(layout, **kw))


# ---------------------------------------------------------------------------------------------------------------
# The split arithmetic, checked against the fused QKV's head order written out row by row


def _qkv_row_owner(config: FalconConfig) -> list[tuple[str, int]]:
    """For every row of query_key_value: ('q', head) or ('k'/'v', kv head), from the layout's definition."""
    h, g, d = config.num_heads, config.num_kv_heads, config.head_dim
    rows: list[tuple[str, int]] = []
    if config.qkv_layout == "multi_query":
        for i in range(h):
            rows += [("q", i)] * d
        rows += [("k", 0)] * d + [("v", 0)] * d
    elif config.qkv_layout == "grouped":
        for grp in range(g):
            for i in range(h // g):
                rows += [("q", grp * (h // g) + i)] * d
            rows += [("k", grp)] * d + [("v", grp)] * d
    else:
        for i in range(h):
            rows += [("q", i)] * d + [("k", i)] * d + [("v", i)] * d
    return rows


@pytest.mark.parametrize("layout,world", [("7b-multi-query", 2), ("7b-multi-query", 4), ("40b-grouped", 2),
                                          ("40b-grouped", 4), ("40b-grouped-kv1", 2), ("40b-grouped-kv1", 4),
                                          ("rw-alibi", 2), ("rw-alibi", 3), ("11b-one-norm", 2)])
def test_split_takes_each_ranks_heads_and_their_kv_heads(layout, world):
    config = _cfg(layout)
    owner = _qkv_row_owner(config)
    h, g = config.num_heads, config.num_kv_heads
    seen_q = []
    for rank in range(world):
        s = plan_split(config, world, rank)
        rows = [owner[i] for a, b in s.qkv_rows for i in range(a, b)]
        q = sorted({i for kind, i in rows if kind == "q"})
        kv = sorted({i for kind, i in rows if kind == "k"})
        assert q == list(range(*s.heads))
        # Each query head's KV head is here, and no other KV head.
        assert kv == sorted({i * g // h for i in q})
        assert len(kv) == s.kv_heads
        # Local order is what a model with the local counts reads: [q.., k, v] per local group.
        per = len(q) // len(kv)
        expect = []
        for j, k in enumerate(kv):
            expect += [("q", x) for x in q[j * per : (j + 1) * per]] + [("k", k), ("v", k)]
        if config.qkv_layout == "interleaved":
            expect = [r for x in q for r in (("q", x), ("k", x), ("v", x))]
        assert [rows[i] for i in range(0, len(rows), config.head_dim)] == expect
        seen_q += q
    assert sorted(seen_q) == list(range(h))


def test_split_vocab_covers_every_row_once_with_uneven_sizes():
    config = _cfg("7b-multi-query")  # vocab 131
    parts = [plan_split(config, 2, r).vocab for r in range(2)]
    assert parts == [(0, 66), (66, 131)]
    assert tensor_slice("transformer.h.0.self_attention.dense.weight", config, plan_split(config, 2, 1)) == (
        "cols", ((2 * config.head_dim, 4 * config.head_dim),))
    assert tensor_slice("transformer.h.0.mlp.dense_4h_to_h.bias", config, plan_split(config, 2, 0)) == ("full", ())


def test_split_errors_say_why():
    with pytest.raises(TensorParallelError, match="num_attention_heads=6 is not divisible by 4"):
        plan_split(_cfg("rw-alibi"), 4, 0)
    twelve = from_hf({**falcon_config_dict("40b-grouped"), "num_attention_heads": 12, "num_kv_heads": 4})
    with pytest.raises(TensorParallelError, match="num_kv_heads=4 must be a multiple of 3"):
        plan_split(twelve, 3, 0)
    mamba = load_config(TINY_MAMBA)
    with pytest.raises(TensorParallelError, match="not supported for Falcon-Mamba.*x_proj"):
        plan_split(mamba, 2, 0)


def test_one_rank_is_the_plain_model(tmp_path):
    """World size 1 runs the parallel modules with every collective skipped: the same numbers as the model."""
    from gyrfalcon.models import build_model
    from gyrfalcon.parallel.load import load_parallel_model
    from gyrfalcon.quant.swap import load_into

    for layout in ("7b-multi-query", "rw-alibi"):
        hf, _ = hf_falcon(layout)
        hf.save_pretrained(tmp_path / layout)
        config = load_config(tmp_path / layout)
        tp = load_parallel_model(tmp_path / layout, config, 0, 1, None, torch.float32, "cpu")
        ref = load_into(build_model(config), tmp_path / layout, torch.float32, "cpu").eval()
        ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            torch.testing.assert_close(tp(ids), ref(ids), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Two processes: logits, slices, quantization (one torchrun group checks every layout)


@pytest.fixture(scope="module")
def tp_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    dirs = []
    for layout in LAYOUTS:
        hf, _ = hf_falcon(layout)
        hf.save_pretrained(out / layout)
        dirs.append(str(out / layout))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gyrfalcon.parallel.check", *dirs, str(TINY_MAMBA),
           *(f"{d}@{mode}" for d in dirs[:2] for mode in ("int8", "nf4")), "--out", str(out / "result.json")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "result.json").read_text())
    return {(Path(r["model"]).name, r["quantize"]): r for r in rows}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp2_logits_equal_one_process(tp_check, layout):
    row = tp_check[(layout, None)]
    assert len(row["ranks"]) == 2
    for r in row["ranks"]:
        assert r["max_abs_diff"] <= TOL, (layout, r["max_abs_diff"])
        assert r["logit_scale"] > 1.0  # the comparison is not between near-zero numbers
    assert row["argmax_equal"]


def _checkpoint_tensors(model_dir: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), 4) for k in f.keys()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_read_and_holds_only_its_slice(tp_check, layout):
    row = tp_check[(layout, None)]
    model_dir = Path(row["model"])
    config = load_config(model_dir)
    tensors = _checkpoint_tensors(model_dir)
    total = sum(torch.Size(s).numel() * el for s, el in tensors.values() if s)
    # What must be on both ranks, derived from the architecture: norms, row-parallel biases, and the KV rows of the
    # fused QKV when the KV heads are fewer than the ranks (multi-query, or 40B with one KV group).
    replicated = sum(torch.Size(s).numel() * el for k, (s, el) in tensors.items()
                     if k.endswith(("layernorm.weight", "layernorm.bias", "ln_attn.weight", "ln_attn.bias",
                                    "ln_mlp.weight", "ln_mlp.bias", "ln_f.weight", "ln_f.bias",
                                    "self_attention.dense.bias", "dense_4h_to_h.bias")))
    if config.num_kv_heads < 2:
        per_layer = 2 * config.head_dim * (config.hidden_size + (1 if config.bias else 0)) * 4
        replicated += per_layer * config.num_layers
    reads = [r["bytes_read"] for r in row["ranks"]]
    assert sum(reads) == total + replicated
    for r in row["ranks"]:
        assert r["bytes_read"] <= (total - replicated) / 2 + replicated + 4 * config.hidden_size * 4
        # Nothing it holds is a view of a bigger tensor (a full matrix kept alive behind a slice).
        assert r["storage_bytes"] == r["tensor_bytes"]
        qkv = r["shapes"]["transformer.h.0.self_attention.query_key_value.weight"]
        h, g, d = config.num_heads, config.num_kv_heads, config.head_dim
        assert qkv == [(h // 2 + 2 * max(1, g // 2)) * d, config.hidden_size]
        assert r["shapes"]["transformer.h.0.mlp.dense_4h_to_h.weight"] == [config.hidden_size,
                                                                           config.ffn_hidden_size // 2]


def test_mamba_tp_is_refused_with_the_reason(tp_check):
    row = tp_check[(TINY_MAMBA.name, None)]
    assert "not supported for Falcon-Mamba" in row["error"] and "all-reduce" in row["error"]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_slices_are_as_accurate_as_one_process(tp_check, mode):
    """Each rank quantizes its own slice: not bit-equal to quantizing whole matrices (a column slice of a
    row-parallel layer has its own scales), so both are compared with the float model instead."""
    for layout in ("7b-multi-query", "40b-grouped"):
        row = tp_check[(layout, mode)]
        assert row["quant_error_tp"] <= 1.5 * row["quant_error_single"] + 0.05, row
        assert row["quant_error_tp"] > 0  # it really is quantized


# ---------------------------------------------------------------------------------------------------------------
# The command: generate through --tp 2, and a killed rank


def test_generate_tp2_equals_one_process():
    import gyrfalcon

    prompt = "ROMEO: But soft"
    cmd = [sys.executable, "-m", "gyrfalcon.cli", "generate", prompt, "-n", "24", "-t", "0", "--json",
           "--model", str(TINY), "--tp", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = gyrfalcon.load(TINY, device="cpu").generate(prompt, max_new_tokens=24, temperature=0.0)[0]
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text


@pytest.mark.parametrize("extra,message", [
    (["-m", str(TINY_MAMBA)], "not supported for Falcon-Mamba"),
    (["--device-map", "auto"], "--tp and --device-map"),
])
def test_tp_refusals_come_before_any_process_starts(capsys, extra, message):
    from gyrfalcon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "ROMEO:", "-n", "2", "--tp", "2", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _rank_pids(root: int) -> dict[int, int]:
    import psutil

    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "gyrfalcon.cli" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p.pid
    return out


def test_serve_tp2_answers_then_a_killed_rank_stops_the_group():
    import httpx

    import gyrfalcon

    cmd = [sys.executable, "-m", "gyrfalcon.cli", "serve", str(TINY), "--tp", "2", "--port", "0",
           "--kv-cache-bytes", "8MiB", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 120
        lines = []
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
        assert url, "".join(lines)[-3000:]
        # One request through rank 0's server: the same tokens as one process.
        r = httpx.post(url + "/generate", json={"inputs": "JULIET:", "parameters": {"max_new_tokens": 12}},
                       timeout=60)
        assert r.status_code == 200, r.text
        want = gyrfalcon.load(TINY, device="cpu").generate("JULIET:", max_new_tokens=12, temperature=0.0)[0]
        assert r.json()["generated_text"] == want.text

        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        t0 = time.time()
        os.kill(pids[1], signal.SIGKILL)  # a follower dies while the server is idle
        proc.wait(timeout=30)
        elapsed = time.time() - t0
        print(f"group stopped {elapsed:.2f} s after SIGKILL of rank 1")
        err = proc.stderr.read()
        assert proc.returncode != 0
        assert elapsed < 10, elapsed
        assert "rank 1" in err and "SIGKILL" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# --device-map auto


def test_plan_layers_is_contiguous_and_proportional():
    from gyrfalcon.parallel.pipeline import plan_layers

    assert plan_layers(4, [1.0]) == [0, 0, 0, 0]
    assert plan_layers(6, [1.0, 1.0]) == [0, 0, 0, 1, 1, 1]
    assert plan_layers(6, [2.0, 1.0]) == [0, 0, 0, 0, 1, 1]
    assert plan_layers(3, [1.0, 100.0]) == [0, 1, 1]  # every device with memory gets a layer
    assert plan_layers(60, [24.0, 48.0, 80.0]) == sorted(plan_layers(60, [24.0, 48.0, 80.0]))
    with pytest.raises(ValueError, match="no usable device"):
        plan_layers(4, [0.0])


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_device_map_gives_the_same_tokens(devices):
    """One device (every CPU-only machine): a no-op. Two stages (the same CPU twice, exercising the moves): the
    same logits and greedy tokens."""
    import gyrfalcon
    from gyrfalcon.parallel.pipeline import dispatch
    from gyrfalcon.runtime.generate import greedy_tokens

    ref = gyrfalcon.load(TINY, device="cpu")
    llm = gyrfalcon.load(TINY, device="cpu")
    layers_before = list(llm.model.transformer.h)
    dispatch(llm.model, "auto", devices=devices, capacities=[1.0] * len(devices))
    if len(devices) == 1:
        assert list(llm.model.transformer.h) == layers_before
        assert not hasattr(llm.model, "device_map")
    else:
        assert llm.model.device_map == ["cpu"] * len(layers_before)
    ids = ref.encode("KING RICHARD: Now is")
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(torch.tensor([ids])), ref.model(torch.tensor([ids])), atol=0, rtol=0)
    assert greedy_tokens(llm.model, ids, 16) == greedy_tokens(ref.model, ids, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tp2_nccl_generate_equals_one_gpu():
    prompt = "ROMEO: But soft"
    base = [sys.executable, "-m", "gyrfalcon.cli", "generate", prompt, "-n", "24", "-t", "0", "--json",
            "--model", str(TINY), "--dtype", "fp32"]
    one = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=300)
    two = subprocess.run([*base, "--tp", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout.splitlines()[-1])["token_ids"] == json.loads(one.stdout.splitlines()[-1])["token_ids"]
