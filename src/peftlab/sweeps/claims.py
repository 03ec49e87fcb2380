"""Race-free claiming of sweep work between processes (on one machine or many), beside Optuna's own
tables in the study database.

A claim is a row (study, unit, attempt). Claiming is an INSERT: the primary key lets exactly one
process win an attempt, on SQLite, PostgreSQL or MySQL alike. (Optuna's own WAITING -> RUNNING pop
relies on SELECT ... FOR UPDATE, which SQLite ignores, so two processes could pop the same trial.)

A running claim carries its owner (host/pid/process start time) and a heartbeat. It is stale when
its owner is a dead process on this host, or when its heartbeat is older than `stale_after` seconds;
marking it stale is a conditional UPDATE, so one process does it, and the unit's next attempt is
claimed like the first: exactly one re-run per interrupted attempt.

Every timestamp in the table is written by the database's clock (`db_now_ms()` in the SQL), and a
heartbeat's age is computed in SQL against that same clock: workers on machines whose clocks disagree
never see a live claim as stale, nor a dead one as fresh.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

RUNNING, DONE, PRUNED, FAILED, STALE, SKIPPED = "running", "done", "pruned", "failed", "stale", "skipped"
FINISHED = {DONE, PRUNED, SKIPPED}

_metadata = sa.MetaData()
claims_table = sa.Table(
    "peftlab_claims", _metadata,
    sa.Column("study", sa.String(255), primary_key=True),
    sa.Column("unit", sa.String(255), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("heartbeat_ms", sa.BigInteger, nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("finished_ms", sa.BigInteger),
    sa.Column("payload", sa.Text),  # JSON: sampled params, trial number, error
)


def now_ms() -> int:
    """This machine's clock (for local bookkeeping only; the claims table uses db_now_ms())."""
    return int(time.time() * 1000)


class db_now_ms(FunctionElement):
    """Milliseconds since the Unix epoch by the database server's clock, evaluated in the statement."""
    type = sa.BigInteger()
    inherit_cache = True


@compiles(db_now_ms, "sqlite")
def _sqlite_now(element, compiler, **kw):
    return "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"


@compiles(db_now_ms, "postgresql")
def _postgres_now(element, compiler, **kw):
    return "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"


@compiles(db_now_ms, "mysql")
@compiles(db_now_ms, "mariadb")
def _mysql_now(element, compiler, **kw):
    return "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"


@compiles(db_now_ms)
def _other_now(element, compiler, **kw):
    raise sa_exc.CompileError(f"peftlab sweep: no database clock for {compiler.dialect.name!r} "
                              f"(use SQLite, PostgreSQL or MySQL storage)")


def _process_start(pid: int) -> str:
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # noqa: BLE001 - no such process, or psutil missing
        return "?"


def my_owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}/{pid}/{_process_start(pid)}"


def owner_is_dead(owner: str) -> bool:
    """True only when we can tell: the owner ran on this host and that process is gone."""
    try:
        host, pid, started = owner.rsplit("/", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return started != "?" and _process_start(pid) not in (started, "?")


@dataclass
class Claim:
    unit: str
    attempt: int
    owner: str
    state: str
    heartbeat_ms: int
    started_ms: int
    finished_ms: int | None
    payload: dict
    age_ms: int = 0  # database now - heartbeat, when it was read

    @property
    def key(self) -> tuple[str, int]:
        return self.unit, self.attempt


def _retrying(fn, *args, tries: int = 30, **kwargs):
    """SQLite under several writers answers 'database is locked' now and then, and a database server's
    connection can drop (restart, network): wait and try again."""
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except sa_exc.OperationalError as e:
            transient = e.connection_invalidated or any(w in str(e).lower() for w in ("locked", "busy"))
            if not transient or i == tries - 1:
                raise
            time.sleep(0.2 + 0.1 * i)


class Claims:
    def __init__(self, url: str, study: str, stale_after: float = 120.0, heartbeat_every: float = 10.0):
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.engine = sa.create_engine(url, **kwargs)
        self.study = study
        self.owner = my_owner()
        self.stale_after_ms = int(stale_after * 1000)
        self.heartbeat_every = heartbeat_every
        self._held: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for i in range(10):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                break
            except (sa_exc.OperationalError, sa_exc.IntegrityError, sa_exc.ProgrammingError):
                time.sleep(0.3 * (i + 1))  # another process created it at the same moment
                if i == 9:
                    raise

    # --- reading -----------------------------------------------------------------------------
    def all(self) -> list[Claim]:
        def read():
            age = (db_now_ms() - claims_table.c.heartbeat_ms).label("age_ms")
            with self.engine.connect() as c:
                rows = c.execute(sa.select(claims_table, age).where(claims_table.c.study == self.study)).mappings().all()
            return [Claim(r["unit"], r["attempt"], r["owner"], r["state"], r["heartbeat_ms"], r["started_ms"],
                          r["finished_ms"], json.loads(r["payload"]) if r["payload"] else {}, r["age_ms"]) for r in rows]
        return _retrying(read)

    def now_ms(self) -> int:
        """The database's clock, the one every timestamp in the claims table comes from."""
        def read():
            with self.engine.connect() as c:
                return int(c.execute(sa.select(db_now_ms())).scalar_one())
        return _retrying(read)

    def latest(self) -> dict[str, Claim]:
        out: dict[str, Claim] = {}
        for c in self.all():
            if c.unit not in out or c.attempt > out[c.unit].attempt:
                out[c.unit] = c
        return out

    def attempts(self) -> dict[str, list[Claim]]:
        out: dict[str, list[Claim]] = {}
        for c in sorted(self.all(), key=lambda c: c.attempt):
            out.setdefault(c.unit, []).append(c)
        return out

    # --- claiming ----------------------------------------------------------------------------
    def try_claim(self, unit: str, attempt: int, payload: dict | None = None) -> bool:
        def insert():
            with self.engine.begin() as c:
                c.execute(claims_table.insert().values(
                    study=self.study, unit=unit, attempt=attempt, owner=self.owner, state=RUNNING,
                    heartbeat_ms=db_now_ms(), started_ms=db_now_ms(), finished_ms=None,
                    payload=json.dumps(payload or {})))
        try:
            _retrying(insert)
        except sa_exc.IntegrityError:
            return False  # someone else holds this attempt
        with self._lock:
            self._held.add((unit, attempt))
        self._ensure_heartbeat()
        return True

    def _update_mine(self, unit: str, attempt: int, **values) -> int:
        t = claims_table.c

        def update():
            with self.engine.begin() as c:
                return c.execute(claims_table.update().where(
                    (t.study == self.study) & (t.unit == unit) & (t.attempt == attempt) & (t.owner == self.owner)
                ).values(**values)).rowcount
        return _retrying(update)

    def set_payload(self, unit: str, attempt: int, payload: dict) -> None:
        self._update_mine(unit, attempt, payload=json.dumps(payload))

    def finish(self, unit: str, attempt: int, state: str, payload: dict | None = None) -> None:
        values = {"state": state, "finished_ms": db_now_ms()}
        if payload is not None:
            values["payload"] = json.dumps(payload)
        self._update_mine(unit, attempt, **values)
        with self._lock:
            self._held.discard((unit, attempt))

    def release(self, unit: str, attempt: int) -> None:
        """Give a claim up without finishing it (interrupted): the next start re-runs it at once."""
        self.finish(unit, attempt, STALE)

    # --- staleness ---------------------------------------------------------------------------
    def is_stale(self, claim: Claim) -> bool:
        """Its owner is gone: a dead process on this host, or no heartbeat for stale_after seconds by the
        database's clock (claim.age_ms was computed in SQL; this machine's clock plays no part)."""
        if claim.state != RUNNING or claim.owner == self.owner:
            return False
        return owner_is_dead(claim.owner) or claim.age_ms > self.stale_after_ms

    def mark_stale(self, claim: Claim) -> bool:
        """Conditional on the claim being unchanged since we read it (and, unless its process is dead
        here, on its heartbeat being old by the database's clock now): True for exactly one caller."""
        t = claims_table.c
        cond = ((t.study == self.study) & (t.unit == claim.unit) & (t.attempt == claim.attempt)
                & (t.state == RUNNING) & (t.heartbeat_ms == claim.heartbeat_ms))
        if not owner_is_dead(claim.owner):
            cond = cond & (t.heartbeat_ms < db_now_ms() - self.stale_after_ms)

        def update():
            with self.engine.begin() as c:
                return c.execute(claims_table.update().where(cond).values(state=STALE, finished_ms=db_now_ms())).rowcount
        return _retrying(update) == 1

    # --- heartbeat ---------------------------------------------------------------------------
    def beat(self) -> None:
        with self._lock:
            held = list(self._held)
        for unit, attempt in held:
            try:
                self._update_mine(unit, attempt, heartbeat_ms=db_now_ms())
            except sa_exc.SQLAlchemyError:
                pass  # the next beat will try again

    def _ensure_heartbeat(self) -> None:
        if self._thread is None:
            def loop():
                while not self._stop.wait(self.heartbeat_every):
                    self.beat()
            self._thread = threading.Thread(target=loop, name="peftlab-heartbeat", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.engine.dispose()
