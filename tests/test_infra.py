"""bin/pg-dev and the test fixtures themselves: the ground every other test stands on."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import PG_DEV, ROOT, Cluster, Project, parse_env_output, pg_dev
from psycopg import sql


@pytest.fixture
def scratch() -> Iterator[str]:
    """A cluster name of our own for destructive tests; destroyed afterwards."""
    name = "infra-" + secrets.token_hex(3)
    yield name
    pg_dev("destroy", name, check=False)


def postmaster_pid(cluster: Cluster | str) -> int:
    env = parse_env_output(pg_dev("env", cluster if isinstance(cluster, str) else cluster.name).stdout)
    location = Path(env["PGHOST"])
    return int((location / "data" / "postmaster.pid").read_text().split()[0])


def test_start_is_idempotent(pg: Cluster) -> None:
    pid = postmaster_pid(pg)
    again = pg_dev("start", pg.name)
    assert again.returncode == 0 and "already running" in again.stderr
    assert postmaster_pid(pg) == pid
    assert pg.scalar("SELECT 1") == 1


def test_status_exit_codes_and_stop_is_idempotent(scratch: str) -> None:
    assert pg_dev("status", scratch, check=False).returncode == 3
    assert pg_dev("stop", scratch, check=False).returncode == 0
    pg_dev("start", scratch)
    status = pg_dev("status", scratch, check=False)
    assert status.returncode == 0 and "running" in status.stdout
    pg_dev("stop", scratch)
    assert pg_dev("status", scratch, check=False).returncode == 3
    assert pg_dev("stop", scratch, check=False).returncode == 0
    pg_dev("destroy", scratch)
    assert not (ROOT / ".confiture" / "pg" / scratch).exists()


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    for args in ([], ["frobnicate"], ["start", "a b"]):
        result = subprocess.run([str(PG_DEV), *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode in (1, 2) and result.stderr, args


def test_env_output_evaluates_from_any_cwd(pg: Cluster, tmp_path: Path) -> None:
    script = f'eval "$({PG_DEV} env {pg.name})" && printf "%s\\n" "$PGHOST" "$PGPORT" "$PGUSER" "$PGDATABASE"'
    out = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [pg.host, str(pg.port), "postgres", "postgres"]
    with psycopg.connect(host=out[0], port=out[1], user=out[2], dbname=out[3]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_url_is_a_valid_libpq_url(pg: Cluster) -> None:
    with psycopg.connect(pg.url("postgres")) as conn:
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (pg.host,)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_start_survives_a_killed_postmaster(scratch: str) -> None:
    pg_dev("start", scratch)
    pid = postmaster_pid(scratch)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pg_dev("status", scratch, check=False).returncode == 0:
        time.sleep(0.1)
    assert pg_dev("status", scratch, check=False).returncode == 3  # postmaster.pid is still there
    started = pg_dev("start", scratch)
    assert started.returncode == 0
    assert postmaster_pid(scratch) != pid
    env = parse_env_output(pg_dev("env", scratch).stdout)
    with psycopg.connect(host=env["PGHOST"], port=env["PGPORT"], user="postgres",
                         dbname="postgres") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_remote_requires_a_password_over_tcp(pg_remote: Cluster, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert pg_remote.tcp_port is not None
    monkeypatch.delenv("PGPASSWORD", raising=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text("")
    passfile.chmod(0o600)
    tcp = {"host": "127.0.0.1", "port": pg_remote.tcp_port, "dbname": "postgres",
           "passfile": str(passfile), "connect_timeout": 10}
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(user="postgres", **tcp).close()
    role, password = "infra_" + secrets.token_hex(3), secrets.token_hex(8)
    pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(user=role, password="wrong", **tcp).close()
        with psycopg.connect(user=role, password=password, **tcp) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        pg_remote.query(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_project_fixture_and_cleanup(pg: Cluster, project: Project) -> None:
    text = project.config_path.read_text()
    assert f'name = "{project.name}"' in text and pg.url(project.db("local")) in text
    assert (project.root / "db/schema/10_tables/10_widgets.sql").is_file()
    for folder in ("db/seeds/common", "db/seeds/dev", "db/migrations"):
        assert (project.root / folder).is_dir()
    project.write("db/seeds/dev/x/y.sql", "SELECT 1;\n")
    assert (project.root / "db/seeds/dev/x/y.sql").read_text() == "SELECT 1;\n"
    pg.create_db(project.db("local"))
    pg.create_db(project.name + "_tpl", template=project.db("local"))
    pg.query(sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(
        sql.Identifier(project.name + "_tpl")))
    assert pg.db_exists(project.name + "_tpl")
    pg.drop_dbs_with_prefix(project.name)
    assert not pg.db_exists(project.db("local")) and not pg.db_exists(project.name + "_tpl")


def test_bin_confiture_uses_the_dev_cluster_only_while_it_listens(tmp_path: Path, pg: Cluster) -> None:
    """bin/confiture points libpq at the dev cluster (its socket folder from `location`, its
    port from `settings`) when nothing else is configured and its socket exists — without
    starting a process to find out. The interpreter is replaced by a script printing what it got."""
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    (repo / "bin/confiture").write_bytes((ROOT / "bin/confiture").read_bytes())
    (repo / "bin/confiture").chmod(0o755)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "PGHOST=${PGHOST:-} PGPORT=${PGPORT:-} root=$4 args=$5"\n')
    fake.chmod(0o755)
    state = repo / ".confiture/pg/dev"
    state.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHON"] = str(fake)

    def run(cwd: Path, *argv: str, extra: dict[str, str] | None = None) -> str:
        return subprocess.run([*argv, "scan"], cwd=cwd, env={**env, **(extra or {})},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert run(tmp_path, str(repo / "bin/confiture")) == f"PGHOST= PGPORT= root={repo} args=scan"
    (state / "location").write_text(pg.env["PGHOST"] + "\n")
    (state / "settings").write_text(f"port={pg.env['PGPORT']}\nlisten=\n")
    expected = f"PGHOST={pg.env['PGHOST']} PGPORT={pg.env['PGPORT']} root={repo} args=scan"
    assert run(tmp_path, str(repo / "bin/confiture")) == expected
    assert run(repo, "bin/confiture") == expected  # relative invocation, same root
    # a server the caller configured wins
    assert run(repo, "bin/confiture", extra={"PGHOST": "/elsewhere"}).startswith("PGHOST=/elsewhere ")
    # another port recorded: no socket there, so no dev cluster
    (state / "settings").write_text("port=1\nlisten=\n")
    assert run(repo, "bin/confiture").startswith("PGHOST= PGPORT= ")


def test_bin_confiture_keeps_bytecode_under_pythondontwritebytecode(tmp_path: Path) -> None:
    """With PYTHONDONTWRITEBYTECODE (Docker images, CI) Python would recompile confiture.py on
    every call; bin/confiture keeps its bytecode in .confiture/pycache instead, never beside
    the sources, and leaves a caller's own PYTHONPYCACHEPREFIX alone."""
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    (repo / "bin/confiture").write_bytes((ROOT / "bin/confiture").read_bytes())
    (repo / "bin/confiture").chmod(0o755)
    (repo / "confiture.py").write_bytes((ROOT / "confiture.py").read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PYTHON"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHON=sys.executable, PGHOST="/nonexistent")
    out = subprocess.run([str(repo / "bin/confiture"), "--version"], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("confiture.py ")
    cached = list((repo / ".confiture/pycache").rglob("confiture.*.pyc"))
    assert [p.parent for p in cached] == [repo / ".confiture/pycache" / str(repo).lstrip("/")]
    assert not (repo / "__pycache__").exists()
    mine = tmp_path / "mine"
    subprocess.run([str(repo / "bin/confiture"), "--version"], env={**env, "PYTHONPYCACHEPREFIX": str(mine)},
                   capture_output=True, check=True)
    assert not mine.exists()  # the caller's prefix with PYTHONDONTWRITEBYTECODE: nothing written
