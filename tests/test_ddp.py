"""Data-parallel fine-tuning under torchrun: 2 gloo processes with 1 micro-batch each train exactly like 1 process
accumulating 2 micro-batches (same global batch). FSDP is checked on a GPU only.

Tolerance, written down: per-step losses within 1e-5 and final adapter weights within 1e-5 (absolute, fp32).
The two runs add the same per-micro-batch gradients in a different order (an all-reduce sum then / 2, against
two accumulations of g / 2), so they differ only by rounding, which Adam's normalized steps keep at that scale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _chat_file(tmp_path: Path) -> Path:
    lines = []
    for i in range(40):
        w = ["north", "south", "east", "west", "up", "down", "left", "right"][i % 8]
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Which way, {i}?"},
                                              {"role": "assistant", "content": f"Go {w}, then {w} again."}]}))
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_two_gloo_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    data = _chat_file(tmp_path)
    common = ["finetune", "--data", str(data), "--steps", "5", "--batch-size", "2", "--seq-len", "48",
              "--lr", "3e-3", "--warmup", "1", "--lora-r", "4", "--lora-dropout", "0", "--eval-every", "0",
              "--save-every", "0", "--seed", "5", "--device", "cpu", "--threads", "1", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "gyrfalcon.cli", *common, "--grad-accum", "2", "--out", str(one)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "gyrfalcon.cli", *common, "--grad-accum", "1", "--out", str(two)])
    s1 = json.loads((one / "finetune.json").read_text())
    s2 = json.loads((two / "finetune.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["tokens"] == s2["tokens"]  # the same global batches
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 5
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-5, (l1, l2)
    assert l1[-1] < l1[0]  # it trained
    w1, w2 = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst
    assert any(w1[k].abs().max() > 0 for k in w1 if "lora_B" in k)  # B moved off zero


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP path needs CUDA")
def test_fsdp_on_gpu(tmp_path):
    """FSDP (fully_shard per block) over all visible GPUs: trains, lowers the loss, writes a loadable adapter."""
    data = _chat_file(tmp_path)
    out = tmp_path / "fsdp"
    n = torch.cuda.device_count()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
          "-m", "gyrfalcon.cli", "finetune", "--data", str(data), "--steps", "8", "--batch-size", "2",
          "--seq-len", "48", "--lr", "3e-3", "--warmup", "1", "--lora-r", "4", "--eval-every", "0",
          "--save-every", "0", "--fsdp", "--no-progress", "--out", str(out)], timeout=600)
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["world_size"] == n and summary["eval_loss"] < summary["eval_loss_before"]
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    # whole (gathered) matrices, not one process's shard: A is [r, in] with in = the bundled model's hidden size
    a = [w for k, w in weights.items() if k.endswith("lora_A.weight")]
    assert a and all(w.shape == (4, 256) for w in a)
