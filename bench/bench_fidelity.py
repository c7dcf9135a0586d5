"""Derived migrations' fidelity (issue 13) on a real history: Lemmy 0.19.20's 233 migrations.

For each migration: the schema before it and after it (replayed with psql -f) are read as
models, the planner's plan from one to the other is applied to a database that follows the
history through plans only, and the result is compared with the replayed schema (column order
included). The row is the share of steps reproduced with zero difference; the target is the
issue's 95%. (Not a timing: "ours" is the share, the floor 100%.) The same as
tests/test_derived.py::test_fidelity_on_lemmy_history, which asserts the threshold.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from run import PGBIN, ROOT, Bench, Row

import confiture

LEMMY = next((p / "lemmy-0.19.20" / "migrations"
              for p in (ROOT.parent / "shared" / "corpora", ROOT.parent.parent / "shared" / "corpora")
              if (p / "lemmy-0.19.20" / "migrations").is_dir()), None)


def _session(ctx: Bench, db: str) -> confiture.Session:
    env = {**os.environ, **ctx.main.env}
    return confiture.Session(confiture.find_pg_tools(env), confiture.ConnInfo(params=()), db, env)


def _fresh(ctx: Bench, db: str, template: str = "template0") -> None:
    ctx.main.psql(f"DROP DATABASE IF EXISTS {db}")
    ctx.main.psql(f"CREATE DATABASE {db} TEMPLATE {template}")


def _steps(ctx: Bench, history: Path) -> tuple[int, list[str]]:
    replayed, planned = "bfid_replayed", "bfid_planned"
    _fresh(ctx, replayed)
    _fresh(ctx, planned)
    sessions = {db: _session(ctx, db) for db in (replayed, planned)}
    steps = sorted(p for p in history.iterdir() if (p / "up.sql").is_file())
    failures: list[str] = []
    try:
        before = confiture.read_schema_model(sessions[replayed])
        for step in steps:
            subprocess.run([f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", replayed,
                            "-f", str(step / "up.sql")], env=ctx.main.env, check=True,
                           capture_output=True)
            after = confiture.read_schema_model(sessions[replayed])
            plan = confiture.plan_schema(before, after)
            problem = "; ".join(plan.unsupported)
            if not problem and plan.statements:
                try:
                    sessions[planned].execute(plan.script())
                except confiture.SqlError as exc:
                    problem = exc.message
            if not problem:
                left = confiture.compare_models(after,
                                                confiture.read_schema_model(sessions[planned]))
                problem = ", ".join(left[:3])
            if problem:
                failures.append(f"{step.name}: {problem[:200]}")
                for session in sessions.values():
                    session.close()
                _fresh(ctx, planned, replayed)
                sessions = {db: _session(ctx, db) for db in (replayed, planned)}
            before = after
    finally:
        for session in sessions.values():
            session.close()
        for db in (replayed, planned):
            ctx.main.psql(f"DROP DATABASE IF EXISTS {db}")
    return len(steps), failures


def run(ctx: Bench) -> list[Row]:
    if LEMMY is None:
        return []
    total, failures = _steps(ctx, LEMMY)
    share = (total - len(failures)) / total
    order = sum(1 for f in failures if "column order" in f)
    note = f"failures: {order} column order (tables rebuilt by hand), " \
        f"{len(failures) - order} other"
    return [Row(f"migrate generate's planner on Lemmy's {total} migrations: steps reproduced "
                f"({total - len(failures)}/{total})", share, 1.0, "≥ 0.95×", note,
                unit="share")]
