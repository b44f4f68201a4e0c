"""MMLU (Hendrycks et al.), lm-eval's `mmlu` group: 57 subjects, each 5-shot from its dev split.

    The following are multiple choice questions (with answers) about <subject words>.\\n\\n
    <question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <letter>\\n\\n      x 5 (the dev split, in order)
    <question>\\nA. ...\\nAnswer:                                             continuation " A" / " B" / " C" / " D"

Metrics: acc per subject; per category (stem, humanities, social sciences, other) and overall as lm-eval
aggregates them (weighted by subject size: `acc`, the "micro" average), and the plain mean over subjects
(`acc_macro`, what the Open LLM Leaderboard v1 averaged). `--limit N` takes the first N questions of every subject.

The description and the five dev examples are the same for every question of a subject: that prefix is computed
once per subject (the scorer's group), and each question adds only its own tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from ..data import DataDir, EvalDataError
from ..metrics import Metric, mean, mean_stderr, pooled_stderr, unweighted_stderr
from .base import Doc, Task, TaskResult, take

LETTERS = ("A", "B", "C", "D")

# subject -> category, as lm-eval groups them
SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")


def read_csv(data: DataDir, relative: str, task: str) -> list[dict]:
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(data.read_text(relative, task))), 1):
        if not row:
            continue
        if len(row) != 6 or row[5] not in LETTERS:
            raise EvalDataError(f"{data.root / relative}:{n}: expected question,A,B,C,D,answer (A-D); got {row!r}")
        rows.append({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5])})
    return rows


def question_text(row: dict) -> str:
    options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, row["choices"], strict=True))
    return f"{row['question'].strip()}{options}\nAnswer:"


class MMLUTask(Task):
    kind = "loglikelihood"
    default_fewshot = 5
    max_fewshot = 5  # the dev split has five questions per subject
    metric_names = ("acc",)

    def __init__(self, subjects: Sequence[str] | None = None):
        self.subjects = list(subjects) if subjects else list(SUBJECTS)
        whole = self.subjects == list(SUBJECTS)
        self.name = "mmlu" if whole else f"mmlu_{self.subjects[0]}"
        self.leaderboard_metric = "acc_macro" if whole else None
        self.description = ("MMLU, 57 subjects, acc per subject / category, micro and macro averages" if whole
                            else f"MMLU subject {self.subjects[0]}")

    def fewshot_source(self, k: int) -> str:
        return "none (0-shot)" if k == 0 else f"the first {k} questions of each subject's dev split (as lm-eval)"

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        docs = []
        for subject in self.subjects:
            words = subject.replace("_", " ")
            header = f"The following are multiple choice questions (with answers) about {words}.\n\n"
            dev = read_csv(data, f"mmlu/dev/{subject}_dev.csv", self.name)[:num_fewshot]
            if len(dev) < num_fewshot:
                raise EvalDataError(f"mmlu/dev/{subject}_dev.csv has {len(dev)} questions; {num_fewshot} asked for")
            prefix = header + "".join(f"{question_text(r)} {LETTERS[r['answer']]}\n\n" for r in dev)
            for r in take(read_csv(data, f"mmlu/test/{subject}_test.csv", self.name), limit):
                docs.append(Doc(requests=[(prefix + question_text(r), " " + x) for x in LETTERS], gold=r["answer"],
                                choices=list(LETTERS), group=f"mmlu/{subject}", meta={"subject": subject}))
        return docs

    def aggregate(self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]) -> TaskResult:
        per_subject: dict[str, list[float]] = {}
        for d, s in zip(docs, scores, strict=True):
            per_subject.setdefault(d.meta["subject"], []).append(s["acc"])
        subjects = {name: {"acc": mean(v), "stderr": mean_stderr(v), "n": len(v), "category": SUBJECTS[name]}
                    for name, v in per_subject.items()}

        def pooled(names: list[str]) -> dict:
            sizes = [subjects[s]["n"] for s in names]
            acc = sum(subjects[s]["acc"] * n for s, n in zip(names, sizes, strict=True)) / sum(sizes)
            return {"acc": acc, "stderr": pooled_stderr([subjects[s]["stderr"] for s in names], sizes),
                    "n": sum(sizes), "subjects": len(names)}

        categories = {}
        for cat in CATEGORIES:
            names = [s for s in subjects if SUBJECTS[s] == cat]
            if names:
                categories[cat] = pooled(names)
        names = list(subjects)
        micro = pooled(names)
        macro = mean([subjects[s]["acc"] for s in names])
        metrics = [Metric("acc", micro["acc"], micro["stderr"])]
        if len(names) > 1:
            metrics.append(Metric("acc_macro", macro, unweighted_stderr([subjects[s]["stderr"] for s in names])))
        return TaskResult(metrics, len(docs), {"categories": categories, "subjects": subjects})
