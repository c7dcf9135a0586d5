"""Migrations against dbmate and raw psql (issue 15): the same generated migrations, one run.

Contenders, run round-robin within each round (A/B/C/…, so load swings hit all alike), over TCP
(127.0.0.1, password, SSL off for all) and over the unix socket of a throwaway cluster of ours:
- raw psql: one `psql -f` of every migration wrapped in BEGIN/COMMIT (the floor);
- dbmate (the Go binary from the npm registry, installed under .confiture/bench-tools/);
  `down` is one `dbmate rollback` per migration (dbmate reverts one per call);
- confiture through `bin/confiture`, `python3 -m confiture` and `python3 confiture.py`, each with
  the bytecode cache and without it (PYTHONDONTWRITEBYTECODE=1 in a copy never run with a cache,
  as in a Docker image).
Each round and contender: fresh database → up N → no-op start (up with nothing pending) →
status → down N. Reported as medians; the ratios are what counts (the machine may be loaded).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from run import PGBIN, PYTHON, ROOT, Bench, Row

TOOLS = ROOT / ".confiture" / "bench-tools"
DBMATE_VERSION = "2.36.0"
CLUSTER = "benchdbmate"
PASSWORD = "bench"
DB = "bdbmate_db"


def _migration(i: int) -> tuple[str, str]:
    """The issue's shape: CREATE TABLE + index + a 10-row INSERT; down drops the table."""
    up = (f"CREATE TABLE item_{i} (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
          f"    label text NOT NULL\n);\nCREATE INDEX item_{i}_label ON item_{i} (label);\n"
          f"INSERT INTO item_{i} (label) SELECT 'row ' || g FROM generate_series(1, 10) g;\n")
    return up, f"DROP TABLE item_{i};\n"


def install_dbmate() -> Path | None:
    """The dbmate binary from the npm registry (its platform package holds the Go binary; the
    node wrapper would add node's start-up to every call). None, with the reason printed."""
    found = sorted(glob.glob(str(TOOLS / "node_modules/@dbmate/*/bin/dbmate")))
    if not found:
        npm = shutil.which("npm")
        if npm is None:
            print("   dbmate skipped: npm is not installed", file=sys.stderr)
            return None
        TOOLS.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(TOOLS),
                              f"dbmate@{DBMATE_VERSION}"], capture_output=True, text=True,
                             timeout=600, check=False)
        found = sorted(glob.glob(str(TOOLS / "node_modules/@dbmate/*/bin/dbmate")))
        if out.returncode or not found:
            print(f"   dbmate skipped: npm install dbmate failed: {out.stderr.strip()[-300:]}",
                  file=sys.stderr)
            return None
    return Path(found[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_cluster() -> dict[str, str]:
    env = dict(os.environ, PGDEV_LISTEN="127.0.0.1", PGDEV_PORT=str(_free_port()))
    subprocess.run([str(ROOT / "bin/pg-dev"), "start", CLUSTER], check=True, env=env,
                   capture_output=True)
    out = subprocess.run([str(ROOT / "bin/pg-dev"), "env", CLUSTER], check=True, env=env,
                         capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[7:].partition("=")
            values[key] = value.strip("'\"")
    return values


def _project(folder: Path, count: int) -> None:
    """A vendored checkout: confiture.py and bin/confiture beside confiture.toml, our
    migrations in db/migrations, dbmate's in db/dbmate, the floor's scripts."""
    (folder / "bin").mkdir(parents=True)
    shutil.copy2(ROOT / "confiture.py", folder / "confiture.py")
    shutil.copy2(ROOT / "bin" / "confiture", folder / "bin" / "confiture")
    (folder / "db" / "schema").mkdir(parents=True)
    (folder / "db" / "schema" / "0.sql").write_text("SELECT 1;\n")
    ours, theirs = folder / "db" / "migrations", folder / "db" / "dbmate"
    ours.mkdir()
    theirs.mkdir()
    (folder / "confiture.toml").write_text(
        '[project]\nname = "bdbmate"\n[env.local]\nurl = "${BENCH_URL}"\n')
    ups, downs = [], []
    for i in range(1, count + 1):
        version = f"2024{i:010d}"
        up, down = _migration(i)
        (ours / f"{version}_item_{i}.up.sql").write_text(up)
        (ours / f"{version}_item_{i}.down.sql").write_text(down)
        (theirs / f"{version}_item_{i}.sql").write_text(
            f"-- migrate:up\n{up}\n-- migrate:down\n{down}")
        ups.append(f"BEGIN;\n{up}COMMIT;\n")
        downs.append(f"BEGIN;\n{down}COMMIT;\n")
    (folder / "up.sql").write_text("".join(ups))
    (folder / "down.sql").write_text("".join(reversed(downs)))


class Contender:
    """One way of running migrations: its up / no-op / status / down commands."""

    def __init__(self, name: str, up: Callable[[], object], noop: Callable[[], object] | None,
                 status: Callable[[], object] | None, down: Callable[[], object]) -> None:
        self.name, self.up, self.noop, self.status, self.down = name, up, noop, status, down
        self.times: dict[str, list[float]] = {"up": [], "noop": [], "status": [], "down": []}

    def median(self, op: str) -> float | None:
        return statistics.median(self.times[op]) if self.times[op] else None


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stderr[-2000:]}")


def _call(argv: list[str], folder: Path, env: dict[str, str], *args: str) -> Callable[[], None]:
    return lambda: _run([*argv, *args], folder, env)


def _contenders(work: Path, transport: str, pg: dict[str, str], dbmate: Path | None,
                count: int) -> tuple[list[Contender], Callable[[], None]]:
    host, port = pg["PGHOST"], pg["PGPORT"]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PG", "CONFITURE_", "PYTHON")) and k != "DATABASE_URL"}
    if transport == "tcp":
        # the same connection for all three: host, password, and no SSL negotiation (dbmate's
        # URL needs sslmode=disable against a server without SSL; psql would otherwise ask first)
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/{DB}?sslmode=disable"
        dbmate_url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{port}/{DB}?sslmode=disable"
        psql_env = {**base, "PGHOST": "127.0.0.1", "PGPORT": port, "PGUSER": "postgres",
                    "PGPASSWORD": PASSWORD, "PGDATABASE": DB, "PGSSLMODE": "disable"}
    else:
        url = f"postgresql://postgres@/{DB}?host={host}&port={port}"
        dbmate_url = f"postgres://postgres@/{DB}?socket={host}&port={port}"
        psql_env = {**base, "PGHOST": host, "PGPORT": port, "PGUSER": "postgres",
                    "PGDATABASE": DB}
    admin = {**base, "PGHOST": host, "PGPORT": port, "PGUSER": "postgres",
             "PGDATABASE": "postgres"}

    def fresh() -> None:
        _run([f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
              f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", "-c", f"CREATE DATABASE {DB}"],
             work, admin)

    cached, uncached = work / f"{transport}-cached", work / f"{transport}-nocache"
    psql = [f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    found: list[Contender] = [Contender(
        "raw psql, BEGIN/COMMIT per migration",
        lambda: _run([*psql, "-f", "up.sql"], cached, psql_env),
        lambda: _run([*psql, "-c", "SELECT 1"], cached, psql_env), None,
        lambda: _run([*psql, "-f", "down.sql"], cached, psql_env))]
    if dbmate is not None:
        dm = [str(dbmate), "--no-dump-schema", "-d", "db/dbmate", "-u", dbmate_url]

        def dbmate_down() -> None:
            for _ in range(count):
                _run([*dm, "rollback"], cached, base)

        found.append(Contender(f"dbmate {DBMATE_VERSION} (Go)", lambda: _run([*dm, "migrate"], cached, base),
                               lambda: _run([*dm, "migrate"], cached, base),
                               lambda: _run([*dm, "status"], cached, base), dbmate_down))
    for folder, cache in ((cached, True), (uncached, False)):
        env = {**base, "BENCH_URL": url, **({} if cache else {"PYTHONDONTWRITEBYTECODE": "1"})}
        label = "cached" if cache else "PYTHONDONTWRITEBYTECODE=1"
        env["PYTHON"] = PYTHON  # what bin/confiture starts
        for path, argv in (("bin/confiture", [str(folder / "bin" / "confiture")]),
                           ("python3 -m confiture", [PYTHON, "-m", "confiture"]),
                           ("python3 confiture.py", [PYTHON, "confiture.py"])):
            found.append(Contender(f"confiture, `{path}` ({label})",
                                   _call(argv, folder, env, "migrate", "up", "-q"),
                                   _call(argv, folder, env, "migrate", "up", "-q"),
                                   _call(argv, folder, env, "migrate", "status"),
                                   _call(argv, folder, env, "migrate", "down", "--to", "0", "-q")))
    return found, fresh


def _round(contenders: list[Contender], fresh: Callable[[], None]) -> None:
    for c in contenders:
        fresh()
        for op in ("up", "noop", "status", "down"):
            fn = getattr(c, op)
            if fn is not None:
                t0 = time.perf_counter()
                fn()
                c.times[op].append(time.perf_counter() - t0)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _table(transport: str, contenders: list[Contender], count: int) -> str:
    lines = [f"\n   {transport}: medians | up {count} | no-op start | status | down {count} |",
             "   |---|---|---|---|---|"]
    for c in contenders:
        lines.append(f"   | {c.name} | {_fmt(c.median('up'))} | {_fmt(c.median('noop'))} | "
                     f"{_fmt(c.median('status'))} | {_fmt(c.median('down'))} |")
    return "\n".join(lines)


def _rows(transport: str, contenders: list[Contender], count: int) -> list[Row]:
    psql = contenders[0]
    dbmate = next((c for c in contenders if c.name.startswith("dbmate")), None)
    rows = []
    if dbmate is not None:
        for op, what in (("up", f"up {count}"), ("down", f"down {count} (dbmate: per call)"),
                         ("noop", "no-op start")):
            rows.append(Row(f"{transport}: dbmate {what}", dbmate.median(op) or 0,
                            psql.median(op) or 0, "—", "floor: raw psql"))
    for c in contenders:
        if not c.name.startswith("confiture"):
            continue
        short = c.name.removeprefix("confiture, ")
        rows.append(Row(f"{transport}: up {count}, {short}", c.median("up") or 0,
                        psql.median("up") or 0, "≤ 1.1×", "floor: raw psql BEGIN/COMMIT each"))
        rows.append(Row(f"{transport}: down {count}, {short}", c.median("down") or 0,
                        psql.median("down") or 0, "≤ 1.5×", "floor: raw psql BEGIN/COMMIT each"))
        if dbmate is not None:
            rows.append(Row(f"{transport}: up {count} vs dbmate, {short}", c.median("up") or 0,
                            dbmate.median("up") or 0, "≤ 1.0×", "floor: dbmate migrate"))
            rows.append(Row(f"{transport}: status vs dbmate, {short}", c.median("status") or 0,
                            dbmate.median("status") or 0,
                            "—" if "python3 confiture.py" in short else "≤ 2.5×",
                            "floor: dbmate status"))
            rows.append(Row(f"{transport}: no-op start vs dbmate, {short}",
                            c.median("noop") or 0, dbmate.median("noop") or 0, "—",
                            "floor: dbmate migrate, nothing pending"))
    return rows


def run(ctx: Bench) -> list[Row]:
    count = 50 if ctx.quick else 200
    rounds = 1 if ctx.quick else min(ctx.runs, 3)
    dbmate = install_dbmate()
    pg = _start_cluster()
    try:
        admin = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
                 "PGHOST": pg["PGHOST"], "PGPORT": pg["PGPORT"], "PGUSER": "postgres"}
        _run([f"{PGBIN}/psql", "-X", "-q", "-d", "postgres", "-c",
              f"ALTER ROLE postgres PASSWORD '{PASSWORD}'"], ctx.work, admin)
        rows: list[Row] = []
        for transport in ("tcp", "unix"):
            for variant in ("cached", "nocache"):
                _project(ctx.work / f"{transport}-{variant}", count)
            contenders, fresh = _contenders(ctx.work, transport, pg, dbmate, count)
            _round(contenders, fresh)  # warm-up: caches written, nothing recorded
            for c in contenders:
                c.times = {op: [] for op in c.times}
            for _ in range(rounds):
                _round(contenders, fresh)
            print(_table(transport, contenders, count), file=sys.stderr, flush=True)
            rows += _rows(transport, contenders, count)
        return rows
    finally:
        if os.environ.get("KEEP_CLUSTERS") != "1":
            subprocess.run([str(ROOT / "bin/pg-dev"), "stop", CLUSTER], check=False,
                           capture_output=True)
