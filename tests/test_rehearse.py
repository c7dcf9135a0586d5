"""Rehearsal (deploy --rehearse, migrate up --rehearse): the pending migrations run on a scratch
copy with pg_locks sampled; the env is not changed and the scratch database is always dropped.
Checked with psycopg."""
from __future__ import annotations

import json

from helpers import CliRunner, Cluster, Project


def add_migration(project: Project, label: str, up: str) -> None:
    project.write(f"db/migrations/{label}.up.sql", up)
    project.write(f"db/migrations/{label}.down.sql", "SELECT 1;\n")


def databases(pg: Cluster, project: Project) -> set[str]:
    return {r[0] for r in pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                   params=(project.name,))}


def column_type(pg: Cluster, db: str) -> str:
    return str(pg.scalar("SELECT data_type FROM information_schema.columns WHERE table_name = "
                         "'widgets' AND column_name = 'id'", db=db))


def test_rehearsal_names_the_rewritten_table_and_its_lock(pg: Cluster, project: Project,
                                                          cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text)", db=db)
    pg.query("INSERT INTO widgets SELECT i, 'w' || i FROM generate_series(1, 20000) i", db=db)
    add_migration(project, "001_numeric", "CREATE TABLE side (id int);\n" + "\n" * 8 +
                                          "ALTER TABLE widgets ALTER COLUMN id TYPE numeric;\n")
    before = databases(pg, project)
    result = cli("migrate", "up", "--rehearse", "--json", cwd=project.root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] is None and report["source"] == f"a copy of {db}"
    create, alter = report["statements"]
    assert alter["file"] == "db/migrations/001_numeric.up.sql" and alter["line"] == 10
    assert alter["lock"] == "ACCESS EXCLUSIVE" and alter["relation"] == "widgets"
    assert alter["rewritten"] == [{"table": "widgets", "rows": 20000}]
    assert alter["ms"] > 0 and alter["held_ms"] >= alter["ms"]
    assert create["rewritten"] == []
    # the env is untouched and the scratch copy is gone
    assert column_type(pg, db) == "bigint"
    assert not pg.scalar("SELECT to_regclass('side') IS NOT NULL", db=db)
    assert databases(pg, project) == before
    text = cli("migrate", "up", "--rehearse", cwd=project.root)
    assert text.returncode == 0, text.stderr
    assert "ACCESS EXCLUSIVE on widgets, held" in text.stdout
    assert "rewrote widgets (~20 k rows)" in text.stdout
    # lines 1 and 10 of one file: their durations stand in one column
    rows = [line for line in text.stdout.splitlines() if line.startswith("  db/")]
    assert len(rows) == 2 and len({line.index(" ms ") if " ms " in line else line.index(" s ")
                                   for line in rows}) == 1, rows
    assert "indicative" in text.stderr


def test_rehearsal_of_a_failing_migration_reports_it_and_cleans_up(
        pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text)", db=db)
    add_migration(project, "001_bad", "ALTER TABLE widgets ADD COLUMN c int;\n"
                                      "ALTER TABLE nowhere ADD COLUMN c int;\n")
    before = databases(pg, project)
    result = cli("migrate", "up", "--rehearse", cwd=project.root)
    assert result.returncode == 1
    assert "001_bad" in result.stderr and "nowhere" in result.stderr
    # named as `migrate up` names it: the file and the line of the failing statement
    assert 'db/migrations/001_bad.up.sql:2: relation "nowhere" does not exist' in result.stderr
    assert databases(pg, project) == before
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'widgets' AND column_name = 'c'", db=db) == 0


def test_protected_rehearsal_uses_the_newest_verified_backup(pg: Cluster, project: Project,
                                                             cli: CliRunner) -> None:
    first = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert first.returncode == 0, first.stderr
    db = project.db("prod")
    for backup in (project.root / ".confiture/backups/prod").glob("*"):
        backup.unlink()
    add_migration(project, "001_color", "ALTER TABLE widgets ADD COLUMN color text "
                                        "DEFAULT 'red';\n")
    refused = cli("deploy", "--env", "prod", "--rehearse", cwd=project.root)
    assert refused.returncode == 4 and "no backup to rehearse on" in refused.stderr
    # the hint names the command to paste, its --env once
    assert "take one with 'confiture.py backup --env prod'" in refused.stderr
    assert cli("backup", "--env", "prod", cwd=project.root).returncode == 0
    before = databases(pg, project)
    result = cli("deploy", "--env", "prod", "--rehearse", "--json", cwd=project.root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"].endswith(".dump") and "/backups/prod/" in report["source"]
    [alter] = report["statements"]
    assert alter["lock"] == "ACCESS EXCLUSIVE" and alter["relation"] == "widgets"
    assert databases(pg, project) == before
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'widgets' AND column_name = 'color'", db=db) == 0


def test_rehearsal_of_a_no_transaction_migration(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text)", db=db)
    add_migration(project, "001_idx", "-- confiture:no-transaction\n"
                                      "CREATE INDEX CONCURRENTLY widgets_label ON widgets (label);\n"
                                      "VACUUM FULL widgets;\n")
    before = databases(pg, project)
    result = cli("migrate", "up", "--rehearse", "--json", cwd=project.root)
    assert result.returncode == 0, result.stderr
    index, vacuum = json.loads(result.stdout)["statements"]
    assert index["line"] == 2 and vacuum["line"] == 3
    assert vacuum["rewritten"] == [{"table": "widgets", "rows": 0}]
    assert databases(pg, project) == before
    assert not pg.scalar("SELECT to_regclass('widgets_label') IS NOT NULL", db=db)


def test_protected_rehearsal_runs_on_the_scratch_server(pg: Cluster, pg_remote: Cluster,
                                                        project: Project, cli: CliRunner) -> None:
    # prod lives on the `remote` cluster; the scratch server is default env local's (`pg`)
    config = project.config_path.read_text()
    project.config_path.write_text(config.replace(pg.url(project.db("prod")),
                                                  pg_remote.url(project.db("prod"))))
    try:
        first = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
        assert first.returncode == 0, first.stderr
        add_migration(project, "001_color", "ALTER TABLE widgets ADD COLUMN color text;\n")
        assert cli("backup", "--env", "prod", cwd=project.root).returncode == 0
        on_prod, on_scratch = databases(pg_remote, project), databases(pg, project)
        result = cli("deploy", "--env", "prod", "--rehearse", "--json", cwd=project.root)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["server"] != pg_remote.url() and "remote" not in report["server"], report
        assert report["statements"][0]["lock"] == "ACCESS EXCLUSIVE"
        assert databases(pg_remote, project) == on_prod
        assert databases(pg, project) == on_scratch
        assert pg_remote.scalar("SELECT count(*) FROM information_schema.columns WHERE "
                                "table_name = 'widgets' AND column_name = 'color'",
                                db=project.db("prod")) == 0
    finally:
        pg_remote.drop_dbs_with_prefix(project.name)


def test_rehearsal_refuses_meta_commands_before_copying(pg: Cluster, project: Project,
                                                       cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    add_migration(project, "001_shell", "\\! touch pwned\nSELECT 1;\n")
    before = databases(pg, project)
    result = cli("migrate", "up", "--rehearse", cwd=project.root)
    assert result.returncode == 4, result.stderr  # refused by the guard, as for `up`
    assert "001_shell.up.sql:1" in result.stderr
    assert not (project.root / "pwned").exists()
    assert databases(pg, project) == before


def test_rehearsal_on_another_server_without_the_envs_roles(pg: Cluster, pg_remote: Cluster,
                                                            project: Project,
                                                            cli: CliRunner) -> None:
    """prod (on `remote`) has its tables owned by and granted to roles the scratch server
    (`pg`) does not have: the copy is restored without owners and grants, the rehearsal
    measures the migration, and no role is created on the scratch server."""
    owner, reader = f"{project.name}_owner", f"{project.name}_reader"
    config = project.config_path.read_text()
    project.config_path.write_text(config.replace(pg.url(project.db("prod")),
                                                  pg_remote.url(project.db("prod"))))
    db = project.db("prod")
    try:
        first = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
        assert first.returncode == 0, first.stderr
        pg_remote.query(f'CREATE ROLE "{owner}" NOLOGIN; CREATE ROLE "{reader}" NOLOGIN')
        pg_remote.query(f'ALTER TABLE widgets OWNER TO "{owner}"; '
                        f'GRANT SELECT ON widgets TO "{reader}"', db=db)
        assert cli("backup", "--env", "prod", cwd=project.root).returncode == 0
        add_migration(project, "001_color", "ALTER TABLE widgets ADD COLUMN color text "
                                            "DEFAULT 'red';\n")
        roles_before = pg.scalar("SELECT count(*) FROM pg_roles")
        on_scratch = databases(pg, project)
        result = cli("deploy", "--env", "prod", "--rehearse", "--json", cwd=project.root)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["failed"] is None
        [alter] = report["statements"]
        assert alter["lock"] == "ACCESS EXCLUSIVE" and alter["relation"] == "widgets"
        assert not pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname IN (%s, %s)",
                             params=(owner, reader))
        assert pg.scalar("SELECT count(*) FROM pg_roles") == roles_before
        assert databases(pg, project) == on_scratch
        # prod keeps its owner, its grant and its columns
        assert pg_remote.scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'widgets'",
                                db=db) == owner
        assert pg_remote.scalar("SELECT has_table_privilege(%s, 'widgets', 'SELECT')",
                                db=db, params=(reader,))
        assert pg_remote.scalar("SELECT count(*) FROM information_schema.columns WHERE "
                                "table_name = 'widgets' AND column_name = 'color'", db=db) == 0
    finally:
        pg_remote.drop_dbs_with_prefix(project.name)
        pg_remote.query(f'DROP ROLE IF EXISTS "{owner}"; DROP ROLE IF EXISTS "{reader}"')
