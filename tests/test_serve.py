"""`peftlab serve` on a real server on 127.0.0.1: LoRA adapters with different label sets over one tiny
BERT, micro-batched together; limits, auth, admin, metrics, the web page in headless Chromium, a
bounded schemathesis fuzz of the OpenAPI schema, bad startup input, and bench-serve."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from peftlab.cli import main
from tests.test_train import train_cli

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, topic_data_dir) -> dict[str, Path]:
    """Served names that look like anything but names (issue 12): LoRA runs with 3 and with 2 labels,
    IA3, full fine-tuning."""
    two = tmp_path_factory.mktemp("two-topics")
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (topic_data_dir / f"{split}.jsonl").read_text().splitlines()]
        (two / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "food"))
    base = [f"model.name={tiny_model_dir}", "data.max_length=48", "train.epochs=2", "train.learning_rate=0.05",
            "output.plots=false", "eval.baseline=false"]
    three = [f"data.path={topic_data_dir}"]
    root = tmp_path_factory.mktemp("serve")
    return {
        "lora-lr0.001": train_cli(root, base + three + ["method.name=lora"], "lora-lr0.001"),
        "half": train_cli(root, base + [f"data.path={two}", "method.name=lora", "method.r=4", "train.seed=7"], "half"),
        "train": train_cli(root, base + three + ["method.name=lora", "train.seed=3"], "train"),
        "cuda": train_cli(root, base + three + ["method.name=ia3"], "cuda"),
        "full": train_cli(root, base + [f"data.path={two}", "method.name=full"], "full"),
    }


def start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(runs):
    """Every run served; the API key from the environment; a long batch window, so that requests sent
    together share forward passes."""
    proc, url = start([str(p) for p in runs.values()] + ["--batch-window-ms", "150", "--max-texts", "20",
                                                          "--max-chars", "400", "--max-body-bytes", "6000"],
                      env={"PEFTLAB_API_KEY": KEY})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def expected(run: Path, n: int = 12) -> tuple[list[str], np.ndarray, list[str]]:
    """The run's first test texts, their probabilities in predictions.csv, and the label names."""
    frame = pd.read_csv(run / "predictions.csv").head(n)
    labels = json.loads((run / "metrics.json").read_text())["label_names"]
    columns = [c for c in frame.columns if c not in ("text", "label", "predicted", "confidence")]
    assert len(columns) == len(labels)
    return frame["text"].tolist(), frame[columns].to_numpy(), labels


def probabilities(reply: dict, labels: list[str]) -> np.ndarray:
    return np.array([[p["probabilities"][name] for name in labels] for p in reply["predictions"]])


def post(url: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, headers=AUTH, timeout=60, **kw)


# ---------------------------------------------------------------- answers

def test_every_adapter_answers_like_its_run(server, runs):
    adapters = {a["name"]: a for a in httpx.get(f"{server}/adapters", headers=AUTH).json()}
    assert set(adapters) == set(runs)
    assert adapters["half"]["labels"] == ["sport", "tech"] and adapters["train"]["labels"] == ["food", "sport", "tech"]
    # every LoRA run shares one base in memory, the 2-label one included (its own head); IA3 and full apart
    lora = {adapters[n]["model_in_memory"] for n in ("lora-lr0.001", "half", "train")}
    assert len(lora) == 1
    assert len(lora | {adapters["cuda"]["model_in_memory"], adapters["full"]["model_in_memory"]}) == 3
    for name, run in runs.items():
        texts, probs, labels = expected(run)
        reply = post(server, {"adapter": name, "texts": texts})
        assert reply.status_code == 200, reply.text
        assert reply.json()["adapter"] == name
        np.testing.assert_allclose(probabilities(reply.json(), labels), probs, atol=1e-4)


def test_concurrent_requests_share_forward_passes_and_keep_their_answers(server, runs):
    """Requests for different adapters sent together run in one forward pass (peft adapter_names), each
    row through its own adapter and head, and still equal each run's predictions.csv."""
    def batches() -> tuple[float, float]:
        text = httpx.get(f"{server}/metrics", headers=AUTH).text
        value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return value("peftlab_batch_adapters_count"), value("peftlab_batch_adapters_sum")

    before = batches()
    names = ["lora-lr0.001", "half", "train"] * 2 + ["cuda", "full"]
    replies, barrier = {}, threading.Barrier(len(names))

    def call(i, name):
        texts, _, _ = expected(runs[name], 4 + i)
        barrier.wait()
        replies[i] = post(server, {"adapter": name, "texts": texts[i:]})

    threads = [threading.Thread(target=call, args=(i, n)) for i, n in enumerate(names)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i, name in enumerate(names):
        assert replies[i].status_code == 200, replies[i].text
        _, probs, labels = expected(runs[name], 4 + i)
        np.testing.assert_allclose(probabilities(replies[i].json(), labels), probs[i:], atol=1e-4)
    passes, adapters = (a - b for a, b in zip(batches(), before))
    # 8 requests over 3 models: at most 3 passes if all arrived in one window; mixing shows as > 1 adapter/pass
    assert passes < len(names) and adapters / passes > 1, (passes, adapters)


def test_mixed_pass_equals_separate_passes(runs):
    """The core, without HTTP: one pass over three LoRA adapters (two label sets) equals three passes."""
    from peftlab.evaluation.predict import logits_together
    from peftlab.serve.registry import Registry

    registry = Registry(torch.device("cpu"))
    served = [registry.add(runs[n]) for n in ("lora-lr0.001", "half", "train")]
    assert len(registry.groups) == 1
    parts = [s.predictor.encode(expected(runs[s.name])[0], cache=False) for s in served]
    together = logits_together([s.predictor for s in served], parts)
    for s, part, logits in zip(served, parts, together):
        assert logits.shape == (12, len(s.label_names))
        np.testing.assert_allclose(logits, logits_together([s.predictor], [part])[0], atol=1e-5)
        np.testing.assert_allclose(logits, s.predictor.logits_of(part), atol=1e-5)
    # unloading one adapter leaves the others exact; the last one out frees the base
    registry.remove("half")
    np.testing.assert_allclose(logits_together([served[0].predictor], [parts[0]])[0], together[0], atol=1e-5)
    registry.remove("lora-lr0.001")
    registry.remove("train")
    assert not registry.groups


# ---------------------------------------------------------------- limits, errors, auth

def test_client_mistakes_are_4xx_json(server):
    def check(reply: httpx.Response, status: int, *words: str):
        assert reply.status_code == status, reply.text
        detail = reply.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        for w in words:
            assert w in detail, detail

    check(post(server, {"adapter": "nope", "texts": ["x"]}), 404, "nope", "half")
    check(post(server, {"texts": ["x"]}), 409, "adapter", "5 runs are served")
    check(post(server, {"adapter": "half", "texts": []}), 422, "texts")
    check(post(server, {"adapter": "half", "texts": ["x"] * 21}), 422, "texts", "20")
    check(post(server, {"adapter": "half", "texts": ["ok", "x" * 401]}), 422, "texts.1", "400 characters")
    check(post(server, {"adapter": "half", "texts": [1]}), 422, "texts.0")
    check(post(server, {"adapter": "half"}), 422, "texts")
    # lone surrogates are valid JSON but not Unicode: refused, never a 500
    for raw in (b'{"adapter": "half", "texts": ["a\\ud800b"]}', b'{"adapter": "\\udfff", "texts": ["a"]}'):
        check(httpx.post(f"{server}/predict", content=raw, headers={**AUTH, "Content-Type": "application/json"}),
              422, "unicode")
    check(httpx.post(f"{server}/predict", content=b'{"texts": [', headers={**AUTH, "Content-Type": "application/json"}),
          400, "not valid JSON", "line 1 column 12")
    check(httpx.post(f"{server}/predict", content=b'{"adapter": "half", "texts": ["\xff\xfe"]}',
                     headers={**AUTH, "Content-Type": "application/json"}), 400)
    # the body limit holds with and without a Content-Length
    big = {"adapter": "half", "texts": ["y" * 350] * 20}
    check(post(server, big), 413, "bytes")
    chunks = (json.dumps(big)[i:i + 1000].encode() for i in range(0, len(json.dumps(big)), 1000))
    check(httpx.post(f"{server}/predict", content=chunks, headers={**AUTH, "Content-Type": "application/json"}),
          413, "bytes")
    assert post(server, {"adapter": "half", "texts": ["y" * 400] * 2}).status_code == 200


def test_api_key_on_every_route_but_health_and_page(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "adapters": 5}
    assert "<select" in httpx.get(server).text  # the page itself holds no data: it asks for the key
    for method, path in (("GET", "/adapters"), ("POST", "/predict"), ("GET", "/metrics"),
                         ("POST", "/admin/runs"), ("DELETE", "/admin/runs/half")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            reply = httpx.request(method, server + path, headers=headers, json={"texts": ["x"]})
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["www-authenticate"] == "Bearer" and "API key" in reply.json()["detail"]


def test_admin_loads_and_unloads_runs(server, runs, tmp_path):
    copy = tmp_path / "lora copy (ü)"  # any directory name is a served name
    shutil.copytree(runs["half"], copy)
    admin = f"{server}/admin/runs"
    reply = httpx.post(admin, json={"run_dir": str(copy)}, headers=AUTH, timeout=60)
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == copy.name and reply.json()["labels"] == ["sport", "tech"]
    texts, probs, labels = expected(copy)
    np.testing.assert_allclose(probabilities(post(server, {"adapter": copy.name, "texts": texts}).json(), labels),
                               probs, atol=1e-4)
    assert httpx.post(admin, json={"run_dir": str(copy)}, headers=AUTH).status_code == 409
    assert httpx.post(admin, json={"run_dir": str(tmp_path / "none")}, headers=AUTH).status_code == 404
    reply = httpx.post(admin, json={"run_dir": str(tmp_path)}, headers=AUTH)
    assert reply.status_code == 422 and "metrics.json" in reply.json()["detail"]
    assert httpx.delete(f"{admin}/{copy.name}", headers=AUTH).json() == {"unloaded": copy.name}
    assert post(server, {"adapter": copy.name, "texts": ["x"]}).status_code == 404
    assert httpx.delete(f"{admin}/{copy.name}", headers=AUTH).status_code == 404
    # the others are untouched
    texts, probs, labels = expected(runs["half"])
    np.testing.assert_allclose(probabilities(post(server, {"adapter": "half", "texts": texts}).json(), labels),
                               probs, atol=1e-4)


def test_admin_routes_are_off_without_a_key(runs):
    from fastapi.testclient import TestClient

    from peftlab.serve.app import create_app

    client = TestClient(create_app([str(runs["half"])], torch.device("cpu")))
    assert client.post("/admin/runs", json={"run_dir": str(runs["train"])}).status_code == 403
    assert client.delete("/admin/runs/half").status_code == 403
    # one run served: "adapter" may be left out
    texts, probs, labels = expected(runs["half"])
    np.testing.assert_allclose(probabilities(client.post("/predict", json={"texts": texts}).json(), labels), probs,
                               atol=1e-4)


def test_metrics(server):
    post(server, {"adapter": "cuda", "texts": ["goal", "chip"]})
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    for pattern in (r'peftlab_http_requests_total\{method="POST",route="/predict",status="200"\} [1-9]',
                    r'peftlab_http_requests_total\{method="POST",route="/predict",status="422"\} [1-9]',
                    r'peftlab_http_request_seconds_bucket\{le="\+Inf",route="/predict"\}',
                    r'peftlab_predict_seconds_count\{adapter="cuda"\} [1-9]',
                    r'peftlab_predicted_texts_total\{adapter="cuda"\} [1-9]',
                    r'peftlab_adapter_batches_total\{adapter="half"\} [1-9]',
                    r'peftlab_batch_texts_bucket\{le="\+Inf"\} [1-9]', r"peftlab_adapters_served 5"):
        assert re.search(pattern, text), pattern


# ---------------------------------------------------------------- the OpenAPI schema, fuzzed

def test_schemathesis_finds_no_5xx_and_no_undocumented_status(server):
    """A bounded fuzz (positive and negative cases per operation) against the real server: no server
    error, every status code, content type and body as documented, invalid input refused."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     positive_data_acceptance, response_schema_conformance, status_code_conformance)

    # a body over --max-body-bytes is refused with 413 (documented) before it is read, so whether it
    # is also schema-invalid is never looked at: 413 is a rejection too
    rejections = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": rejections}}})
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", config=config)
    failures, cases, started = [], [0], time.time()
    for result in schema.get_all_operations():
        operation = result.ok()
        checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                  response_schema_conformance, negative_data_rejection]
        if operation.label != "POST /admin/runs":  # there, whether valid data loads depends on the disk
            checks.append(positive_data_acceptance)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case):
                cases[0] += 1
                try:
                    case.call_and_validate(base_url=server, headers=AUTH, checks=checks, timeout=60)
                except BaseException as e:  # noqa: BLE001 - schemathesis raises exception groups
                    failures.append(f"{operation.label} ({mode.value}): {str(e)[:800]}")

            try:
                fuzz()
            except Unsatisfiable:  # no negative case exists for an operation without input
                pass
    assert cases[0] > 100 and time.time() - started < 60
    assert not failures, "\n\n".join(failures[:5])


def test_every_status_is_documented():
    from peftlab.serve.app import create_app

    paths = create_app([]).openapi()["paths"]
    assert set(paths["/predict"]["post"]["responses"]) == {"200", "400", "401", "404", "408", "409", "413", "415", "422", "503"}
    assert set(paths["/admin/runs"]["post"]["responses"]) >= {"201", "401", "403", "404", "409", "422"}
    assert set(paths["/admin/runs/{name}"]["delete"]["responses"]) >= {"200", "401", "403", "404"}
    assert "bearer" in json.dumps(create_app([]).openapi()["components"]["securitySchemes"]).lower()


# ---------------------------------------------------------------- slow clients, overload, error answers

def raw_request(url: str, data: bytes, timeout: float = 10) -> tuple[int, dict, dict]:
    """Send bytes on a fresh connection; (status, headers, JSON body) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        return read_answer(s)


def read_answer(s: socket.socket) -> tuple[int, dict, dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_every_client_error_is_json_saying_what_was_wrong(guarded):
    """Down to what the web framework and the HTTP parser answer: a bad Content-Length, JSON nested
    100,000 deep, a 5,000-digit number, an unknown route or method."""
    post = b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"

    def body(data: bytes) -> bytes:
        return post + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data

    cases = [
        (post + b"Content-Length: abc\r\n\r\n", 400, "malformed HTTP request"),
        (post + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400, "malformed HTTP request"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "malformed HTTP request"),
        (body(b"[" * 100_000), 400, "nested too deeply"),
        (body(b'{"texts": [' + b"1" * 5000 + b"]}"), 400, "4300 digits"),
        (body(b'{"adapter": "half", "texts": ["a"],}'), 400, "not valid JSON"),
        (body(b'\xff{}'), 400, "not UTF-8"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nConnection: close\r\n\r\n",
         404, "no route GET /nowhere"),
        (b"PUT /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 2\r\n"
         b"Connection: close\r\n\r\n{}", 405, "PUT is not allowed on /predict"),
    ]
    for data, status, words in cases:
        code, headers, reply = raw_request(guarded, data)
        assert (code, headers["content-type"]) == (status, "application/json"), (data[:80], code, reply)
        assert words in reply["detail"] and "\n" not in reply["detail"], reply
    assert httpx.get(f"{guarded}/health").status_code == 200


@pytest.fixture(scope="module")
def guarded(runs):
    """One run behind tight limits: 20 connections, headers within 2 s, a body within 3 s, 40 texts queued."""
    proc, url = start([str(runs["half"]), "--max-connections", "20", "--header-timeout", "2", "--body-timeout", "3",
                       "--max-queue-texts", "40", "--batch-window-ms", "400", "--max-texts", "40"],
                      env={"PEFTLAB_API_KEY": KEY})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_half_open_and_slow_clients_are_cut_off_and_health_keeps_answering(guarded):
    host, port = guarded.removeprefix("http://").split(":")
    started = time.time()
    clients = []
    for _ in range(30):  # headers never finished
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        clients.append(s)
    answers = [read_answer(s) for s in clients]
    statuses = [a[0] for a in answers]
    assert statuses.count(503) >= 10 and statuses.count(408) >= 1 and set(statuses) == {408, 503}, statuses
    assert all(a[1]["retry-after"] == "1" for a in answers if a[0] == 503)
    assert all("headers not received within 2 s" in a[2]["detail"] for a in answers if a[0] == 408)
    assert time.time() - started < 8  # 2 s of header timeout, not forever
    for s in clients:
        s.close()
    assert httpx.get(f"{guarded}/health", timeout=5).json()["status"] == "ok"

    # on a kept-alive connection, the clock starts again at the next request's first byte
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b'"status":"ok"' not in answer:  # headers and body may come in two reads
        answer += s.recv(4096)
    s.sendall(b"GET /health HTTP/1.1\r\nHo")
    status, _, reply = read_answer(s)
    s.close()
    assert status == 408 and "headers not received" in reply["detail"]

    # a body sent a byte at a time is cut off at the body deadline (3 s), not when it ends
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n")
    began = time.time()
    try:
        for byte in b'{"texts": ["a slow text sent one byte at a time, on and on"]}':
            s.sendall(bytes([byte]))
            time.sleep(0.25)
    except OSError:
        pass  # closed by the server, as it should be
    status, _, reply = read_answer(s)
    s.close()
    assert status == 408 and "body not received within 3 s" in reply["detail"]
    assert 2.5 < time.time() - began < 6

    # the key is checked before the body is read: a client without it gets 401 at once, its megabyte unsent
    s = socket.create_connection((host, int(port)), timeout=10)
    began = time.time()
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    status, headers, reply = read_answer(s)
    s.close()
    assert status == 401 and headers["www-authenticate"] == "Bearer" and time.time() - began < 2
    assert time.time() - started < 25


def test_a_full_queue_answers_503_with_retry_after_at_once(guarded):
    texts = [f"the match and the goal, then the league {i}" for i in range(30)]
    replies = [None] * 6

    def call(i):
        replies[i] = httpx.post(f"{guarded}/predict", json={"texts": texts}, headers=AUTH, timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(replies))]
    began = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
    for r in replies:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
        else:
            assert len(r.json()["predictions"]) == len(texts)
    assert time.time() - began < 20
    # once the queue drains, requests are taken again
    assert httpx.post(f"{guarded}/predict", json={"texts": texts}, headers=AUTH, timeout=60).status_code == 200


# ---------------------------------------------------------------- the web page, in a browser

def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: messages
    are JSON ended by NUL on fds 3 and 4), so no websocket client and no browser download are needed."""

    def __init__(self, profile: Path):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        assert min(to_chrome, from_chrome) > 4  # dup2 below must not clobber the other end

        def fds():
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen([_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                                      "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      "--window-size=1200,900", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id = b"", 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session or getattr(self, "session", None):
            message["sessionId"] = session or self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events and other replies are skipped
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def click(self, selector: str) -> None:
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.send("Input.insertText", text=text)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._write)
        os.close(self._read)


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_web_page_in_chromium(server, runs, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=server + "/")
        # without the key the page says so; typing it (then leaving the field) lists the adapters
        assert "401" in browser.wait("document.readyState === 'complete' && document.getElementById('status').textContent")
        browser.type("#key", KEY)
        browser.click("#texts")
        assert browser.wait("document.getElementById('adapter').options.length") == 5
        # pick the 2-label adapter, paste two texts, click Classify
        browser.js("const s = document.getElementById('adapter'); s.value = 'half'; s.dispatchEvent(new Event('change'))")
        texts, probs, labels = expected(runs["half"], 2)
        browser.type("#texts", "\n".join(texts))
        browser.click("#go")
        assert "classified by half" in browser.wait(
            "document.getElementById('status').textContent.includes('classified') && "
            "document.getElementById('status').textContent")
        cards = browser.js("""Array.from(document.querySelectorAll('.card')).map(c => ({
            text: c.querySelector('.text').textContent,
            rows: Array.from(c.querySelectorAll('.row')).map(r => [r.querySelector('.name').textContent,
                  parseFloat(r.querySelector('.value').textContent), r.querySelector('.bar > span').style.width])}))""")
    finally:
        browser.close()
    assert [c["text"] for c in cards] == texts
    for card, p in zip(cards, probs):
        shown = {name: value for name, value, _ in card["rows"]}
        assert set(shown) == set(labels)
        np.testing.assert_allclose([shown[n] for n in labels], p, atol=1e-4)
        assert card["rows"][0][0] == labels[int(p.argmax())]  # highest first
        for name, value, width in card["rows"]:
            assert abs(float(width.rstrip("%")) - 100 * value) < 0.06  # the bar is the probability


# ---------------------------------------------------------------- startup: one line, exit 2

def serve_error(capsys, args: list[str]) -> str:
    code = main(["serve", *args])
    out, err = capsys.readouterr()
    errors = [line for line in err.strip().splitlines() if line.startswith("peftlab ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "serving" not in out
    return errors[0]


def test_bad_startup_is_one_line(runs, tmp_path, capsys):
    run = runs["half"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is in use" in serve_error(capsys, [str(run), "--port", str(port)])
    assert "--port 99999" in serve_error(capsys, [str(run), "--port", "99999"])
    assert "--host" in serve_error(capsys, [str(run), "--host", "no.such.host.invalid", "--port", "0"])
    assert "--max-texts" in serve_error(capsys, [str(run), "--max-texts", "0"])

    def damaged(name: str, harm) -> Path:
        path = tmp_path / name
        shutil.copytree(run, path)
        harm(path)
        return path

    weights = "adapter/adapter_model.safetensors"
    cases = {
        "no-weights": (lambda p: (p / weights).unlink(), "weights"),
        "truncated": (lambda p: (p / weights).write_bytes((run / weights).read_bytes()[:100]), "adapter_model.safetensors"),
        "no-config": (lambda p: (p / "config.yaml").unlink(), "config.yaml"),
        "bad-metrics": (lambda p: (p / "metrics.json").write_text('{"status": "compl'), "metrics.json"),
        "no-metrics": (lambda p: (p / "metrics.json").unlink(), "metrics.json"),
    }
    for name, (harm, word) in cases.items():
        line = serve_error(capsys, [str(run), str(damaged(name, harm)), "--port", "0"])
        assert name in line and word in line, line
    assert "already served" in serve_error(capsys, [str(run), str(run), "--port", "0"])


def test_help_describes_every_argument_with_its_default():
    import argparse

    from peftlab.cli import bench_serve, serve

    for module in (serve, bench_serve):
        parser = module.add_parser(argparse.ArgumentParser().add_subparsers())
        for action in parser._actions:
            if action.dest not in ("help", "run_dirs"):
                assert action.help and "default" in action.help, (module.__name__, action.dest)
        assert parser.format_help()  # every %(default)s expands


# ---------------------------------------------------------------- bench-serve

def test_bench_serve_reports_both_modes(runs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    lora = [str(runs[n]) for n in ("lora-lr0.001", "half", "train")]
    assert main(["bench-serve", *lora, "--requests", "30", "--concurrency", "6", "--warmup", "3",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["mixed", "per-adapter"]
    for r in report["results"]:
        assert r["requests_per_second"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["forward_passes"] > 0
    assert report["results"][1]["adapters_per_pass"] == 1  # not mixed: one adapter per pass
    assert "CPUs" in report["machine"] and "requests/s" in capsys.readouterr().out
