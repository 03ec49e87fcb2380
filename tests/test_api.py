"""The Python API as documented (docs/python.md), and the example notebook executed headless."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import peftlab
from tests.conftest import REPO


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, tiny_model_dir, topic_data_dir) -> peftlab.Run:
    cfg = peftlab.load_config(None, overrides=[f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}",
                                               "data.max_length=48", "train.batch_size=16", "output.plots=false"])
    return peftlab.train(cfg, output_dir=tmp_path_factory.mktemp("api") / "x", progress=False,
                         overrides=["method.r=8", "train.epochs=2", "train.learning_rate=0.05"])


def test_train_returns_a_run_with_the_typed_record(api_run):
    m = api_run.metrics
    assert isinstance(m, peftlab.RunRecord) and m.status == "completed"
    assert m.config["method"]["r"] == 8 and m.config["train"]["epochs"] == 2  # overrides applied
    on_disk = json.loads((api_run.path / "metrics.json").read_text())
    assert m.test.macro_f1 == on_disk["test"]["macro_f1"] and m.params.trainable == on_disk["params"]["trainable"]
    assert m.validation.accuracy > 0.5  # three topics: it learned


def test_history_is_a_dataframe_of_history_jsonl(api_run):
    h = api_run.history()
    assert isinstance(h, pd.DataFrame)
    epochs = h[h["kind"] == "epoch"]
    assert list(epochs["epoch"]) == [1, 2] and "validation_macro_f1" in h.columns
    assert h[h["kind"] == "step"]["loss"].notna().all()


def test_predict_matches_predictions_csv(api_run):
    frame = pd.read_csv(api_run.path / "predictions.csv")
    rows = api_run.predict(frame["text"].tolist())
    assert [r["label"] for r in rows] == frame["predicted"].tolist()
    assert [r["confidence"] for r in rows] == pytest.approx(frame["confidence"].tolist(), abs=1e-4)
    one = api_run.predict("team goal match")  # a single string is one text
    assert len(one) == 1 and set(one[0]["probabilities"]) == set(api_run.metrics.label_names)


def test_load_run_is_the_same_run(api_run):
    again = peftlab.load_run(api_run.path)
    assert again.metrics == api_run.metrics
    assert again.predict(["coach league"]) == api_run.predict(["coach league"])


def test_train_accepts_a_dict_and_a_path(tmp_path, tiny_model_dir, topic_data_dir):
    tree = {"model": {"name": str(tiny_model_dir)}, "data": {"path": str(topic_data_dir), "max_length": 32},
            "train": {"max_steps": 2, "batch_size": 16}, "eval": {"baseline": False}, "output": {"plots": False}}
    run = peftlab.train(tree, output_dir=tmp_path / "d", progress=False)
    assert run.metrics.efficiency.optimizer_steps == 2
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    run = peftlab.train(tmp_path / "c.yaml", output_dir=tmp_path / "p", progress=False, overrides=["method.name=ia3"])
    assert run.metrics.method == "ia3"


def test_errors_raise_user_error(tmp_path):
    with pytest.raises(peftlab.UserError, match="method.r"):
        peftlab.load_config(None, overrides=["method.r=0"])
    with pytest.raises(peftlab.UserError, match="not a peftlab run directory"):
        peftlab.load_run(tmp_path)
    with pytest.raises(peftlab.UserError, match="no completed runs"):
        peftlab.report([tmp_path], output=tmp_path / "r.html")


def test_sweep_and_report(tmp_path, tiny_model_dir, topic_data_dir):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_model_dir}}}
data: {{path: {topic_data_dir}, max_length: 32}}
train: {{max_steps: 3, batch_size: 16}}
eval: {{baseline: false}}
output: {{plots: false}}
sweep: {{grid: {{method.name: [lora, ia3]}}}}
""")
    summary = peftlab.sweep(cfg, output_dir=tmp_path / "m", progress=False)
    assert summary["counts"] == {"completed": 2}
    html = peftlab.report([tmp_path / "m"], output=tmp_path / "report.html")
    assert html.exists() and html.with_suffix(".md").exists()


def test_quickstart_notebook_runs_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = REPO / "examples" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook stripped"
    monkeypatch.setenv("PEFTLAB_QUICKSTART_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PEFTLAB_DEMO_CONFIG", str(REPO / "configs" / "demo.yaml"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = json.dumps([o for outs in outputs.values() for o in outs])
    assert "test accuracy" in text and "image/png" in text and "True" in text  # metrics, plots, reload
    assert not any(o.get("output_type") == "error" for outs in outputs.values() for o in outs)
    record = peftlab.load_run(Path(tmp_path / "runs" / "lora-r8")).metrics
    assert record.params.trainable == 6 * 2 * 2 * 384 * 8 + 384 * 5 + 5  # LoRA r=8 on query+value + head


def test_api_names_survive_importing_the_packages():
    import peftlab.reports.collect  # noqa: F401 - importing a subpackage sets an attribute on peftlab
    import peftlab.sweeps.runner  # noqa: F401

    assert peftlab.sweep is peftlab.api.sweep and peftlab.report is peftlab.api.report
