"""Schema drift (issue 6): `diff` of a 200-table schema against the raw pg_dump runs it needs.

`diff` needs two schema dumps: the env's database and its DDL build (a template, which accepts
no connections: the first time, connections are allowed for the length of its dump; afterwards
the dump is cached, keyed by template name, build time, server and pg_dump binary).

Floor: the two `pg_dump --schema-only` runs started at the same time (the least wall time to
get both schemas; run one after the other they take longer, shown in the note). The second
database is a plain copy of the template, so the floor pays no clone. Ours runs `bin/confiture
diff` as a new process (interpreter start, template check, parsing and comparison included),
with $PYTHON set to the real interpreter rather than a pyenv shim.
Rows: the usual run (template dump cached) and the first run after a template build (no cache:
the template is dumped in place, after the files are hashed to name it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from run import PGBIN, PYTHON, Bench, Row

PSQL = f"{PGBIN}/psql -X -q"
DUMP = f"{PGBIN}/pg_dump --schema-only --no-owner --no-privileges"


def _schema(n: int) -> dict[str, str]:
    files = {"db/schema/00_types/1_status.sql": "CREATE TYPE status AS ENUM ('new', 'done');\n"}
    for i in range(n):
        ref = f" REFERENCES t{i - 1}" if i else ""
        files[f"db/schema/10_tables/{i}_t.sql"] = (
            f"CREATE TABLE t{i} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            f"parent bigint{ref}, name text NOT NULL DEFAULT '', state status, "
            f"created timestamptz DEFAULT now(), CHECK (name <> 'x'));\n"
            f"CREATE INDEX ON t{i} (name);\nCOMMENT ON TABLE t{i} IS 'table {i}';\n")
        if i % 10 == 0:
            files[f"db/schema/20_views/{i}_v.sql"] = (
                f"CREATE VIEW v{i} AS SELECT id, name FROM t{i} WHERE state = 'new';\n")
    return files


def _project(root: Path, name: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{name}"\n[env.local]\nurl = "postgresql:///{name}_db"\n')
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run(ctx: Bench) -> list[Row]:
    n = 200
    runs = 3 if ctx.quick else None
    root = _project(ctx.work / "drift", "bdrift", _schema(n))
    ctx.cli("reset", cwd=root)
    tpl = ctx.main.psql("SELECT datname FROM pg_database WHERE datistemplate AND "
                        "starts_with(datname, 'bdrift_tpl_')")
    ctx.main.psql("DROP DATABASE IF EXISTS bdrift_copy")
    ctx.main.psql(f"CREATE DATABASE bdrift_copy TEMPLATE {tpl}")
    # bin/confiture runs ${PYTHON:-python3}; where python3 is a pyenv shim that alone costs
    # ~130 ms a call, so point it at the real interpreter
    env = {**ctx.main.env, "PYTHON": PYTHON}
    ctx.cli("diff", cwd=root, env=env)  # fills the cache
    both = f"{DUMP} bdrift_db >/dev/null & {DUMP} bdrift_copy >/dev/null & wait"
    warm, floor = ctx.paired(lambda: ctx.cli("diff", cwd=root, env=env), lambda: ctx.sh(both),
                             runs=runs)
    cold, floor2 = ctx.paired(lambda: ctx.cli("diff", cwd=root, env=env), lambda: ctx.sh(both),
                              runs=runs,
                              setup=lambda: shutil.rmtree(root / ".confiture" / "drift",
                                                          ignore_errors=True))
    _, serial = ctx.paired(lambda: None,
                           lambda: ctx.sh(f"{DUMP} bdrift_db >/dev/null && "
                                          f"{DUMP} bdrift_copy >/dev/null"), runs=runs)
    ctx.main.psql("DROP DATABASE IF EXISTS bdrift_copy")
    note = (f"floor: both pg_dump --schema-only at once (one after the other: "
            f"{serial * 1000:.0f} ms)")
    return [Row(f"diff, {n}-table schema (template dump cached)", warm, floor, "≤ 1.5×", note),
            Row(f"diff, {n}-table schema, first run after a build (no cached dump)", cold, floor2,
                "≤ 1.5×", note)]
