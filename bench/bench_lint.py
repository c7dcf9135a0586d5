"""Migration lint (issue 14): `migrate lint` of 200 pending migrations with a reachable target.

Floor: what the lint cannot avoid — interpreter start plus a bare `psql -c` of the one catalog
query it needs (the same SQL, built by confiture.catalog_sql for the names the migrations
mention). Ours also reads the status (tracking table), reads, splits and tokenises every file
(or, on the runs after the first, loads their tokens from the parse cache) and runs every rule.
The second row removes the parse cache before each run: a first lint, as in a fresh CI checkout.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from run import PGBIN, PYTHON, Bench, Row

import confiture

PSQL = f"{PGBIN}/psql -X -q -At -v ON_ERROR_STOP=1"
TABLES = 20


def _migration(i: int) -> str:
    """Safe, realistic changes to existing tables (no error finding: lint exits 0)."""
    table = f"t_{i % TABLES}"
    return (f"SET lock_timeout = '2s';\n"
            f"ALTER TABLE {table} ADD COLUMN c_{i} text;\n"
            f"ALTER TABLE {table} ADD CONSTRAINT {table}_c_{i}_len CHECK (length(c_{i}) < 100) "
            "NOT VALID;\n"
            f"COMMENT ON COLUMN {table}.c_{i} IS 'migration {i}';\n")


def _project(ctx: Bench, root: Path, name: str, count: int) -> Path:
    folder = root / "db" / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{name}"\n[env.local]\nurl = "postgresql:///{name}_db"\n')
    for i in range(1, count + 1):
        version = f"2024{i:010d}"
        (folder / f"{version}_change_{i}.up.sql").write_text(_migration(i))
        (folder / f"{version}_change_{i}.down.sql").write_text("SELECT 1;\n")
    db = f"{name}_db"
    ctx.main.psql(f'DROP DATABASE IF EXISTS "{db}"')
    ctx.main.psql(f'CREATE DATABASE "{db}"')
    ctx.main.psql("".join(f"CREATE TABLE t_{k} (id bigint PRIMARY KEY, label text);"
                          f"INSERT INTO t_{k} SELECT g, 'x' FROM generate_series(1, 1000) g;"
                          for k in range(TABLES)) + "ANALYZE;", db=db)
    return root


def bench_lint(ctx: Bench) -> list[Row]:
    count = 50 if ctx.quick else 200
    root = _project(ctx, ctx.work / "lint", "blint", count)
    files = confiture.scan_migrations(root / "db" / "migrations", root).migrations
    units = [confiture.migration_unit(m, root) for m in files]
    sql = confiture.catalog_sql(sorted(confiture.referenced_names(confiture.parse_units(units))))
    ours, floor = ctx.paired(
        lambda: ctx.cli("migrate", "lint", "-q", cwd=root),
        lambda: ctx.sh(f"{PYTHON} -c pass && {PSQL} -d blint_db -c {shlex.quote(sql)} "
                       "> /dev/null"))
    cache = root / ".confiture" / "cache" / "lint.json"
    cold, cold_floor = ctx.paired(
        lambda: ctx.cli("migrate", "lint", "-q", cwd=root),
        lambda: ctx.sh(f"{PYTHON} -c pass && {PSQL} -d blint_db -c {shlex.quote(sql)} "
                       "> /dev/null"),
        setup=lambda: cache.unlink(missing_ok=True))
    ctx.main.psql('DROP DATABASE IF EXISTS "blint_db"')
    return [Row(f"migrate lint, {count} pending migrations, target reachable", ours, floor,
                "≤ 1.5×", "floor: python -c pass + psql -c of the catalog query"),
            Row(f"migrate lint, {count} pending migrations, first run (no parse cache)", cold,
                cold_floor, "—", "same floor")]


def run(ctx: Bench) -> list[Row]:
    return bench_lint(ctx)
