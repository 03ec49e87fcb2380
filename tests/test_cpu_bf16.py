"""bf16 on a CPU with bf16 units (AVX512-BF16 or AMX): precision=auto picks it there, with the frozen
weights stored in bf16 and the trainable ones and the optimizer state in fp32; predict and serve
follow. The suite runs as on a CPU without such units (conftest: PEFTLAB_CPU_BF16=0); these tests set
PEFTLAB_CPU_BF16=1, so they run the bf16 path on any CPU (slowly where bf16 is emulated: tiny models)."""
from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from peftlab import runtime as rt
from peftlab.config import load_config
from peftlab.runs.rundir import RunDir
from peftlab.training.trainer import Trainer
from tests.conftest import SHARED_DATA, _tiny_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_trainer(tmp_path_factory, tiny_model_dir, topic_data_dir) -> Trainer:
    """A LoRA run of the tiny model with precision=auto, on a CPU that says it has bf16 units."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(rt.CPU_BF16_ENV, "1")
        mp.setenv("PEFTLAB_CACHE", str(tmp_path_factory.mktemp("bf16-tokcache")))
        cfg = load_config(None, _tiny_run(tiny_model_dir, topic_data_dir, 3, "train.device=cpu", "eval.baseline=false")
                          + ["train.learning_rate=0.05"])
        trainer = Trainer(cfg, RunDir(tmp_path_factory.mktemp("bf16") / "run").create(), progress=False)
        trainer.fit()
    return trainer


def test_auto_trains_in_bf16_with_frozen_weights_bf16_and_trainable_state_fp32(bf16_trainer):
    record = bf16_trainer.run.record()
    eff = record.efficiency
    assert record.status == "completed" and record.validation.accuracy > 0.5  # three topics: it learned
    assert eff.precision == "bfloat16" and eff.precision_reason == f"auto: bf16, ${rt.CPU_BF16_ENV}=1"
    assert eff.frozen_dtype == "bfloat16"
    model = bf16_trainer.model
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert bf16_trainer.trainable and {p.dtype for p in bf16_trainer.trainable} == {torch.float32}
    moments = [t for s in bf16_trainer.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert len(moments) == 2 * len(bf16_trainer.trainable) and {t.dtype for t in moments} == {torch.float32}


def test_predict_and_serve_follow_in_bf16_and_agree_with_the_run(bf16_trainer, monkeypatch):
    """predict and serve pick bf16 the same way; their linear weights are stored in bf16, which changes no
    output under autocast (bit for bit), and their labels are the run's own test labels."""
    from peftlab.evaluation.predict import Predictor
    from peftlab.runs.trained import load_predictor, load_trained
    from peftlab.serve.registry import Registry

    monkeypatch.setenv(rt.CPU_BF16_ENV, "1")
    run = bf16_trainer.run.path
    frame = pd.read_csv(run / "predictions.csv")
    texts = frame["text"].tolist()
    predictor = load_predictor(run, CPU)
    assert predictor.runtime.dtype == torch.bfloat16 and predictor.runtime.reason.startswith("auto: bf16")
    assert predictor.model.classifier.weight.dtype == torch.bfloat16  # stored once, not cast per batch
    trained = load_trained(run, CPU)  # the same weights in fp32, cast by autocast at every call
    plain = Predictor(trained.model, trained.tokenizer, trained.label_names, 48, rt.Runtime(CPU, torch.bfloat16))
    np.testing.assert_array_equal(predictor.logits(texts), plain.logits(texts))
    labels = [r["label"] for r in predictor.predict(texts)]
    assert np.mean(np.array(labels) == frame["predicted"].to_numpy()) >= 0.95
    fp32 = load_predictor(run, CPU, precision="fp32")
    assert fp32.runtime.dtype == torch.float32 and fp32.model.classifier.weight.dtype == torch.float32

    served = Registry(CPU).add(run)  # serve keeps LoRA apart from the base weights (several adapters per base)
    unmerged = load_trained(run, CPU, merge=False)
    plain = Predictor(unmerged.model, unmerged.tokenizer, unmerged.label_names, 48, rt.Runtime(CPU, torch.bfloat16),
                      merge_lora=False)
    assert served.predictor.runtime.dtype == torch.bfloat16
    np.testing.assert_array_equal(served.predictor.logits(texts), plain.logits(texts))


NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU emulates bf16 (~8x slower than fp32: about a minute here); "
                                            "the check runs where precision=auto picks bf16")
@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "validation.jsonl.gz").exists(), reason="needs ../shared/data/sst2")
def test_bf16_labels_agree_with_fp32_on_a_real_model(tmp_path, capsys):
    """all-MiniLM-L6-v2 with a head fitted on SST-2 phrases (the probe: the fastest real classifier to
    train), trained and tested in fp32 (predictions.csv); its test rows predicted in bf16 get the same labels."""
    from peftlab.cli import main
    from peftlab.runs.trained import load_predictor

    rows = [json.loads(line) for line in gzip.open(SHARED_DATA / "sst2" / "validation.jsonl.gz", "rt")]
    random.Random(0).shuffle(rows)
    names = json.loads((SHARED_DATA / "sst2" / "labels.json").read_text())
    data = tmp_path / "sst2"
    data.mkdir()
    for split, part in (("train", rows[:160]), ("validation", rows[160:224]), ("test", rows[224:424])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": names[r["label"]]}) + "\n"
                                                     for r in part))
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in (f"data.path={data}", "method.name=probe", "data.max_length=64", "train.precision=fp32",
              "eval.baseline=false", "output.plots=false"):
        args += ["--set", o]
    assert main(args) == 0
    accuracy = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert accuracy > 0.7  # it learned: SST-2 is two balanced classes
    frame = pd.read_csv(out / "predictions.csv")
    bf16 = [r["label"] for r in load_predictor(out, CPU, precision="bf16").predict(frame["text"].tolist())]
    agreement = float(np.mean(np.array(bf16) == frame["predicted"].to_numpy()))
    with capsys.disabled():
        print(f"\nMiniLM probe on SST-2: test accuracy {accuracy:.4f} (fp32); bf16 labels agree with fp32 on "
              f"{agreement:.2%} of {len(frame)} test rows")
    assert agreement >= 0.97


def test_cpu_bf16_detection_and_its_override(monkeypatch):
    monkeypatch.delenv(rt.CPU_BF16_ENV, raising=False)
    native, why = rt.cpu_bf16()
    assert native == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert rt.auto_precision(CPU)[0] == (torch.bfloat16 if native else torch.float32)
    assert ("AVX512-BF16" in why or "AMX" in why) if native else "no bf16 units" in why
    monkeypatch.setenv(rt.CPU_BF16_ENV, "0")  # a CPU without bf16 units: nothing changes
    assert rt.Runtime.pick("cpu", "auto") == rt.Runtime(CPU, torch.float32, f"auto: fp32, ${rt.CPU_BF16_ENV}=0")
    assert rt.emulated_bf16(CPU, torch.bfloat16) and "slow here" in rt.precision_reason("bf16", CPU, torch.bfloat16)
    monkeypatch.setenv(rt.CPU_BF16_ENV, "1")
    assert rt.Runtime.pick("cpu", "auto").dtype == torch.bfloat16 and rt.Runtime.pick("cpu", "fp32").dtype == torch.float32
    assert rt.emulated_bf16(CPU, torch.bfloat16) is None
    monkeypatch.setenv(rt.CPU_BF16_ENV, "yes")
    with pytest.raises(rt.UserError, match=r"PEFTLAB_CPU_BF16='yes': use 1 \(this CPU has bf16 units\), 0"):
        rt.cpu_bf16()


@pytest.mark.skipif(not NATIVE_BF16, reason="bitsandbytes looks for its hub kernel only on a CPU with AVX512-BF16")
def test_no_bitsandbytes_hub_kernel_warning_on_a_bf16_cpu():
    """On such a CPU bitsandbytes' import (peft's, on every command) warns that its optional hub kernel
    cannot be fetched; the pure-PyTorch path peftlab uses needs none, so peftlab keeps the line out."""
    import subprocess
    import sys

    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if "kernels-community" not in bare.stderr:
        pytest.skip("this bitsandbytes found its kernel or did not look: nothing to keep out")
    ours = subprocess.run([sys.executable, "-c", "import peftlab, bitsandbytes"], capture_output=True, text=True)
    assert ours.returncode == 0 and "kernels-community" not in ours.stderr, ours.stderr
