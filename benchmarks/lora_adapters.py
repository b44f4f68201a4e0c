"""LoRA adapters: parity with peft + transformers, adapter size, merge time, and what an unmerged adapter costs.

    flock /tmp/gf-bench.lock python benchmarks/lora_adapters.py            # about a minute on 2 cores
    python benchmarks/lora_adapters.py --json out.json --threads 2

1. Parity (tiny random models, fp32): for each Falcon layout, our logits with an adapter against peft's on
   transformers' FalconForCausalLM, both ways: (a) our adapter loaded by `PeftModel.from_pretrained`, (b) an
   adapter peft wrote (`get_peft_model`, random non-zero B, `save_pretrained`) loaded by `load_adapter`; the same
   for Falcon-Mamba on the input projections (peft refuses Mamba's out_proj). Reported: max |difference|.
2. The bundled tiny Shakespeare Falcon with the default targets, r=16: the adapter file's size, the time of
   `merge_lora`, and greedy decoding tokens/s (batch 1, 64 new tokens, best of 3) of the base, the base with the
   adapter unmerged, merged, and unmerged over an nf4 base (QLoRA inference).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parity() -> dict:
    import peft

    from gyrfalcon.finetune import LoraConfig, apply_lora, load_adapter, save_adapter
    from tests.conftest import hf_falcon
    from tests.test_lora import ids, ours_falcon, randomize_b
    from tests.test_peft_io import _mamba_pair, peft_model

    rows = {}
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    for layout in ("7b-multi-query", "40b-grouped", "11b-one-norm", "rw-alibi", "7b-untied"):
        x = ids(131)
        with tempfile.TemporaryDirectory() as d:
            ours = apply_lora(ours_falcon(layout), LoraConfig(r=8, alpha=16))
            randomize_b(ours)
            save_adapter(ours, None, d)
            pm = peft.PeftModel.from_pretrained(hf_falcon(layout)[0], d).eval()
            with torch.no_grad():
                a = (ours(x) - pm(x).logits).abs().max().item()
        with tempfile.TemporaryDirectory() as d:
            pm = peft_model(hf_falcon(layout)[0], targets, r=8, alpha=16)
            pm.save_pretrained(d)
            with torch.no_grad():
                b = (load_adapter(ours_falcon(layout), d)(x) - pm(x).logits).abs().max().item()
        rows[layout] = {"ours_in_peft": a, "peft_in_ours": b}
    x = ids(97)
    with tempfile.TemporaryDirectory() as d:
        ours, hf = _mamba_pair()
        apply_lora(ours, LoraConfig(r=8, alpha=16, target_modules=("in_proj", "x_proj")))
        randomize_b(ours)
        save_adapter(ours, None, d)
        pm = peft.PeftModel.from_pretrained(hf, d).eval()
        with torch.no_grad():
            a = (ours(x) - pm(x).logits).abs().max().item()
    with tempfile.TemporaryDirectory() as d:
        ours, hf = _mamba_pair()
        pm = peft_model(hf, ["in_proj", "x_proj"], r=8, alpha=16)
        pm.save_pretrained(d)
        with torch.no_grad():
            b = (load_adapter(ours, d)(x) - pm(x).logits).abs().max().item()
    rows["falcon-mamba"] = {"ours_in_peft": a, "peft_in_ours": b}
    return rows


def _decode_tps(llm, prompt: list[int], n: int = 64, repeats: int = 3) -> float:
    from gyrfalcon.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate(prompt, params)[0]
        best = max(best, len(out.token_ids) / (time.perf_counter() - t0))
    return best


def _bundled() -> dict:
    import gyrfalcon
    from gyrfalcon.finetune import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
    from gyrfalcon.quant import quantize_model
    from tests.test_lora import randomize_b

    out: dict = {}
    base = gyrfalcon.load()
    prompt = base.encode("ROMEO:\nBut soft, what light")
    out["base_tokens_per_s"] = _decode_tps(base, prompt)
    with tempfile.TemporaryDirectory() as d:
        apply_lora(base.model, LoraConfig(r=16, alpha=32))
        randomize_b(base.model, std=0.02)
        save_adapter(base.model, None, d)
        out["adapter_bytes"] = (Path(d) / "adapter_model.safetensors").stat().st_size
        out["unmerged_tokens_per_s"] = _decode_tps(base, prompt)
        t0 = time.perf_counter()
        merge_lora(base.model)
        out["merge_seconds"] = time.perf_counter() - t0
        out["merged_tokens_per_s"] = _decode_tps(base, prompt)
        q = gyrfalcon.load()
        quantize_model(q.model, "nf4")
        q_base = _decode_tps(q, prompt)
        load_adapter(q.model, d)
        out["nf4_base_tokens_per_s"] = q_base
        out["nf4_unmerged_tokens_per_s"] = _decode_tps(q, prompt)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parity = _parity()
    print("max |logits difference| against peft + transformers, fp32 (r=8, random non-zero B):")
    print(f"  {'model':<16}{'our adapter in peft':>22}{'peft adapter in ours':>24}")
    for k, v in parity.items():
        print(f"  {k:<16}{v['ours_in_peft']:>22.2e}{v['peft_in_ours']:>24.2e}")
    b = _bundled()
    print(f"\nbundled tiny Shakespeare Falcon, default targets, r=16 ({torch.get_num_threads()} threads):")
    print(f"  adapter file {b['adapter_bytes'] / 2**10:.0f} KiB; merge_lora {b['merge_seconds'] * 1e3:.1f} ms")
    print("  greedy decode tokens/s, batch 1, 64 new tokens (best of 3):")
    for k in ("base", "unmerged", "merged", "nf4_base", "nf4_unmerged"):
        print(f"    {k:<14}{b[f'{k}_tokens_per_s']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"parity": parity, "bundled": b}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
