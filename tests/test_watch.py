"""watch, driven as a subprocess the way a developer runs it: edits are picked up, a broken
file is reported with file:line and watching goes on, Ctrl-C ends it cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from helpers import CliRunner, Cluster, Project, confiture_argv, confiture_environ

import confiture

ROOT = Path(__file__).resolve().parent.parent


class Watcher:
    """`confiture.py watch` in the background, its output collected line by line."""

    def __init__(self, project: Project, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
        env["NO_COLOR"] = "1"
        self.proc = subprocess.Popen(confiture_argv("watch", *args),
                                     cwd=project.root, env=confiture_environ(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _collect(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"timed out waiting for {what}\nstdout: {self.out}\nstderr: {self.err}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def tables(pg: Cluster, db: str) -> set[str]:
    """Tables of `db`, or none while watch is between dropping and recreating it."""
    try:
        return {r[0] for r in pg.query("SELECT tablename FROM pg_tables "
                                       "WHERE schemaname = 'public'", db=db)}
    except psycopg.OperationalError:
        return set()


def test_watch_rebuilds_on_change_and_survives_a_broken_file(pg: Cluster, project: Project) -> None:
    db = project.db("local")
    watcher = Watcher(project, "--interval", "0.1")
    try:
        watcher.wait_for("the first reset", lambda: "widgets" in tables(pg, db))
        watcher.wait_for("watching", lambda: any("watching" in l for l in watcher.err))
        project.write("db/schema/10_tables/20_gadgets.sql", "CREATE TABLE gadgets (id int);\n")
        watcher.wait_for("gadgets", lambda: "gadgets" in tables(pg, db))
        project.write("db/schema/10_tables/30_broken.sql",
                      "CREATE TABLE ok_before (id int);\n\nCREATE TABLE broken (id nosuchtype);\n")
        watcher.wait_for("the error", lambda: any("30_broken.sql:3" in l for l in watcher.err))
        assert "gadgets" in tables(pg, db)  # the database is left as it was
        assert watcher.proc.poll() is None
        project.write("db/schema/10_tables/30_broken.sql", "CREATE TABLE fixed (id int);\n")
        watcher.wait_for("fixed", lambda: "fixed" in tables(pg, db))
    finally:
        code = watcher.stop(signal.SIGINT)
    assert code == 0, watcher.err
    assert any("stopped watching" in l for l in watcher.err)
    assert sum("reset " in l for l in watcher.out) == 3
    assert any("30_broken.sql" in l for l in watcher.out)  # the changed file is named
    assert not any("Traceback" in l for l in watcher.err)


def test_watch_stops_cleanly_on_sigterm(pg: Cluster, project: Project) -> None:
    watcher = Watcher(project, "--interval", "0.2")
    watcher.wait_for("watching", lambda: any("watching" in l for l in watcher.err))
    assert watcher.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in l for l in watcher.err)


def test_watch_is_refused_on_a_protected_env(project: Project, cli: CliRunner) -> None:
    result = cli("--env", "prod", "watch", cwd=project.root)
    assert result.returncode == 4 and "protected" in result.stderr


def test_snapshot_and_debounce_in_process(tmp_path: Path) -> None:
    folder = tmp_path / "schema"
    folder.mkdir()
    (folder / "1.sql").write_text("select 1;")
    state = confiture.snapshot_files([folder])
    writes = iter([lambda: (folder / "2.sql").write_text("x"),       # first poll sees a change
                   lambda: (folder / "2.sql").write_text("xy"),      # still being written
                   lambda: None, lambda: None])
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        next(writes)()

    after = confiture.wait_for_change([folder], state, 0.5, sleep)
    assert len(polls) == 3  # change seen, changed again, then two polls agreed
    assert confiture.changed_files(state, after, tmp_path) == ("schema/2.sql",)
    missing = confiture.snapshot_files([tmp_path / "nope"])
    assert len(missing) == 1 and "unreadable" in next(iter(missing))
