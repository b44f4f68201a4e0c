"""The command line: real commands on a random model, and bad input that must give a usage error, not a trace."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from gyrfalcon.cli import main

from .conftest import SHARED_DATA


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json(falcon_dir, capsys):
    code, out, _ = run(["generate", "Hello world", "--model", str(falcon_dir), "-n", "5", "-t", "0", "--json",
                        "--ignore-eos"], capsys)
    assert code == 0
    row = json.loads(out)
    assert len(row["token_ids"]) == 5 and row["finish_reason"] == "length" and row["prompt_tokens"] == 2


def test_generate_streams_prompt_then_text(falcon_dir, capsys):
    code, out, _ = run(["generate", "Hello world", "--model", str(falcon_dir), "-n", "5", "-t", "0",
                        "--ignore-eos"], capsys)
    assert code == 0 and out.startswith("Hello world") and len(out) > len("Hello world\n")


def test_generate_reads_stdin(falcon_dir, capsys, monkeypatch):
    code, out, _ = run(["generate", "--model", str(falcon_dir), "-n", "3", "--json", "--seed", "1"], capsys,
                       stdin="Once upon a time", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out)["prompt_tokens"] == 4


def test_chat_through_a_pipe(falcon_dir, capsys, monkeypatch):
    code, out, _ = run(["chat", "--model", str(falcon_dir), "-n", "4", "--seed", "0"], capsys,
                       stdin="Hi there\n\n/reset\nWhat now?\n", monkeypatch=monkeypatch)
    assert code == 0 and out.count("\n") == 2  # one reply line per user message


@pytest.mark.skipif(not (SHARED_DATA / "falcon_configs").is_dir(), reason="shared configs absent")
def test_info_from_config_alone(capsys):
    code, out, _ = run(["info", str(SHARED_DATA / "falcon_configs" / "falcon-7b"), "--json"], capsys)
    r = json.loads(out)
    assert code == 0 and r["kv_heads"] == 1 and r["heads"] == 71 and r["layers"] == 32
    assert 6.8e9 < r["parameters"] < 7.3e9
    kv = r["kv_cache_bf16"]
    assert kv["per_token"] == 2 * 32 * 64 * 2 and kv["multi_head_per_token"] == 71 * kv["per_token"]
    code, text, _ = run(["info", str(SHARED_DATA / "falcon_configs" / "falcon-40b")], capsys)
    assert "128 query heads, 8 KV heads" in text and "16x more" in text


@pytest.mark.parametrize("argv, words", [
    (["generate", "hi", "--temperature", "-2"], "temperature"),
    (["generate", "hi", "--model", "/nonexistent/model"], "nonexistent"),
    (["generate", "hi", "--top-p", "7"], "top_p"),
    (["info", "/nonexistent/x"], "nonexistent"),
])
def test_bad_input_is_a_usage_error(argv, words, capsys, falcon_dir):
    if "--model" not in argv and argv[0] == "generate":
        argv = argv + ["--model", str(falcon_dir)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and "Traceback" not in err


def test_unknown_flag_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--no-such-flag"])
    assert exc.value.code == 2 and "usage" in capsys.readouterr().err
    assert main([]) == 2


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "gyrfalcon.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("generate", "chat", "info", "train"):
        assert cmd in out
