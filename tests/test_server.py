"""The HTTP server in this process, over a real socket on 127.0.0.1, spoken to by the real `text-generation` and
`openai` client packages and by raw HTTP: results equal llm.generate, SSE framing, every validation case, 429,
client disconnects, the API key, metrics and traces.

The model is the random Falcon with the real tokenizer from conftest (`falcon_dir`). Waits are bounded polls of
/metrics, never sleeps whose length decides the outcome.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

import gyrfalcon  # noqa: E402
from gyrfalcon.runtime.engine import EngineConfig  # noqa: E402
from gyrfalcon.server import ServerConfig, create_app  # noqa: E402

PROMPT = "The quick brown fox"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text-generation calls pydantic .dict()


class LiveServer:
    """uvicorn running `app` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def metric(self, name: str, headers: dict | None = None, **labels) -> float:
        text = self.http.get("/metrics", headers=headers).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
            if m and m.group(1) == name:
                got = ",".join(sorted(m.group(2)[1:-1].split(","))) if m.group(2) else ""
                if got == want:
                    return float(m.group(3))
        return 0.0

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def llm(falcon_dir):
    return gyrfalcon.load(falcon_dir)


@pytest.fixture(scope="module")
def live(llm):
    s = LiveServer(create_app(llm, ServerConfig(model_name="random-falcon")))
    yield s
    s.stop()


@pytest.fixture()
def make_server(llm):
    started = []

    def make(**kw):
        engine = kw.pop("engine", None)
        s = LiveServer(create_app(llm, ServerConfig(model_name="random-falcon", engine=engine, **kw)))
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def sse_events(raw: str) -> list[str]:
    """The data fields of an SSE body, checking the framing: `data: ...` lines, events ended by a blank line."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in raw.split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]  # ':' lines are keep-alive comments
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        events.append(lines[0][len("data: "):])
    return events


# ---------------------------------------------------------------------------------------------------------------
# the real clients


def test_text_generation_client_matches_llm_generate(live, llm):
    tg = pytest.importorskip("text_generation")
    client = tg.Client(live.url, timeout=60)
    expected = llm.generate(PROMPT, max_new_tokens=12)[0]
    r = client.generate(PROMPT, max_new_tokens=12)
    assert r.generated_text == expected.text
    assert [t.id for t in r.details.tokens] == expected.token_ids
    assert r.details.generated_tokens == 12 and r.details.finish_reason.value == "length"

    sampled = llm.generate(PROMPT, max_new_tokens=10, temperature=0.7, top_p=0.9, seed=42)[0]
    r = client.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, seed=42)
    assert [t.id for t in r.details.tokens] == sampled.token_ids and r.details.seed == 42

    stream = list(client.generate_stream(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9,
                                         seed=42))
    assert [s.token.id for s in stream] == sampled.token_ids
    assert "".join(s.token.text for s in stream if not s.token.special) == sampled.text
    assert stream[-1].generated_text == sampled.text and stream[-1].details.generated_tokens == 10
    assert all(s.generated_text is None for s in stream[:-1])


def test_text_generation_client_stop_sequence(live, llm):
    tg = pytest.importorskip("text_generation")
    full = llm.generate(PROMPT, max_new_tokens=24)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    r = tg.Client(live.url, timeout=60).generate(PROMPT, max_new_tokens=24, stop_sequences=[stop])
    assert r.generated_text == full[: full.find(stop)]
    assert r.details.finish_reason.value == "stop_sequence"


def test_text_generation_client_chat(live):
    tg = pytest.importorskip("text_generation")
    client = tg.Client(live.url, timeout=60)
    messages = [tg.types.Message(role="user", content="Hello there")]
    r = client.chat(messages, max_tokens=6, seed=1, temperature=0.5)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage["completion_tokens"] >= 1
    # (Its chat *streaming* predates `data: [DONE]`, which OpenAI clients expect and this server sends.)


def test_openai_client_completions(live, llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    expected = llm.generate(PROMPT, max_new_tokens=10, temperature=0.8, seed=3, num_return_sequences=2)
    r = client.completions.create(model="random-falcon", prompt=PROMPT, max_tokens=10, temperature=0.8, seed=3, n=2)
    assert [c.text for c in r.choices] == [c.text for c in expected]
    assert r.usage.prompt_tokens == expected[0].prompt_tokens
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.completions.create(model="random-falcon", prompt=PROMPT, max_tokens=10, temperature=0.8, seed=3,
                                       n=2, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in expected] and finish == ["length", "length"]
    assert usage.completion_tokens == r.usage.completion_tokens

    greedy = llm.generate([PROMPT, "Hello world"], max_new_tokens=5, temperature=0.0)
    r = client.completions.create(model="x", prompt=[PROMPT, "Hello world"], max_tokens=5, temperature=0,
                                  stop=["zzzz"])
    assert [c.text for c in r.choices] == [c.text for c in greedy] and [c.index for c in r.choices] == [0, 1]
    ids = llm.tokenizer.encode(PROMPT)
    r = client.completions.create(model="x", prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + greedy[0].text


def test_openai_client_chat(live, llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    prompt = llm.chat_prompt(messages)
    expected = llm.generate(prompt, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=9, stop=["\nUser:"])[0]
    r = client.chat.completions.create(model="random-falcon", messages=messages, max_tokens=8, temperature=0.9,
                                       top_p=0.95, seed=9)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == expected.prompt_tokens

    stream = client.chat.completions.create(model="random-falcon", messages=messages, max_tokens=8, temperature=0.9,
                                            top_p=0.95, seed=9, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason is not None
    assert [m.id for m in client.models.list().data] == ["random-falcon"]


def test_sse_framing_tgi_and_openai(live):
    r = live.http.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e) for e in sse_events(r.text)]
    assert len(events) == 4 and [e["index"] for e in events] == [0, 1, 2, 3]
    assert set(events[0]) == {"index", "token", "top_tokens", "generated_text", "details"}
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}
    assert events[-1]["details"]["finish_reason"] == "length" and events[-1]["details"]["generated_tokens"] == 4
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)

    compat = live.http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True})
    assert [json.loads(e)["token"]["id"] for e in sse_events(compat.text)] == [e["token"]["id"] for e in events]
    plain = live.http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert isinstance(plain.json(), list) and plain.json()[0]["generated_text"] == events[-1]["generated_text"]

    r = live.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 3, "stream": True})
    data = sse_events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_generate_details_and_full_text(live, llm):
    r = live.http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 3, "details": True, "decoder_input_details": True, "return_full_text": True}}).json()
    ids = llm.tokenizer.encode(PROMPT)
    assert [t["id"] for t in r["details"]["prefill"]] == ids
    assert r["generated_text"].startswith(PROMPT) and r["details"]["seed"] is None
    r = live.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "truncate": 2}})
    assert r.status_code == 200 and "details" not in r.json()


def _reference_logprobs(llm, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
    """log-softmax of the model's logits before each generated token (one forward over prompt + tokens)."""
    ids = llm.tokenizer.encode(prompt) + tokens
    logp = torch.log_softmax(llm.logits(ids), dim=-1)
    start = len(ids) - len(tokens) - 1
    return [logp[start + i] for i in range(len(tokens))]


def test_logprobs_tgi_details_stream_and_top_tokens(live, llm):
    params = {"max_new_tokens": 6, "details": True, "top_n_tokens": 3, "do_sample": True, "seed": 5}
    r = live.http.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    tokens = r["details"]["tokens"]
    ref = _reference_logprobs(llm, PROMPT, [t["id"] for t in tokens])
    for t, top, lp in zip(tokens, r["details"]["top_tokens"], ref, strict=True):
        assert t["logprob"] == pytest.approx(float(lp[t["id"]]), abs=1e-4)
        best = torch.topk(lp, 3)
        assert [x["id"] for x in top] == best.indices.tolist()
        assert [x["logprob"] for x in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    stream = live.http.post("/generate_stream", json={"inputs": PROMPT, "parameters": params})
    events = [json.loads(e) for e in sse_events(stream.text)]
    assert [e["token"]["logprob"] for e in events] == [t["logprob"] for t in tokens]
    assert [e["top_tokens"] for e in events] == r["details"]["top_tokens"]
    plain = live.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}})
    assert all(isinstance(t["logprob"], float) for t in plain.json()["details"]["tokens"])
    assert plain.json()["details"]["top_tokens"] is None


def test_logprobs_openai_completions_and_chat(live, llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = llm.generate(PROMPT, max_new_tokens=5, temperature=0.0)[0].token_ids
    ref = _reference_logprobs(llm, PROMPT, ids)
    assert lp.tokens == [llm.tokenizer.decode([i]) for i in ids]
    assert lp.token_logprobs == pytest.approx([float(x[i]) for x, i in zip(ref, ids, strict=True)], abs=1e-4)
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v, abs=1e-6)  # greedy: the token is the best
               for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    stream = client.completions.create(model="x", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                       stream=True)
    streamed = [x for c in stream for ch in c.choices if ch.logprobs for x in ch.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs

    messages = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
               and bytes(c.bytes).decode() == c.token for c in content)
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                            stream=True)
    streamed = [x.logprob for c in stream for ch in c.choices if ch.logprobs for x in ch.logprobs.content]
    assert streamed == [c.logprob for c in content]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None


def test_info_tokenize_models_openapi_and_page(live, llm):
    info = live.http.get("/info").json()
    assert info["model_id"] == "random-falcon" and info["max_total_tokens"] == llm.max_context
    toks = live.http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in toks] == llm.tokenizer.encode("Hello world")
    assert "".join(t["text"] for t in toks) == "Hello world"
    spec = live.http.get("/openapi.json").json()
    for path in ("/generate", "/generate_stream", "/info", "/health", "/metrics", "/tokenize", "/v1/models",
                 "/v1/completions", "/v1/chat/completions"):
        assert path in spec["paths"], path
    assert "GenerateRequest" in json.dumps(spec["components"])
    page = live.http.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and 'id="stop"' in page.text
    assert live.http.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# validation: 422 naming the field, and the server goes on serving

LONG = "hello " * 2100  # past the 2048-token context on its own

TGI_CASES = [
    ("malformed json", b'{"inputs": "x", ', "body"),
    ("invalid utf-8", b'{"inputs": "caf\xe9"}', "body"),
    ("lone surrogate", b'{"inputs": "a\\ud800b"}', "inputs"),
    ("not an object", b'["x"]', "body"),
    ("empty body", b"", "body"),
    ("missing inputs", {"parameters": {}}, "inputs"),
    ("empty inputs", {"inputs": ""}, "inputs"),
    ("inputs wrong type", {"inputs": 5}, "inputs"),
    ("unknown field", {"inputs": "x", "foo": 1}, "foo"),
    ("unknown parameter", {"inputs": "x", "parameters": {"bogus": 1}}, "parameters.bogus"),
    ("temperature string", {"inputs": "x", "parameters": {"temperature": "hot"}}, "parameters.temperature"),
    ("temperature negative", {"inputs": "x", "parameters": {"temperature": -1.0}}, "parameters.temperature"),
    ("temperature absurd", {"inputs": "x", "parameters": {"temperature": 1e9}}, "parameters.temperature"),
    ("temperature nan", b'{"inputs": "x", "parameters": {"temperature": NaN}}', "parameters.temperature"),
    ("max_new_tokens float", {"inputs": "x", "parameters": {"max_new_tokens": 1.5}}, "parameters.max_new_tokens"),
    ("max_new_tokens negative", {"inputs": "x", "parameters": {"max_new_tokens": -1}}, "parameters.max_new_tokens"),
    ("max_new_tokens absurd", {"inputs": "x", "parameters": {"max_new_tokens": 10**12}},
     "parameters.max_new_tokens"),
    ("past the context", {"inputs": "x", "parameters": {"max_new_tokens": 5000}}, "parameters.max_new_tokens"),
    ("prompt past the context", {"inputs": LONG}, "inputs"),
    ("do_sample not bool", {"inputs": "x", "parameters": {"do_sample": "yes"}}, "parameters.do_sample"),
    ("top_p out of range", {"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ("top_k zero", {"inputs": "x", "parameters": {"top_k": 0}}, "parameters.top_k"),
    ("seed negative", {"inputs": "x", "parameters": {"seed": -5}}, "parameters.seed"),
    ("seed absurd", {"inputs": "x", "parameters": {"seed": 2**70}}, "parameters.seed"),
    ("repetition_penalty zero", {"inputs": "x", "parameters": {"repetition_penalty": 0}},
     "parameters.repetition_penalty"),
    ("stop not a list", {"inputs": "x", "parameters": {"stop": "x"}}, "parameters.stop"),
    ("too many stops", {"inputs": "x", "parameters": {"stop": ["a"] * 17}}, "parameters.stop"),
    ("empty stop", {"inputs": "x", "parameters": {"stop": [""]}}, "parameters.stop"),
    ("best_of", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, "parameters.best_of"),
    ("watermark", {"inputs": "x", "parameters": {"watermark": True}}, "parameters.watermark"),
    ("grammar", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {}}}}, "parameters.grammar"),
    ("truncate zero", {"inputs": "x", "parameters": {"truncate": 0}}, "parameters.truncate"),
    ("top_n_tokens absurd", {"inputs": "x", "parameters": {"top_n_tokens": 50}}, "parameters.top_n_tokens"),
]

OPENAI_CASES = [
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [70000], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2, "echo": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, "foo"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": "2"}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
]


def post(live, path: str, body):
    if isinstance(body, bytes):
        return live.http.post(path, content=body, headers={"content-type": "application/json"})
    return live.http.post(path, json=body)


@pytest.mark.parametrize("case, body, field", TGI_CASES, ids=[c[0] for c in TGI_CASES])
def test_tgi_validation_names_the_field(live, case, body, field):
    r = post(live, "/generate", body)
    assert r.status_code == 422, (case, r.text)
    err = r.json()
    assert err["error_type"] == "validation"
    assert field in err["error"], (field, err["error"])


@pytest.mark.parametrize("path, body, field", OPENAI_CASES, ids=[f"{p}-{f}" for p, _, f in OPENAI_CASES])
def test_openai_validation_names_the_field(live, path, body, field):
    r = post(live, path, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    assert field in err["message"]


def test_server_keeps_serving_after_bad_requests(live, llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="x", prompt="x", max_tokens=5, temperature=7)
    for _, body, _ in TGI_CASES[:6]:
        post(live, "/generate", body)
    assert live.http.get("/health").status_code == 200
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == llm.generate(PROMPT, max_new_tokens=4)[0].text
    assert live.metric("gyrfalcon_requests_total", route="generate", outcome="invalid") >= 6


# ---------------------------------------------------------------------------------------------------------------
# backpressure, disconnects, batching


def long_stream(server, max_tokens: int = 2000) -> httpx.Response:
    """A streaming completion that runs far longer than the test needs it (ignore_eos)."""
    req = server.http.build_request("POST", "/v1/completions", json={
        "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True})
    return server.http.send(req, stream=True)


def test_max_waiting_gives_429_at_once(make_server):
    openai = pytest.importorskip("openai")
    s = make_server(max_waiting=1, engine=EngineConfig(num_blocks=1024, block_size=16, max_batch_size=1,
                                                       max_batch_tokens=64))
    running = long_stream(s)
    lines = running.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))  # it runs: the batch (of 1) is full
    waiting = long_stream(s)  # accepted: waits for the batch
    assert waiting.status_code == 200
    t0 = time.monotonic()
    r = s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
    assert time.monotonic() - t0 < 10, "a 429 must not wait for room"
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="x", prompt="x", max_tokens=2)
    assert s.metric("gyrfalcon_queue_length") == 1
    assert s.metric("gyrfalcon_requests_total", route="generate", outcome="rejected") == 1
    running.close()
    waiting.close()
    s.wait_for(lambda: s.metric("gyrfalcon_kv_blocks_used") == 0 and s.metric("gyrfalcon_queue_length") == 0,
               "both streams to be cancelled")
    r = s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


def test_stream_disconnect_cancels_and_frees_blocks(live):
    before = live.metric("gyrfalcon_requests_total", route="completions", outcome="cancelled")
    resp = long_stream(live)
    lines = resp.iter_lines()
    for _ in range(3):
        next(line for line in lines if line.startswith("data:"))
    assert live.metric("gyrfalcon_kv_blocks_used") > 0
    resp.close()  # the client goes away mid-stream
    live.wait_for(lambda: live.metric("gyrfalcon_requests_total", route="completions", outcome="cancelled")
                  == before + 1, "the request to be cancelled")
    live.wait_for(lambda: live.metric("gyrfalcon_kv_blocks_used") == 0, "the blocks to be freed")
    assert live.metric("gyrfalcon_batch_size") == 0


def test_non_streaming_disconnect_cancels(live):
    before = live.metric("gyrfalcon_requests_total", route="completions", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True,
                                                       "n": 4, "temperature": 0}, timeout=0.3)
    live.wait_for(lambda: live.metric("gyrfalcon_requests_total", route="completions", outcome="cancelled")
                  == before + 1, "the request to be cancelled")
    live.wait_for(lambda: live.metric("gyrfalcon_kv_blocks_used") == 0, "the blocks to be freed")


def test_concurrent_requests_equal_llm_generate_alone(make_server, llm):
    """Batched-equals-alone, through a pool too small for everyone (preemption) and a budget of 16 tokens a step
    (chunked prefill), with requests of every kind in flight together."""
    s = make_server(engine=EngineConfig(num_blocks=40, block_size=4, max_batch_size=8, max_batch_tokens=16,
                                        watermark_blocks=0), max_waiting=64)
    prompts = [PROMPT, "Hello world, this is a somewhat longer prompt for the chunked prefill to split", "a",
               "Once upon a time", "To be or not to be", "Lorem ipsum dolor sit amet"]
    jobs = []
    for i, p in enumerate(prompts):
        kw = dict(max_new_tokens=20 + 3 * i, ignore_eos=True)
        if i % 2:
            kw.update(temperature=0.9, top_p=0.95, seed=100 + i)
        jobs.append((p, kw))
    expected = [[c.token_ids for c in llm.generate(p, **kw)] for p, kw in jobs]
    expected.append([c.token_ids for c in llm.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=7,
                                                       num_return_sequences=3, ignore_eos=True)])
    results: list = [None] * len(expected)

    def tgi(i, p, kw):
        params = {"max_new_tokens": kw["max_new_tokens"], "details": True}
        if "seed" in kw:
            params.update(do_sample=True, temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"])
        r = s.http.post("/generate", json={"inputs": p, "parameters": params})
        results[i] = [[t["id"] for t in r.json()["details"]["tokens"]]]

    def openai_n(i):
        r = s.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 7,
                                                 "n": 3, "ignore_eos": True})
        texts = [c["text"] for c in r.json()["choices"]]
        results[i] = [llm.tokenizer.encode(t) for t in texts]  # compared as text below

    threads = [threading.Thread(target=tgi, args=(i, p, kw)) for i, (p, kw) in enumerate(jobs)]
    threads.append(threading.Thread(target=openai_n, args=(len(jobs),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(len(jobs)):  # TGI's tokens may include an EOS; here ignore_eos is not a TGI option
        got = results[i][0]
        assert got == expected[i][0][: len(got)] and (len(got) == len(expected[i][0]) or got[-1] in llm.eos_token_ids)
    n_texts = [llm.tokenizer.decode(t) for t in expected[-1]]
    assert [llm.tokenizer.decode(t) for t in results[-1]] == n_texts
    s.wait_for(lambda: s.metric("gyrfalcon_kv_blocks_used") == 0, "all blocks back")


# ---------------------------------------------------------------------------------------------------------------
# API key


def test_api_key_guards_every_route_but_health(make_server, llm):
    openai = pytest.importorskip("openai")
    tg = pytest.importorskip("text_generation")
    s = make_server(api_key="sekrit")
    bearer = {"Authorization": "Bearer sekrit"}
    assert s.http.get("/health").status_code == 200
    for method, path in [("GET", "/"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("GET", "/v1/models"), ("POST", "/generate"), ("POST", "/generate_stream"),
                         ("POST", "/"), ("POST", "/tokenize"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")]:
        r = s.http.request(method, path, json={"inputs": "x"} if method == "POST" else None)
        assert r.status_code == 401, (method, path)
        r = s.http.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)
    assert s.http.get("/v1/models").json()["error"]["type"] == "authentication_error"
    assert s.http.get("/info").json()["error_type"] == "unauthorized"
    assert s.http.get("/").headers["www-authenticate"].startswith("Basic")
    assert s.http.get("/info", headers=bearer).status_code == 200
    assert s.http.get("/", auth=("anyone", "sekrit")).status_code == 200  # a browser's Basic-auth prompt
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
    assert client.completions.create(model="x", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text == \
        llm.generate(PROMPT, max_new_tokens=3)[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = tg.Client(s.url, headers=bearer, timeout=60).generate(PROMPT, max_new_tokens=3)
    assert r.details.generated_tokens == 3
    assert s.metric("gyrfalcon_requests_total", headers=bearer, route="generate", outcome="unauthorized") >= 2


# ---------------------------------------------------------------------------------------------------------------
# metrics and traces


def test_metrics_report_latencies_and_tokens(live):
    live.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert live.metric("gyrfalcon_time_to_first_token_seconds_count") >= 1
    assert live.metric("gyrfalcon_inter_token_latency_seconds_count") >= 4
    assert live.metric("gyrfalcon_request_tokens_per_second_count") >= 1
    assert live.metric("gyrfalcon_generated_tokens_total") >= 5
    assert live.metric("gyrfalcon_requests_total", route="generate", outcome="ok") >= 1
    assert live.metric("gyrfalcon_kv_blocks_free") > 0 and live.metric("gyrfalcon_kv_blocks_total") > 0
    for name in ("gyrfalcon_queue_length", "gyrfalcon_batch_size", "gyrfalcon_kv_blocks_used"):
        assert name in live.http.get("/metrics").text


def test_spans_per_request(llm):
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = LiveServer(create_app(llm, ServerConfig(), tracer_provider=provider))
    try:
        s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
        s.wait_for(lambda: len(exporter.get_finished_spans()) >= 4, "spans")
    finally:
        s.stop()
    spans = {sp.name: sp for sp in exporter.get_finished_spans()}
    assert set(spans) == {"request", "queue", "prefill", "decode"}
    root = spans["request"]
    for phase in ("queue", "prefill", "decode"):
        assert spans[phase].parent.span_id == root.context.span_id
        assert root.start_time <= spans[phase].start_time <= spans[phase].end_time <= root.end_time
    assert spans["queue"].end_time <= spans["prefill"].start_time <= spans["decode"].start_time
    assert root.attributes["gen_ai.usage.output_tokens"] == 4 and root.attributes["gyrfalcon.outcome"] == "ok"


def test_otlp_export_over_http(llm):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    s = LiveServer(create_app(llm, ServerConfig(otlp_endpoint=endpoint)))
    try:
        s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    finally:
        s.stop()  # the lifespan's end flushes the batch processor
        collector.shutdown()
    assert received and all(path == "/v1/traces" for path, _ in received)
    blob = b"".join(body for _, body in received)
    for name in (b"request", b"queue", b"prefill", b"decode"):
        assert name in blob


def test_port_is_really_listening(live):
    host, port = live.url.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def test_engine_failure_fails_the_request_and_the_server_goes_on(make_server, llm):
    s = make_server()
    engine = s.app.state.serving.engine
    real_step = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated: out of device memory")
        return real_step()

    engine.step = failing_step
    r = s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 500 and r.json()["error_type"] == "generation"
    assert "out of device memory" in r.json()["error"]
    r = s.http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["generated_text"] == llm.generate(PROMPT, max_new_tokens=3)[0].text
    assert s.metric("gyrfalcon_requests_total", route="generate", outcome="error") == 1
    assert s.http.get("/health").status_code == 200


def test_falcon_mamba_is_served_with_state_slots(tmp_path_factory, falcon_dir):
    transformers = pytest.importorskip("transformers")
    import shutil

    import torch

    torch.manual_seed(0)
    hf = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=65024, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
        time_step_rank=4, use_conv_bias=True, bos_token_id=11, eos_token_id=11, pad_token_id=11))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("mamba-random")
    hf.save_pretrained(out)
    for f in falcon_dir.glob("tokenizer*.json"):
        shutil.copy(f, out)
    shutil.copy(falcon_dir / "special_tokens_map.json", out)
    mamba = gyrfalcon.load(out)
    s = LiveServer(create_app(mamba, ServerConfig(engine=EngineConfig(num_blocks=2, max_batch_size=2,
                                                                      max_batch_tokens=8))))
    try:
        results = [None] * 3

        def ask(i):
            r = s.http.post("/v1/completions", json={"prompt": f"{PROMPT} {i}", "max_tokens": 6 + i,
                                                     "temperature": 0, "ignore_eos": True})
            results[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # 3 requests, 2 state slots
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [mamba.generate(f"{PROMPT} {i}", max_new_tokens=6 + i, ignore_eos=True)[0].text
                           for i in range(3)]
        assert s.metric("gyrfalcon_kv_blocks_total") == 2
    finally:
        s.stop()
