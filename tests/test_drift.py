"""Schema drift (diff): `diff` against a real server with every object kind, owners and grants
(--privileges), tracking tables, another env, failures, and pagila.
psycopg makes the changes and checks the outcomes; confiture only reports."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CliRunner,
    Cluster,
    Project,
    clean_environ,
    confiture_argv,
    confiture_environ,
)
from psycopg import sql

import confiture

ROOT = Path(__file__).resolve().parent.parent
CORPORA = next((p for p in (ROOT.parent / "shared" / "corpora",
                            ROOT.parent.parent / "shared" / "corpora") if p.is_dir()),
               ROOT.parent / "shared" / "corpora")

# ── pure ─────────────────────────────────────────────────────────────────────────────────────


def test_tracking_tables_follow_the_configured_table(tmp_path: Path) -> None:
    (tmp_path / "confiture.toml").write_text('[project]\nname = "t"\n[migrations]\ntable = \'"Ops".Log\'\n')
    config = confiture.load_config(tmp_path / "confiture.toml")
    assert confiture.tracking_tables(config) == {
        ("Ops", "log"), ("Ops", "log_log"), ("Ops", "confiture_deploys"),
        ("public", "confiture_deploys")}


# ── against a server ────────────────────────────────────────────────────────────────────────

SCHEMA = {
    "db/schema/00_ext/10_ext.sql": "CREATE EXTENSION IF NOT EXISTS pgcrypto;\n",
    "db/schema/05_types/10_mood.sql": "CREATE TYPE mood AS ENUM ('happy', 'sad');\n",
    "db/schema/05_types/20_seq.sql": "CREATE SEQUENCE ticket_seq;\n",
    "db/schema/10_tables/20_people.sql": """\
CREATE TABLE people (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    widget_id bigint REFERENCES widgets (id),
    name text NOT NULL DEFAULT 'anon',
    mood mood,
    updated_at timestamptz
);
CREATE INDEX people_name_idx ON people (name);
ALTER TABLE people ENABLE ROW LEVEL SECURITY;
CREATE POLICY people_all ON people USING (true);
""",
    "db/schema/20_functions/10_touch.sql": """\
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();  -- keep the row's time current
    RETURN NEW;
END $$;
CREATE TRIGGER people_touch BEFORE UPDATE ON people FOR EACH ROW EXECUTE FUNCTION touch();
""",
    "db/schema/30_views/10_names.sql": "CREATE VIEW people_names AS SELECT id, name FROM people;\n",
}

# (SQL run on the live database, expected change, expected object label, expected summary)
DRIFTS = {
    "added column": ("ALTER TABLE people ADD COLUMN email text",
                     "changed", "table public.people", "column email added (text)"),
    "changed default": ("ALTER TABLE people ALTER COLUMN name SET DEFAULT 'nobody'",
                        "changed", "table public.people",
                        "column name: default 'anon'::text → 'nobody'::text"),
    "dropped index": ("DROP INDEX people_name_idx", "missing", "index public.people_name_idx", None),
    "changed function body": (
        "CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$",
        "changed", "function public.touch()", None),
    "new policy": ("CREATE POLICY people_none ON people USING (false)",
                   "added", "policy people_none on public.people", None),
    "dropped trigger": ("DROP TRIGGER people_touch ON people",
                        "missing", "trigger people_touch on public.people", None),
    "changed view": ("CREATE OR REPLACE VIEW people_names AS SELECT id, name, upper(name) AS up "
                     "FROM people", "changed", "view public.people_names", None),
    "changed type": ("ALTER TYPE mood ADD VALUE 'meh'", "changed", "type public.mood", None),
    "changed sequence": ("ALTER SEQUENCE ticket_seq INCREMENT BY 5",
                         "changed", "sequence public.ticket_seq", None),
    "new extension": ("CREATE EXTENSION IF NOT EXISTS pg_trgm", "added", "extension pg_trgm",
                      "with its comment"),
    "new constraint": ("ALTER TABLE widgets ADD CONSTRAINT widgets_label_key UNIQUE (label)",
                       "added", "constraint widgets_label_key on public.widgets", None),
    "dropped foreign key": ("ALTER TABLE people DROP CONSTRAINT people_widget_id_fkey",
                            "missing", "fk constraint people_widget_id_fkey on public.people", None),
    "new check constraint": ("ALTER TABLE widgets ADD CONSTRAINT label_set CHECK (label <> '')",
                             "changed", "table public.widgets", "constraint label_set added"),
    "new collation": ('CREATE COLLATION bytewise FROM "C"', "added", "collation public.bytewise",
                      None),
    "new text search configuration": ("CREATE TEXT SEARCH CONFIGURATION simple_en (COPY = english)",
                                      "added", "text search configuration public.simple_en", None),
    "changed column type": ("ALTER TABLE widgets ALTER COLUMN label TYPE varchar(200)", "changed",
                            "table public.widgets",
                            "column label: type text → character varying(200)"),
}


def write_schema(project: Project) -> None:
    for rel, text in SCHEMA.items():
        project.write(rel, text)


def diff_json(cli: CliRunner, project: Project, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("diff", "--json", *args, cwd=project.root)
    assert "Traceback" not in result.stderr
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def rich_project(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """One project with every object kind for all the drift cases: its template (and the
    cached dump of it) is built once; each case resets the database from it."""
    from helpers import make_project

    proj = make_project(tmp_path_factory.mktemp("rich") / "proj", pg)
    write_schema(proj)
    yield proj
    pg.drop_dbs_with_prefix(proj.name)


@pytest.mark.parametrize("kind", list(DRIFTS))
def test_drift_of_each_object_kind_is_reported(pg: Cluster, rich_project: Project, cli: CliRunner,
                                               kind: str) -> None:
    project = rich_project
    assert cli("reset", "--force", cwd=project.root).returncode == 0
    sql, change, label, summary = DRIFTS[kind]
    pg.query(sql, db=project.db("local"))
    code, report = diff_json(cli, project)
    assert code == 3
    found = [(d["change"], d["object"]) for d in report["differences"]]
    assert found == [(change, label)], found
    if summary:
        assert summary in report["differences"][0]["summary"]
    if change == "changed":
        assert report["differences"][0]["diff"].startswith("--- ddl")


def test_identical_database_has_no_drift_and_output_is_stable(pg: Cluster, project: Project, cli: CliRunner) -> None:
    write_schema(project)
    assert cli("reset", cwd=project.root).returncode == 0
    first = cli("diff", cwd=project.root)
    assert first.returncode == 0, first.stderr
    assert "no differences" in first.stdout
    pg.query("ALTER TABLE people ADD COLUMN a int; DROP INDEX people_name_idx; "
             "CREATE TABLE extra (id int)", db=project.db("local"))
    runs = [cli("diff", cwd=project.root) for _ in range(2)]
    assert [r.returncode for r in runs] == [3, 3]
    assert runs[0].stdout == runs[1].stdout
    assert "+ table public.extra  (not in the DDL)" in runs[0].stdout
    assert "- index public.people_name_idx  (only in the DDL)" in runs[0].stdout
    assert "3 difference(s): 1 added, 1 missing, 1 changed" in runs[0].stdout


def test_privileges_and_owners_only_with_the_flag(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    role = project.name + "_reader"
    pg.query(f"CREATE ROLE {role}")
    try:
        pg.query(f"ALTER TABLE widgets OWNER TO {role}; GRANT SELECT ON widgets TO PUBLIC",
                 db=project.db("local"))
        assert cli("diff", cwd=project.root).returncode == 0
        code, report = diff_json(cli, project, "--privileges")
        assert code == 3
        objects = {d["object"] for d in report["differences"]}
        assert objects == {"table public.widgets", "acl on table public.widgets"}
        assert any(f"OWNER TO {role}" in d["diff"] for d in report["differences"])
    finally:
        pg.drop_db(project.db("local"))
        pg.query(f"DROP ROLE {role}")


def test_confiture_tracking_tables_are_not_drift(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    pg.query("CREATE TABLE confiture_migrations (id serial PRIMARY KEY, version bigint UNIQUE, "
             "checksum text); CREATE INDEX ON confiture_migrations (checksum); "
             "CREATE TABLE confiture_deploys (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz)",
             db=project.db("local"))
    result = cli("diff", cwd=project.root)
    assert result.returncode == 0, result.stdout


def test_schema_qualified_tracking_table_and_its_schema_are_ignored(pg: Cluster, project: Project, cli: CliRunner) -> None:
    text = project.config_path.read_text()
    project.config_path.write_text(text + '\n[migrations]\ntable = "ops.schema_log"\n')
    assert cli("reset", cwd=project.root).returncode == 0
    pg.query("CREATE SCHEMA ops; CREATE TABLE ops.schema_log (id serial PRIMARY KEY)",
             db=project.db("local"))
    assert cli("diff", cwd=project.root).returncode == 0


def test_against_another_env(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    template = pg.scalar("SELECT datname FROM pg_database WHERE datistemplate AND "
                         "starts_with(datname, %s)", params=(project.name + "_tpl_local_",))
    pg.create_db(project.db("prod"), template=template)
    assert cli("diff", "--against", "prod", cwd=project.root).returncode == 0
    pg.query("CREATE INDEX widgets_label ON widgets (label)", db=project.db("prod"))
    code, report = diff_json(cli, project, "--against", "prod")
    assert code == 3
    assert [(d["change"], d["object"]) for d in report["differences"]] == \
        [("missing", "index public.widgets_label")]
    assert "env prod" in report["expected"]
    # and the other way round: prod's database compared with local's
    code, report = diff_json(cli, project, "--env", "prod", "--against", "local")
    assert [(d["change"], d["object"]) for d in report["differences"]] == \
        [("added", "index public.widgets_label")]
    assert cli("diff", "--against", "local", cwd=project.root).returncode == 2
    assert cli("diff", "--against", "nowhere", cwd=project.root).returncode == 2


def test_protected_env_is_compared_with_its_schema_only_template(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/seeds/dev/10_rows.sql", "INSERT INTO widgets VALUES (1, 'seeded');\n")
    pg.create_db(project.db("prod"))
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL)",
             db=project.db("prod"))
    result = cli("--env", "prod", "diff", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [r[0] for r in pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                    params=(project.name + "_tpl_prod_",))]
    assert len(names) == 1


def test_template_dump_is_cached_and_scratch_databases_never_stay(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    stale = project.name + "_scratch_deadbeef"  # left by a killed run
    pg.create_db(stale)
    code, first = diff_json(cli, project)
    assert code == 0 and first["cached"] is False, (code, first)
    code, second = diff_json(cli, project)
    assert code == 0 and second["cached"] is True, (code, second)
    left = pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                    params=(project.name + "_scratch_",))
    assert not left, left
    [(template, comment)] = pg.query(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datistemplate AND starts_with(datname, %s)", params=(project.name + "_tpl_",))
    assert cli("template", "--rebuild", cwd=project.root).returncode == 0
    # a rebuild in the same second as the build it replaces has the same build time: the
    # kept dump must still not be taken for the new template's (make that happen every time)
    pg.query(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(template),
                                                            sql.Literal(comment)))
    code, third = diff_json(cli, project)
    assert code == 0 and third["cached"] is False, (code, third)
    kept = list((project.root / ".confiture" / "drift").glob("*.model.*.json"))
    assert len(kept) == 1, kept
    # diff --privileges reads owners and grants too: that catalog is kept apart, likewise
    for cached in (False, True):
        code, report = diff_json(cli, project, "--privileges")
        assert code == 0 and report["cached"] is cached, (code, report)
    assert len(list((project.root / ".confiture" / "drift").glob("*.privileges.*.json"))) == 1
    assert len(list((project.root / ".confiture" / "drift").glob("*.model.*.json"))) == 1


def test_kept_catalogs_nothing_reads_again_are_removed(pg: Cluster, project: Project,
                                                       cli: CliRunner) -> None:
    """.confiture/drift holds a few files per env: a new catalog written removes its env's
    older ones, those of envs no longer configured (or of another project name) and the
    temporary files of dead writers; `templates prune` removes those of the templates it
    drops. A diff that uses a kept catalog touches nothing; a file being written (a live
    writer's temporary file) is never removed."""
    assert cli("reset", cwd=project.root).returncode == 0
    assert diff_json(cli, project)[0] == 0
    assert diff_json(cli, project, "--privileges")[0] == 0
    folder = project.root / ".confiture" / "drift"
    [model_file] = folder.glob("*.model.*.json")
    [privileges_file] = folder.glob("*.privileges.*.json")
    key = "0123456789abcdef"
    planted = {
        "gone env": f"{project.name}_tpl_gone_0123456789ab.model.{key}.json",
        "older template": f"{project.name}_tpl_local_0123456789ab.model.{key}.json",
        "other project": f"renamed_tpl_local_0123456789ab.privileges.{key}.json",
        "old name": "catalog.json",
        "dead writer": f".{model_file.name}.999999999.tmp",
    }
    alive = folder / f".{model_file.name}.{os.getpid()}.tmp"  # this process: alive
    for name in [*planted.values(), alive.name]:
        (folder / name).write_text("{}\n")
    code, report = diff_json(cli, project)
    assert code == 0 and report["cached"] is True, report
    assert all((folder / name).exists() for name in planted.values())  # not on a kept path
    model_file.unlink()  # the next diff reads the catalog again and writes it
    code, report = diff_json(cli, project)
    assert code == 0 and report["cached"] is False, report
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [model_file.name, privileges_file.name, alive.name])
    # templates prune: the catalogs of what it drops (and of envs no longer configured)
    (folder / planted["gone env"]).write_text("{}\n")
    project.write("db/schema/10_tables/20_more.sql", "CREATE TABLE more (id int);\n")
    assert cli("template", cwd=project.root).returncode == 0  # a second template for local
    pruned = cli("templates", "prune", "--keep", "1", cwd=project.root)
    assert pruned.returncode == 0, pruned.stderr
    [dropped] = [line.split()[1] for line in pruned.stdout.splitlines()
                 if line.startswith("dropped ")]
    assert model_file.name.startswith(dropped + ".")
    assert sorted(p.name for p in folder.iterdir()) == [alive.name]


def test_a_kept_template_dump_cut_short_is_not_trusted(pg: Cluster, project: Project, cli: CliRunner) -> None:
    """Kept catalogs and dumps are written without fsync: after a crash one can exist empty
    or cut short. Trusting it would report every object as missing."""
    assert cli("reset", cwd=project.root).returncode == 0
    code, first = diff_json(cli, project)
    assert code == 0 and first["cached"] is False, (code, first)
    [kept] = (project.root / ".confiture" / "drift").glob("*.model.*.json")
    whole = kept.read_text()
    for damaged in ("", whole[: len(whole) // 2], whole[:-2], whole.replace('"', "'", 1)):
        kept.write_text(damaged)
        code, report = diff_json(cli, project)
        assert code == 0 and report["cached"] is False, (len(damaged), code, report)
        assert kept.read_text() == whole  # kept again, whole
    code, first = diff_json(cli, project, "--privileges")
    [kept] = (project.root / ".confiture" / "drift").glob("*.privileges.*.json")
    whole = kept.read_text()
    for damaged in ("", whole[: len(whole) // 2]):
        kept.write_text(damaged)
        code, report = diff_json(cli, project, "--privileges")
        assert code == 0 and report["cached"] is False, (len(damaged), code, report)
        assert kept.read_text() == whole  # kept again, whole


def _templates(pg: Cluster, project: Project) -> list[tuple[str, bool, bool]]:
    return pg.query("SELECT datname, datistemplate, datallowconn FROM pg_database "
                    "WHERE starts_with(datname, %s) AND datistemplate", params=(project.name,))


def test_first_diff_dumps_the_template_itself_and_closes_it_again(
        pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    code, first = diff_json(cli, project)
    assert code == 0 and first["cached"] is False
    [(name, _, allow)] = _templates(pg, project)
    assert allow is False  # published templates accept no connections
    # a diff killed mid-dump leaves the template open: the next run closes it
    pg.query(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    assert cli("reset", cwd=project.root).returncode == 0
    assert _templates(pg, project) == [(name, True, False)]
    # a clone started while the template is being dumped waits for the dump, then succeeds
    pg.query(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    with pg.connect(name) as holder:
        holder.execute("SELECT 1")
        clone = subprocess.Popen(confiture_argv("clone", project.name + "_while_dumping"),
                                 cwd=project.root,
                                 env=confiture_environ({**clean_environ(), **pg.env,
                                                        "NO_COLOR": "1"}),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s "
                            "AND pid <> pg_backend_pid()",
                            params=(f"CREATE DATABASE%{project.name}_while_dumping%",)):
            assert clone.poll() is None and time.monotonic() < deadline, clone.communicate()
            time.sleep(0.02)  # until the clone's CREATE DATABASE waits on the template
    out, err = clone.communicate(timeout=60)
    assert clone.returncode == 0, err
    assert pg.db_exists(project.name + "_while_dumping")


def test_missing_database_and_dead_server_are_clear_errors(project: Project, cli: CliRunner, tmp_path: Path) -> None:
    missing = cli("diff", cwd=project.root)
    assert missing.returncode == 1
    assert project.db("local") in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    text = re.sub(r'(\[env\.local\]\nurl = )"[^"]*"',
                  r'\1"postgresql:///nowhere?host=%s&port=1"' % tmp_path,
                  project.config_path.read_text())
    project.config_path.write_text(text)
    dead = cli("diff", cwd=project.root)
    assert dead.returncode == 1 and "cannot connect" in dead.stderr
    assert "Traceback" not in dead.stderr


@pytest.mark.skipif(not (CORPORA / "pagila").is_dir(),
                    reason=f"corpus not found at {CORPORA} (../shared/corpora from the repo)")
def test_pagila_shows_no_drift_then_exactly_one_change(pg: Cluster, project: Project, cli: CliRunner) -> None:
    schema_file = CORPORA / "pagila" / "pagila-schema.sql"
    for path in (project.root / "db" / "schema").rglob("*.sql"):
        path.unlink()
    project.write("db/schema/10_pagila/10_schema.sql", schema_file.read_bytes())
    database = project.db("local")
    pg.create_db(database)
    psql = shutil.which("psql", path=str(confiture.find_pg_tools().bindir))
    loaded = subprocess.run([psql or "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                             "-d", pg.url(database), "-f", str(schema_file)],
                            capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    result = cli("diff", cwd=project.root, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    pg.query("ALTER TABLE public.film ALTER COLUMN rental_rate SET DEFAULT 5.99", db=database)
    code, report = diff_json(cli, project)
    assert code == 3
    assert [(d["change"], d["object"]) for d in report["differences"]] == \
        [("changed", "table public.film")]
    assert report["differences"][0]["summary"] == ["column rental_rate: default 4.99 → 5.99"]


# ── diff --migrations: migrations and DDL agree ─────────────────────────────────────────────

needs_migrations = pytest.mark.skipif(not hasattr(confiture, "migrate_up"),
                                      reason="§8 migrations are not in this confiture.py yet")


def no_scratch_left(pg: Cluster, project: Project) -> bool:
    return not pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                        params=(project.name + "_scratch_",))


@needs_migrations
def test_diff_migrations_from_an_empty_database(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/migrations/20240101000000_widgets.up.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL);\n")
    project.write("db/migrations/20240201000000_index.up.sql",
                  "-- confiture:no-transaction\nCREATE INDEX CONCURRENTLY widgets_label ON widgets (label);\n")
    project.write("db/schema/10_tables/20_index.sql", "CREATE INDEX widgets_label ON widgets (label);\n")
    result = cli("diff", "--migrations", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 applied to empty" in result.stdout
    # the DDL gains a column that no migration adds
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    color text\n);\n")
    code, report = diff_json(cli, project, "--migrations")
    assert code == 3
    assert [(d["change"], d["object"], d["summary"]) for d in report["differences"]] == \
        [("changed", "table public.widgets", ["column color missing (text)"])]
    assert no_scratch_left(pg, project)


@needs_migrations
def test_diff_migrations_failure_names_the_migration(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/migrations/20240101000000_bad.up.sql", "ALTER TABLE nowhere ADD COLUMN x int;\n")
    result = cli("diff", "--migrations", cwd=project.root)
    assert result.returncode == 1
    assert "20240101000000_bad.up.sql" in result.stderr and "Traceback" not in result.stderr
    assert no_scratch_left(pg, project)


def test_diff_migrations_starts_from_the_baseline_schema(pg: Cluster, project: Project,
                                                         cli: CliRunner) -> None:
    """A history that starts from an existing schema ([migrations] baseline_schema) is replayed
    from it, as migrate generate and the guard do; without it the replay cannot start."""
    widgets = "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL"
    project.write("db/migrations/20240102000000_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/schema/10_tables/10_widgets.sql", widgets + ",\n    note text\n);\n")
    failed = cli("diff", "--migrations", cwd=project.root)
    assert failed.returncode == 1 and "20240102000000_note.up.sql" in failed.stderr
    project.write("db/baseline.sql", widgets + "\n);\n")
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nbaseline_schema = "db/baseline.sql"\n')
    code, report = diff_json(cli, project, "--migrations")
    assert code == 0, report
    assert "migrations (1 applied to baseline baseline.sql)" == report["actual"]
    project.write("db/schema/10_tables/10_widgets.sql",
                  widgets + ",\n    note text,\n    size int\n);\n")
    code, report = diff_json(cli, project, "--migrations")
    assert code == 3
    assert report["differences"][0]["summary"] == ["column size missing (integer)"]
    # --base still starts from the env's own schema (which holds the baseline already)
    pg.create_db(project.db())
    pg.query(widgets + ");", db=project.db())
    code, report = diff_json(cli, project, "--migrations", "--base", "local")
    assert code == 3 and "applied to env local at no migration" in report["actual"], report
    assert no_scratch_left(pg, project)


def example_project(pg: Cluster, project: Project) -> None:
    shutil.copytree(ROOT / "sql", project.root / "sql")
    text = project.config_path.read_text()
    text = text.replace('schema = ["db/schema"]', 'schema = ["sql/schema"]')
    text = text.replace('seeds = "db/seeds"', 'seeds = "sql/seeds"')
    text = text.replace('migrations = "db/migrations"', 'migrations = "sql/migrations"')
    text += f'\n[env.base]\nurl = "{pg.url(project.db("base"))}"\n'
    project.config_path.write_text(text)


@needs_migrations
@pytest.mark.skipif(not (ROOT / "sql" / "migrations").is_dir(), reason="no example in sql/")
def test_diff_migrations_on_the_example(pg: Cluster, project: Project, cli: CliRunner) -> None:
    example_project(pg, project)
    # the example's migrations sit on top of a deployed schema: from nothing they cannot run
    empty = cli("diff", "--migrations", cwd=project.root)
    assert empty.returncode == 1 and "20260101000000_add_customer_phone" in empty.stderr
    # the release before them: today's DDL with every down migration applied, newest first
    assert cli("--env", "base", "reset", cwd=project.root).returncode == 0
    downs = sorted((ROOT / "sql" / "migrations").glob("*.down.sql"), reverse=True)
    for down in downs:
        pg.query(down.read_text(), db=project.db("base"))
    # a database of that release has none of the three recorded (reset recorded them all)
    pg.query("DELETE FROM confiture_migrations", db=project.db("base"))
    assert "sku" not in {r[0] for r in pg.query(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'products'::regclass",
        db=project.db("base"))}
    code, report = diff_json(cli, project, "--migrations", "--base", "base")
    assert code == 0, report
    assert "3 applied to env base" in report["actual"]
    # the base has the first migration recorded: only the other two are applied
    pg.query("ALTER TABLE customers ADD COLUMN phone text", db=project.db("base"))
    assert cli("--env", "base", "migrate", "baseline", "--to", "20260101000000",
               cwd=project.root).returncode == 0
    code, report = diff_json(cli, project, "--migrations", "--base", "base")
    assert code == 0 and "2 applied to env base at 20260101000000" in report["actual"]
    # a migration goes missing: the DDL has products.sku, the migrated database does not
    for path in (project.root / "sql" / "migrations").glob("20260201000000_*"):
        path.unlink()
    code, report = diff_json(cli, project, "--migrations", "--base", "base")
    assert code == 3
    found = {d["object"]: d for d in report["differences"]}
    assert set(found) == {"table public.products", "constraint products_sku_key on public.products"}
    assert found["table public.products"]["summary"] == ["column sku missing (text NOT NULL)"]
    assert found["constraint products_sku_key on public.products"]["change"] == "missing"
    assert no_scratch_left(pg, project)


@needs_migrations
def test_interrupted_diff_drops_its_scratch_database(pg: Cluster, project: Project) -> None:
    import signal

    project.write("db/migrations/20240101000000_slow.up.sql", "SELECT pg_sleep(60);\n")
    proc = subprocess.Popen(confiture_argv("diff", "--migrations"), cwd=project.root,
                            env=confiture_environ({**clean_environ(), "NO_COLOR": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not pg.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE starts_with(datname, %s) "
            "AND query LIKE '%%pg_sleep%%'", params=(project.name + "_scratch_",)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert no_scratch_left(pg, project)


def test_diff_works_when_its_caches_cannot_be_written(pg: Cluster, project: Project, cli: CliRunner) -> None:
    """A read-only or odd state folder costs time, never the run (tests run as root, so the
    folders are made unusable by putting files where they should be)."""
    assert cli("reset", cwd=project.root).returncode == 0
    state = project.root / ".confiture"
    state.mkdir(exist_ok=True)  # no run creates it before its first cache (no config copy there)
    (state / "drift").write_text("not a folder\n")
    shutil.rmtree(state / "cache", ignore_errors=True)
    (state / "cache").write_text("not a folder either\n")
    for _ in range(2):
        code, doc = diff_json(cli, project)
        assert code == 0 and doc["cached"] is False, (code, doc)
    result = cli("migrate", "status", cwd=project.root)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


# ── a protected env is inspected without creating anything on its server (issue 11.6) ──────


@pytest.fixture
def readonly_prod(pg_remote: Any, project: Project) -> Iterator[dict[str, str]]:
    """The project's prod database on `pg_remote`, reached over TCP by a NOCREATEDB role that
    may only read it; yields the environment that points env.prod there (PROD_URL)."""
    role, password, db = project.name + "_ro", "ro-secret", project.db("prod")
    pg_remote.create_db(db)
    pg_remote.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL)", db=db)
    pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    pg_remote.query(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
        sql.Identifier(role)), db=db)
    text = project.config_path.read_text()
    project.config_path.write_text(
        text[:text.index("[env.prod]")] + '[env.prod]\nurl = "${PROD_URL}"\nprotected = true\n')
    try:
        yield {"PROD_URL": f"postgresql://{role}:{password}@127.0.0.1:{pg_remote.tcp_port}/{db}"}
    finally:
        pg_remote.drop_dbs_with_prefix(project.name)
        pg_remote.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _databases(cluster: Any) -> set[str]:
    return {row[0] for row in cluster.query("SELECT datname FROM pg_database")}


def test_protected_env_is_inspected_with_a_read_only_role(pg: Cluster, pg_remote: Any, project: Project,
                                                          cli: CliRunner, readonly_prod: Any) -> None:
    before = _databases(pg_remote)
    result = cli("--env", "prod", "diff", cwd=project.root, env=readonly_prod)
    assert result.returncode == 0, result.stdout + result.stderr
    # the expected schema was built on the default env's server (`pg`), not on prod's
    assert [r[0] for r in pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, "
                                   "%s)", params=(project.name + "_tpl_prod_",))]
    pg_remote.query("CREATE INDEX widgets_label ON widgets (label)", db=project.db("prod"))
    result = cli("--env", "prod", "diff", cwd=project.root, env=readonly_prod)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "widgets_label" in result.stdout
    result = cli("--env", "prod", "status", "--drift", "--json", cwd=project.root,
                 env=readonly_prod)
    assert "Traceback" not in result.stderr
    status = json.loads(result.stdout)
    assert status["drift"]["checked"] is True and status["drift"]["differences"] == 1, status
    assert status["template"]["state"] == "current", status
    # diff --migrations builds its scratch database on the scratch server too
    project.write("db/migrations/1_widgets.up.sql",
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL);\n")
    result = cli("--env", "prod", "diff", "--migrations", cwd=project.root, env=readonly_prod)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _databases(pg_remote) == before


def test_protected_env_without_a_scratch_server_is_refused(pg: Cluster, pg_remote: Any, project: Project,
                                                           cli: CliRunner, readonly_prod: Any) -> None:
    text = project.config_path.read_text()
    project.config_path.write_text(text.replace('default_env = "local"', 'default_env = "prod"'))
    before_remote, before_local = _databases(pg_remote), _databases(pg)
    result = cli("--env", "prod", "diff", cwd=project.root, env=readonly_prod)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "scratch_url" in result.stderr and "Traceback" not in result.stderr
    result = cli("--env", "prod", "status", "--drift", "--json", cwd=project.root,
                 env=readonly_prod)
    status = json.loads(result.stdout)
    assert status["drift"]["checked"] is False and "protected" in status["drift"]["error"]
    assert _databases(pg_remote) == before_remote and _databases(pg) == before_local
    # [project] scratch_url names the server where the expected schema is built
    project.config_path.write_text(project.config_path.read_text().replace(
        "[project]\n", '[project]\nscratch_url = "${SCRATCH_URL}"\n'))
    result = cli("--env", "prod", "diff", cwd=project.root,
                 env={**readonly_prod, "SCRATCH_URL": pg.url()})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is the env's own server" not in result.stderr  # another server: no warning
    assert _databases(pg_remote) == before_remote
    assert any(n.startswith(project.name + "_tpl_prod_") for n in _databases(pg))
    # a malformed scratch_url is a configuration error at load, naming the key
    project.config_path.write_text(project.config_path.read_text().replace(
        '"${SCRATCH_URL}"', '"mysql://x"'))
    result = cli("config", "check", cwd=project.root, env=readonly_prod)
    assert result.returncode == 2 and "project.scratch_url" in result.stderr, result.stderr


def test_a_scratch_server_that_is_the_protected_envs_own_is_warned_about(
        pg: Cluster, project: Project, cli: CliRunner) -> None:
    """default_env's server is prod's own here: diff still works, and says where its scratch
    databases go."""
    pg.create_db(project.db("prod"))
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL)", db=project.db("prod"))
    result = cli("--env", "prod", "diff", cwd=project.root)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "warning: the scratch server of protected env 'prod' (the server of default env " \
        "'local', " in result.stderr
    assert "is the env's own server" in result.stderr and "scratch_url" in result.stderr


def test_the_scratch_server_warning_is_said_once_per_run(pg: Cluster, project: Project,
                                                          cli: CliRunner) -> None:
    """status --drift reaches prod's scratch server twice (the DDL's template, then the
    comparison): the warning about where its scratch databases go is said once."""
    pg.create_db(project.db("prod"))
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL)", db=project.db("prod"))
    result = cli("--env", "prod", "status", "--drift", cwd=project.root)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert result.stderr.count("is the env's own server") == 1, result.stderr
