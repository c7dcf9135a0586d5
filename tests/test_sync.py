"""Anonymized sync (§10), the cron wrapper and schema-to-schema, between two real clusters.

The source is a database on `pg`, the target one on `pg_remote`; psycopg checks the outcome.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from helpers import (
    CONFITURE,
    ROOT,
    Cluster,
    build_template,
    clean_environ,
    confiture_argv,
    confiture_environ,
    write_config,
)
from psycopg import sql

import confiture

KEY = "test-key-" + "k" * 24
CORPORA = Path(os.environ.get("CONFITURE_CORPORA") or ROOT.parent / "shared" / "corpora")

SCHEMA = """
CREATE TABLE users (
    id serial PRIMARY KEY,
    email text UNIQUE,
    full_name text,
    first_name varchar(40),
    phone text,
    born date,
    joined timestamptz,
    token uuid,
    age int,
    score bigint,
    bio text,
    secret text,
    tier text,
    code text,
    referrer_id int REFERENCES users (id),
    email_lower text GENERATED ALWAYS AS (lower(email)) STORED
);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id int NOT NULL REFERENCES users (id),
    user_email text,
    note text,
    total numeric(10, 2)
);
CREATE TABLE people (id int PRIMARY KEY, email text);
"""

DATA = """
INSERT INTO users (email, full_name, first_name, phone, born, joined, token, age, score, bio,
                   secret, tier, code, referrer_id)
SELECT CASE WHEN i % 10 = 0 THEN NULL ELSE format('person%s.original@corp.example', i) END,
       CASE WHEN i % 10 = 1 THEN NULL ELSE format('Zebulon%s Quartermaine%s', i, i) END,
       CASE WHEN i % 10 = 2 THEN NULL ELSE format('Zebulon%s', i) END,
       CASE WHEN i % 10 = 3 THEN NULL ELSE format('+33 6 00 %s', lpad(i::text, 6, '0')) END,
       CASE WHEN i % 10 = 4 THEN NULL ELSE date '1970-01-01' + i * 37 END,
       CASE WHEN i % 10 = 5 THEN NULL ELSE timestamptz '2020-01-01 12:00+00' + i * interval '1 hour' END,
       CASE WHEN i % 10 = 6 THEN NULL ELSE md5(i::text)::uuid END,
       CASE WHEN i % 10 = 7 THEN NULL ELSE i END,
       CASE WHEN i % 10 = 8 THEN NULL ELSE i * 1000003 END,
       CASE WHEN i % 10 = 9 THEN NULL ELSE format('biography of person %s, very private', i) END,
       CASE WHEN i % 7 = 0 THEN NULL ELSE format('tok_%s_supersecret', i) END,
       CASE WHEN i % 8 = 0 THEN NULL ELSE (ARRAY['goldtier', 'silvertier'])[1 + i % 2] END,
       CASE WHEN i % 9 = 0 THEN NULL ELSE format('code%s', i) END,
       CASE WHEN i > 1 AND i % 3 = 0 THEN i - 1 END
FROM generate_series(1, 200) i;
INSERT INTO orders (user_id, user_email, note, total)
SELECT u.id, u.email, format('order note %s for %s', n, u.full_name), n * 1.5
FROM users u, generate_series(1, 2) n;
"""

RULES = """
[sync.rules]
"users.id" = "keep"
"users.referrer_id" = "keep"
"*.email" = "email"
"users.full_name" = "name"
"users.first_name" = { name = "first" }
"users.phone" = "phone"
"users.born" = { shift_days = 10 }
"users.joined" = { shift_days = 3 }
"users.token" = "uuid"
"users.age" = { int_range = [18, 90] }
"users.score" = "hash"
"users.bio" = "redact"
"users.secret" = "null"
"users.tier" = { value = "standard" }
"users.code" = { sql = "upper(s.code)" }
"orders.*" = "keep"
"*.user_email" = "email"
"orders.note" = "hash"
"people.*" = "keep"
"""

MASKED = {"users": ["email", "full_name", "first_name", "phone", "bio", "secret", "tier"],
          "orders": ["user_email", "note"]}


@dataclass
class SyncProject:
    root: Path
    name: str
    source: Cluster
    target: Cluster
    src_db: str
    dst_db: str

    def config(self, rules: str = RULES, sync_extra: str = "", envs: str = "") -> None:
        write_config(self.root / "confiture.toml", f"""\
[project]
name = "{self.name}"
default_env = "staging"

[env.prod]
url = "{self.source.url(self.src_db)}"
protected = true

[env.staging]
url = "{self.target.url(self.dst_db)}"
{envs}
[sync]
from = "prod"
to = "staging"
key = "${{CONFITURE_SYNC_KEY}}"
{sync_extra}
{rules}""")

    def src(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.source.query(query, db=self.src_db, params=params)

    def dst(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.target.query(query, db=self.dst_db, params=params)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        full = clean_environ()
        full.update({"NO_COLOR": "1", "CONFITURE_SYNC_KEY": KEY, **(env or {})})
        return subprocess.run(confiture_argv(*args), cwd=self.root, env=confiture_environ(full),
                              text=True, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)

    def popen(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        full = clean_environ()
        full.update({"NO_COLOR": "1", "CONFITURE_SYNC_KEY": KEY, **(env or {})})
        return subprocess.Popen(list(argv), cwd=self.root, env=confiture_environ(full), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sync_templates(pg: Cluster, pg_remote: Cluster) -> Iterator[tuple[str, str]]:
    """(source template on `pg`: SCHEMA + DATA, target template on `pg_remote`: SCHEMA), built
    once; every `sp` clones its two databases from them."""
    source = build_template(pg, "sync_src", SCHEMA, DATA)
    target = build_template(pg_remote, "sync_dst", SCHEMA)
    yield source, target
    pg.drop_db(source)
    pg_remote.drop_db(target)


@pytest.fixture
def sp(tmp_path: Path, pg: Cluster, pg_remote: Cluster,
       sync_templates: tuple[str, str]) -> Iterator[SyncProject]:
    """Source database (schema + data) on `pg`, target database (schema only) on `pg_remote`,
    each a clone of its template (sync_templates)."""
    name = "s_" + secrets.token_hex(4)
    project = SyncProject(root=tmp_path, name=name, source=pg, target=pg_remote,
                          src_db=f"{name}_src", dst_db=f"{name}_dst")
    pg.create_db(project.src_db, template=sync_templates[0])
    pg_remote.create_db(project.dst_db, template=sync_templates[1])
    project.config()
    yield project
    pg.drop_db(project.src_db)
    pg_remote.drop_db(project.dst_db)


def table_rows(project: SyncProject, table: str) -> list[tuple[Any, ...]]:
    return project.dst(f"SELECT * FROM {table} ORDER BY id")


def target_text(project: SyncProject) -> str:
    """Every row of every target table as text, for 'no source value leaks' scans."""
    tables = [r[0] for r in project.dst("SELECT format('%I.%I', schemaname, tablename) "
                                        "FROM pg_tables WHERE schemaname = 'public'")]
    return "\n".join(row[0] for t in tables for row in project.dst(f"SELECT t::text FROM {t} t"))


def expected_hex(value: str) -> str:
    return hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


# ── pure parts ────────────────────────────────────────────────────────────────────────────


def test_rule_parsing_and_errors() -> None:
    assert confiture.parse_rule("email", "x") == confiture.Rule("email")
    assert confiture.parse_rule({"int_range": [1, 5]}, "x") == confiture.Rule("int_range", (1, 5))
    assert confiture.parse_rule({"name": "first"}, "x") == confiture.Rule("name", "first")
    for bad in ("emial", {"int_range": [5, 1]}, {"shift_days": 0}, {"a": 1, "b": 2},
                {"name": "middle"}, {"sql": ""}, 3):
        with pytest.raises(confiture.ConfigError):
            confiture.parse_rule(bad, "x")
    with pytest.raises(confiture.ConfigError) as info:
        confiture.parse_rule("emial", "x")
    assert info.value.hint == "did you mean 'email'?"


def test_every_registered_rule_reads_back_what_sync_rules_prints() -> None:
    """One registry entry per rule: its written form parses, prints back the same, and has an
    SQL expression for a column it accepts."""
    samples = {"value": 7, "sql": "upper(x)", "int_range": [1, 5], "shift_days": 3,
               "name": "last"}
    text = confiture.Column("c", "text", "text", "S", -1, False, False, False, True)
    for name, kind in confiture.RULE_KINDS.items():
        forms: list[Any] = ([name] if kind.bare else []) + \
            ([{name: samples[name]}] if kind.read_arg else [])
        assert forms, name
        for form in forms:
            rule = confiture.parse_rule(form, "x")
            assert confiture.parse_rule(tomllib.loads(f"v = {rule.toml()}")["v"],
                                        "x") == rule, name
            if confiture.rule_applies(rule, text) is None:
                assert "::text" in confiture.rule_sql(rule, text, "s.c", "s.h") or name == "keep"


def test_most_specific_pattern_wins_and_ties_are_errors() -> None:
    def rules(**pairs: str) -> list[tuple[confiture.NamePattern, confiture.Rule]]:
        return [(confiture.parse_pattern(p, "t", column=True), confiture.parse_rule(r, "t"))
                for p, r in pairs.items()]

    found = confiture.find_rule(rules(**{"users.*": "keep", "*.email": "email"}),
                                "public", "users", "email")
    assert found is not None and found[1].kind == "email"  # the column segment counts first
    found = confiture.find_rule(rules(**{"users.email": "hash", "public.users.email": "email"}),
                                "public", "users", "email")
    assert found is not None and found[1].kind == "email"  # a named schema beats any schema
    found = confiture.find_rule(rules(**{"u*.e*": "hash", "us*.e*": "email"}), "s", "users", "email")
    assert found is not None and found[1].kind == "email"  # more literal characters
    assert confiture.find_rule(rules(**{"users.*": "keep"}), "public", "orders", "x") is None
    with pytest.raises(confiture.ConfigError, match="equally specific"):
        confiture.find_rule(rules(**{"a*.email": "hash", "*b.email": "email"}), "s", "ab", "email")
    odd = confiture.parse_pattern('"We ird"."or""ders"."e.mail"', "t", column=True)
    assert odd.matches("We ird", 'or"ders', "e.mail") and not odd.matches("We ird", "orders", "e.mail")
    assert confiture.pattern_segment('or"ders') == '"or""ders"'


def test_hmac_in_sql_matches_python(pg: Cluster) -> None:
    inner, outer = confiture.hmac_pads(KEY.encode())
    long_inner, long_outer = confiture.hmac_pads(b"x" * 100)
    query = ("SELECT encode(sha256(decode(%(o)s, 'hex') || sha256(decode(%(i)s, 'hex') || "
             "convert_to(%(v)s, 'UTF8'))), 'hex')")
    for value in ("alice@example.com", "", "ünïcødé ✓"):
        assert pg.scalar(query, params={"i": inner, "o": outer, "v": value}) == expected_hex(value)
    assert pg.scalar(query, params={"i": long_inner, "o": long_outer, "v": "v"}) == \
        hmac.new(b"x" * 100, b"v", hashlib.sha256).hexdigest()


def test_load_order_puts_parents_first_and_names_cycles() -> None:
    def fk(child: str, parent: str, deferrable: bool = False) -> confiture.ForeignKey:
        return confiture.ForeignKey(f"{child}_fk", ("public", child), ("public", parent), "", "",
                                    ("x",), ("y",), deferrable, False)

    tables = [("public", "a_orders"), ("public", "b_users"), ("public", "c_items")]
    order = confiture.load_order(tables, [fk("a_orders", "b_users"), fk("c_items", "a_orders"),
                                          fk("b_users", "b_users")])
    assert [name for _, name in order] == ["b_users", "a_orders", "c_items"]
    assert confiture.load_order(tables, [fk("a_orders", "b_users"),
                                         fk("b_users", "a_orders", deferrable=True)])
    with pytest.raises(confiture.SyncError, match="cycle.*a_orders.*b_users"):
        confiture.load_order(tables, [fk("a_orders", "b_users"), fk("b_users", "a_orders")])


# ── the sync ──────────────────────────────────────────────────────────────────────────────


def test_sync_rewrites_every_rule_deterministically(sp: SyncProject) -> None:
    first = sp.run("sync")
    assert first.returncode == 0, first.stderr
    assert "synced 3 tables, 600 rows" in first.stdout  # people is empty
    run1 = {t: table_rows(sp, t) for t in ("users", "orders")}
    second = sp.run("sync", "--json")
    assert second.returncode == 0, second.stderr
    run2 = {t: table_rows(sp, t) for t in ("users", "orders")}
    assert run1 == run2  # same key, same values → same output, run after run

    cols = [r[0] for r in sp.dst("SELECT attname FROM pg_attribute WHERE attrelid = 'users'::regclass "
                                 "AND attnum > 0 ORDER BY attnum")]
    source = {r[0]: dict(zip(cols, r)) for r in sp.src("SELECT * FROM users ORDER BY id")}
    target = {r[0]: dict(zip(cols, r)) for r in sp.dst("SELECT * FROM users ORDER BY id")}
    assert source.keys() == target.keys()
    for uid, s in source.items():
        t = target[uid]
        for col in cols:  # NULL stays NULL, and keyed rules never produce NULL from a value
            if col in ("secret",):
                assert t[col] is None
            elif col != "email_lower":
                assert (s[col] is None) == (t[col] is None), (uid, col)
        if s["email"] is not None:
            assert t["email"] == f"user.{expected_hex(s['email'])[:20]}@example.com"
            assert t["email_lower"] == t["email"].lower()  # generated column recomputed
        if s["full_name"] is not None:
            hx = expected_hex(s["full_name"])
            assert t["full_name"] == (confiture._FIRST_NAMES[int(hx[0:2], 16) % 64] + " "
                                      + confiture._LAST_NAMES[int(hx[2:4], 16) % 64])
        if s["first_name"] is not None:
            assert t["first_name"] in confiture._FIRST_NAMES
        if s["phone"] is not None:
            assert re.fullmatch(r"\+1555\d{7}", t["phone"])
        if s["born"] is not None:
            assert isinstance(t["born"], date) and 1 <= abs((t["born"] - s["born"]).days) <= 10
        if s["joined"] is not None:
            delta = (t["joined"] - s["joined"]).total_seconds()
            assert delta % 86400 == 0 and 1 <= abs(delta) / 86400 <= 3
        if s["token"] is not None:
            assert isinstance(t["token"], uuid.UUID) and t["token"] != s["token"]
            assert t["token"].hex == expected_hex(str(s["token"]))[:32]
        if s["age"] is not None:
            assert 18 <= t["age"] <= 90
        if s["score"] is not None:
            assert t["score"] >= 0 and t["score"] == int(expected_hex(str(s["score"]))[:16], 16) \
                & (2**63 - 1)
        if s["bio"] is not None:
            assert t["bio"] == "[redacted]"
        if s["tier"] is not None:
            assert t["tier"] == "standard"
        if s["code"] is not None:
            assert t["code"] == s["code"].upper()
        assert t["referrer_id"] == s["referrer_id"]  # kept

    # the same value gives the same output in another table: joins on the masked key work
    joined = sp.dst("SELECT count(*), count(*) FILTER (WHERE o.user_id = u.id) FROM orders o "
                    "JOIN users u ON u.email = o.user_email")[0]
    expected = sp.src("SELECT count(*) FROM orders o JOIN users u ON u.email = o.user_email")[0][0]
    assert joined == (expected, expected) and expected > 300

    text = target_text(sp)
    for table, columns in MASKED.items():
        for col in columns:
            for (value,) in sp.src(f"SELECT DISTINCT {col}::text FROM {table} WHERE {col} IS NOT NULL"):
                assert value not in text, f"{table}.{col} leaked {value!r}"

    # foreign keys hold, sequences are past the copied values
    assert sp.dst("SELECT count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id "
                  "WHERE u.id IS NULL")[0][0] == 0
    assert sp.dst("SELECT count(*) FROM users c LEFT JOIN users p ON p.id = c.referrer_id "
                  "WHERE c.referrer_id IS NOT NULL AND p.id IS NULL")[0][0] == 0
    assert sp.dst("SELECT nextval('users_id_seq') > (SELECT max(id) FROM users)")[0][0]
    new_id = sp.dst("INSERT INTO orders (user_id) VALUES (1) RETURNING id")[0][0]
    assert new_id > 400

    report = json.loads(second.stdout)
    assert report["ok"] and report["from"] == "prod" and report["to"] == "staging"
    assert report["rows"] == 600 and report["error"] is None
    tables = {t["table"]: t for t in report["tables"]}
    assert tables["public.users"]["rows"] == 200
    assert "email (email)" in tables["public.users"]["masked"]
    assert "referrer_id" in tables["public.users"]["kept"]
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["ok"] and Path(report["report"]).parent == sp.root / ".confiture" / "sync"
    assert KEY not in Path(report["report"]).read_text()


def test_emails_are_unique_for_100k_distinct_inputs(sp: SyncProject) -> None:
    sp.src("INSERT INTO people SELECT i, format('p%s@x.example', i) FROM generate_series(1, 100000) i")
    result = sp.run("sync", "--tables", "people")
    assert result.returncode == 0, result.stderr
    assert sp.dst("SELECT count(*), count(DISTINCT email) FROM people")[0] == (100000, 100000)
    assert sp.dst("SELECT count(*) FROM people WHERE email LIKE 'p%@x.example'")[0][0] == 0


def test_unclassified_column_stops_the_sync_with_nothing_written(sp: SyncProject) -> None:
    assert sp.run("sync").returncode == 0
    before = sp.dst("SELECT id, email, age FROM users ORDER BY id")
    sp.src("ALTER TABLE users ADD COLUMN passport_no text DEFAULT 'X123'")
    sp.dst("ALTER TABLE users ADD COLUMN passport_no text")
    sp.src("UPDATE users SET age = 1")
    result = sp.run("sync")
    assert result.returncode == 2, result.stderr
    assert "public.users.passport_no (text)" in result.stderr and "nothing was written" in result.stderr
    assert sp.dst("SELECT id, email, age FROM users ORDER BY id") == before
    reports = sorted((sp.root / ".confiture" / "sync").glob("*.json"), key=lambda p: p.stat().st_mtime)
    failed = json.loads(reports[-1].read_text())
    assert failed["ok"] is False and "passport_no" in failed["error"]
    # a rule for it, and the sync goes through
    sp.config(RULES + '"users.passport_no" = "redact"\n')
    assert sp.run("sync").returncode == 0
    assert sp.dst("SELECT DISTINCT passport_no FROM users") == [("[redacted]",)]


def test_schema_mismatches_are_named_before_anything_is_written(sp: SyncProject) -> None:
    sp.dst("ALTER TABLE orders ALTER COLUMN note TYPE varchar(300)")
    sp.src("ALTER TABLE users ADD COLUMN nickname text")
    sp.dst("CREATE TABLE extra_target_only (id int)")
    sp.dst("INSERT INTO users (id, email) VALUES (999, 'keep-me')")
    result = sp.run("sync")
    assert result.returncode == 1
    assert "public.orders.note: type text in the source, character varying(300) in the target" \
        in result.stderr
    assert "public.users.nickname: in the source, not in the target" in result.stderr
    assert sp.dst("SELECT email FROM users") == [("keep-me",)]


def test_target_failure_mid_table_rolls_back_and_names_the_constraint(sp: SyncProject) -> None:
    sp.dst("INSERT INTO users (id, email) VALUES (999, 'keep-me')")
    sp.dst("ALTER TABLE orders ADD CONSTRAINT small_totals CHECK (total < 2)")
    result = sp.run("sync")
    assert result.returncode == 1
    assert "public.orders: loading the target failed" in result.stderr
    assert "small_totals" in result.stderr
    assert sp.dst("SELECT email FROM users") == [("keep-me",)]
    assert not sp.dst("SELECT 1 FROM pg_stat_activity WHERE application_name = 'confiture' "
                      "AND state <> 'idle'")


def test_filter_that_breaks_foreign_keys_rolls_back(sp: SyncProject) -> None:
    sp.dst("INSERT INTO users (id, email) VALUES (999, 'keep-me')")
    sp.config(sync_extra='[sync.where]\n"users" = "id <= 100"\n')
    result = sp.run("sync")
    assert result.returncode == 1
    assert "orders_user_id_fkey" in result.stderr and "reference nothing" in result.stderr
    assert sp.dst("SELECT email FROM users") == [("keep-me",)]
    assert sp.dst("SELECT count(*) FROM orders")[0][0] == 0


def test_where_filter_and_table_selection(sp: SyncProject) -> None:
    sp.config(sync_extra='tables = ["users", "orders"]\n[sync.where]\n'
                         '"orders" = "total > 1.5"\n"public.users" = "id > 0"\n')
    result = sp.run("sync")
    assert result.returncode == 0, result.stderr
    assert sp.dst("SELECT count(*) FROM orders")[0][0] == 200
    bad = sp.run("sync", "--tables", "nosuch*")
    assert bad.returncode == 2 and "matches no table" in bad.stderr


def test_broken_sql_rule_or_filter_is_named_before_anything_is_written(sp: SyncProject) -> None:
    """Issue 11.9: an unbalanced { sql = … } rule must not be blamed on another table (nor
    pass --dry-run): the table, column, rule and PostgreSQL's message are named, exit 2."""
    sp.run("sync")
    before = sp.dst("SELECT count(*) FROM users")[0][0]
    sp.config(rules=RULES.replace('"users.full_name" = "name"',
                                  '"users.full_name" = { sql = "this is not sql(" }'))
    for args in (("sync", "--dry-run"), ("sync",)):
        result = sp.run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "public.users.full_name" in result.stderr and "this is not sql(" in result.stderr
        assert "'users.full_name'" in result.stderr and "syntax error" in result.stderr
        assert "orders" not in result.stderr and "Traceback" not in result.stderr
    sp.config(sync_extra='[sync.where]\n"orders" = "no_such_column > 1"\n')
    result = sp.run("sync", "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "public.orders: [sync.where] 'orders'" in result.stderr
    assert "no_such_column" in result.stderr
    assert sp.dst("SELECT count(*) FROM users")[0][0] == before


def test_protected_target_and_same_database_are_refused(sp: SyncProject) -> None:
    sp.config(envs=f'[env.alias]\nurl = "{sp.target.url(sp.dst_db)}"\n'
                   f'[env.prod_copy]\nurl = "{sp.target.url(sp.dst_db + "_x")}"\nprotected = true\n')
    protected = sp.run("sync", "--from", "staging", "--to", "prod_copy")
    assert protected.returncode == 4 and "protected" in protected.stderr
    same = sp.run("sync", "--from", "staging", "--to", "alias")
    assert same.returncode == 4 and "both reach database" in same.stderr
    tools = confiture.find_pg_tools()
    conn = confiture.ConnInfo.parse(sp.target.url(sp.dst_db))
    with confiture.Session(tools, conn, sp.dst_db) as a, confiture.Session(tools, conn, sp.dst_db) as b, \
            confiture.Session(tools, confiture.ConnInfo.parse(sp.source.url(sp.src_db)),
                              sp.src_db) as c:
        assert confiture.server_identity(a) == confiture.server_identity(b)
        assert confiture.server_identity(a) != confiture.server_identity(c)


SLOW = ("CREATE FUNCTION slow(x text) RETURNS text LANGUAGE sql VOLATILE AS "
        "$$ SELECT pg_sleep(0.01); SELECT x $$")


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def loading(project: SyncProject, table: str) -> bool:
    """Is the target loading `table` right now (psql's \\copy sends COPY  "schema"."table")?"""
    return bool(project.target.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE %s",
        params=(project.dst_db, f'COPY %"public"."{table}"%')))


def test_key_never_reaches_query_text_activity_or_log(sp: SyncProject) -> None:
    sp.src(SLOW)
    sp.config(RULES.replace('"users.code" = { sql = "upper(s.code)" }',
                            '"users.code" = { sql = "slow(s.code)" }'))
    inner, outer = confiture.hmac_pads(KEY.encode())
    sp.source.query(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(
        sql.Identifier(sp.src_db)))
    proc = sp.popen(*confiture_argv("sync"))
    seen: list[str] = []
    try:
        wait_for(lambda: loading(sp, "users"), what="the users COPY")
        seen.extend(r[0] for r in sp.source.query(
            "SELECT query FROM pg_stat_activity WHERE datname = %s", params=(sp.src_db,)))
        seen.extend(r[0] for r in sp.target.query(
            "SELECT query FROM pg_stat_activity WHERE datname = %s", params=(sp.dst_db,)))
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    activity = "\n".join(seen)
    assert "current_setting('confiture.k_i')" in activity  # we looked at the right moment
    for secret in (KEY, inner, outer, KEY.encode().hex()):
        assert secret not in activity
    log = (Path(sp.source.host) / f"{sp.source.name}.log").read_text(errors="replace")
    assert "confiture.k_i" in log  # statements were logged…
    for secret in (KEY, inner, outer):
        assert secret not in log  # …but never the key


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_sync_leaves_the_target_unchanged(sp: SyncProject, how: int) -> None:
    sp.dst("INSERT INTO users (id, email) VALUES (999, 'keep-me')")
    sp.dst("INSERT INTO orders (user_id, note) VALUES (999, 'old order')")
    sp.src(SLOW)
    sp.config(RULES.replace('"users.code" = { sql = "upper(s.code)" }',
                            '"users.code" = { sql = "slow(s.code)" }'))
    tmp = sp.root / "tmp"  # where the run keeps its named pipes (issue 11.12)
    tmp.mkdir()
    proc = sp.popen(*confiture_argv("sync"), env={"TMPDIR": str(tmp)})
    try:
        wait_for(lambda: loading(sp, "users"), what="the users COPY")  # orders is loaded by now
    finally:
        os.kill(proc.pid, how)
        _, err = proc.communicate(timeout=60)
    if how == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in err
        assert list(tmp.iterdir()) == []  # cleaned up at exit
    else:
        assert [p.name.startswith("confiture-sync-") for p in tmp.iterdir()] == [True]

    def quiet() -> bool:
        return not any(c.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                "AND application_name = 'confiture'", db="postgres", params=(d,))
                       for c, d in ((sp.target, sp.dst_db), (sp.source, sp.src_db)))
    wait_for(quiet, what="the killed run's sessions to end")
    assert sp.dst("SELECT id, email FROM users") == [(999, "keep-me")]
    assert sp.dst("SELECT note FROM orders") == [("old order",)]
    # the next run removes what the killed one left; another live run's folder is kept
    live = tmp / f"confiture-sync-{os.getpid()}-x"
    live.mkdir()
    sp.src("CREATE OR REPLACE FUNCTION slow(x text) RETURNS text LANGUAGE sql AS 'SELECT x'")
    again = sp.run("sync", env={"TMPDIR": str(tmp)})
    assert again.returncode == 0, again.stderr
    assert list(tmp.iterdir()) == [live]


def test_non_superuser_target_loads_in_foreign_key_order(sp: SyncProject) -> None:
    role = "r_" + secrets.token_hex(4)
    db = sp.dst_db + "_r"
    sp.target.query(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        sp.target.query(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db),
                                                                      sql.Identifier(role)))
        with sp.target.connect(db) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            conn.execute(SCHEMA)
        url = sp.target.url(db).replace("postgres@", f"{role}@")
        sp.config(envs=f'[env.limited]\nurl = "{url}"\n')
        dry = sp.run("sync", "--to", "limited", "--dry-run")
        assert dry.returncode == 0 and "foreign-key order" in dry.stdout, dry.stderr
        result = sp.run("sync", "--to", "limited")
        assert result.returncode == 0, result.stderr
        assert sp.target.scalar("SELECT count(*) FROM orders", db=db) == 400
    finally:
        sp.target.drop_db(db)
        sp.target.query(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_hostile_names(sp: SyncProject) -> None:
    ddl = ('CREATE SCHEMA "We ird"; CREATE TABLE "We ird"."or""ders" '
           '(id int PRIMARY KEY, "e.mail" text, "x)y" text)')
    sp.src(ddl)
    sp.dst(ddl)
    sp.src('INSERT INTO "We ird"."or""ders" VALUES (1, \'a@b.c\', \'v\')')
    sp.config(RULES + "'\"We ird\".\"or\"\"ders\".*' = \"keep\"\n"
                      "'\"We ird\".\"or\"\"ders\".\"e.mail\"' = \"email\"\n")
    result = sp.run("sync")
    assert result.returncode == 0, result.stderr
    row = sp.dst('SELECT "e.mail", "x)y" FROM "We ird"."or""ders"')[0]
    assert row == (f"user.{expected_hex('a@b.c')[:20]}@example.com", "v")


def test_sync_rules_prints_a_complete_block(sp: SyncProject) -> None:
    sp.config(rules='[sync.rules]\n"users.bio" = "null"\n')
    result = sp.run("sync", "rules")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert '"public.users.email" = "email"' in text
    assert '"public.users.first_name" = { name = "first" }' in text
    assert '"public.users.phone" = "phone"' in text
    assert '"public.users.secret" = "null"' in text
    assert '"public.users.bio" = "null"' in text and "from confiture.toml" in text
    assert '"public.users.id" = "keep"' in text and '"public.orders.user_id" = "keep"' in text
    assert "generated column" in text
    sp.config(rules=text)  # the block is complete: a strict sync accepts it as is
    assert sp.run("sync", "--dry-run").returncode == 0


OWN_TABLES = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {mig} (version bigint PRIMARY KEY, name text);
CREATE TABLE {mig}_log (id bigint PRIMARY KEY, event text);
CREATE TABLE {deploys} (id bigint PRIMARY KEY, outcome text);
INSERT INTO {mig} VALUES ({n}, '{who}');
INSERT INTO {mig}_log VALUES ({n}, '{who}');
INSERT INTO {deploys} VALUES ({n}, '{who}');
"""


@pytest.mark.parametrize("names", [("public", "confiture_migrations", "confiture_deploys", ""),
                                   ("ops", "ops.mig", "ops.deploys",
                                    '[migrations]\ntable = "ops.mig"\n'
                                    '[deploy]\ntable = "ops.deploys"\n')])
def test_own_tables_are_never_synced_listed_or_user_data(sp: SyncProject,
                                                         names: tuple[str, ...]) -> None:
    schema, mig, deploys, settings = names
    sp.config(sync_extra="", envs="", rules=RULES + "\n" + settings)
    for run, n, who in ((sp.src, 1, "prod"), (sp.dst, 2, "staging")):
        run(OWN_TABLES.format(schema=schema, mig=mig, deploys=deploys, n=n, who=who))
    result = sp.run("sync")
    assert result.returncode == 0, result.stderr
    for table in (mig, mig + "_log", deploys):  # the target keeps its own history
        assert sp.dst(f"SELECT * FROM {table}") == [(2, "staging")], table
    rules = sp.run("sync", "rules")
    assert rules.returncode == 0, rules.stderr
    for table in (mig, mig + "_log", deploys):
        assert f'"{schema}.{table.split(".")[-1]}.' not in rules.stdout, rules.stdout
    # schema-to-schema: our tables are neither copied into NEW nor reported as left behind
    write_config(sp.root / "confiture.toml", f"""\
[project]
name = "{sp.name}"
default_env = "new"
{settings}
[env.old]
url = "{sp.source.url(sp.src_db)}"
[env.new]
url = "{sp.target.url(sp.dst_db)}"
""")
    sp.dst("TRUNCATE orders, users, people")
    (sp.root / "map.toml").write_text("")
    result = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml",
                    "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "_log" not in result.stdout + result.stderr and "deploys" not in result.stdout + \
        result.stderr, result.stdout + result.stderr


# ── the cron wrapper ──────────────────────────────────────────────────────────────────────


def test_cron_wrapper_never_overlaps_and_keeps_the_exit_status(sp: SyncProject) -> None:
    sp.src(SLOW)
    sp.config(RULES.replace('"users.code" = { sql = "upper(s.code)" }',
                            '"users.code" = { sql = "slow(s.code)" }'))
    wrapper = str(ROOT / "bin" / "confiture-sync-cron")
    env = {"CONFITURE_ROOT": str(sp.root), "CONFITURE_PY": str(CONFITURE),
           "PYTHON": sys.executable}
    logs = sp.root / ".confiture" / "logs"
    first = sp.popen(wrapper, env=env)
    wait_for(lambda: (logs / "sync-cron.log").exists() and "started" in
             (logs / "sync-cron.log").read_text(), what="the first run")
    second = sp.popen(wrapper, env=env)
    assert second.wait(timeout=30) == 0
    assert first.wait(timeout=120) == 0, first.communicate()
    summary = (logs / "sync-cron.log").read_text()
    assert summary.count("skipped") == 1 and summary.count("finished") == 1
    run_logs = sorted(logs.glob("sync-2*.log"))
    assert len(run_logs) == 1 and "synced 3 tables" in run_logs[0].read_text()
    refused = sp.popen(wrapper, "--to", "prod", env=env)
    assert refused.wait(timeout=60) == 4
    assert "finished" in (logs / "sync-cron.log").read_text().splitlines()[-1]
    assert "with exit 4" in (logs / "sync-cron.log").read_text()


# ── real world: pagila ────────────────────────────────────────────────────────────────────


@pytest.mark.skipif(not (CORPORA / "pagila").is_dir(), reason="../shared/corpora/pagila is absent")
def test_pagila_strict_sync(sp: SyncProject) -> None:
    pagila = CORPORA / "pagila"
    psql = confiture.find_pg_tools().psql
    for cluster, db, files in ((sp.source, sp.src_db, ("pagila-schema.sql", "pagila-data.sql")),
                               (sp.target, sp.dst_db, ("pagila-schema.sql",))):
        cluster.query("DROP SCHEMA public CASCADE; CREATE SCHEMA public", db=db)
        for name in files:
            subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", cluster.url(db), "-f",
                            str(pagila / name)], check=True, capture_output=True)
    sp.config(rules="")
    rules = sp.run("sync", "rules")
    assert rules.returncode == 0, rules.stderr
    assert '"public.customer.email" = "email"' in rules.stdout
    assert '"public.payment.amount" = "keep"' in rules.stdout  # partitions come through their root
    assert "payment_p2022" not in rules.stdout
    sp.config(rules=rules.stdout)
    result = sp.run("sync")
    assert result.returncode == 0, result.stderr
    for table in ("actor", "address", "customer", "film", "film_actor", "inventory", "payment",
                  "rental", "staff", "store"):
        count = f"SELECT count(*) FROM {table}"
        assert sp.dst(count) == sp.src(count), table
    assert sp.dst("SELECT count(*) FROM payment_p2022_02") == sp.src("SELECT count(*) FROM payment_p2022_02")
    source_emails = {r[0] for r in sp.src("SELECT email FROM customer")}
    assert not source_emails & {r[0] for r in sp.dst("SELECT email FROM customer")}
    assert sp.dst("SELECT count(*) FROM film f WHERE fulltext IS NULL")[0][0] == 0
    for check in ("SELECT count(*) FROM store s LEFT JOIN staff t ON t.staff_id = s.manager_staff_id "
                  "WHERE t.staff_id IS NULL",
                  "SELECT count(*) FROM payment p LEFT JOIN rental r ON r.rental_id = p.rental_id "
                  "WHERE r.rental_id IS NULL"):
        assert sp.dst(check)[0][0] == 0
    assert sp.dst("SELECT nextval('payment_payment_id_seq') > (SELECT max(payment_id) FROM payment)")[0][0]


# ── schema-to-schema ──────────────────────────────────────────────────────────────────────

OLD_SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric);
INSERT INTO customers (name, email) SELECT 'name ' || i, 'c' || i || '@x' FROM generate_series(1, 50) i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 50, i FROM generate_series(1, 120) i;
"""
NEW_SCHEMA = """
CREATE TABLE clients (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, full_name text NOT NULL,
                      email text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                     client_id bigint REFERENCES clients, total numeric(12, 2), label text);
"""


def test_schema_to_schema_with_renamed_column(sp: SyncProject, pg_remote: Cluster) -> None:
    old_db, new_db = sp.dst_db, sp.src_db  # OLD on the TCP cluster (password), NEW on `pg`
    role, password = "o_" + secrets.token_hex(4), "pw " + secrets.token_hex(8) + "'\\"
    sp.dst("DROP TABLE orders, users, people")
    sp.src("DROP TABLE orders, users, people")
    sp.dst(OLD_SCHEMA)
    sp.src(NEW_SCHEMA)
    pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    try:
        old_url = f"postgresql://{role}@127.0.0.1:{pg_remote.tcp_port}/{old_db}"
        write_config(sp.root / "confiture.toml", f"""\
[project]
name = "{sp.name}"
default_env = "new"
[env.old]
url = "{old_url}"
[env.new]
url = "{sp.source.url(new_db)}"
protected = true
""")
        (sp.root / "map.toml").write_text('[tables]\n"clients" = "customers"\n'
                                          '[columns.clients]\nfull_name = "name"\n'
                                          '[columns.orders]\nclient_id = "customer_id"\n'
                                          'label = { sql = "\'#\' || s.id" }\n')
        env = {"PGPASSWORD": password}
        refused = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml",
                         env=env)
        assert refused.returncode == 4 and "--yes" in refused.stderr
        result = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml",
                        "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert "row counts verified" in result.stdout
        assert password not in result.stdout + result.stderr
        # SPEC §5: the protected target was backed up before anything was written
        backups = list((sp.root / ".confiture/backups/new").glob("*.dump"))
        assert len(backups) == 1 and "backed up" in result.stderr
        assert str(backups[0]) in result.stderr
        assert sp.src("SELECT count(*), min(full_name) FROM clients")[0] == (50, "name 1")
        assert sp.src("SELECT count(*), count(DISTINCT client_id), min(label) FROM orders")[0] == \
            (120, 50, "#1")
        assert sp.src("SELECT count(*) FROM orders o LEFT JOIN clients c ON c.id = o.client_id "
                      "WHERE c.id IS NULL")[0][0] == 0
        new_id = sp.src("INSERT INTO clients (full_name) VALUES ('new') RETURNING id")[0][0]
        assert new_id > 50
        leftovers = sp.src("SELECT (SELECT count(*) FROM pg_foreign_server), "
                           "(SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'confiture%%'), "
                           "(SELECT count(*) FROM pg_extension WHERE extname = 'postgres_fdw'), "
                           "(SELECT count(*) FROM pg_user_mapping)")[0]
        assert leftovers == (0, 0, 0, 0)
        again = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml",
                       "--yes", env=env)
        assert again.returncode == 4 and "already hold rows" in again.stderr
        sp.src("TRUNCATE clients, orders")
        (sp.root / "map.toml").write_text('[tables]\n"clients" = "customers"\n')
        broken = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml",
                        "--yes", env=env)
        assert broken.returncode == 2 and "clients.full_name: NOT NULL" in broken.stderr
    finally:
        pg_remote.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("login", ["trust", "password", "pgpass"])
def test_schema_to_schema_with_every_kind_of_login(sp: SyncProject, pg: Cluster,
                                                   pg_remote: Cluster, login: str) -> None:
    """OLD reached without a password (trust on the unix socket), with one in the URL, or with
    one only in a .pgpass file: postgres_fdw gets the same login (issue 11.4)."""
    role, password = "o_" + secrets.token_hex(4), "pw:" + secrets.token_hex(8) + "\\"
    env: dict[str, str] = {"HOME": str(sp.root)}
    if login == "trust":  # OLD on `pg` over its unix socket, NEW on `pg_remote`
        old_cluster, old_db, new_cluster, new_db = pg, sp.src_db, pg_remote, sp.dst_db
        old_url = pg.url(old_db)
    else:  # OLD on `pg_remote` over TCP (password auth), NEW on `pg`
        old_cluster, old_db, new_cluster, new_db = pg_remote, sp.dst_db, pg, sp.src_db
        pg_remote.query(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        if login == "password":
            old_url = (f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:"
                       f"{pg_remote.tcp_port}/{old_db}")
        else:
            old_url = f"postgresql://{role}@127.0.0.1:{pg_remote.tcp_port}/{old_db}"
            escaped = password.replace("\\", "\\\\").replace(":", "\\:")
            pgpass = sp.root / ".pgpass"
            pgpass.write_text(f"# comment\nelsewhere:1:*:*:wrong\n"
                              f"127.0.0.1:{pg_remote.tcp_port}:*:{role}:{escaped}\n")
            pgpass.chmod(0o600)
    try:
        for cluster, db, schema in ((old_cluster, old_db, OLD_SCHEMA),
                                    (new_cluster, new_db, NEW_SCHEMA)):
            cluster.query("DROP TABLE orders, users, people", db=db)
            cluster.query(schema, db=db)
        write_config(sp.root / "confiture.toml", f"""\
[project]
name = "{sp.name}"
default_env = "new"
[env.old]
url = "{old_url}"
[env.new]
url = "{new_cluster.url(new_db)}"
""")
        (sp.root / "map.toml").write_text('[tables]\n"clients" = "customers"\n'
                                          '[columns.clients]\nfull_name = "name"\n'
                                          '[columns.orders]\nclient_id = "customer_id"\n')
        result = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping",
                        "map.toml", env=env)
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
        assert new_cluster.query("SELECT count(*), min(full_name) FROM clients", db=new_db)[0] \
            == (50, "name 1")
        assert new_cluster.scalar("SELECT count(*) FROM orders", db=new_db) == 120
    finally:
        pg_remote.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("text, key", [('tables = "members"\n', "tables"),
                                       ('columns = ["members"]\n', "columns"),
                                       ('skip = "members"\n', "skip"),
                                       ('[columns]\nmembers = "x"\n', "columns.'members'"),
                                       ('[tables]\nmembers = 3\n', "[tables] 'members'")])
def test_malformed_mapping_is_a_usage_error_naming_the_key(sp: SyncProject, text: str,
                                                           key: str) -> None:
    """Issue 11.10: no traceback, exit 2, the key named; nothing is read from the databases."""
    (sp.root / "map.toml").write_text(text)
    result = sp.run("schema-to-schema", "--from", "prod", "--to", "staging", "--mapping",
                    "map.toml", "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and key in result.stderr, result.stderr
    assert "map.toml" in result.stderr


def test_schema_to_schema_names_a_broken_sql_mapping(sp: SyncProject, pg: Cluster,
                                                     pg_remote: Cluster) -> None:
    """An unbalanced { sql = … } in the mapping is named (table, column, PostgreSQL's message)
    before anything is written; it never reaches psql's lexer as script text."""
    for cluster, db, schema in ((pg, sp.src_db, OLD_SCHEMA), (pg_remote, sp.dst_db, NEW_SCHEMA)):
        cluster.query("DROP TABLE orders, users, people", db=db)
        cluster.query(schema, db=db)
    write_config(sp.root / "confiture.toml", f"""\
[project]
name = "{sp.name}"
default_env = "new"
[env.old]
url = "{pg.url(sp.src_db)}"
[env.new]
url = "{pg_remote.url(sp.dst_db)}"
""")
    (sp.root / "map.toml").write_text('[tables]\n"clients" = "customers"\n'
                                      '[columns.clients]\nfull_name = "name"\n'
                                      '[columns.orders]\nclient_id = "customer_id"\n'
                                      'label = { sql = "this is not sql(" }\n')
    result = sp.run("schema-to-schema", "--from", "old", "--to", "new", "--mapping", "map.toml")
    assert result.returncode == 2, result.stderr
    assert "public.orders.label = (this is not sql()" in result.stderr
    assert "syntax error" in result.stderr and "Traceback" not in result.stderr
    assert pg_remote.scalar("SELECT count(*) FROM clients", db=sp.dst_db) == 0
    assert pg_remote.scalar("SELECT count(*) FROM pg_foreign_server", db=sp.dst_db) == 0
