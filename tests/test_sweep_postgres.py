"""peftlab sweep on a real PostgreSQL server (started here on 127.0.0.1): three worker processes share
one study, one is SIGKILLed mid-trial and started again; and stale-claim detection follows the
database's clock, not the workers'. Skipped when the PostgreSQL binaries or the driver are missing."""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.sweeps import claims as C
from test_report import _md_table
from test_sweep import CLI, _env, _slow_config


def _pg_bindir() -> Path | None:
    """initdb and pg_ctl: on PATH, else Debian's versioned directory (the postgresql package keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return next((d for d in reversed(dirs) if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def _as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the postgres user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as (apt-get install postgresql)")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    pytest.skip("running as root and no runuser to start the server as the postgres user")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install -e '.[postgres]'")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql (make test does, as root)")
    as_user = _as_server_user()
    # not pytest's tmp_path: its parents are private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="peftlab-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = lambda *args: subprocess.run(as_user + [str(a) for a in args], capture_output=True, text=True, timeout=60)  # noqa: E731
    r = run(bindir / "initdb", "-D", data, "-U", "peftlab", "--auth=trust", "-E", "UTF8", "--no-sync")
    assert r.returncode == 0, r.stdout + r.stderr
    # TCP on 127.0.0.1 only, no Unix socket (its default directory may not exist), no fsync (a test database)
    r = run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {port} -k '' -c fsync=off -c max_connections=60", "start")
    assert r.returncode == 0, r.stdout + r.stderr + (root / "server.log").read_text()
    try:
        yield f"postgresql://peftlab@127.0.0.1:{port}/postgres"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def claims_url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'claims.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


# --- the database's clock ---------------------------------------------------------------------------

def test_stale_detection_uses_the_database_clock(claims_url, tmp_path, monkeypatch):
    real = time.time
    skew = lambda seconds: monkeypatch.setattr(time, "time", lambda: real() + seconds)  # noqa: E731
    study = tmp_path.name
    a = C.Claims(claims_url, study, stale_after=30, heartbeat_every=3600)
    b = C.Claims(claims_url, study, stale_after=30, heartbeat_every=3600)
    b.owner = "another-host/1/1.00"  # b plays a worker on another machine
    try:
        skew(-3600)  # a's clock is an hour slow when it claims and beats
        assert a.try_claim("fresh", 0)
        a.beat()
        skew(+3600)  # b's clock is an hour fast when it looks
        claim = b.latest()["fresh"]
        assert abs(claim.age_ms) < 10_000 and abs(b.now_ms() - real() * 1000) < 10_000
        assert not b.is_stale(claim) and not b.mark_stale(claim)  # fresh by the database's clock
        assert b.latest()["fresh"].state == C.RUNNING

        # a claim really left without a heartbeat is stale, however slow the looking worker's clock
        quick = C.Claims(claims_url, study, stale_after=0.2, heartbeat_every=3600)
        quick.owner = b.owner
        skew(0)
        assert a.try_claim("left", 0)
        time.sleep(0.5)
        skew(-3600)
        claim = quick.latest()["left"]
        assert quick.is_stale(claim) and quick.mark_stale(claim) and not quick.mark_stale(claim)
        assert quick.try_claim("left", 1)
        quick.close()
    finally:
        a.close()
        b.close()


# --- three workers, one SIGKILLed ---------------------------------------------------------------------

def test_three_workers_on_postgres_survive_a_sigkill(postgres_url, tmp_path, tiny_overrides):
    names = ["lora-r2", "lora-r4", "lora-r8", "lora-r16"]
    epochs = 8  # a second or more between the first checkpoint and the end: room to kill mid-trial
    config = _slow_config(tmp_path, tiny_overrides, {"method.r": [2, 4, 8, 16]}, epochs=epochs)
    out, study = tmp_path / "sweep", f"pg-{tmp_path.name}"
    cmd = CLI + ["sweep", str(config), "--output-dir", str(out), "--storage", postgres_url, "--study-name", study,
                 "--no-progress"]
    logs: list[Path] = []

    def start() -> subprocess.Popen:
        logs.append(tmp_path / f"worker{len(logs)}.log")
        with open(logs[-1], "w") as f:
            return subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)

    workers = [start() for _ in range(3)]
    watch = C.Claims(postgres_url, study, heartbeat_every=3600)  # reads only
    victim = killed = kept = None
    try:
        deadline = time.time() + 150
        while victim is None and time.time() < deadline and any(p.poll() is None for p in workers):
            # a worker mid-trial with an epoch checkpoint behind it: kill it there
            for c in watch.all():
                run = out / "trials" / c.unit
                owner = next((p for p in workers if c.owner.split("/")[1] == str(p.pid)), None)
                if (c.state == C.RUNNING and owner is not None and (run / "checkpoints" / "last.pt").exists()
                        and not (run / "metrics.json").exists()):
                    os.kill(owner.pid, signal.SIGKILL)
                    owner.wait()
                    victim, killed, kept = c.unit, owner, (run / "history.jsonl").read_text().splitlines()
                    break
            time.sleep(0.05)
        assert victim is not None, "the sweep finished before a worker could be killed mid-trial"
        assert not (out / "trials" / victim / "metrics.json").exists()
        workers.append(start())  # the killed worker, started again
        for p in workers:
            p.wait(timeout=max(1, deadline + 60 - time.time()))
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
    output = [log.read_text() for log in logs]
    assert killed.returncode == -signal.SIGKILL
    assert [p.returncode for p in workers if p is not killed] == [0, 0, 0], output
    text = "\n".join(output)

    # every configuration trained by one worker, the victim's again once (one takeover), split between workers
    trained = [line.split(":")[0].split()[-1] for line in text.splitlines() if ": training" in line]
    assert sorted(trained) == sorted(names + [victim]), text
    assert text.count("is gone; running it again") == 1 and f"{victim}: training (attempt 2)" in text
    assert sum(any(": training" in line for line in o.splitlines()) for o in output) >= 2  # the work was shared
    # ... from its epoch checkpoint: resumed, the rows before the checkpoint kept as they were
    resumed = re.search(rf"resuming {re.escape(str(out / 'trials' / victim))} after epoch \d+ \(step (\d+)\)", text)
    assert resumed, text
    before = [line for line in kept if line.endswith("}") and json.loads(line)["step"] <= int(resumed[1])]
    history = (out / "trials" / victim / "history.jsonl").read_text().splitlines()
    assert before and history[:len(before)] == before

    # the claims and the Optuna study: one completed attempt per configuration, the killed one FAIL
    attempts = watch.attempts()
    watch.close()
    assert {u: [(c.attempt, c.state) for c in cs] for u, cs in attempts.items()} == {
        n: ([(0, "stale"), (1, "done")] if n == victim else [(0, "done")]) for n in names}
    import optuna

    trials = optuna.load_study(study_name=study, storage=postgres_url).get_trials(deepcopy=False)
    assert sorted(t.user_attrs["configuration"] for t in trials if t.state.name == "COMPLETE") == sorted(names)
    assert [t.user_attrs["configuration"] for t in trials if t.state.name == "FAIL"] == [victim]
    assert not [t for t in trials if t.state.name == "RUNNING"]

    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and summary["counts"] == {"completed": 4}
    assert {r["name"]: r["attempts"] for r in summary["runs"]} == {n: 1 + (n == victim) for n in names}
    metrics = {n: json.loads((out / "trials" / n / "metrics.json").read_text()) for n in names}
    for n, m in metrics.items():
        assert m["status"] == "completed"
        epochs_done = [json.loads(r)["epoch"] for r in (out / "trials" / n / "history.jsonl").read_text().splitlines()
                       if json.loads(r)["kind"] == "epoch"]
        assert epochs_done == list(range(1, epochs + 1))

    # the report over the sweep shows each run's own figures
    assert main(["report", str(out), "--output", str(tmp_path / "report" / "report.html")]) == 0
    rows = {r["run"]: r for r in _md_table((tmp_path / "report" / "report.md").read_text(), "## Results")}
    assert sorted(rows) == sorted(names)
    for n, m in metrics.items():
        assert rows[n]["val F1"] == f"{m['validation']['macro_f1']:.4f}"
        assert rows[n]["test acc"] == f"{m['test']['accuracy']:.4f}"
        assert rows[n]["test F1"] == f"{m['test']['macro_f1']:.4f}"
        assert rows[n]["trainable params"].replace(",", "") == str(m["params"]["trainable"])
