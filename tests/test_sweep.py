"""peftlab sweep: grid expansion and names, seeds -> mean ± std, resume after SIGKILL, two workers on
one study, sampled search, and the report over a sweep directory. Real runs of the tiny model."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.sweeps.expand import expand_grid

CLI = [sys.executable, "-c", "import sys; from peftlab.cli import main; sys.exit(main())"]


def write_config(path: Path, tiny_overrides: list[str], sweep: dict, **sections) -> Path:
    """A YAML config: the tiny model/data overrides as a tree, plus the given sweep block and sections."""
    tree: dict = {}
    for text in tiny_overrides:
        key, value = text.split("=", 1)
        section, field = key.split(".")
        tree.setdefault(section, {})[field] = yaml.safe_load(value)
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    tree["sweep"] = sweep
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def sweep_json(d: Path) -> dict:
    return json.loads((d / "sweep.json").read_text())


def claims(d: Path) -> list[tuple]:
    with sqlite3.connect(d / "study.db") as c:
        return c.execute("select unit, attempt, owner, state from peftlab_claims order by unit, attempt").fetchall()


def optuna_trials(d: Path) -> list:
    import optuna

    study = optuna.load_study(study_name=d.name, storage=f"sqlite:///{d / 'study.db'}")
    return study.get_trials(deepcopy=False)


# --- expansion (no training) ---------------------------------------------------------------------

def test_grid_expansion_order_and_names():
    cfg = load_config(None, ["method.name=lora", "sweep.grid={method.r: [8, 16], method.alpha: [16, 32.5]}",
                             "sweep.seeds=[1, 2]"])
    units = expand_grid(cfg)
    names = [u.key for u in units]
    assert names == ["lora-r8-a16-seed1", "lora-r8-a16-seed2", "lora-r8-a32.5-seed1", "lora-r8-a32.5-seed2",
                     "lora-r16-a16-seed1", "lora-r16-a16-seed2", "lora-r16-a32.5-seed1", "lora-r16-a32.5-seed2"]
    first = units[0].runs[0].tree
    assert (first["method"]["r"], first["method"]["alpha"], first["train"]["seed"]) == (8, 16, 1)
    assert units[-1].group == "lora-r16-a32.5" and units[-1].runs[0].tree["train"]["seed"] == 2
    assert all(u.runs[0].tree["sweep"]["grid"] == {} for u in units)  # a run's config is not a sweep

    cfg = load_config(None, ["sweep.grid={method.name: [full, lora, ia3], method.layers: [[0, 1, 5], null], "
                             "method.target_modules: [[query, key, attention.output.dense]]}"])
    names = [u.key for u in expand_grid(cfg)]
    assert names[0] == "full-L0_1_5-tquery+key+attention.output.dense"
    assert names[1] == "full-Lnone-tquery+key+attention.output.dense"
    assert len(names) == len(set(names)) == 6

    # a whole section as one grid value; duplicate names get a suffix
    cfg = load_config(None, ["sweep.grid={method: [{name: lora, r: 4}, {name: ia3}, {name: ia3}]}"])
    units = expand_grid(cfg)
    assert [u.key for u in units] == ["lora-r4", "ia3", "ia3-2"]
    assert units[0].runs[0].tree["method"]["r"] == 4 and units[1].runs[0].tree["method"]["name"] == "ia3"


def test_grid_errors():
    with pytest.raises(UserError, match="non-empty list"):
        expand_grid(load_config(None, ["sweep.grid={method.r: []}"]))
    with pytest.raises(UserError, match="cannot be swept"):
        expand_grid(load_config(None, ["sweep.grid={sweep.seeds: [[1]]}"]))
    with pytest.raises(UserError, match="unknown key"):
        expand_grid(load_config(None, ["sweep.grid={methd.r: [1]}"]))
    with pytest.raises(UserError, match="method.r"):  # validated like any config value
        expand_grid(load_config(None, ["sweep.grid={method.r: [0]}"]))
    with pytest.raises(UserError, match="not both"):
        load_config(None, ["sweep.grid={method.r: [1]}", "sweep.space={method.r: {type: int, low: 1, high: 4}}",
                           "sweep.n_trials=2"])
    with pytest.raises(UserError, match="n_trials"):
        load_config(None, ["sweep.space={method.r: {type: int, low: 1, high: 4}}"])


def test_sweep_cli_user_errors(tmp_path, tiny_overrides, capsys):
    plain = write_config(tmp_path / "plain.yaml", tiny_overrides, {})
    assert main(["sweep", str(plain), "--output-dir", str(tmp_path / "x")]) == 2
    assert "no sweep block" in capsys.readouterr().err
    assert main(["sweep"]) == 2
    assert main(["sweep", str(plain), "--set", "sweep.seeds=[1]", "--n-trials", "0"]) == 2
    assert main(["sweep", str(plain), "--set", "sweep.seeds=[1]", "--storage", "nosuchdb://x",
                 "--output-dir", str(tmp_path / "y")]) == 2
    assert "not a database URL" in capsys.readouterr().err


# --- in-process sweeps ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds_sweep(tmp_path_factory, tiny_model_dir, topic_data_dir):
    """A 2 x 2 sweep (r x seeds) of full-ish real runs, shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("seeds")
    overrides = [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                 "train.epochs=2", "train.batch_size=16", "train.learning_rate=0.005", "output.plots=false",
                 f"data.cache_dir={tmp / 'cache'}"]
    config = write_config(tmp / "study.yaml", overrides, {"grid": {"method.r": [2, 8]}, "seeds": [1, 2]},
                          method={"target_modules": ["query", "key", "value", "attention.output.dense"]})
    out = tmp / "sweep"
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    return config, out


def test_seeds_give_mean_and_std_from_metrics(seeds_sweep, capsys):
    config, out = seeds_sweep
    s = sweep_json(out)
    assert s["complete"] and s["counts"] == {"completed": 4}
    assert [c["name"] for c in s["configurations"]] == ["lora-r2", "lora-r8"]
    for c in s["configurations"]:
        runs = [json.loads((out / "trials" / n / "metrics.json").read_text()) for n in c["runs"]]
        assert [r["config"]["train"]["seed"] for r in runs] == [1, 2]
        for split in ("validation", "test"):
            for k in ("accuracy", "macro_f1"):
                values = [r[split][k] for r in runs]
                assert c[split][k]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
                assert c[split][k]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
                assert c[split][k]["n"] == 2
        assert c["trainable_params"] == runs[0]["params"]["trainable"]
    # the best is chosen by validation, never by test
    best = max(s["configurations"], key=lambda c: (c["validation"]["macro_f1"]["mean"], -c["trainable_params"]))
    assert s["best"]["name"] == best["name"]
    # every run is an ordinary run directory, named after its configuration and seed
    for r in s["runs"]:
        assert (out / r["run_dir"] / "config.yaml").exists() and r["attempts"] == 1
        assert r["run_dir"] == f"trials/{r['name']}"
    # started again: nothing is missing, so nothing runs
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")}
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    assert "training" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")} == before
    assert [a for _, a, _, _ in claims(out)] == [0, 0, 0, 0]
    # a changed sweep may not reuse the study
    with pytest.raises(UserError, match="different sweep"):
        main(["--debug", "sweep", str(config), "--output-dir", str(out), "--set", "sweep.seeds=[1,2,3]"])


def test_report_cli_over_sweep_dir(seeds_sweep, tmp_path, capsys):
    _, out = seeds_sweep
    html = tmp_path / "r" / "report.html"
    assert main(["report", str(out), "--output", str(html)]) == 0
    printed = capsys.readouterr().out
    assert str(html) in printed and str(html.with_suffix(".md")) in printed
    md = html.with_suffix(".md").read_text()
    s = sweep_json(out)
    for c in s["configurations"]:
        assert f"{c['test']['accuracy']['mean']:.4f} ± {c['test']['accuracy']['std']:.4f}" in md
    assert "<img" in html.read_text() or "data:image" in html.read_text()
    # default output: DIR/report.html
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists() and (out / "report.md").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_sampled_search(tmp_path, tiny_overrides, capsys):
    config = write_config(tmp_path / "search.yaml", tiny_overrides, {
        "space": {"method.r": {"type": "categorical", "choices": [2, 4, 8]},
                  "train.learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
        "n_trials": 3, "sampler_seed": 7})
    out = tmp_path / "search"
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    s = sweep_json(out)
    assert s["mode"] == "search" and s["counts"] == {"completed": 3}
    names = [c["name"] for c in s["configurations"]]
    assert [n[:9] for n in names] == ["trial000-", "trial001-", "trial002-"]
    trials = [t for t in optuna_trials(out) if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    for t in trials:
        run = json.loads((out / "trials" / t.user_attrs["configuration"] / "metrics.json").read_text())
        assert run["config"]["method"]["r"] == t.params["method.r"]
        assert run["config"]["train"]["learning_rate"] == pytest.approx(t.params["train.learning_rate"])
        assert t.value == pytest.approx(run["validation"]["macro_f1"])  # the objective is validation, not test
    # --n-trials limits this process; starting again runs nothing new
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress", "--n-trials", "1"]) == 0
    assert len([t for t in optuna_trials(out) if t.state.name == "COMPLETE"]) == 3


def test_pruning_stops_bad_runs(tmp_path, tiny_overrides):
    # learning rates from useless to good: with pruning, runs far behind at an epoch stop there
    config = write_config(tmp_path / "prune.yaml", tiny_overrides + ["method.name=full", "train.epochs=3"],
                          {"grid": {"train.learning_rate": [0.003, 0.002, 0.001, 1e-7, 1e-8]}, "pruning": True})
    out = tmp_path / "prune"
    assert main(["sweep", str(config), "--output-dir", str(out), "--no-progress"]) == 0
    s = sweep_json(out)
    pruned = [r for r in s["runs"] if r["status"] == "pruned"]
    assert pruned, s["runs"]
    for r in pruned:
        m = json.loads((out / r["run_dir"] / "metrics.json").read_text())
        assert m["status"] == "pruned" and not (out / r["run_dir"] / "checkpoints").exists()
    assert s["best"]["name"] not in {r["configuration"] for r in pruned}
    states = sorted(t.state.name for t in optuna_trials(out))
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == 5 - len(pruned)


# --- processes: SIGKILL and two workers ------------------------------------------------------------

def _slow_config(tmp_path: Path, tiny_overrides: list[str], grid: dict, epochs: int) -> Path:
    return write_config(tmp_path / "slow.yaml", tiny_overrides + [f"train.epochs={epochs}", "train.log_every=1",
                                                                   f"data.cache_dir={tmp_path / 'cache'}"],
                        {"grid": grid})


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_mid_trial_then_restart_runs_each_configuration_once(tmp_path, tiny_overrides):
    config = _slow_config(tmp_path, tiny_overrides, {"method.r": [2, 4, 8]}, epochs=8)
    out = tmp_path / "killed"
    cmd = CLI + ["sweep", str(config), "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim, done_before = None, {}
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            trials = sorted((out / "trials").glob("*")) if (out / "trials").exists() else []
            finished = [t for t in trials if (t / "metrics.json").exists()]
            running = [t for t in trials if (t / "history.jsonl").exists() and not (t / "metrics.json").exists()]
            if finished and running:  # one trial done, the next one mid-training: kill
                os.kill(proc.pid, signal.SIGKILL)
                victim = running[0].name
                done_before = {t.name: (t / "metrics.json").stat().st_mtime_ns for t in finished}
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and victim is None:
            proc.kill()
        proc.wait()
    assert victim is not None, "the sweep finished before it could be killed mid-trial"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "trials" / victim / "metrics.json").exists()

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is gone; running it again" in again.stdout

    s = sweep_json(out)
    assert s["complete"] and s["counts"] == {"completed": 3}
    attempts = {r["name"]: r["attempts"] for r in s["runs"]}
    assert attempts == {n: (2 if n == victim else 1) for n in ("lora-r2", "lora-r4", "lora-r8")}
    # finished trials were not run again
    for name, mtime in done_before.items():
        assert (out / "trials" / name / "metrics.json").stat().st_mtime_ns == mtime
    # each configuration: exactly one completed run and one COMPLETE trial; the killed attempt is FAIL
    for name in attempts:
        m = json.loads((out / "trials" / name / "metrics.json").read_text())
        assert m["status"] == "completed"
        epochs = [r for r in map(json.loads, (out / "trials" / name / "history.jsonl").read_text().splitlines())
                  if r["kind"] == "epoch"]
        assert [r["epoch"] for r in epochs] == list(range(1, 9))  # resumed or restarted: one clean history
    trials = optuna_trials(out)
    complete = sorted(t.user_attrs["configuration"] for t in trials if t.state.name == "COMPLETE")
    assert complete == ["lora-r2", "lora-r4", "lora-r8"]
    assert [t.user_attrs["configuration"] for t in trials if t.state.name == "FAIL"] == [victim]
    assert not [t for t in trials if t.state.name == "RUNNING"]
    states = {(u, a): st for u, a, _, st in claims(out)}
    assert states[(victim, 0)] == "stale" and states[(victim, 1)] == "done"


def test_two_workers_split_a_study_without_running_anything_twice(tmp_path, tiny_overrides):
    config = _slow_config(tmp_path, tiny_overrides, {"method.r": [2, 8], "method.alpha": [8, 16]}, epochs=2)
    out = tmp_path / "shared"
    cmd = CLI + ["sweep", str(config), "--output-dir", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    names = [f"lora-r{r}-a{a}" for r in (2, 8) for a in (8, 16)]
    trained = [line.split(":")[0].split()[-1] for o in outputs for line in o.splitlines() if line.endswith(": training")]
    assert sorted(trained) == sorted(names)  # every configuration trained once, by one of the two
    rows = claims(out)
    assert sorted(u for u, _, _, _ in rows) == sorted(names) and {st for *_, st in rows} == {"done"}
    trials = optuna_trials(out)
    assert sorted(t.user_attrs["configuration"] for t in trials) == sorted(names)
    assert {t.state.name for t in trials} == {"COMPLETE"}
    for n in names:
        history = (out / "trials" / n / "history.jsonl").read_text().splitlines()
        assert sum(json.loads(r)["kind"] == "epoch" for r in history) == 2
    # both summaries are complete (each worker waited for the other's last trial)
    assert sweep_json(out)["complete"] and sweep_json(out)["counts"] == {"completed": 4}


# --- the claim primitive under contention ------------------------------------------------------------

def _claim_all(url: str, units: list[str], queue) -> None:
    from peftlab.sweeps.claims import Claims

    c = Claims(url, "race", heartbeat_every=3600)
    won = [u for u in units if c.try_claim(u, 0)]
    c.close()
    queue.put(won)


def test_claims_are_exclusive_under_contention(tmp_path):
    import multiprocessing as mp

    url = f"sqlite:///{tmp_path / 'race.db'}"
    units = [f"u{i}" for i in range(150)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, units, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    won = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = [u for w in won for u in w]
    assert sorted(claimed) == sorted(units)  # every unit claimed, none twice


def test_stale_claims_are_taken_over_once(tmp_path):
    from peftlab.sweeps import claims as C

    url = f"sqlite:///{tmp_path / 'stale.db'}"
    a = C.Claims(url, "s", stale_after=0.2, heartbeat_every=3600)
    b = C.Claims(url, "s", stale_after=0.2, heartbeat_every=3600)
    assert a.try_claim("x", 0) and not b.try_claim("x", 0)
    b.owner = a.owner.replace(a.owner.split("/")[0], "another-host", 1)  # b plays a worker elsewhere
    claim = b.latest()["x"]
    assert not b.is_stale(claim)  # fresh heartbeat, owner on another host: alive
    time.sleep(0.4)
    claim = b.latest()["x"]
    assert b.is_stale(claim)
    assert b.mark_stale(claim) and not b.mark_stale(claim)  # exactly one process marks it
    assert b.try_claim("x", 1) and not a.try_claim("x", 1)
    # a dead process on this host is stale at once, whatever its heartbeat
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = a.owner.split("/")[0]
    assert C.owner_is_dead(f"{host}/{dead.stdout.strip()}/1.00")
    assert not C.owner_is_dead(a.owner) and not C.owner_is_dead(f"elsewhere/{os.getpid()}/1.00")
    a.close()
    b.close()
