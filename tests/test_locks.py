"""Bounded locks (§8): lock_timeout on migration statements, retries with backoff, the blocker
named, no-transaction migrations resuming, --wait-for-quiet. Another psycopg session holds the
lock; outcomes are checked with psycopg."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from helpers import (
    CliRunner,
    Cluster,
    Project,
    clean_environ,
    confiture_argv,
    confiture_environ,
    write_config,
)

import confiture

SETTINGS = '\n[migrations]\nstatement_lock_timeout = "200ms"\nlock_retries = {retries}\n'


def setup(pg: Cluster, project: Project, retries: int = 5) -> str:
    project.config_path.write_text(project.config_path.read_text()
                                   + SETTINGS.format(retries=retries))
    db = project.db()
    pg.create_db(db)
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text)", db=db)
    return db


def add_migration(project: Project, label: str, up: str) -> None:
    project.write(f"db/migrations/{label}.up.sql", up)
    project.write(f"db/migrations/{label}.down.sql", "SELECT 1;\n")


@contextmanager
def holding(pg: Cluster, db: str, sql: str = "SELECT count(*) FROM widgets"
            ) -> Iterator[psycopg.Connection[Any]]:
    """Another application inside an open transaction that has read widgets (ACCESS SHARE:
    enough to block any ALTER TABLE)."""
    conn = psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=db,
                           application_name="blocker-app")
    conn.execute(sql)
    try:
        yield conn
    finally:
        conn.close()


def start_cli(pg: Cluster, project: Project, *args: str) -> subprocess.Popen[str]:
    env = clean_environ()
    env.update(pg.env)
    env["NO_COLOR"] = "1"
    return subprocess.Popen(confiture_argv(*args), cwd=project.root, env=confiture_environ(env),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def wait_for(check: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def timeouts(pg: Cluster, db: str) -> list[Any]:
    if not pg.scalar("SELECT to_regclass('confiture_migrations_log') IS NOT NULL", db=db):
        return []
    return [r[0] for r in pg.query("SELECT detail FROM confiture_migrations_log "
                                   "WHERE event = 'lock-timeout' ORDER BY id", db=db)]


def exists(pg: Cluster, db: str, table: str) -> bool:
    return bool(pg.scalar("SELECT to_regclass(%s) IS NOT NULL", db=db, params=(table,)))


def test_transactional_migration_retries_names_blocker_and_succeeds(
        pg: Cluster, project: Project) -> None:
    db = setup(pg, project)
    add_migration(project, "001_color", "CREATE TABLE side (id int);\n"
                                        "ALTER TABLE widgets ADD COLUMN color text;\n")
    with holding(pg, db) as blocker:
        blocker_pid = blocker.info.backend_pid
        run = start_cli(pg, project, "migrate", "up")
        wait_for(lambda: timeouts(pg, db), "a lock timeout")
        # rolled back: the statement before the blocked one left nothing behind
        assert not exists(pg, db, "side")
        assert not pg.scalar("SELECT count(*) FROM confiture_migrations", db=db)
        [first, *_] = timeouts(pg, db)
        assert first["attempt"] == 1
        assert [b["pid"] for b in first["blockers"]] == [blocker_pid]
        assert first["blockers"][0]["application"] == "blocker-app"
        assert first["blockers"][0]["query"] == "SELECT count(*) FROM widgets"
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert f"pid {blocker_pid} (blocker-app, idle in transaction" in err
    assert "retrying in" in err
    assert exists(pg, db, "side")
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'widgets' AND column_name = 'color'", db=db) == 1
    assert pg.query("SELECT version FROM confiture_migrations", db=db) == [(1,)]


def test_no_transaction_migration_resumes_at_the_timed_out_statement(
        pg: Cluster, project: Project) -> None:
    db = setup(pg, project)
    # CREATE TABLE side2 would fail if it ran twice: the retry must resume after it
    add_migration(project, "001_split", "-- confiture:no-transaction\n"
                                        "CREATE TABLE side2 (id int);\n"
                                        "ALTER TABLE widgets ADD COLUMN size int;\n"
                                        "CREATE TABLE side3 (id int);\n")
    with holding(pg, db):
        run = start_cli(pg, project, "migrate", "up")
        wait_for(lambda: timeouts(pg, db), "a lock timeout")
        assert exists(pg, db, "side2") and not exists(pg, db, "side3")
        assert not pg.scalar("SELECT count(*) FROM confiture_migrations", db=db)
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert exists(pg, db, "side3")
    assert pg.query("SELECT version FROM confiture_migrations", db=db) == [(1,)]
    resumed = pg.query("SELECT detail->>'done' FROM confiture_migrations_log WHERE "
                       "event = 'started' ORDER BY id", db=db)
    assert resumed[0] == ("0",) and resumed[-1] == ("1",)


def test_retries_exhausted_exit_5_nothing_applied(pg: Cluster, project: Project,
                                                  cli: CliRunner) -> None:
    db = setup(pg, project, retries=1)
    add_migration(project, "001_color", "CREATE TABLE side (id int);\n"
                                        "ALTER TABLE widgets ADD COLUMN color text;\n")
    with holding(pg, db) as blocker:
        result = cli("migrate", "up", cwd=project.root)
        assert result.returncode == 5, result.stderr
        assert "after 2 attempt(s)" in result.stderr
        assert f"pid {blocker.info.backend_pid} (blocker-app" in result.stderr
        assert "001_color was not applied" in result.stderr
    assert not exists(pg, db, "side")
    assert not pg.scalar("SELECT count(*) FROM confiture_migrations", db=db)
    assert len(timeouts(pg, db)) == 1


def test_statement_lock_timeout_defaults(tmp_path: Path) -> None:
    base = ('[project]\nname = "x"\n[env.local]\nurl = "postgresql:///x_local"\n'
            '[env.prod]\nurl = "postgresql:///x_prod"\nprotected = true\n')

    def timeouts_for(extra: str) -> tuple[float | None, float | None]:
        config = confiture.load_config(write_config(tmp_path / "confiture.toml", base + extra))
        return tuple(confiture.statement_lock_timeout(config, confiture.resolve_env(
            config, name, {})) for name in ("local", "prod"))  # type: ignore[return-value]

    assert timeouts_for("") == (None, 5.0)
    assert timeouts_for('[migrations]\nstatement_lock_timeout = "2s"\n') == (2.0, 2.0)
    assert timeouts_for("[migrations]\nstatement_lock_timeout = 0\n") == (None, None)


def test_wait_for_quiet(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = setup(pg, project)
    project.config_path.write_text(project.config_path.read_text()
                                   + 'lock_timeout = "1s"\n')
    add_migration(project, "001_t", "CREATE TABLE t (id int);\n")
    with holding(pg, db, "SELECT 1"):
        wait_for(lambda: pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                   "'blocker-app' AND now() - xact_start > interval '600 ms'"),
                 "the blocker's transaction to be older than the quiet period")
        waited = cli("migrate", "up", "--wait-for-quiet", "0.5", cwd=project.root)
        assert waited.returncode == 5, waited.stderr
        assert "blocker-app" in waited.stderr and "older than 500 ms" in waited.stderr
        assert not exists(pg, db, "t")
    quiet = cli("migrate", "up", "--wait-for-quiet", "0.5", cwd=project.root)
    assert quiet.returncode == 0, quiet.stderr
    assert exists(pg, db, "t")
