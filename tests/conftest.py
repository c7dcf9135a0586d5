"""Fixtures: real PostgreSQL clusters from bin/pg-dev, the CLI as a subprocess, scratch projects.

- `pg`: session cluster `test` (env CONFITURE_TEST_CLUSTER overrides the name); stopped at the
  end unless CONFITURE_KEEP_CLUSTER=1.
- `pg_remote`: session cluster `remote`, also listening on 127.0.0.1:<free port> (password auth).
- `cli(*args, cwd=…)`: runs `python -m confiture ARGS` (cached bytecode) with the `pg`
  cluster's PG* variables.
- `project`: a scratch project (db/ layout + confiture.toml) whose databases are dropped afterwards.

Under pytest-xdist (`make test` runs `-n 2`; `PYTEST_WORKERS=0` runs in-process) every worker gets
clusters of its own, named after the worker id (`test-gw0`, `remote-gw0`, …).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import confiture`

from helpers import (
    CliRunner,
    Cluster,
    Project,
    clean_environ,
    compile_confiture,
    confiture_argv,
    confiture_environ,
    free_tcp_port,
    make_project,
    start_cluster,
    stop_cluster,
    write_config,
)

__all__ = ["CliRunner", "Cluster", "Project", "write_config"]


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs everything (CI too); `make test PYTEST_ARGS='-m "not slow"'` skips the
    # corpus-sized runs while developing.
    config.addinivalue_line("markers", "slow: a corpus-sized run (tens of seconds)")


@pytest.fixture(scope="session", autouse=True)
def confiture_bytecode() -> None:
    """confiture.py compiled once for the session's CLI runs (see helpers.confiture_argv)."""
    compile_confiture()


def _keep_clusters() -> bool:
    return os.environ.get("CONFITURE_KEEP_CLUSTER") == "1"


def _cluster_name(variable: str, default: str) -> str:
    """The cluster named by `variable` or `default`; under pytest-xdist one per worker
    (`test-gw0`, `test-gw1`, …), so parallel workers never share databases, roles or locks."""
    name = os.environ.get(variable) or default
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"{name}-{worker}" if worker else name


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """The main test cluster (unix socket only)."""
    name = _cluster_name("CONFITURE_TEST_CLUSTER", "test")
    cluster = start_cluster(name)
    yield cluster
    if not _keep_clusters():
        stop_cluster(name)


@pytest.fixture(scope="session")
def pg_remote() -> Iterator[Cluster]:
    """A second cluster that also listens on TCP 127.0.0.1:<tcp_port> with password auth."""
    name = _cluster_name("CONFITURE_TEST_REMOTE_CLUSTER", "remote")
    cluster = start_cluster(name, env={"PGDEV_LISTEN": "127.0.0.1",
                                       "PGDEV_PORT": str(free_tcp_port())})
    yield cluster
    if not _keep_clusters():
        stop_cluster(name)


@pytest.fixture
def cli(pg: Cluster) -> CliRunner:
    """run(*args, cwd, env=None, input=None, timeout=120): `python -m confiture ARGS` as users run
    it (helpers.confiture_argv: the cached bytecode, not a compile of the file per run).

    The environment is os.environ minus PG*/CONFITURE_*, plus the `pg` cluster's PG* variables and
    NO_COLOR=1, plus `env` (a value of None removes the variable). stdin is empty unless `input`.
    """
    def run(*args: object, cwd: Path | str, env: Mapping[str, str | None] | None = None,
            input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full = clean_environ()
        full.update(pg.env)
        full["NO_COLOR"] = "1"
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        return subprocess.run(
            confiture_argv(*args), cwd=cwd, env=confiture_environ(full), text=True,
            capture_output=True, input=input,
            stdin=subprocess.DEVNULL if input is None else None, timeout=timeout)
    return run


@pytest.fixture
def project(tmp_path: Path, pg: Cluster) -> Iterator[Project]:
    """A scratch project on the `pg` cluster; every database named <project name>* is dropped after."""
    proj = make_project(tmp_path / "proj", pg)
    yield proj
    pg.drop_dbs_with_prefix(proj.name)
