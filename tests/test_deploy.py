"""deploy: confirm → lock → backup → migrate or first deploy → verify → record, with rollback.
Outcomes are checked with psycopg (row checksums, catalogs, the tracking tables)."""
from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import (
    CliRunner,
    Cluster,
    Project,
    clean_environ,
    confiture_argv,
    confiture_environ,
)
from psycopg import sql
from test_backup import checksums, db_oid, schema_dump, side_databases

import confiture

LOCK_CLASS = 1668247142  # confiture's advisory lock class ('conf')
FIRST = (1, "build")  # the first deploy restores a template that recorded its migrations


def applied(pg: Cluster, db: str) -> list[tuple[int, str]]:
    return [(int(v), how) for v, how in
            pg.query("SELECT version, how FROM confiture_migrations ORDER BY version", db=db)]


def deploys(pg: Cluster, db: str) -> list[tuple[Any, ...]]:
    return pg.query("SELECT outcome, from_version, to_version, backup_file, failed_migration, "
                    "message FROM confiture_deploys ORDER BY id", db=db)


def migration(project: Project, label: str, up: str, no_transaction: bool = False) -> None:
    head = "-- confiture:no-transaction\n" if no_transaction else ""
    project.write(f"db/migrations/{label}.up.sql", head + up)
    project.write(f"db/migrations/{label}.down.sql", "SELECT 1;\n")


GATE = 424242  # an advisory lock the test holds to keep a migration running as long as needed


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll `predicate` until it holds; fail naming `what` after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def waiting_on_gate(pg: Cluster, db: str) -> bool:
    """Is a session of `db` blocked on the GATE advisory lock?"""
    return bool(pg.scalar("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                          "WHERE d.datname = %s AND l.locktype = 'advisory' AND NOT l.granted "
                          "AND l.objid = %s", params=(db, GATE)))


def deployed(pg: Cluster, project: Project, cli: CliRunner, env: str = "local") -> str:
    """A database at version 1 with data: first deploy, then rows inserted by the 'app'."""
    migration(project, "001_widgets_color", "ALTER TABLE widgets ADD COLUMN color text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL, color text);\n")
    first = cli("deploy", "--env", env, "--yes", cwd=project.root)
    assert first.returncode == 0, first.stderr
    db = project.db(env)
    pg.query("INSERT INTO widgets SELECT i, 'w' || i, 'red' FROM generate_series(1, 500) i", db=db)
    return db


def test_first_deploy_builds_without_seeds_and_baselines(pg: Cluster, project: Project,
                                                         cli: CliRunner) -> None:
    project.write("db/seeds/dev/10_rows.sql", "INSERT INTO widgets VALUES (1, 'seed row');\n")
    migration(project, "001_a", "CREATE TABLE a (id int);\n")
    migration(project, "002_b", "CREATE TABLE b (id int);\n")
    project.write("db/schema/10_tables/20_ab.sql", "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\n")
    db = project.db()
    pg.create_db(db)  # exists, empty
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "first deploy" in result.stdout
    tables = {r[0] for r in pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                                     db=db)}
    assert {"widgets", "a", "b"} <= tables
    assert pg.scalar("SELECT count(*) FROM widgets", db=db) == 0  # seeds never deployed
    assert [v for v, _ in applied(pg, db)] == [1, 2]  # recorded by the build or the baseline
    assert {how for _, how in applied(pg, db)} <= {"build", "baseline"}
    [(outcome, from_v, to_v, backup, failed, _)] = deploys(pg, db)
    assert (outcome, from_v, to_v, failed) == ("ok", None, "2", None)
    assert backup and Path(backup).is_file()  # the empty database was backed up first
    assert side_databases(pg, project, "build") == side_databases(pg, project, "restore") == []
    again = cli("deploy", cwd=project.root)
    assert again.returncode == 0 and "0 migration(s)" in again.stdout, again.stdout


def test_first_deploy_creates_a_missing_database(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert not pg.db_exists(project.db())
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert pg.scalar("SELECT count(*) FROM widgets", db=project.db()) == 0


def test_deploy_applies_pending_migrations_and_records(pg: Cluster, project: Project,
                                                       cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    migration(project, "002_sizes", "ALTER TABLE widgets ADD COLUMN size int DEFAULT 1;\n")
    result = cli("deploy", "--json", cwd=project.root)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["applied"] == ["002_sizes"] and doc["outcome"] == "ok"
    assert pg.scalar("SELECT sum(size) FROM widgets", db=db) == 500
    assert applied(pg, db) == [FIRST, (2, "applied")]
    rows = deploys(pg, db)
    assert [r[:3] for r in rows] == [("ok", None, "1"), ("ok", "1", "2")]
    assert rows[1][3] == doc["backup"] and Path(doc["backup"]).is_file()


def test_failing_transactional_migration_rolls_back_by_itself(pg: Cluster, project: Project,
                                                              cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    before, oid = checksums(pg, db), db_oid(pg, db)
    migration(project, "002_broken", "UPDATE widgets SET color = 'blue';\nSELECT 1 / 0;\n")
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 1
    assert "002_broken" in result.stderr and "division by zero" in result.stderr
    assert "rolled back by itself" in result.stderr and ".dump" in result.stderr
    assert "Traceback" not in result.stderr
    assert db_oid(pg, db) == oid  # no restore was needed
    assert checksums(pg, db) == {**before, **{k: v for k, v in checksums(pg, db).items()
                                              if k.endswith("confiture_deploys")}}
    assert applied(pg, db) == [FIRST]
    assert deploys(pg, db)[-1][0] == "rolled_back" and deploys(pg, db)[-1][4] == "002_broken"


def test_failure_after_an_applied_migration_restores_the_backup(pg: Cluster, project: Project,
                                                                cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    before_rows, before_schema = checksums(pg, db), schema_dump(pg, db)
    migration(project, "002_fine", "UPDATE widgets SET color = 'green';\n"
                                   "CREATE TABLE fine (id int);\n")
    migration(project, "003_index", "CREATE INDEX CONCURRENTLY widgets_color ON widgets (color);\n"
                                    "DELETE FROM widgets WHERE id > 100;\n"
                                    "SELECT 1 / 0;\n", no_transaction=True)
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 1, result.stderr
    assert "003_index" in result.stderr and "restoring" in result.stderr
    backup = [w for w in result.stderr.split() if w.endswith(".dump")][0]
    assert Path(backup.rstrip(";,")).is_file()
    # schema and data exactly as before the deploy (the deploys table aside)
    after = checksums(pg, db)
    assert {k: v for k, v in after.items() if "confiture_deploys" not in k} == \
        {k: v for k, v in before_rows.items() if "confiture_deploys" not in k}
    def strip(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if "deploys" not in line)

    assert strip(schema_dump(pg, db)) == strip(before_schema)
    assert applied(pg, db) == [FIRST]
    record = deploys(pg, db)[-1]
    assert record[0] == "rolled_back" and record[4] == "003_index" and "restoring" in record[5]
    # the failed state is kept, not lost: writes made during the deploy window survive there
    [replaced] = side_databases(pg, project, "replaced")
    assert pg.scalar("SELECT count(*) FROM widgets", db=replaced) == 100
    assert side_databases(pg, project, "restore") == []


def test_failing_verify_check_rolls_back(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    before = checksums(pg, db)
    migration(project, "002_wipe_colors", "UPDATE widgets SET color = NULL;\n")
    project.write("db/verify/10_colors.sql",
                  "SELECT count(*) = 0 FROM widgets WHERE color IS NULL;\n")
    project.write("db/verify/20_rows.sql", "SELECT id FROM widgets WHERE label IS NULL;\n")
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 1
    assert "db/verify/10_colors.sql" in result.stderr
    after = checksums(pg, db)
    assert {k: v for k, v in after.items() if "deploys" not in k} == \
        {k: v for k, v in before.items() if "deploys" not in k}
    assert applied(pg, db) == [FIRST]


def test_unwritable_backup_folder_stops_deploy_before_migrating(pg: Cluster, project: Project,
                                                                cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    before = checksums(pg, db)
    migration(project, "002_sizes", "ALTER TABLE widgets ADD COLUMN size int;\n")
    project.write("blocked", "a file where the backup folder should be\n")
    project.config_path.write_text(project.config_path.read_text().replace(
        'seeds = ["common", "dev"]', 'seeds = ["common", "dev"]\nbackups = "blocked/backups"'))
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 1
    assert "before changing anything" in result.stderr and "blocked" in result.stderr
    assert applied(pg, db) == [FIRST]
    assert checksums(pg, db) == before
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE "
                     "table_name = 'widgets' AND column_name = 'size'", db=db) == 0


def test_protected_deploy_needs_yes_and_a_backup(pg: Cluster, project: Project, cli: CliRunner) -> None:
    # the history starts from widgets without color (the guard replays it before a first deploy)
    project.write("db/baseline.sql", "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL);\n")
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nbaseline_schema = "db/baseline.sql"\n')
    db = deployed(pg, project, cli, env="prod")
    migration(project, "002_sizes", "ALTER TABLE widgets ADD COLUMN size int;\n")
    project.write("db/schema/10_tables/10_widgets.sql", "CREATE TABLE widgets (id bigint PRIMARY KEY, "
                  "label text NOT NULL, color text, size int);\n")
    before, backups = checksums(pg, db), sorted((project.root / ".confiture/backups/prod").glob("*"))
    refused = cli("deploy", "--env", "prod", cwd=project.root)
    assert refused.returncode == 4 and "--yes" in refused.stderr
    no_backup = cli("deploy", "--env", "prod", "--yes", "--no-backup", cwd=project.root)
    assert no_backup.returncode == 4 and "--no-backup" in no_backup.stderr
    assert checksums(pg, db) == before and applied(pg, db) == [FIRST]
    assert sorted((project.root / ".confiture/backups/prod").glob("*")) == backups
    dry = cli("deploy", "--env", "prod", "--dry-run", cwd=project.root)
    assert dry.returncode == 0 and "002_sizes" in dry.stdout and "backup into" in dry.stdout
    assert checksums(pg, db) == before and applied(pg, db) == [FIRST]
    ok = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert ok.returncode == 0, ok.stderr
    assert applied(pg, db) == [FIRST, (2, "applied")]


def test_concurrent_deploys_wait_or_exit_5(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nlock_timeout = "1s"\n')
    # the first deploy's migration waits on a lock the test holds, until the second has given up
    migration(project, "002_slow", f"SELECT pg_advisory_xact_lock({GATE});\n")
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(cli("deploy", cwd=project.root)))
               for _ in range(2)]
    with pg.connect(db) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        threads[0].start()
        wait_until(lambda: waiting_on_gate(pg, db), "the first deploy to run its migration")
        threads[1].start()
        threads[1].join()
    threads[0].join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 5], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 5)
    assert "held by pid" in loser.stderr
    assert applied(pg, db) == [FIRST, (2, "applied")]
    # a `migrate` run holding the migration lock inside the database also keeps deploy out
    migration(project, "003_more", "CREATE TABLE more (id int);\n")
    with pg.connect(db) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext('migrate'))", (LOCK_CLASS,))
        blocked = cli("deploy", cwd=project.root)
    assert blocked.returncode == 5 and "migration lock" in blocked.stderr
    assert applied(pg, db) == [FIRST, (2, "applied")]


def test_remote_deploy_never_shows_the_password(pg_remote: Cluster, project: Project,
                                                cli: CliRunner) -> None:
    role, password = "deployer_" + secrets.token_hex(3), "pw-" + secrets.token_hex(12)
    db = project.name + "_remote"
    pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    try:
        url = (f"postgresql://{role}:{password}@127.0.0.1:{pg_remote.tcp_port}/{db}"
               "?sslmode=disable")
        project.config_path.write_text(project.config_path.read_text()
                                       + f'\n[env.remote]\nurl = "{url}"\n')
        migration(project, "001_a", "SELECT 1;\n")
        # every psql/pg_dump/pg_restore the tool starts goes through a wrapper that logs its
        # command line (all of them, not a sample of /proc), then runs the real tool
        log, wrappers = project.root / "argv.log", project.root / "pgbin"
        real = confiture.find_pg_tools().bindir
        wrappers.mkdir()
        for tool in ("psql", "pg_dump", "pg_restore"):
            wrapper = wrappers / tool
            wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{log}"\n'
                               f'exec "{real}/{tool}" "$@"\n')
            wrapper.chmod(0o755)
        env: dict[str, str | None] = {"PGHOST": None, "PGPORT": None, "PGUSER": None,
                                      "CONFITURE_PGBIN": str(wrappers)}
        first = cli("deploy", "--env", "remote", cwd=project.root, env=env)
        migration(project, "002_slow", "SELECT pg_sleep(0.5);\n")
        migration(project, "003_bad", "SELECT 1 / 0;\n", no_transaction=True)
        second = cli("deploy", "--env", "remote", cwd=project.root, env=env)
        seen = log.read_text().splitlines()
        assert first.returncode == 0, first.stderr
        assert second.returncode == 1 and "restoring" in second.stderr  # backup, pg_restore, swap
        for out in (first.stdout, first.stderr, second.stdout, second.stderr):
            assert password not in out
        assert any("pg_dump" in c for c in seen) and any("pg_restore" in c for c in seen)
        assert not [c for c in seen if password in c]
        assert pg_remote.scalar("SELECT count(*) FROM confiture_migrations", db=db) == 1
        assert password not in json.dumps(pg_remote.query(
            "SELECT message FROM confiture_deploys", db=db))
        # the same server through ~/.pgpass-style PGPASSFILE, no password in the URL
        passfile = project.write("pgpass", f"127.0.0.1:{pg_remote.tcp_port}:*:{role}:{password}\n")
        passfile.chmod(0o600)
        project.config_path.write_text(project.config_path.read_text().replace(
            f"{role}:{password}@", f"{role}@"))
        migration(project, "003_bad", "SELECT 1;\n", no_transaction=True)
        third = cli("deploy", "--env", "remote", cwd=project.root,
                    env={"PGHOST": None, "PGPORT": None, "PGUSER": None,
                         "PGPASSFILE": str(passfile)})
        assert third.returncode == 0, third.stderr
        assert pg_remote.scalar("SELECT count(*) FROM confiture_migrations", db=db) == 3
    finally:
        pg_remote.drop_dbs_with_prefix(project.name)
        pg_remote.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_no_secret_from_the_config_is_written_under_the_state_folder(
        pg_remote: Cluster, project: Project, cli: CliRunner) -> None:
    """A password written literally in a 0600 confiture.toml (and a literal sync key) stays
    there: after config check, scan, migrate, status, diff and backup, no file under .confiture/
    holds either (the parsed-config cache once copied the whole text into a 0644 file)."""
    role, password = "secret_" + secrets.token_hex(3), "pw-" + secrets.token_hex(12)
    key = "key-" + secrets.token_hex(12)
    db = project.name + "_remote"
    pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    try:
        url = (f"postgresql://{role}:{password}@127.0.0.1:{pg_remote.tcp_port}/{db}"
               "?sslmode=disable")
        project.config_path.write_text(project.config_path.read_text()
                                       + f'\n[env.remote]\nurl = "{url}"\n'
                                       + f'\n[sync]\nfrom = "remote"\nto = "local"\nkey = "{key}"\n')
        project.config_path.chmod(0o600)
        leaked = project.write(".confiture/cache/confiture.toml.json", f'{{"text": "{url}"}}')
        migration(project, "001_a", "CREATE TABLE a (id int);\n")
        pg_remote.query(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(db), sql.Identifier(role)))
        env = {"PGHOST": None, "PGPORT": None, "PGUSER": None}
        for words in (["config", "check"], ["scan", "--env", "remote"],
                      ["migrate", "up", "--env", "remote"], ["status", "--env", "remote"],
                      ["diff", "--env", "remote"], ["backup", "--env", "remote"],
                      ["sync", "rules"]):
            done = cli(*words, cwd=project.root, env=env)
            assert done.returncode in (0, 3), (words, done.stderr)
        assert not leaked.exists()  # an earlier version's copy is deleted
        written = [path for path in (project.root / ".confiture").rglob("*") if path.is_file()]
        assert any(path.suffix == ".dump" for path in written)  # the runs did write there
        for path in written:
            data = path.read_bytes()
            assert password.encode() not in data and key.encode() not in data, path
    finally:
        pg_remote.drop_dbs_with_prefix(project.name)
        pg_remote.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_sigterm_during_deploy_rolls_back(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    before = checksums(pg, db)
    migration(project, "002_fine", "UPDATE widgets SET color = 'green';\n")
    migration(project, "003_slow", "SELECT pg_sleep(60);\n")
    env = clean_environ()
    env.update(pg.env, NO_COLOR="1")
    proc = subprocess.Popen(confiture_argv("deploy"), cwd=project.root, env=confiture_environ(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                    "AND pid <> pg_backend_pid()") == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "restoring" in err and "Traceback" not in err
    after = checksums(pg, db)
    assert {k: v for k, v in after.items() if "deploys" not in k} == \
        {k: v for k, v in before.items() if "deploys" not in k}
    assert applied(pg, db) == [FIRST]
    assert deploys(pg, db)[-1][0] == "rolled_back"


def test_drift_check_after_deploy(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = deployed(pg, project, cli)
    project.config_path.write_text(project.config_path.read_text()
                                   + "\n[deploy]\ndrift_check = true\n")
    migration(project, "002_size", "ALTER TABLE widgets ADD COLUMN size int;\n")
    drifted = cli("deploy", cwd=project.root)  # the DDL does not have the column: drift
    assert drifted.returncode == 1 and "drift check" in drifted.stderr, drifted.stderr
    assert applied(pg, db) == [FIRST]
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL, color text, "
                  "size int);\n")
    ok = cli("deploy", cwd=project.root)
    assert ok.returncode == 0, ok.stderr
    assert applied(pg, db) == [FIRST, (2, "applied")]


def test_protected_deploy_checks_the_history_before_the_guards_replay(
        pg: Cluster, project: Project, cli: CliRunner) -> None:
    """The guard's preconditions run cheapest first: a changed applied migration is named
    (precondition 'history') before the consistency replay, which would refuse too."""
    project.write("db/baseline.sql", "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL);\n")
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nbaseline_schema = "db/baseline.sql"\n')
    db = deployed(pg, project, cli, env="prod")
    migration(project, "001_widgets_color", "ALTER TABLE widgets ADD COLUMN colour text;\n")
    migration(project, "002_sizes", "ALTER TABLE widgets ADD COLUMN size int;\n")  # not in the DDL
    before = checksums(pg, db)
    refused = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert refused.returncode == 3, refused.stderr
    assert "precondition 'history'" in refused.stderr
    assert "001_widgets_color" in refused.stderr and "would not match the DDL" not in refused.stderr
    assert "override: restore the changed files" in refused.stderr
    assert checksums(pg, db) == before and applied(pg, db) == [FIRST]
    unconfirmed = cli("deploy", "--env", "prod", cwd=project.root)  # history first, here too
    assert unconfirmed.returncode == 3 and "precondition 'history'" in unconfirmed.stderr
    migration(project, "001_widgets_color", "ALTER TABLE widgets ADD COLUMN color text;\n")
    refused = cli("deploy", "--env", "prod", "--yes", cwd=project.root)  # now the replay refuses
    assert refused.returncode == 3 and "precondition 'consistency'" in refused.stderr
    assert "would not match the DDL" in refused.stderr
    assert "[deploy] require_consistent = false" in refused.stderr  # the override, said once
    unconfirmed = cli("deploy", "--env", "prod", cwd=project.root)
    assert unconfirmed.returncode == 4 and "precondition 'confirmation'" in unconfirmed.stderr
    assert "override: --yes" in unconfirmed.stderr


def test_the_guard_refuses_no_backup_before_reaching_the_server(tmp_path: Path) -> None:
    """The cheapest precondition first: --no-backup on a protected env is refused before
    anything connects (the env's server does not even exist)."""
    import io

    (tmp_path / "db/schema").mkdir(parents=True)
    (tmp_path / "confiture.toml").write_text(
        '[project]\nname = "g"\nschema = ["db/schema"]\ndefault_env = "prod"\n\n'
        '[env.prod]\nurl = "postgresql://nobody@127.0.0.1:9/g_prod"\nprotected = true\n')
    config = confiture.load_config(tmp_path / "confiture.toml", {})
    env = confiture.resolve_env(config, "prod", {})
    console = confiture.Console(stderr=io.StringIO())
    ws = confiture.open_workspace(env, console, confiture_environ({}))
    request = confiture.GuardRequest("deploy", env, console, ws, yes=True, no_backup=True)
    try:
        confiture.guard(request)
    except confiture.PreconditionFailed as exc:
        assert exc.precondition == "no-backup" and exc.exit_code == 4
        assert "--no-backup" in exc.message and "override" in (exc.hint or "")
    else:
        raise AssertionError("the guard let --no-backup through on a protected env")
    # a dry run checks nothing
    assert confiture.guard(confiture.GuardRequest("deploy", env, console, ws, dry_run=True,
                                                  no_backup=True)).planned
