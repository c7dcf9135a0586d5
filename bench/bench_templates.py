"""Templates and clones (issue 2): clone, no-op reset and template build against raw psql.

Floors are what a user would type without the tool:
- clone:  psql -c 'CREATE DATABASE … TEMPLATE …' (server default strategy, WAL_LOG on PG 15)
- reset:  psql -c 'DROP DATABASE …' && psql -c 'CREATE DATABASE … TEMPLATE …'
- build:  psql -c 'CREATE DATABASE …' && psql -1 -f <the concatenated DDL>
Ours runs `python confiture.py …` as a new process each time (interpreter start included).
A second clone/reset row compares against bare psql with the strategy confiture picked, so the
gain from choosing FILE_COPY on an fsync=off cluster is visible separately.
"""
from __future__ import annotations

from pathlib import Path

from run import PGBIN, Bench, Row

PSQL = f"{PGBIN}/psql -X -q"


def _project(root: Path, name: str, files: dict[str, str], seeds: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "{name}"\n[env.local]\nurl = "postgresql:///{name}_db"\n'
        + ('seeds = ["data"]\n' if seeds else ""))
    for rel, text in {**files, **{f"db/seeds/data/{k}": v for k, v in (seeds or {}).items()}}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _template_of(ctx: Bench, root: Path) -> str:
    """The name of the project's current template (the one its files hash to)."""
    import confiture

    ws = confiture.workspace_for(root / "confiture.toml", env="local", environ=ctx.main.env)
    fileset = confiture.scan_env(ws.config, "local")
    return confiture.template_name(ws.config.project, "local", fileset.hash)


def _drop(ctx: Bench, db: str) -> None:
    ctx.main.psql(f'DROP DATABASE IF EXISTS "{db}"')


def bench_clone(ctx: Bench) -> list[Row]:
    mb = 2 if ctx.quick else 10
    root = _project(ctx.work / "clone", "bclone",
                    {"db/schema/1.sql": "CREATE TABLE t (id int PRIMARY KEY, payload text);\n"},
                    {"1.sql": f"INSERT INTO t SELECT i, repeat(md5(i::text), 3) FROM "
                              f"generate_series(1, {mb * 7000}) i;\n"})
    ctx.cli("template", cwd=root)
    tpl = _template_of(ctx, root)
    size = int(ctx.main.psql(f"SELECT pg_database_size('{tpl}')"))
    ours, floor = ctx.paired(lambda: ctx.cli("clone", "bclone_x", cwd=root),
                             lambda: ctx.sh(f"{PSQL} -c 'CREATE DATABASE bclone_x TEMPLATE {tpl}'"),
                             setup=lambda: _drop(ctx, "bclone_x"))
    strategy = "file_copy" if ctx.main.psql("SHOW fsync") == "off" else "wal_log"
    _, same = ctx.paired(lambda: None,
                         lambda: ctx.sh(f"{PSQL} -c 'CREATE DATABASE bclone_x TEMPLATE {tpl} "
                                        f"STRATEGY {strategy}'"),
                         setup=lambda: _drop(ctx, "bclone_x"))
    lib = _library_clones(ctx, root, tpl)
    _drop(ctx, "bclone_x")
    note = f"template {size / 2**20:.1f} MB; we chose {strategy}"
    return [Row(f"clone of a {size / 2**20:.0f} MB template", ours, floor, "≤ 1.3×", note),
            Row(f"clone, floor with the same strategy ({strategy})", ours, same, "—",
                note + "; for comparison: the interpreter start is most of the gap"),
            Row("clone from a test suite (library, one session)", lib[0], lib[1], "≤ 1.3×",
                "confiture.clone_database(…, session=…) vs a psql process per clone")]


def _library_clones(ctx: Bench, root: Path, tpl: str) -> tuple[float, float]:
    """Many clones from one process, as a test suite does (pgtestdb-style)."""
    import confiture

    ws = confiture.workspace_for(root / "confiture.toml", env="local", environ=ctx.main.env)
    with confiture.admin_session(ws) as session:
        return ctx.paired(
            lambda: confiture.clone_database(ws, "bclone_x", session=session),
            lambda: ctx.sh(f"{PSQL} -c 'CREATE DATABASE bclone_x TEMPLATE {tpl}'"),
            setup=lambda: _drop(ctx, "bclone_x"))


def bench_noop_reset(ctx: Bench) -> list[Row]:
    n = 200 if ctx.quick else 1000
    files = {}
    for i in range(n):
        kind = i % 4
        group = i // 4
        if kind == 0:
            files[f"db/schema/10_tables/{group}_t.sql"] = (
                f"CREATE TABLE t{group} (id int PRIMARY KEY, a text, b int);\n")
        elif kind == 1:
            files[f"db/schema/20_indexes/{group}_i.sql"] = f"CREATE INDEX ON t{group} (b);\n"
        elif kind == 2:
            files[f"db/schema/30_views/{group}_v.sql"] = (
                f"CREATE VIEW v{group} AS SELECT id, a FROM t{group} WHERE b > 0;\n")
        else:
            files[f"db/schema/40_functions/{group}_f.sql"] = (
                f"CREATE FUNCTION f{group}(x int) RETURNS int LANGUAGE sql AS $$ SELECT x + {group} $$;\n")
    root = _project(ctx.work / "reset", "breset", files)
    ctx.cli("reset", cwd=root)
    tpl = _template_of(ctx, root)
    ours, floor = ctx.paired(
        lambda: ctx.cli("reset", cwd=root),
        lambda: ctx.sh(f"{PSQL} -c 'DROP DATABASE IF EXISTS breset_db' && "
                       f"{PSQL} -c 'CREATE DATABASE breset_db TEMPLATE {tpl}'"))
    script, floor2 = ctx.paired(
        lambda: ctx.cli_script("reset", cwd=root),
        lambda: ctx.sh(f"{PSQL} -c 'DROP DATABASE IF EXISTS breset_db' && "
                       f"{PSQL} -c 'CREATE DATABASE breset_db TEMPLATE {tpl}'"))
    return [Row(f"no-op reset, unchanged {n}-file tree", ours, floor, "≤ 1.5×",
                "floor: psql drop + psql create (default strategy)"),
            Row("no-op reset as `python confiture.py reset`", script, floor2, "≤ 1.5×",
                "the file is recompiled on every call (no bytecode cache for scripts)")]


def bench_build(ctx: Bench) -> list[Row]:
    n = 50 if ctx.quick else 200
    files = {}
    for i in range(n):
        ref = f" REFERENCES t{i - 1}" if i else ""
        files[f"db/schema/10_tables/{i}_t.sql"] = (
            f"CREATE TABLE t{i} (id bigint PRIMARY KEY, parent bigint{ref}, name text NOT NULL, "
            f"created timestamptz DEFAULT now());\nCREATE INDEX ON t{i} (name);\n"
            f"COMMENT ON TABLE t{i} IS 'table {i}';\n")
    root = _project(ctx.work / "build", "bbuild", files)
    ctx.cli("build", "-o", str(root / "all.sql"), cwd=root)

    def drop_all() -> None:
        for db in ctx.main.psql("SELECT datname FROM pg_database WHERE starts_with(datname, "
                                "'bbuild_tpl_')").split():
            ctx.main.psql(f'ALTER DATABASE "{db}" IS_TEMPLATE false')
            _drop(ctx, db)
        _drop(ctx, "bbuild_raw")

    ours, floor = ctx.paired(
        lambda: ctx.cli("template", cwd=root),
        lambda: ctx.sh(f"{PSQL} -c 'CREATE DATABASE bbuild_raw' && "
                       f"{PSQL} -v ON_ERROR_STOP=1 -1 -d bbuild_raw -f {root / 'all.sql'}"),
        setup=drop_all)
    drop_all()
    return [Row(f"template build, {n}-table schema", ours, floor, "≤ 1.1×",
                "floor: psql createdb + psql -1 -f of the concatenated file")]


def run(ctx: Bench) -> list[Row]:
    return [*bench_clone(ctx), *bench_noop_reset(ctx), *bench_build(ctx)]
