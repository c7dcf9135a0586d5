"""Migrations (§8) against a real server; outcomes checked with psycopg, not the tool's output."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CliRunner, Cluster, Project, confiture_argv, confiture_environ

import confiture

ROOT = Path(__file__).resolve().parent.parent
# ../shared/corpora beside the checkout (CI, /work/main); worktrees sit one level deeper
LEMMY = next((p / "shared" / "corpora" / "lemmy-0.19.20" / "migrations"
              for p in (ROOT.parent, ROOT.parent.parent)
              if (p / "shared" / "corpora" / "lemmy-0.19.20").is_dir()),
             ROOT.parent / "shared" / "corpora" / "lemmy-0.19.20" / "migrations")
LOCK_SQL = f"{confiture.LOCK_CLASS}, hashtext('migrate')"


# ── pure parts: versions, layouts, splitting, plans ─────────────────────────────────────────

def test_versions_ignore_dashes_and_order_as_integers(tmp_path: Path) -> None:
    (tmp_path / "2017-08-31-230457_x").mkdir()
    (tmp_path / "2017-08-31-230457_x" / "up.sql").write_text("select 1;\n")
    (tmp_path / "20170804200817_y.up.sql").write_text("select 2;\n")
    (tmp_path / "20170804200817_y.down.sql").write_text("select 3;\n")
    (tmp_path / "9_small.up.sql").write_text("")
    (tmp_path / "README.md").write_text("notes\n")
    (tmp_path / "V1__flyway.sql").write_text("select 4;\n")
    (tmp_path / "5_orphan.down.sql").write_text("select 5;\n")
    files = confiture.scan_migrations(tmp_path)
    assert [(m.version, m.layout) for m in files.migrations] == [
        (9, "flat"), (20170804200817, "flat"), (20170831230457, "folder")]
    assert files.migrations[2].down is None and files.migrations[1].down is not None
    assert set(files.strays) == {"README.md", "V1__flyway.sql", "5_orphan.down.sql (down without up)"}
    assert confiture.parse_version("2017-08-31-230457") == 20170831230457


def test_duplicate_versions_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "20240101_a.up.sql").write_text("")
    (tmp_path / "2024-01-01_b").mkdir()
    (tmp_path / "2024-01-01_b" / "up.sql").write_text("")
    with pytest.raises(confiture.InputError) as exc:
        confiture.scan_migrations(tmp_path)
    assert "20240101_a.up.sql" in exc.value.message and "2024-01-01_b/up.sql" in exc.value.message


def test_checksum_ignores_line_endings_and_bom(tmp_path: Path) -> None:
    (tmp_path / "1_a.up.sql").write_bytes(b"create table a (id int);\nselect 1;\n")
    (tmp_path / "2_b.up.sql").write_bytes(b"\xef\xbb\xbfcreate table a (id int);\r\nselect 1;\r\n")
    (tmp_path / "3_c.up.sql").write_bytes(b"create table a (id int);\nselect 2;\n")
    a, b, c = confiture.scan_migrations(tmp_path).migrations
    assert a.checksum == b.checksum != c.checksum


def test_no_transaction_marker_and_diesel_metadata(tmp_path: Path) -> None:
    (tmp_path / "1_a.up.sql").write_text("\n-- confiture:no-transaction\ncreate index concurrently i on t (x);\n")
    (tmp_path / "2_b").mkdir()
    (tmp_path / "2_b" / "up.sql").write_text("create index concurrently j on t (x);\n")
    (tmp_path / "2_b" / "metadata.toml").write_text("run_in_transaction = false\n")
    (tmp_path / "3_c.up.sql").write_text("select 1; -- confiture:no-transaction\n")
    assert [m.transactional for m in confiture.scan_migrations(tmp_path).migrations] == [
        False, False, True]


@pytest.mark.parametrize("sql, pieces", [
    ("select 1; select 2", ["select 1;", "select 2"]),
    ("select 'a;b'; select E'it\\'s;'; select \"x;y\" from t;", 3),
    ("create function f() returns int as $body$ begin return 1; end $body$ language plpgsql;", 1),
    ("select $$a;$$ || $_$b;$_$; select 2;", 2),
    ("/* a /* nested; */ still; */ select 1; -- c; d\n", 1),
    ("create function g() returns int language sql begin atomic select 1; "
     "select case when true then 2 end; end; select 3;", 2),
    ("copy t from stdin;\n1\t;\n\\.\nselect 4;", 2),
    ("-- only a comment\n\n/* and another */\n", 0),
    ("select (1;\n", 1),
    ("select 1 ;\n\\set x 1\nselect :x", 3),
])
def test_split_sql_follows_psql(sql: str, pieces: Any) -> None:
    result = confiture.split_sql(sql)
    if isinstance(pieces, list):
        assert [s.text for s in result] == pieces
    else:
        assert len(result) == pieces


def test_split_sql_reports_lines() -> None:
    text = "-- header\n\nCREATE TABLE a ();\n\nCREATE INDEX CONCURRENTLY i\n  ON a (x);\r\n"
    statements = confiture.split_sql(text)
    assert [(s.line, s.words[:3]) for s in statements] == [
        (1, ("CREATE", "TABLE", "A")), (5, ("CREATE", "INDEX", "CONCURRENTLY"))]
    assert confiture.needs_no_transaction(statements[1].words)
    assert confiture.transaction_control(("COMMIT",))
    assert not confiture.transaction_control(("ROLLBACK", "TO", "SAVEPOINT"))


@pytest.mark.parametrize("sql", [
    "BEGIN;", "/*x*/commit;", "select 1;\nEnd;", "abort", "ROLLBACK;", "start transaction;",
    "prepare transaction 'x';", "vacuum t;", "create index concurrently i on t (x);",
    "CREATE DATABASE d;", "alter system set work_mem = '1MB';", "drop tablespace t;",
    "select 1 ; -- c\nBegin\n;", "x1 ; cOmMiT;", "select 'a';begin;",
])
def test_refused_statements_are_never_skipped_by_the_quick_word_check(sql: str) -> None:
    """check_migration_sql skips splitting a file without any of the words it looks for: every
    file the splitter would refuse must contain one."""
    refused = [s for s in confiture.split_sql(sql)
               if confiture.transaction_control(s.words) or confiture.needs_no_transaction(s.words)]
    assert refused, sql
    assert confiture._REFUSAL_WORDS.search(sql), sql


def test_quick_word_check_lets_plain_migrations_skip_the_split() -> None:
    plain = ("CREATE TABLE item (id bigint PRIMARY KEY, legend text, started_at timestamptz);\n"
             "CREATE INDEX item_legend ON item (legend);\nINSERT INTO item SELECT g FROM "
             "generate_series(1, 10) g;\n")
    assert not confiture._REFUSAL_WORDS.search(plain)


def test_parse_table_name() -> None:
    assert confiture.parse_table_name("confiture_migrations") == (None, "confiture_migrations")
    assert confiture.parse_table_name("Ops.Migs") == ("ops", "migs")
    assert confiture.parse_table_name('"My Schema"."T.x"') == ("My Schema", "T.x")
    with pytest.raises(confiture.ConfigError):
        confiture.parse_table_name("a.b.c")


def test_a_script_queued_after_psql_stopped_reports_the_failure_that_stopped_it(pg: Cluster) -> None:
    """Pipelining: psql may have exited at a failing script before the next one is queued. The
    queueing must not fail on the closed pipe; waiting for the failed script reports its error."""
    conn = confiture.ConnInfo.parse(pg.url())
    session = confiture.Session(confiture.find_pg_tools(), conn, "postgres")
    session.value("SELECT 1")
    session.send_stop_on_error("SELECT 1 / 0;")
    session._proc.wait(timeout=30)  # psql stopped at the error and exited
    session.send_stop_on_error("SELECT 2;")  # no BrokenPipeError, no 'lost the session'
    with pytest.raises(confiture.ScriptStopped) as stopped:
        session.wait_stop_on_error()
    assert "division by zero" in stopped.value.stderr
    assert session.closed


def test_a_queued_script_s_error_is_not_taken_for_the_one_before(pg: Cluster) -> None:
    """Pipelining: psql may have failed at the second script (and exited) before the first's
    answer is read; the error text belongs to the second, not to the first's answer."""
    conn = confiture.ConnInfo.parse(pg.url())
    session = confiture.Session(confiture.find_pg_tools(), conn, "postgres")
    session.value("SELECT 1")
    session.send_stop_on_error("SELECT 1;")
    session.send_stop_on_error("SELECT 1 / 0;")
    session._proc.wait(timeout=30)  # both ran; psql stopped at the second and exited
    session.wait_stop_on_error()
    with pytest.raises(confiture.ScriptStopped) as stopped:
        session.wait_stop_on_error()
    assert "division by zero" in stopped.value.stderr


def test_a_pipeline_reads_every_answer_before_raising_and_names_the_failure(pg: Any) -> None:
    """Session.pipeline sends independent statements in one round trip: their answers come
    back in order; a failing one is raised only after every answer was read, with its error
    text, and the session stays usable."""
    conn = confiture.ConnInfo.parse(pg.url())
    with confiture.Session(confiture.find_pg_tools(), conn, "postgres") as session:
        assert session.pipeline(["SELECT 1", "SELECT 'two';", "COPY (SELECT 3, NULL) TO STDOUT"]) \
            == [["1"], ["two"], ["3\t\\N"]]
        for failing in (["SELECT 1 / 0", "SELECT 2"], ["SELECT 2", "SELECT 1 / 0"]):
            with pytest.raises(confiture.SqlError) as error:
                session.pipeline(failing)
            assert "division by zero" in error.value.message and error.value.sqlstate == "22012"
            assert session.value("SELECT 41 + 1") == 42  # in step: the next answer is its own


# ── helpers for the server tests ────────────────────────────────────────────────────────────

def mig(project: Project, name: str, up: str, down: str | None = None) -> None:
    project.write(f"db/migrations/{name}.up.sql", up)
    if down is not None:
        project.write(f"db/migrations/{name}.down.sql", down)


def tracked(pg: Cluster, project: Project, table: str = "confiture_migrations") -> list[tuple[int, str]]:
    if not pg.scalar(f"SELECT to_regclass('{table}') IS NOT NULL", db=project.db()):
        return []
    return [(int(v), how) for v, how in pg.query(f"SELECT version, how FROM {table} ORDER BY version",
                                                 db=project.db())]


def exists(pg: Cluster, project: Project, relation: str) -> bool:
    return bool(pg.scalar("SELECT to_regclass(%s) IS NOT NULL", db=project.db(), params=(relation,)))


@pytest.fixture
def db(pg: Cluster, project: Project) -> str:
    pg.create_db(project.db())
    return project.db()


def add_config(project: Project, text: str) -> None:
    with open(project.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n" + text + "\n")


def schema_dump(pg: Cluster, project: Project) -> str:
    out = subprocess.run(["pg_dump", "-s", "-d", project.db()], env={**os.environ, **pg.env},
                         capture_output=True, text=True, check=True).stdout
    return "\n".join(l for l in out.splitlines() if not l.startswith(("\\restrict", "\\unrestrict")))


# ── up: order, layouts, atomicity ───────────────────────────────────────────────────────────

def test_up_applies_both_layouts_in_version_order(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    project.write("db/migrations/2017-08-31-230457_second/up.sql",
                  "INSERT INTO seen VALUES ('second');\n")
    project.write("db/migrations/2017-08-31-230457_second/down.sql", "DELETE FROM seen WHERE x = 'second';\n")
    mig(project, "20170804200817_first", "CREATE TABLE seen (x text, at timestamptz DEFAULT clock_timestamp())",
        "DROP TABLE seen;")
    mig(project, "20170901000000_empty", "-- nothing to do yet\n", "")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert tracked(pg, project) == [(20170804200817, "applied"), (20170831230457, "applied"),
                                    (20170901000000, "applied")]
    assert pg.query("SELECT x FROM seen", db=db) == [("second",)]
    status = cli("migrate", "status", "--check", "--json", cwd=project.root)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["clean"] and doc["current"] == 20170901000000 and len(doc["applied"]) == 3
    again = cli("migrate", "up", cwd=project.root)
    assert again.returncode == 0 and "nothing to apply" in again.stdout


def test_failing_statement_leaves_neither_change_nor_row(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_ok", "CREATE TABLE ok_table (id int);\n")
    mig(project, "2_bad", "CREATE TABLE half (id int);\nINSERT INTO half VALUES (1);\n\n"
                          "SELECT 1 / 0;\nCREATE TABLE never (id int);\n")
    mig(project, "3_later", "CREATE TABLE later (id int);\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 1
    assert "db/migrations/2_bad.up.sql:4" in result.stderr and "division by zero" in result.stderr
    assert tracked(pg, project) == [(1, "applied")]
    assert exists(pg, project, "ok_table")
    assert not exists(pg, project, "half") and not exists(pg, project, "later")
    # the lock went with the session
    assert pg.scalar(f"SELECT pg_try_advisory_lock({LOCK_SQL})", db=db)


def test_transaction_control_and_concurrently_are_refused_before_anything_runs(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_fine", "CREATE TABLE fine (id int);\n")
    mig(project, "2_commits", "BEGIN;\nCREATE TABLE x (id int);\nCOMMIT;\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 2 and "2_commits.up.sql:1" in result.stderr
    assert not exists(pg, project, "fine") and tracked(pg, project) == []
    mig(project, "2_commits", "CREATE TABLE x (id int);\n\nCREATE INDEX CONCURRENTLY xi ON x (id);\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 2 and "2_commits.up.sql:3" in result.stderr
    assert "confiture:no-transaction" in result.stderr


def test_no_transaction_failure_is_logged_and_resumed(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_table", "CREATE TABLE dup (x int);\nINSERT INTO dup VALUES (1), (1);\n")
    mig(project, "2_index", "-- confiture:no-transaction\n"
                            "CREATE TABLE side (id int);\n"
                            "CREATE UNIQUE INDEX CONCURRENTLY dup_x ON dup (x);\n"
                            "CREATE TABLE after_index (id int);\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 1, result.stderr
    assert "2_index.up.sql:3" in result.stderr and "dup_x" in result.stderr
    assert tracked(pg, project) == [(1, "applied")]
    assert exists(pg, project, "side") and not exists(pg, project, "after_index")
    # the INVALID index the failed CREATE INDEX CONCURRENTLY left is gone
    assert pg.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid", db=db) == 0
    status = json.loads(cli("migrate", "status", "--json", cwd=project.root).stdout)
    assert status["partial"][0]["version"] == 2 and status["partial"][0]["done"] == 1
    assert cli("migrate", "status", "--check", cwd=project.root).returncode == 3
    pg.query("DELETE FROM dup WHERE ctid = (SELECT max(ctid) FROM dup)", db=db)
    again = cli("migrate", "up", cwd=project.root)
    assert again.returncode == 0, again.stderr
    assert "resuming 2_index at statement 2" in again.stderr  # CREATE TABLE side is not re-run
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")]
    assert pg.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'dup_x'::regclass", db=db)
    events = [e for (e,) in pg.query("SELECT event FROM confiture_migrations_log WHERE version = 2 "
                                     "ORDER BY id", db=db)]
    assert events == ["started", "progress", "failed", "started", "progress", "progress", "applied"]


def test_interrupted_no_transaction_run_resumes_after_invalid_index_is_dropped(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    """Simulate a crash mid-CREATE INDEX CONCURRENTLY: progress says 1 of 2 done, an INVALID
    index with the statement's name exists. The next run drops it and resumes."""
    mig(project, "1_t", "CREATE TABLE t (x int);\nINSERT INTO t VALUES (1), (1);\n")
    body = "-- confiture:no-transaction\nCREATE TABLE pre (id int);\nCREATE UNIQUE INDEX CONCURRENTLY t_x ON t (x);\n"
    mig(project, "2_cic", body)
    assert cli("migrate", "up", cwd=project.root).returncode == 1
    with pg.connect(db) as conn:  # what a killed run leaves: an invalid index, no 'failed' event
        conn.execute("DELETE FROM confiture_migrations_log WHERE event = 'failed'")
        conn.execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t)")
        conn.execute("CREATE UNIQUE INDEX t_x ON t (x)")
        conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 't_x'::regclass")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "dropped invalid index" in result.stderr and "resuming" in result.stderr
    assert pg.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass", db=db)
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")]


# ── checksums, missing files, verify and repair ────────────────────────────────────────────

def test_changed_file_blocks_up_until_repair_and_crlf_is_not_a_change(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_a", "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    project.write("db/migrations/1_a.up.sql", b"CREATE TABLE a (id int);\r\nCREATE TABLE b (id int);\r\n")
    assert cli("migrate", "verify", cwd=project.root).returncode == 0
    mig(project, "2_next", "CREATE TABLE c (id int);\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0 and exists(pg, project, "c")
    mig(project, "1_a", "CREATE TABLE a (id int, extra text);\nCREATE TABLE b (id int);\n")
    mig(project, "3_more", "CREATE TABLE d (id int);\n")
    verify = cli("migrate", "verify", cwd=project.root)
    assert verify.returncode == 3 and "1_a" in verify.stderr
    up = cli("migrate", "up", cwd=project.root)
    assert up.returncode == 3 and "db/migrations/1_a.up.sql changed" in up.stderr
    assert not exists(pg, project, "d")
    repair = cli("migrate", "repair", cwd=project.root)
    assert repair.returncode == 0 and "accepted 1_a" in repair.stdout
    assert cli("migrate", "verify", cwd=project.root).returncode == 0
    assert cli("migrate", "up", cwd=project.root).returncode == 0 and exists(pg, project, "d")
    log = pg.query("SELECT detail->>'action', detail->>'old' FROM confiture_migrations_log "
                   "WHERE event = 'repair'", db=db)
    assert log and log[0][0] == "checksum" and len(log[0][1]) == 64


def test_missing_file_blocks_up_and_repair_forgets_it(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_a", "CREATE TABLE a (id int);\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    (project.root / "db/migrations/1_a.up.sql").unlink()
    mig(project, "2_b", "CREATE TABLE b (id int);\n")
    up = cli("migrate", "up", cwd=project.root)
    assert up.returncode == 3 and "1_a was applied but its file is gone" in up.stderr
    assert cli("migrate", "status", "--check", cwd=project.root).returncode == 3
    assert cli("migrate", "repair", cwd=project.root).returncode == 0
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert tracked(pg, project) == [(2, "applied")]


# ── down ────────────────────────────────────────────────────────────────────────────────────

def test_down_reverts_newest_first_and_refuses_without_down_files(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_a", "CREATE TABLE a (id int);\n", "DROP TABLE a;\n")
    mig(project, "2_b", "CREATE TABLE b (id int);\n")  # no down file
    mig(project, "3_c", "CREATE TABLE c (id int);\n", "DROP TABLE c;\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    refused = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert refused.returncode == 4 and "2_b" in refused.stderr and "nothing was reverted" in refused.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied"), (3, "applied")] and exists(pg, project, "c")
    one = cli("migrate", "down", "--steps", "1", cwd=project.root)
    assert one.returncode == 0, one.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")] and not exists(pg, project, "c")
    # neither --steps nor --to: one step (issue 11.21), here 2_b, which has no down file
    bare = cli("migrate", "down", cwd=project.root)
    assert bare.returncode == 4 and "2_b" in bare.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")]


def test_down_stops_at_first_failing_down(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_a", "CREATE TABLE a (id int);\n", "DROP TABLE a;\n")
    mig(project, "2_b", "CREATE TABLE b (id int);\n", "DROP TABLE b;\nDROP TABLE no_such_table;\n")
    mig(project, "3_c", "CREATE TABLE c (id int);\n", "DROP TABLE c;\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    result = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert result.returncode == 1
    assert "2_b.down.sql:2" in result.stderr and "reverted 1 migration(s)" in result.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")]
    assert exists(pg, project, "b") and not exists(pg, project, "c")
    # the failed down took its log row with it: only 3_c's revert is logged
    log = pg.query("SELECT event, version FROM confiture_migrations_log "
                   "WHERE event = 'reverted' ORDER BY id", db=db)
    assert [(event, int(version)) for event, version in log] == [("reverted", 3)]


def test_down_refuses_unreadable_down_files_and_bad_scans_before_anything_runs(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    """Every planned down file is read and checked before the first one runs; the scan (now
    done while psql connects, inside the locked run) still refuses cleanly and frees the lock."""
    mig(project, "1_a", "CREATE TABLE a (id int);\n", "DROP TABLE a;\n")
    mig(project, "2_b", "CREATE TABLE b (id int);\n", "DROP TABLE b;\n")
    mig(project, "3_c", "CREATE TABLE c (id int);\n", "DROP TABLE c;\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    (project.root / "db/migrations/1_a.down.sql").write_bytes(b"DROP TABLE a; -- caf\xe9\n")
    refused = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert refused.returncode == 2 and "1_a.down.sql:1: not valid UTF-8" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied"), (3, "applied")]
    assert exists(pg, project, "c")
    assert not pg.query("SELECT 1 FROM confiture_migrations_log WHERE event = 'reverted'", db=db)
    mig(project, "3_dup", "SELECT 1;\n")
    twice = cli("migrate", "down", "--steps", "1", cwd=project.root)
    assert twice.returncode == 2 and "two migrations have version 3" in twice.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied"), (3, "applied")]
    (project.root / "db/migrations/3_dup.up.sql").unlink()
    one = cli("migrate", "down", "--steps", "1", cwd=project.root)  # no lock was left behind
    assert one.returncode == 0, one.stderr
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")] and not exists(pg, project, "c")


# ── dry runs change nothing ─────────────────────────────────────────────────────────────────

def test_dry_runs_leave_the_schema_byte_identical(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "1_a", "CREATE TABLE a (id int);\n", "DROP TABLE a;\n")
    before = schema_dump(pg, project)
    dry = cli("migrate", "up", "--dry-run", cwd=project.root)
    assert dry.returncode == 0, dry.stderr
    assert "CREATE TABLE a (id int);" in dry.stdout and "nothing was executed" in dry.stderr
    assert schema_dump(pg, project) == before  # not even the tracking table
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    before = schema_dump(pg, project)
    rows = pg.query("SELECT * FROM confiture_migrations", db=db)
    dry = cli("migrate", "down", "--steps", "1", "--dry-run", "--json", cwd=project.root)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] and doc["planned"][0]["sql"] == "DROP TABLE a;\n"
    assert schema_dump(pg, project) == before
    assert pg.query("SELECT * FROM confiture_migrations", db=db) == rows


# ── baseline, protected envs, new ───────────────────────────────────────────────────────────

def test_baseline_then_up(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    pg.query("CREATE TABLE a (id int); CREATE TABLE b (id int)", db=db)
    mig(project, "1_a", "CREATE TABLE a (id int);\n")
    mig(project, "2_b", "CREATE TABLE b (id int);\n")
    mig(project, "3_c", "CREATE TABLE c (id int);\n")
    assert cli("migrate", "baseline", "--to", "9", cwd=project.root).returncode == 2
    result = cli("migrate", "baseline", "--to", "2", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert tracked(pg, project) == [(1, "baseline"), (2, "baseline")]
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert tracked(pg, project) == [(1, "baseline"), (2, "baseline"), (3, "applied")]


def test_protected_env_needs_yes(pg: Cluster, project: Project, cli: CliRunner) -> None:
    pg.create_db(project.db("prod"))
    mig(project, "1_a", "CREATE TABLE a (id int);\n")
    (project.root / "db/schema/10_tables/10_widgets.sql").unlink()  # the DDL agrees (the guard)
    project.write("db/schema/10_tables/10_a.sql", "CREATE TABLE a (id int);\n")
    refused = cli("migrate", "up", "--env", "prod", cwd=project.root)
    assert refused.returncode == 4 and "--yes" in refused.stderr
    assert cli("migrate", "up", "--env", "prod", "--dry-run", cwd=project.root).returncode == 0
    assert not pg.scalar("SELECT to_regclass('a') IS NOT NULL", db=project.db("prod"))
    assert cli("migrate", "up", "--env", "prod", "--yes", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT to_regclass('a') IS NOT NULL", db=project.db("prod"))


def test_new_creates_timestamped_pair(project: Project, cli: CliRunner) -> None:
    result = cli("migrate", "new", "Add user e-mail", cwd=project.root)
    assert result.returncode == 0, result.stderr
    up, down = result.stdout.split()
    assert re.fullmatch(r"db/migrations/\d{14}_add_user_e_mail\.up\.sql", up)
    assert down == up.replace(".up.sql", ".down.sql") and (project.root / down).is_file()


def test_schema_qualified_tracking_table(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    add_config(project, '[migrations]\ntable = "ops.schema_history"')
    mig(project, "1_a", "SET search_path = '';\nCREATE TABLE public.a (id int);\n")
    mig(project, "2_b", "CREATE TABLE b (id int);\n")
    result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert tracked(pg, project, "ops.schema_history") == [(1, "applied"), (2, "applied")]
    assert exists(pg, project, "public.b")  # migration 1's SET did not leak into migration 2


def test_settings_do_not_leak_between_downs_of_either_kind(pg: Cluster, project: Project, cli: CliRunner,
                                                          db: str) -> None:
    """A transactional script resets the settings before its COMMIT, so the next one starts
    clean without a reset of its own; after a no-transaction migration (its SETs stay in the
    session) the next one resets first."""
    mig(project, "1_a", "CREATE TABLE a (id int);\n", "DROP TABLE a;\n")
    mig(project, "2_b", "-- confiture:no-transaction\nCREATE TABLE b (id int);\n",
        "-- confiture:no-transaction\nSET search_path = '';\nDROP TABLE public.b;\n")
    mig(project, "3_c", "CREATE TABLE c (id int);\n", "DROP TABLE d;\nSET search_path = '';\nDROP TABLE public.c;\n")
    mig(project, "4_d", "CREATE TABLE d (id int);\n", "SET search_path = '';\nSELECT 1;\n")
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    result = cli("migrate", "down", "--to", "0", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert tracked(pg, project) == []
    assert not any(exists(pg, project, f"public.{t}") for t in "abcd")


# ── locking, concurrency, interruption ──────────────────────────────────────────────────────

def test_lock_timeout_names_the_holder(pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    add_config(project, '[migrations]\nlock_timeout = "1s"')
    mig(project, "1_a", "CREATE TABLE a (id int);\n")
    with pg.connect(db) as holder:
        holder.execute("SET application_name = 'the-holder'")
        holder.execute(f"SELECT pg_advisory_lock({LOCK_SQL})")
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        result = cli("migrate", "up", cwd=project.root)
    assert result.returncode == 5
    assert f"pid {pid}" in result.stderr and "the-holder" in result.stderr
    assert not exists(pg, project, "a")


@pytest.mark.parametrize("runs", [2, 8])
def test_concurrent_runs_apply_each_migration_once(pg: Cluster, project: Project, db: str, runs: int,
                                                   tmp_path: Path) -> None:
    mig(project, "1_hits", "CREATE TABLE hits (version int);\nINSERT INTO hits VALUES (1);\n")
    for v in range(2, 7):
        mig(project, f"{v}_hit", f"INSERT INTO hits VALUES ({v});\nSELECT pg_sleep(0.05);\n")
    env = {**_clean_env(), **pg.env, "NO_COLOR": "1"}
    procs = [subprocess.Popen(confiture_argv("migrate", "up"),
                              cwd=project.root, env=confiture_environ(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(runs)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert all(code == 0 for code, _ in results), results
    assert pg.query("SELECT version, count(*) FROM hits GROUP BY 1 ORDER BY 1", db=db) == [
        (v, 1) for v in range(1, 7)]
    assert len(tracked(pg, project)) == 6


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE_"))}


def _start(project: Project, pg: Cluster, *args: str) -> subprocess.Popen[str]:
    env = {**_clean_env(), **pg.env, "NO_COLOR": "1"}
    return subprocess.Popen(confiture_argv(*args), cwd=project.root,
                            env=confiture_environ(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _running(pg: Cluster, db: str, fragment: str) -> bool:
    return bool(pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                          "AND query LIKE %s AND state = 'active'", params=(db, f"%{fragment}%")))


def _lock_pollers(pg: Cluster, db: str) -> int:
    """Sessions whose last query (idle or not: pg_stat_activity keeps it) tried an advisory lock."""
    return int(pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                          "AND query LIKE '%%pg_try_advisory_lock%%'", params=(db,)))


def _sessions(pg: Cluster, db: str) -> int:
    return int(pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                         "AND application_name = 'confiture'", params=(db,)))


def test_killed_client_leaves_nothing_half_recorded(pg: Cluster, project: Project, db: str) -> None:
    mig(project, "1_slow", "CREATE TABLE slow_one (id int);\nSELECT pg_sleep(1.5);\n"
                           "CREATE TABLE slow_two (id int);\n")
    proc = _start(project, pg, "migrate", "up")
    _wait_for(lambda: _running(pg, db, "pg_sleep"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for(lambda: _sessions(pg, db) == 0)  # psql finishes or dies; either way the lock goes
    applied = tracked(pg, project) == [(1, "applied")]
    assert exists(pg, project, "slow_one") == applied == exists(pg, project, "slow_two")
    assert pg.scalar(f"SELECT pg_try_advisory_lock({LOCK_SQL})", db=db)


def test_sigterm_rolls_back_the_running_migration(pg: Cluster, project: Project, db: str) -> None:
    mig(project, "1_fast", "CREATE TABLE fast (id int);\n")
    mig(project, "2_slow", "CREATE TABLE slow_one (id int);\nSELECT pg_sleep(30);\n")
    proc = _start(project, pg, "migrate", "up")
    _wait_for(lambda: _running(pg, db, "pg_sleep"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130
    _wait_for(lambda: _sessions(pg, db) == 0)
    assert tracked(pg, project) == [(1, "applied")]
    assert exists(pg, project, "fast") and not exists(pg, project, "slow_one")


def test_sigterm_runs_nothing_queued_behind_the_running_migration(pg: Cluster, project: Project,
                                                                   db: str) -> None:
    """psql is handed the next migration while one runs; stopping the run must not let it run."""
    mig(project, "1_slow", "CREATE TABLE slow_one (id int);\nSELECT pg_sleep(30);\n")
    mig(project, "2_queued", "CREATE TABLE queued (id int);\n")
    mig(project, "3_queued", "CREATE TABLE queued_too (id int);\n")
    proc = _start(project, pg, "migrate", "up")
    _wait_for(lambda: _running(pg, db, "pg_sleep"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130
    _wait_for(lambda: _sessions(pg, db) == 0)
    assert tracked(pg, project) == []
    assert not exists(pg, project, "slow_one") and not exists(pg, project, "queued")
    assert not exists(pg, project, "queued_too")


def test_waiting_run_does_not_block_create_index_concurrently(pg: Cluster, project: Project,
                                                              db: str) -> None:
    add_config(project, '[migrations]\nlock_timeout = "60s"')
    mig(project, "1_big", "CREATE TABLE big (x int);\nINSERT INTO big SELECT generate_series(1, 1000);\n")
    mig(project, "2_cic", "-- confiture:no-transaction\nCREATE INDEX CONCURRENTLY big_x ON big (x);\n")
    with pg.connect(db, autocommit=False) as blocker:
        # an open snapshot: CREATE INDEX CONCURRENTLY waits for it to end
        blocker.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        blocker.execute("SELECT 1")
        holder = _start(project, pg, "migrate", "up")
        _wait_for(lambda: _running(pg, db, "CREATE INDEX CONCURRENTLY"))
        pollers = _lock_pollers(pg, db)
        waiter = _start(project, pg, "migrate", "up")
        _wait_for(lambda: _lock_pollers(pg, db) > pollers)  # the waiter polls the lock meanwhile
        assert waiter.poll() is None and holder.poll() is None
        blocker.rollback()
    assert holder.wait(timeout=60) == 0, holder.stderr.read()  # type: ignore[union-attr]
    waited = waiter.communicate(timeout=60)[1]
    assert waiter.returncode == 0, waited
    assert "waiting for the migration lock" in waited and "held by pid" in waited
    assert pg.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'big_x'::regclass", db=db)
    assert tracked(pg, project) == [(1, "applied"), (2, "applied")]


# ── real world: 233 Diesel migrations from Lemmy ────────────────────────────────────────────

def test_lemmy_migrations_up_and_down_to_the_upstream_bug(pg: Cluster, project: Project, cli: CliRunner,
                                                          db: str) -> None:
    if not LEMMY.is_dir():
        pytest.skip(f"corpus not found at {LEMMY} (shared/corpora beside the checkout)")
    text = project.config_path.read_text().replace('migrations = "db/migrations"',
                                                   f'migrations = "{LEMMY}"')
    project.config_path.write_text(text)
    up = cli("migrate", "up", "-q", cwd=project.root, timeout=300)
    assert up.returncode == 0, up.stderr
    assert len(tracked(pg, project)) == 233
    assert pg.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", db=db) >= 70
    down = cli("migrate", "down", "--to", "0", "-q", cwd=project.root, timeout=300)
    assert down.returncode == 1
    assert "2023-07-05-000058_person-admin" in down.stderr
    assert "down.sql:1" in down.stderr and 'index "idx_person_admin" does not exist' in down.stderr
    assert "reverted 75 migration(s)" in down.stderr
    rows = tracked(pg, project)
    assert len(rows) == 158 and rows[-1][0] == 20230705000058
    # the schema matches the table: reverted migrations' tables are gone, older ones remain
    assert not exists(pg, project, "sent_activity") and not exists(pg, project, "local_site_url_blocklist")
    assert exists(pg, project, "person")
    status = json.loads(cli("migrate", "status", "--json", cwd=project.root).stdout)
    assert len(status["pending"]) == 75 and not status["changed"] and not status["missing"]


# ── versions past bigint: popx/ory-style 20-digit histories ───────────────────────────────

def test_versions_are_exact_integers_of_any_length(tmp_path: Path) -> None:
    (tmp_path / "20150100000001000001_b.up.sql").write_text("")
    (tmp_path / "20150100000001000000_a.up.sql").write_text("")
    (tmp_path / "9_small.up.sql").write_text("")
    versions = [m.version for m in confiture.scan_migrations(tmp_path).migrations]
    assert versions == [9, 20150100000001000000, 20150100000001000001]  # a float would merge them
    assert confiture.parse_version("2015-01-00-000001000000") == 20150100000001000000
    with pytest.raises(confiture.ConfigError):
        confiture.parse_version("١٢")  # Arabic-Indic digits are not a version


def _popx_history(project: Project, count: int) -> list[int]:
    """`count` migrations with 20-digit versions (popx style), flat and folder layouts, some
    run without a transaction, some empty; each up records its version in `seen`."""
    versions = []
    for i in range(count):
        version = 20150100000001000000 + i * 1000 + (i % 3)  # beyond bigint's 9223372036854775807
        versions.append(version)
        body = f"INSERT INTO seen (v) VALUES ({version});\n"
        down = f"DELETE FROM seen WHERE v = {version};\n"
        if i == 0:
            body = "CREATE TABLE seen (id bigint GENERATED ALWAYS AS IDENTITY, v numeric);\n"
            down = "DROP TABLE seen;\n"
        elif i % 7 == 0:
            body = down = "-- nothing to do here\n"
        elif i % 10 == 0:
            body = f"-- confiture:no-transaction\n{body}SELECT 1;\n"
        if i % 11 == 5:  # Diesel folders: the dashes are not part of the number
            text = str(version)
            label = f"{text[:4]}-{text[4:6]}-{text[6:8]}-{text[8:]}_step_{i}"
            project.write(f"db/migrations/{label}/up.sql", body)
            project.write(f"db/migrations/{label}/down.sql", down)
        else:
            mig(project, f"{version}_step_{i}", body, down)
    return versions


def test_a_300_migration_popx_history_goes_up_down_and_up_again(pg: Cluster, project: Project, cli: CliRunner,
                                                                db: str) -> None:
    versions = _popx_history(project, 300)
    # one shorter version: numeric order puts it first, text order would put it last
    mig(project, "7_early", "CREATE TABLE early (id int);\n", "DROP TABLE early;\n")
    expected = [7, *versions]
    up = cli("migrate", "up", "-q", cwd=project.root)
    assert up.returncode == 0, up.stderr
    assert [v for v, _ in tracked(pg, project)] == expected
    assert pg.scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                     "'confiture_migrations'::regclass AND attname = 'version'", db=db) == "numeric"
    # applied in numeric order: `seen` got the versions in ascending order
    filled = [v for i, v in enumerate(versions) if i and i % 7]
    assert [int(v) for v, in pg.query("SELECT v FROM seen ORDER BY id", db=db)] == filled
    status = cli("migrate", "status", "--check", "--json", cwd=project.root)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["current"] == versions[-1] and len(doc["applied"]) == 301 and not doc["pending"]
    down = cli("migrate", "down", "--to", "0", "-q", cwd=project.root)
    assert down.returncode == 0, down.stderr
    assert tracked(pg, project) == [] and not exists(pg, project, "seen")
    assert pg.scalar("SELECT count(*) FROM confiture_migrations_log WHERE event = 'reverted'",
                     db=db) == 301
    again = cli("migrate", "up", "-q", cwd=project.root)
    assert again.returncode == 0, again.stderr
    assert [v for v, how in tracked(pg, project)] == expected
    assert pg.scalar("SELECT count(*) FROM seen", db=db) == len(filled)


_OLD_TRACKING_DDL = """
CREATE TABLE confiture_migrations (
  version bigint PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now(),
  applied_by text NOT NULL DEFAULT current_user,
  duration_ms integer NOT NULL DEFAULT 0, how text NOT NULL DEFAULT 'applied');
CREATE TABLE confiture_migrations_log (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(), by text NOT NULL DEFAULT current_user,
  event text NOT NULL, version bigint, name text, checksum text, detail jsonb);
"""


def test_tracking_table_of_an_earlier_version_is_read_as_is_and_upgraded_by_up(
        pg: Cluster, project: Project, cli: CliRunner, db: str) -> None:
    mig(project, "20240101000000_first", "CREATE TABLE first (id int);\n", "DROP TABLE first;\n")
    first = confiture.scan_migrations(project.root / "db" / "migrations").migrations[0]
    pg.query(_OLD_TRACKING_DDL, db=db)
    pg.query("CREATE TABLE first (id int)", db=db)
    pg.query("INSERT INTO confiture_migrations (version, name, checksum) VALUES (%s, %s, %s)",
               db=db, params=(first.version, first.name, first.checksum))
    pg.query("INSERT INTO confiture_migrations_log (event, version) VALUES ('applied', %s)",
               db=db, params=(first.version,))
    types = ("SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attrelid::regclass::text)"
             " FROM pg_attribute WHERE attname = 'version' AND attrelid IN "
             "('confiture_migrations'::regclass, 'confiture_migrations_log'::regclass)")
    mig(project, "20150100000002000000_popx", "CREATE TABLE popx (id int);\n", "DROP TABLE popx;\n")
    # read-only commands read the old form and leave it alone
    status = cli("migrate", "status", "--json", cwd=project.root)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["current"] == 20240101000000
    assert [m["version"] for m in doc["pending"]] == [20150100000002000000]  # newer: 20 digits
    assert pg.scalar(types, db=db) == "bigint,bigint"
    # a writing command widens both tables in place, keeping their rows
    up = cli("migrate", "up", cwd=project.root)
    assert up.returncode == 0, up.stderr
    assert pg.scalar(types, db=db) == "numeric,numeric"
    assert tracked(pg, project) == [(20240101000000, "applied"), (20150100000002000000, "applied")]
    assert pg.query("SELECT event, version FROM confiture_migrations_log ORDER BY id", db=db)[0] == (
        "applied", 20240101000000)
    assert exists(pg, project, "popx")


def _library_workspace(project: Project, env: str) -> confiture.Workspace:
    config = confiture.load_config(project.config_path)
    environ = confiture_environ(os.environ)
    return confiture.open_workspace(confiture.resolve_env(config, env, environ),
                                    confiture.Console(stderr=io.StringIO()), environ)


def test_a_library_migrate_up_on_a_protected_env_backs_up_under_the_lock(
        project: Project, pg: Cluster) -> None:
    """The backup of a protected env is the run's own (SPEC §5): taken by migrate_up/down
    called as a library, after the migration lock is held, only when something will run."""
    pg.create_db(project.db("prod"))
    project.write("db/migrations/001_a.up.sql", "CREATE TABLE a_71 (id int);\n")
    project.write("db/migrations/001_a.down.sql", "DROP TABLE a_71;\n")
    folder = project.root / ".confiture/backups/prod"
    # another session holds the migration lock: the run gives up before any backup
    project.write("confiture.toml", project.config_path.read_text(encoding="utf-8")
                  + '\n[migrations]\nlock_timeout = "300ms"\n')
    ws = _library_workspace(project, "prod")
    with pg.connect(project.db("prod")) as holder:
        holder.execute("SELECT pg_advisory_lock(1668247142, hashtext('migrate'))")
        with pytest.raises(confiture.LockTimeout):
            confiture.migrate_up(ws)
    assert not list(folder.glob("*.dump"))
    run = confiture.migrate_up(ws)
    assert run.backup is not None and [m.label for m, _ in run.done] == ["001_a"]
    sidecar = json.loads(confiture.sidecar_path(run.backup.path).read_text(encoding="utf-8"))
    assert sidecar["migration_version"] is None  # taken before the migration ran
    assert confiture.migrate_up(ws).backup is None  # nothing planned: no backup
    assert len(list(folder.glob("*.dump"))) == 1
    down = confiture.migrate_down(ws, steps=1)
    assert down.backup is not None and down.backup.migration_version == "1"
    assert pg.scalar("SELECT to_regclass('public.a_71') IS NULL", db=project.db("prod"))


def test_status_columns_stay_aligned_with_20_digit_versions(cli: CliRunner, project: Project,
                                                            db: str) -> None:
    mig(project, "20240101000000_short", "CREATE TABLE s (id int);\n")
    mig(project, "20150100000002000000_long", "CREATE TABLE l (id int);\n")
    result = cli("migrate", "status", cwd=project.root)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.lstrip().startswith("pending")]
    assert len(rows) == 2, result.stdout
    assert rows[0].index("short") == rows[1].index("long"), result.stdout
