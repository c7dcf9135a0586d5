"""Behaviour a new user meets first (issue 11, items 13–23): checks that fail when they should,
hints that fit the situation and repeat the options in effect, advice that never destroys data.

The CLI runs as a subprocess (the `cli` fixture); outcomes are checked with psycopg.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliRunner, Cluster, Project
from helpers import clean_environ, confiture_argv, confiture_environ

# ── 11.13 config check fails on an unresolved ${VAR} ──────────────────────────────────────────


def _with_env_var_url(project: Project, pg: Cluster) -> None:
    text = project.config_path.read_text()
    text = text.replace(f'url = "{pg.url(project.db("prod"))}"', 'url = "${PROD_URL_11_13}"')
    project.config_path.write_text(text)


def test_config_check_fails_naming_unset_variable_and_env(cli: CliRunner, project: Project,
                                                          pg: Cluster) -> None:
    _with_env_var_url(project, pg)
    result = cli("config", "check", cwd=project.root)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "PROD_URL_11_13" in result.stderr and "env prod" in result.stderr
    assert "ok" not in result.stdout.split("\n")[0]
    result = cli("config", "check", "--json", cwd=project.root)
    assert result.returncode == 2 and json.loads(result.stdout)["ok"] is False


def test_config_check_env_limits_the_check(cli: CliRunner, project: Project, pg: Cluster) -> None:
    _with_env_var_url(project, pg)
    result = cli("config", "check", "--env", "local", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "prod" not in result.stdout
    result = cli("config", "check", "--env", "prod", cwd=project.root)
    assert result.returncode == 2 and "PROD_URL_11_13" in result.stderr
    # local's own URL unresolved: --env local fails too
    text = project.config_path.read_text().replace(
        f'url = "{pg.url(project.db("local"))}"', 'url = "${LOCAL_URL_11_13}"')
    project.config_path.write_text(text)
    result = cli("config", "check", "--env", "local", cwd=project.root)
    assert result.returncode == 2
    assert "LOCAL_URL_11_13" in result.stderr and "env local" in result.stderr
    result = cli("config", "check", cwd=project.root, env={"LOCAL_URL_11_13": pg.url("x"),
                                                         "PROD_URL_11_13": pg.url("y")})
    assert result.returncode == 0, result.stderr


# ── 11.14 an interrupted deploy names the migration that was running ──────────────────────────


def _start(project: Project, pg: Cluster, *args: str) -> subprocess.Popen[str]:
    env = {**clean_environ(), **pg.env, "NO_COLOR": "1"}
    return subprocess.Popen(confiture_argv(*args), cwd=project.root, env=confiture_environ(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _migration(project: Project, label: str, up: str) -> None:
    project.write(f"db/migrations/{label}.up.sql", up)
    project.write(f"db/migrations/{label}.down.sql", "SELECT 1;\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_deploy_names_the_running_migration(cli: CliRunner, project: Project,
                                                        pg: Cluster, sig: int) -> None:
    _migration(project, "001_widgets_color", "ALTER TABLE widgets ADD COLUMN color text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL, color text);\n")
    first = cli("deploy", "--yes", cwd=project.root)
    assert first.returncode == 0, first.stderr
    db = project.db()
    _migration(project, "002_slow", "CREATE TABLE slow (id int);\nSELECT pg_sleep(30);\n")
    proc = _start(project, pg, "deploy", "--yes")
    _wait_for(lambda: bool(pg.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
        "AND query LIKE %s", params=(db, "%pg_sleep(30)%"))))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "failed at migration 002_slow" in err and "verification" not in err
    outcome, failed, message = pg.query(
        "SELECT outcome, failed_migration, message FROM confiture_deploys ORDER BY id DESC "
        "LIMIT 1", db=db)[0]
    assert failed == "002_slow" and outcome == "rolled_back", (outcome, failed, message)
    assert "002_slow" in message
    assert pg.scalar("SELECT to_regclass('public.slow') IS NULL", db=db)
    assert [int(v) for (v,) in pg.query("SELECT version FROM confiture_migrations", db=db)] == [1]


# ── 11.15 connection failures: the hint fits the cause ─────────────────────────────────────────


def _set_local_url(project: Project, pg: Cluster, url: str) -> None:
    text = project.config_path.read_text().replace(
        f'url = "{pg.url(project.db("local"))}"', f'url = "{url}"')
    project.config_path.write_text(text)


def test_database_missing_is_not_a_server_down(cli: CliRunner, project: Project,
                                               pg: Cluster) -> None:
    assert not pg.db_exists(project.db())
    result = cli("migrate", "status", cwd=project.root)
    assert result.returncode == 1, result.stderr
    assert f"database '{project.db()}' does not exist" in result.stderr
    assert "server running" not in result.stderr and "pg-dev" not in result.stderr
    assert "hint: create it" in result.stderr


def test_role_missing_names_the_role(cli: CliRunner, project: Project, pg: Cluster) -> None:
    url = pg.url(project.db()).replace("postgres@", "no_such_role_11@")
    _set_local_url(project, pg, url)
    result = cli("template", cwd=project.root)
    assert result.returncode == 1
    assert "role 'no_such_role_11' does not exist" in result.stderr
    assert "server running" not in result.stderr and "pg-dev" not in result.stderr
    assert "PGUSER" in result.stderr


def test_authentication_failure_says_so(cli: CliRunner, project: Project, pg: Cluster,
                                        pg_remote: Cluster) -> None:
    _set_local_url(project, pg, f"postgresql://postgres:wrong@127.0.0.1:{pg_remote.tcp_port}/x")
    result = cli("template", cwd=project.root)
    assert result.returncode == 1
    assert "authentication failed" in result.stderr and "wrong" not in result.stderr
    assert "server running" not in result.stderr and "pg-dev" not in result.stderr
    assert "pgpass" in result.stderr


def test_server_down_mentions_pg_dev_only_where_the_project_has_it(
        cli: CliRunner, project: Project, pg: Cluster, tmp_path: Path) -> None:
    nowhere = tmp_path / "no-server"
    nowhere.mkdir()
    _set_local_url(project, pg, f"postgresql:///x?host={nowhere}&port=5999")
    result = cli("template", cwd=project.root)
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "is the server running" in result.stderr
    assert "pg-dev" not in result.stderr
    project.write("bin/pg-dev", "#!/bin/sh\n")
    result = cli("template", cwd=project.root)
    assert result.returncode == 1 and "bin/pg-dev start" in result.stderr
    # the dev cluster runs, but the run was not pointed at it (python3 -m confiture, not
    # bin/confiture): 'start it' would be wrong; the hint says where it listens
    home = tempfile.mkdtemp(prefix="pgdev-", dir="/tmp")  # a socket path must be short
    project.write(".confiture/pg/dev/location", home + "\n")
    project.write(".confiture/pg/dev/settings", "port=5433\nlisten=\n")
    listening = socket.socket(socket.AF_UNIX)
    try:
        listening.bind(f"{home}/.s.PGSQL.5433")
        running = cli("template", cwd=project.root)
        assert running.returncode == 1
        assert f"the project's dev cluster runs at {home}, port 5433" in running.stderr
        assert f"export PGHOST={home} PGPORT=5433" in running.stderr
        assert "bin/pg-dev start" not in running.stderr
    finally:
        listening.close()
        os.unlink(f"{home}/.s.PGSQL.5433")
        os.rmdir(home)


# ── 11.18 hints repeat the --config and --env in effect; never-built is not "changed" ────────


def test_template_check_tells_never_built_from_changed_and_repeats_options(
        cli: CliRunner, project: Project, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(project.config_path)
    result = cli("template", "--check", "--env", "local", "--config", config, cwd=elsewhere)
    assert result.returncode == 3
    assert "ever built" in result.stderr and "changed" not in result.stderr
    assert f"confiture.py --config {config} --env local template" in result.stderr
    built = cli("template", "--env", "local", "--config", config, cwd=elsewhere)
    assert built.returncode == 0, built.stderr
    project.write("db/schema/10_tables/99_more.sql", "CREATE TABLE more_11_18 (id int);\n")
    result = cli("template", "--check", cwd=project.root)
    assert result.returncode == 3
    assert "changed since the last build" in result.stderr
    assert "hint: run 'confiture.py template'" in result.stderr  # nothing typed, nothing added


def test_error_hints_repeat_the_env(cli: CliRunner, project: Project, pg: Cluster) -> None:
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_11_18 (id int);\n")
    project.write("db/migrations/001_a.down.sql", "DROP TABLE a_11_18;\n")
    pg.create_db(project.db())
    assert cli("migrate", "up", "--env", "local", cwd=project.root).returncode == 0
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_11_18 (id bigint);\n")
    result = cli("migrate", "up", "--env", "local", cwd=project.root)
    assert result.returncode == 3
    assert "'confiture.py --env local migrate repair'" in result.stderr


# ── 11.16 init in an existing project never brings back example content ──────────────────────


def test_init_twice_does_not_recreate_deleted_examples(cli: CliRunner, tmp_path: Path,
                                                       pg: Cluster) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    first = cli("init", cwd=root)
    assert first.returncode == 0, first.stderr
    example = root / "db/schema/10_tables/10_example.sql"
    seed = root / "db/seeds/dev/10_example.sql"
    assert example.is_file() and seed.is_file()
    example.unlink()
    seed.unlink()
    (root / "db/schema/10_tables/10_users.sql").write_text("CREATE TABLE users (id int);\n")
    for keep in (root / "db/migrations").glob(".keep"):
        keep.unlink()
    (root / "db/migrations").rmdir()
    second = cli("init", cwd=root)
    assert second.returncode == 0, second.stderr
    assert not example.exists() and not seed.exists()
    assert (root / "db/migrations").is_dir()  # a missing folder is created again
    assert "created db/migrations/.keep" in second.stdout
    # the next reset builds no `example` table
    name = "t_init_" + secrets.token_hex(3)
    (root / "confiture.toml").write_text(
        (root / "confiture.toml").read_text().replace('name = "fresh"', f'name = "{name}"')
        .replace("postgresql:///fresh_dev", pg.url(f"{name}_dev")))
    try:
        result = cli("reset", cwd=root)
        assert result.returncode == 0, result.stderr
        assert pg.scalar("SELECT to_regclass('public.example') IS NULL", db=f"{name}_dev")
    finally:
        pg.drop_dbs_with_prefix(name)


def test_init_beside_existing_schema_adds_no_example(cli: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "adopt"
    (root / "db/schema").mkdir(parents=True)
    (root / "db/schema/users.sql").write_text("CREATE TABLE users (id int);\n")
    result = cli("init", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "confiture.toml").is_file()
    assert not list(root.rglob("*example*"))


# ── 11.17 cheap preconditions before expensive work ───────────────────────────────────────────


def _our_databases(pg: Cluster, project: Project) -> list[str]:
    return [r[0] for r in pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                   params=(project.name,))]


def test_diff_on_missing_database_builds_no_template(cli: CliRunner, project: Project,
                                                     pg: Cluster) -> None:
    result = cli("diff", "--env", "local", cwd=project.root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"database '{project.db()}' does not exist" in result.stderr
    assert _our_databases(pg, project) == []  # no template was built first
    # a protected env: its template would be built on the scratch server; checked before too
    result = cli("diff", "--env", "prod", cwd=project.root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"database '{project.db('prod')}' does not exist" in result.stderr
    assert _our_databases(pg, project) == []


def test_clone_onto_existing_database_builds_no_template(cli: CliRunner, project: Project,
                                                         pg: Cluster) -> None:
    target = project.name + "_taken"
    pg.create_db(target)
    result = cli("clone", target, cwd=project.root)
    assert result.returncode == 4 and "already exists" in result.stderr
    assert _our_databases(pg, project) == [target]


def test_reset_with_other_sessions_builds_no_template(cli: CliRunner, project: Project,
                                                      pg: Cluster) -> None:
    pg.create_db(project.db())
    with pg.connect(project.db()):
        result = cli("reset", cwd=project.root)
    assert result.returncode == 4 and "other session" in result.stderr
    assert _our_databases(pg, project) == [project.db()]


# ── 11.19 pruning a protected env's backups needs --yes ──────────────────────────────────────


def test_backups_prune_on_protected_env_needs_yes(cli: CliRunner, project: Project,
                                                  pg: Cluster) -> None:
    pg.create_db(project.db("prod"))
    for _ in range(2):
        taken = cli("backup", "--env", "prod", cwd=project.root)
        assert taken.returncode == 0, taken.stderr
    folder = project.root / ".confiture/backups/prod"
    dumps = sorted(folder.glob("*.dump"))
    assert len(dumps) == 2
    refused = cli("backups", "prune", "--env", "prod", "--keep", "1", cwd=project.root)
    assert refused.returncode == 4 and "--yes" in refused.stderr
    assert sorted(folder.glob("*.dump")) == dumps  # nothing deleted
    nothing = cli("backups", "prune", "--env", "prod", "--keep", "5", cwd=project.root)
    assert nothing.returncode == 0, nothing.stderr  # nothing to delete: nothing to confirm
    done = cli("backups", "prune", "--env", "prod", "--keep", "1", "--yes", cwd=project.root)
    assert done.returncode == 0, done.stderr
    assert sorted(folder.glob("*.dump")) == dumps[1:]


# ── 11.20 names keep their letters ────────────────────────────────────────────────────────────


def test_migration_names_keep_unicode_letters(cli: CliRunner, project: Project,
                                              pg: Cluster) -> None:
    result = cli("migrate", "new", "ajout_élément", cwd=project.root)
    assert result.returncode == 0, result.stderr
    result = cli("migrate", "new", "Straße -- über  alles!", cwd=project.root)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (project.root / "db/migrations").glob("*.up.sql"))
    assert [n.split("_", 1)[1] for n in names] == ["ajout_élément.up.sql",
                                                   "straße_über_alles.up.sql"]
    up = project.root / "db/migrations" / names[0]
    up.write_text("CREATE TABLE élément (id int);\n", encoding="utf-8")
    pg.create_db(project.db())
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert pg.query("SELECT name FROM confiture_migrations ORDER BY version",
                    db=project.db()) == [("ajout_élément",), ("straße_über_alles",)]


def test_init_project_name_keeps_letters_and_collapses_separators(cli: CliRunner,
                                                                   tmp_path: Path) -> None:
    root = tmp_path / "my proj ü"
    root.mkdir()
    result = cli("init", cwd=root)
    assert result.returncode == 0, result.stderr
    assert 'name = "my_proj_u"' in (root / "confiture.toml").read_text()
    check = cli("config", "check", "--env", "local", cwd=root)
    assert check.returncode == 0, check.stderr


# ── 11.21 migrate down without an argument reverts one step ──────────────────────────────────


def test_migrate_down_defaults_to_one_step(cli: CliRunner, project: Project, pg: Cluster) -> None:
    for version in (1, 2, 3):
        project.write(f"db/migrations/00{version}_t{version}.up.sql",
                      f"CREATE TABLE t{version} (id int);\n")
        project.write(f"db/migrations/00{version}_t{version}.down.sql", f"DROP TABLE t{version};\n")
    pg.create_db(project.db())
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    result = cli("migrate", "down", cwd=project.root)
    assert result.returncode == 0, result.stderr
    versions = [int(v) for (v,) in pg.query("SELECT version FROM confiture_migrations "
                                           "ORDER BY version", db=project.db())]
    assert versions == [1, 2]
    assert pg.scalar("SELECT to_regclass('public.t3') IS NULL", db=project.db())
    both = cli("migrate", "down", "--steps", "1", "--to", "0", cwd=project.root)
    assert both.returncode == 2 and "not both" in both.stderr
    helped = cli("migrate", "down", "--help", cwd=project.root)
    assert "one step" in helped.stdout


# ── 11.22 status advice never suggests a destructive command where a safe one fits ───────────


def test_status_advice_is_safe_for_a_database_with_data(cli: CliRunner, project: Project,
                                                        pg: Cluster) -> None:
    project.write("db/schema/10_tables/10_notes.sql", "CREATE TABLE notes (id int);\n")
    project.write("db/migrations/001_notes.up.sql", "CREATE TABLE notes (id int);\n")
    project.write("db/migrations/001_notes.down.sql", "DROP TABLE notes;\n")
    pg.create_db(project.db())
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    pg.query("INSERT INTO notes SELECT generate_series(1, 10)", db=project.db())
    assert cli("template", cwd=project.root).returncode == 0
    project.write("db/schema/10_tables/20_more.sql", "CREATE TABLE more_22 (id int);\n")
    project.write("db/migrations/002_more.up.sql", "CREATE TABLE more_22 (id int);\n")
    project.write("db/migrations/002_more.down.sql", "DROP TABLE more_22;\n")
    result = cli("status", "--check", "--env", "local", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    attention = result.stdout[result.stdout.index("attention"):]
    assert "(run reset)" not in attention
    assert "'confiture.py --env local template'" in attention
    assert "'confiture.py --env local migrate up'" in attention
    # reset is named only with what it would destroy
    for line in attention.splitlines():
        if "reset" in line:
            assert "replacing the data" in line, line
    assert pg.scalar("SELECT count(*) FROM notes", db=project.db()) == 10  # status changed nothing


# ── 11.23 what a vendoring user reads ─────────────────────────────────────────────────────────


def test_init_config_stands_alone(cli: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "vendored"
    root.mkdir()
    assert cli("init", cwd=root).returncode == 0
    text = (root / "confiture.toml").read_text()
    assert "confiture.toml.example" not in text
    assert "PGUSER" in text and "~/.pgpass" in text  # says how to point it at a server
    check = cli("config", "check", "--env", "local", cwd=root)
    assert check.returncode == 0, check.stderr


def test_status_does_not_call_an_unrecorded_database_built_from_ddl(
        cli: CliRunner, project: Project, pg: Cluster) -> None:
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_23 (id int);\n")
    project.write("db/migrations/001_a.down.sql", "DROP TABLE a_23;\n")
    pg.create_db(project.db())  # made by hand: no tracking table
    result = cli("status", cwd=project.root)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "migrations" in line)
    assert "untracked" in row and "built from DDL" not in row and "baseline" in row
    # a reset builds from DDL and records the migrations (how = 'build'): not untracked
    assert cli("reset", cwd=project.root).returncode == 0
    assert pg.query("SELECT how FROM confiture_migrations", db=project.db()) == [("build",)]
    result = cli("status", cwd=project.root)
    assert "untracked" not in result.stdout


def test_protected_migrate_checks_files_before_the_backup(cli: CliRunner, project: Project,
                                                          pg: Cluster) -> None:
    pg.create_db(project.db("prod"))
    # the DDL is what the migration builds (the guard of a protected env checks they agree)
    project.write("db/schema/10_tables/10_widgets.sql", "CREATE TABLE a_17 (id int);\n")
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_17 (id int);\n")
    assert cli("migrate", "up", "--env", "prod", "--yes", cwd=project.root).returncode == 0
    folder = project.root / ".confiture/backups/prod"
    before = sorted(folder.glob("*.dump"))
    assert len(before) == 1  # the protected env was backed up before the first migration
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_17 (id bigint);\n")  # changed
    project.write("db/migrations/002_b.up.sql", "CREATE TABLE b_17 (id int);\n")
    up = cli("migrate", "up", "--env", "prod", "--yes", cwd=project.root)
    assert up.returncode == 3 and "001_a" in up.stderr
    down = cli("migrate", "down", "--env", "prod", "--yes", cwd=project.root)
    assert down.returncode != 0 and "down" in down.stderr  # 001_a has no down file
    assert sorted(folder.glob("*.dump")) == before  # refused before any backup was taken
    assert pg.scalar("SELECT to_regclass('public.b_17') IS NULL", db=project.db("prod"))


def test_status_tells_a_refused_connection_from_a_server_down(cli: CliRunner, project: Project,
                                                              pg: Cluster) -> None:
    url = pg.url(project.db()).replace("postgres@", "no_such_role_11@")
    _set_local_url(project, pg, url)
    result = cli("status", cwd=project.root)
    assert result.returncode == 1
    assert "REFUSED: role 'no_such_role_11' does not exist" in result.stdout
    assert "UNREACHABLE" not in result.stdout and "PGUSER" in result.stderr


def test_no_connect_privilege_says_grant(cli: CliRunner, project: Project, pg: Cluster) -> None:
    role = project.name + "_nc"
    pg.create_db(project.db())
    pg.query(f'CREATE ROLE "{role}" LOGIN')
    try:
        pg.query(f'REVOKE CONNECT ON DATABASE "{project.db()}" FROM PUBLIC')
        _set_local_url(project, pg, pg.url(project.db()).replace("postgres@", f"{role}@"))
        result = cli("migrate", "status", cwd=project.root)
        assert result.returncode == 1
        assert "permission denied for database" in result.stderr
        assert "GRANT CONNECT" in result.stderr and "server running" not in result.stderr
    finally:
        pg.drop_db(project.db())
        pg.query(f'DROP ROLE "{role}"')


def test_a_session_whose_psql_died_before_the_first_write_says_why(tmp_path: Path) -> None:
    """psql exits at once when no server listens; the first write then meets a broken pipe.
    The error must still carry psql's reason and the server-down hint, not a bare 'psql exited'
    (it did whenever psql lost the race with the first write: under load, or with xdist)."""
    import confiture

    tools = confiture.find_pg_tools()
    conn = confiture.ConnInfo.parse(f"host={tmp_path} port=1 user=nobody", "test")
    session = confiture.Client(tools, conn, {"PATH": os.environ.get("PATH", "")}).session("x")
    session._proc.wait(timeout=30)  # dead before anything is written: the race made certain
    with pytest.raises(confiture.ConnectionFailed) as caught:
        session.execute("SELECT 1")
    assert caught.value.reason == confiture.SERVER_DOWN, caught.value.message
    assert "server running" in (caught.value.hint or ""), caught.value.hint
