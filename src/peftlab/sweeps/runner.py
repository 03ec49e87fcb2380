"""`peftlab sweep`: run a grid or a sampled search as ordinary run directories, shared through an
Optuna study so that several processes split the work and a killed sweep resumes.

    DIR/study.db          the Optuna study (default storage) and the claims table
    DIR/sweep.yaml        the sweep's resolved config
    DIR/trials/<name>/    one ordinary run directory per run (configuration x seed)
    DIR/sweep.json        the summary: every run's figures, mean ± std over seeds, the best by validation

Work is claimed unit by unit (claims.py): one run of a grid, or one sampled configuration with all its
seeds. Every attempt is also an Optuna trial (params, validation value, per-epoch validation for the
pruner, state), so the study can be inspected with Optuna's own tools.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peftlab.config import Config
from peftlab.config.load import build_config, set_in
from peftlab.errors import UserError
from peftlab.runs.record import RunRecord
from peftlab.files import clean_stale
from peftlab.runs.rundir import RunDir, atomic_write_text
from peftlab.sweeps import claims as C
from peftlab.sweeps.summary import METRICS, summarize, table, write_summary
from peftlab.sweeps.expand import (TEACHER_UNIT, Run, Unit, distributions, encode_choice, expand_grid,
                                  plan_fingerprint, space_unit)

FINGERPRINT_ATTR = "peftlab_plan"


@dataclass
class Options:
    out_dir: Path
    storage: str | None = None
    study_name: str | None = None
    max_trials: int | None = None  # runs this process claims at most (None: until nothing is left)
    progress: bool = True
    retry_failed: bool = False
    stale_after: float = 120.0  # seconds without a heartbeat before another host's claim counts as dead
    heartbeat_every: float = 10.0
    poll: float = 2.0  # seconds between looks at the study while others hold the remaining work
    config_path: Path | None = None
    echo: Callable[[str], None] = field(default=lambda s: print(s, flush=True))


def storage_display(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]


class Sweep:
    tracking = None  # SweepTracking: the tracked parent run of the trials (tracking.backends), set by run()

    def __init__(self, cfg: Config, opts: Options):
        self.cfg = cfg
        self.opts = opts
        self.dir = Path(opts.out_dir)
        self.metric = cfg.eval.metric
        self.space = bool(cfg.sweep.space)
        if not (cfg.sweep.grid or cfg.sweep.space or cfg.sweep.seeds or cfg.sweep.teacher):
            raise UserError("sweep: the config has no sweep block: add sweep.grid (config keys -> lists of values), "
                            "or sweep.space with sweep.n_trials, or sweep.seeds (see docs/sweeps.md)")
        self.started_ms = C.now_ms()
        self.budget = cfg.budget.max_trainable_params
        self.counts: dict[str, int] = {}  # configuration (group) -> exact trainable count
        self.skipped: dict[str, dict] = {}  # unit key -> {name, trainable, budget}
        # static units (grid, seeds, teacher); search slots are made when sampled
        self.units: list[Unit] = expand_grid(cfg) if not self.space else self._teacher_only()
        self.fingerprint = plan_fingerprint(cfg, self.units)
        self.keys = [u.key for u in self.units] + ([f"slot{k}" for k in range(cfg.sweep.n_trials)] if self.space else [])
        self.by_key = {u.key: u for u in self.units}
        for u in self.units:
            self._finish_unit(u)
        if self.budget is not None:
            for u in self.units:
                self._check_budget(u)

    # --- set-up ------------------------------------------------------------------------------
    def _teacher_only(self) -> list[Unit]:
        if self.cfg.sweep.teacher is None:
            return []
        probe = self.cfg.model_copy(deep=True)
        probe.sweep.grid, probe.sweep.seeds = {}, []
        return [u for u in expand_grid(probe) if u.key == TEACHER_UNIT]

    def run_dir(self, run: Run) -> Path:
        return self.dir / "trials" / run.name

    def _resolve_teacher(self, unit: Unit, run: Run) -> None:
        teacher = (run.tree.get("distill") or {}).get("teacher")
        if not teacher:
            return
        names = {r.name: u.key for u in self.units for r in u.runs}
        if teacher in names and names[teacher] != unit.key:
            unit.depends_on = names[teacher]
            path = self.dir / "trials" / teacher
        else:
            base = self.opts.config_path.parent if self.opts.config_path else Path.cwd()
            found = next((p for p in (Path(teacher), base / teacher, self.dir / teacher)
                          if RunDir(p).config_file.exists()), None)
            if found is None:
                raise UserError(f"distill.teacher {teacher!r} (run {run.name}): no run directory there; train the "
                                f"teacher first (peftlab train ... --output-dir DIR) and give DIR, or set sweep.teacher "
                                f"to train one inside this sweep")
            path = found
        set_in(run.tree, ["distill", "teacher"], str(path.resolve()))

    def _finish_unit(self, unit: Unit) -> None:
        for run in unit.runs:
            self._resolve_teacher(unit, run)
            set_in(run.tree, ["output", "dir"], str(self.run_dir(run)))

    def _count(self, unit: Unit) -> int:
        if unit.group not in self.counts:
            from peftlab.models.params import count_config

            cfg = build_config(unit.runs[0].tree, f"sweep configuration {unit.group!r}")
            self.counts[unit.group] = count_config(cfg).trainable
        return self.counts[unit.group]

    def _check_budget(self, unit: Unit) -> bool:
        """False (and the unit listed as skipped) when the configuration has more trainable parameters than allowed."""
        if self.budget is None or unit.budget_exempt:
            return True
        n = self._count(unit)
        if n > self.budget:
            self.skipped[unit.key] = {"name": unit.group, "runs": [r.name for r in unit.runs], "trainable": n,
                                      "budget": self.budget}
            return False
        return True

    def _open(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dir.mkdir(parents=True, exist_ok=True)
        clean_stale(self.dir)  # sweep.yaml / summary temporaries of a killed sweep
        url = self.opts.storage or f"sqlite:///{(self.dir / 'study.db').resolve()}"
        self.url = url
        self.study_name = self.opts.study_name or self.dir.resolve().name
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        sampler = optuna.samplers.TPESampler(seed=self.cfg.sweep.sampler_seed)
        pruner = (optuna.pruners.PercentilePruner(25.0, n_startup_trials=3, n_warmup_steps=0)
                  if self.cfg.sweep.pruning else optuna.pruners.NopPruner())
        from sqlalchemy.exc import ArgumentError

        last = None
        for i in range(6):  # processes starting together race to create the tables: try again
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
                self.study = optuna.create_study(storage=storage, study_name=self.study_name, direction="maximize",
                                                 sampler=sampler, pruner=pruner, load_if_exists=True)
                break
            except (ImportError, ValueError, ArgumentError) as e:
                raise UserError(f"--storage {storage_display(url)!r}: not a database URL Optuna can use ({e})") from None
            except Exception as e:  # noqa: BLE001 - sqlalchemy errors while another process sets up
                last = e
                time.sleep(0.5 * (i + 1))
        else:
            raise UserError(f"--storage {storage_display(url)!r}: cannot open the study ({type(last).__name__}: {last})")
        stored = self.study.user_attrs.get(FINGERPRINT_ATTR)
        if stored is None:
            self.study.set_user_attr(FINGERPRINT_ATTR, self.fingerprint)
        elif stored != self.fingerprint:
            raise UserError(f"the study {self.study_name!r} in {storage_display(url)} was started by a different sweep "
                            f"(other configurations, seeds or settings): use another --output-dir (or --study-name) "
                            f"for this one, or run the original config to finish that sweep")
        self.claims = C.Claims(url, self.study_name, self.opts.stale_after, self.opts.heartbeat_every)
        # claims' finished_ms come from the database's clock: compare against the same clock (--retry-failed)
        self.started_ms = self.claims.now_ms()
        tree = self.cfg.model_dump(mode="json")
        atomic_write_text(self.dir / "sweep.yaml", __import__("yaml").safe_dump(tree, sort_keys=False))

    # --- the worker loop -----------------------------------------------------------------------
    def unit_for(self, key: str, claim: C.Claim | None) -> Unit | None:
        if key in self.by_key:
            return self.by_key[key]
        params = (claim.payload or {}).get("params") if claim else None
        if params is None:
            return None
        unit = space_unit(self.cfg, int(key[4:]), params)
        self._finish_unit(unit)
        return unit

    def _params_of(self, key: str, history: list[C.Claim]) -> dict | None:
        for c in reversed(history):
            if c.payload.get("params") is not None:
                return c.payload["params"]
        return None

    def _fail_optuna_trial(self, claim: C.Claim) -> None:
        import optuna

        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in running:
            if t.user_attrs.get("unit") == claim.unit and t.user_attrs.get("attempt") == claim.attempt:
                try:
                    self.study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                except Exception:  # noqa: BLE001 - already finished by someone else
                    pass

    def pick(self) -> tuple[tuple[str, int] | None, bool]:
        """The next (unit, attempt) this process has claimed, and whether others still hold work."""
        latest = self.claims.latest()
        waiting = False
        for key in self.keys:
            if key in self.skipped:
                continue
            c = latest.get(key)
            if c is None:
                attempt = 0
            elif c.state in C.FINISHED:
                continue
            elif c.state == C.FAILED:
                if not (self.opts.retry_failed and (c.finished_ms or 0) < self.started_ms):
                    continue
                attempt = c.attempt + 1
            elif c.state == C.STALE:
                attempt = c.attempt + 1
            else:  # running
                if self.claims.is_stale(c) and self.claims.mark_stale(c):
                    self.opts.echo(f"[sweep] {c.payload.get('group', c.unit)}: its worker ({c.owner}) is gone; "
                                   f"running it again")
                    self._fail_optuna_trial(c)
                    attempt = c.attempt + 1
                else:
                    waiting = True
                    continue
            unit = self.by_key.get(key)
            depends = unit.depends_on if unit is not None else (TEACHER_UNIT if TEACHER_UNIT in self.by_key else None)
            if depends:
                dep = latest.get(depends)
                if dep is None or dep.state != C.DONE:
                    if dep is not None and dep.state in (C.FAILED, C.PRUNED, C.SKIPPED):
                        continue  # blocked: listed in the summary
                    waiting = True
                    continue
            if self.claims.try_claim(key, attempt):
                return (key, attempt), waiting
            waiting = True  # another process took it a moment ago
        return None, waiting

    def work(self) -> int:
        """Run claimed units until nothing is left (or max_trials); returns how many this process ran."""
        ran = 0
        while self.opts.max_trials is None or ran < self.opts.max_trials:
            picked, waiting = self.pick()
            if picked is not None:
                self.execute(*picked)
                ran += 1
                continue
            if not waiting:
                break
            time.sleep(self.opts.poll)
        return ran

    # --- one unit ----------------------------------------------------------------------------
    def _sample(self, slot: int):
        """Ask the sampler for a configuration that fits the budget (over-budget samples are recorded as
        failed trials with the reason, and sampled again)."""
        import optuna

        dists = distributions(self.cfg)
        over = []
        for attempt in range(20):
            self.study.sampler = optuna.samplers.TPESampler(seed=self.cfg.sweep.sampler_seed + 1000 * slot + attempt)
            trial = self.study.ask(dists)
            unit = space_unit(self.cfg, slot, trial.params)
            self._finish_unit(unit)
            if self.budget is None or self._count(unit) <= self.budget:
                return trial, unit, over
            n = self._count(unit)
            over.append({"name": unit.group, "trainable": n, "budget": self.budget})
            trial.set_user_attr("skipped", f"over budget: {n:,} trainable parameters > {self.budget:,}")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None, None, over

    def _grid_params(self, unit: Unit) -> tuple[dict, dict]:
        """A grid run as Optuna params: each grid key over all its grid values (Optuna wants one
        distribution per name across the study), plus the seed."""
        from optuna.distributions import CategoricalDistribution

        if unit.key == TEACHER_UNIT:
            params = {f"teacher:{k}": encode_choice(v) for k, v in unit.overrides.items()}
            return {k: CategoricalDistribution([v]) for k, v in params.items()}, params
        dists, params = {}, {}
        for k, values in self.cfg.sweep.grid.items():
            choices = list(dict.fromkeys(encode_choice(v) for v in values))
            dists[k], params[k] = CategoricalDistribution(choices), encode_choice(unit.overrides[k])
        if self.cfg.sweep.seeds:
            dists["train.seed"] = CategoricalDistribution(list(dict.fromkeys(self.cfg.sweep.seeds)))
            params["train.seed"] = unit.runs[0].seed
        return dists, params

    def _fixed_trial(self, unit: Unit, attempt: int, dists: dict, params: dict):
        """An Optuna trial, already RUNNING, holding exactly these params (created, never popped from a
        queue, so no other process can take it)."""
        import optuna
        from optuna.trial import TrialState, create_trial

        template = create_trial(state=TrialState.RUNNING, params=params, distributions=dists,
                                user_attrs={"unit": unit.key, "attempt": attempt, "configuration": unit.group})
        trial_id = self.study._storage.create_new_trial(self.study._study_id, template_trial=template)
        return optuna.Trial(self.study, trial_id)

    def execute(self, key: str, attempt: int) -> None:
        import optuna

        history = self.claims.attempts().get(key, [])
        unit = self.by_key.get(key)
        over = []
        if unit is not None:  # grid run, or the teacher
            trial = self._fixed_trial(unit, attempt, *self._grid_params(unit))
        else:  # a search slot: sample it, or run the same sample again after an interruption
            slot = int(key[4:])
            params = self._params_of(key, history)
            if params is None:
                trial, unit, over = self._sample(slot)
                if trial is None:
                    self.claims.finish(key, attempt, C.SKIPPED, {"over_budget": over})
                    self.opts.echo(f"[sweep] slot {slot}: 20 samples in a row over the budget; skipped")
                    return
                params = trial.params
            else:
                unit = space_unit(self.cfg, slot, params)
                self._finish_unit(unit)
                trial = self._fixed_trial(unit, attempt, distributions(self.cfg), params)
            trial.set_user_attr("unit", key)
            trial.set_user_attr("attempt", attempt)
            trial.set_user_attr("configuration", unit.group)
        payload = {"trial": trial.number, "group": unit.group, "params": params if self.space and key != TEACHER_UNIT else None,
                   "over_budget": over}
        self.claims.set_payload(key, attempt, payload)
        again = f" (attempt {attempt + 1})" if attempt else ""
        try:
            results = []
            for i, run in enumerate(unit.runs):
                self.opts.echo(f"[sweep] {run.name}: training{again}")
                m = self.train_one(run, trial if i == 0 and self.cfg.sweep.pruning else None)
                if m.status == "pruned":
                    raise optuna.TrialPruned(m.reason)
                results.append(m)
                self.opts.echo(f"[sweep] {run.name}: validation {self.metric} {m.validation.get(self.metric):.4f}, "
                               f"test accuracy {m.test.accuracy:.4f} ({m.efficiency.train_seconds:.1f} s)")
            value = statistics.fmean(m.validation.get(self.metric) for m in results)
            trial.set_user_attr("runs", {m_run.name: _brief(m) for m_run, m in zip(unit.runs, results)})
            self.study.tell(trial, value)
            self.claims.finish(key, attempt, C.DONE, {**payload, "value": value})
        except optuna.TrialPruned as e:
            self.opts.echo(f"[sweep] {unit.group}: pruned ({e})")
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.claims.finish(key, attempt, C.PRUNED, {**payload, "reason": str(e)})
        except KeyboardInterrupt:
            self.claims.release(key, attempt)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:  # noqa: BLE001 - one failed run does not stop the sweep
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            self.opts.echo(f"[sweep] {unit.group}: failed: {error}")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            self.claims.finish(key, attempt, C.FAILED, {**payload, "error": error})
            if not isinstance(e, UserError) and self.opts.echo is not None:
                import traceback

                traceback.print_exc(file=sys.stderr)

    def train_one(self, run: Run, trial) -> RunRecord:
        from peftlab.runtime import reset_peak_rss
        from peftlab.training.tracking import callbacks_for
        from peftlab.training.trainer import trainer_for

        rd = RunDir(self.run_dir(run))
        if rd.status() == "completed":
            return rd.record()  # finished just before an interruption: nothing to redo
        cfg = build_config(run.tree, f"sweep run {run.name!r}")
        resume = rd.start_or_continue(cfg)
        reset_peak_rss()
        callbacks = [PruneCallback(trial, self.metric)] if trial is not None else []
        callbacks += callbacks_for(cfg, rd.path, group=self.tracking)
        return trainer_for(cfg)(cfg, rd, self.opts.progress, callbacks).fit(resume)

    # --- the summary ---------------------------------------------------------------------------
    def rows(self) -> tuple[list[dict], list[dict]]:
        """One plain row per run (see summary.summarize), and the over-budget samples of a search."""
        attempts = self.claims.attempts()
        rows, over_budget = [], []
        for key in self.keys:
            history = attempts.get(key, [])
            state = history[-1].state if history else "pending"
            unit = self.by_key.get(key)
            if unit is None:  # a search slot: its configuration is whatever was sampled for it
                for c in history:
                    over_budget += c.payload.get("over_budget") or []
                if self._params_of(key, history) is None:
                    continue
                unit = self.unit_for(key, history[-1])
            blocked = None
            depends = unit.depends_on or (TEACHER_UNIT if key.startswith("slot") and TEACHER_UNIT in self.by_key else None)
            if depends and state == "pending":
                dep = (attempts.get(depends) or [None])[-1]
                if dep is not None and dep.state in (C.FAILED, C.PRUNED, C.SKIPPED):
                    blocked = f"its teacher ({depends}) did not complete"
            rows += [self._row(unit, run, state, history, blocked) for run in unit.runs]
        return rows, over_budget

    def _trial_runs(self, number) -> dict:
        if number is None:
            return {}
        try:
            return next((t.user_attrs.get("runs") or {} for t in self.study.get_trials(deepcopy=False)
                         if t.number == int(number)), {})
        except Exception:  # noqa: BLE001
            return {}

    def _row(self, unit: Unit, run: Run, state: str, history: list, blocked: str | None) -> dict:
        path = self.run_dir(run)
        row = {"name": run.name, "configuration": unit.group, "overrides": unit.overrides,
               "teacher": unit.key == TEACHER_UNIT, "seed": run.seed,
               "run_dir": str(path.relative_to(self.dir)) if path.is_relative_to(self.dir) else str(path),
               "attempts": len(history), "trainable_params": self.counts.get(unit.group)}
        record = RunRecord.read_or_none(RunDir(path).metrics_file)
        brief = _brief(record) if record is not None else None
        if record is None and state == C.DONE:  # finished on another machine: its figures are in the study
            brief = self._trial_runs(history[-1].payload.get("trial")).get(run.name)
            if brief is not None:
                row["run_dir_host"] = "another worker"
        if brief is not None and brief.get("status") == "completed":
            row.update(status="completed", validation={k: brief["validation"].get(k) for k in METRICS},
                       validation_loss=brief["validation"].get("loss"), test=brief["test"], trainable_params=brief["params"]["trainable"],
                       trainable_pct=brief["params"]["trainable_pct"], train_seconds=brief["train_seconds"],
                       peak_memory_bytes=brief["peak_memory_bytes"])
        elif blocked:
            row.update(status="blocked", reason=blocked)
        elif unit.key in self.skipped:
            s = self.skipped[unit.key]
            row.update(status="skipped", reason=f"over budget: {s['trainable']:,} trainable parameters > {s['budget']:,}",
                       trainable_params=s["trainable"])
        elif state == C.PRUNED:
            row.update(status="pruned", reason=(record.reason if record else None) or history[-1].payload.get("reason"))
        elif state == C.FAILED:
            row.update(status="failed", error=history[-1].payload.get("error") or (record.error if record else None))
        else:
            row.update(status="running" if state == C.RUNNING else "pending")
        return row

    def summary(self) -> dict:
        rows, over_budget = self.rows()
        return summarize(rows, self.metric, sweep_dir=str(self.dir), mode="search" if self.space else "grid",
                         study={"name": self.study_name, "storage": storage_display(self.url)},
                         seeds=list(self.cfg.sweep.seeds), budget=self.budget, skipped=list(self.skipped.values()),
                         over_budget_samples=over_budget)

    # --- entry point -------------------------------------------------------------------------
    def run(self) -> dict:
        from peftlab.training.tracking import SweepTracking

        self._open()
        self.tracking = SweepTracking(self.cfg, self.dir, self.study_name, storage_display(self.url))
        if self.skipped:
            for s in self.skipped.values():
                self.opts.echo(f"[sweep] {s['name']}: skipped, {s['trainable']:,} trainable parameters > budget "
                               f"{s['budget']:,}")
        try:
            self.work()
        finally:
            self.claims.close()
        summary = self.summary()
        write_summary(self.dir, summary)
        self.tracking.finish(summary)
        self.opts.echo(table(summary))
        return summary


class PruneCallback:
    """Optuna's pruner, asked after each epoch's validation: a reason to stop, or None."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, trainer, epoch: int, scores: dict) -> str | None:
        value = scores[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            return (f"validation {self.metric} {value:.4f} after epoch {epoch} is in the bottom quarter of the "
                    f"runs at that epoch")
        return None


def _brief(m: RunRecord) -> dict:
    """The figures a summary needs, kept in the Optuna trial too (for workers on other machines)."""
    if not m.completed:
        return {"status": m.status}
    return {"status": m.status, "validation": m.validation.model_dump(),
            "test": {k: m.test.get(k) for k in METRICS},
            "params": {k: m.params.get(k) for k in ("trainable", "total", "trainable_pct")},
            "train_seconds": m.efficiency.train_seconds, "peak_memory_bytes": m.efficiency.peak_memory_bytes}


def run_sweep(cfg: Config, opts: Options) -> dict:
    return Sweep(cfg, opts).run()
