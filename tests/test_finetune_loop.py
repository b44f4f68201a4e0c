"""The fine-tuning forward, loss and loop: packed documents do not see each other, the fused head+loss equals the
plain definition, gradient checkpointing changes nothing, a resumed run repeats the uninterrupted one exactly,
QLoRA lowers the held-out loss, full-parameter continued pretraining writes a loadable model, bad flags fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gyrfalcon.config import FalconConfig
from gyrfalcon.finetune.data import IGNORE, Example, pack_examples
from gyrfalcon.finetune.loop import PackedCausalLM, linear_cross_entropy, packed_logits, reference_loss
from gyrfalcon.models import build_model

LAYOUTS = {
    "multi_query": dict(num_heads=4, num_kv_heads=1, new_decoder_architecture=False, parallel_attn=True, num_ln=1,
                        bias=False, alibi=False),
    "grouped": dict(num_heads=4, num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, num_ln=2,
                    bias=False, alibi=False),
    "rw_alibi": dict(num_heads=4, num_kv_heads=4, new_decoder_architecture=False, parallel_attn=False, num_ln=1,
                     bias=True, alibi=True),
}


def tiny_falcon(layout: str = "multi_query", seed: int = 0, vocab: int = 97) -> torch.nn.Module:
    config = FalconConfig(vocab_size=vocab, hidden_size=32, num_layers=2, ffn_hidden_size=64, layer_norm_epsilon=1e-5,
                          rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0,
                          eos_token_id=0, **LAYOUTS[layout])
    torch.manual_seed(seed)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(-0.2, 0.2)
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith(("transformer.ln", "transformer.h.0.ln", "transformer.h.1.ln")):
                if name.endswith("weight"):
                    p.fill_(1.0)
    return model.eval()


def _docs(vocab: int = 97) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (5, 7, 4):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, ids[1:] + [IGNORE]))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_documents_do_not_see_each_other(layout):
    """Logits of each document inside a packed row equal the logits of that document run alone (1e-5, fp32)."""
    model = tiny_falcon(layout)
    docs = _docs()
    rows = pack_examples(docs, seq_len=20, pad_id=0)
    assert len(rows) == 1 and rows.segments[0].max() == 3  # three documents and the padding
    with torch.no_grad():
        packed = packed_logits(model, rows.batch(slice(0, 1)))[0]
        plain_row = model(rows.input_ids)[0]
        start = 0
        for d in docs:
            alone = model(torch.tensor([d.input_ids]))[0]
            got = packed[start: start + len(d)]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
            if start:
                # without the mask the later documents would differ: the test can fail
                assert (plain_row[start: start + len(d)] - alone).abs().max() > 1e-3
            start += len(d)


def test_single_document_rows_take_the_causal_path():
    model = tiny_falcon()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "positions": torch.arange(12).expand(2, 12),
             "segments": torch.zeros(2, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(packed_logits(model, batch), model(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("train_head", [False, True])
def test_fused_head_loss_equals_reference(train_head):
    """The chunked head+cross-entropy with gradients precomputed in the forward pass equals full logits then
    F.cross_entropy: loss and every gradient within 1e-5 (fp32), chunks smaller than the row count."""
    model = tiny_falcon("grouped").train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.lm_head.weight.requires_grad_(train_head)  # tied: the embedding trains with it (or not)
    rows = pack_examples(_docs() * 3, seq_len=16, pad_id=0)
    batch = rows.batch(slice(0, len(rows)))
    wrapped = PackedCausalLM(model)
    wrapped.chunk_elements = 97 * 5  # 5 rows of logits at a time
    loss, n = wrapped(batch)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref, n_ref = reference_loss(model, batch)
    ref.backward()
    assert n == n_ref == rows.n_targets
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    ref_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert fused.keys() == ref_grads.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fused_loss_without_grad_and_empty_batch():
    model = tiny_falcon()
    h = torch.randn(6, 32)
    t = torch.randint(0, 97, (6,))
    with torch.no_grad():
        got = linear_cross_entropy(h, model.lm_head, t, chunk_elements=97 * 4)
        want = torch.nn.functional.cross_entropy(model.lm_head(h), t, reduction="sum")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    batch = pack_examples(_docs(), 20, 0).batch(slice(0, 1))
    batch["targets"] = torch.full_like(batch["targets"], IGNORE)
    loss, n = PackedCausalLM(model)(batch)
    assert n == 0 and loss.item() == 0.0


def test_gradient_checkpointing_changes_nothing():
    from gyrfalcon.finetune.lora import LoraConfig, apply_lora
    from gyrfalcon.train.loop import enable_gradient_checkpointing

    grads = []
    for ckpt in (False, True):
        model = tiny_falcon()
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        wrapped = PackedCausalLM(model).train()
        if ckpt:
            assert enable_gradient_checkpointing(wrapped) == 2
        loss, _ = wrapped(pack_examples(_docs(), 20, 0).batch(slice(0, 1)))
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the command


def _chat_file(tmp_path: Path, n: int = 48) -> Path:
    """A small learnable task: the assistant repeats the user's word three times."""
    words = ["apple", "river", "stone", "cloud", "light", "green", "table", "music", "horse", "paper", "night",
             "bread", "water", "glass", "tiger", "sugar"]
    lines = []
    for i in range(n):
        w = words[i % len(words)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Say {w} three times."},
                                              {"role": "assistant", "content": f"{w} {w} {w}."}]}))
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _finetune(argv: list[str]) -> int:
    from gyrfalcon.cli import main

    return main(["finetune", *argv, "--no-progress", "--threads", "1"])


def _losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Killed after step 4 (checkpoint at 4), resumed: steps 5-8 have the very losses of an uninterrupted run, and
    the adapters are bit-identical. LoRA dropout is on, so the RNG state must be restored too."""
    import gyrfalcon.finetune.cli as ft

    data = _chat_file(tmp_path)
    common = ["--data", str(data), "--steps", "8", "--batch-size", "2", "--seq-len", "48", "--lr", "3e-3",
              "--warmup", "2", "--lora-r", "4", "--lora-dropout", "0.1", "--save-every", "2", "--eval-every", "4",
              "--seed", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _finetune([*common, "--out", str(a)]) == 0

    class Killed(Exception):
        pass

    real_train = ft.train

    def dies_after_4(*args, **kwargs):
        def on_step(step, record):
            if step == 4:
                raise Killed

        return real_train(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(ft, "train", dies_after_4)
    with pytest.raises(Killed):
        _finetune([*common, "--out", str(b)])
    monkeypatch.setattr(ft, "train", real_train)
    assert _finetune([*common, "--out", str(b), "--resume"]) == 0
    assert _losses(a) == _losses(b) and len(_losses(a)) == 8
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a changed setting is refused on resume
    with pytest.raises(SystemExit):
        _finetune([*common[:-1], "4", "--out", str(b), "--resume"])


def test_qlora_lowers_heldout_loss(tmp_path):
    """LoRA over the nf4-quantized bundled model learns the task: held-out loss (conversations never trained on)
    falls by more than a third in 40 steps."""
    data = _chat_file(tmp_path)
    out = tmp_path / "q"
    assert _finetune(["--data", str(data), "--out", str(out), "--quantize", "nf4", "--steps", "40",
                      "--batch-size", "4", "--seq-len", "64", "--lr", "5e-3", "--warmup", "4", "--lora-r", "8",
                      "--lora-dropout", "0", "--eval-every", "0", "--save-every", "0", "--val-fraction", "0.25",
                      "--seed", "0"]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["data"]["heldout_conversations"] == 12
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    assert after < before * 2 / 3, (before, after)
    assert (out / "adapter_config.json").is_file() and (out / "loss_curve.png").stat().st_size > 1000
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"


def test_full_parameter_continued_pretraining(tmp_path):
    """--full on a plain text corpus with warmup-stable-decay (exponential): a whole model dir that loads."""
    import gyrfalcon

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "full"
    assert _finetune(["--data", str(corpus), "--out", str(out), "--full", "--steps", "6", "--batch-size", "2",
                      "--seq-len", "32", "--lr", "1e-3", "--schedule", "wsd", "--decay-shape", "exp",
                      "--decay-fraction", "0.5",
                      "--warmup", "1", "--eval-every", "3", "--save-every", "3"]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["data"]["format"] == "text" and summary["eval_loss"] < summary["eval_loss_before"]
    lrs = [json.loads(line).get("lr") for line in (out / "train_log.jsonl").read_text().splitlines()]
    lrs = [x for x in lrs if x is not None]
    assert lrs[1] == lrs[2] == 1e-3 and lrs[-1] == pytest.approx(1e-4)  # warmup, stable, decay to min_lr
    llm = gyrfalcon.load(out, device="cpu")
    assert llm.model.lm_head.weight.shape[0] == 4096


@pytest.mark.parametrize("argv,match", [
    (["--data", "missing.jsonl"], "no such file"),
    (["--lora-r", "0"], "--lora-r 0"),
    (["--full", "--quantize", "nf4"], "cannot be combined"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--warmup", "50", "--steps", "10"], "--warmup 50"),
])
def test_bad_arguments(tmp_path, capsys, argv, match):
    data = _chat_file(tmp_path, 4)
    base = ["--data", str(data), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        _finetune(base + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gyrfalcon finetune" in err and match in err


def test_bad_data_and_unknown_flag(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("plain prose, no turns\n")
    with pytest.raises(SystemExit) as e:
        _finetune(["--data", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "not a chat or instruction file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _finetune(["--data", str(bad), "--out", str(tmp_path / "o"), "--schedule", "linear"])
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_fast_frozen_linears_equal_reference(monkeypatch):
    """LoRA bases and the head on oneDNN's GEMM (`use_fast_frozen_linears`, `matmul_wt`) give the loss and adapter
    gradients of plain torch products (USE_ONEDNN off) within 1e-5."""
    import gyrfalcon.finetune.loop as ftl
    from gyrfalcon.finetune.lora import LoraConfig, apply_lora

    results = []
    for fast in (True, False):
        monkeypatch.setattr(ftl, "USE_ONEDNN", fast)
        model = tiny_falcon()
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(r=4, alpha=8))
        ftl.prepare_for_training(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        loss, _ = PackedCausalLM(model).train()(pack_examples(_docs(), 20, 0).batch(slice(0, 1)))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], atol=1e-5, rtol=1e-4, msg=k)
