"""Step engines (training/engines/) and true quantization records, on CPU: the CUDA-graph engine's code
path with capture switched off computes what the eager engine computes (buckets, static buffers, the
padded partial batch); the rules under which it falls back; quantization read from the built modules."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peftlab.config import load_config
from peftlab.data.tokenize import Encoded
from peftlab.runs.rundir import RunDir
from peftlab.tasks import MULTI_LABEL
from peftlab.training.engines.cuda_graphs import IGNORE_INDEX, _Static, bucket_for, buckets
from peftlab.training.engines.registry import RunFacts, choose, graph_blockers
from peftlab.training.trainer import Trainer
from tests.test_train import train_cli


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """The tiny BERT without dropout: padding rows then cannot change which units drop, so the two engines
    must agree to rounding."""
    from transformers import BertConfig, BertForSequenceClassification

    from peftlab.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert-nodrop")
    torch.manual_seed(0)
    tokenizer = load_tokenizer("minilm-l6")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fit(tmp_path, model_dir, data_dir, engine: str, method: str, capture: bool = True) -> tuple[Trainer, list[float]]:
    cfg = load_config(None, [f"model.name={model_dir}", f"data.path={data_dir}", "data.max_length=48",
                             "train.epochs=1", "train.batch_size=14", "train.log_every=1", "train.precision=fp32",
                             f"method.name={method}", "method.dropout=0.0", "train.learning_rate=0.01",
                             "eval.baseline=false", "output.plots=false", f"train.step_engine={engine}"])
    trainer = Trainer(cfg, RunDir(tmp_path / f"{engine}-{method}").create(), progress=False)
    trainer.capture_graphs = capture
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run.path / "history.jsonl").read_text().splitlines()]
    return trainer, [r["loss"] for r in rows if r["kind"] == "step"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_graph_engine_without_capture_matches_eager(tmp_path, no_dropout_model, topic_data_dir, method):
    eager, eager_losses = _fit(tmp_path, no_dropout_model, topic_data_dir, "eager", method)
    graphs, graph_losses = _fit(tmp_path, no_dropout_model, topic_data_dir, "cuda_graphs", method, capture=False)
    assert graphs.engine.name == "cuda_graphs" and eager.engine.name == "eager"
    # 240 rows in batches of 14: 17 full batches and a partial one of 2, over several widths
    assert len(graph_losses) == len(eager_losses) == 18
    assert len(graphs.engine.statics) >= 2
    # the graph engine hands BERT the prepared 4-D mask (the GPU's sync-free path), eager on CPU the 2-D one
    assert graphs.engine.mask_4d and not eager.engine.mask_4d
    assert graph_losses == pytest.approx(eager_losses, abs=1e-5)
    a, b = eager.trainable_state(), graphs.trainable_state()
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attention.self.key.bias"):
            # its true gradient is 0 (softmax ignores a shift shared by a row's scores): Adam turns the
            # rounding noise of other padded widths into updates of ~lr; every other weight agrees to 1e-6
            continue
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)
    record = json.loads((graphs.run.path / "metrics.json").read_text())
    assert record["efficiency"]["step_engine"] == "cuda_graphs" and record["efficiency"]["step_engine_reason"] is None


def test_graph_engine_padding_is_visible_to_the_loss(tmp_path, no_dropout_model):
    """A partial batch: its padding rows get the ignore index, see one token, and leave the mean unchanged."""
    data = Encoded(np.arange(1, 13, dtype=np.int32), np.array([0, 5, 8, 12]), np.array([2, 0, 1]))
    s = _Static(batch=5, width=8, device=torch.device("cpu"), pinned=False)
    s.load(data, np.array([2, 0, 1]), pad_id=0)
    assert s.labels.tolist() == [1, 2, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert s.mask.sum(1).tolist() == [4, 5, 3, 1, 1]
    assert s.ids[0, :4].tolist() == [9, 10, 11, 12] and s.ids[0, 4:].tolist() == [0] * 4
    logits = torch.randn(5, 3)
    valid = torch.nn.functional.cross_entropy(logits[:3], s.labels[:3])
    assert torch.nn.functional.cross_entropy(logits, s.labels).item() == pytest.approx(valid.item(), abs=1e-6)


def test_buckets_are_few_and_cover_max_length():
    assert buckets(128) == [32, 64, 96, 128]
    assert buckets(48) == [16, 24, 40, 48]
    assert buckets(20) == [8, 16, 20]  # rounded widths that coincide are one bucket
    for max_length in (16, 48, 100, 128, 512):
        widths = buckets(max_length)
        assert len(widths) <= 4 and widths[-1] == max_length and all(w % 8 == 0 or w == max_length for w in widths)
        for n in range(1, max_length + 1):
            assert n <= bucket_for(n, widths) and bucket_for(n, widths) in widths


def test_fallback_rules():
    ok = RunFacts(device="cuda")
    assert graph_blockers(ok) == [] and choose("auto", ok) == ("cuda_graphs", None)
    assert choose("cuda_graphs", ok) == ("cuda_graphs", None)
    assert choose("eager", ok) == ("eager", None)
    cases = {"device": ("cpu", "CUDA device"), "world_size": (2, "DDP"), "fp16_scaler": (True, "GradScaler"),
             "accumulation": (4, "accumulation"), "distill": (True, "distillation"),
             "task": (MULTI_LABEL, "multi-label"), "loss": ("focal", "focal"), "compile": (True, "compile"),
             "gradient_checkpointing": (True, "checkpointing"), "quantized": (True, "4-bit")}
    for field, (value, words) in cases.items():
        engine, reason = choose("auto", RunFacts(**{"device": "cuda", field: value}))
        assert engine == "eager" and reason.startswith("auto fell back to eager") and words in reason, field
    _, reason = choose("cuda_graphs", RunFacts(device="cpu", accumulation=2))
    assert "CUDA device" in reason and "accumulation" in reason  # every reason, not only the first


def test_cpu_run_records_the_engine_and_why_it_fell_back(tmp_path, tiny_overrides):
    m = json.loads((train_cli(tmp_path, tiny_overrides + ["train.step_engine=cuda_graphs", "train.epochs=1",
                                                           "eval.baseline=false"]) / "metrics.json").read_text())
    assert m["efficiency"]["step_engine"] == "eager"
    assert "CUDA graphs need a CUDA device (this run is on cpu)" in m["efficiency"]["step_engine_reason"]
    assert m["efficiency"]["frozen_dtype"] == "float32"
    assert m["config"]["train"]["step_engine"] == "cuda_graphs"


# --- quantization, read from the modules ------------------------------------------------------------

def test_quantization_is_counted_from_modules():
    from bitsandbytes.nn import Linear4bit

    from peftlab.models.quantized import narrow_linears, quantization_record

    plain = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 3)).requires_grad_(False)
    q = quantization_record(plain, {"requested": "4bit", "reason": "4-bit bitsandbytes training needs a CUDA device"})
    assert q["used"] == "none" and q["modules_4bit"] == 0 and q["bytes_4bit"] == 0
    assert q["reason"].startswith("4-bit bitsandbytes") and q["frozen_linear_unquantized"] == 2
    # asked for, no reason given, none built: the record says so itself
    q = quantization_record(plain, {"requested": "4bit", "skipped_for_width": ["1"]})
    assert q["used"] == "none" and "no 4bit layers" in q["reason"] and "multiples of 64" in q["reason"]
    assert narrow_linears(plain) == ["1"]  # 3 outputs: not a width bitsandbytes takes

    mixed = torch.nn.Sequential(Linear4bit(128, 64), torch.nn.Linear(64, 3)).requires_grad_(False)
    q = quantization_record(mixed, {"requested": "4bit"})
    assert q["used"] == "4bit" and q["modules_4bit"] == 1 and q["reason"] is None
    assert q["bytes_4bit"] == (128 * 64 + 64) * 4 and q["frozen_linear_unquantized"] == 1
    assert quantization_record(plain, {})["used"] is None  # a method that never quantizes


def test_qlora_on_layers_too_narrow_records_no_quantization_with_the_reason(tmp_path, tiny_overrides):
    """The 32-wide tiny BERT has no linear layer bitsandbytes takes: asked for 4-bit, it got none, and says
    why (a decoder 64 wide gets real 4-bit layers on a CPU: tests/test_decoders.py)."""
    out = train_cli(tmp_path, tiny_overrides + ["method.name=qlora", "train.epochs=1", "eval.baseline=false"])
    q = json.loads((out / "metrics.json").read_text())["quantization"]
    assert q["requested"] == "4bit" and q["used"] == "none" and "multiples of 64" in q["reason"]
    assert q["modules_4bit"] == 0 and q["modules_8bit"] == 0 and q["frozen_linear_unquantized"] > 0
    # QLoRA's recipe checkpoints activations where transformers can (BERT can)
    assert json.loads((out / "metrics.json").read_text())["efficiency"]["gradient_checkpointing"] is True


def test_qlora_checkpoints_only_what_transformers_can(tmp_path, tiny_model_dir):
    """Unset, model.gradient_checkpointing is the method's choice where the architecture allows it (MPNet
    does not: its QLoRA run trains without); asked for on such a model, it is one line."""
    import shutil

    from transformers import MPNetConfig, MPNetForMaskedLM

    from peftlab.errors import UserError
    from peftlab.models.build import build_model

    mpnet = tmp_path / "tiny-mpnet"
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    MPNetForMaskedLM(MPNetConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=37)).save_pretrained(mpnet)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, mpnet / f.name)
    cpu = torch.device("cpu")
    for folder, method, want in ((mpnet, "qlora", False), (tiny_model_dir, "lora", False)):
        cfg = load_config(None, [f"model.name={folder}", f"method.name={method}"])
        assert build_model(cfg, ["a", "b"], cpu).gradient_checkpointing is want, (folder.name, method)
    cfg = load_config(None, [f"model.name={mpnet}", "method.name=qlora", "model.gradient_checkpointing=true"])
    with pytest.raises(UserError, match="cannot checkpoint MPNetForSequenceClassification"):
        build_model(cfg, ["a", "b"], cpu)


def test_random_shapes_load_through_the_pretrained_path(tmp_path, monkeypatch):
    """random:SHAPE is written once to a cached folder and loaded like any model, so load kwargs (dtype,
    quantization_config, device_map) apply to it."""
    from peftlab.models import loading

    monkeypatch.setitem(loading.RANDOM_SHAPES, "tiny", dict(hidden_size=64, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=128))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    seen = []
    real = loading.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(loading.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    first = loading.load_classifier("random:tiny", ["a", "b", "c"], {"dtype": torch.bfloat16})
    assert (tmp_path / "cache" / "random-models" / "tiny" / "config.json").is_file()
    assert seen and seen[0][1]["dtype"] == torch.bfloat16 and first.dtype == torch.bfloat16
    assert first.classifier.out_features == 3
    torch.manual_seed(123)  # the stored weights do not depend on the caller's seed
    second = loading.load_classifier("random:tiny", ["a", "b"])
    w1 = first.bert.encoder.layer[0].attention.self.query.weight.float()
    w2 = second.bert.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(w1, w2, atol=1e-2, rtol=1e-2)  # the same weights (bf16-rounded in the first)


def test_frozen_weights_in_bf16_train_and_are_recorded(tmp_path, tiny_overrides, capsys):
    from peftlab.cli import main

    out = train_cli(tmp_path, tiny_overrides + ["train.precision=bf16", "train.frozen_dtype=bf16", "train.epochs=1",
                                                "eval.baseline=false"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["efficiency"]["frozen_dtype"] == "bfloat16"
    # bf16 frozen weights need bf16 compute: one line, exit 2
    args = ["train", "--no-progress", "--output-dir", str(tmp_path / "bad")]
    for o in tiny_overrides + ["train.precision=fp32", "train.frozen_dtype=bf16"]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "train.frozen_dtype=bf16 needs train.precision=bf16" in err and "\n" not in err


def test_layers_bitsandbytes_cannot_take_are_found_without_loading(tiny_model_dir):
    """On a weightless copy: the 32-wide tiny model has no linear layer bitsandbytes 4-bit can take;
    bert-base has only its 2-output head, which stays out of quantization anyway."""
    from peftlab.models.methods.qlora import too_narrow

    narrow = too_narrow(str(tiny_model_dir), ["a", "b", "c"])
    assert "bert.encoder.layer.0.attention.self.query" in narrow and "classifier" in narrow
    assert len(narrow) == 2 * 6 + 2  # 6 linear layers per encoder layer, the pooler and the head
    assert too_narrow("random:bert-base", ["a", "b"]) == ["classifier"]
