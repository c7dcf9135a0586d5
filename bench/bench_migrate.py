"""Migrations (issue 3): `migrate up` and `migrate status` against raw psql.

Floors are what a user would type without the tool:
- up:     psql -f <the same migrations concatenated>, on a fresh database each time (no
          tracking, no lock, no per-migration transactions)
- status: python -c pass && psql -c 'select … from the tracking table' (interpreter start plus
          one round trip); ours also reads and hashes every migration file.
Ours runs `python confiture.py …` as a new process each time (interpreter start included).
"""
from __future__ import annotations

from pathlib import Path

from run import PGBIN, PYTHON, Bench, Row

PSQL = f"{PGBIN}/psql -X -q -v ON_ERROR_STOP=1"


def _migration(i: int) -> str:
    """Small but real: a table, an index, a comment; every fifth one a function."""
    body = (f"CREATE TABLE item_{i} (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
            f"    label text NOT NULL,\n    created_at timestamptz NOT NULL DEFAULT now()\n);\n"
            f"CREATE INDEX item_{i}_label ON item_{i} (label);\n"
            f"COMMENT ON TABLE item_{i} IS 'migration {i}';\n")
    if i % 5 == 0:
        body += (f"CREATE FUNCTION item_{i}_count() RETURNS bigint LANGUAGE plpgsql AS $$\n"
                 f"BEGIN\n    RETURN (SELECT count(*) FROM item_{i});\nEND\n$$;\n")
    return body


def _project(root: Path, name: str, count: int) -> Path:
    folder = root / "db" / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "db" / "schema").mkdir(parents=True, exist_ok=True)
    (root / "db" / "schema" / "0.sql").write_text("SELECT 1;\n")
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{name}"\n[env.local]\nurl = "postgresql:///{name}_db"\n')
    concat = []
    for i in range(1, count + 1):
        version = f"2024{i:010d}"
        text = _migration(i)
        (folder / f"{version}_item_{i}.up.sql").write_text(text)
        (folder / f"{version}_item_{i}.down.sql").write_text(f"DROP TABLE item_{i} CASCADE;\n")
        concat.append(text)
    (root / "all.sql").write_text("".join(concat))
    return root


def _fresh(ctx: Bench, db: str) -> None:
    ctx.main.psql(f'DROP DATABASE IF EXISTS "{db}"')
    ctx.main.psql(f'CREATE DATABASE "{db}"')


def bench_up(ctx: Bench) -> list[Row]:
    count = 50 if ctx.quick else 200
    root = _project(ctx.work / "mig_up", "bmigup", count)
    ours, floor = ctx.paired(
        lambda: ctx.cli("migrate", "up", "-q", cwd=root),
        lambda: ctx.sh(f"{PSQL} -d bmigup_db -f {root / 'all.sql'}"),
        setup=lambda: _fresh(ctx, "bmigup_db"))
    ctx.main.psql('DROP DATABASE IF EXISTS "bmigup_db"')
    return [Row(f"migrate up, {count} small migrations (fresh db)", ours, floor, "≤ 1.5×",
                "floor: psql -f of the files concatenated; dbmate measured 1.25×")]


def bench_status(ctx: Bench) -> list[Row]:
    count = 300 if ctx.quick else 1000
    root = _project(ctx.work / "mig_status", "bmigst", count)
    _fresh(ctx, "bmigst_db")
    ctx.cli("migrate", "up", "-q", cwd=root)
    ours, floor = ctx.paired(
        lambda: ctx.cli("migrate", "status", cwd=root),
        lambda: ctx.sh(f"{PYTHON} -c pass && {PSQL} -d bmigst_db -c "
                       "'SELECT version, checksum FROM confiture_migrations' > /dev/null"))
    ctx.main.psql('DROP DATABASE IF EXISTS "bmigst_db"')
    return [Row(f"migrate status, {count} applied", ours, floor, "≤ 1.5×",
                "floor: python -c pass + one psql -c; dbmate status: 25 ms")]


def run(ctx: Bench) -> list[Row]:
    return bench_up(ctx) + bench_status(ctx)
