"""Derived migrations (§11 schema model, §12 planner, §15 migrate generate / diff --sql).

Pure planner tests build models by hand (no server). Round trips read real databases with the
model, apply each plan to a copy and check zero difference both ways. The CLI tests run
`migrate generate` and `diff --sql` as users do; outcomes are checked with psycopg."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_environ

import confiture
from confiture import DbObject, SchemaModel, plan_schema

ROOT = Path(__file__).resolve().parent.parent
CORPORA = next((p for p in (ROOT.parent / "shared" / "corpora",
                            ROOT.parent.parent / "shared" / "corpora") if p.is_dir()),
               ROOT.parent / "shared" / "corpora")


# ── hand-built models ───────────────────────────────────────────────────────────────────────

def model(*objects: DbObject) -> SchemaModel:
    return SchemaModel(objects={o.key: o for o in objects})


def table(name: str, depends: Sequence[str] = (), **facts: Any) -> DbObject:
    base = {"relkind": "r", "persistence": "p", "rls": False, "force_rls": False,
            "options": None, "partition_by": None, "bound": None, "parents": None}
    return DbObject(kind="table", key=f"table public.{name}", schema="public", name=name,
                    parent="", facts={**base, **facts}, depends=frozenset(depends))


def column(tbl: str, name: str, type_: str = "integer", depends: Sequence[str] = (),
           **facts: Any) -> DbObject:
    base = {"type": type_, "notnull": False, "identity": "", "generated": "",
            "expression": None, "collation": None}
    return DbObject(kind="column", key=f"column public.{tbl}.{name}", schema="public", name=name,
                    parent=f"table public.{tbl}", facts={**base, **facts},
                    depends=frozenset([f"table public.{tbl}", *depends]))


def default(tbl: str, name: str, expr: str, depends: Sequence[str] = ()) -> DbObject:
    return DbObject(kind="default", key=f"default public.{tbl}.{name}", schema="public",
                    name=name, parent=f"table public.{tbl}", facts={"expr": expr},
                    depends=frozenset([f"table public.{tbl}", f"column public.{tbl}.{name}",
                                       *depends]))


def constraint(tbl: str, name: str, definition: str, type_: str = "c",
               depends: Sequence[str] = ()) -> DbObject:
    return DbObject(kind="constraint", key=f"constraint {name} on public.{tbl}", schema="public",
                    name=name, parent=f"table public.{tbl}",
                    facts={"type": type_, "def": definition},
                    depends=frozenset([f"table public.{tbl}", *depends]))


def index(tbl: str, name: str, definition: str, depends: Sequence[str] = ()) -> DbObject:
    return DbObject(kind="index", key=f"index public.{name}", schema="public", name=name,
                    parent=f"table public.{tbl}", facts={"def": definition},
                    depends=frozenset([f"table public.{tbl}", *depends]))


def view(name: str, definition: str, depends: Sequence[str] = ()) -> DbObject:
    return DbObject(kind="view", key=f"view public.{name}", schema="public", name=name,
                    parent="", facts={"relkind": "v", "def": definition, "options": None},
                    depends=frozenset(depends))


def function(signature: str, body: str, result: str = "integer") -> DbObject:
    name = signature.split("(")[0]
    return DbObject(kind="function", key=f"function public.{signature}", schema="public",
                    name=name, parent="", facts={"prokind": "f", "result": result,
                                                 "def": f"CREATE OR REPLACE FUNCTION public."
                                                        f"{signature} {body}"})


def sequence(name: str, owned_by: str | None = None) -> DbObject:
    facts = {"type": "integer", "start": "1", "increment": "1", "min": "1",
             "max": "2147483647", "cache": "1", "cycle": False, "owned_by": owned_by}
    return DbObject(kind="sequence", key=f"sequence public.{name}", schema="public", name=name,
                    parent="", facts=facts)


def enum(name: str, *labels: str) -> DbObject:
    facts = {"type": "e", "labels": list(labels), "attributes": None, "base": None,
             "default": None, "notnull": False, "checks": None, "range": None}
    return DbObject(kind="type", key=f"type public.{name}", schema="public", name=name,
                    parent="", facts=facts)


def sqls(plan: confiture.SchemaPlan) -> list[str]:
    return [s.sql for s in plan.statements]


def position(plan: confiture.SchemaPlan, fragment: str) -> int:
    found = [i for i, s in enumerate(sqls(plan)) if fragment in s]
    assert len(found) == 1, (fragment, sqls(plan))
    return found[0]


# ── the planner on pure models ──────────────────────────────────────────────────────────────

def test_equal_models_plan_nothing() -> None:
    one = model(table("t"), column("t", "id"))
    plan = plan_schema(one, one)
    assert plan.statements == () and plan.unsupported == () and plan.script() == ""


def test_new_table_with_serial_column_creates_sequence_first_and_owns_it_last() -> None:
    new = model(sequence("t_id_seq", owned_by="public.t.id"), table("t"),
                column("t", "id", notnull=True),
                default("t", "id", "nextval('public.t_id_seq'::regclass)",
                        depends=["sequence public.t_id_seq"]),
                column("t", "name", "text"))
    plan = plan_schema(model(), new)
    assert position(plan, "CREATE SEQUENCE public.t_id_seq") < position(plan, "CREATE TABLE")
    create = sqls(plan)[position(plan, "CREATE TABLE")]
    assert "id integer DEFAULT nextval('public.t_id_seq'::regclass) NOT NULL" in create
    assert "name text" in create
    assert sqls(plan)[-1] == "ALTER SEQUENCE public.t_id_seq OWNED BY public.t.id"
    assert not plan.destructive
    # and back: the table goes; the sequence it owns goes with it (IF EXISTS)
    back = plan_schema(new, model())
    assert sqls(back) == ["DROP TABLE public.t", "DROP SEQUENCE IF EXISTS public.t_id_seq"]
    assert [s.destructive for s in back.statements] == [True, True]


def test_foreign_key_between_tables_created_in_the_same_plan() -> None:
    pk = constraint("a", "a_pkey", "PRIMARY KEY (id)", "p")
    fk = constraint("b", "b_a_fkey", "FOREIGN KEY (a_id) REFERENCES public.a(id)", "f",
                    depends=[pk.key, "table public.a", "column public.a.id"])
    new = model(table("b"), column("b", "a_id"), fk, table("a"), column("a", "id"), pk)
    plan = plan_schema(model(), new)
    assert position(plan, "CREATE TABLE public.a") < position(plan, "ADD CONSTRAINT a_pkey")
    assert position(plan, "ADD CONSTRAINT a_pkey") < position(plan, "ADD CONSTRAINT b_a_fkey")
    assert position(plan, "CREATE TABLE public.b") < position(plan, "ADD CONSTRAINT b_a_fkey")
    # dropping both: the foreign key goes with its table, before the table it references
    back = plan_schema(new, model())
    assert sqls(back) == ["DROP TABLE public.b", "DROP TABLE public.a"]


def test_view_over_view_over_a_column_whose_type_changes() -> None:
    def schema(type_: str) -> SchemaModel:
        return model(table("t"), column("t", "x", type_),
                     view("v1", "SELECT t.x FROM public.t;", ["table public.t", "column public.t.x"]),
                     view("v2", "SELECT v1.x FROM public.v1;", ["view public.v1"]))
    plan = plan_schema(schema("integer"), schema("bigint"))
    assert sqls(plan) == [
        "DROP VIEW public.v2", "DROP VIEW public.v1",
        "ALTER TABLE public.t ALTER COLUMN x TYPE bigint",
        "CREATE VIEW public.v1 AS\nSELECT t.x FROM public.t",
        "CREATE VIEW public.v2 AS\nSELECT v1.x FROM public.v1"]
    assert not plan.destructive  # integer → bigint keeps every value
    narrowing = plan_schema(schema("bigint"), schema("integer"))
    assert "ALTER TABLE public.t ALTER COLUMN x TYPE integer USING x::integer" in sqls(narrowing)
    assert [s.sql for s in narrowing.destructive] == [
        "ALTER TABLE public.t ALTER COLUMN x TYPE integer USING x::integer"]


def test_partitioned_table_with_partitions_and_an_index() -> None:
    parent = table("m", partition_by="RANGE (at)")
    part = table("m_2024", depends=["table public.m"], parents=["public.m"],
                 bound="FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    idx = index("m", "m_at_idx", "CREATE INDEX m_at_idx ON ONLY public.m USING btree (at)",
                ["column public.m.at"])
    new = model(part, parent, column("m", "at", "date", notnull=True), idx)
    plan = plan_schema(model(), new)
    assert sqls(plan) == [
        'CREATE TABLE public.m (\n    at date NOT NULL\n) PARTITION BY RANGE (at)',
        ("CREATE TABLE public.m_2024 PARTITION OF public.m FOR VALUES FROM ('2024-01-01') "
        "TO ('2025-01-01')"),
        "CREATE INDEX m_at_idx ON public.m USING btree (at)"]  # without ONLY: partitions too
    back = plan_schema(new, model())
    assert sqls(back) == ["DROP TABLE public.m_2024", "DROP TABLE public.m"]


def test_function_used_by_a_default_and_a_check_changes_signature() -> None:
    def schema(signature: str, call: str) -> SchemaModel:
        f = function(signature, "RETURNS integer LANGUAGE sql AS 'SELECT 1'")
        return model(f, table("t"), column("t", "a"),
                     default("t", "a", call, [f.key]),
                     constraint("t", "t_a_check", f"CHECK ({call} > 0)", depends=[f.key]))
    plan = plan_schema(schema("f(x integer)", "public.f(1)"),
                       schema("f(x integer, y integer)", "public.f(1, 2)"))
    assert position(plan, "DROP CONSTRAINT t_a_check") < position(plan, "DROP FUNCTION")
    # the default changes in place, letting go of the old function before it is dropped
    assert position(plan, "SET DEFAULT public.f(1, 2)") < \
        position(plan, "DROP FUNCTION public.f(x integer)")
    assert position(plan, "FUNCTION public.f(x integer, y integer)") < \
        position(plan, "SET DEFAULT public.f(1, 2)")
    assert position(plan, "FUNCTION public.f(x integer, y integer)") < \
        position(plan, "ADD CONSTRAINT t_a_check")
    assert plan.script().startswith("SET check_function_bodies = false;\n")


def test_function_body_change_is_replaced_in_place() -> None:
    old = model(function("f()", "RETURNS integer AS 'SELECT 1'"),
                view("v", "SELECT public.f();", ["function public.f()"]))
    new = model(function("f()", "RETURNS integer AS 'SELECT 2'"),
                view("v", "SELECT public.f();", ["function public.f()"]))
    assert sqls(plan_schema(old, new)) == [
        "CREATE OR REPLACE FUNCTION public.f() RETURNS integer AS 'SELECT 2'"]
    # a new result type cannot be replaced in place: the view over it goes and comes back
    other = model(function("f()", "RETURNS bigint AS 'SELECT 2'", result="bigint"),
                  view("v", "SELECT public.f();", ["function public.f()"]))
    assert sqls(plan_schema(old, other)) == [
        "DROP VIEW public.v", "DROP FUNCTION public.f()",
        "CREATE OR REPLACE FUNCTION public.f() RETURNS bigint AS 'SELECT 2'",
        "CREATE VIEW public.v AS\nSELECT public.f()"]


def test_enum_labels_added_in_place_or_swapped_when_removed() -> None:
    add = plan_schema(model(enum("mood", "sad", "happy")),
                      model(enum("mood", "meh", "sad", "ok", "happy", "glad")))
    assert sqls(add) == ["ALTER TYPE public.mood ADD VALUE 'meh' BEFORE 'sad'",
                         "ALTER TYPE public.mood ADD VALUE 'ok' AFTER 'sad'",
                         "ALTER TYPE public.mood ADD VALUE 'glad' AFTER 'happy'"]
    def schema(*labels: str) -> SchemaModel:
        return model(enum("mood", *labels), table("t"),
                     column("t", "m", "public.mood", depends=["type public.mood"]),
                     default("t", "m", "'sad'::public.mood", ["type public.mood"]))
    swap = plan_schema(schema("sad", "happy", "ok"), schema("sad", "happy"))
    assert sqls(swap) == [
        "ALTER TABLE public.t ALTER COLUMN m DROP DEFAULT",
        "ALTER TYPE public.mood RENAME TO mood__old",
        "CREATE TYPE public.mood AS ENUM ('sad', 'happy')",
        "ALTER TABLE public.t ALTER COLUMN m TYPE public.mood USING m::text::public.mood",
        "DROP TYPE public.mood__old",
        "ALTER TABLE public.t ALTER COLUMN m SET DEFAULT 'sad'::public.mood"]
    # rows holding 'ok' cannot convert: the conversion is what loses data, not the rename,
    # the new type or the drop of the old one
    assert [s.sql for s in swap.destructive] == [
        "ALTER TABLE public.t ALTER COLUMN m TYPE public.mood USING m::text::public.mood"]


def test_drops_are_destructive_and_look_alike_pairs_are_suggested_as_renames() -> None:
    old = model(table("t"), column("t", "id"), column("t", "label", "text"))
    new = model(table("t"), column("t", "id"), column("t", "title", "text"))
    plan = plan_schema(old, new)
    assert sqls(plan) == ["ALTER TABLE public.t DROP COLUMN label",
                          "ALTER TABLE public.t ADD COLUMN title text"]
    assert [s.sql for s in plan.destructive] == ["ALTER TABLE public.t DROP COLUMN label"]
    assert plan.suggestions == ("--rename column:public.t.label=title",)
    renamed = plan_schema(old, new, [confiture.parse_rename("column:t.label=title")])
    assert sqls(renamed) == ["ALTER TABLE public.t RENAME COLUMN label TO title"]
    tables = plan_schema(model(table("a"), column("a", "id")), model(table("b"), column("b", "id")))
    assert tables.suggestions == ("--rename table:public.a=b",)
    moved = plan_schema(model(table("a"), column("a", "id"), constraint("a", "a_pkey",
                                                                        "PRIMARY KEY (id)", "p")),
                        model(table("b"), column("b", "id"), constraint("b", "a_pkey",
                                                                        "PRIMARY KEY (id)", "p")),
                        [confiture.parse_rename("table:a=b")])
    assert sqls(moved) == ["ALTER TABLE public.a RENAME TO b"]


def test_rename_hints_are_checked() -> None:
    for bad in ("table:a", "view:a=b", "column:a=b", "table:a.b.c=d"):
        with pytest.raises(confiture.ConfigError):
            confiture.parse_rename(bad)
    plan = plan_schema(model(), model(), [confiture.parse_rename("table:nothere=x")])
    assert plan.unsupported == ("--rename: no table public.nothere in the migrated schema",)


def test_a_rename_plans_only_the_rename_with_owners_grants_and_owned_sequences() -> None:
    """What PostgreSQL carries along with a renamed table or column (its owner, its grants,
    a sequence's OWNED BY) is not planned again, with --privileges or without."""
    def side(tbl: str, col: str) -> SchemaModel:
        owned = sequence("s", owned_by=f"public.{tbl}.{col}")
        return model(table(tbl, columns=[col]), column(tbl, col), owned,
                     *grants(f"table public.{tbl}", "alice", [*TABLE_BASE, "bob=SELECT"],
                             TABLE_BASE),
                     *grants(f"table public.{tbl}", "alice", ["bob=UPDATE"], what="column",
                             column=col),
                     *grants("sequence public.s", "alice", ["(owner)=USAGE"], code="S"))
    renames = [confiture.parse_rename("table:t=u"), confiture.parse_rename("column:u.a=b")]
    assert sqls(plan_schema(side("t", "a"), side("u", "b"), renames)) == [
        "ALTER TABLE public.t RENAME TO u", "ALTER TABLE public.u RENAME COLUMN a TO b"]
    # the way back renames in the reverse order (the column of the table's new name first)
    [(_, down)] = confiture.plan_stages(side("t", "a"), side("u", "b"), renames, online=False)
    assert sqls(down) == [
        "ALTER TABLE public.u RENAME COLUMN b TO a", "ALTER TABLE public.u RENAME TO t"]
    # an owner that changes with the rename is still planned, under the new name
    moved = side("u", "b")
    moved.objects["owner table public.u"] = confiture.evolve(
        moved.objects["owner table public.u"],
        facts={**moved.objects["owner table public.u"].facts, "owner": "carol"})
    assert sqls(plan_schema(side("t", "a"), moved, renames))[2:] == [
        "ALTER TABLE public.u OWNER TO carol"]


def test_in_place_alterations_of_columns_tables_constraints_and_comments() -> None:
    old = model(table("t"), column("t", "a", "character varying(10)"), column("t", "b"),
                constraint("t", "t_b_check", "CHECK ((b > 0)) NOT VALID"),
                sequence("s"))
    new = model(table("t", rls=True, options=["fillfactor=70"]),
                column("t", "a", "character varying(20)", notnull=True),
                column("t", "b", identity="d"),
                constraint("t", "t_b_check", "CHECK ((b > 0))"),
                confiture.evolve(sequence("s"), facts={**sequence("s").facts, "increment": "5"},
                                 comment="counts"))
    assert sqls(plan_schema(old, new)) == [
        "ALTER SEQUENCE public.s INCREMENT BY 5",
        "COMMENT ON SEQUENCE public.s IS 'counts'",
        "ALTER TABLE public.t ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE public.t SET (fillfactor=70)",
        "ALTER TABLE public.t ALTER COLUMN a TYPE character varying(20)",
        "ALTER TABLE public.t ALTER COLUMN a SET NOT NULL",
        "ALTER TABLE public.t ALTER COLUMN b ADD GENERATED BY DEFAULT AS IDENTITY",
        "ALTER TABLE public.t VALIDATE CONSTRAINT t_b_check"]


def test_a_column_over_a_type_that_must_be_recreated_is_not_expressed() -> None:
    def schema(subtype: str) -> SchemaModel:
        facts = {"type": "r", "labels": None, "attributes": None, "base": None, "default": None,
                 "notnull": False, "checks": None,
                 "range": {"subtype": subtype, "canonical": None, "subdiff": None}}
        rng = DbObject(kind="type", key="type public.r", schema="public", name="r", parent="",
                       facts=facts)
        return model(rng, table("t"), column("t", "span", "public.r", depends=[rng.key]))
    plan = plan_schema(schema("integer"), schema("numeric"))
    assert plan.unsupported == (
        "column public.t.span: depends on type public.r, which must be dropped and created again",)


def type_(name: str, **facts: Any) -> DbObject:
    base = {"type": "c", "labels": None, "attributes": None, "base": None, "default": None,
            "notnull": False, "checks": None, "range": None}
    return DbObject(kind="type", key=f"type public.{name}", schema="public", name=name,
                    parent="", facts={**base, **facts})


def named(kind: str, name: str, **facts: Any) -> DbObject:
    """An object without a schema (schema, extension)."""
    return DbObject(kind=kind, key=f"{kind} {name}", schema="", name=name, parent="", facts=facts)


def on_table(kind: str, tbl: str, name: str, **facts: Any) -> DbObject:
    """A trigger or a policy of a table."""
    return DbObject(kind=kind, key=f"{kind} {name} on public.{tbl}", schema="public", name=name,
                    parent=f"table public.{tbl}", facts=facts,
                    depends=frozenset([f"table public.{tbl}"]))


ATTR = {"collation": None}
DOMAIN = {"type": "d", "base": "integer", "checks": [{"name": "pos", "def": "CHECK ((VALUE > 0))"}]}
UNIQUE = constraint("t", "t_u", "UNIQUE (a)", "u", ["column public.t.a"])
FK = constraint("t", "t_fk", "FOREIGN KEY (a) REFERENCES public.p(id)", "f", ["table public.p"])
INDEX = index("t", "t_a", "CREATE INDEX t_a ON public.t USING btree (a)", ["column public.t.a"])
MATVIEW = DbObject(kind="view", key="view public.m", schema="public", name="m", parent="",
                   facts={"relkind": "m", "def": " SELECT a FROM public.t;", "options": None},
                   depends=frozenset(["table public.t"]))
PROCEDURE = DbObject(kind="function", key="function public.p(x integer)", schema="public",
                     name="p", parent="", facts={"prokind": "p", "result": None, "def": (
                         "CREATE OR REPLACE PROCEDURE public.p(x integer) LANGUAGE sql AS $$ "
                         "SELECT x $$")})
TRIGGER = on_table("trigger", "t", "t_touch", enabled="O", **{
    "def": "CREATE TRIGGER t_touch BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION "
           "public.touch()"})
POLICY = on_table("policy", "t", "mine", cmd="*", permissive=True, roles=None,
                  using="(owner = CURRENT_USER)", check=None)
T_A = (table("t"), column("t", "a"))


def changed(obj: DbObject, **facts: Any) -> DbObject:
    return confiture.evolve(obj, facts={**obj.facts, **facts})


# object kind / change kind → (from, to, the statements planned). The dependency chains of
# issue 13 have tests of their own above; these are the remaining kinds and changes.
PURE_CHANGES: dict[str, tuple[SchemaModel, SchemaModel, list[str]]] = {
    "schema and extension created": (
        model(), model(named("schema", "app"), named("extension", "citext", schema="app")),
        ["CREATE SCHEMA app", "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA app"]),
    "extension moved": (
        model(named("schema", "app"), named("extension", "citext", schema="public")),
        model(named("schema", "app"), named("extension", "citext", schema="app")),
        ["ALTER EXTENSION citext SET SCHEMA app"]),
    "composite attributes": (
        model(type_("pair", attributes=[{"name": "a", "type": "integer", **ATTR},
                                        {"name": "b", "type": "text", **ATTR}])),
        model(type_("pair", attributes=[{"name": "a", "type": "bigint", **ATTR},
                                        {"name": "c", "type": "date", **ATTR}])),
        [("ALTER TYPE public.pair DROP ATTRIBUTE b, ALTER ATTRIBUTE a TYPE bigint, "
          "ADD ATTRIBUTE c date")]),
    "domain default, NOT NULL and check": (
        model(type_("pos", **DOMAIN)),
        model(type_("pos", **{**DOMAIN, "default": "1", "notnull": True,
                              "checks": [{"name": "pos", "def": "CHECK ((VALUE >= 0))"}]})),
        ["ALTER DOMAIN public.pos SET DEFAULT 1", "ALTER DOMAIN public.pos SET NOT NULL",
         "ALTER DOMAIN public.pos DROP CONSTRAINT pos",
         "ALTER DOMAIN public.pos ADD CONSTRAINT pos CHECK ((VALUE >= 0))"]),
    "range created": (
        model(), model(type_("span", type="r", range={"subtype": "date", "canonical": None,
                                                      "subdiff": None})),
        ["CREATE TYPE public.span AS RANGE (SUBTYPE = date)"]),
    "columns: default, NOT NULL, collation, identity, generated": (
        model(table("t", columns=["a", "b", "c", "d", "e"]), column("t", "a"),
              default("t", "a", "0"), column("t", "b", notnull=True), column("t", "c", "text"),
              column("t", "e", identity="a"),
              column("t", "d", generated="s", expression="(a * 2)")),
        model(table("t", columns=["a", "b", "c", "e", "d"]), column("t", "a"),
              default("t", "a", "1"), column("t", "b"),
              column("t", "c", "text", collation='pg_catalog."C"'), column("t", "e"),
              column("t", "d", generated="s", expression="(a * 3)")),
        ["ALTER TABLE public.t DROP COLUMN d", "ALTER TABLE public.t ALTER COLUMN b DROP NOT NULL",
         'ALTER TABLE public.t ALTER COLUMN c TYPE text COLLATE pg_catalog."C"',
         "ALTER TABLE public.t ALTER COLUMN e DROP IDENTITY",
         "ALTER TABLE public.t ADD COLUMN d integer GENERATED ALWAYS AS ((a * 3)) STORED",
         "ALTER TABLE public.t ALTER COLUMN a SET DEFAULT 1"]),
    "default dropped": (
        model(*T_A, default("t", "a", "0")), model(*T_A),
        ["ALTER TABLE public.t ALTER COLUMN a DROP DEFAULT"]),
    "table: persistence, RLS, storage, inheritance": (
        model(table("t", rls=True, force_rls=True, options=["fillfactor=70"],
                    parents=["public.p"]), table("p"), table("q")),
        model(table("t", persistence="u", rls=True, parents=["public.q"]), table("p"),
              table("q")),
        ["ALTER TABLE public.t SET UNLOGGED", "ALTER TABLE public.t NO FORCE ROW LEVEL SECURITY",
         "ALTER TABLE public.t RESET (fillfactor)", "ALTER TABLE public.t NO INHERIT public.p",
         "ALTER TABLE public.t INHERIT public.q"]),
    "unique and foreign key replaced": (
        model(*T_A, UNIQUE, FK, table("p")),
        model(*T_A, changed(UNIQUE, **{"def": "UNIQUE (a) DEFERRABLE"}),
              changed(FK, **{"def": "FOREIGN KEY (a) REFERENCES public.p(id) ON DELETE CASCADE"}),
              table("p")),
        ["ALTER TABLE public.t DROP CONSTRAINT t_fk", "ALTER TABLE public.t DROP CONSTRAINT t_u",
         ("ALTER TABLE public.t ADD CONSTRAINT t_fk FOREIGN KEY (a) REFERENCES public.p(id) "
          "ON DELETE CASCADE"), "ALTER TABLE public.t ADD CONSTRAINT t_u UNIQUE (a) DEFERRABLE"]),
    "index replaced": (
        model(*T_A, INDEX),
        model(*T_A, changed(INDEX, **{"def": "CREATE INDEX t_a ON public.t USING btree (a) "
                                          "WHERE (a > 0)"})),
        ["DROP INDEX public.t_a", "CREATE INDEX t_a ON public.t USING btree (a) WHERE (a > 0)"]),
    "materialized view with its index": (
        model(*T_A),
        model(*T_A, MATVIEW, DbObject(
            kind="index", key="index public.m_a", schema="public", name="m_a",
            parent="view public.m", facts={"def": "CREATE UNIQUE INDEX m_a ON public.m USING "
                                                  "btree (a)"},
            depends=frozenset(["view public.m"]))),
        ["CREATE MATERIALIZED VIEW public.m AS\nSELECT a FROM public.t",
         "CREATE UNIQUE INDEX m_a ON public.m USING btree (a)"]),
    "view replaced": (
        model(*T_A, view("v", " SELECT 1", ["table public.t"])),
        model(*T_A, view("v", " SELECT 2", ["table public.t"])),
        ["DROP VIEW public.v", "CREATE VIEW public.v AS\nSELECT 2"]),
    "procedure created": (model(), model(PROCEDURE), [PROCEDURE.facts["def"]]),
    "procedure dropped": (model(PROCEDURE), model(), ["DROP PROCEDURE public.p(x integer)"]),
    "trigger disabled in place": (
        model(table("t"), TRIGGER), model(table("t"), changed(TRIGGER, enabled="D")),
        ["ALTER TABLE public.t DISABLE TRIGGER t_touch"]),
    "trigger replaced": (
        model(table("t"), TRIGGER),
        model(table("t"), changed(TRIGGER, **{"def": TRIGGER.facts["def"].replace(
            "UPDATE", "INSERT OR UPDATE")})),
        ["DROP TRIGGER t_touch ON public.t",
         ("CREATE TRIGGER t_touch BEFORE INSERT OR UPDATE ON public.t FOR EACH ROW EXECUTE "
          "FUNCTION public.touch()")]),
    "policy replaced": (
        model(table("t"), POLICY), model(table("t"), changed(POLICY, cmd="r")),
        ["DROP POLICY mine ON public.t",
         ("CREATE POLICY mine ON public.t AS PERMISSIVE FOR SELECT TO PUBLIC USING "
          "((owner = CURRENT_USER))")]),
}


@pytest.mark.parametrize("case", sorted(PURE_CHANGES))
def test_each_object_kind_and_change_kind_on_pure_models(case: str) -> None:
    old, new, expected = PURE_CHANGES[case]
    plan = plan_schema(old, new)
    assert sqls(plan) == expected
    assert plan.unsupported == ()
    # only what loses rows is destructive: here, the generated column created again
    assert [s.sql for s in plan.destructive] == [s for s in expected if "DROP COLUMN" in s]


def test_column_order_is_part_of_the_schema() -> None:
    """New columns are added in the table's order; an order ADD COLUMN cannot reach (a
    column in the middle) is named, not silently planned; a rename keeps the order."""
    old = model(table("t", columns=["id", "b"]), column("t", "id"), column("t", "b"))
    tail = model(table("t", columns=["id", "b", "z", "a"]), column("t", "id"),
                 column("t", "b"), column("t", "z"), column("t", "a"))
    plan = plan_schema(old, tail)
    assert sqls(plan) == ["ALTER TABLE public.t ADD COLUMN z integer",
                          "ALTER TABLE public.t ADD COLUMN a integer"]
    assert plan.unsupported == ()
    middle = model(table("t", columns=["id", "a", "b"]), column("t", "id"), column("t", "a"),
                   column("t", "b"))
    plan = plan_schema(old, middle)
    assert plan.unsupported == (
        "table public.t: column order: the DDL has a, b where the plan gives b, a (PostgreSQL "
        "adds columns at the end and cannot move one: put new columns last in the DDL, or "
        "rebuild the table by hand)",)
    renamed = model(table("t", columns=["id", "c"]), column("t", "id"), column("t", "c"))
    plan = plan_schema(old, renamed, [confiture.parse_rename("column:t.b=c")])
    assert sqls(plan) == ["ALTER TABLE public.t RENAME COLUMN b TO c"]
    assert plan.unsupported == ()
    assert confiture.compare_models(middle, old) == ["- column public.t.a", "~ table public.t"]


def test_model_diff_reports_objects_with_column_level_detail() -> None:
    """diff on models: columns, defaults and checks are reported on their table with
    column-level detail; other objects on their own, labelled as pg_dump names them."""
    ddl = model(table("t", columns=["id", "name"]), column("t", "id"),
                column("t", "name", "text", notnull=True), default("t", "name", "'anon'::text"),
                constraint("t", "t_name_check", "CHECK ((name <> ''::text))"),
                constraint("t", "t_fk", "FOREIGN KEY (id) REFERENCES public.t(id)", "f"),
                index("t", "t_name", "CREATE INDEX t_name ON public.t USING btree (name)"))
    live = model(table("t", columns=["name", "id", "email"]), column("t", "id", "bigint"),
                 column("t", "name", "text", notnull=True),
                 default("t", "name", "'nobody'::text"), column("t", "email", "text"),
                 confiture.evolve(index("t", "t_name", "CREATE INDEX t_name ON public.t "
                                                       "USING btree (name)"), comment="by name"),
                 view("v", " SELECT 1;"))
    found = {d.label: d for d in confiture.compare_model_objects(ddl, live)}
    assert sorted((d.change, label) for label, d in found.items()) == [
        ("added", "view public.v"), ("changed", "index public.t_name"),
        ("changed", "table public.t"), ("missing", "fk constraint t_fk on public.t")]
    assert found["table public.t"].summary == (
        "column email added (text)", "column id: type integer → bigint",
        "column name: default 'anon'::text → 'nobody'::text", "column order differs",
        "constraint t_name_check missing")
    assert found["index public.t_name"].summary == ("comment changed",)
    assert found["table public.t"].diff.startswith("--- ddl\n+++ database\n")
    assert "-    id integer," in found["table public.t"].diff
    as_json = found["fk constraint t_fk on public.t"].as_json()
    assert (as_json["type"], as_json["schema"], as_json["name"]) == ("FK CONSTRAINT", "public",
                                                                      "t t_fk")
    assert confiture.compare_model_objects(ddl, ddl) == []


# ── foreign data and event triggers ─────────────────────────────────────────────────────────

def server(name: str, wrapper: str = "file_fdw", extension: str | None = "file_fdw",
           **facts: Any) -> DbObject:
    base = {"wrapper": wrapper, "type": None, "version": None, "options": None}
    return DbObject(kind="server", key=f"server {name}", schema="", name=name, parent="",
                    facts={**base, **facts},
                    depends=frozenset([f"extension {extension}"] if extension else []))


def foreign_column(name: str, type_: str = "integer", **facts: Any) -> dict[str, Any]:
    base = {"name": name, "type": type_, "notnull": False, "local": True, "default": None,
            "expression": None, "collation": None, "options": None, "comment": None}
    return {**base, **facts}


def foreign_table(name: str, *columns: dict[str, Any], srv: str = "files",
                  **facts: Any) -> DbObject:
    base = {"server": srv, "options": [["filename", "/dev/null"]], "bound": None,
            "parents": None, "columns": list(columns), "checks": []}
    return DbObject(kind="foreign_table", key=f"foreign_table public.{name}", schema="public",
                    name=name, parent="", facts={**base, **facts},
                    depends=frozenset([f"server {srv}"]))


def event_trigger(name: str, function_: str = "public.guard", tags: Sequence[str] = (),
                  enabled: str = "O") -> DbObject:
    facts = {"event": "ddl_command_end", "tags": list(tags) or None,
             "function": function_, "enabled": enabled}
    return DbObject(kind="event_trigger", key=f"event_trigger {name}", schema="", name=name,
                    parent="", facts=facts, depends=frozenset([f"function {function_}()"]))


FDW_EXTENSION = DbObject(kind="extension", key="extension file_fdw", schema="", name="file_fdw",
                         parent="", facts={"schema": "public"})


def test_foreign_table_created_after_its_server_and_altered_in_place() -> None:
    ft = foreign_table("ft", foreign_column("a"), foreign_column("b", "text"))
    over = view("v", " SELECT a FROM public.ft", ["foreign_table public.ft"])
    old = model(FDW_EXTENSION, server("files"), ft, over)
    assert [s.split(" (")[0].split(" AS")[0] for s in sqls(plan_schema(model(), old))] == [
        "CREATE EXTENSION IF NOT EXISTS file_fdw WITH SCHEMA public",
        "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw", "CREATE FOREIGN TABLE public.ft",
        "CREATE VIEW public.v"]
    # a column added at the end, another's default and options: in place, the view kept
    grown = foreign_table("ft", foreign_column("a"),
                          foreign_column("b", "text", default="'x'::text",
                                         options=[["force_not_null", "true"]]),
                          foreign_column("c", "date", notnull=True, comment="when"),
                          options=[["filename", "/tmp/x"], ["format", "csv"]])
    plan = plan_schema(old, model(FDW_EXTENSION, server("files"), grown, over))
    assert sqls(plan) == [
        "ALTER FOREIGN TABLE public.ft ALTER COLUMN b SET DEFAULT 'x'::text, ALTER COLUMN b "
        "OPTIONS (ADD force_not_null 'true'), ADD COLUMN c date NOT NULL",
        "ALTER FOREIGN TABLE public.ft OPTIONS (SET filename '/tmp/x', ADD format 'csv')",
        "COMMENT ON COLUMN public.ft.c IS 'when'"]
    # a type change: the view over it goes first and comes back after
    retyped = foreign_table("ft", foreign_column("a", "bigint"), foreign_column("b", "text"))
    plan = plan_schema(old, model(FDW_EXTENSION, server("files"), retyped, over))
    assert [s.split(" AS")[0] for s in sqls(plan)] == [
        "DROP VIEW public.v", "ALTER FOREIGN TABLE public.ft ALTER COLUMN a TYPE bigint",
        "CREATE VIEW public.v"]
    assert plan.destructive == []


def test_foreign_table_created_again_where_alter_cannot_and_never_destructive() -> None:
    ft = foreign_table("ft", foreign_column("a"), foreign_column("b"))
    over = view("v", " SELECT a FROM public.ft", ["foreign_table public.ft"])
    old = model(FDW_EXTENSION, server("files"), server("more"), ft, over)
    for changed in (foreign_table("ft", foreign_column("a"), foreign_column("b"), srv="more"),
                    foreign_table("ft", foreign_column("b"), foreign_column("a"))):  # order
        plan = plan_schema(old, model(FDW_EXTENSION, server("files"), server("more"), changed,
                                      over))
        assert [s.split(" (")[0].split(" AS")[0] for s in sqls(plan)] == [
            "DROP VIEW public.v", "DROP FOREIGN TABLE public.ft",
            "CREATE FOREIGN TABLE public.ft", "CREATE VIEW public.v"]
        assert plan.destructive == [] and plan.unsupported == ()
    # a server of another type is created again, with its foreign tables
    typed = server("files", type="csv")
    plan = plan_schema(old, model(FDW_EXTENSION, typed, server("more"), ft, over))
    assert [s.split(" (")[0].split(" AS")[0] for s in sqls(plan)][:4] == [
        "DROP VIEW public.v", "DROP FOREIGN TABLE public.ft", "DROP SERVER files",
        "CREATE SERVER files TYPE 'csv' FOREIGN DATA WRAPPER file_fdw"]
    # options and version in place
    tuned = server("files", version="2", options=[["k", "v"]])
    assert sqls(plan_schema(old, model(FDW_EXTENSION, tuned, server("more"), ft, over))) == [
        "ALTER SERVER files VERSION '2' OPTIONS (ADD k 'v')"]


def test_event_triggers_are_created_last_dropped_first_and_enabled_in_place() -> None:
    guard = function("guard()", "RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN END$$",
                     result="event_trigger")
    trig = event_trigger("audit", tags=["CREATE TABLE"])
    tables = [table("zz", columns=["a"]), column("zz", "a"),
              sequence("zz_seq"), view("zz_v", " SELECT 1", ["table public.zz"])]
    new = model(guard, trig, *tables)
    plan = plan_schema(model(), new)
    assert sqls(plan)[-1] == ("CREATE EVENT TRIGGER audit ON ddl_command_end WHEN TAG IN "
                              "('CREATE TABLE') EXECUTE FUNCTION public.guard()")
    assert sqls(plan_schema(new, model()))[0] == "DROP EVENT TRIGGER audit"
    disabled = model(guard, event_trigger("audit", tags=["CREATE TABLE"], enabled="D"), *tables)
    assert sqls(plan_schema(new, disabled)) == ["ALTER EVENT TRIGGER audit DISABLE"]
    assert sqls(plan_schema(model(), disabled))[-1] == "ALTER EVENT TRIGGER audit DISABLE"
    retagged = model(guard, event_trigger("audit", tags=["DROP TABLE"], enabled="R"), *tables)
    assert sqls(plan_schema(new, retagged)) == [
        "DROP EVENT TRIGGER audit",
        "CREATE EVENT TRIGGER audit ON ddl_command_end WHEN TAG IN ('DROP TABLE') "
        "EXECUTE FUNCTION public.guard()", "ALTER EVENT TRIGGER audit ENABLE REPLICA"]
    # a comment is planned on its own; the diff names the kind as pg_dump does
    commented = model(guard, confiture.evolve(trig, comment="audits"), *tables)
    assert sqls(plan_schema(new, commented)) == ["COMMENT ON EVENT TRIGGER audit IS 'audits'"]
    [found] = confiture.compare_model_objects(new, commented)
    assert (found.label, found.as_json()["type"]) == ("event trigger audit", "EVENT TRIGGER")


# ── owners and grants (--privileges) ───────────────────────────────────────────────────────

def grants(target: str, owner: str, acl: Sequence[str], base: Sequence[str] = (),
           what: str = "relation", code: str = "r", column: str | None = None) -> list[DbObject]:
    """The owner and acl objects §11 reads for `target` ('table public.t'), hung off it."""
    kind, _, qualified = target.partition(" ")
    schema, _, name = qualified.rpartition(".")
    row = {"relkind": code, "schema": schema, "name": name, "args": None, "column": column,
           "kind": kind, "owner": owner, "acl": list(acl), "base": list(base), "what": what}
    found = [obj for obj, _ in confiture._read_grants(row)]
    return [confiture.evolve(o, depends=o.depends | {o.parent}) for o in found]


TABLE_BASE = ["(owner)=INSERT", "(owner)=SELECT"]


def test_privileges_of_a_new_table_come_after_it_owner_first() -> None:
    new = model(table("t", columns=["id"]), column("t", "id"),
                *grants("table public.t", "alice",
                        [*TABLE_BASE, "bob=SELECT*", "PUBLIC=SELECT"], TABLE_BASE))
    plan = plan_schema(model(), new)
    assert sqls(plan)[1:] == [
        "ALTER TABLE public.t OWNER TO alice",
        "GRANT SELECT ON TABLE public.t TO PUBLIC",
        "GRANT SELECT ON TABLE public.t TO bob WITH GRANT OPTION"]
    assert sqls(plan)[0].startswith("CREATE TABLE public.t")
    # and back: the table goes, its grants with it
    assert sqls(plan_schema(new, model())) == ["DROP TABLE public.t"]


def test_owner_change_carries_the_owners_entries_and_only_the_difference_is_granted() -> None:
    old = model(table("t"), *grants("table public.t", "alice",
                                    [*TABLE_BASE, "bob=SELECT*", "PUBLIC=SELECT"], TABLE_BASE))
    new = model(table("t"), *grants("table public.t", "carol",
                                    [*TABLE_BASE, "bob=SELECT", "carl=UPDATE"], TABLE_BASE))
    assert sqls(plan_schema(old, new)) == [
        "ALTER TABLE public.t OWNER TO carol",
        "REVOKE SELECT ON TABLE public.t FROM PUBLIC",
        "REVOKE GRANT OPTION FOR SELECT ON TABLE public.t FROM bob",
        "GRANT UPDATE ON TABLE public.t TO carl"]
    # an owner's own entries are granted to the owner by name
    lost = model(table("t"), *grants("table public.t", "carol", ["(owner)=SELECT"], TABLE_BASE))
    assert "GRANT INSERT ON TABLE public.t TO carol" in sqls(plan_schema(lost, new))
    # the same owner and grants: nothing
    assert sqls(plan_schema(new, new)) == []


def test_column_grants_and_default_privileges() -> None:
    t = [table("t", columns=["a", "b"]), column("t", "a"), column("t", "b")]
    with_grant = model(*t, *grants("table public.t", "alice", ["bob=UPDATE"], what="column",
                                   column="b"))
    assert [o.key for o in with_grant.objects.values()][-1] == "acl column public.t.b"
    assert sqls(plan_schema(model(*t), with_grant)) == ["GRANT UPDATE (b) ON TABLE public.t TO bob"]
    assert sqls(plan_schema(with_grant, model(*t))) == [
        "REVOKE UPDATE (b) ON TABLE public.t FROM bob"]
    gone = model(table("t", columns=["a"]), column("t", "a"))
    assert sqls(plan_schema(with_grant, gone)) == ["ALTER TABLE public.t DROP COLUMN b"]
    # default privileges of a role: from PostgreSQL's default for it, and back to it
    row = {"relkind": "f", "schema": "", "name": "", "args": None, "column": None,
           "kind": "default", "owner": "alice", "acl": ["(owner)=EXECUTE"],
           "base": ["(owner)=EXECUTE", "PUBLIC=EXECUTE"], "what": "default"}
    [(defaults, _)] = confiture._read_grants(row)
    assert defaults.key == "acl default privileges for role alice on functions"
    assert sqls(plan_schema(model(), model(defaults))) == [
        "ALTER DEFAULT PRIVILEGES FOR ROLE alice REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC"]
    assert sqls(plan_schema(model(defaults), model())) == [
        "ALTER DEFAULT PRIVILEGES FOR ROLE alice GRANT EXECUTE ON FUNCTIONS TO PUBLIC"]


def test_model_diff_reports_owners_on_their_object_and_grants_apart() -> None:
    ddl = model(table("t"), *grants("table public.t", "alice", TABLE_BASE, TABLE_BASE))
    live = model(table("t"), *grants("table public.t", "bob", [*TABLE_BASE, "PUBLIC=SELECT"],
                                     TABLE_BASE),
                 table("u"), *grants("table public.u", "bob", TABLE_BASE, TABLE_BASE))
    found = {d.label: d for d in confiture.compare_model_objects(ddl, live)}
    assert sorted((d.change, label) for label, d in found.items()) == [
        ("added", "table public.u"), ("changed", "acl on table public.t"),
        ("changed", "table public.t")]
    assert found["table public.t"].summary == ("owner alice → bob",)
    assert "+ALTER TABLE public.t OWNER TO bob;" in found["table public.t"].diff
    assert found["acl on table public.t"].summary == ("granted SELECT to PUBLIC",)
    assert found["acl on table public.t"].as_json()["type"] == "ACL"
    assert found["table public.u"].summary == ("with its grants",)
    # an owner change alone is one difference, on the table
    moved = model(table("t"), *grants("table public.t", "bob", TABLE_BASE, TABLE_BASE))
    assert [d.label for d in confiture.compare_model_objects(ddl, moved)] == ["table public.t"]


def test_owners_and_grants_are_read_only_when_asked() -> None:
    assert "aclexplode" not in confiture.model_catalog_sql()
    assert "aclexplode" in confiture.model_catalog_sql(privileges=True)
    assert "pg_default_acl" in confiture.model_catalog_sql(privileges=True)


def test_dependents_index_is_built_once() -> None:
    m = model(table("t"), column("t", "a"), view("v", " SELECT a", ["column public.t.a"]),
              view("w", " SELECT a", ["view public.v"]))
    assert m.users is m.users
    assert m.dependents("table public.t") == ["column public.t.a", "view public.v",
                                              "view public.w"]
    assert m.dependents("view public.w") == []


def test_online_set_not_null_goes_through_a_validated_check() -> None:
    old = model(table("t"), column("t", "id"), column("t", "c"))
    new = model(table("t"), column("t", "id"), column("t", "c", notnull=True))
    [(up1, down1), (up2, down2)] = confiture.plan_stages(old, new, [], online=True)
    assert sqls(up1) == ["ALTER TABLE public.t ADD CONSTRAINT t_c_not_null "
                         "CHECK ((c IS NOT NULL)) NOT VALID"]
    assert sqls(up2) == ["ALTER TABLE public.t VALIDATE CONSTRAINT t_c_not_null",
                         "ALTER TABLE public.t ALTER COLUMN c SET NOT NULL",
                         "ALTER TABLE public.t DROP CONSTRAINT t_c_not_null"]
    assert not any(s.transactional for s in up2.statements)
    assert sqls(down2)[0] == "ALTER TABLE public.t ALTER COLUMN c DROP NOT NULL"
    assert sqls(down1) == ["ALTER TABLE public.t DROP CONSTRAINT t_c_not_null"]
    assert confiture.plan_stages(old, new, [], online=False)[0][0].statements[0].sql == \
        "ALTER TABLE public.t ALTER COLUMN c SET NOT NULL"


def test_widening_type_changes() -> None:
    assert confiture.widening("integer", "bigint")
    assert confiture.widening("character varying(10)", "character varying(20)")
    assert confiture.widening("character varying(10)", "text")
    assert confiture.widening("numeric(10,2)", "numeric(12,2)")
    assert not confiture.widening("numeric(10,2)", "numeric(10,3)")
    assert not confiture.widening("bigint", "integer")
    assert not confiture.widening("text", "character varying(10)")


# ── round trips on a real server: plan, apply, compare (both ways) ─────────────────────────

def read_model(pg: Any, db: str, privileges: bool = False) -> SchemaModel:
    env = {**os.environ, **pg.env}
    with confiture.Session(confiture.find_pg_tools(env), confiture.ConnInfo(params=()), db,
                           env) as session:
        return confiture.read_schema_model(session, privileges=privileges)


@pytest.fixture
def roundtrip(pg: Any, project: Any) -> Iterator[Any]:
    """roundtrip(before_sql, after_sql): plan before → after and after → before, apply each
    to a copy, and return both plans once each leaves zero difference."""
    def run(before: str, after: str, privileges: bool = False
            ) -> tuple[confiture.SchemaPlan, confiture.SchemaPlan]:
        names = [f"{project.name}_{x}" for x in ("before", "after", "work")]
        for name, text in zip(names, (before, after, before)):
            pg.drop_db(name)
            pg.create_db(name)
            if text.strip():
                pg.query(text, db=name)
        old, new = read_model(pg, names[0], privileges), read_model(pg, names[1], privileges)
        up, down = plan_schema(old, new), plan_schema(new, old)
        assert up.unsupported == () and down.unsupported == ()
        for plan, db, target in ((up, names[2], new), (down, names[1], old)):
            if plan.statements:
                pg.query(plan.script(), db=db)
            assert confiture.compare_models(target, read_model(pg, db, privileges)) == [], \
                plan.script()
        return up, down
    yield run


ROUND_TRIPS = {
    "columns": (
        ("CREATE TABLE t (id serial PRIMARY KEY, a varchar(10) NOT NULL DEFAULT 'x', b int,"
        " c text COLLATE \"C\", d int GENERATED ALWAYS AS (b * 2) STORED, e text);"),
        ("CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a text,"
        " b bigint NOT NULL DEFAULT 0, c text, d int GENERATED ALWAYS AS (b * 3) STORED,"
        " f jsonb DEFAULT '{}'::jsonb NOT NULL);")),
    "constraints": (
        ("CREATE TABLE p (id int PRIMARY KEY, code text UNIQUE);"
        "CREATE TABLE c (id int, p_id int REFERENCES p, n int CHECK (n > 0));"),
        ("CREATE EXTENSION IF NOT EXISTS btree_gist;"
        "CREATE TABLE p (id int PRIMARY KEY, code text, UNIQUE (code, id));"
        "CREATE TABLE c (id int PRIMARY KEY, p_id int REFERENCES p ON DELETE CASCADE"
        " DEFERRABLE INITIALLY DEFERRED, n int, during tstzrange,"
        " EXCLUDE USING gist (id WITH =, during WITH &&));"
        "ALTER TABLE c ADD CONSTRAINT n_positive CHECK (n > 0) NOT VALID;")),
    "indexes": (
        "CREATE TABLE t (a int, b text, c jsonb); CREATE INDEX t_a ON t (a);",
        ("CREATE TABLE t (a int, b text, c jsonb); CREATE UNIQUE INDEX t_a ON t (a) INCLUDE (b);"
        "CREATE INDEX t_lower ON t (lower(b)) WHERE a > 0; CREATE INDEX t_c ON t USING gin (c);"
        "CREATE INDEX t_b ON t (b text_pattern_ops DESC NULLS LAST);")),
    "views": (
        ("CREATE TABLE t (a int, b int); CREATE VIEW v AS SELECT a FROM t;"
        "CREATE VIEW w AS SELECT a FROM v;"),
        ("CREATE TABLE t (a bigint, b int); CREATE VIEW v WITH (security_barrier) AS"
        " SELECT a, b FROM t; CREATE VIEW w AS SELECT a FROM v;"
        "CREATE MATERIALIZED VIEW m AS SELECT a, count(*) FROM t GROUP BY a;"
        "CREATE UNIQUE INDEX m_a ON m (a);")),
    "routines and triggers": (
        ("CREATE TABLE t (a int, touched timestamptz);"
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN NEW.touched := now(); RETURN NEW; END$$;"
        "CREATE TRIGGER t_touch BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch();"),
        ("CREATE TABLE t (a int, touched timestamptz);"
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
        " SET search_path = pg_catalog AS $$BEGIN NEW.touched := clock_timestamp(); RETURN NEW;"
        " END$$;"
        "CREATE TRIGGER t_touch BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch();"
        "CREATE CONSTRAINT TRIGGER t_check AFTER INSERT ON t DEFERRABLE FOR EACH ROW"
        " EXECUTE FUNCTION touch(); ALTER TABLE t DISABLE TRIGGER t_check;"
        "CREATE PROCEDURE p(x int) LANGUAGE sql AS $$ SELECT x $$;"
        "CREATE FUNCTION add(a int, b int DEFAULT 1) RETURNS int IMMUTABLE STRICT"
        " LANGUAGE sql RETURN a + b;")),
    "policies": (
        "CREATE TABLE t (owner text, body text);",
        ("CREATE TABLE t (owner text, body text); ALTER TABLE t ENABLE ROW LEVEL SECURITY;"
        "ALTER TABLE t FORCE ROW LEVEL SECURITY;"
        "CREATE POLICY mine ON t FOR SELECT TO PUBLIC USING (owner = current_user);"
        "CREATE POLICY strict ON t AS RESTRICTIVE FOR INSERT WITH CHECK (body <> '');")),
    "types": (
        ("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); CREATE TYPE pair AS (a int, b text);"
        "CREATE DOMAIN pos AS int CHECK (VALUE > 0);"
        "CREATE TABLE t (m mood DEFAULT 'ok', ms mood[], p pair, n pos);"
        "CREATE VIEW v AS SELECT m FROM t WHERE m <> 'sad';"),
        ("CREATE TYPE mood AS ENUM ('sad', 'happy', 'glad'); CREATE TYPE pair AS (a int, c date);"
        "CREATE DOMAIN pos AS int DEFAULT 1 NOT NULL CHECK (VALUE > 0) CHECK (VALUE < 100);"
        "CREATE TYPE span AS RANGE (subtype = date);"
        "CREATE TABLE t (m mood DEFAULT 'glad', ms mood[], p pair, n pos, s span);"
        "CREATE VIEW v AS SELECT m FROM t WHERE m <> 'sad';")),
    "partitions and inheritance": (
        "CREATE TABLE parent (id int, note text); CREATE TABLE child (extra int) INHERITS (parent);",
        ("CREATE TABLE parent (id int, note text); CREATE TABLE child (extra int) INHERITS (parent);"
        "CREATE TABLE m (at date NOT NULL, v int) PARTITION BY RANGE (at);"
        "CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
        " PARTITION BY LIST (v);"
        "CREATE TABLE m_2024_1 PARTITION OF m_2024 FOR VALUES IN (1);"
        "CREATE TABLE m_rest PARTITION OF m DEFAULT; CREATE INDEX m_at ON m (at);"
        "ALTER TABLE m ADD PRIMARY KEY (at, v);")),
    "schemas, sequences, comments, storage": (
        "CREATE SEQUENCE s; CREATE TABLE t (id int DEFAULT nextval('s'));",
        ("CREATE SCHEMA app; COMMENT ON SCHEMA app IS 'the app';"
        "CREATE SEQUENCE app.s AS bigint INCREMENT BY 10 START 100 CYCLE;"
        "CREATE SEQUENCE s; CREATE TABLE t (id int DEFAULT nextval('s')) WITH (fillfactor = 80);"
        "CREATE UNLOGGED TABLE app.cache (k text PRIMARY KEY);"
        "COMMENT ON TABLE t IS 'things'; COMMENT ON COLUMN t.id IS 'its id';"
        "CREATE STATISTICS app.st ON k, length(k) FROM app.cache;"
        "CREATE RULE no_delete AS ON DELETE TO t DO INSTEAD NOTHING;"
        "CREATE FUNCTION first_agg(anyelement, anyelement) RETURNS anyelement IMMUTABLE"
        " LANGUAGE sql AS 'SELECT $1';"
        "CREATE AGGREGATE first(anyelement) (SFUNC = first_agg, STYPE = anyelement);")),
    # file_fdw and postgres_fdw ship with PostgreSQL; a wrapper without handler needs neither
    "foreign data": (
        ("CREATE EXTENSION IF NOT EXISTS file_fdw; CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;"
        "CREATE FOREIGN TABLE ft (a int NOT NULL, b text, c int) SERVER files"
        " OPTIONS (filename '/dev/null', format 'csv');"
        "CREATE VIEW v AS SELECT a, b FROM ft;"
        "CREATE FOREIGN DATA WRAPPER dummy; CREATE SERVER old_one FOREIGN DATA WRAPPER dummy;"
        "CREATE FOREIGN TABLE on_old (x int) SERVER old_one;"),
        ("CREATE EXTENSION IF NOT EXISTS file_fdw; CREATE EXTENSION IF NOT EXISTS postgres_fdw;"
        "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;"
        "CREATE FOREIGN TABLE ft (a bigint, b text OPTIONS (force_not_null 'true')"
        " COLLATE \"C\" DEFAULT 'x', d date NOT NULL, CONSTRAINT a_pos CHECK (a > 0))"
        " SERVER files OPTIONS (filename '/dev/null', format 'csv', header 'true');"
        "COMMENT ON FOREIGN TABLE ft IS 'files'; COMMENT ON COLUMN ft.a IS 'the a';"
        "CREATE VIEW v AS SELECT a, b FROM ft;"
        "CREATE FOREIGN DATA WRAPPER dummy OPTIONS (debug 'true');"
        "CREATE SERVER old_one TYPE 'x' VERSION '2' FOREIGN DATA WRAPPER dummy OPTIONS (k 'v');"
        "CREATE FOREIGN TABLE on_old (x int) SERVER old_one;"
        "CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw"
        " OPTIONS (host 'localhost', dbname 'nowhere'); COMMENT ON SERVER remote IS 'elsewhere';"
        "CREATE FOREIGN TABLE remote_t (id int OPTIONS (column_name 'ident')) SERVER remote"
        " OPTIONS (schema_name 'public', table_name 't');"
        "CREATE TABLE m (at date, v int) PARTITION BY RANGE (at);"
        "CREATE FOREIGN TABLE m_old PARTITION OF m FOR VALUES FROM ('2000-01-01')"
        " TO ('2020-01-01') SERVER files OPTIONS (filename '/dev/null');")),
    # event triggers need a superuser (the suite's clusters run as one); no_drops refuses
    # every drop, so the plans must create it last and drop it first
    "event triggers": (
        ("CREATE FUNCTION log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS"
        " $$BEGIN NULL; END$$;"
        "CREATE EVENT TRIGGER on_ddl ON ddl_command_end EXECUTE FUNCTION log_ddl();"
        "CREATE EVENT TRIGGER stays ON ddl_command_start EXECUTE FUNCTION log_ddl();"
        "CREATE EVENT TRIGGER gone ON sql_drop EXECUTE FUNCTION log_ddl();"
        "CREATE TABLE t (a int, b int);"),
        ("CREATE FUNCTION log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS"
        " $$BEGIN NULL; END$$;"
        "CREATE FUNCTION no_drops() RETURNS event_trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'no drops'; END$$;"
        "CREATE EVENT TRIGGER on_ddl ON ddl_command_end WHEN TAG IN ('CREATE TABLE',"
        " 'ALTER TABLE') EXECUTE FUNCTION log_ddl();"
        "CREATE EVENT TRIGGER stays ON ddl_command_start EXECUTE FUNCTION log_ddl();"
        "ALTER EVENT TRIGGER stays ENABLE ALWAYS;"
        "CREATE TABLE t (a int);"
        "CREATE EVENT TRIGGER no_drops ON sql_drop EXECUTE FUNCTION no_drops();"
        "COMMENT ON EVENT TRIGGER no_drops IS 'guards drops';")),
}


def test_every_kind_of_object_is_read_with_its_comment(pg: Any, project: Any) -> None:
    """Comments are read by the catalog query itself (not obj_description()): one on each kind
    of object the model holds, and none where there is none."""
    db = f"{project.name}_comments"
    pg.drop_db(db)
    pg.create_db(db)
    pg.query("CREATE SCHEMA app; CREATE EXTENSION IF NOT EXISTS btree_gist;"
             "CREATE TYPE mood AS ENUM ('ok'); CREATE DOMAIN pos AS int CHECK (VALUE > 0);"
             "CREATE SEQUENCE s; CREATE TABLE t (id int CONSTRAINT t_pk PRIMARY KEY,"
             " n int CONSTRAINT n_positive CHECK (n > 0), bare int);"
             "CREATE INDEX t_n ON t (n); CREATE VIEW v AS SELECT id FROM t;"
             "CREATE MATERIALIZED VIEW m AS SELECT id FROM t;"
             "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;"
             "CREATE TRIGGER t_f BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f();"
             "CREATE POLICY mine ON t USING (true);"
             "CREATE FOREIGN DATA WRAPPER w; CREATE SERVER srv FOREIGN DATA WRAPPER w;"
             "CREATE FOREIGN TABLE ft (c int) SERVER srv;"
             "CREATE FUNCTION on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN END$$;"
             "CREATE EVENT TRIGGER on_ddl ON ddl_command_start EXECUTE FUNCTION on_ddl();"
             "COMMENT ON FOREIGN DATA WRAPPER w IS 'wrapper'; COMMENT ON SERVER srv IS 'server';"
             "COMMENT ON FOREIGN TABLE ft IS 'foreign table'; COMMENT ON COLUMN ft.c IS 'its c';"
             "COMMENT ON EVENT TRIGGER on_ddl IS 'event trigger';"
             "COMMENT ON SCHEMA app IS 'schema'; COMMENT ON EXTENSION btree_gist IS 'extension';"
             "COMMENT ON TYPE mood IS 'enum'; COMMENT ON DOMAIN pos IS 'domain';"
             "COMMENT ON SEQUENCE s IS 'sequence'; COMMENT ON TABLE t IS 'table';"
             "COMMENT ON COLUMN t.n IS 'column'; COMMENT ON CONSTRAINT t_pk ON t IS 'pk';"
             "COMMENT ON CONSTRAINT n_positive ON t IS 'check'; COMMENT ON INDEX t_n IS 'index';"
             "COMMENT ON VIEW v IS 'view'; COMMENT ON MATERIALIZED VIEW m IS 'matview';"
             "COMMENT ON FUNCTION f() IS 'function'; COMMENT ON TRIGGER t_f ON t IS 'trigger';"
             "COMMENT ON POLICY mine ON t IS 'policy';", db=db)
    objects = read_model(pg, db).objects
    comments = {key: objects[key].comment for key in (
        "schema app", "extension btree_gist", "type public.mood", "type public.pos",
        "sequence public.s", "table public.t", "column public.t.n", "column public.t.bare",
        "constraint t_pk on public.t", "constraint n_positive on public.t",
        "index public.t_n", "view public.v", "view public.m", "function public.f()",
        "trigger t_f on public.t", "policy mine on public.t", "wrapper w", "server srv",
        "foreign_table public.ft", "event_trigger on_ddl")}
    assert comments == {
        "schema app": "schema", "extension btree_gist": "extension", "type public.mood": "enum",
        "type public.pos": "domain", "sequence public.s": "sequence", "table public.t": "table",
        "column public.t.n": "column", "column public.t.bare": None,
        "constraint t_pk on public.t": "pk", "constraint n_positive on public.t": "check",
        "index public.t_n": "index", "view public.v": "view", "view public.m": "matview",
        "function public.f()": "function", "trigger t_f on public.t": "trigger",
        "policy mine on public.t": "policy", "wrapper w": "wrapper", "server srv": "server",
        "foreign_table public.ft": "foreign table", "event_trigger on_ddl": "event trigger"}
    assert [c["comment"] for c in objects["foreign_table public.ft"].facts["columns"]] == \
        ["its c"]


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_on_a_real_server(roundtrip: Any, case: str) -> None:
    before, after = ROUND_TRIPS[case]
    up, down = roundtrip(before, after)
    assert up.statements and down.statements
    # and from nothing, and back to nothing
    roundtrip("", after)


def test_column_type_change_under_views_and_a_policy_keeps_the_data(pg: Any, project: Any,
                                                                     roundtrip: Any) -> None:
    before = ("CREATE TABLE t (x int, y text); CREATE VIEW v1 AS SELECT x FROM t;"
              "CREATE VIEW v2 AS SELECT x FROM v1; ALTER TABLE t ENABLE ROW LEVEL SECURITY;"
              "CREATE POLICY p ON t USING (x > 0); INSERT INTO t VALUES (1, 'a'), (2, 'b');")
    after = before.replace("x int", "x bigint").replace("INSERT INTO t VALUES (1, 'a'), (2, 'b');", "")
    up, _ = roundtrip(before, after)
    assert [s.sql.split(" AS")[0] for s in up.statements][:3] == [
        "DROP POLICY p ON public.t", "DROP VIEW public.v2", "DROP VIEW public.v1"]
    work = f"{project.name}_work"
    assert pg.query("SELECT x, y FROM t ORDER BY x", db=work) == [(1, "a"), (2, "b")]
    assert pg.scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                     "WHERE attrelid = 't'::regclass AND attname = 'x'", db=work) == "bigint"


def test_pagila_from_an_empty_database_and_back(roundtrip: Any) -> None:
    schema = CORPORA / "pagila" / "pagila-schema.sql"
    if not schema.is_file():
        pytest.skip(f"corpus not found at {schema}")
    text = "\n".join(line for line in schema.read_text().splitlines()
                     if not line.startswith("\\"))
    up, down = roundtrip("", text)
    assert len(up.statements) > 100
    assert {s.sql.split()[0] for s in down.statements} == {"DROP"}


@pytest.fixture
def roles(pg: Any, project: Any) -> Iterator[tuple[str, str]]:
    """Two roles of this test's own (roles are the cluster's); dropped after the project's
    databases, which hold their grants."""
    names = (f"{project.name}_reader", f"{project.name}_owner")
    for name in names:
        pg.query(f"CREATE ROLE {name}")
    yield names
    pg.drop_dbs_with_prefix(project.name)
    for name in names:
        pg.query(f"DROP ROLE IF EXISTS {name}")


def test_owners_and_grants_round_trip_on_a_real_server(roundtrip: Any, roles: Any) -> None:
    reader, owner = roles
    before = ("CREATE SCHEMA app; CREATE TABLE t (a int, b int); CREATE SEQUENCE s;"
              "CREATE VIEW v AS SELECT a FROM t; CREATE FUNCTION f() RETURNS int"
              " LANGUAGE sql AS 'SELECT 1'; CREATE TYPE mood AS ENUM ('ok');"
              "CREATE DOMAIN pos AS int CHECK (VALUE > 0); CREATE TABLE u (id serial);"
              f"GRANT SELECT ON t TO {reader};")
    after = before + (
        f"ALTER TABLE t OWNER TO {owner}; GRANT UPDATE (b) ON t TO {reader};"
        f"ALTER TABLE u OWNER TO {owner};"  # its serial's sequence follows
        f"GRANT INSERT ON t TO {reader} WITH GRANT OPTION; GRANT USAGE ON SEQUENCE s TO {reader};"
        f"GRANT SELECT ON v TO PUBLIC; REVOKE EXECUTE ON FUNCTION f() FROM PUBLIC;"
        f"GRANT EXECUTE ON FUNCTION f() TO {reader}; REVOKE USAGE ON TYPE mood FROM PUBLIC;"
        f"ALTER DOMAIN pos OWNER TO {owner}; ALTER SCHEMA app OWNER TO {owner};"
        f"GRANT USAGE ON SCHEMA app TO {reader} WITH GRANT OPTION;"
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {reader};"
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;")
    up, down = roundtrip(before, after, privileges=True)
    text = "\n".join(sqls(up))
    assert f"ALTER TABLE public.t OWNER TO {owner}" in text
    assert f"GRANT UPDATE (b) ON TABLE public.t TO {reader}" in text
    assert "REVOKE EXECUTE ON FUNCTION public.f() FROM PUBLIC" in text
    assert f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} REVOKE EXECUTE ON FUNCTIONS FROM " \
        "PUBLIC" in text
    assert not any("CREATE" in s or "DROP" in s for s in sqls(up) + sqls(down))
    assert "ALTER SEQUENCE public.u_id_seq OWNER" not in text  # refused by PostgreSQL
    # without --privileges the same two schemas are equal, and nothing is planned
    assert roundtrip(before, after) == (confiture.SchemaPlan(()), confiture.SchemaPlan(()))
    # from nothing (objects created, then owned and granted) and back
    roundtrip("", after, privileges=True)


def test_owners_and_grants_of_foreign_data_round_trip(roundtrip: Any, roles: Any) -> None:
    """Servers, foreign-data wrappers and foreign tables have owners and grants too: a foreign
    table created again (another server) gets them back."""
    reader, owner = roles
    before = ("CREATE EXTENSION IF NOT EXISTS file_fdw; CREATE FOREIGN DATA WRAPPER dummy;"
              "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;"
              "CREATE SERVER more FOREIGN DATA WRAPPER file_fdw;"
              "CREATE FOREIGN TABLE ft (a int) SERVER files OPTIONS (filename '/dev/null');")
    after = before.replace("SERVER files OPTIONS", "SERVER more OPTIONS") + (
        f"ALTER FOREIGN TABLE ft OWNER TO {owner}; GRANT SELECT ON ft TO {reader};"
        f"ALTER SERVER more OWNER TO {owner}; GRANT USAGE ON FOREIGN SERVER files TO {reader};"
        f"GRANT USAGE ON FOREIGN DATA WRAPPER dummy TO {reader} WITH GRANT OPTION;")
    up, _ = roundtrip(before, after, privileges=True)
    text = "\n".join(sqls(up))
    assert f"ALTER FOREIGN TABLE public.ft OWNER TO {owner}" in text
    assert f"GRANT SELECT ON TABLE public.ft TO {reader}" in text
    assert f"GRANT USAGE ON FOREIGN SERVER files TO {reader}" in text
    assert f"GRANT USAGE ON FOREIGN DATA WRAPPER dummy TO {reader} WITH GRANT OPTION" in text
    roundtrip("", after, privileges=True)


def test_a_renamed_table_keeps_its_sequence_keys_and_indexes_on_a_real_server(
        pg: Any, project: Any, roles: Any) -> None:
    """--rename table:t=u with --privileges: what PostgreSQL named after the table (its serial's
    sequence, keys, checks, indexes) is renamed with it, not created again (a new sequence
    would start over and hand out ids already used); its owner and grants are not set again.
    Applied to a copy, then back: zero difference both ways, the sequence's value kept."""
    reader, owner = roles
    before = ("CREATE TABLE t (id serial PRIMARY KEY, a int UNIQUE CHECK (a > 0),"
              " p int REFERENCES t); CREATE INDEX t_a_idx ON t (a); CREATE INDEX keep_me ON t (p);"
              f"CREATE TABLE other (x int REFERENCES t); ALTER TABLE t OWNER TO {owner};"
              f"GRANT SELECT ON t TO {reader}; GRANT USAGE ON SEQUENCE t_id_seq TO {reader};")
    after = before.replace(" t ", " u ").replace(" t;", " u;").replace(
        "REFERENCES t", "REFERENCES u").replace("t_a_idx", "u_a_idx").replace("t_id_seq", "u_id_seq")
    names = [f"{project.name}_{x}" for x in ("before", "after", "work")]
    for name, text in zip(names, (before, after, before)):
        pg.create_db(name)
        pg.query(text, db=name)
    pg.query("SELECT setval('t_id_seq', 42)", db=names[2])
    old, new = read_model(pg, names[0], True), read_model(pg, names[1], True)
    renames = [confiture.parse_rename("table:t=u")]
    [(up, down)] = confiture.plan_stages(old, new, renames, online=False)
    assert sqls(up) == [
        "ALTER TABLE public.t RENAME TO u",
        "ALTER TABLE public.u RENAME CONSTRAINT t_a_check TO u_a_check",
        "ALTER TABLE public.u RENAME CONSTRAINT t_a_key TO u_a_key",
        "ALTER TABLE public.u RENAME CONSTRAINT t_p_fkey TO u_p_fkey",
        "ALTER TABLE public.u RENAME CONSTRAINT t_pkey TO u_pkey",
        "ALTER INDEX public.t_a_idx RENAME TO u_a_idx",
        "ALTER SEQUENCE public.t_id_seq RENAME TO u_id_seq"]
    assert not up.destructive and not down.destructive
    pg.query(up.script(), db=names[2])
    assert confiture.compare_models(new, read_model(pg, names[2], True)) == []
    assert pg.scalar("SELECT nextval('u_id_seq')", db=names[2]) == 43
    pg.query(down.script(), db=names[2])
    assert confiture.compare_models(old, read_model(pg, names[2], True)) == []


# ── migrate generate and diff --sql, as users run them ─────────────────────────────────────

def no_scratch_left(pg: Any, project: Any) -> bool:
    return not pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                        params=(project.name + "_scratch_",))


def migration_files(project: Any) -> list[str]:
    return sorted(p.name for p in (project.root / "db/migrations").glob("*.sql"))


WIDGETS_V1 = "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL\n);\n"


def history(project: Any) -> None:
    """One migration that creates the DDL's widgets table."""
    project.write("db/migrations/20240101000000_widgets.up.sql", WIDGETS_V1)
    project.write("db/migrations/20240101000000_widgets.down.sql", "DROP TABLE widgets;\n")


def test_generate_writes_a_proved_pair_that_migrate_up_applies(pg: Any, project: Any,
                                                             cli: Any) -> None:
    history(project)
    nothing = cli("migrate", "generate", "noop", cwd=project.root)
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing to generate" in nothing.stdout
    assert migration_files(project) == ["20240101000000_widgets.down.sql",
                                        "20240101000000_widgets.up.sql"]
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    color text DEFAULT 'red' NOT NULL\n);\n"
                  "CREATE INDEX widgets_color ON widgets (color);\n"
                  "CREATE TABLE tags (widget_id bigint REFERENCES widgets, tag text);\n")
    result = cli("migrate", "generate", "add color and tags", cwd=project.root)
    assert result.returncode == 0, result.stderr
    written = [line for line in result.stdout.splitlines() if line.endswith(".sql")]
    assert len(written) == 2 and written[0].endswith("_add_color_and_tags.up.sql")
    up = (project.root / written[0]).read_text()
    assert "ALTER TABLE public.widgets ADD COLUMN color text DEFAULT 'red'::text NOT NULL;" in up
    assert up.index("CREATE TABLE public.tags") < up.index("FOREIGN KEY (widget_id)")
    assert "DROP TABLE public.tags;" in (project.root / written[1]).read_text()
    assert no_scratch_left(pg, project)
    # the migrations now build what the DDL builds; a database at the old version catches up
    check = cli("diff", "--migrations", cwd=project.root)
    assert check.returncode == 0, check.stdout + check.stderr
    db = project.db()
    pg.create_db(db)
    pg.query(WIDGETS_V1 + "INSERT INTO widgets VALUES (1, 'one');", db=db)
    assert cli("migrate", "baseline", "--to", "20240101000000", cwd=project.root).returncode == 0
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert pg.query("SELECT id, color FROM widgets", db=db) == [(1, "red")]
    assert cli("migrate", "down", "--steps", "1", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT to_regclass('tags') IS NULL", db=db)
    again = cli("migrate", "generate", "again", cwd=project.root)
    assert "nothing to generate" in again.stdout


def test_scratch_replays_do_not_report_migrations_as_applied(pg: Any, project: Any,
                                                            cli: Any) -> None:
    """diff --migrations and migrate generate replay the history on a scratch database: its
    'applied …' lines (one per migration) read as if the env's database had them, so they
    appear only with -v."""
    history(project)
    db = project.db()
    pg.create_db(db)
    project.write("db/schema/10_tables/10_widgets.sql", WIDGETS_V1)
    check = cli("diff", "--migrations", cwd=project.root)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "applied 20240101000000_widgets" not in check.stdout + check.stderr
    assert "(1 applied to" in check.stdout + check.stderr
    project.write("db/schema/10_tables/10_widgets.sql",
                  WIDGETS_V1.replace("NOT NULL\n", "NOT NULL,\n    note text\n"))
    result = cli("migrate", "generate", "note", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "applied 20240101000000_widgets" not in result.stdout + result.stderr
    verbose = cli("-v", "diff", "--migrations", cwd=project.root)
    assert "applied 20240101000000_widgets" in verbose.stderr
    # the env's own database was never touched
    assert pg.scalar("SELECT to_regclass('widgets') IS NULL", db=db)


def test_generate_refuses_destructive_plans_and_suggests_renames(pg: Any, project: Any,
                                                                 cli: Any) -> None:
    history(project)
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    title text NOT NULL\n);\n")
    refused = cli("migrate", "generate", "retitle", cwd=project.root)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "DROP COLUMN label" in refused.stderr
    assert "--rename column:public.widgets.label=title" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(migration_files(project)) == 2
    renamed = cli("migrate", "generate", "retitle", "--rename", "column:widgets.label=title",
                  cwd=project.root)
    assert renamed.returncode == 0, renamed.stderr
    up = next((project.root / "db/migrations").glob("*_retitle.up.sql")).read_text()
    assert "ALTER TABLE public.widgets RENAME COLUMN label TO title;" in up
    assert "DROP" not in up
    down = next((project.root / "db/migrations").glob("*_retitle.down.sql")).read_text()
    assert "RENAME COLUMN title TO label" in down
    for path in (project.root / "db/migrations").glob("*_retitle.*"):
        path.unlink()
    allowed = cli("migrate", "generate", "retitle", "--allow-destructive", cwd=project.root)
    assert allowed.returncode == 0, allowed.stderr
    up = next((project.root / "db/migrations").glob("*_retitle.up.sql")).read_text()
    assert "-- destructive: data is lost\nALTER TABLE public.widgets DROP COLUMN label;" in up
    # said now, not at the deploy that would refuse it
    assert re.search(r"warning: db/migrations/\d+_retitle\.up\.sql:\d+: drop-column: ",
                     allowed.stderr), allowed.stderr
    assert "'-- confiture:allow RULE reason'" in allowed.stderr
    assert no_scratch_left(pg, project)


def test_a_renamed_middle_column_is_suggested_as_a_rename(pg: Any, project: Any,
                                                         cli: Any) -> None:
    """A column renamed in the DDL but not last: the drop+add cannot keep the column order,
    so generate refuses (exit 3) — and says the rename that would work; diff --sql too."""
    history(project)
    project.write("db/migrations/20240102000000_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    title text NOT NULL,\n"
                  "    note text\n);\n")
    refused = cli("migrate", "generate", "retitle", cwd=project.root)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "column order" in refused.stderr
    assert "a rename? try --rename column:public.widgets.label=title" in refused.stderr
    assert "Traceback" not in refused.stderr and len(migration_files(project)) == 3
    db = project.db()
    pg.create_db(db)
    pg.query(WIDGETS_V1 + "ALTER TABLE widgets ADD COLUMN note text;", db=db)
    sql = cli("diff", "--sql", cwd=project.root)
    assert sql.returncode == 3, sql.stderr
    assert "DROP COLUMN label" in sql.stdout
    assert "--rename column:public.widgets.label=title" in sql.stderr
    renamed = cli("migrate", "generate", "retitle", "--rename", "column:widgets.label=title",
                  cwd=project.root)
    assert renamed.returncode == 0, renamed.stderr
    up = next((project.root / "db/migrations").glob("*_retitle.up.sql")).read_text()
    assert "RENAME COLUMN label TO title" in up and "DROP" not in up


def test_a_rename_that_names_nothing_is_a_usage_error(pg: Any, project: Any, cli: Any) -> None:
    """A mistyped --rename is the command's mistake (exit 2, the close name suggested), not
    something the plan 'cannot express' (exit 3, 'write this migration by hand')."""
    history(project)
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    title text NOT NULL\n);\n")
    typo = cli("migrate", "generate", "retitle", "--rename", "column:widgets.lable=title",
               cwd=project.root)
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "no column public.widgets.lable in the migrated schema (did you mean " \
        "'column public.widgets.label'?)" in typo.stderr
    assert "by hand" not in typo.stderr and "Traceback" not in typo.stderr
    wrong_new = cli("migrate", "generate", "retitle", "--rename", "column:widgets.label=titel",
                    cwd=project.root)
    assert wrong_new.returncode == 2, wrong_new.stdout + wrong_new.stderr
    assert "no column public.widgets.titel in the DDL's schema" in wrong_new.stderr
    assert len(migration_files(project)) == 2
    assert no_scratch_left(pg, project)


def test_generate_writes_nothing_when_the_proof_fails(pg: Any, project: Any, cli: Any) -> None:
    history(project)
    # a conversion no plan can know: integer codes become an enum's labels
    project.write("db/migrations/20240102000000_state.up.sql",
                  "ALTER TABLE widgets ADD COLUMN state smallint;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TYPE state AS ENUM ('new', 'done');\n"
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    state state\n);\n")
    result = cli("migrate", "generate", "state", "--allow-destructive", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "fails on a scratch copy" in result.stderr and "state" in result.stderr
    assert "migrate new" in result.stderr and "Traceback" not in result.stderr
    assert len(migration_files(project)) == 3
    assert no_scratch_left(pg, project)


def test_generate_names_what_it_cannot_express(pg: Any, project: Any, cli: Any) -> None:
    history(project)
    project.write("db/migrations/20240102000000_span.up.sql",
                  "CREATE TYPE span AS RANGE (subtype = int4);\n"
                  "ALTER TABLE widgets ADD COLUMN s span;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TYPE span AS RANGE (subtype = int8);\n"
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    s span\n);\n")
    result = cli("migrate", "generate", "span", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot express: column public.widgets.s: depends on type public.span" in result.stderr
    assert len(migration_files(project)) == 3
    assert no_scratch_left(pg, project)
    # kinds the model knows by name only are listed, never planned (event triggers are planned)
    project.write("db/schema/10_tables/10_widgets.sql", WIDGETS_V1 +
                  "CREATE TYPE span AS RANGE (subtype = int4);\n"
                  "ALTER TABLE widgets ADD COLUMN s span;\n"
                  "CREATE FUNCTION no_drops() RETURNS event_trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN NULL; END $$;\n"
                  "CREATE EVENT TRIGGER no_drops ON sql_drop EXECUTE FUNCTION no_drops();\n"
                  'CREATE COLLATION bytewise FROM "C";\n')
    result = cli("migrate", "generate", "guards", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "other collation public.bytewise: cannot be created by a plan (collation)" in \
        result.stderr
    assert "event trigger" not in result.stderr  # planned like any other kind
    assert len(migration_files(project)) == 3


def test_generate_plans_foreign_tables_and_event_triggers(pg: Any, project: Any,
                                                          cli: Any) -> None:
    """Foreign-data wrappers, servers, foreign tables and event triggers are generated, proved
    and applied like every other kind (event triggers need a superuser, as the suite runs)."""
    history(project)
    project.write("db/schema/20_foreign.sql",
                  "CREATE EXTENSION IF NOT EXISTS file_fdw;\n"
                  "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;\n"
                  "CREATE FOREIGN TABLE imports (id bigint NOT NULL, note text DEFAULT 'none')\n"
                  "    SERVER files OPTIONS (filename '/dev/null', format 'csv');\n"
                  "COMMENT ON FOREIGN TABLE imports IS 'nightly file';\n"
                  "CREATE VIEW import_ids AS SELECT id FROM imports;\n"
                  "CREATE FUNCTION no_drops() RETURNS event_trigger LANGUAGE plpgsql AS\n"
                  "    $$BEGIN RAISE EXCEPTION 'no drops'; END$$;\n"
                  "CREATE EVENT TRIGGER no_drops ON sql_drop WHEN TAG IN ('DROP TABLE')\n"
                  "    EXECUTE FUNCTION no_drops();\n"
                  "ALTER EVENT TRIGGER no_drops DISABLE;\n")
    result = cli("migrate", "generate", "foreign", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    up = next((project.root / "db/migrations").glob("*_foreign.up.sql")).read_text()
    assert "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;" in up
    assert up.index("CREATE FOREIGN TABLE public.imports") < up.index("CREATE VIEW")
    assert up.rstrip().endswith("ALTER EVENT TRIGGER no_drops DISABLE;")
    down = next((project.root / "db/migrations").glob("*_foreign.down.sql")).read_text()
    assert down.index("DROP EVENT TRIGGER no_drops") < down.index("DROP FOREIGN TABLE")
    assert no_scratch_left(pg, project)
    db = project.db()
    pg.create_db(db)
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert pg.query("SELECT s.srvname, ft.ftoptions FROM pg_foreign_table ft JOIN "
                    "pg_foreign_server s ON s.oid = ft.ftserver", db=db) == [
        ("files", ["filename=/dev/null", "format=csv"])]
    assert pg.query("SELECT evtevent, evttags, evtenabled FROM pg_event_trigger", db=db) == [
        ("sql_drop", ["DROP TABLE"], "D")]
    assert cli("diff", cwd=project.root).returncode == 0
    # a change ALTER can make: in place; another server: the foreign table is created again
    text = (project.root / "db/schema/20_foreign.sql").read_text()
    project.write("db/schema/20_foreign.sql", text.replace(
        "note text DEFAULT 'none')", "note text, seen date)").replace(
        "DISABLE;", "ENABLE ALWAYS;").replace(
        "file_fdw;\n", "file_fdw;\nCREATE SERVER more FOREIGN DATA WRAPPER file_fdw;\n", 1))
    result = cli("migrate", "generate", "foreign more", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    up = next((project.root / "db/migrations").glob("*_foreign_more.up.sql")).read_text()
    assert "ALTER FOREIGN TABLE public.imports ALTER COLUMN note DROP DEFAULT, " \
        "ADD COLUMN seen date;" in up
    assert "ALTER EVENT TRIGGER no_drops ENABLE ALWAYS;" in up and "DROP VIEW" not in up
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert cli("diff", cwd=project.root).returncode == 0
    project.write("db/schema/20_foreign.sql",
                  (project.root / "db/schema/20_foreign.sql").read_text().replace(
                      "SERVER files OPTIONS", "SERVER more OPTIONS"))
    result = cli("migrate", "generate", "move", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr  # not destructive: no rows
    up = next((project.root / "db/migrations").glob("*_move.up.sql")).read_text()
    assert "DROP FOREIGN TABLE public.imports;" in up and "destructive" not in up
    assert up.index("DROP VIEW public.import_ids") < up.index("DROP FOREIGN TABLE")
    assert no_scratch_left(pg, project)


def test_generate_names_a_column_order_it_cannot_reach_and_starts_from_the_baseline(
        pg: Any, project: Any, cli: Any) -> None:
    """A history that starts from [migrations] baseline_schema is replayed from it; a new
    column between existing ones is refused (exit 3, nothing written), one at the end is not."""
    project.write("db/baseline.sql", WIDGETS_V1)
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nbaseline_schema = "db/baseline.sql"\n')
    project.write("db/migrations/20240102000000_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/migrations/20240102000000_note.down.sql",
                  "ALTER TABLE widgets DROP COLUMN note;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    size int,\n    note text\n);\n")
    refused = cli("migrate", "generate", "size", cwd=project.root)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "table public.widgets: column order: the DDL has size, note where the plan gives " \
        "note, size" in refused.stderr
    assert len(migration_files(project)) == 2
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    note text,\n    size int\n);\n")
    result = cli("migrate", "generate", "size", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "applied to baseline baseline.sql" in result.stdout + result.stderr
    # a baseline that is not there: named as configured, with what it should be (exit 2)
    (project.root / "db/baseline.sql").rename(project.root / "db/moved.sql")
    missing = cli("diff", "--migrations", cwd=project.root)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "migrations.baseline_schema: cannot read db/baseline.sql: No such file or " \
        "directory\nhint: point it at a SQL file" in missing.stderr
    (project.root / "db/moved.sql").rename(project.root / "db/baseline.sql")
    up = next((project.root / "db/migrations").glob("*_size.up.sql")).read_text()
    assert "ALTER TABLE public.widgets ADD COLUMN size integer;" in up
    assert no_scratch_left(pg, project)


def test_generate_on_a_history_that_needs_a_baseline_says_how_to_set_it(
        project: Any, cli: Any) -> None:
    """Migrations that start from an existing schema do not replay from an empty database:
    generate fails naming the migration and says to set [migrations] baseline_schema; nothing
    is written."""
    project.write("db/migrations/20240102000000_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/migrations/20240102000000_note.down.sql",
                  "ALTER TABLE widgets DROP COLUMN note;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    note text\n);\n")
    result = cli("migrate", "generate", "size", cwd=project.root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "20240102000000_note.up.sql" in result.stderr
    assert "set [migrations] baseline_schema" in result.stderr
    assert len(migration_files(project)) == 2
    # a history that replays but for a later, broken migration: no baseline advice
    project.write("db/migrations/20240101000000_widgets.up.sql", WIDGETS_V1)
    project.write("db/migrations/20240103000000_typo.up.sql",
                  "ALTER TABLE widgetz ADD COLUMN size int;\n")
    broken = cli("migrate", "generate", "size", cwd=project.root)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert '20240103000000_typo.up.sql:1: relation "widgetz" does not exist' in broken.stderr
    assert "applied before it: 2 migration(s)" in broken.stderr
    assert "baseline_schema" not in broken.stderr


def test_generate_from_a_live_env_and_from_a_base(pg: Any, project: Any, cli: Any) -> None:
    history(project)
    db = project.db()
    pg.create_db(db)
    pg.query(WIDGETS_V1 + "ALTER TABLE widgets ADD COLUMN stray int;", db=db)
    result = cli("migrate", "generate", "tidy", "--from-env", "local", "--allow-destructive",
                 cwd=project.root)
    assert result.returncode == 0, result.stderr
    up = next((project.root / "db/migrations").glob("*_tidy.up.sql")).read_text()
    assert "DROP COLUMN stray" in up and "env local" in up
    assert pg.scalar("SELECT count(*) FROM pg_attribute WHERE attrelid = 'widgets'::regclass "
                     "AND attname = 'stray'", db=db) == 1  # read-only
    both = cli("migrate", "generate", "x", "--from-env", "local", "--base", "local",
               cwd=project.root)
    assert both.returncode == 2 and "--base" in both.stderr


def test_diff_sql_prints_what_turns_the_database_into_the_ddl(pg: Any, project: Any,
                                                             cli: Any) -> None:
    db = project.db()
    pg.create_db(db)
    pg.query("CREATE TABLE widgets (id integer PRIMARY KEY, label text, junk int);"
             "CREATE VIEW named AS SELECT id, label FROM widgets;", db=db)
    result = cli("diff", "--sql", cwd=project.root)
    assert result.returncode == 3, result.stderr
    assert "ALTER TABLE public.widgets ALTER COLUMN id TYPE bigint;" in result.stdout
    assert "DROP VIEW public.named;" in result.stdout
    # what loses data is marked, as in a generated migration
    assert "-- destructive: data is lost\nALTER TABLE public.widgets DROP COLUMN junk;" in \
        result.stdout
    pg.query(result.stdout, db=db)
    clean = cli("diff", "--sql", cwd=project.root)
    assert clean.returncode == 0 and clean.stdout == "", clean.stdout + clean.stderr
    assert cli("diff", cwd=project.root).returncode == 0
    # against another env: a copy of this database needs nothing, one missing a column needs it
    pg.create_db(project.db("prod"), template=db)
    same = cli("diff", "--sql", "--against", "prod", cwd=project.root)
    assert same.returncode == 0 and same.stdout == "", same.stdout + same.stderr
    pg.query("ALTER TABLE widgets DROP COLUMN label", db=project.db("prod"))
    other = cli("diff", "--sql", "--against", "prod", cwd=project.root)
    assert other.returncode == 3, other.stdout + other.stderr
    assert "ALTER TABLE public.widgets DROP COLUMN label;" in other.stdout
    wrong = cli("diff", "--sql", "--migrations", cwd=project.root)
    assert wrong.returncode == 2 and "migrate generate" in wrong.stderr


def test_generate_and_diff_sql_plan_owners_and_grants_only_with_privileges(
        pg: Any, project: Any, cli: Any, roles: Any) -> None:
    reader, owner = roles
    history(project)
    project.write("db/schema/10_tables/20_grants.sql",
                  f"GRANT SELECT ON widgets TO {reader};\nALTER TABLE widgets OWNER TO {owner};\n")
    plain = cli("migrate", "generate", "grants", cwd=project.root)
    assert plain.returncode == 0 and "nothing to generate" in plain.stdout, plain.stderr
    result = cli("migrate", "generate", "grants", "--privileges", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    up = next((project.root / "db/migrations").glob("*_grants.up.sql")).read_text()
    down = next((project.root / "db/migrations").glob("*_grants.down.sql")).read_text()
    assert f"ALTER TABLE public.widgets OWNER TO {owner};" in up
    assert f"GRANT SELECT ON TABLE public.widgets TO {reader};" in up
    assert f"REVOKE SELECT ON TABLE public.widgets FROM {reader};" in down
    db = project.db()
    pg.create_db(db)
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    assert pg.scalar("SELECT pg_get_userbyid(relowner) FROM pg_class "
                     "WHERE oid = 'widgets'::regclass", db=db) == owner
    assert pg.scalar("SELECT has_table_privilege(%s, 'widgets', 'SELECT')", db=db,
                     params=(reader,)) is True
    assert cli("diff", "--privileges", cwd=project.root).returncode == 0
    # drifted grants: invisible without --privileges, planned with it
    pg.query(f"REVOKE SELECT ON widgets FROM {reader}; GRANT DELETE ON widgets TO PUBLIC", db=db)
    assert cli("diff", "--sql", cwd=project.root).returncode == 0
    fix = cli("diff", "--sql", "--privileges", cwd=project.root)
    assert fix.returncode == 3, fix.stdout + fix.stderr
    assert f"GRANT SELECT ON TABLE public.widgets TO {reader};" in fix.stdout
    assert "REVOKE DELETE ON TABLE public.widgets FROM PUBLIC;" in fix.stdout
    pg.query(fix.stdout, db=db)
    assert pg.scalar("SELECT has_table_privilege(%s, 'widgets', 'SELECT')", db=db,
                     params=(reader,)) is True
    assert pg.scalar("SELECT count(*) FROM aclexplode((SELECT relacl FROM pg_class "
                     "WHERE oid = 'widgets'::regclass)) WHERE grantee = 0", db=db) == 0
    assert cli("diff", "--privileges", cwd=project.root).returncode == 0
    assert no_scratch_left(pg, project)


# ── fidelity on a real history: every step of Lemmy's 233 migrations ───────────────────────

LEMMY = CORPORA / "lemmy-0.19.20" / "migrations"


def psql_file(pg: Any, db: str, path: Path) -> None:
    """Run a migration as psql -f does (autocommit statements: some need no transaction)."""
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(path)],
                   env={**os.environ, **pg.env}, check=True, capture_output=True)


@pytest.mark.slow
def test_fidelity_on_lemmy_history(pg: Any, project: Any) -> None:
    """For each migration: plan from the schema before it to the schema after it, apply the
    plan to a database that tracks the history through plans only, compare. A failed step
    re-syncs the tracking database from the replayed one."""
    if not LEMMY.is_dir():
        pytest.skip(f"corpus not found at {LEMMY}")
    replayed, planned = f"{project.name}_replayed", f"{project.name}_planned"
    pg.create_db(replayed)
    pg.create_db(planned)
    env = {**os.environ, **pg.env}
    tools, conn = confiture.find_pg_tools(env), confiture.ConnInfo(params=())
    sessions = {db: confiture.Session(tools, conn, db, env) for db in (replayed, planned)}
    try:
        before = confiture.read_schema_model(sessions[replayed])
        failures: list[str] = []
        steps = sorted(p for p in LEMMY.iterdir() if (p / "up.sql").is_file())
        for step in steps:
            psql_file(pg, replayed, step / "up.sql")
            after = confiture.read_schema_model(sessions[replayed])
            plan = plan_schema(before, after)
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
                failures.append(f"{step.name}: {problem}")
                for session in sessions.values():
                    session.close()
                pg.drop_db(planned)
                pg.create_db(planned, template=replayed)
                sessions = {db: confiture.Session(tools, conn, db, env)
                            for db in (replayed, planned)}
            before = after
    finally:
        for session in sessions.values():
            session.close()
    share = 1 - len(failures) / len(steps)
    print(f"lemmy: {len(steps) - len(failures)}/{len(steps)} steps reproduced ({share:.1%})")
    print("\n".join(failures))
    assert len(steps) == 233
    assert share >= 0.95, failures


def test_generate_online_builds_indexes_concurrently_in_a_second_migration(
        pg: Any, project: Any, cli: Any) -> None:
    history(project)
    project.write("db/migrations/20240102000000_note.up.sql",
                  "ALTER TABLE widgets ADD COLUMN note text;\n")
    project.write("db/migrations/20240102000000_note.down.sql",
                  "ALTER TABLE widgets DROP COLUMN note;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  "CREATE TABLE widgets (\n    id bigint PRIMARY KEY,\n    label text NOT NULL,\n"
                  "    note text NOT NULL,\n"
                  "    CONSTRAINT label_short CHECK (length(label) < 100)\n);\n"
                  "CREATE INDEX widgets_label ON widgets (label);\n"
                  "CREATE TABLE tags (id int PRIMARY KEY, widget_id bigint REFERENCES widgets);\n"
                  "CREATE INDEX tags_widget ON tags (widget_id);\n")
    result = cli("migrate", "generate", "label index", "--online", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "confiture:allow" not in result.stderr  # the online plan passes the lint
    folder = project.root / "db/migrations"
    first = next(folder.glob("*_label_index.up.sql")).read_text()
    second = next(folder.glob("*_label_index_concurrently.up.sql")).read_text()
    assert "ADD CONSTRAINT label_short CHECK ((length(label) < 100)) NOT VALID;" in first
    assert "CREATE INDEX tags_widget ON public.tags" in first  # a new table needs no care
    assert "widgets_label" not in first
    assert second.startswith("-- confiture:no-transaction\n")
    assert "CREATE INDEX CONCURRENTLY widgets_label ON public.widgets" in second
    assert "ALTER TABLE public.widgets VALIDATE CONSTRAINT label_short;" in second
    # SET NOT NULL through a validated check: no scan under an exclusive lock
    assert "ADD CONSTRAINT widgets_note_not_null CHECK ((note IS NOT NULL)) NOT VALID;" in first
    assert "SET NOT NULL" not in first
    steps = ["ALTER TABLE public.widgets VALIDATE CONSTRAINT widgets_note_not_null;",
             "ALTER TABLE public.widgets ALTER COLUMN note SET NOT NULL;",
             "ALTER TABLE public.widgets DROP CONSTRAINT widgets_note_not_null;"]
    at = [second.index(step) for step in steps]
    assert at == sorted(at), second
    assert "DROP INDEX CONCURRENTLY public.widgets_label;" in \
        next(folder.glob("*_label_index_concurrently.down.sql")).read_text()
    db = project.db()
    pg.create_db(db)
    pg.query(WIDGETS_V1, db=db)
    assert cli("migrate", "baseline", "--to", "20240101000000", cwd=project.root).returncode == 0
    up = cli("migrate", "up", cwd=project.root)
    assert up.returncode == 0, up.stderr
    assert pg.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'widgets_label'::regclass",
                     db=db)
    assert pg.scalar("SELECT convalidated FROM pg_constraint WHERE conname = 'label_short'", db=db)
    assert pg.scalar("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'widgets'::regclass "
                     "AND attname = 'note'", db=db)
    assert not pg.query("SELECT 1 FROM pg_constraint WHERE conname = 'widgets_note_not_null'",
                        db=db)
    assert cli("diff", cwd=project.root).returncode == 0


# ── the guard: a protected env is written only when the result equals the DDL's schema ────

def test_guard_refuses_a_deploy_whose_migrations_disagree_with_the_ddl(
        pg: Any, project: Any, cli: Any) -> None:
    history(project)
    first = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert first.returncode == 0, first.stderr
    assert "consistent with the DDL after migrations (1 applied to an empty database)" in \
        first.stderr
    db = project.db("prod")
    # a migration whose object the DDL lacks: refused before anything is written
    project.write("db/migrations/20240102000000_sizes.up.sql",
                  "ALTER TABLE widgets ADD COLUMN size int;\n")
    backups = sorted((project.root / ".confiture/backups/prod").glob("*"))
    for command in (["deploy"], ["migrate", "up"]):
        refused = cli(*command, "--env", "prod", "--yes", cwd=project.root)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "would not match the DDL" in refused.stderr
        assert "+ column public.widgets.size" in refused.stderr
        assert "migrate generate" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted((project.root / ".confiture/backups/prod").glob("*")) == backups
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'widgets' AND column_name = 'size'", db=db) == 0
    assert no_scratch_left(pg, project)
    # the DDL catches up: the deploy goes through; an unprotected env is never checked
    project.write("db/schema/10_tables/10_widgets.sql",
                  WIDGETS_V1.replace("NOT NULL\n", "NOT NULL,\n    size integer\n"))
    ok = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert ok.returncode == 0, ok.stderr
    assert pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'widgets' AND column_name = 'size'", db=db) == 1


def test_guard_on_a_first_deploy_needs_a_replayable_history(pg: Any, project: Any,
                                                             cli: Any) -> None:
    # the history starts from a schema that existed before it
    project.write("db/migrations/20240102000000_color.up.sql",
                  "ALTER TABLE widgets ADD COLUMN color text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  WIDGETS_V1.replace("NOT NULL\n", "NOT NULL,\n    color text\n"))
    refused = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "do not replay from an empty database" in refused.stderr
    assert 'baseline_schema = "db/baseline.sql"' in refused.stderr
    assert not pg.db_exists(project.db("prod"))
    project.write("db/baseline.sql", WIDGETS_V1)
    project.config_path.write_text(project.config_path.read_text()
                                   + '\n[migrations]\nbaseline_schema = "db/baseline.sql"\n')
    ok = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert ok.returncode == 0, ok.stderr
    assert "applied to baseline baseline.sql" in ok.stderr
    # the verdict is kept while nothing it depends on changes
    ws = confiture.workspace_for(project.config_path, env="prod",
                                 environ={**os.environ, **pg.env})
    pg.drop_db(project.db("prod"))
    assert confiture.check_consistency(ws).cached
    project.write("db/schema/10_tables/20_more.sql", "CREATE TABLE more (id int);\n")
    verdict = confiture.check_consistency(ws)
    assert not verdict.cached and verdict.differences == (
        "- column public.more.id", "- table public.more")
    project.config_path.write_text(project.config_path.read_text()
                                   + "\n[deploy]\nrequire_consistent = false\n")
    unchecked = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "consistent with the DDL" not in unchecked.stderr


def test_guard_on_a_first_deploy_names_a_broken_later_migration(pg: Any, project: Any,
                                                                cli: Any) -> None:
    """A history that replays but for a later migration: the deploy is refused naming it, and
    the advice is to fix it, not to set a baseline (the history does start empty)."""
    history(project)
    project.write("db/migrations/20240102000000_typo.up.sql",
                  "ALTER TABLE widgetz ADD COLUMN color text;\n")
    project.write("db/schema/10_tables/10_widgets.sql",
                  WIDGETS_V1.replace("NOT NULL\n", "NOT NULL,\n    color text\n"))
    refused = cli("deploy", "--env", "prod", "--yes", cwd=project.root)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert '20240102000000_typo.up.sql:1: relation "widgetz" does not exist' in refused.stderr
    assert "fix that migration" in refused.stderr and "baseline_schema" not in refused.stderr
    assert not pg.db_exists(project.db("prod"))


def test_interrupted_generate_drops_every_scratch_database(pg: Any, project: Any) -> None:
    """Ctrl-C while the plan is proved (two scratch databases at once: the replayed one and
    its copy): exit 130, nothing written, nothing left."""
    history(project)
    project.write("db/schema/20_slow.sql",  # slow only where the proof applies it
                  "CREATE MATERIALIZED VIEW slow AS SELECT CASE WHEN current_database() "
                  "LIKE '%\\_scratch\\_%' THEN pg_sleep(60)::text END AS x;\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "confiture.py"), "migrate", "generate",
                             "slow"], cwd=project.root, env={**clean_environ(), "NO_COLOR": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not pg.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE starts_with(datname, %s) "
            "AND query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid()",
            params=(project.name + "_scratch_",)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert len(pg.query("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                        params=(project.name + "_scratch_",))) == 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert no_scratch_left(pg, project)
    assert len(migration_files(project)) == 2
