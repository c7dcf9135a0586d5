"""Wiring between areas: what one command promises about another (SPEC §5 backups before
writes to protected environments; the example project end to end)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from helpers import CliRunner, Cluster, Project

ROOT = Path(__file__).resolve().parent.parent


def test_migrate_up_on_protected_env_backs_up_first(pg: Cluster, project: Project, cli: CliRunner) -> None:
    pg.create_db(project.db("prod"))
    pg.query("CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL)", db=project.db("prod"))
    pg.query("INSERT INTO widgets VALUES (1, 'precious')", db=project.db("prod"))
    project.write("db/migrations/20240101000000_note.up.sql", "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",  # the DDL agrees (the guard checks it)
                  "CREATE TABLE widgets (id bigint PRIMARY KEY, label text NOT NULL, note text);\n")
    refused = cli("--env", "prod", "migrate", "up", cwd=project.root)
    assert refused.returncode == 4
    assert not (project.root / ".confiture" / "backups" / "prod").exists()
    done = cli("--env", "prod", "migrate", "up", "--yes", cwd=project.root)
    assert done.returncode == 0, done.stderr
    assert "backed up" in done.stderr
    sidecars = list((project.root / ".confiture" / "backups" / "prod").glob("*.json"))
    assert len(sidecars) == 1
    meta = json.loads(sidecars[0].read_text())
    dump = sidecars[0].with_suffix("")
    assert meta["complete"] is True and dump.stat().st_size == meta["size"]
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == meta["sha256"]
    # nothing pending: no second backup
    again = cli("--env", "prod", "migrate", "up", "--yes", cwd=project.root)
    assert again.returncode == 0
    assert len(list((project.root / ".confiture" / "backups" / "prod").glob("*.json"))) == 1


def test_example_project_end_to_end(pg: Cluster, project: Project, cli: CliRunner) -> None:
    """sql/: build, reset, status, a deploy to the protected env, and drift against the DDL."""
    shutil.copytree(ROOT / "sql", project.root / "sql")
    text = project.config_path.read_text()
    for old, new in (('"db/schema"', '"sql/schema"'), ('"db/seeds"', '"sql/seeds"'),
                     ('"db/migrations"', '"sql/migrations"')):
        text = text.replace(old, new)
    # its migrations start from the schema production had before them (the guard replays them)
    project.config_path.write_text(text + '\n[migrations]\nbaseline_schema = "sql/baseline.sql"\n')
    assert cli("reset", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT count(*) FROM customers", db=project.db("local")) > 0
    status = cli("migrate", "status", "--check", cwd=project.root)
    assert status.returncode == 0, status.stdout + status.stderr
    deploy = cli("--env", "prod", "deploy", "--yes", cwd=project.root, timeout=300)
    assert deploy.returncode == 0, deploy.stderr
    # a protected env gets the schema, never the seeds
    assert pg.scalar("SELECT count(*) FROM customers", db=project.db("prod")) == 0
    assert pg.scalar("SELECT count(*) FROM confiture_migrations", db=project.db("prod")) == 3
    drift = cli("--env", "prod", "diff", cwd=project.root, timeout=300)
    assert drift.returncode == 0, drift.stdout + drift.stderr
