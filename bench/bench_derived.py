"""Derived migrations (issue 13): `diff --sql` between two 200-table databases that differ in
20 objects, against the two `pg_dump --schema-only` runs a dump-based diff needs; and
`migrate generate` on a 200-table project and on the example project (`make demo`'s sql/: its
three migrations replayed from sql/baseline.sql, a new column and an index in the DDL), planned
and proved on scratch copies (no floor: absolute times).

Floor: both schema dumps started at the same time. Ours runs `bin/confiture diff --sql
--against b` as a new process: two catalog reads (one JSON query each), the plan, the output.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench_drift import DUMP, _schema
from run import PYTHON, ROOT, Bench, Row


def _changed(files: dict[str, str]) -> dict[str, str]:
    """20 objects differ: 5 new columns, 5 new indexes, 5 changed checks, 5 dropped views."""
    out = dict(files)
    for i in range(5):
        rel = f"db/schema/10_tables/{i}_t.sql"
        # the new column goes last: ADD COLUMN cannot put it elsewhere (column order counts)
        out[rel] = out[rel].replace("DEFAULT now(), ", "DEFAULT now(), extra int, ") \
            .replace("CHECK (name <> 'x')", "CHECK (name <> 'y')")
        out[rel] += f"CREATE INDEX t{i}_created ON t{i} (created);\n"
        del out[f"db/schema/20_views/{i * 10}_v.sql"]
    return out


def _project(root: Path, name: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{name}"\ndefault_env = "a"\n[env.a]\nurl = "postgresql:///{name}_a"\n'
        f'[env.b]\nurl = "postgresql:///{name}_b"\n')
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run(ctx: Bench) -> list[Row]:
    runs = 3 if ctx.quick else None
    env = {**ctx.main.env, "PYTHON": PYTHON}
    before = _project(ctx.work / "before", "bderived", _schema(200))
    after = _project(ctx.work / "after", "bderived", _changed(_schema(200)))
    ctx.cli("--env", "a", "reset", cwd=before, env=env)
    ctx.cli("--env", "b", "reset", cwd=after, env=env)
    both = f"{DUMP} bderived_a >/dev/null & {DUMP} bderived_b >/dev/null & wait"

    def diff_sql() -> None:
        try:
            ctx.cli("--env", "a", "diff", "--sql", "--against", "b", cwd=before, env=env)
        except RuntimeError:
            pass  # exit 3: there are differences (that is the point)

    ours, floor = ctx.paired(diff_sql, lambda: ctx.sh(both), runs=runs)
    # migrate generate: the migrations (none) replayed, planned, proved; one run each time
    gen = _project(ctx.work / "generate", "bdgen", _schema(200))
    (gen / "db/migrations").mkdir(parents=True, exist_ok=True)

    def generate() -> None:
        for path in (gen / "db/migrations").glob("*.sql"):
            path.unlink()
        ctx.cli("--env", "a", "migrate", "generate", "everything", cwd=gen, env=env)

    seconds, _ = ctx.paired(generate, lambda: None, runs=runs)
    example = _example(ctx.work / "example")
    kept = set((example / "sql/migrations").iterdir())

    def generate_example() -> None:
        for path in set((example / "sql/migrations").iterdir()) - kept:
            path.unlink()
        ctx.cli("migrate", "generate", "loyalty", cwd=example, env=env)

    shop, _ = ctx.paired(generate_example, lambda: None, runs=runs)
    return [Row("diff --sql, two 200-table databases differing in 20 objects", ours, floor,
                "≤ 1.5×", "floor: both pg_dump --schema-only at once"),
            Row("migrate generate, 200-table schema from nothing (plan + proof)", seconds,
                seconds, "—", "no floor: absolute time shown"),
            Row("migrate generate, example project (3 migrations from its baseline; a column "
                "and an index)", shop, shop, "—", "no floor: absolute time shown")]


def _example(root: Path) -> Path:
    """The example project (sql/, confiture.toml.example) on the bench cluster, with a new
    column and a new index in its DDL."""
    shutil.copytree(ROOT / "sql", root / "sql")
    text = (ROOT / "confiture.toml.example").read_text()
    text = text.replace('name = "shop"', 'name = "bdshop"') \
        .replace("postgresql:///shop_", "postgresql:///bdshop_")
    (root / "confiture.toml").write_text(text)
    table = root / "sql/schema/20_tables/20_customers.sql"
    ddl = table.read_text()
    line = next(line for line in ddl.splitlines() if line.strip().startswith("phone "))
    ddl = ddl.replace(line, "    phone       text,\n    loyalty     integer NOT NULL DEFAULT 0")
    table.write_text(ddl + "CREATE INDEX customers_created_at ON customers (created_at);\n")
    return root
