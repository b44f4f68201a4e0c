"""Where the evaluation data lives, and reading it.

The data is the public files described in each folder's SOURCE.md (ARC and WinoGrande in llm-foundry's jsonl form,
HellaSwag in llama.cpp's 6-lines-per-item text form, MMLU's per-subject CSVs, TruthfulQA's v0 mc_task.json, GSM8K's
jsonl). Lookup order for the folder holding them:

1. an explicit directory (`--data-dir`, `evaluate(data_dir=...)`);
2. the `GYRFALCON_EVAL_DATA` environment variable;
3. `shared/data/eval` next to a source checkout (`<checkout>/../shared/data/eval`);
4. the small sample shipped inside the package (`gyrfalcon/assets/eval_sample`), so that `gyrfalcon eval` works
   when installed; results on it are flagged as such.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PACKAGE_DIR / "assets" / "eval_sample"
CHECKOUT_DATA_DIR = PACKAGE_DIR.parents[1] / "shared" / "data" / "eval"
ENV_VAR = "GYRFALCON_EVAL_DATA"


class EvalDataError(ValueError):
    """Evaluation data that is missing or malformed: the message names the file and what was expected."""


@dataclass
class DataDir:
    """The evaluation data folder in use; `files` records every file read (relative path -> sha256)."""

    root: Path
    is_sample: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def path(self, relative: str, task: str) -> Path:
        p = self.root / relative
        if not p.is_file():
            hint = " (the bundled sample)" if self.is_sample else ""
            raise EvalDataError(
                f"task {task!r} needs {relative} under the evaluation data folder {self.root}{hint}, but it is "
                f"missing; point --data-dir (or ${ENV_VAR}) at a folder laid out like shared/data/eval")
        return p

    def read_text(self, relative: str, task: str) -> str:
        p = self.path(relative, task)
        raw = p.read_bytes()
        self.files[relative] = hashlib.sha256(raw).hexdigest()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalDataError(f"{p} is not UTF-8 text: {e}") from e

    def read_jsonl(self, relative: str, task: str) -> list[dict]:
        rows = []
        for n, line in enumerate(self.read_text(relative, task).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{self.root / relative}:{n}: not a JSON line: {e}") from e
        return rows

    def read_json(self, relative: str, task: str):
        try:
            return json.loads(self.read_text(relative, task))
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{self.root / relative}: not JSON: {e}") from e

    def exists(self, relative: str) -> bool:
        return (self.root / relative).exists()


def find_data_dir(explicit: str | os.PathLike | None = None) -> DataDir:
    """The evaluation data folder, by the lookup order in the module docstring."""
    if explicit is not None:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise EvalDataError(f"evaluation data folder {root} does not exist")
        return DataDir(root.resolve(), is_sample=root.resolve() == SAMPLE_DIR)
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise EvalDataError(f"${ENV_VAR}={env} is not a folder")
        return DataDir(root.resolve())
    if CHECKOUT_DATA_DIR.is_dir():
        return DataDir(CHECKOUT_DATA_DIR.resolve())
    if not SAMPLE_DIR.is_dir():
        raise EvalDataError(f"no evaluation data: pass --data-dir or set ${ENV_VAR} (the bundled sample "
                            f"{SAMPLE_DIR} is missing from this installation)")
    return DataDir(SAMPLE_DIR, is_sample=True)
