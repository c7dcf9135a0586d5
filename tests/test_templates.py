"""Templates, clones and reset against a real server; outcomes checked with psycopg."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import CliRunner, Cluster, Project, confiture_argv, confiture_environ

import confiture

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"


def project_name(project: Project) -> str:
    return confiture.load_config(project.config_path).project


def templates_of(pg: Cluster, project: Project) -> list[tuple[str, bool, bool]]:
    return pg.query("SELECT datname, datistemplate, datallowconn FROM pg_database "
                    "WHERE starts_with(datname, %s) ORDER BY datname",
                    params=(project_name(project) + "_tpl_",))


def test_template_is_built_once_and_published_atomically(pg: Cluster, project: Project, cli: CliRunner) -> None:
    first = cli("template", cwd=project.root)
    assert first.returncode == 0, first.stderr
    name = first.stdout.strip()
    assert name.startswith(project_name(project) + "_tpl_local_")
    assert templates_of(pg, project) == [(name, True, False)]
    meta = json.loads(pg.scalar("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                                "WHERE datname = %s", params=(name,)))
    assert meta["env"] == "local" and meta["files"] >= 1 and meta["mark"] == "confiture-template"
    oid = pg.scalar("SELECT oid FROM pg_database WHERE datname = %s", params=(name,))
    again = cli("template", cwd=project.root)
    assert again.returncode == 0 and again.stdout.strip() == name
    assert "building" not in again.stderr
    assert pg.scalar("SELECT oid FROM pg_database WHERE datname = %s", params=(name,)) == oid


def test_template_check_reports_staleness(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("template", "--check", cwd=project.root).returncode == 3
    assert cli("template", cwd=project.root).returncode == 0
    assert cli("template", "--check", cwd=project.root).returncode == 0
    project.write("db/schema/10_tables/99_more.sql", "CREATE TABLE more_things (id int);\n")
    stale = cli("template", "--check", cwd=project.root)
    assert stale.returncode == 3 and "not built" in stale.stderr


def test_sql_error_names_file_and_exact_line_and_leaves_nothing(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/schema/20_broken/10_bad.sql",
                  "CREATE TABLE fine (id int);\n\nCREATE TABLE broken (\n  id int,\n"
                  "  x nosuchtype\n);\n")
    result = cli("template", cwd=project.root)
    assert result.returncode == 1
    assert "db/schema/20_broken/10_bad.sql:5" in result.stderr
    assert 'type "nosuchtype" does not exist' in result.stderr
    assert "Traceback" not in result.stderr
    assert templates_of(pg, project) == []  # neither the template nor its _tmp


def test_file_without_final_semicolon_or_newline(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/schema/20_x/1.sql", "CREATE TABLE no_semicolon (id int)")
    project.write("db/schema/20_x/2.sql", "CREATE TABLE after_it (id int);")
    assert cli("clone", project_name(project) + "_c", cwd=project.root).returncode == 0
    tables = {r[0] for r in pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                                     db=project_name(project) + "_c")}
    assert {"no_semicolon", "after_it"} <= tables


def test_search_path_emptied_by_one_file_does_not_break_the_next(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/schema/20_x/1.sql",
                  "SELECT pg_catalog.set_config('search_path', '', false);\n"
                  "CREATE TABLE public.qualified (id int);\n")
    project.write("db/schema/20_x/2.sql", "CREATE TABLE unqualified (id int);\n")
    result = cli("template", cwd=project.root)
    assert result.returncode == 0, result.stderr


def test_a_seed_that_no_longer_fits_the_ddl_says_so(pg: Cluster, project: Project,
                                                    cli: CliRunner) -> None:
    """A column renamed in the DDL and not in a COPY seed (pagila's customer.email): the
    build names the seed's file and line and says the seed needs updating; no template is
    left behind. A failing schema file gets no such hint."""
    project.write("db/schema/10_tables/50_items.sql",
                  "CREATE TABLE items (id int PRIMARY KEY, title text NOT NULL);\n")
    project.write("db/seeds/dev/10_items.sql",
                  "COPY items (id, label) FROM stdin;\n1\tone\n\\.\n")
    result = cli("reset", cwd=project.root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'db/seeds/dev/10_items.sql:1: column "label" of relation "items" does not exist' \
        in result.stderr
    assert "a seed file of env local no longer fits the schema the DDL builds" in result.stderr
    assert "Traceback" not in result.stderr
    assert templates_of(pg, project) == []
    project.write("db/schema/10_tables/60_broken.sql", "CREATE TABLE broken (id int,, x int);\n")
    broken = cli("reset", cwd=project.root)
    assert broken.returncode == 1 and "60_broken.sql:1" in broken.stderr
    assert "seed file" not in broken.stderr


def test_clone_copies_schema_and_seeds(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/schema/10_tables/50_items.sql",
                  "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL);\n")
    project.write("db/seeds/common/10_items.sql",
                  "COPY items (id, label) FROM stdin;\n1\tone\n2\ttwo\n\\.\n")
    project.write("db/seeds/dev/10_items.sql", "INSERT INTO items VALUES (3, 'dev only');\n")
    target = project_name(project) + "_clone"
    result = cli("clone", target, cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert pg.query("SELECT id, label FROM items ORDER BY id", db=target) == [
        (1, "one"), (2, "two"), (3, "dev only")]
    again = cli("clone", target, cwd=project.root)
    assert again.returncode == 4 and "already exists" in again.stderr
    assert cli("clone", target, "--replace", cwd=project.root).returncode == 0


def test_hostile_database_names_are_quoted(pg: Cluster, project: Project, cli: CliRunner) -> None:
    hostile = project_name(project) + "\"; DROP DATABASE postgres; --'"
    result = cli("clone", hostile, cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert pg.db_exists(hostile) and pg.db_exists("postgres")
    too_long = project_name(project) + "x" * 60
    refused = cli("clone", too_long, cwd=project.root)
    assert refused.returncode == 2 and "longer than 63 bytes" in refused.stderr
    for system in ("postgres", "template1"):
        assert cli("clone", system, "--replace", cwd=project.root).returncode == 4


def test_reset_recreates_and_respects_other_sessions(pg: Cluster, project: Project, cli: CliRunner) -> None:
    database = project_name(project) + "_local"
    assert cli("reset", cwd=project.root).returncode == 0
    with pg.connect(database) as conn:
        conn.execute("CREATE TABLE scratch (id int)")
        busy = cli("reset", cwd=project.root)
        assert busy.returncode == 4 and "other session" in busy.stderr and "--force" in busy.stderr
        assert pg.scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'", db=database) == 1
    assert cli("reset", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'", db=database) == 0


def test_reset_force_terminates_other_sessions(pg: Cluster, project: Project, cli: CliRunner) -> None:
    database = project_name(project) + "_local"
    assert cli("reset", cwd=project.root).returncode == 0
    conn = pg.connect(database)
    try:
        result = cli("reset", "--force", cwd=project.root)
        assert result.returncode == 0, result.stderr
    finally:
        try:
            conn.close()
        except Exception:
            pass


def test_reset_and_clone_refused_on_protected_env(pg: Cluster, project: Project, cli: CliRunner) -> None:
    result = cli("--env", "prod", "reset", cwd=project.root)
    assert result.returncode == 4 and "protected" in result.stderr
    assert not pg.db_exists(project_name(project) + "_prod")
    over = cli("clone", project_name(project) + "_prod", "--replace", cwd=project.root)
    assert over.returncode == 4 and "protected environment 'prod'" in over.stderr


def test_dead_server_is_a_clear_error(project: Project, cli: CliRunner, tmp_path: Path) -> None:
    text = project.config_path.read_text()
    import re
    text = re.sub(r'(\[env\.local\]\nurl = )"[^"]*"', r'\1"postgresql:///nowhere?host=%s&port=1"' % tmp_path, text)
    project.config_path.write_text(text)
    result = cli("reset", cwd=project.root)
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr


def test_concurrent_resets_build_once_and_both_succeed(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/seeds/dev/90_slow.sql", "SELECT pg_sleep(0.5);\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    env.update(pg.env, NO_COLOR="1")
    procs = [subprocess.Popen(confiture_argv("reset"),
                              cwd=project.root, env=confiture_environ(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    builds = sum(err.count("building template") for _, err in outs)
    assert builds == 1, outs
    assert pg.db_exists(project_name(project) + "_local")
    assert len(templates_of(pg, project)) == 1


def test_killed_build_leaves_no_template_and_next_run_recovers(pg: Cluster, project: Project) -> None:
    project.write("db/seeds/dev/90_slow.sql", "SELECT pg_sleep(30);\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    env.update(pg.env)
    proc = subprocess.Popen(confiture_argv("template"),
                            cwd=project.root, env=confiture_environ(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(n.endswith("_tmp") for n, _, _ in templates_of(pg, project)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not [n for n, is_tpl, _ in templates_of(pg, project) if is_tpl]
    project.write("db/seeds/dev/90_slow.sql", "SELECT 1;\n")
    env.update(NO_COLOR="1")
    done = subprocess.run(confiture_argv("template"),
                          cwd=project.root, env=confiture_environ(env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = [n for n, _, _ in templates_of(pg, project)]
    assert len(names) == 1 and not names[0].endswith("_tmp")


def test_templates_list_and_prune(pg: Cluster, project: Project, cli: CliRunner) -> None:
    for i in range(3):
        project.write("db/schema/10_tables/99_v.sql", f"CREATE TABLE v{i} (id int);\n")
        assert cli("template", cwd=project.root).returncode == 0
    listing = cli("templates", "--json", cwd=project.root)
    infos = json.loads(listing.stdout)
    assert len(infos) == 3 and all(i["env"] == "local" for i in infos)
    newest = infos[0]["name"]
    pruned = cli("templates", "prune", "--keep", "1", cwd=project.root)
    assert pruned.returncode == 0, pruned.stderr
    assert [n for n, _, _ in templates_of(pg, project)] == [newest]


def current_template(project: Project) -> str:
    config = confiture.load_config(project.config_path)
    return confiture.template_name(config.project, "local", confiture.scan_env(config, "local").hash)


def test_prune_keeps_the_current_template_whatever_the_clock_says(pg: Cluster, project: Project,
                                                                  cli: CliRunner) -> None:
    """Issue 11.5: builds within one second (same built_at) are ordered by their publishing
    transaction, and a template that matches the env's files is never pruned."""
    project.write("db/schema/10_tables/99_v.sql", "CREATE TABLE v (id int);\n")
    first = current_template(project)
    for i in range(100):  # a second build whose name sorts before the first one's
        project.write("db/schema/10_tables/99_v.sql", f"CREATE TABLE v{i} (id int);\n")
        if current_template(project) < first:
            break
    second = current_template(project)
    assert second < first
    project.write("db/schema/10_tables/99_v.sql", "CREATE TABLE v (id int);\n")
    assert cli("template", cwd=project.root).stdout.strip() == first
    project.write("db/schema/10_tables/99_v.sql", f"CREATE TABLE v{i} (id int);\n")
    assert cli("template", cwd=project.root).stdout.strip() == second
    same_second = "2026-01-01T00:00:00Z"
    for name in (first, second):
        meta = json.loads(pg.scalar("SELECT shobj_description(oid, 'pg_database') FROM "
                                    "pg_database WHERE datname = %s", params=(name,)))
        pg.query(f"COMMENT ON DATABASE {name} IS "
                 f"'{json.dumps({**meta, 'built_at': same_second})}'")
    listing = json.loads(cli("templates", "--json", cwd=project.root).stdout)
    assert [t["name"] for t in listing] == [second, first]
    pruned = cli("templates", "prune", "--keep", "1", cwd=project.root)
    assert pruned.returncode == 0, pruned.stderr
    assert [n for n, _, _ in templates_of(pg, project)] == [second]
    # a newer build for other files does not push out the template of the files as they are
    project.write("db/schema/10_tables/99_v.sql", "CREATE TABLE other (id int);\n")
    newer = cli("template", cwd=project.root).stdout.strip()
    project.write("db/schema/10_tables/99_v.sql", f"CREATE TABLE v{i} (id int);\n")
    assert cli("templates", "prune", "--keep", "1", cwd=project.root).returncode == 0
    assert [n for n, _, _ in templates_of(pg, project)] == [second], newer


def test_keep_setting_prunes_after_build(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.config_path.write_text(project.config_path.read_text() + "\n[templates]\nkeep = 1\n")
    for i in range(2):
        project.write("db/schema/10_tables/99_v.sql", f"CREATE TABLE w{i} (id int);\n")
        assert cli("template", cwd=project.root).returncode == 0
    assert len(templates_of(pg, project)) == 1


@pytest.mark.skipif(not (CORPORA / "pagila").is_dir(), reason="shared/corpora/pagila not present")
def test_pagila_builds_into_a_template_and_clones(pg: Cluster, project: Project, cli: CliRunner) -> None:
    schema = project.root / "db" / "schema"
    for path in schema.rglob("*.sql"):
        path.unlink()
    (schema / "10_pagila").mkdir(parents=True, exist_ok=True)
    os.symlink(CORPORA / "pagila" / "pagila-schema.sql", schema / "10_pagila" / "10_schema.sql")
    seeds = project.root / "db" / "seeds" / "dev"
    for path in seeds.rglob("*.sql"):
        path.unlink()
    os.symlink(CORPORA / "pagila" / "pagila-data.sql", seeds / "10_data.sql")
    target = project_name(project) + "_pagila"
    result = cli("clone", target, cwd=project.root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert pg.scalar("SELECT count(*) FROM public.actor", db=target) == 200
    assert pg.scalar("SELECT count(*) FROM public.film", db=target) == 1000
    assert pg.scalar("SELECT count(*) FROM public.payment", db=target) > 10000
    assert pg.scalar("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent "
                     "WHERE c.relname = 'payment'", db=target) == 7


def test_library_use_many_clones_over_one_session(pg: Cluster, project: Project) -> None:
    """The pgtestdb-style path: a test suite imports confiture and clones per test."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    environ.update(pg.env)
    ws = confiture.workspace_for(project.config_path, env="local", environ=environ)
    names = [f"{project_name(project)}_t{i}" for i in range(3)]
    with confiture.admin_session(ws) as session:
        results = [confiture.clone_database(ws, name, session=session)[0] for name in names]
        again = confiture.clone_database(ws, names[0], replace=True, session=session)[0]
    assert [r.built for r in results] == [True, False, False] and not again.built
    assert all(pg.db_exists(name) for name in names)
    assert pg.scalar("SELECT count(*) FROM widgets", db=names[2]) is not None
    with pytest.raises(confiture.Refused):
        confiture.clone_database(ws, names[1])


def test_library_build_records_migrations_as_the_cli_does(pg: Cluster, project: Project) -> None:
    """A caller of ensure_template through open_workspace (no CLI wiring) gets the template's
    migration records too: a clone of it has them, how='build'."""
    project.write("db/migrations/20150100000001000000_networks.up.sql", "SELECT 1;\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    environ.update(pg.env)
    config = confiture.load_config(project.config_path)
    env = confiture.resolve_env(config, "local", environ)
    ws = confiture.open_workspace(env, confiture.Console(quiet=True), environ)
    target = f"{project_name(project)}_lib"
    assert confiture.clone_database(ws, target)[0].built
    assert pg.query("SELECT version, name, how FROM confiture_migrations", db=target) == [
        (20150100000001000000, "networks", "build")]


def test_database_built_from_ddl_has_every_migration_recorded(pg: Cluster, project: Project, cli: CliRunner) -> None:
    """The DDL is where the migrations lead: reset records them (how='build'), so a new
    migration can be applied to a dev database without losing its data."""
    project.write("db/migrations/20240101000000_widgets_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL, note text);\n")
    assert cli("reset", cwd=project.root).returncode == 0
    db = project.db("local")
    assert pg.query("SELECT version, how FROM confiture_migrations", db=db) == [(20240101000000, "build")]
    status = cli("migrate", "status", "--check", cwd=project.root)
    assert status.returncode == 0, status.stdout + status.stderr
    # a teammate's new migration: only it is pending, and up applies just that
    project.write("db/migrations/20240201000000_gadgets.up.sql", "CREATE TABLE gadgets (id int);\n")
    up = cli("migrate", "up", cwd=project.root)
    assert up.returncode == 0, up.stderr
    assert pg.scalar("SELECT count(*) FROM confiture_migrations", db=db) == 2
    # and the template hash follows the migrations folder
    assert cli("template", "--check", cwd=project.root).returncode == 3
