"""Shared test helpers: bin/pg-dev clusters, the Cluster handle, scratch projects.

psycopg is the independent oracle: tests check what confiture did through these helpers,
never through confiture's own output.
"""
from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString, cast
from urllib.parse import quote

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PG_DEV = ROOT / "bin" / "pg-dev"
CONFITURE = ROOT / "confiture.py"
# The `cli` fixture: run(*args, cwd=…, env=None, input=None, timeout=120) -> CompletedProcess.
CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]
# Where the CLI runs of the tests keep confiture.py's bytecode: the folder bin/confiture uses too.
PYCACHE = ROOT / ".confiture" / "pycache"


# --- environment ----------------------------------------------------------------------------------

def clean_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without libpq (PG*) and confiture (CONFITURE_*) variables; PGBIN is kept."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if (key.startswith(("PG", "CONFITURE_")) and key != "PGBIN") or key == "NO_COLOR":
            del env[key]
    return env


def confiture_argv(*args: object) -> list[str]:
    """`python -m confiture ARGS`, as README recommends for every call after the first: Python
    loads the cached bytecode instead of compiling ~9,000 lines on every run (~0.1 s of CPU,
    hundreds of runs in the suite). Run it with confiture_environ(); `python confiture.py`
    itself is tested in test_startup.py."""
    return [sys.executable, "-m", "confiture", *map(str, args)]


def confiture_environ(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus what confiture_argv() needs: confiture.py's folder on PYTHONPATH (the run's cwd
    is a project folder) and the bytecode folder PYCACHE (also under PYTHONDONTWRITEBYTECODE=1,
    common in CI, because compile_confiture() wrote it first)."""
    full = dict(env)
    paths = [str(ROOT), *filter(None, full.get("PYTHONPATH", "").split(os.pathsep))]
    full["PYTHONPATH"] = os.pathsep.join(paths)
    full["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return full


def compile_confiture() -> None:
    """Write confiture.py's bytecode into PYCACHE once, for every confiture_argv() run."""
    env = confiture_environ(clean_environ())
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import confiture"], env=env, cwd=ROOT, check=True,
                   stdin=subprocess.DEVNULL, timeout=120)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_dev(*args: str, env: Mapping[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run bin/pg-dev ARGS (PGDEV_* settings only from `env`)."""
    full = clean_environ()
    full.update(env or {})
    result = subprocess.run([str(PG_DEV), *args], env=full, text=True, capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=180)
    if check and result.returncode != 0:
        raise RuntimeError(f"bin/pg-dev {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result


def parse_env_output(text: str) -> dict[str, str]:
    """The `export KEY=VALUE` lines printed by `bin/pg-dev env` as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


# --- clusters -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """A running bin/pg-dev cluster, reached as the `postgres` superuser over its unix socket."""

    name: str
    host: str
    port: int
    tcp_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def url(self, db: str = "postgres") -> str:
        """libpq URL of database DB: postgresql://postgres@/DB?host=SOCKETDIR&port=PORT."""
        return (f"postgresql://postgres@/{quote(db, safe='')}"
                f"?host={quote(self.host, safe='')}&port={self.port}")

    def connect(self, db: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(host=self.host, port=self.port, user="postgres", dbname=db,
                               autocommit=autocommit, connect_timeout=10)

    def query(self, sql_text: str | sql.Composable, db: str = "postgres",
              params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement in its own autocommit connection; the rows it returns, if any."""
        query = sql_text if isinstance(sql_text, sql.Composable) else cast(LiteralString, sql_text)
        with self.connect(db) as conn:
            cur = conn.execute(query, params)
            return list(cur.fetchall()) if cur.description else []

    def scalar(self, sql_text: str | sql.Composable, db: str = "postgres",
               params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        rows = self.query(sql_text, db=db, params=params)
        return rows[0][0] if rows else None

    def db_exists(self, name: str) -> bool:
        return bool(self.scalar("SELECT count(*) FROM pg_database WHERE datname = %s",
                                params=(name,)))

    def drop_db(self, name: str) -> None:
        """Drop database NAME if it exists, even a template with sessions attached."""
        with self.connect() as conn:
            ident = sql.Identifier(name)
            row = conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s",
                               (name,)).fetchone()
            if row is None:
                return
            if row[0]:
                conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))

    def create_db(self, name: str, template: str | None = None) -> None:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.connect() as conn:
            conn.execute(query)

    def drop_dbs_with_prefix(self, prefix: str) -> None:
        names = self.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                           params=(prefix,))
        for (name,) in names:
            self.drop_db(name)


def build_template(cluster: Cluster, prefix: str, *statements: str) -> str:
    """A database built once from `statements`, then marked a template that accepts no
    connections: tests clone it (`cluster.create_db(name, template=…)`, a file copy) instead of
    running the same DDL and data per test. Drop it with `cluster.drop_db`."""
    name = f"{prefix}_{secrets.token_hex(4)}_tpl"
    cluster.create_db(name)
    with cluster.connect(name) as conn:
        for statement in statements:
            conn.execute(cast(LiteralString, statement))
    cluster.query(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
                  .format(sql.Identifier(name)))
    return name


def start_cluster(name: str, env: Mapping[str, str] | None = None) -> Cluster:
    """`bin/pg-dev start NAME` (idempotent) and a Cluster for it."""
    pg_dev("start", name, env=env)
    values = parse_env_output(pg_dev("env", name, env=env).stdout)
    tcp = env.get("PGDEV_LISTEN") if env else None
    port = int(values["PGPORT"])
    return Cluster(name=name, host=values["PGHOST"], port=port,
                   tcp_port=port if tcp else None, env=values)


def stop_cluster(name: str) -> None:
    pg_dev("stop", name, check=False)


# --- scratch projects -----------------------------------------------------------------------------

def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def unique_project_name() -> str:
    return "t_" + secrets.token_hex(4)


def default_config(name: str, cluster: Cluster) -> str:
    return f"""\
[project]
name = "{name}"
schema = ["db/schema"]
seeds = "db/seeds"
migrations = "db/migrations"
default_env = "local"

[env.local]
url = "{cluster.url(name + '_local')}"
seeds = ["common", "dev"]

[env.prod]
url = "{cluster.url(name + '_prod')}"
protected = true
"""


@dataclass(frozen=True)
class Project:
    """A scratch project folder with db/ layout and a confiture.toml."""

    root: Path
    name: str
    config_path: Path

    def write(self, relpath: str, text: str | bytes) -> Path:
        """Write a file under the project root, creating folders as needed."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def db(self, env: str = "local") -> str:
        """Name of the database an environment of the default config points at."""
        return f"{self.name}_{env}"


def make_project(root: Path, cluster: Cluster) -> Project:
    """db/schema/10_tables/10_widgets.sql (table `widgets`), empty seed sets and migrations."""
    name = unique_project_name()
    for folder in ("db/schema/10_tables", "db/seeds/common", "db/seeds/dev", "db/migrations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "db/schema/10_tables/10_widgets.sql").write_text(
        "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL\n);\n")
    config = write_config(root / "confiture.toml", default_config(name, cluster))
    return Project(root=root, name=name, config_path=config)
