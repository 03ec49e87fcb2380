"""Decoder language models as classifiers (docs/decoders.md), on tiny random llama and qwen3 shapes (2
layers of width 64, MiniLM's vocabulary in a decoder's kind of tokenizer without a pad token): the head
reads the last real token whatever the padding (a pooled head: every real token), the pad token is set and recorded, every method trains,
counts are exact, the 4-bit backbone is real on a CPU, and predict, serve and the merged export give the
run's figures."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlab.config import load_config
from peftlab.models.build import build_model
from peftlab.models.loading import load_classifier, load_tokenizer, padding
from peftlab.models.params import count_config, count_parameters
from tests.test_train import train_cli

TEXTS = ["the match goal", "a new chip and software for the network today", "soup", "the coach said the league"
         " season was very big and then the team and the player score a goal"]
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def overrides(model_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.path={data_dir}", "data.max_length=48", "train.epochs=2",
            "train.batch_size=16", "output.plots=false", *extra]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, topic_data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoder-runs")
    base = overrides(tiny_llama_dir, topic_data_dir, "eval.baseline=false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"lora": train_cli(root, base + ["method.name=lora", "train.learning_rate=0.01"], "lora"),
                "qlora": train_cli(root, base + ["method.name=qlora", "train.learning_rate=0.01"], "qlora"),
                "lora-r4": train_cli(root, base + ["method.name=lora", "method.r=4", "train.seed=3",
                                                   "method.target_modules=all-linear"], "lora-r4")}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_head_reads_the_last_real_token_however_padded(kind, tiny_llama_dir, tiny_qwen_dir):
    """The pad token (none in the tokenizer) is set to eos and given to the model; a text's logits alone,
    right-padded and left-padded in a batch of longer texts are the same."""
    folder = str(tiny_llama_dir if kind == "llama" else tiny_qwen_dir)
    tokenizer = load_tokenizer(folder)
    assert padding(tokenizer) == {"pad_token": "[SEP]", "pad_token_id": tokenizer.eos_token_id, "set_from_eos": True}
    model = load_classifier(folder, ["a", "b", "c"], pad_token_id=tokenizer.pad_token_id).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()
            torch.testing.assert_close(model(**batch).logits, alone, atol=1e-5, rtol=1e-5)


def test_runs_learn_and_record_the_head_and_the_4bit_backbone(runs):
    for name, run in runs.items():
        m = metrics(run)
        assert m["status"] == "completed" and m["test"]["accuracy"] > 0.6, (name, m["test"])
        assert m["head"]["reads"].startswith("the last real token")
        assert m["head"]["pad_token"] == "[SEP]" and m["head"]["set_from_eos"] is True
    q = metrics(runs["qlora"])["quantization"]
    # a real NF4 backbone on the CPU: every linear layer of both blocks, counted from the built modules
    assert q["requested"] == "4bit" and q["used"] == "4bit" and q["reason"] is None
    assert q["modules_4bit"] == 2 * LINEARS_PER_LAYER and q["bytes_4bit"] > 0
    # QLoRA's recipe recomputes activations (model.gradient_checkpointing unset); LoRA's keeps them
    assert metrics(runs["qlora"])["efficiency"]["gradient_checkpointing"] is True
    assert metrics(runs["lora"])["efficiency"]["gradient_checkpointing"] is False
    # the trained score head is saved with the adapter and comes back with it
    from safetensors import safe_open

    with safe_open(str(runs["lora"] / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())
    saved = json.loads((runs["lora"] / "adapter" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") == "[SEP]"


def test_predict_is_the_same_alone_and_in_a_batch_and_reloads_the_run(runs):
    import pandas as pd

    from peftlab.runs.trained import load_predictor

    for name in ("lora", "qlora"):
        predictor = load_predictor(runs[name], torch.device("cpu"))
        batch = predictor.probabilities(TEXTS + ["x " * 40], cache=False)
        for i, text in enumerate(TEXTS):
            np.testing.assert_allclose(predictor.probabilities([text], cache=False)[0], batch[i], atol=1e-5)
    # the LoRA run reloaded gives its own test probabilities (the score head included)
    frame = pd.read_csv(runs["lora"] / "predictions.csv")
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    assert np.abs(load_predictor(runs["lora"], torch.device("cpu")).probabilities(frame["text"].tolist()) - probs).max() < 1e-5


def test_adapters_of_one_decoder_mix_in_one_batch(runs):
    from peftlab.evaluation.predict import logits_together
    from peftlab.serve.registry import Registry

    registry = Registry(torch.device("cpu"))
    a, b = registry.add(runs["lora"]), registry.add(runs["lora-r4"])
    assert a.group is b.group and a.group.mixable
    parts = [a.predictor.encode(TEXTS[:3], cache=False), b.predictor.encode(TEXTS[1:], cache=False)]
    mixed = logits_together([a.predictor, b.predictor], parts)
    for m, p, part in zip(mixed, (a.predictor, b.predictor), parts):
        np.testing.assert_allclose(m, p.logits_of(part), atol=1e-5)
    assert np.abs(mixed[0][1] - mixed[1][0]).max() > 1e-3  # two different adapters, really


def test_merged_export_loads_with_plain_transformers(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.export.merged import export_merged

    info = export_merged(runs["lora"], tmp_path / "merged")
    assert info["check"]["max_abs_diff_vs_run"] < 1e-5 and info["check"]["agreement_with_run"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    tokenizer.padding_side = "left"  # as a caller's pipeline may pad
    with torch.no_grad():
        left = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "full", "qlora", "all-linear"])
def test_counts_are_exact_and_what_peft_reports(method, tiny_llama_dir, topic_data_dir):
    extra = ["method.name=lora", "method.target_modules=all-linear"] if method == "all-linear" else [f"method.name={method}"]
    cfg = load_config(None, overrides(tiny_llama_dir, topic_data_dir, *extra))
    meta = count_config(cfg)
    model = build_model(cfg, ["food", "sport", "tech"], torch.device("cpu")).model
    real = count_parameters(model)
    assert (meta.trainable, meta.total) == (real["trainable"], real["total"])
    if hasattr(model, "get_nb_trainable_parameters"):
        assert model.get_nb_trainable_parameters()[0] == meta.trainable
    assert meta.head == 64 * 3  # the score layer: no bias
    expected_adapter = {"lora": 2 * 2 * 16 * (64 + 64), "qlora": 2 * 2 * 16 * (64 + 64),
                        # IA3: k and v scale their 64 outputs, down_proj its 128 inputs
                        "ia3": 2 * (64 + 64 + 128), "full": 0,
                        # every linear layer: q, k, v, o (64 -> 64); gate, up (64 -> 128); down (128 -> 64)
                        "all-linear": 2 * 16 * (4 * 128 + 3 * 192)}[method]
    assert meta.adapter == expected_adapter


def test_trained_counts_match_params(runs):
    for name in ("lora", "qlora", "lora-r4"):
        m = metrics(runs[name])
        cfg = load_config(runs[name] / "config.yaml")
        assert count_config(cfg).trainable == m["params"]["trainable"]


def test_plan_for_a_decoder_fits_and_is_exact(tiny_llama_dir, topic_data_dir):
    from peftlab.models.plan import plan

    cfg = load_config(None, overrides(tiny_llama_dir, topic_data_dir))
    chosen, head = plan(cfg, 20_000, top=4, label_names=["food", "sport", "tech"])
    assert chosen and head == 64 * 3
    for c in chosen:
        assert c.trainable <= 20_000 and c.trainable == c.estimate
        assert set(c.target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_qlora_falls_back_to_8bit_then_none_with_the_reasons(tiny_llama_dir, topic_data_dir, monkeypatch):
    """Where 4-bit cannot run, 8-bit; where neither, the plain model; the record says why each time."""
    from peftlab.models.methods import qlora

    cfg = load_config(None, overrides(tiny_llama_dir, topic_data_dir, "method.name=qlora"))
    real = qlora._why_not
    monkeypatch.setattr(qlora, "_why_not", lambda bits, device: "no 4-bit here" if bits == 4 else real(bits, device))
    q = build_model(cfg, ["a", "b"], torch.device("cpu")).quantization
    assert (q["used"], q["reason"], q["modules_4bit"], q["modules_8bit"]) == ("8bit", "no 4-bit here", 0, 14)
    monkeypatch.setattr(qlora, "_why_not", lambda bits, device: f"no {bits}-bit here")
    with pytest.warns(UserWarning, match="training LoRA on the unquantized model"):
        q = build_model(cfg, ["a", "b"], torch.device("cpu")).quantization
    assert (q["used"], q["reason"], q["modules_4bit"], q["modules_8bit"]) == ("none", "no 4-bit here", 0, 0)


@pytest.mark.parametrize("method", ["probe", "contrastive-lora"])
def test_few_shot_methods_on_a_decoder(method, tmp_path, tiny_qwen_dir, topic_data_dir):
    """A few-shot method on a decoder: the head (a bias-free score layer) fitted on mean-pooled states,
    the body (contrastive-lora) tuned through LoRA on them; the record says what the head reads."""
    run = train_cli(tmp_path, overrides(tiny_qwen_dir, topic_data_dir, f"method.name={method}", "eval.baseline=false",
                                        "method.pair_iterations=2"))
    m = metrics(run)
    assert m["head"]["kind"] == "pooled" and m["head"]["pooling"] == "mean" and m["test"]["accuracy"] > 0.5
    assert m["head"]["reads"].startswith("the mean of the real tokens") and m["head"]["set_from_eos"]
    assert bool(m["few_shot"].get("body_steps")) == (method != "probe")  # the probe leaves the body as it was
    from peftlab.runs.trained import load_predictor

    predictor = load_predictor(run, torch.device("cpu"))
    batch = predictor.probabilities(TEXTS, cache=False)
    np.testing.assert_allclose(predictor.probabilities(TEXTS[:1], cache=False)[0], batch[0], atol=1e-5)


def test_random_decoder_shapes_are_their_published_sizes():
    """random:SHAPE decoders for speed and memory figures: built on the meta device, counted exactly."""
    cfg = load_config(None, ["model.name=random:qwen2.5-0.5b", "data.name=imdb"])
    count = count_config(cfg)
    assert count.model_type == "qwen2" and count.num_layers == 24
    assert 490e6 < count.total < 500e6  # Qwen2.5-0.5B: 494 M with its embeddings
    assert count.adapter == 24 * 16 * ((896 + 896) + (896 + 128))  # q: 896 -> 896, v: 896 -> 2 x 64
