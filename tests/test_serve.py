"""`peftlab serve`: a real server on 127.0.0.1, two adapters over one frozen tiny BERT."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.test_train import train_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, topic_data_dir):
    base = [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48", "train.epochs=2",
            "train.learning_rate=0.05", "output.plots=false", "eval.baseline=false"]
    root = tmp_path_factory.mktemp("serve")
    return [train_cli(root, base + ["method.name=lora"], "lora-run"),
            train_cli(root, base + ["method.name=lora", "method.r=4", "train.seed=7"], "lora-r4-run"),
            train_cli(root, base + ["method.name=ia3"], "ia3-run")]


def test_two_adapters_over_one_base_match_their_runs(two_runs):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", *map(str, two_runs), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        names = {a["name"]: a for a in httpx.get(f"{url}/adapters").json()}
        assert set(names) == {"lora-run", "lora-r4-run", "ia3-run"}
        assert names["lora-run"]["labels"] == ["food", "sport", "tech"]
        # the two LoRA runs share one base model in memory; IA3 adapters cannot join LoRA ones (peft)
        assert names["lora-run"]["model_in_memory"] == names["lora-r4-run"]["model_in_memory"]
        assert names["ia3-run"]["model_in_memory"] != names["lora-run"]["model_in_memory"]
        for run in two_runs:
            frame = pd.read_csv(run / "predictions.csv").head(12)
            reply = httpx.post(f"{url}/predict", json={"adapter": run.name, "texts": frame["text"].tolist()}, timeout=30)
            assert reply.status_code == 200
            preds = reply.json()["predictions"]
            assert [p["label"] for p in preds] == frame["predicted"].tolist()
            np.testing.assert_allclose([p["confidence"] for p in preds], frame["confidence"], atol=1e-4)
        # switching back and forth between adapters gives the same answers
        first = httpx.post(f"{url}/predict", json={"adapter": "lora-run", "texts": ["goal team coach"]}).json()
        httpx.post(f"{url}/predict", json={"adapter": "lora-r4-run", "texts": ["goal team coach"]})
        again = httpx.post(f"{url}/predict", json={"adapter": "lora-run", "texts": ["goal team coach"]}).json()
        assert first == again
        assert httpx.post(f"{url}/predict", json={"adapter": "nope", "texts": ["x"]}).status_code == 404
        assert httpx.post(f"{url}/predict", json={"adapter": "lora-run", "texts": []}).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=10)
