"""status (and --check exit codes for monitoring) and multi-repo schema sources: order, hash,
git commits. Outcomes are checked with psycopg and with git itself."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import CliRunner, Cluster, Project

import confiture

GIT = shutil.which("git")


def status_json(cli: CliRunner, project: Project, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("status", "--json", *args, cwd=project.root)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


# ── status ──────────────────────────────────────────────────────────────────────────────────


def test_status_of_a_fresh_env_then_a_healthy_one(pg: Cluster, project: Project, cli: CliRunner) -> None:
    code, status = status_json(cli, project, "--check")
    assert code == 3
    assert status["server"]["reachable"] is True and status["db"]["exists"] is False
    assert status["template"]["state"] == "missing"
    assert any("does not exist" in item for item in status["attention"])
    assert cli("status", cwd=project.root).returncode == 0  # without --check: informative only
    assert cli("reset", cwd=project.root).returncode == 0
    code, status = status_json(cli, project, "--check")
    assert code == 0, status["attention"]
    assert status["template"]["state"] == "current" and status["db"]["exists"] is True
    assert status["db"]["size"] == pg.scalar("SELECT pg_database_size(%s)",
                                             params=(project.db("local"),))
    assert status["drift"] == {"checked": False} and status["ok"] is True
    text = cli("status", cwd=project.root)
    assert text.returncode == 0
    assert re.search(r"^  template   \S+_tpl_local_\w+  current$", text.stdout, re.MULTILINE)
    assert "attention  none" in text.stdout


def test_status_check_flags_stale_template_and_drift(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    pg.query("ALTER TABLE widgets ADD COLUMN extra int", db=project.db("local"))
    assert cli("status", "--check", cwd=project.root).returncode == 0  # drift not checked
    code, status = status_json(cli, project, "--check", "--drift")
    assert code == 3
    assert status["drift"]["checked"] and status["drift"]["differences"] == 1
    project.write("db/schema/10_tables/20_more.sql", "CREATE TABLE more (id int);\n")
    code, status = status_json(cli, project, "--check")
    assert code == 3 and status["template"]["state"] == "stale"
    assert any("stale" in item for item in status["attention"])


def test_status_reads_backups_and_sync_reports(pg: Cluster, project: Project, cli: CliRunner) -> None:
    assert cli("reset", cwd=project.root).returncode == 0
    folder = project.root / ".confiture" / "backups" / "local"
    folder.mkdir(parents=True)
    old, new = "20200101T000000Z", "20990101T000000Z"
    for stamp, complete in ((old, True), (new, False)):  # an incomplete backup is no backup
        dump = folder / f"{project.name}_local_{stamp}.dump"
        dump.write_bytes(b"PGDMP")
        sidecar = {"file": dump.name, "sha256": "0" * 64, "size": 5, "env": "local",
                   "created_at": f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T00:00:00Z",
                   "database": project.db("local"), "complete": complete}
        Path(str(dump) + ".json").write_text(json.dumps(sidecar))
    code, status = status_json(cli, project, "--check")
    assert code == 0
    assert status["backup"]["file"].endswith(old + ".dump") and status["backup"]["age_seconds"] > 0
    text = project.config_path.read_text()
    project.config_path.write_text(text + '\n[status]\nmax_backup_age = "26h"\n')
    code, status = status_json(cli, project, "--check")
    assert code == 3 and any("last backup is" in item for item in status["attention"])
    project.config_path.write_text(text)
    reports = project.root / ".confiture" / "sync"
    reports.mkdir(parents=True)
    (reports / "20240101T000000Z_prod_to_local.json").write_text(json.dumps(
        {"started_at": "2024-01-01T00:00:00Z", "finished_at": "2024-01-01T00:01:00Z",
         "from": "prod", "to": "local", "ok": False, "tables": [], "rows": 0,
         "error": "unclassified column users.ssn"}))
    code, status = status_json(cli, project, "--check")
    assert code == 3
    assert any("users.ssn" in item for item in status["attention"])
    (reports / "20240102T000000Z_prod_to_local.json").write_text(json.dumps(
        {"started_at": "2024-01-02T00:00:00Z", "finished_at": "2024-01-02T00:01:00Z",
         "from": "prod", "to": "local", "ok": True, "tables": [], "rows": 12}))
    code, status = status_json(cli, project, "--check")
    assert code == 0 and status["sync"]["ok"] is True


def test_status_of_a_dead_server_is_clear(project: Project, cli: CliRunner, tmp_path: Path) -> None:
    text = re.sub(r'(\[env\.local\]\nurl = )"[^"]*"',
                  r'\1"postgresql:///nowhere?host=%s&port=1"' % tmp_path,
                  project.config_path.read_text())
    project.config_path.write_text(text)
    for args in ((), ("--check",)):
        result = cli("status", *args, cwd=project.root)
        assert result.returncode == 1
        assert "UNREACHABLE" in result.stdout and "source" in result.stdout
        assert "cannot connect" in result.stderr and "Traceback" not in result.stderr
    code, status = status_json(cli, project)
    assert code == 1 and status["server"]["reachable"] is False


# ── multi-repo sources ──────────────────────────────────────────────────────────────────────


def git(*args: str, cwd: Path) -> str:
    assert GIT
    return subprocess.run([GIT, "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def make_core_checkout(where: Path) -> Path:
    core = where / "core"
    (core / "db" / "10").mkdir(parents=True)
    (core / "db" / "10" / "1_accounts.sql").write_text(
        "CREATE TABLE accounts (id bigint PRIMARY KEY);\n")
    (core / "db" / "10" / "2_x.sql").write_text("CREATE TABLE core_x (id int);\n")
    (core / "db" / "10" / "10_y.sql").write_text("CREATE TABLE core_y (id int);\n")
    return core


def use_core_source(project: Project, core: Path, root: Path | None = None) -> None:
    root = root or project.root
    rel = os.path.relpath(core / "db", root)
    config = root / "confiture.toml"
    text = re.sub(r'schema = \[[^\n]*\]', f'schema = [{{ path = "{rel}", name = "core" }}, "db/schema"]',
                  config.read_text())
    config.write_text(text)
    project.write("db/schema/10_tables/20_members.sql",
                  "CREATE TABLE members (account_id bigint REFERENCES accounts (id));\n")


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_sources_build_in_order_and_show_their_git_commit(pg: Cluster, project: Project, cli: CliRunner,
                                                          tmp_path: Path) -> None:
    core = make_core_checkout(tmp_path / "repos")
    git("init", "-q", "-b", "main", cwd=core)
    git("add", ".", cwd=core)
    git("commit", "-q", "-m", "core", cwd=core)
    git("pack-refs", "--all", cwd=core)  # the commit is now only in packed-refs
    use_core_source(project, core)
    scan = cli("scan", "--json", cwd=project.root)
    assert scan.returncode == 0, scan.stderr
    report = json.loads(scan.stdout)
    assert [f["path"] for f in report["files"]] == [
        "core/10/1_accounts.sql", "core/10/2_x.sql", "core/10/10_y.sql",
        "db/schema/10_tables/10_widgets.sql", "db/schema/10_tables/20_members.sql"]
    sources = {s["name"]: s for s in report["sources"]}
    assert sources["core"]["git"]["commit"] == git("rev-parse", "HEAD", cwd=core)
    assert sources["core"]["git"]["branch"] == "main" and sources["core"]["files"] == 3
    text = cli("scan", cwd=project.root)
    assert f"source core: {os.path.relpath(core / 'db', project.root)}, 3 files, git " in text.stderr
    assert text.stdout.splitlines()[0].endswith("core/10/1_accounts.sql")  # format unchanged
    # the order holds when building: members references accounts from the other checkout
    assert cli("reset", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'members_account_id_fkey'",
                     db=project.db("local")) == 1
    status = cli("status", cwd=project.root)
    assert "core  " in status.stdout and git("rev-parse", "HEAD", cwd=core)[:12] in status.stdout
    # a worktree of the core checkout ('.git' is a file there) on another branch
    git("worktree", "add", "-q", "-b", "feature", str(tmp_path / "wt"), cwd=core)
    (tmp_path / "wt" / "db" / "10" / "3_z.sql").write_text("SELECT 1;\n")
    git("add", ".", cwd=tmp_path / "wt")
    git("commit", "-q", "-m", "z", cwd=tmp_path / "wt")
    head = confiture.read_git_head(tmp_path / "wt" / "db")
    assert head is not None and head.branch == "feature"
    assert head.commit == git("rev-parse", "HEAD", cwd=tmp_path / "wt")
    git("checkout", "-q", "--detach", cwd=core)
    detached = confiture.read_git_head(core / "db" / "10")
    assert detached is not None and detached.branch is None and detached.commit


def test_hash_is_the_same_from_two_checkout_locations(project: Project, cli: CliRunner,
                                                      tmp_path: Path) -> None:
    core = make_core_checkout(tmp_path / "repos")
    use_core_source(project, core)
    first = json.loads(cli("scan", "--json", cwd=project.root).stdout)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    shutil.copytree(project.root, elsewhere / "app", ignore=shutil.ignore_patterns("somewhere", "repos"))
    shutil.copytree(core, elsewhere / "core")
    use_core_source(project, elsewhere / "core", elsewhere / "app")
    second = json.loads(cli("scan", "--json", cwd=elsewhere / "app").stdout)
    assert first["hash"] == second["hash"]
    assert first["sources"][0]["path"] != second["sources"][0]["path"]
    # the hash does depend on the source's name and on the order of sources
    text = (elsewhere / "app" / "confiture.toml").read_text()
    (elsewhere / "app" / "confiture.toml").write_text(text.replace('name = "core"', 'name = "base"'))
    renamed = json.loads(cli("scan", "--json", cwd=elsewhere / "app").stdout)
    assert renamed["hash"] != first["hash"]


@pytest.mark.skipif(not hasattr(confiture, "migrate_up"),
                    reason="§8 migrations are not in this confiture.py yet")
def test_status_check_counts_pending_and_changed_migrations(pg: Cluster, project: Project, cli: CliRunner) -> None:
    project.write("db/migrations/20240101000000_gizmos.up.sql", "CREATE TABLE gizmos (id int);\n")
    assert cli("reset", cwd=project.root).returncode == 0
    code, status = status_json(cli, project, "--check")
    # built from the DDL: the build recorded every migration as applied
    assert code == 0 and status["migrations"]["applied"] == 1
    project.write("db/migrations/20240201000000_more.up.sql", "CREATE TABLE more (id int);\n")
    code, status = status_json(cli, project, "--check")
    assert code == 3 and status["migrations"]["pending"] == 1
    assert any(a.startswith("1 pending migration(s)") for a in status["attention"])
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    code, status = status_json(cli, project, "--check")
    assert code == 3 and status["migrations"]["applied"] == 2  # the template is stale now
    project.write("db/migrations/20240101000000_gizmos.up.sql", "CREATE TABLE gizmos (id bigint);\n")
    code, status = status_json(cli, project, "--check")
    assert code == 3 and status["migrations"]["changed"] == 1
    text = cli("status", cwd=project.root).stdout
    assert "migrations at 20240201000000: 2 applied, 0 pending, 1 changed" in text
    # a protected env whose database has no tracking table needs adopting
    pg.create_db(project.db("prod"))
    code, status = status_json(cli, project, "--env", "prod", "--check")
    assert code == 3 and any("migrate baseline" in item for item in status["attention"])
