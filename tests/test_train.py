"""`gyrfalcon train` end to end on toy models: losses fall, the output dir loads here and in transformers, a resumed
run equals an uninterrupted one, a torn checkpoint write never replaces the last good checkpoint, bad flags are
clear errors. Plus the pieces: data windows, schedules."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch

import gyrfalcon.train.cli as train_cli
from gyrfalcon.api import load
from gyrfalcon.config import from_hf
from gyrfalcon.models import build_model
from gyrfalcon.train import loop
from gyrfalcon.train.data import RandomWindows, eval_windows, iter_text_chunks, split_tokens, tokenize_file
from gyrfalcon.train.loop import Schedule, TrainConfig, load_checkpoint

TINY_FALCON = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "64"]
TINY_MAMBA = ["--arch", "falcon-mamba", "--layers", "2", "--hidden", "32", "--state-size", "4"]
FAST = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup", "3",
        "--no-progress", "--seed", "0", "--threads", "1"]  # one thread: tiny ops, and the CI machine is shared


def make_text(lines: int = 1500, seed: int = 0) -> str:
    """A play-shaped text with a small vocabulary and strong regularities: quickly learnable."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR", "TYBALT"]
    subjects = ["the night", "my love", "this sword", "the moon", "thy name", "fair Verona"]
    verbs = ["doth shine", "is gone", "shall fall", "will weep", "must wait", "doth call"]
    endings = ["upon the wall.", "for thee.", "and no more.", "in heaven.", "till morning."]
    out = []
    for _ in range(lines // 3):
        out.append(f"{rng.choice(speakers)}:")
        for _ in range(2):
            out.append(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(endings)}")
        out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy models are all small ops, where extra OpenMP threads only add barrier waits (badly, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.add_train_arguments(parser)
    return parser.parse_args(list(argv))


def run(text_file: Path, out: Path, *extra: str, arch: list[str] = TINY_FALCON) -> Path:
    args = parse("--data", str(text_file), "--out", str(out), *arch, *FAST, *extra)
    assert train_cli.run_train(args) == 0
    return out


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def eval_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def falcon_dir(text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("falcon") / "model"
    return run(text_file, out, "--steps", "30", "--eval-every", "10", "--save-every", "10")


def test_falcon_training_lowers_loss(falcon_dir):
    ls = losses(falcon_dir)
    assert sorted(ls) == list(range(1, 31))
    first, last = ls[1], sum(ls[s] for s in range(26, 31)) / 5
    assert last < first - 1.5, (first, last)
    evals = eval_losses(falcon_dir)
    assert sorted(evals) == [10, 20, 30] and evals[30] < evals[10]


def test_falcon_output_dir_is_a_model(falcon_dir):
    names = {p.name for p in falcon_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "train_log.jsonl", "MODEL_CARD.md"} <= names
    config = json.loads((falcon_dir / "config.json").read_text())
    assert config["model_type"] == "falcon" and config["torch_dtype"] == "float32" and config["multi_query"]
    card = (falcon_dir / "MODEL_CARD.md").read_text()
    assert "gyrfalcon train" in card
    assert "held-out perplexity" in card and "Wall time" in card and "Hardware" in card
    # The card's perplexity is the final held-out loss of the log.
    ppl = math.exp(eval_losses(falcon_dir)[30])
    assert f"{ppl:.2f}" in card


def test_falcon_loads_generates_and_matches_transformers(falcon_dir):
    transformers = pytest.importorskip("transformers")
    llm = load(falcon_dir, device="cpu")
    out = llm.generate("ROMEO:", max_new_tokens=12, temperature=0.8, seed=0)[0]
    assert len(out.token_ids) > 0 and isinstance(out.text, str)
    hf = transformers.AutoModelForCausalLM.from_pretrained(falcon_dir, dtype=torch.float32).eval()
    ids = llm.encode("JULIET:\nThe moon doth shine for thee.\n")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (llm.logits(ids) - ref).abs().max().item() < 1e-4


def test_falcon_mamba_trains_and_loads(text_file, tmp_path):
    pytest.importorskip("gyrfalcon.models.falcon_mamba", reason="the Falcon-Mamba model is not there yet")
    # Short windows: the reference scan runs one Python step per token.
    out = run(text_file, tmp_path / "mamba", "--steps", "30", "--eval-every", "0", "--save-every", "0",
              "--seq-len", "16", "--batch-size", "16", arch=TINY_MAMBA)
    ls = losses(out)
    assert sum(ls[s] for s in range(26, 31)) / 5 < ls[1] - 1.0, ls
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "falcon_mamba"
    llm = load(out, device="cpu")
    assert llm.generate("ROMEO:", max_new_tokens=8, temperature=0.8, seed=0)[0].token_ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = llm.encode("NURSE:\nMy love is gone.\n")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (llm.logits(ids) - ref).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# resume and checkpoints


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the CLI's training raise right after optimizer step `step`, as a kill would."""
    real_train = train_cli.train

    def on_step(done, record):
        if done == step:
            raise Interrupted(step)

    monkeypatch.setattr(train_cli, "train", lambda *a, **kw: real_train(*a, on_step=on_step, **kw))


def test_resume_reproduces_the_uninterrupted_run(text_file, tmp_path, monkeypatch):
    common = ("--steps", "12", "--save-every", "4", "--eval-every", "6", "--schedule", "wsd")
    full = run(text_file, tmp_path / "full", *common)

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)  # the checkpoint is at step 4: steps 5-7 are lost and must be redone identically
        with pytest.raises(Interrupted):
            run(text_file, part, *common)
    assert load_checkpoint(part / "checkpoints")["step"] == 4
    assert max(losses(part)) == 7
    run(text_file, part, *common, "--resume")

    assert losses(part) == losses(full)  # exactly: same data order, same arithmetic
    assert eval_losses(part) == eval_losses(full)
    a = load_checkpoint(full / "checkpoints")["model"]
    b = load_checkpoint(part / "checkpoints")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (part / "MODEL_CARD.md").read_text()
    assert card.count("gyrfalcon train") >= 2 and "--resume" in card  # both sessions' commands are recorded


def test_resume_with_changed_flag_names_it(text_file, tmp_path):
    out = run(text_file, tmp_path / "m", "--steps", "4", "--save-every", "2", "--eval-every", "0",
              "--save-dtype", "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load(out, device="cpu").generate("ROMEO:", max_new_tokens=4, seed=0)[0].token_ids
    with pytest.raises(ValueError, match="--lr"):
        run(text_file, out, "--steps", "4", "--lr", "1e-3", "--resume")


def test_torn_checkpoint_write_keeps_the_previous_one(text_file, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write some bytes, then die mid-write
            f.write(b"PK\x03\x04 torn")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(OSError, match="simulated"):
        run(text_file, tmp_path / "m", "--steps", "6", "--save-every", "2", "--eval-every", "0",
            "--checkpoint-dir", str(ckpt))
    state = load_checkpoint(ckpt)
    assert state["step"] == 2
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    monkeypatch.setattr(torch, "save", real_save)
    run(text_file, tmp_path / "m", "--steps", "6", "--save-every", "2", "--eval-every", "0",
        "--checkpoint-dir", str(ckpt), "--resume")
    assert load_checkpoint(ckpt)["step"] == 6


# ---------------------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("extra, flag", [
    (["--hidden", "30"], "--hidden"),
    (["--kv-heads", "3"], "--kv-heads"),
    (["--seq-len", "0"], "--seq-len"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--min-lr", "1"], "--min-lr"),
    (["--warmup", "50", "--steps", "10"], "--warmup"),
    (["--vocab-size", "10"], "--vocab-size"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--seq-len", "100000"], "--seq-len"),
])
def test_bad_flags_are_value_errors_naming_the_flag(text_file, tmp_path, extra, flag):
    with pytest.raises(ValueError, match=flag):
        run(text_file, tmp_path / "m", *extra)


def test_missing_data_file(tmp_path):
    args = parse("--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="--data"):
        train_cli.run_train(args)


def test_cli_reports_bad_flag_without_traceback(text_file, tmp_path, capsys):
    from gyrfalcon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(text_file), "--out", str(tmp_path / "m"), "--hidden", "30", "--heads", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--hidden" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# data


def test_chunked_tokenization_equals_whole_file(text_file, tmp_path):
    from gyrfalcon.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([text_file.read_text()], 300, tmp_path / "tok")
    chunks = list(iter_text_chunks(text_file, chunk_chars=500))
    assert len(chunks) > 10 and "".join(chunks) == text_file.read_text()
    whole = tok.encode(text_file.read_text())
    assert tokenize_file(text_file, tok.encode, chunk_chars=500).tolist() == whole


def test_split_and_windows():
    tokens = torch.arange(1000, dtype=torch.int32)
    train, val = split_tokens(tokens, 0.1)
    assert len(val) == 100 and train[-1] + 1 == val[0]

    a = RandomWindows(train, seq_len=16, batch_size=4, seed=3)
    batches = [next(a) for _ in range(3)]
    assert batches[0].shape == (4, 17) and batches[0].dtype == torch.int64
    assert all(torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 16, dtype=torch.int64)) for b in batches)  # windows
    assert int(max(b.max() for b in batches)) < 900  # never reads held-out tokens

    b = RandomWindows(train, seq_len=16, batch_size=4, seed=3)
    next(b)
    state = b.state_dict()
    c = RandomWindows(train, seq_len=16, batch_size=4, seed=3)
    c.load_state_dict(state)
    assert torch.equal(next(c), batches[1]) and torch.equal(next(c), batches[2])

    windows = eval_windows(val, seq_len=16, batch_size=4)
    flat = torch.cat(windows)
    assert flat.shape == (6, 17) and torch.equal(flat[:, 0], torch.arange(900, 996, 16))
    assert [len(w) for w in windows] == [4, 2]


# ---------------------------------------------------------------------------------------------------------------
# schedules and the loop's pieces


def test_cosine_schedule():
    s = Schedule(steps=100, warmup=10, kind="cosine", floor=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(99) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 100)]
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("shape", ["linear", "exp"])
def test_wsd_schedule(shape):
    s = Schedule(steps=100, warmup=10, kind="wsd", floor=0.01, decay_fraction=0.2, decay_shape=shape)
    assert s(5) == pytest.approx(0.6)
    assert all(s(i) == 1.0 for i in range(10, 80))  # stable phase
    assert s(99) == pytest.approx(0.01)
    assert s(90) < 1.0
    if shape == "exp":
        assert s(89) == pytest.approx(0.01 ** ((89 - 80) / 19))
    else:
        assert s(89) == pytest.approx(1 - 0.99 * (9 / 19))


def test_weight_decay_on_matrices_only():
    model = build_model(
        from_hf({"model_type": "falcon", "vocab_size": 50, "hidden_size": 16,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "bias": True}), device="cpu")
    decay, no_decay = loop.param_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_params = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # the tied head is counted once


def test_train_loop_with_plain_iterator_resumes_by_fast_forward(tmp_path):
    """An iterator without state_dict is fast-forwarded on resume; the losses still match."""
    config = from_hf({"model_type": "falcon", "vocab_size": 40, "hidden_size": 16,
                                       "num_hidden_layers": 1, "num_attention_heads": 2})

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, 40, (2, 9), generator=g)

    def fresh():
        torch.manual_seed(0)
        return build_model(config, device="cpu")

    def cfg(d, **kw):
        return TrainConfig(steps=6, warmup=1, save_every=2, checkpoint_dir=str(d), progress=False, grad_accum=2, **kw)

    full = loop.train(fresh(), batches(), config=cfg(tmp_path / "a"))
    with pytest.raises(Interrupted):
        loop.train(fresh(), batches(), config=cfg(tmp_path / "b"),
                   on_step=lambda s, r: (_ for _ in ()).throw(Interrupted()) if s == 3 else None)
    resumed = loop.train(fresh(), batches(), config=cfg(tmp_path / "b", resume=True))
    assert [r["loss"] for r in resumed.history[-3:]] == [r["loss"] for r in full.history[-3:]]


def test_gradient_checkpointing_gives_the_same_gradients():
    config = from_hf({"model_type": "falcon", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
                      "num_attention_heads": 2})
    batch = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config, device="cpu")
        if checkpointing:
            assert loop.enable_gradient_checkpointing(model) == 2
        loss, _ = loop.causal_lm_loss(model, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def _tiny_lm_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"input_ids": torch.randint(0, 50, (2, 16), generator=g)}


def _tiny_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss, ids[:, 1:].numel()


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.out = torch.nn.Linear(32, 50)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def test_precision_modes_validate_and_the_cpu_scaler_is_a_pass_through():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(steps=1, precision="fp8").validate()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TrainConfig(steps=1, precision="fp16", device="cpu").validate()
    assert not loop.loss_scaler(torch.device("cpu"), "fp16").is_enabled()
    # fp32 and auto on CPU are the same run, bit for bit (no autocast, disabled scaler)
    results = []
    for precision in ("auto", "fp32"):
        torch.manual_seed(0)
        model = _TinyLM()
        loop.train(model, _tiny_lm_batches(), _tiny_loss,
                   TrainConfig(steps=3, lr=1e-2, warmup=0, precision=precision, progress=False))
        results.append(model.out.weight.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_training_with_loss_scale_lowers_loss_on_cuda():
    torch.manual_seed(0)
    model = _TinyLM().cuda()
    res = loop.train(model, _tiny_lm_batches(), _tiny_loss,
                     TrainConfig(steps=30, lr=1e-2, warmup=0, precision="fp16", device="cuda", progress=False))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
