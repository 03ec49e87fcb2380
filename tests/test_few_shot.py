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


def test_the_best_epoch_breaks_ties_by_validation_loss(tmp_path, tiny_model_dir, topic_data_dir):
    """Validation of 3 rows, kept (min_validation_rows=1): the metric ties across epochs, so the best epoch
    is the one of least validation loss among the tied, as the history shows."""
    val = tmp_path / "data"
    val.mkdir()
    for split in ("train", "test"):
        (val / f"{split}.jsonl").write_text((topic_data_dir / f"{split}.jsonl").read_text())
    write_rows(val, "validation", make_rows(3, seed=9))
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


def test_few_rows_keep_every_row_and_the_last_epoch(tmp_path, capsys, tiny_model_dir, few_rows_dir):
    out = tmp_path / "run"
    assert train(out, f"model.name={tiny_model_dir}", f"data.path={few_rows_dir}", "train.epochs=3",
                 "train.learning_rate=0.005") == 0
    printed = capsys.readouterr().out
    m = record(out)
    assert m["split_sizes"]["train"] == 24 and m["split_sizes"]["validation"] == 24  # nothing carved
    assert m["selection"]["rule"] == "last epoch" and m["best_epoch"] == 3
    assert m["selection"]["batch_size"] == {"asked": 16, "used": 6, "reason": m["selection"]["batch_size"]["reason"]}
    assert m["efficiency"]["optimizer_steps"] == 12  # 4 per epoch, not 2
    assert "the last epoch is kept" in printed and "batch size 16 -> 6" in printed


def test_a_tiny_given_validation_is_warned_about(tmp_path, capsys, tiny_model_dir, topic_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text((topic_data_dir / f"{split}.jsonl").read_text())
    write_rows(data, "validation", make_rows(6, seed=9))
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
def tiny_st_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a sentence-transformers checkpoint: mean pooling, then unit length."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return path


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
