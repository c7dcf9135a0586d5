"""Anonymized sync (issue 5): `confiture.py sync` against a bare `psql | psql` COPY pipe.

Source: a database on ctx.main; target: one on ctx.second. 1,000,000 rows (100,000 with QUICK=1).
- masked:   two columns rewritten (email, name; HMAC-SHA256 in SQL). The floor pipes the very same
            SELECT (taken from confiture's planner, key passed the same way) in the same format.
- unmasked: every column kept; the floor is a bare binary COPY pipe of the table.
Ours is a new `python confiture.py sync` process per run: interpreter start, catalog reads,
planning, TRUNCATE, foreign-key checks, sequences and COMMIT included. The floor loads into a
table emptied beforehand (untimed). Throughput in rows/s; target ≥ 0.9× the floor.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import quote

from run import PGBIN, Bench, Cluster, Row

KEY = "bench-sync-key-0123456789abcdef"
SRC, DST = "bsync_src", "bsync_dst"  # distinct names: both bench clusters listen on local sockets
SCHEMA = """
CREATE TABLE masked (id bigint PRIMARY KEY, email text, name text, city text, amount numeric(10,2),
                     created timestamptz);
CREATE TABLE plain (id bigint PRIMARY KEY, email text, name text, city text, amount numeric(10,2),
                    created timestamptz);
"""
FILL = """
INSERT INTO {t} SELECT i, 'person' || i || '@corp.example', 'Name ' || i, 'City ' || (i % 1000),
       i % 10000 / 100.0, timestamptz '2020-01-01' + i * interval '1 minute'
FROM generate_series(1, {n}) i;
"""
RULES = """
[sync.rules]
"masked.*" = "keep"
"masked.email" = "email"
"masked.name" = "name"
"plain.*" = "keep"
"""


def _url(cluster: Cluster, db: str) -> str:
    env = cluster.env
    return (f"postgresql:///{db}?host={quote(env['PGHOST'], safe='')}&port={env['PGPORT']}"
            f"&user={env.get('PGUSER', 'postgres')}")


def _env_prefix(cluster: Cluster, db: str, extra: dict[str, str] | None = None) -> str:
    values = {k: v for k, v in cluster.env.items() if k.startswith("PG")}
    values.update(PGDATABASE=db, **(extra or {}))
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


def _setup(ctx: Bench, rows: int) -> Path:
    for cluster, db in ((ctx.main, SRC), (ctx.second, DST)):
        cluster.psql(f"DROP DATABASE IF EXISTS {db}")
        cluster.psql(f"CREATE DATABASE {db}")
        cluster.psql(SCHEMA, db=db)
    for table in ("masked", "plain"):
        ctx.main.psql(FILL.format(t=table, n=rows), db=SRC)
    ctx.main.psql("VACUUM ANALYZE", db=SRC)
    root = ctx.work / "sync"
    root.mkdir(parents=True, exist_ok=True)
    (root / "confiture.toml").write_text(
        f'[project]\nname = "bsync"\ndefault_env = "staging"\n'
        f'[env.prod]\nurl = "{_url(ctx.main, SRC)}"\nprotected = true\n'
        f'[env.staging]\nurl = "{_url(ctx.second, DST)}"\n'
        f'[sync]\nfrom = "prod"\nto = "staging"\nkey = "${{CONFITURE_SYNC_KEY}}"\n{RULES}')
    return root


def _planned_select(root: Path, table: str) -> tuple[str, bool]:
    """The exact source query and format confiture uses for `table`."""
    import confiture

    config = confiture.load_config(root / "confiture.toml")
    settings = confiture.load_sync_settings(config, {"CONFITURE_SYNC_KEY": KEY})
    tools = confiture.find_pg_tools()
    envs = [confiture.resolve_env(config, name, {}) for name in ("prod", "staging")]
    with confiture.Session(tools, envs[0].conn, envs[0].database) as src, \
            confiture.Session(tools, envs[1].conn, envs[1].database) as dst:
        plan = confiture.plan_sync(settings, confiture.read_tables(src), confiture.read_tables(dst),
                                   confiture.read_foreign_keys(dst), confiture.read_sequences(dst))
    chosen = next(p for p in plan.tables if p.source.name == table)
    return chosen.select, chosen.binary


def _floor_pipe(ctx: Bench, select: str, binary: bool, table: str) -> str:
    import confiture

    inner, outer = confiture.hmac_pads(KEY.encode())
    fmt = "binary" if binary else "text"
    source = _env_prefix(ctx.main, SRC,
                         {"PGOPTIONS": f"-c confiture.k_i={inner} -c confiture.k_o={outer}"})
    copy_out = f"COPY ({select}) TO STDOUT WITH (FORMAT {fmt})"
    copy_in = f"COPY {table} FROM STDIN WITH (FORMAT {fmt})"
    return (f"{source} {PGBIN}/psql -X -q -c {shlex.quote(copy_out)} | "
            f"{_env_prefix(ctx.second, DST)} {PGBIN}/psql -X -q -v ON_ERROR_STOP=1 "
            f"-c {shlex.quote(copy_in)}")


def run(ctx: Bench) -> list[Row]:
    rows = 100_000 if ctx.quick else 1_000_000
    root = _setup(ctx, rows)
    env = dict(ctx.main.env, CONFITURE_SYNC_KEY=KEY)
    results = []
    for table, what in (("masked", "2 masked columns (email, name)"),
                        ("plain", "no masked column")):
        select, binary = _planned_select(root, table)
        if table == "plain":  # the floor is the bare table, not our SELECT
            select = f"SELECT * FROM {table}"
        pipe = _floor_pipe(ctx, select, binary, table)
        ours, floor = ctx.paired(
            lambda t=table: ctx.cli("sync", "--tables", t, cwd=root, env=env),
            lambda p=pipe: ctx.sh(p),
            setup=lambda t=table: ctx.second.psql(f"TRUNCATE {t}", db=DST),
            runs=3 if ctx.quick else None)
        results.append(Row(f"sync of {rows:,} rows, {what}", rows / ours, rows / floor, "≥ 0.9×",
                           f"{'binary' if binary else 'text'} COPY; floor: bare psql | psql pipe",
                           unit="rows/s"))
    for cluster, db in ((ctx.main, SRC), (ctx.second, DST)):
        cluster.psql(f"DROP DATABASE IF EXISTS {db}")
    return results
