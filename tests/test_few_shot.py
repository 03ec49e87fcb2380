"""Few labelled rows (docs/few-shot.md): selection on tiny validation sets, tiny-data safeguards, the
pooled head of sentence-transformer checkpoints, and the contrastive and probe methods. Real training
on the tiny model, through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_rows
from peftlab.cli import main
from peftlab.data.splits import capped_batch_size
from peftlab.runs.select import better, pick_best


def write_rows(path: Path, split: str, rows: list[dict]) -> None:
    with open(path / f"{split}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def few_rows_dir(tmp_path_factory) -> Path:
    """The issue's folder: train and test only, 8 rows per class (3 classes)."""
    path = tmp_path_factory.mktemp("few")
    write_rows(path, "train", make_rows(24, seed=5))
    write_rows(path, "test", make_rows(60, seed=6))
    return path


def train(out: Path, *overrides: str) -> int:
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in ("data.max_length=48", "output.plots=false", "eval.baseline=false", *overrides):
        args += ["--set", o]
    return main(args)


def record(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --- selection ---------------------------------------------------------------------------------------
def test_ties_go_to_the_lower_validation_loss():
    assert better(0.5, 0.9, 0.5, 1.0) and not better(0.5, 1.1, 0.5, 1.0) and better(0.6, 2.0, 0.5, 0.1)
    assert not better(0.5, None, 0.5, 1.0)  # a missing loss never wins a tie
    rows = [("a", 0.8, 0.6, 10), ("b", 0.8, 0.4, 99), ("c", 0.7, 0.1, 1)]
    best = pick_best(rows, lambda r: r[1], lambda r: r[3], lambda r: r[0], loss=lambda r: r[2])
    assert best[0] == "b"
    assert pick_best(rows, lambda r: r[1], lambda r: r[3], lambda r: r[0])[0] == "a"  # no loss: fewer params


def data_with_validation(tmp_path, topic_data_dir, rows: int):
    """The topic data's train and test files beside a validation file of `rows` rows."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text((topic_data_dir / f"{split}.jsonl").read_text())
    write_rows(data, "validation", make_rows(rows, seed=9))
    return data


def test_the_best_epoch_breaks_ties_by_validation_loss(tmp_path, tiny_model_dir, topic_data_dir):
    """Validation of 3 rows, kept (min_validation_rows=1): the metric ties across epochs, so the best epoch
    is the one of least validation loss among the tied, as the history shows."""
    val = data_with_validation(tmp_path, topic_data_dir, 3)
    out = tmp_path / "run"
    assert train(out, f"model.name={tiny_model_dir}", f"data.path={val}", "train.epochs=5",
                 "train.learning_rate=0.005", "data.min_validation_rows=1", "method.name=full") == 0
    m = record(out)
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    top = max(e["validation"]["macro_f1"] for e in epochs)
    tied = [e for e in epochs if e["validation"]["macro_f1"] == top]
    assert m["best_epoch"] == min(tied, key=lambda e: e["validation"]["loss"])["epoch"]
    assert m["selection"]["rule"].startswith("highest validation metric; ties: lower validation loss")


# --- tiny data ---------------------------------------------------------------------------------------
def test_batch_size_is_capped_for_steps_per_epoch():
    assert capped_batch_size(16, 16, 1, 4) == 4
    assert capped_batch_size(240, 16, 1, 4) == 16
    assert capped_batch_size(3, 16, 1, 4) == 1
    assert capped_batch_size(64, 16, 2, 4) == 8


def test_few_rows_keep_the_last_epoch_and_take_several_steps(tmp_path, capsys, tiny_model_dir, few_rows_dir):
    """The issue's folder: a validation split carved from 24 rows (3) could not choose an epoch, so none is
    carved: all 24 train, validation is scored on them, and the last epoch is kept."""
    out = tmp_path / "run"
    assert train(out, f"model.name={tiny_model_dir}", f"data.path={few_rows_dir}", "train.epochs=3",
                 "train.learning_rate=0.005") == 0
    printed = capsys.readouterr().out
    m = record(out)
    assert m["split_sizes"]["train"] == 24 and m["split_sizes"]["validation"] == 24
    assert m["split_sources"]["validation"].startswith("the training rows (no validation split; a 10% carve of 24")
    assert m["selection"]["rule"] == "last epoch" and m["best_epoch"] == 3 and m["selection"]["validation_rows"] == 0
    assert m["selection"]["batch_size"] == {"asked": 16, "used": 6, "reason": m["selection"]["batch_size"]["reason"]}
    assert m["efficiency"]["optimizer_steps"] == 12  # 4 per epoch, not 2
    assert "the last epoch is kept" in printed and "batch size 16 -> 6" in printed


def test_rows_are_spared_only_where_nothing_needs_held_out_validation(few_rows_dir):
    from peftlab.config.schema import DataConfig
    from peftlab.data import load_data

    cfg = DataConfig(path=str(few_rows_dir))
    spared = load_data(cfg, 0, spare_rows=True)
    assert spared.validation_is_train and len(spared.train) == 24 and spared.validation.texts == spared.train.texts
    carved = load_data(cfg, 0)  # a run fitting a temperature or a threshold on validation: carved as before
    assert not carved.validation_is_train and (len(carved.train), len(carved.validation)) == (21, 3)
    low = load_data(cfg.model_copy(update={"min_validation_rows": 3}), 0, spare_rows=True)
    assert not low.validation_is_train and len(low.validation) == 3  # 3 rows may choose: carved


def test_a_tiny_given_validation_is_warned_about(tmp_path, capsys, tiny_model_dir, topic_data_dir):
    data = data_with_validation(tmp_path, topic_data_dir, 6)
    out = tmp_path / "run"
    assert train(out, f"model.name={tiny_model_dir}", f"data.path={data}", "train.epochs=2") == 0
    assert record(out)["selection"]["rule"] == "last epoch" and record(out)["best_epoch"] == 2
    assert "validation has 6 rows" in capsys.readouterr().out


def test_an_emptied_split_is_one_line_exit_2(tmp_path, capsys, tiny_model_dir, topic_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    train_rows = make_rows(60, seed=1)
    write_rows(data, "train", train_rows)
    write_rows(data, "validation", train_rows[:30])  # every validation text is also in train
    write_rows(data, "test", make_rows(30, seed=3))
    code = train(tmp_path / "run", f"model.name={tiny_model_dir}", f"data.path={data}",
                 "data.drop_duplicates_across_splits=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "validation split is empty" in err[0], err


# --- the pooled head ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_st_own_length_dir(tiny_st_dir, tmp_path_factory) -> Path:
    """The tiny sentence-transformers checkpoint with a max_seq_length of its own (40 tokens)."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-st-40") / "model"
    shutil.copytree(tiny_st_dir, path)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": False}))
    return path


def test_max_length_follows_the_checkpoint(tiny_model_dir, tiny_st_own_length_dir, tmp_path):
    import shutil

    from peftlab.models.loading import max_length_for, model_config

    def tokens(model, asked=None):
        return max_length_for(asked, str(model), model_config(str(model), ["a", "b"]))

    tiny_st_dir = tiny_st_own_length_dir
    assert tokens(tiny_st_dir) == {"tokens": 40, "source": "the checkpoint's sentence_bert_config.json max_seq_length"}
    assert tokens(tiny_st_dir, 24) == {"tokens": 24, "source": "data.max_length"}
    assert tokens(tiny_model_dir)["tokens"] == 128 and tokens(tiny_model_dir)["source"].startswith("default")
    assert tokens("minilm-l6")["tokens"] == 256  # all-MiniLM-L6-v2's own, not the old 128
    wide = tmp_path / "wide"
    shutil.copytree(tiny_st_dir, wide)
    (wide / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    assert tokens(wide) == {"tokens": 128, "source": "the checkpoint's sentence_bert_config.json max_seq_length "
                                                     "(512), capped at its 128 positions"}


def test_head_follows_the_checkpoint(tiny_model_dir, tiny_st_dir):
    import torch

    from peftlab.models.heads import embed, installed
    from peftlab.models.loading import head_for, load_classifier

    assert head_for(str(tiny_st_dir))["kind"] == "pooled" and head_for(str(tiny_st_dir))["normalize"] is True
    assert head_for(str(tiny_model_dir))["kind"] == "own"
    assert head_for(str(tiny_st_dir), "cls")["kind"] == "own"
    assert head_for(str(tiny_model_dir), "pooled")["pooling"] == "mean"
    assert head_for("minilm-l6") == {**head_for("minilm-l6"), "kind": "pooled", "pooling": "mean", "normalize": True}
    head = head_for(str(tiny_st_dir))
    model = load_classifier(str(tiny_st_dir), ["a", "b"], head=head).eval()
    assert installed(model) == head
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0], [101, 2003, 2004, 2005, 2006, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = load_classifier(str(tiny_model_dir), ["a", "b"]).eval().bert(input_ids=ids, attention_mask=mask)[0]
        expected = model.classifier(embed(hidden, mask, head))
    torch.testing.assert_close(logits, expected)  # the classifier reads the masked mean, unit length
    # padding does not change a text's logits (the mean is over real tokens only)
    with torch.no_grad():
        alone = model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits
    torch.testing.assert_close(alone, logits[:1], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def pooled_run(tiny_st_dir, topic_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pooled") / "run"
    assert train(out, f"model.name={tiny_st_dir}", f"data.path={topic_data_dir}", "train.epochs=2",
                 "train.learning_rate=0.01", "method.name=lora") == 0
    return out


def test_pooled_run_records_its_head_and_predicts_as_it_tested(pooled_run, capsys):
    import pandas as pd

    m = record(pooled_run)
    assert m["head"]["kind"] == "pooled" and m["head"]["pooling"] == "mean"
    frame = pd.read_csv(pooled_run / "predictions.csv")
    texts = frame["text"].tolist()[:12]
    from peftlab.runs.trained import load_predictor

    probs = load_predictor(pooled_run).probabilities(texts)
    assert abs(probs - frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()[:12]).max() < 1e-4


def test_pooled_run_exports_merged_and_onnx(pooled_run, tmp_path):
    from peftlab.export.merged import export_merged
    from peftlab.export.onnx_export import export_onnx

    merged = export_merged(pooled_run, tmp_path / "merged")
    assert merged["check"]["agreement_with_run"] == 1.0 and merged["check"]["max_abs_diff_vs_run"] < 1e-4
    assert "peftlab_head.py" in merged["files"]
    onnx = export_onnx(pooled_run, tmp_path / "onnx")
    assert onnx["check"]["agreement_with_run"] == 1.0 and onnx["check"]["max_abs_diff_vs_run"] < 1e-4


# --- the few-shot methods -----------------------------------------------------------------------------
def test_pairs_join_a_row_with_its_class_and_another():
    import numpy as np

    from peftlab.training.contrastive import make_pairs

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pairs = make_pairs(labels, 3, seed=0)
    assert len(pairs) == 2 * 3 * len(labels)
    for i, j, target in pairs:
        assert (labels[i] == labels[j]) == bool(target) and (i != j or not target)
    assert (make_pairs(labels, 3, seed=0) == pairs).all() and not (make_pairs(labels, 3, seed=1) == pairs).all()


def few_shot_run(out: Path, model: Path, data: Path, method: str, *extra: str) -> dict:
    assert train(out, f"model.name={model}", f"data.path={data}", f"method.name={method}", "method.pair_objective=pairs",
                 "method.pair_iterations=2", "train.batch_size=8", "train.learning_rate=0.01", *extra) == 0
    return record(out)


def predictions_match(run: Path) -> None:
    """predict gives the probabilities the run wrote for its test rows (the ordinary reload path)."""
    import pandas as pd

    from peftlab.runs.trained import load_predictor

    frame = pd.read_csv(run / "predictions.csv")
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    assert abs(load_predictor(run).probabilities(frame["text"].tolist()) - probs).max() < 1e-4


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory, tiny_model_dir, few_rows_dir) -> Path:
    out = tmp_path_factory.mktemp("contrastive") / "run"
    # a plain BERT checkpoint: the method still reads a pooled embedding (mean), as model.head=pooled
    few_shot_run(out, tiny_model_dir, few_rows_dir, "contrastive-lora")
    return out


def test_contrastive_lora_tunes_the_body_on_pairs_then_fits_the_head(contrastive_run):
    from safetensors.torch import load_file

    m = record(contrastive_run)
    assert m["method"] == "contrastive-lora" and m["head"]["kind"] == "pooled" and m["head"]["pooling"] == "mean"
    fs = m["few_shot"]
    rows = m["split_sizes"]["train"]
    assert fs["pairs"] == 2 * 2 * rows and fs["body_steps"] == -(-fs["pairs"] // 8) and fs["head_fit"].startswith("logistic")
    assert m["selection"]["rule"].startswith("none") and m["best_epoch"] == 1
    steps = [json.loads(line) for line in (contrastive_run / "history.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "step"][-1] == fs["body_steps"]
    weights = load_file(contrastive_run / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the body moved
    assert any("classifier" in k for k in weights)  # the fitted head is saved with the adapter
    assert m["test"]["accuracy"] > 0.6  # 3 topics, chance 1/3: pairs and head learned them (0.92 measured)
    predictions_match(contrastive_run)


def test_probe_fits_the_head_alone(tmp_path, tiny_st_dir, few_rows_dir):
    from safetensors.torch import load_file

    m = few_shot_run(tmp_path / "run", tiny_st_dir, few_rows_dir, "probe")
    assert m["few_shot"]["pairs"] == 0 and m["few_shot"]["body_steps"] == 0
    assert m["params"]["trainable"] == 32 * 3 + 3  # the linear head on the 32-wide embedding
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() == 0 for k, v in weights.items() if "lora_B" in k)  # the body never moved
    predictions_match(tmp_path / "run")


def test_in_batch_pairs_and_the_end_to_end_phase(tmp_path, tiny_st_own_length_dir, few_rows_dir):
    """FastFit-style batches (every pair of a class-balanced batch at once), then body and head trained
    together; data.max_length unset: the checkpoint's own 40 tokens, recorded and used again by predict."""
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--output-dir", str(out)]
    for o in (f"model.name={tiny_st_own_length_dir}", f"data.path={few_rows_dir}", "method.name=contrastive-lora",
              "method.pair_objective=in_batch", "method.pair_iterations=4", "method.end_to_end_epochs=2",
              "train.batch_size=12", "train.learning_rate=0.01", "output.plots=false", "eval.baseline=false"):
        args += ["--set", o]
    assert main(args) == 0
    m = record(out)
    fs = m["few_shot"]
    assert m["max_length"] == {"tokens": 40, "source": "the checkpoint's sentence_bert_config.json max_seq_length"}
    assert m["config"]["data"]["max_length"] == 40
    # 2 x 4 x 24 = 192 pairs at 66 (12 rows) per step: 3 steps of 4 rows per class
    assert fs["objective"] == "in_batch" and fs["body_steps"] == 3 and fs["pairs"] == 3 * 66
    assert fs["end_to_end"]["steps"] == 4 and fs["end_to_end"]["last_loss"] < 1.0  # 24 rows, batches of 12, 2 passes
    assert m["test"]["accuracy"] > 0.6
    predictions_match(out)


def test_supervised_contrastive_pulls_classes_apart():
    import numpy as np
    import torch

    from peftlab.training.contrastive import in_batch_rows, supervised_contrastive

    labels = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = apart[[0, 2, 1, 3]]
    assert supervised_contrastive(apart, labels, 0.1) < supervised_contrastive(mixed, labels, 0.1)
    rows = in_batch_rows(np.array([0] * 10 + [1] * 3 + [2] * 7), batch=9, steps=5, seed=0)
    for r in rows:
        counts = np.bincount(np.array([0] * 10 + [1] * 3 + [2] * 7)[r], minlength=3)
        assert len(set(r.tolist())) == len(r) and list(counts) == [3, 3, 3]


def test_contrastive_full_and_ia3_are_ordinary_runs(tmp_path, tiny_st_dir, few_rows_dir):
    full = few_shot_run(tmp_path / "full", tiny_st_dir, few_rows_dir, "contrastive-full", "method.head_fit=linear")
    assert (tmp_path / "full" / "model").is_dir() and full["few_shot"]["head_fit"].startswith("linear head")
    predictions_match(tmp_path / "full")
    ia3 = few_shot_run(tmp_path / "ia3", tiny_st_dir, few_rows_dir, "contrastive-ia3")
    assert ia3["few_shot"]["pairs"] == 4 * ia3["split_sizes"]["train"] and (tmp_path / "ia3" / "adapter").is_dir()
    predictions_match(tmp_path / "ia3")


def test_few_shot_methods_refuse_what_they_cannot_do(tmp_path, capsys, tiny_st_dir, few_rows_dir, label_set_data_dir):
    code = train(tmp_path / "a", f"model.name={tiny_st_dir}", f"data.path={few_rows_dir}",
                 "method.name=contrastive-lora", "model.head=cls")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.head=auto" in err[0], err
    code = train(tmp_path / "b", f"model.name={tiny_st_dir}", f"data.path={label_set_data_dir}", "method.name=probe",
                 "data.multi_label=true", "data.label_column=labels")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "single-label" in err[-1], err


def test_few_shot_methods_sweep_and_report(tmp_path, capsys, tiny_st_dir, few_rows_dir):
    import yaml

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_st_dir)}, "data": {"path": str(few_rows_dir), "max_length": 48},
        "method": {"pair_iterations": 2}, "train": {"batch_size": 8, "learning_rate": 0.01},
        "output": {"plots": False}, "eval": {"baseline": False},
        "sweep": {"grid": {"method.name": ["probe", "contrastive-lora"]}}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["counts"] == {"completed": 2} and "validation loss" in summary["selection"]
    assert all(c["validation_loss"]["n"] == 1 for c in summary["configurations"])
    assert main(["report", str(out), "--output", str(tmp_path / "r.html")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "probe" in md and "contrastive-lora" in md


def test_served_heads_do_not_share_a_base(tmp_path, tiny_st_dir, topic_data_dir, pooled_run):
    """A pooled-head run and an own-head run of one checkpoint are served side by side, each as it tested."""
    import numpy as np
    import pandas as pd
    import torch

    from peftlab.serve.registry import Registry

    own = tmp_path / "own"
    assert train(own, f"model.name={tiny_st_dir}", f"data.path={topic_data_dir}", "train.epochs=1",
                 "method.name=lora", "model.head=cls") == 0
    assert record(own)["head"]["kind"] == "own"
    registry = Registry(torch.device("cpu"))
    served = [registry.add(pooled_run), registry.add(own)]
    assert served[0].group is not served[1].group
    for s, run in zip(served, (pooled_run, own)):
        frame = pd.read_csv(run / "predictions.csv")
        probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
        assert np.abs(s.predictor.probabilities(frame["text"].tolist()[:10]) - probs[:10]).max() < 1e-4


def test_pooled_adapters_share_a_base_and_mix_in_one_batch(tmp_path, tiny_st_dir, few_rows_dir, pooled_run):
    """Two pooled-head adapter runs of one checkpoint share a base; one mixed pass gives each row its own
    run's logits, as that run alone gives them."""
    import numpy as np
    import torch

    from peftlab.evaluation.predict import logits_together
    from peftlab.serve.registry import Registry

    probe = tmp_path / "probe"
    few_shot_run(probe, tiny_st_dir, few_rows_dir, "probe")
    registry = Registry(torch.device("cpu"))
    a, b = registry.add(pooled_run), registry.add(probe)
    assert a.group is b.group
    texts = [r["text"] for r in make_rows(8, seed=11)]
    parts = [a.predictor.encode(texts[:5], cache=False), b.predictor.encode(texts[5:], cache=False)]
    mixed = logits_together([a.predictor, b.predictor], parts)
    alone = [a.predictor.logits(texts[:5], cache=False), b.predictor.logits(texts[5:], cache=False)]
    for m, one in zip(mixed, alone):
        assert np.abs(m - one).max() < 1e-4
