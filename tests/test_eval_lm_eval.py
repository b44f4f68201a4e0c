"""Exactness against lm-evaluation-harness itself, offline.

lm-eval's own task configs (its YAML files: prompts, few-shot samplers, metrics) are instantiated on our data,
converted back to the Hugging Face schemas they expect and loaded from local JSON files: no hub. Then

* prompts: the (context, continuation) pairs and generation prompts lm-eval builds equal ours, few-shot included;
* loglikelihoods: on a small random Falcon with the real Falcon tokenizer, our engine's numbers equal those of
  lm-eval's `HFLM` (transformers) within 1e-4 nats, with identical is-greedy flags;
* accuracies: lm-eval's `process_results` on HFLM's numbers equal our tasks' scores;
* the `gyrfalcon` lm-eval model (registry, loglikelihood, rolling loglikelihood, generate_until) matches HFLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # HFLM needs it (lm-eval's "hf" extra)

import gyrfalcon  # noqa: E402
from gyrfalcon.eval.data import SAMPLE_DIR, DataDir  # noqa: E402
from gyrfalcon.eval.scoring import Scorer  # noqa: E402
from gyrfalcon.eval.tasks import get_task  # noqa: E402
from gyrfalcon.eval.tasks.hellaswag import WIKIHOW_CATEGORIES, parse  # noqa: E402

ATOL = 1e-4
N = 3  # items per task: enough to cover few-shot sampling and every request shape, quick on CPU
SEED = 1234
MMLU_SUBJECTS = ("anatomy", "high_school_us_history")  # a short and a long few-shot prefix


def _rows(rel: str) -> list[dict]:
    return [json.loads(x) for x in (SAMPLE_DIR / rel).read_text(encoding="utf-8").splitlines() if x.strip()]


def _hellaswag_hf(r: dict) -> dict:
    """Back to lm-eval's schema: split ctx where ActivityNet's ctx_b starts (the last lower-case fragment)."""
    label, _, ctx = r["query"].partition(": ")
    cut = ctx.rfind(". ")
    start = cut + 2 if cut >= 0 else 0
    if label not in WIKIHOW_CATEGORIES and start < len(ctx) and ctx[start].islower():
        ctx_a, ctx_b = ctx[: start - 1], ctx[start:]
    else:
        ctx_a, ctx_b = ctx, ""
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": r["endings"], "label": str(r["gold"])}


def _winogrande_hf(r: dict) -> dict:
    a, b = r["context_options"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return {"sentence": a[:n] + "_ " + r["continuation"].strip(), "option1": a[n:], "option2": b[n:],
            "answer": str(r["gold"] + 1)}


def _mmlu_rows(subject: str, split: str) -> list[dict]:
    import csv
    import io

    text = (SAMPLE_DIR / "mmlu" / split / f"{subject}_{split}.csv").read_text(encoding="utf-8")
    return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)}
            for q, a, b, c, d, ans in csv.reader(io.StringIO(text))]


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    """lm-eval ConfigurableTasks from its own YAML files, on our sample data: name -> task (requests built)."""
    tmp = tmp_path_factory.mktemp("lm_eval_data")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "cache")
    import lm_eval.tasks as lt
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lt.__file__).parent

    def write(name: str, split_rows: dict[str, list[dict]]) -> dict:
        files = {}
        for split, rows in split_rows.items():
            p = tmp / f"{name}_{split}.jsonl"
            p.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
            files[split] = str(p)
        return {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}

    def build(yaml: str, name: str, split_rows: dict, **over) -> object:
        cfg = load_yaml(root / yaml, resolve_func=True)
        cfg.update(write(name, split_rows), training_split=None, validation_split=None, **over)
        task = ConfigurableTask(config=cfg)
        task.set_fewshot_seed(SEED)
        task.build_all_requests(limit=N, rank=0, world_size=1)
        return task

    arc = _rows("arc/arc_challenge_test.jsonl")
    arc_hf = [{"question": r["query"].removeprefix("Question: "),
               "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])},
               "answerKey": "ABCDE"[r["gold"]]} for r in arc]
    hs = parse((SAMPLE_DIR / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8"))
    tqa = json.loads((SAMPLE_DIR / "truthfulqa/v0/mc_task.json").read_text(encoding="utf-8"))
    tqa_hf = [{"question": r["question"],
               "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
               "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}}
              for r in tqa]
    tasks = {
        "arc_challenge": build("arc/arc_challenge.yaml", "arc", {"test": arc_hf}, test_split="test",
                               fewshot_split="test", num_fewshot=25),
        "hellaswag": build("hellaswag/hellaswag.yaml", "hs", {"validation": [_hellaswag_hf(r) for r in hs]},
                           test_split="validation", fewshot_split="validation", num_fewshot=10),
        "truthfulqa_mc1": build("truthfulqa/truthfulqa_mc1.yaml", "tqa", {"validation": tqa_hf},
                                test_split="validation"),
        "truthfulqa_mc2": build("truthfulqa/truthfulqa_mc2.yaml", "tqa", {"validation": tqa_hf},
                                test_split="validation"),
        "winogrande": build("winogrande/default.yaml", "wg",
                            {"validation": [_winogrande_hf(r) for r in _rows("winogrande/winogrande_xl_dev.jsonl")]},
                            test_split="validation", fewshot_split="validation", num_fewshot=5),
        "gsm8k": build("gsm8k/gsm8k.yaml", "gsm8k", {"test": _rows("gsm8k/test.jsonl"),
                                                     "train": _rows("gsm8k/train.jsonl")}, num_fewshot=5),
    }
    for s in MMLU_SUBJECTS:
        tasks[f"mmlu_{s}"] = build(f"mmlu/default/mmlu_{s}.yaml", f"mmlu_{s}",
                                   {"test": _mmlu_rows(s, "test"), "dev": _mmlu_rows(s, "dev")}, num_fewshot=5)
    return tasks


def _lm_docs(task) -> list[list]:
    """lm-eval's instances, per document, in choice order."""
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [sorted(by_doc[d], key=lambda i: i.idx) for d in sorted(by_doc)]


LL_TASKS = ["arc_challenge", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande",
            *(f"mmlu_{s}" for s in MMLU_SUBJECTS)]


def _our_docs(name: str, shots: int | None = None):
    task = get_task(name)
    k = task.default_fewshot if shots is None else min(shots, task.default_fewshot)
    return task, task.docs(DataDir(SAMPLE_DIR, is_sample=True), k, N, SEED)


# The numeric comparisons run fewer shots than the prompt comparisons (same formats, already checked above):
# HFLM's full-vocabulary log-softmax over 25-shot contexts would dominate the test time.
NUMERIC_SHOTS = 2
NUMERIC_ITEMS = 2
NUMERIC_TASKS = [n for n in LL_TASKS if n != "mmlu_high_school_us_history"]  # its passages make HFLM slow


@pytest.mark.parametrize("name", LL_TASKS)
def test_requests_equal_lm_eval(lm_tasks, name):
    _, docs = _our_docs(name)
    lm = _lm_docs(lm_tasks[name])
    assert len(docs) == len(lm) == N
    for d, insts in zip(docs, lm, strict=True):
        assert d.requests == [tuple(i.arguments) for i in insts]


def test_gsm8k_prompts_equal_lm_eval(lm_tasks):
    task, docs = _our_docs("gsm8k")
    lm = _lm_docs(lm_tasks["gsm8k"])
    for d, (inst,) in zip(docs, lm, strict=True):
        context, gen_kwargs = inst.arguments
        assert d.prompt == context
        assert tuple(gen_kwargs["until"]) == task.stop and not gen_kwargs["do_sample"]


# ------------------------------------------------------------------------------------------------------------------
# numbers against HFLM


@pytest.fixture(scope="module")
def models(falcon_dir):
    import transformers
    from lm_eval.models.huggingface import HFLM

    hf = transformers.AutoModelForCausalLM.from_pretrained(falcon_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(falcon_dir)
    hflm = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device="cpu")
    return hflm, gyrfalcon.load(falcon_dir)


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]


def _extra_pairs(llm, lm_tasks) -> list[tuple[str, str]]:
    """Edge cases: an empty context, a context ending in a space, and continuations that are the model's own greedy
    text (so that is_greedy is True somewhere)."""
    ctx = lm_tasks["arc_challenge"].instances[0].arguments[0][-300:]
    out = [("", "Hello world"), ("Question: is the sky blue?\nAnswer: ", "yes"), (ctx, " no")]
    for c in (ctx, "The quick brown fox", "Q: What is 2+2?\nA:"):
        toks = llm.generate(c, max_new_tokens=3, ignore_eos=True)[0].token_ids
        out.append((c, llm.tokenizer.decode(toks)))
    return out


@pytest.fixture(scope="module")
def numeric(lm_tasks, models):
    """Our requests for every loglikelihood task (fewer shots and items) plus edge cases, and HFLM's answers."""
    hflm, llm = models
    pairs, groups, spans = [], [], {}
    for name in NUMERIC_TASKS:
        task, docs = _our_docs(name, NUMERIC_SHOTS)
        docs = docs[:NUMERIC_ITEMS]
        spans[name] = (task, docs, len(pairs))
        for d in docs:
            pairs += d.requests
            groups += [d.group] * len(d.requests)
    extra = _extra_pairs(llm, lm_tasks)
    pairs += extra
    groups += [None] * len(extra)
    return pairs, groups, spans, hflm.loglikelihood(_instances(pairs), disable_tqdm=True)


def _assert_same(got, want):
    diffs = [abs(a - b) for (a, _), (b, _) in zip(got, want, strict=True)]
    assert max(diffs) < ATOL, max(diffs)
    assert [g for _, g in got] == [g for _, g in want]


def test_loglikelihoods_equal_hflm_and_accuracies_equal_lm_eval(lm_tasks, models, numeric):
    _, llm = models
    pairs, groups, spans, want = numeric
    got = Scorer.for_llm(llm, batch_size=4).loglikelihood(pairs, groups)
    _assert_same(got, want)
    assert any(g for _, g in want[-3:]), "the greedy continuations should be greedy"

    for name, (task, docs, at) in spans.items():
        for d, insts in zip(docs, _lm_docs(lm_tasks[name])[:NUMERIC_ITEMS], strict=True):
            n = len(d.requests)
            theirs = lm_tasks[name].process_results(insts[0].doc, [tuple(x) for x in want[at : at + n]])
            ours = task.score(d, got[at : at + n])
            assert ours and set(ours) <= set(theirs)
            for k, v in ours.items():
                assert v == pytest.approx(theirs[k], abs=1e-6), (name, k)
            at += n


def test_harness_model_is_registered_and_matches_hflm(models, numeric):
    from lm_eval.api.registry import get_model

    import gyrfalcon.eval.harness as harness

    _, llm = models
    pairs, _, _, want = numeric
    assert get_model("gyrfalcon") is harness.GyrfalconLM
    ours = harness.GyrfalconLM(llm=llm, batch_size="4")
    _assert_same(ours.loglikelihood(_instances(pairs), disable_tqdm=True), want)


def test_rolling_loglikelihood_and_perplexity_equal_hflm(models):
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import gyrfalcon.eval.harness as harness
    from gyrfalcon.eval.tasks.perplexity import windows

    hflm, llm = models
    short = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, batch_size=4, device="cpu", max_length=48)
    text = (SAMPLE_DIR / "perplexity/tinyshakespeare_excerpt.txt").read_text(encoding="utf-8")[:700]
    insts = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("Hi.",), 1)]
    want = short.loglikelihood_rolling(insts, disable_tqdm=True)
    got = harness.GyrfalconLM(llm=llm, max_length=48).loglikelihood_rolling(insts, disable_tqdm=True)
    # HFLM hands back the rolling total as an fp32 number (the text's is ~-2661 nats, where fp32's grid is 2.4e-4
    # wide), ours is summed in fp64: allow that rounding of the reference on top of ATOL.
    tol = [ATOL + float(np.spacing(np.float32(abs(w)))) for w in want]
    assert all(abs(a - b) < t for a, b, t in zip(got, want, tol, strict=True)), (got, want)
    # the perplexity task with stride == window is the same sum
    reqs = windows(llm.tokenizer.encode(text), 11, 48, 48)
    total = sum(ll for ll, _ in Scorer.for_llm(llm, max_length=48).loglikelihood_tokens(reqs))
    assert abs(total - want[0]) < tol[0]
    assert isinstance(transformers.__version__, str)


def test_generate_until_equals_hflm(lm_tasks, models):
    hflm, llm = models
    from lm_eval.api.instance import Instance

    import gyrfalcon.eval.harness as harness

    prompt = lm_tasks["gsm8k"].instances[0].arguments[0][-400:]
    kw = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 8}
    insts = [Instance("generate_until", {}, (prompt, dict(kw)), 0),
             Instance("generate_until", {}, ("Q: What is 2+2?\nA:", dict(kw)), 1)]
    want = hflm.generate_until(insts, disable_tqdm=True)
    got = harness.GyrfalconLM(llm=llm).generate_until(insts, disable_tqdm=True)
    assert got == want
