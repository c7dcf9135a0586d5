"""Backups and restore (issue 4): `backup` and `restore` against bare pg_dump / pg_restore.

Floors are what a user would type without the tool, at the same compression level as ours
([backups] compression, default 1), so the ratio shows only our overhead (interpreter start,
catalog queries, read-back with pg_restore --list, sha256, sidecar; on restore: sha256 check,
a new database with the target's properties, the atomic swap):
- backup:   pg_dump -Fc -Z1 -f FILE DB
- restore:  psql -c 'CREATE DATABASE x' && pg_restore -d x FILE
Ours runs `python confiture.py …` as a new process each time.
"""
from __future__ import annotations

from pathlib import Path

from run import PGBIN, Bench, Row

PSQL = f"{PGBIN}/psql -X -q"
NAME = "bbackup"
DB = f"{NAME}_db"


def _project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{NAME}"\n[env.local]\nurl = "postgresql:///{DB}"\n'
        f'backups = "{root}/backups"\n')
    (root / "db/schema").mkdir(parents=True, exist_ok=True)
    (root / "db/schema/1.sql").write_text("SELECT 1;\n")
    return root


def _fill(ctx: Bench, rows: int) -> int:
    ctx.main.psql(f"DROP DATABASE IF EXISTS {DB}")
    ctx.main.psql(f"CREATE DATABASE {DB}")
    ctx.main.psql(
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL, name text, "
        "created_at timestamptz NOT NULL, note text);"
        f"INSERT INTO customers SELECT i, 'user' || i || '@example.com', "
        "(ARRAY['Ann','Bob','Chen','Dana','Eve'])[1 + i % 5] || ' ' || md5(i::text), "
        "now() - i * interval '1 minute', repeat(md5((i * 7)::text), 1 + i % 3) "
        f"FROM generate_series(1, {rows}) i;"
        "CREATE INDEX ON customers (email); ANALYZE customers", db=DB)
    return int(ctx.main.psql(f"SELECT pg_database_size('{DB}')"))


def _drop_replaced(ctx: Bench) -> None:
    names = ctx.main.psql(f"SELECT string_agg(quote_ident(datname), ' ') FROM pg_database "
                          f"WHERE datname LIKE '{DB}\\_replaced\\_%' OR datname = 'bbackup_x'")
    for name in names.split():
        ctx.main.psql(f"DROP DATABASE {name}")


def run(ctx: Bench) -> list[Row]:
    rows = 40_000 if ctx.quick else 400_000
    root = _project(ctx.work / "backup")
    size = _fill(ctx, rows)
    folder = root / "backups"
    floor_file = ctx.work / "floor.dump"

    def clean_files() -> None:
        for path in folder.glob("*"):
            path.unlink()
        floor_file.unlink(missing_ok=True)

    backup, dump = ctx.paired(
        lambda: ctx.cli("backup", cwd=root),
        lambda: ctx.sh(f"{PGBIN}/pg_dump -Fc -Z1 -f {floor_file} {DB}"),
        setup=clean_files)
    clean_files()
    ctx.cli("backup", cwd=root)
    file = next(folder.glob("*.dump"))
    restore, floor = ctx.paired(
        lambda: ctx.cli("restore", str(file), "--force", cwd=root),
        lambda: ctx.sh(f"{PSQL} -c 'CREATE DATABASE bbackup_x' && "
                       f"{PGBIN}/pg_restore -d bbackup_x {file}"),
        setup=lambda: _drop_replaced(ctx))
    _drop_replaced(ctx)
    ctx.main.psql(f"DROP DATABASE IF EXISTS {DB}")
    mb = size / 2**20
    note = f"{mb:.0f} MB database, {file.stat().st_size / 2**20:.1f} MB dump (-Z1)"
    return [Row(f"backup of a {mb:.0f} MB database", backup, dump, "≤ 1.1×", note),
            Row(f"restore of a {mb:.0f} MB database", restore, floor, "≤ 1.1×",
                "new database + atomic swap vs createdb + pg_restore")]
