"""The Python API beyond docs/python.md's own snippets (tests/test_docs.py runs those and checks what they
return: the typed record, history, predictions, load_run, sweep and report), and the example notebook
executed headless."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftlab
from conftest import REPO


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
