"""Tasks, metrics, the runner and `gyrfalcon eval` on a small random Falcon with the real tokenizer: the registry and
its errors, data lookup, few-shot sampling as lm-eval does it, the metric arithmetic, perplexity windows, the JSON
configuration, determinism, and the command line (errors before any model is loaded)."""

from __future__ import annotations

import json
import random

import pytest

import gyrfalcon
from gyrfalcon.cli import main
from gyrfalcon.eval import EvalDataError, UnknownTaskError, evaluate, format_results, parse_tasks
from gyrfalcon.eval.data import SAMPLE_DIR, DataDir, find_data_dir
from gyrfalcon.eval.metrics import exact_match, extract_answer, mean_stderr, multiple_choice
from gyrfalcon.eval.tasks import TASKS, get_task
from gyrfalcon.eval.tasks.base import FewshotSampler
from gyrfalcon.eval.tasks.gsm8k import GSM8KTask
from gyrfalcon.eval.tasks.hellaswag import restore_capital
from gyrfalcon.eval.tasks.mmlu import SUBJECTS, MMLUTask
from gyrfalcon.eval.tasks.perplexity import windows

from .conftest import SHARED_DATA

FULL_DATA = SHARED_DATA / "eval"
SAMPLE = DataDir(SAMPLE_DIR, is_sample=True)


@pytest.fixture(scope="module")
def llm(falcon_dir):
    return gyrfalcon.load(falcon_dir)


# ------------------------------------------------------------------------------------------------------------------
# registry and data


def test_registry_names_and_errors():
    assert parse_tasks("arc_challenge, hellaswag,arc_challenge") == ["arc_challenge", "hellaswag"]
    assert len([n for n in TASKS if n.startswith("mmlu_")]) == len(SUBJECTS) == 57
    with pytest.raises(UnknownTaskError, match="did you mean hellaswag"):
        parse_tasks("helaswag")
    with pytest.raises(UnknownTaskError, match="no task"):
        parse_tasks(" , ")


def test_every_task_loads_from_the_bundled_sample():
    for name in ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande",
                 "gsm8k", "perplexity"):
        task = get_task(name)
        docs = task.docs(SAMPLE, task.default_fewshot, 2, 1234)
        assert docs, name
    assert len(MMLUTask().docs(SAMPLE, 5, 1, 1234)) == 57


@pytest.mark.skipif(not FULL_DATA.is_dir(), reason="../shared/data/eval not present")
def test_full_data_counts():
    data = DataDir(FULL_DATA)
    assert len(get_task("arc_challenge").docs(data, 0, None, 0)) == 1172
    assert len(get_task("hellaswag").docs(data, 0, None, 0)) == 10042
    assert len(get_task("winogrande").docs(data, 0, None, 0)) == 1267
    assert len(get_task("truthfulqa_mc2").docs(data, 0, None, 0)) == 817
    assert len(get_task("mmlu_anatomy").docs(data, 5, None, 0)) == 135
    assert find_data_dir().root == FULL_DATA.resolve()


def test_missing_data_names_the_file(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        find_data_dir(tmp_path / "nope")
    with pytest.raises(EvalDataError, match="arc/arc_challenge_test.jsonl"):
        get_task("arc_challenge").docs(DataDir(tmp_path), 25, 2, 0)
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "arc_easy_test.jsonl").write_text('{"query": "Question: x"}\n')
    with pytest.raises(EvalDataError, match="gold index"):
        get_task("arc_easy").docs(DataDir(tmp_path), 0, 2, 0)


def test_fewshot_sampler_equals_lm_eval():
    samplers = pytest.importorskip("lm_eval.api.samplers")
    docs = [{"q": i % 37} for i in range(40)]  # duplicates: equal documents are excluded too
    keys = [json.dumps(d) for d in docs]
    ours = FewshotSampler(keys, 1234)
    theirs = samplers.ContextSampler(docs, rnd=1234)
    for i in range(25):
        assert [docs[j] for j in ours.sample(5, exclude=keys[i])] == theirs.sample(5, eval_doc=docs[i])
    ours, theirs = FewshotSampler(keys, 7), samplers.ContextSampler(docs, rnd=7)
    for _ in range(5):
        assert [docs[j] for j in ours.sample(3)] == theirs.sample(3)


def test_hellaswag_capital_restored_for_activitynet_only():
    assert restore_capital("Shingle removal: A man is on a roof. he") == "Shingle removal: A man is on a roof. He"
    assert restore_capital("Canoeing: the child") == "Canoeing: The child"
    assert restore_capital("Family Life: Talk to them. then listen") == "Family Life: Talk to them. then listen"
    assert restore_capital('Camel ride: A man rides. " a camel') == 'Camel ride: A man rides. " a camel'


# ------------------------------------------------------------------------------------------------------------------
# metrics


def test_multiple_choice_and_stderr():
    assert multiple_choice([-3.0, -2.0, -9.0], 1, ["aaaa", "b", "cc"]) == {"acc": 1.0, "acc_norm": 0.0}
    assert mean_stderr([1.0]) is None
    assert mean_stderr([0.0, 1.0, 1.0, 0.0]) == pytest.approx(0.2886751345948129)


@pytest.mark.parametrize("text, strict, flexible", [
    (" She pays 3 * 2 = $6.\n#### 6", "6", "6"),
    (" 1,000 apples, so #### 1,000.", "1,000.", "1,000."),
    (" The answer is $12.50 today", "[invalid]", "$12.50"),
    (" no digits at all", "[invalid]", "[invalid]"),
    (" -7 and then 42", "[invalid]", "42"),
])
def test_gsm8k_extraction_as_lm_eval(text, strict, flexible):
    assert extract_answer(text, flexible=False) == strict
    assert extract_answer(text, flexible=True) == flexible
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    assert extraction.RegexFilter(r"#### (\-?[0-9\.\,]+)").apply([[text]], [None]) == [[strict]]
    flex = extraction.RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    assert flex.apply([[text]], [None]) == [[flexible]]


def test_gsm8k_exact_match_normalization():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024"
    assert exact_match("1024", ref) == exact_match("$1,024.", ref) == 1.0
    assert exact_match("[invalid]", ref) == 0.0
    metrics = pytest.importorskip("lm_eval.api.metrics")
    for pred in ("1024", "$1,024.", "1,02", "[invalid]"):
        theirs = metrics.exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"],
                                                 ignore_case=True)["exact_match"]
        assert exact_match(pred, ref) == theirs


def test_mmlu_aggregates_micro_macro_and_categories():
    task = MMLUTask()
    docs = get_task("mmlu").docs(SAMPLE, 0, 2, 0)[:8]  # abstract_algebra, anatomy, astronomy, business_ethics
    scores = [{"acc": float(i % 3 == 0)} for i in range(len(docs))]
    res = task.aggregate(docs, scores)
    by = {m.name: m.value for m in res.metrics}
    assert by["acc"] == pytest.approx(3 / 8)
    assert by["acc_macro"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1 / 2) / 4)
    assert res.breakdown["categories"]["stem"]["n"] == 6 and res.breakdown["categories"]["other"]["acc"] == 0.5


def test_perplexity_windows_score_every_token_once():
    toks = list(range(100, 137))
    for window, stride in ((8, 8), (8, 3), (50, 10), (1, 1)):
        ws = windows(toks, 0, window, stride)
        assert [t for r in ws for t in r.continuation] == toks
        assert ws[0].context == (0,)
        for r in ws[1:]:
            assert len(r.context) + len(r.continuation) - 1 == window  # the model sees `window` tokens
            assert len(r.continuation) <= stride
    with pytest.raises(ValueError):
        windows(toks, 0, 4, 5)


# ------------------------------------------------------------------------------------------------------------------
# the runner


def test_evaluate_is_deterministic_and_records_its_configuration(llm, monkeypatch):
    monkeypatch.setattr(GSM8KTask, "max_new_tokens", 8)  # the prompt machinery, not 256 slow random tokens
    tasks = "arc_easy,hellaswag,mmlu_anatomy,truthfulqa_mc2,winogrande,gsm8k,perplexity"
    kw = dict(limit=2, batch_size=3, data_dir=SAMPLE_DIR, perplexity_window=64, progress=False)
    a = evaluate(llm, tasks, **kw)
    b = evaluate(llm, tasks, **kw)
    # wall-clock seconds are the only thing allowed to differ, at any depth of the per-task results
    strip = [{task: {k: v for k, v in res.items() if k != "seconds"} for task, res in r.items()}
             for r in (a["results"], b["results"])]
    assert json.dumps(strip[0], sort_keys=True) == json.dumps(strip[1], sort_keys=True)
    assert list(a["results"]) == tasks.split(",")
    cfg = a["config"]
    assert cfg["seed"] == 1234 and cfg["limit"] == 2 and cfg["batch_size"] == 3 and cfg["max_length"] == 2048
    assert cfg["model"]["dtype"] == "float32" and cfg["gyrfalcon_version"] == gyrfalcon.__version__
    assert a["data"]["is_sample"] and "arc/arc_easy_test.jsonl" in a["data"]["files"]
    arc = a["results"]["arc_easy"]
    assert arc["num_fewshot"] == 25 and "test split itself" in arc["fewshot_source"] and arc["n"] == 2
    assert set(arc["metrics"]) == {"acc", "acc_norm"}
    ppl = a["results"]["perplexity"]
    assert ppl["breakdown"]["window"] == 64 and ppl["breakdown"]["stride"] == 32 and ppl["breakdown"]["windows"] == 2
    assert ppl["metrics"]["token_perplexity"]["value"] > 1
    avg = a["leaderboard_average"]
    assert set(avg["tasks"]) == {"hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k"}
    assert avg["missing"] == ["arc_challenge", "mmlu"]
    table = format_results(a)
    assert "Open LLM Leaderboard (v1) average over 4 of 6 tasks" in table and "bundled" in table


def test_batch_size_and_seed_change_only_what_they_should(llm):
    kw = dict(limit=3, data_dir=SAMPLE_DIR, progress=False)
    a = evaluate(llm, "arc_challenge", batch_size=1, **kw)["results"]["arc_challenge"]["metrics"]
    b = evaluate(llm, "arc_challenge", batch_size=16, **kw)["results"]["arc_challenge"]["metrics"]
    assert a == b
    rnd = random.Random(0)
    docs = [get_task("winogrande").docs(SAMPLE, 5, 2, s)[1].requests[0][0] for s in (rnd.randrange(99), 1234)]
    assert docs[0] != docs[1]  # the seed picks the few-shot examples


@pytest.mark.parametrize("kwargs, match", [
    (dict(limit=0), "limit must be a positive"),
    (dict(limit=2.5), "limit must be a positive"),
    (dict(num_fewshot=-1), "num_fewshot"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_fewshot=6, tasks="mmlu_anatomy"), "at most 5"),
])
def test_evaluate_rejects_bad_options(llm, kwargs, match):
    tasks = kwargs.pop("tasks", "arc_easy")
    with pytest.raises(ValueError, match=match):
        evaluate(llm, tasks, data_dir=SAMPLE_DIR, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# the command


def test_cli_writes_table_and_json(falcon_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", str(falcon_dir), "--tasks", "arc_challenge,mmlu_anatomy", "--limit", "2",
                 "--num-fewshot", "1", "--batch-size", "4", "--data-dir", str(SAMPLE_DIR), "--out", str(out),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "arc_challenge" in printed and "acc_norm" in printed and "± " in printed
    saved = json.loads(out.read_text())
    assert saved["config"]["num_fewshot"] == 1 and saved["config"]["model"]["path"] == str(falcon_dir)
    assert saved["config"]["arguments"]["tasks"] == "arc_challenge,mmlu_anatomy"
    assert saved["results"]["mmlu_anatomy"]["num_fewshot"] == 1


@pytest.mark.parametrize("argv, match", [
    (["--tasks", "arc_chalenge"], "unknown task 'arc_chalenge' \\(did you mean arc_challenge"),
    (["--tasks", "arc_easy", "--limit", "0"], "limit must be a positive"),
    (["--tasks", "arc_easy", "--limit", "many"], "invalid int value"),
    (["--tasks", "arc_easy", "--data-dir", "/nonexistent/eval"], "does not exist"),
    (["--tasks", "arc_easy", "--out", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_cli_errors_are_clear(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "/nonexistent/model", *argv])
    assert e.value.code == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)
