"""Multi-label runs through `peftlab predict`, `peftlab serve` and `peftlab export`: a real tiny LoRA run
with tuned per-label thresholds and a calibration temperature (label sets joined by ";"), served beside
a single-label LoRA run over the same base, exported merged and as ONNX. Real files, real servers on
127.0.0.1, plain transformers in a fresh process; no mocks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import isolated_module_env
from peftlab.cli import main
from tests.test_serve import Browser, _chromium, start

KEY = "multi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEP = ";"
# beyond the test rows: an empty text, one word, texts far past max_length (48 tokens), a text of two topics
EXTRA = ["", "soup", " ".join(["goal match team coach"] * 30), " ".join(["chip data robot"] * 60),
         "the recipe for cheese soup and the goal of the league"]


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from isolated_module_env(tmp_path_factory, "ml-serving")


def train(out: Path, overrides: list[str]) -> Path:
    assert main(["train", "--no-progress", "--output-dir", str(out), *(a for o in overrides for a in ("--set", o))]) == 0
    return out


@pytest.fixture(scope="module")
def runs(env, tiny_model_dir, label_set_data_dir, topic_data_dir) -> dict[str, Path]:
    """"tags": multi-label LoRA (food, sport, tech; thresholds tuned per label, temperature fitted);
    "pair": single-label LoRA with 2 labels over the same base (so a head of another width and task)."""
    two = env / "two-topics"
    two.mkdir()
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (topic_data_dir / f"{split}.jsonl").read_text().splitlines()]
        (two / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "food"))
    common = [f"model.name={tiny_model_dir}", "data.max_length=48", "train.batch_size=16", "output.plots=false",
              "eval.baseline=false", "method.name=lora"]
    return {
        "tags": train(env / "tags", common + [
            f"data.path={label_set_data_dir}", "data.multi_label=true", "data.label_column=labels",
            f"data.label_separator={SEP}", "train.epochs=8", "train.learning_rate=0.02",
            "eval.threshold=tune", "eval.threshold_scope=per_label", "eval.calibrate=temperature"]),
        "pair": train(env / "pair", common + [f"data.path={two}", "train.epochs=2", "train.learning_rate=0.05",
                                             "train.seed=7"]),
    }


def record(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def rule_of(run: Path) -> tuple[list[str], np.ndarray, float]:
    """The run's label names, per-label thresholds and temperature, from metrics.json."""
    m = record(run)
    names = m["label_names"]
    return names, np.array([m["test_at_threshold"]["thresholds"][n] for n in names]), m["calibration"]["temperature"]


@pytest.fixture(scope="module")
def test_rows(runs) -> pd.DataFrame:
    return pd.read_csv(runs["tags"] / "predictions.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def texts(test_rows) -> list[str]:
    return test_rows["text"].tolist()[:30] + EXTRA


@pytest.fixture(scope="module")
def predicted(env, runs, texts) -> dict[str, list[dict]]:
    """`peftlab predict` JSON Lines for both runs, on the same texts."""
    inp = env / "texts.csv"
    pd.DataFrame({"text": texts}).to_csv(inp, index=False)
    out = {}
    for name, run in runs.items():
        path = env / f"predict-{name}.jsonl"
        assert main(["predict", str(run), "--input", str(inp), "--output", str(path)]) == 0
        out[name] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


# ---------------------------------------------------------------- predict

def test_the_run_is_multilabel_with_its_own_rule(runs, test_rows):
    m = record(runs["tags"])
    assert m["multi_label"] and m["label_names"] == ["food", "sport", "tech"]
    names, thresholds, t = rule_of(runs["tags"])
    assert t != 1.0 and len(set(thresholds.tolist())) > 1, (thresholds, t)  # a rule beyond the default
    assert any(SEP in cell for cell in test_rows["label"])  # sets joined by the run's separator


def test_predict_jsonl_and_csv_line_up_and_follow_the_thresholds(env, runs, texts, predicted, test_rows):
    names, thresholds, t = rule_of(runs["tags"])
    rows = predicted["tags"]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r) == {"text", "labels", "probabilities"}
        p = np.array([r["probabilities"][n] for n in names])
        assert r["labels"] == [n for n, v, th in zip(names, p, thresholds) if v >= th]
    assert len({len(r["labels"]) for r in rows}) > 1 and any(len(r["labels"]) > 1 for r in rows)
    # predict's probabilities are the calibrated ones: predictions.csv's (the model's own) with T applied
    own = test_rows[[f"prob_{n}" for n in names]].to_numpy(np.float64)[:30]
    got = np.array([[r["probabilities"][n] for n in names] for r in rows[:30]])
    np.testing.assert_allclose(got, sigmoid(logit(own) / t), atol=1e-5)
    # ... and its label sets are the run's own decisions
    assert [SEP.join(r["labels"]) for r in rows[:30]] == test_rows["predicted"].tolist()[:30]

    inp, csv = env / "texts.csv", env / "predict-tags.csv"
    assert main(["predict", str(runs["tags"]), "--input", str(inp), "--output", str(csv)]) == 0
    frame = pd.read_csv(csv, dtype={"text": str, "labels": str}, keep_default_na=False)
    assert list(frame.columns) == ["text", "labels", *[f"prob_{n}" for n in names]]  # no confidence
    assert frame["text"].tolist() == texts
    assert frame["labels"].tolist() == [SEP.join(r["labels"]) for r in rows]
    np.testing.assert_allclose(frame[[f"prob_{n}" for n in names]].to_numpy(),
                               [[r["probabilities"][n] for n in names] for r in rows], atol=1e-12)


def test_single_label_csv_is_unchanged(env, runs):
    out = env / "pair.csv"
    assert main(["predict", str(runs["pair"]), "--text", "goal", "--text", "chip", "--output", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["text", "label", "confidence", "prob_sport", "prob_tech"]
    assert frame["confidence"].tolist() == frame[["prob_sport", "prob_tech"]].max(axis=1).tolist()


# ---------------------------------------------------------------- serve

@pytest.fixture(scope="module")
def server(runs):
    proc, url = start([str(runs["tags"]), str(runs["pair"]), "--batch-window-ms", "150"],
                      env={"PEFTLAB_API_KEY": KEY})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def post(url: str, body) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, headers=AUTH, timeout=60)


def assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == set(e) - {"text"}, (g, e)
        assert g.get("labels") == e.get("labels") and g.get("label") == e.get("label")
        names = list(e["probabilities"])
        np.testing.assert_allclose([g["probabilities"][n] for n in names], [e["probabilities"][n] for n in names],
                                   atol=1e-4)


def test_adapters_say_multilabel_and_thresholds(server, runs):
    adapters = {a["name"]: a for a in httpx.get(f"{server}/adapters", headers=AUTH).json()}
    names, thresholds, t = rule_of(runs["tags"])
    tags, pair = adapters["tags"], adapters["pair"]
    assert tags["multi_label"] is True and tags["labels"] == names and tags["threshold"] is None
    assert tags["thresholds"] == dict(zip(names, thresholds.tolist())) and tags["temperature"] == t
    assert pair["multi_label"] is False and pair["thresholds"] is None and pair["temperature"] == 1.0
    assert tags["model_in_memory"] == pair["model_in_memory"]  # one base in memory for both tasks


def test_serve_answers_equal_predict_and_the_schema(server, predicted, texts):
    import jsonschema

    reply = post(server, {"adapter": "tags", "texts": texts})
    assert reply.status_code == 200, reply.text
    assert_same_rows(reply.json()["predictions"], predicted["tags"])
    single = post(server, {"adapter": "pair", "texts": texts})
    assert_same_rows(single.json()["predictions"], predicted["pair"])
    # both kinds of answer are what the OpenAPI schema documents
    spec = httpx.get(f"{server}/openapi.json").json()
    schema = {"$ref": "#/components/schemas/PredictResponse", "components": spec["components"]}
    for body in (reply.json(), single.json()):
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    documented = spec["components"]["schemas"]
    assert {"Prediction", "LabelSetPrediction"} <= set(documented)
    with pytest.raises(jsonschema.ValidationError):  # the schema is not vacuous: a row of neither kind fails
        jsonschema.validate({"adapter": "x", "predictions": [{"probabilities": {}}]}, schema,
                            cls=jsonschema.Draft202012Validator)
    # client mistakes stay 4xx for a multi-label adapter too
    assert post(server, {"adapter": "tags", "texts": []}).status_code == 422
    assert post(server, {"texts": ["x"]}).status_code == 409


def test_mixed_requests_share_passes_and_keep_their_task(server, predicted, texts):
    def batches() -> tuple[float, float]:
        text = httpx.get(f"{server}/metrics", headers=AUTH).text
        value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return value("peftlab_batch_adapters_count"), value("peftlab_batch_adapters_sum")

    before = batches()
    names = ["tags", "pair"] * 3
    replies, barrier = {}, threading.Barrier(len(names))

    def call(i, name):
        barrier.wait()
        replies[i] = post(server, {"adapter": name, "texts": texts[i:i + 8]})

    threads = [threading.Thread(target=call, args=(i, n)) for i, n in enumerate(names)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i, name in enumerate(names):
        assert replies[i].status_code == 200, replies[i].text
        assert_same_rows(replies[i].json()["predictions"], predicted[name][i:i + 8])
        sums = [sum(p["probabilities"].values()) for p in replies[i].json()["predictions"]]
        if name == "pair":  # softmax
            np.testing.assert_allclose(sums, 1, atol=1e-5)
    passes, adapters = (a - b for a, b in zip(batches(), before))
    assert passes < len(names) and adapters / passes > 1, (passes, adapters)


def test_mixed_pass_equals_separate_passes(runs, texts):
    """Without HTTP: one pass over a multi-label and a single-label adapter (3 and 2 labels) equals separate
    passes, and each predictor turns its own logits into its own task's probabilities."""
    from peftlab.evaluation.predict import logits_together
    from peftlab.serve.registry import Registry

    registry = Registry(torch.device("cpu"))
    tags, pair = registry.add(runs["tags"]), registry.add(runs["pair"])
    assert len(registry.groups) == 1 and tags.predictor.task.multi_label and not pair.predictor.task.multi_label
    parts = [s.predictor.encode(texts, cache=False) for s in (tags, pair)]
    together = logits_together([tags.predictor, pair.predictor], parts)
    for s, part, logits in zip((tags, pair), parts, together):
        assert logits.shape == (len(texts), len(s.label_names))
        np.testing.assert_allclose(logits, s.predictor.logits_of(part), atol=1e-5)
    _, _, t = rule_of(runs["tags"])
    np.testing.assert_allclose(tags.predictor.probabilities_of(together[0]), sigmoid(together[0] / t), atol=1e-6)
    np.testing.assert_allclose(pair.predictor.probabilities_of(together[1]).sum(1), 1, atol=1e-6)


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_web_page_shows_the_label_set(server, runs, predicted, texts, tmp_path):
    browser = Browser(tmp_path / "profile")
    chosen = [i for i, r in enumerate(predicted["tags"]) if r["labels"]][:2] + \
             [i for i, r in enumerate(predicted["tags"]) if not r["labels"] and texts[i]][:1]
    shown_texts = [texts[i] for i in chosen]
    try:
        browser.send("Page.navigate", url=server + "/")
        browser.wait("document.readyState === 'complete' && document.getElementById('status').textContent")
        browser.type("#key", KEY)
        browser.click("#texts")
        assert browser.wait("document.getElementById('adapter').options.length") == 2
        assert "multi-label" in browser.js("Array.from(document.getElementById('adapter').options)"
                                           ".find(o => o.value === 'tags').textContent")
        browser.js("const s = document.getElementById('adapter'); s.value = 'tags'; s.dispatchEvent(new Event('change'))")
        browser.type("#texts", "\n".join(shown_texts))
        browser.click("#go")
        browser.wait("document.getElementById('status').textContent.includes('classified by tags')")
        cards = browser.js("""Array.from(document.querySelectorAll('.card')).map(c => ({
            text: c.querySelector('.text').textContent,
            labels: c.querySelector('.labels').textContent,
            rows: Array.from(c.querySelectorAll('.row')).map(r => [r.querySelector('.name').textContent,
                  parseFloat(r.querySelector('.value').textContent), r.classList.contains('top'),
                  parseFloat(r.querySelector('.bar > i').style.left)])}))""")
    finally:
        browser.close()
    names, thresholds, _ = rule_of(runs["tags"])
    assert [c["text"] for c in cards] == shown_texts
    for card, i in zip(cards, chosen):
        row = predicted["tags"][i]
        assert card["labels"] == ("labels: " + ", ".join(row["labels"]) if row["labels"]
                                  else "no label reaches its threshold")
        assert {name for name, _, top, _ in card["rows"]} == set(names)
        for name, value, top, tick in card["rows"]:
            assert abs(value - row["probabilities"][name]) < 1e-4
            assert top == (name in row["labels"])  # the chosen labels stand out
            assert abs(tick - 100 * thresholds[names.index(name)]) < 0.06  # a tick at the label's threshold


# ---------------------------------------------------------------- export

# In a fresh interpreter that imports transformers only: the folder must carry labels, sigmoid and rule.
CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
job = json.load(sys.stdin)
pipe = pipeline("text-classification", model=job["dir"], device="cpu")
rows = pipe(job["texts"], top_k=None, truncation=True, batch_size=16)
scores = [{s["label"]: s["score"] for s in row} for row in rows]
# the decision rule travels in config.json: temperature, then a threshold per label
model = AutoModelForSequenceClassification.from_pretrained(job["dir"]).eval()
tokenizer = AutoTokenizer.from_pretrained(job["dir"])
rule = model.config.decision_rule
with torch.no_grad():
    logits = model(**tokenizer(job["texts"], truncation=True, padding=True, return_tensors="pt")).logits
probs = torch.sigmoid(logits / rule["temperature"])
names = [model.config.id2label[i] for i in range(model.config.num_labels)]
sets = [[n for j, n in enumerate(names) if p[j] >= rule["thresholds"][n]] for p in probs.tolist()]
imported = sorted(m for m in ("peft", "peftlab") if m in sys.modules)
print(json.dumps({"scores": scores, "sets": sets, "problem_type": model.config.problem_type, "imported": imported}))
"""


@pytest.fixture(scope="module")
def merged(env, runs) -> Path:
    out = env / "tags-merged"
    assert main(["export", str(runs["tags"]), "--format", "merged", "--output", str(out)]) == 0
    return out


def test_merged_export_gives_sigmoid_scores_and_carries_the_rule(merged, runs, test_rows, env):
    names, thresholds, t = rule_of(runs["tags"])
    texts = test_rows["text"].tolist()
    child = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps({"dir": str(merged), "texts": texts}),
                           capture_output=True, text=True, cwd=env, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["imported"] == [] and out["problem_type"] == "multi_label_classification"
    got = np.array([[row[n] for n in names] for row in out["scores"]])
    np.testing.assert_allclose(got, test_rows[[f"prob_{n}" for n in names]].to_numpy(np.float64), atol=1e-5)
    assert [SEP.join(s) for s in out["sets"]] == test_rows["predicted"].tolist()  # the run's own decisions

    config = json.loads((merged / "config.json").read_text())
    rule = config["decision_rule"]
    assert rule["multi_label"] is True and rule["temperature"] == t
    assert rule["thresholds"] == dict(zip(names, thresholds.tolist()))
    info = json.loads((merged / "export_info.json").read_text())
    assert info["multi_label"] is True and info["decision_rule"] == rule
    check, m = info["check"], record(runs["tags"])
    assert check["rows"] == len(texts) and check["max_abs_diff_vs_run"] < 1e-5
    assert check["agreement_with_run"] == 1.0
    # subset accuracy under the run's rule: the run's own figure at its thresholds
    assert check["accuracy"] == pytest.approx(m["test_at_threshold"]["accuracy"])
    assert info["run_test_accuracy"] == pytest.approx(m["test_at_threshold"]["accuracy"])


def test_onnx_export_of_a_multilabel_run(env, runs, test_rows):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = env / "tags-onnx"
    assert main(["export", str(runs["tags"]), "--format", "onnx", "--quantize", "int8", "--output", str(out)]) == 0
    names, thresholds, t = rule_of(runs["tags"])
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["decision_rule"]["thresholds"] == dict(zip(names, thresholds.tolist()))
    texts = test_rows["text"].tolist()
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    enc = tokenizer(texts, truncation=True, padding=True, return_tensors="np")
    logits = session.run(["logits"], {n: enc[n] for n in wanted})[0]
    np.testing.assert_allclose(sigmoid(logits), test_rows[[f"prob_{n}" for n in names]].to_numpy(np.float64),
                               atol=1e-4)
    info = json.loads((out / "export_info.json").read_text())
    assert info["check"]["max_abs_diff_vs_run"] < 1e-4 and info["check"]["agreement_with_run"] == 1.0
    assert info["check"]["accuracy"] == pytest.approx(record(runs["tags"])["test_at_threshold"]["accuracy"])
    assert 0 <= info["int8"]["check"]["accuracy"] <= 1 and info["int8"]["check"]["rows"] == len(texts)
