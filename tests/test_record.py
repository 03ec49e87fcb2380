"""metrics.json typed once: records written by earlier versions load; anything else fails in one line."""
from __future__ import annotations

import json
import sys

import pytest

from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from tests.conftest import REPO

OLD = {  # a metrics.json as peftlab 0.1.0 wrote it before RunRecord existed (status "completed")
    "status": "completed", "method": "lora", "model": "minilm-l6", "dataset": "bbc_news", "run_dir": "runs/x",
    "config": {"method": {"name": "lora"}}, "label_names": ["a", "b"], "split_sizes": {"train": 8, "test": 2},
    "split_sources": {"train": "train.jsonl"},
    "params": {"trainable": 10, "total": 100, "trainable_pct": 10.0, "adapter_bytes": 40}, "best_epoch": 1,
    "validation": {"accuracy": 1.0, "macro_f1": 1.0, "loss": 0.1},
    "test": {"accuracy": 0.5, "macro_f1": 0.33, "per_class": {
        "a": {"precision": 0.5, "recall": 1.0, "f1": 0.67, "support": 1},
        "b": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}},
        "confusion_matrix": [[1, 0], [1, 0]],
        "confidence": {"mean": 0.6, "min": 0.5, "max": 0.7, "share_ge_0_9": 0.0}},
    "baseline": {"test": {"accuracy": 0.5, "macro_f1": 0.33}},
    "efficiency": {"train_seconds": 1.0, "train_samples_per_second": 8.0, "train_tokens_per_second": 80.0,
                   "peak_memory_bytes": 1, "peak_memory_kind": "cpu_peak_rss", "device": "cpu",
                   "precision": "float32", "optimizer_steps": 1, "wall_seconds": 2.0},
    "quantization": {"requested": None, "used": None, "reason": None}, "distill": None,
    "some_future_field": {"ignored": True},
}


def test_an_earlier_versions_record_loads(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(OLD))
    r = RunRecord.read(path)
    assert r.completed and r.test.per_class["a"].recall == 1.0 and r.efficiency.world_size == 1
    assert r.overlap_with_train == {}  # fields added later have defaults


def test_old_failed_and_pruned_records_load(tmp_path):
    for record in ({"status": "failed", "error": "RuntimeError: x", "traceback": "...", "run_dir": "r"},
                   {"status": "pruned", "reason": "bottom quarter", "method": "lora", "run_dir": "r", "config": {}}):
        (tmp_path / "m.json").write_text(json.dumps(record))
        assert RunRecord.read(tmp_path / "m.json").status == record["status"]


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "not a valid peftlab metrics.json"),
    ('{"status": "done"}', "status"),
    ('{"status": "completed", "method": "lora"}', "a completed run needs params"),
    ("", "not a valid peftlab metrics.json"),
])
def test_anything_else_is_one_line(tmp_path, text, needle):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(UserError) as info:
        RunRecord.read(tmp_path / "metrics.json")
    assert needle in str(info.value) and "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_the_report_fixtures_are_real_records(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest_report_helpers import make_run

    run = make_run(tmp_path, "r")
    assert RunRecord.read(run / "metrics.json").completed
