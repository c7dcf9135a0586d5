"""Backups, `backups list|prune` and safe restore against a real server; psycopg checks outcomes."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import time
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

PGBIN = os.environ.get("PGBIN") or subprocess.run(
    ["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip() \
    or "/usr/lib/postgresql/15/bin"

SCHEMA = """\
CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL, photo bytea,
                        created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     customer_id bigint REFERENCES customers, total numeric(10, 2))
  PARTITION BY RANGE (id);
CREATE TABLE orders_1 PARTITION OF orders FOR VALUES FROM (1) TO (1000000);
CREATE MATERIALIZED VIEW big_spenders AS SELECT customer_id, sum(total) FROM orders GROUP BY 1
  WITH NO DATA;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.created_at := coalesce(NEW.created_at, now()); RETURN NEW; END $$;
CREATE TRIGGER customers_touch BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION touch();
"""


def fill(pg: Cluster, db: str, rows: int = 200, role: str | None = None) -> None:
    as_role = f'SET ROLE "{role}";\n' if role else ""
    pg.query(as_role + SCHEMA, db=db)
    pg.query(as_role + "INSERT INTO customers (id, email, photo) SELECT i, 'u' || i || "
             f"'@example.com', decode(md5(i::text), 'hex') FROM generate_series(1, {rows}) i", db=db)
    pg.query(as_role + f"INSERT INTO orders (customer_id, total) SELECT 1 + i % {rows}, i * 1.5 "
             f"FROM generate_series(1, {rows * 2}) i", db=db)


def checksums(pg: Cluster, db: str) -> dict[str, Any]:
    """Row checksums of every user table, computed by the server (the oracle, not the tool)."""
    tables = [r[0] for r in pg.query(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname NOT IN "
        "('pg_catalog', 'information_schema') ORDER BY 1", db=db)]
    return {t: pg.scalar(f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
                         f"|| ':' || count(*) FROM {t} x", db=db) for t in tables}


def schema_dump(pg: Cluster, db: str) -> str:
    out = subprocess.run([f"{PGBIN}/pg_dump", "--schema-only", "-d", pg.url(db)],
                         capture_output=True, text=True, check=True)
    return "\n".join(line for line in out.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def db_oid(pg: Cluster, db: str) -> int | None:
    return pg.scalar("SELECT oid FROM pg_database WHERE datname = %s", params=(db,))


def side_databases(pg: Cluster, project: Project, kind: str) -> list[str]:
    return [r[0] for r in pg.query("SELECT datname FROM pg_database WHERE datname LIKE %s "
                                   "ORDER BY 1", params=(f"{project.name}%\\_{kind}\\_%",))]


def backups_in(project: Project, env: str = "local") -> list[Path]:
    return sorted((project.root / ".confiture/backups" / env).glob("*.dump"))


def test_backup_writes_a_verified_dump_and_sidecar(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db)
    result = cli("backup", "--json", cwd=project.root)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    path = Path(doc["path"])
    assert path.parent == project.root / ".confiture/backups/local"
    assert path.name.startswith(f"{project.name}_local_") and path.name.endswith("Z.dump")
    side = json.loads(Path(str(path) + ".json").read_text())
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert side["size"] == path.stat().st_size and side["complete"] is True
    assert side["env"] == "local" and side["database"] == db
    assert side["server_version"].startswith(pg.scalar("SHOW server_version").split()[0])
    for key in ("created_at", "migration_version", "tool_version", "file"):
        assert key in side
    listing = subprocess.run([f"{PGBIN}/pg_restore", "--list", str(path)], capture_output=True)
    assert listing.returncode == 0
    assert {p.name for p in path.parent.iterdir()} == {path.name, path.name + ".json"}


def test_round_trip_restores_identical_schema_and_data(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db)
    pg.query(f'ALTER DATABASE "{db}" SET work_mem = \'7MB\'')
    pg.query(f'ALTER DATABASE "{db}" SET search_path = "$user", public, extra')
    pg.query(f"COMMENT ON DATABASE \"{db}\" IS 'the shop'")
    before_schema, before_rows = schema_dump(pg, db), checksums(pg, db)
    assert cli("backup", cwd=project.root).returncode == 0
    # damage the database after the backup
    pg.query("DELETE FROM orders WHERE id % 3 = 0; UPDATE customers SET email = 'x'; "
             "DROP MATERIALIZED VIEW big_spenders; CREATE TABLE stray (id int)", db=db)
    old_oid = db_oid(pg, db)
    result = cli("restore", "latest", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert schema_dump(pg, db) == before_schema
    assert checksums(pg, db) == before_rows
    settings = pg.scalar("SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d "
                         "ON d.oid = s.setdatabase WHERE d.datname = %s", params=(db,))
    assert sorted(settings) == sorted(['work_mem=7MB', 'search_path="$user", public, extra'])
    assert pg.scalar("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                     "WHERE datname = %s", params=(db,)) == "the shop"
    # the replaced database is kept, with the damaged state, until the user drops it
    [replaced] = side_databases(pg, project, "replaced")
    assert db_oid(pg, replaced) == old_oid
    assert pg.scalar("SELECT count(*) FROM stray", db=replaced) == 0
    listed = cli("backups", "--json", cwd=project.root)
    assert [d["datname"] for d in json.loads(listed.stdout)["replaced_databases"]] == [replaced]
    assert side_databases(pg, project, "restore") == []
    pruned = cli("backups", "prune", "--replaced", cwd=project.root)
    assert pruned.returncode == 0, pruned.stderr
    assert side_databases(pg, project, "replaced") == []
    assert len(backups_in(project)) == 1


def test_corrupted_backup_is_refused_before_touching_the_target(pg: Cluster, project: Project,
                                                                 cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db)
    assert cli("backup", cwd=project.root).returncode == 0
    [path] = backups_in(project)
    pg.query("UPDATE customers SET email = 'after backup'", db=db)
    before, oid = checksums(pg, db), db_oid(pg, db)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = cli("restore", str(path), cwd=project.root)
    assert result.returncode == 1
    assert "corrupted" in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert db_oid(pg, db) == oid and checksums(pg, db) == before
    assert side_databases(pg, project, "restore") == []
    assert side_databases(pg, project, "replaced") == []
    # a truncated file is caught by its size; a file that is no archive at all by pg_restore
    path.write_bytes(bytes(data[: len(data) // 2]))
    truncated = cli("restore", str(path), cwd=project.root)
    assert truncated.returncode == 1 and "corrupted" in truncated.stderr
    junk = project.write("junk.dump", b"not a dump at all\n" * 10)
    refused = cli("restore", str(junk), cwd=project.root)
    assert refused.returncode == 1 and "not a readable pg_dump archive" in refused.stderr
    assert db_oid(pg, db) == oid and checksums(pg, db) == before
    assert side_databases(pg, project, "restore") == []


def test_restore_killed_with_sigkill_leaves_target_unchanged(pg: Cluster, project: Project,
                                                             cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db, rows=150_000)
    assert cli("backup", cwd=project.root).returncode == 0
    pg.query("DELETE FROM orders WHERE id % 2 = 0", db=db)
    before, oid = checksums(pg, db), db_oid(pg, db)
    env = clean_environ()
    env.update(pg.env)
    proc = subprocess.Popen(confiture_argv("restore", "latest"),
                            cwd=project.root, env=confiture_environ(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)",
                        params=(side_databases(pg, project, "restore"),)):  # pg_restore is at work
        assert proc.poll() is None and time.monotonic() < deadline, "restore ended too soon"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert db_oid(pg, db) == oid and checksums(pg, db) == before
    assert side_databases(pg, project, "replaced") == []
    assert len(side_databases(pg, project, "restore")) == 1
    # the next run removes the half-restored scratch database and restores properly
    again = cli("restore", "latest", cwd=project.root)
    assert again.returncode == 0, again.stderr
    assert "leftover scratch" in again.stderr
    assert side_databases(pg, project, "restore") == []
    assert pg.scalar("SELECT count(*) FROM orders", db=db) == 300_000


def test_restore_refuses_other_sessions_unless_forced(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db)
    assert cli("backup", cwd=project.root).returncode == 0
    pg.query("DELETE FROM orders", db=db)
    with pg.connect(db) as other:
        refused = cli("restore", "latest", cwd=project.root)
        assert refused.returncode == 4 and "other session" in refused.stderr
        assert pg.scalar("SELECT count(*) FROM orders", db=db) == 0
        forced = cli("restore", "latest", "--force", cwd=project.root)
        assert forced.returncode == 0, forced.stderr
        assert other.closed or other.broken or _is_dead(other)
    assert pg.scalar("SELECT count(*) FROM orders", db=db) == 400


def _is_dead(conn: Any) -> bool:
    try:
        conn.execute("SELECT 1")
    except Exception:
        return True
    return False


def test_protected_restore_needs_yes(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db("prod")
    pg.create_db(db)
    fill(pg, db)
    assert cli("backup", "--env", "prod", cwd=project.root).returncode == 0
    pg.query("DELETE FROM orders", db=db)
    oid = db_oid(pg, db)
    refused = cli("restore", "latest", "--env", "prod", cwd=project.root)
    assert refused.returncode == 4 and "--yes" in refused.stderr
    assert db_oid(pg, db) == oid and pg.scalar("SELECT count(*) FROM orders", db=db) == 0
    done = cli("restore", "latest", "--env", "prod", "--yes", cwd=project.root)
    assert done.returncode == 0, done.stderr
    assert pg.scalar("SELECT count(*) FROM orders", db=db) == 400


def test_backups_list_and_prune(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db, rows=10)
    for _ in range(3):
        assert cli("backup", cwd=project.root).returncode == 0
    folder = project.root / ".confiture/backups/local"
    assert len(backups_in(project)) == 3  # same second: unique names all the same
    # not backups: a dump without a sidecar, a sidecar that is not complete, a dead run's temp file
    project.write(".confiture/backups/local/orphan.dump", b"x")
    project.write(".confiture/backups/local/half.dump", b"x")
    project.write(".confiture/backups/local/half.dump.json", '{"complete": false, "size": 1}')
    project.write(".confiture/backups/local/.20200101T000000Z.999999999.dump.tmp", b"x")
    listed = json.loads(cli("backups", "--json", cwd=project.root).stdout)
    names = [Path(b["path"]).name for b in listed["backups"]]
    assert len(names) == 3 and "orphan.dump" not in names and "half.dump" not in names
    newest = names[0]
    pruned = cli("backups", "prune", "--keep", "1", cwd=project.root)
    assert pruned.returncode == 0, pruned.stderr
    left = {p.name for p in folder.iterdir()}
    assert newest in left and newest + ".json" in left
    assert not any(n.endswith(".tmp") for n in left)
    assert len([n for n in left if n.endswith(".dump") and n not in ("orphan.dump", "half.dump")]) == 1


def test_backup_into_unwritable_folder_fails_clearly(pg: Cluster, project: Project, cli: CliRunner) -> None:
    db = project.db()
    pg.create_db(db)
    project.write("not_a_folder", "a file where the backup folder should be\n")
    text = project.config_path.read_text().replace(
        "seeds = [\"common\", \"dev\"]", "seeds = [\"common\", \"dev\"]\nbackups = \"not_a_folder/x\"")
    project.config_path.write_text(text)
    result = cli("backup", cwd=project.root)
    assert result.returncode == 1
    assert "cannot create backup folder" in result.stderr and "not_a_folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_disk_full_during_backup_leaves_no_partial_file(pg: Cluster, project: Project) -> None:
    db = project.db()
    pg.create_db(db)
    fill(pg, db, rows=20_000)
    env = clean_environ()
    env.update(pg.env, NO_COLOR="1")

    def limit_file_size() -> None:  # the dump hits the limit like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run(confiture_argv("backup"), cwd=project.root,
                            env=confiture_environ(env), capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    assert "pg_dump" in result.stderr and "Traceback" not in result.stderr
    folder = project.root / ".confiture/backups/local"
    assert list(folder.iterdir()) == []


def test_existing_output_file_is_never_overwritten(pg: Cluster, project: Project, cli: CliRunner) -> None:
    pg.create_db(project.db())
    target = project.write("keep.dump", b"precious")
    result = cli("backup", "-o", str(target), cwd=project.root)
    assert result.returncode == 4 and target.read_bytes() == b"precious"
    fresh = cli("backup", "-o", str(project.root / "new.dump"), cwd=project.root)
    assert fresh.returncode == 0, fresh.stderr
    assert (project.root / "new.dump.json").is_file()


def test_restore_without_createdb_falls_back_to_one_transaction(pg: Cluster, project: Project,
                                                                 cli: CliRunner) -> None:
    db = project.db()
    role = project.name + "_owner"
    pg.query(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        pg.query(f'CREATE DATABASE "{db}" OWNER "{role}"')
        fill(pg, db, role=role)
        text = project.config_path.read_text().replace(
            f"postgresql://postgres@/{project.name}_local", f"postgresql://{role}@/{project.name}_local")
        project.config_path.write_text(text)
        assert cli("backup", cwd=project.root).returncode == 0
        before = checksums(pg, db)
        pg.query("DELETE FROM orders WHERE id > 10; UPDATE customers SET email = 'y'", db=db)
        oid = db_oid(pg, db)
        result = cli("restore", "latest", cwd=project.root)
        assert result.returncode == 0, result.stderr
        assert "CREATEDB" in result.stderr
        assert db_oid(pg, db) == oid and checksums(pg, db) == before
        assert len(backups_in(project)) == 2  # the overwritten state was backed up first
    finally:
        pg.drop_db(db)
        pg.query(f'DROP ROLE IF EXISTS "{role}"')


def test_unmarked_scratch_database_of_a_killed_restore_is_dropped(pg: Cluster, project: Project,
                                                                  cli: CliRunner) -> None:
    """Issue 11.8: a restore killed between CREATE DATABASE and its COMMENT leaves a database
    without a mark; its name alone makes it a leftover (a look-alike of another db is kept)."""
    import confiture

    db = project.db()
    pg.create_db(db)
    fill(pg, db, rows=10)
    leftover = confiture.side_name(db, "restore", confiture.utc_stamp())
    other = confiture.side_name(db + "x", "restore", confiture.utc_stamp())
    pg.create_db(leftover)
    pg.create_db(other)
    try:
        result = cli("backups", "prune", cwd=project.root)
        assert result.returncode == 0, result.stderr
        assert not pg.db_exists(leftover) and pg.db_exists(other)
    finally:
        pg.drop_db(other)


def test_two_restores_in_the_same_second_keep_both_replaced_databases(
        pg: Cluster, project: Project, cli: CliRunner, monkeypatch: Any) -> None:
    import confiture

    db = project.db()
    pg.create_db(db)
    fill(pg, db, rows=10)
    assert cli("backup", cwd=project.root).returncode == 0
    monkeypatch.setattr(confiture, "utc_stamp", lambda when=None: "20260101T000000Z")
    ws = confiture.workspace_for(project.config_path, env="local", environ={**clean_environ(),
                                                                          **pg.env})
    backup = backups_in(project)[0]
    first = confiture.restore_backup(ws, backup)
    second = confiture.restore_backup(ws, backup)
    assert first.replaced and second.replaced and first.replaced != second.replaced
    assert len(side_databases(pg, project, "replaced")) == 2
    assert pg.scalar("SELECT count(*) FROM customers", db=db) == 10


def test_backups_prune_refuses_keep_below_one(pg: Cluster, project: Project,
                                              cli: CliRunner) -> None:
    """As [backups] keep is checked at load (at least 1), so is --keep: prune keeps the newest."""
    pg.create_db(project.db())
    assert cli("backup", cwd=project.root).returncode == 0
    refused = cli("backups", "prune", "--keep", "0", cwd=project.root)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--keep must be at least 1, not 0" in refused.stderr
    assert len(list((project.root / ".confiture/backups/local").glob("*.dump"))) == 1
