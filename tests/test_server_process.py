"""`gyrfalcon serve` as users run it, in its own process: SIGTERM drains running requests within
--shutdown-timeout, cancels what is left, and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

SHUTDOWN_TIMEOUT = 6.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(falcon_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gyrfalcon.cli", "serve", str(falcon_dir), "--port", str(port),
         "--kv-cache-bytes", "64MiB", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-batch-size", "32",
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the server died:\n" + open(tmp_path / "server.log").read()
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield proc, url, tmp_path / "server.log"
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()


def open_stream(client: httpx.Client, max_tokens: int, n: int = 1) -> tuple[httpx.Response, object]:
    req = client.build_request("POST", "/v1/completions", json={
        "prompt": "The quick brown fox", "max_tokens": max_tokens, "n": n, "ignore_eos": True, "temperature": 0,
        "stream": True})
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    next(line for line in lines if line.startswith("data:"))  # it is running
    return resp, lines


def drain(lines) -> tuple[list[dict], bool, bool]:
    """(chunks, saw [DONE], ended cleanly) of the rest of a stream."""
    chunks, done = [], False
    try:
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data:"):
                chunks.append(json.loads(line[5:]))
        return chunks, done, True
    except httpx.HTTPError:
        return chunks, done, False


def test_sigterm_drains_then_exits_zero(served):
    proc, url, log = served
    client = httpx.Client(base_url=url, timeout=60)
    # A request that finishes within the drain window, and one that cannot: 16 x 2040 tokens, whose ~9 MB of
    # events this client does not even read until the server is gone.
    short, short_lines = open_stream(client, 8)
    long, long_lines = open_stream(client, 2040, n=16)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    chunks, done, clean = drain(short_lines)
    assert clean and done, "the running request is finished, not cut"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"]) >= 7

    # No new connections once the drain has begun.
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.ConnectError:
            break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)

    rc = proc.wait(timeout=SHUTDOWN_TIMEOUT + 60)
    elapsed = time.monotonic() - t0
    assert rc == 0, open(log).read()
    text = open(log).read()
    assert "Traceback" not in text, text
    assert elapsed >= SHUTDOWN_TIMEOUT - 1, "the server waited for the running request"
    assert elapsed < SHUTDOWN_TIMEOUT + 30
    _, done, _ = drain(long_lines)
    assert not done, "the long request was cancelled at --shutdown-timeout"
    short.close()
    long.close()
    client.close()


def test_serve_arguments():
    import argparse

    from gyrfalcon.cli import build_parser
    from gyrfalcon.server.cli import parse_bytes

    assert parse_bytes("268435456") == 268435456
    assert parse_bytes("256MiB") == 256 * 2**20 and parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    for bad in ("lots", "-1", "0", "5 parsecs"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
    args = build_parser().parse_args(["serve", "some/model", "--port", "0", "--kv-cache-bytes", "1GiB",
                                      "--api-key", "k", "--max-waiting", "3", "--shutdown-timeout", "2.5"])
    assert (args.model_pos, args.port, args.kv_cache_bytes, args.api_key, args.max_waiting,
            args.shutdown_timeout) == ("some/model", 0, 2**30, "k", 3, 2.5)
