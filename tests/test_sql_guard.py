"""SQL files cannot reach the machine that runs the tool (SPEC §5, issue 11.7): psql
meta-commands that run shell commands, write client-side files, read files outside the
project or connect elsewhere are refused before anything runs, in every path that runs
project files (build/reset with schema and seeds, migrate up in both transaction modes,
migrate down, deploy's verify checks); what real files need keeps working; a project may
opt in. The CLI runs as a subprocess; psycopg and the file system are the oracles."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CliRunner, Cluster, Project

import confiture


def guard_of(root: Path) -> confiture.SqlGuard:
    return confiture.SqlGuard(roots=(root.resolve(),), cwd=root.resolve())


@pytest.mark.parametrize("text, refused", [
    ("\\! touch /tmp/x\n", "\\! runs a shell command"),
    ("\\o /tmp/x\nselect 2;\n", "\\o sends"),
    ("\\out |cat\n", "\\out sends"),
    ("select 1 \\g /tmp/x\n", "\\g sends"),
    ("select 1 \\gx |sh\n", "\\gx sends"),
    ("select 1 \\w /tmp/x\n", "\\w writes"),
    ("\\copy t to '/tmp/x'\n", "\\copy writes"),
    ("\\copy (select 1) to stdout\n", "\\copy writes"),
    ("\\copy t from program 'id'\n", "\\copy runs a command"),
    ("\\COPY t FROM '/etc/passwd'\n", "outside the project"),
    ("\\setenv PAGER 'sh -c id'\n", "\\setenv changes"),
    ("\\getenv pw PGPASSWORD\n", "\\getenv reads"),
    ("\\cd /tmp\n", "\\cd changes"),
    ("\\i /etc/passwd\n", "outside the project"),
    ("\\ir ../../outside.sql\n", "outside the project"),
    ("\\i :file\n", "through a psql variable"),
    ("\\i '\\x2fetc\\x2fpasswd'\n", "backslash escapes"),
    ("\\set x `id`\n", "backquotes"),
    ("\\set cmd '\\\\! id'\nselect 1 :cmd;\n", "stores a backslash command"),
    ("\\echo fine \\! id\n", "\\! runs"),
    ("\\connect postgres host=elsewhere\n", "\\connect connects elsewhere"),
    ("select '\\! id' as x \\gset\n", "\\gset turns server data"),
    ("\\lo_export 1 '/tmp/x'\n", "\\lo_export writes"),
    ("\\prompt x\n-- line read as input\nselect :x;\n", "\\prompt reads"),
])
def test_dangerous_meta_commands_are_refused_with_file_and_line(tmp_path: Path, text: str,
                                                                refused: str) -> None:
    path = tmp_path / "db" / "schema" / "x.sql"
    with pytest.raises(confiture.Refused) as info:
        confiture.guard_sql(confiture.split_sql("-- first line\n" + text), path,
                            "db/schema/x.sql", guard_of(tmp_path))
    assert info.value.message.startswith("db/schema/x.sql:2: "), info.value.message
    assert refused in info.value.message
    assert info.value.exit_code == 4 and "psql_meta_commands" in (info.value.hint or "")


@pytest.mark.parametrize("text", [
    "\\set x 1\nselect :x, :'x', :\"x\";\n",
    "\\if :{?x}\n\\echo no\n\\else\nselect 1;\n\\endif\n",
    "select 1 \\g\nselect 2 \\gx (format=csv)\n",
    "copy t from stdin;\n\\! not a command: COPY data\n\\.\n",
    "select '\\! quoted', $$ \\o x $$, E'\\\\! esc';\n/* \\! comment */ -- \\! comment\n",
    "\\copy t from 'data.csv' with (format csv)\n\\copy t (a, b) FROM stdin\n",
    "\\ir inc.sql\n\\i db/schema/inc.sql\n",
    "\\restrict abc\n\\unrestrict abc\n\\pset format unaligned\n\\timing on\n",
])
def test_what_real_files_need_is_allowed(tmp_path: Path, text: str) -> None:
    (tmp_path / "db" / "schema").mkdir(parents=True)
    (tmp_path / "db" / "schema" / "inc.sql").write_text("select 1;\n")
    confiture.guard_sql(confiture.split_sql(text), tmp_path / "db" / "schema" / "x.sql",
                        "db/schema/x.sql", guard_of(tmp_path))


def test_included_files_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "inner.sql").write_text("select 1;\n\\! id\n")
    (tmp_path / "db" / "loop.sql").write_text("\\ir loop.sql\n")
    guard = guard_of(tmp_path)
    with pytest.raises(confiture.Refused, match=r"db/inner.sql \(included by db/x.sql:1\)"):
        confiture.guard_sql(confiture.split_sql("\\ir inner.sql\n"), tmp_path / "db" / "x.sql",
                            "db/x.sql", guard)
    confiture.guard_sql(confiture.split_sql("\\ir loop.sql\n"), tmp_path / "db" / "x.sql",
                        "db/x.sql", guard)  # a loop ends (psql would stop it too)


# ── every path that runs project files ───────────────────────────────────────────────────


def _marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def _tables(pg: Cluster, db: str) -> list[str]:
    if not pg.db_exists(db):
        return []
    return [r[0] for r in pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                   "ORDER BY 1", db=db)]


def test_schema_and_seed_files_are_refused_before_the_build(pg: Cluster, project: Project, cli: CliRunner,
                                                            tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    project.write("db/schema/20_evil.sql", f"CREATE TABLE evil (id int);\n\\! touch {marker}\n")
    result = cli("reset", cwd=project.root)
    assert result.returncode == 4, result.stderr
    assert "schema/20_evil.sql:2: \\! runs a shell command" in result.stderr
    assert not marker.exists() and not pg.db_exists(project.db())
    assert not pg.query("SELECT 1 FROM pg_database WHERE starts_with(datname, %s)",
                        params=(project.name + "_tpl_",))
    assert cli("build", cwd=project.root).returncode == 4  # nor written out for psql -f
    project.write("db/schema/20_evil.sql", "CREATE TABLE fine (id int);\n")
    project.write("db/seeds/dev/10_rows.sql", f"\\o {marker}\nSELECT 1;\n")
    result = cli("reset", cwd=project.root)
    assert result.returncode == 4 and "seeds/dev/10_rows.sql:1: \\o" in result.stderr
    assert not marker.exists() and not pg.db_exists(project.db())


def test_seeds_may_copy_a_project_file_and_use_variables(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/seeds/dev/data/widgets.csv", "1,one\n2,two\n")
    project.write("db/seeds/dev/10_rows.sql",
                  "\\set label '''three'''\n"
                  "\\copy widgets FROM 'db/seeds/dev/data/widgets.csv' WITH (FORMAT csv)\n"
                  "INSERT INTO widgets VALUES (3, :label);\n")
    result = cli("reset", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert pg.query("SELECT id, label FROM widgets ORDER BY id", db=project.db()) == \
        [(1, "one"), (2, "two"), (3, "three")]


@pytest.mark.parametrize("no_transaction", [False, True])
def test_migrations_are_refused_before_anything_runs(pg: Cluster, project: Project, cli: CliRunner,
                                                     tmp_path: Path, no_transaction: bool) -> None:
    marker = _marker(tmp_path)
    head = "-- confiture:no-transaction\n" if no_transaction else ""
    assert cli("reset", cwd=project.root).returncode == 0
    project.write("db/migrations/1_fine.up.sql", "CREATE TABLE fine (id int);\n")
    project.write("db/migrations/2_evil.up.sql",
                  f"{head}CREATE TABLE evil (id int);\nSELECT 1 \\g {marker}\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 4, result.stderr
    assert f"migrations/2_evil.up.sql:{2 + bool(head)}: \\g sends" in result.stderr
    assert not marker.exists()
    tables = _tables(pg, project.db())  # not even the first migration ran
    assert "fine" not in tables and "evil" not in tables, tables


def test_down_migrations_are_refused_before_anything_runs(pg: Cluster, project: Project, cli: CliRunner,
                                                          tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    assert cli("reset", cwd=project.root).returncode == 0
    project.write("db/migrations/1_t.up.sql", "CREATE TABLE t (id int);\n")
    project.write("db/migrations/1_t.down.sql", f"DROP TABLE t;\n\\! rm -f {marker}\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    marker.write_text("still here\n")
    result = cli("migrate", "down", "--steps", "1", cwd=project.root)
    assert result.returncode == 4, result.stderr
    assert "migrations/1_t.down.sql:2: \\! runs" in result.stderr
    assert marker.exists() and "t" in _tables(pg, project.db())


def test_every_down_of_a_run_is_checked_before_the_first_runs(pg: Cluster, project: Project,
                                                               cli: CliRunner,
                                                               tmp_path: Path) -> None:
    """The guard is built once per run and applied to every file: a refused down behind a
    harmless one stops the run before either runs; an \\ir of a project file is allowed."""
    marker = _marker(tmp_path)
    assert cli("reset", cwd=project.root).returncode == 0
    project.write("db/migrations/shared/drop_t.sql", "DROP TABLE t;\n")
    for version, name in ((1, "t"), (2, "u")):
        project.write(f"db/migrations/{version}_{name}.up.sql", f"CREATE TABLE {name} (id int);\n")
    project.write("db/migrations/1_t.down.sql", f"DROP TABLE IF EXISTS u;\n\\! rm -f {marker}\n")
    project.write("db/migrations/2_u.down.sql", "\\ir shared/drop_t.sql\nDROP TABLE u;\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    marker.write_text("still here\n")
    result = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert result.returncode == 4, result.stderr
    assert "migrations/1_t.down.sql:2: \\! runs" in result.stderr
    assert marker.exists() and {"t", "u"} <= set(_tables(pg, project.db()))
    project.write("db/migrations/1_t.down.sql", "DROP TABLE IF EXISTS t;\n")
    result = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert not {"t", "u"} & set(_tables(pg, project.db()))


def test_deploy_verify_checks_are_refused_before_anything_runs(pg: Cluster, project: Project, cli: CliRunner,
                                                               tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    project.write("db/migrations/1_t.up.sql", "CREATE TABLE t (id int);\n")
    project.write("db/verify/10_ok.sql", f"SELECT true;\n\\! touch {marker}\n")
    result = cli("deploy", cwd=project.root)
    assert result.returncode == 4, result.stderr
    assert "verify/10_ok.sql:2: \\! runs" in result.stderr
    assert not marker.exists() and "t" not in _tables(pg, project.db())


def test_a_project_may_opt_in(pg: Cluster, project: Project, cli: CliRunner, tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    project.write("db/seeds/dev/10_rows.sql", f"\\! touch {marker}\n")
    project.config_path.write_text(project.config_path.read_text().replace(
        "[project]\n", '[project]\npsql_meta_commands = "all"\n'))
    result = cli("reset", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    project.config_path.write_text(project.config_path.read_text().replace(
        'psql_meta_commands = "all"', 'psql_meta_commands = "yes"'))
    result = cli("config", "check", cwd=project.root)
    assert result.returncode == 2 and "project.psql_meta_commands" in result.stderr
