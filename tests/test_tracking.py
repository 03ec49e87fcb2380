"""Experiment tracking (config `tracking`): one real run of the tiny model logged to TensorBoard, MLflow
and W&B (offline), every value read back with the library's own reader and compared to metrics.json and
history.jsonl; a two-trial sweep as one MLflow parent with two nested runs; a backend that is not installed;
a backend that breaks mid-run."""
from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.training.tracking import TrackingWarning, config_params, record_figures
from peftlab.runs.record import RunRecord
from tests.test_sweep import write_config
from tests.test_train import train_cli

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def experiment_runs(uri: str, project: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(project).experiment_id])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir, topic_data_dir, mlflow_uri):
    """One run logged to all three backends, with plots (artifacts)."""
    tmp = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # MLflow puts artifacts in ./mlruns; W&B reads its mode from the environment
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    overrides = [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                 "train.epochs=2", "train.batch_size=16", "train.learning_rate=0.005", "train.log_every=5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # no backend may have given up
        out = train_cli(tmp, overrides + ["tracking.backends=[tensorboard, mlflow, wandb]",
                                          f"tracking.mlflow_uri={mlflow_uri}", "tracking.project=all-three"])
    mp.undo()
    return out


def figures(out: Path) -> tuple[RunRecord, dict, list[dict], list[dict]]:
    record = RunRecord.read(out / "metrics.json")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return record, record_figures(record)[0], [r for r in rows if r["kind"] == "step"], \
        [r for r in rows if r["kind"] == "epoch"]


def test_mlflow_holds_config_curves_final_figures_and_artifacts(tracked, mlflow_uri):
    record, numbers, steps, epochs = figures(tracked)
    client, [run] = experiment_runs(mlflow_uri, "all-three")
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    cfg = load_config(tracked / "config.yaml")
    assert run.data.params["method.r"] == "16" and run.data.params["data.path"] == cfg.data.path
    assert set(run.data.params) == set(config_params(cfg))
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    lr = client.get_metric_history(run.info.run_id, "train/lr")
    assert [m.value for m in lr] == pytest.approx([r["lr"] for r in steps])
    for k in ("accuracy", "macro_f1", "loss"):
        val = client.get_metric_history(run.info.run_id, f"val/{k}")
        assert [(m.step, m.value) for m in val] == [(e["step"], pytest.approx(e["validation"][k])) for e in epochs]
    for k in ("test.accuracy", "test.macro_f1", "validation.macro_f1", "params.trainable", "params.total",
              "efficiency.train_seconds", "efficiency.train_tokens_per_second", "best_epoch"):
        assert run.data.metrics[k] == pytest.approx(numbers[k]), k
    assert run.data.tags["efficiency.device"] == record.efficiency.device and run.data.tags["status"] == "completed"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"metrics.json", "plots"}
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {p.name for p in (tracked / "plots").glob("*.png")} and plots
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tracked.parent))
    assert json.loads(Path(local).read_text()) == json.loads((tracked / "metrics.json").read_text())


def test_tensorboard_holds_curves_final_figures_and_hparams(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    record, numbers, steps, epochs = figures(tracked)
    ea = EventAccumulator(str(tracked / "tensorboard"))
    ea.Reload()
    assert [(s.step, s.value) for s in ea.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [s.value for s in ea.Scalars("val/macro_f1")] == \
        pytest.approx([e["validation"]["macro_f1"] for e in epochs], rel=1e-6)
    for k in ("test.accuracy", "test.macro_f1", "params.trainable", "efficiency.train_seconds"):
        assert ea.Scalars(k)[-1].value == pytest.approx(numbers[k], rel=1e-6), k
    assert {"config", "record"} <= {t.removesuffix("/text_summary") for t in ea.Tags()["tensors"]}
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["method.name"].string_value == "lora" and hp["method.r"].number_value == 16


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's own protobuf messages in LevelDB's log framing (32 KiB
    blocks, a 7-byte header per chunk; W&B's reader for it lives in its Go core since 0.19)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little room left for a header: the block is padded
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            out.append(pb.Record.FromString(chunk))
            chunk = b""
    return out


def test_wandb_offline_run_holds_config_history_summary_and_files(tracked):
    record, numbers, steps, epochs = figures(tracked)
    [run_dir] = (tracked / "wandb").glob("offline-run-*")
    records = wandb_records(next(run_dir.glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "run" and run.project == "all-three"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["method.r"] == 16 and config["data.max_length"] == 48
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    loss = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    val = [h["val/accuracy"] for h in history if "val/accuracy" in h]
    assert val == pytest.approx([e["validation"]["accuracy"] for e in epochs])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    for k in ("test.accuracy", "test.macro_f1", "validation.accuracy", "params.trainable", "efficiency.train_seconds"):
        assert summary[k] == pytest.approx(numbers[k]), k
    assert summary["status"] == "completed"
    files = run_dir / "files"
    assert not (files / "metrics.json").is_symlink()  # copies: the offline run can move to another machine
    assert json.loads((files / "metrics.json").read_text()) == json.loads((tracked / "metrics.json").read_text())
    assert {p.name for p in (files / "plots").iterdir()} == {p.name for p in (tracked / "plots").iterdir()}
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"metrics.json", "plots/loss.png"} <= saved, saved
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_sweep_is_one_mlflow_parent_with_nested_trials_and_seed_aggregates(tmp_path, tiny_overrides, monkeypatch,
                                                                          mlflow_uri):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "sweep.yaml", tiny_overrides + ["train.epochs=1"], {"seeds": [1, 2]},
                       tracking={"backends": ["mlflow"], "mlflow_uri": mlflow_uri, "project": "sweeps"})
    out = tmp_path / "sw"
    assert main(["sweep", str(cfg), "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    client, runs = experiment_runs(mlflow_uri, "sweeps")
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(r.info.run_name for r in children) == ["lora-seed1", "lora-seed2"]
    assert parent.info.run_name == "sw" and parent.info.status == "FINISHED"
    [conf] = summary["configurations"]
    for part in ("validation", "test"):
        for k in ("accuracy", "macro_f1"):
            for stat in ("mean", "std"):
                assert parent.data.metrics[f"lora/{part}.{k}.{stat}"] == pytest.approx(conf[part][k][stat])
    for child in children:
        m = json.loads((out / "trials" / child.info.run_name / "metrics.json").read_text())
        assert child.data.metrics["test.accuracy"] == pytest.approx(m["test"]["accuracy"])
        assert child.data.params["train.seed"] == str(m["config"]["train"]["seed"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.json"}
    # run again (as after an interruption, or by a second worker): the same parent, no new runs
    assert main(["sweep", str(cfg), "--output-dir", str(out), "--no-progress"]) == 0
    assert len(experiment_runs(mlflow_uri, "sweeps")[1]) == 3


@pytest.mark.parametrize("backend, module", [("mlflow", "mlflow"), ("wandb", "wandb"),
                                             ("tensorboard", "torch.utils.tensorboard")])
def test_a_backend_that_is_not_installed_is_one_line_before_training(tmp_path, tiny_overrides, monkeypatch,
                                                                     capsys, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    args = ["train", "--no-progress", "--output-dir", str(tmp_path / "run"), "--set", f"tracking.backends={backend}"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'peftlab[{backend}]'" in err, err
    assert not (tmp_path / "run" / "history.jsonl").exists()  # nothing trained


def test_bad_tracking_config_names_the_key():
    with pytest.raises(UserError, match="tracking.backends"):
        load_config(None, ["tracking.backends=[comet]"])
    assert load_config(None, ["tracking.backends=mlflow,wandb"]).tracking.backends == ["mlflow", "wandb"]


def test_a_backend_that_breaks_mid_run_warns_once_and_the_run_completes(tmp_path, tiny_overrides, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def broken(self, tag, value, step=None, *a, **k):
        calls.append(tag)
        raise OSError("disk full")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    with pytest.warns(TrackingWarning) as caught:
        out = train_cli(tmp_path, tiny_overrides + ["train.epochs=1", "tracking.backends=tensorboard"])
    assert [str(w.message) for w in caught] == [
        "tracking: tensorboard stopped logging run 'run' (OSError: disk full); the run goes on"]
    assert len(calls) == 1  # dropped after the first failure
    assert RunRecord.read(out / "metrics.json").status == "completed"


def test_on_finish_comes_last_also_for_a_pruned_run_which_is_tracked_as_such(tmp_path, tiny_overrides, mlflow_uri,
                                                                             monkeypatch):
    import peftlab

    monkeypatch.chdir(tmp_path)
    seen = []

    class Prune:
        def on_epoch_end(self, trainer, epoch, scores):
            return "enough"

    class Seen:
        def on_finish(self, trainer, record):
            seen.append((record.status, RunRecord.read(trainer.run.metrics_file).status))

    tracking = ["tracking.backends=[mlflow]", f"tracking.mlflow_uri={mlflow_uri}", "tracking.project=pruned"]
    peftlab.train(None, tmp_path / "p", tiny_overrides + tracking, progress=False, callbacks=[Prune(), Seen()])
    assert seen == [("pruned", "pruned")]  # called once, after metrics.json was written
    _, [run] = experiment_runs(mlflow_uri, "pruned")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "pruned" and run.data.tags["reason"] == "enough"


def test_a_failed_run_is_marked_failed_with_its_error_at_exit(tmp_path, tiny_overrides, mlflow_uri, monkeypatch):
    import types

    import peftlab
    from peftlab.training import tracking

    exits = []  # what tracking hands to atexit, run here rather than when pytest exits
    monkeypatch.setattr(tracking, "atexit", types.SimpleNamespace(register=exits.append, unregister=exits.remove))
    monkeypatch.chdir(tmp_path)
    overrides = tiny_overrides + [f"data.path={tmp_path / 'missing'}", "tracking.backends=[mlflow]",
                                  f"tracking.mlflow_uri={mlflow_uri}", "tracking.project=failed"]
    with pytest.raises(UserError, match="data.path"):
        peftlab.train(None, tmp_path / "f", overrides, progress=False)
    _, [run] = experiment_runs(mlflow_uri, "failed")
    assert run.info.status == "RUNNING" and len(exits) == 1
    exits.pop()()
    _, [run] = experiment_runs(mlflow_uri, "failed")
    assert run.info.status == "FAILED" and "data.path" in run.data.tags["error"]
