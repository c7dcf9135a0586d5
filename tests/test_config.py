"""Configuration, environments, connection strings, scanning and build — no server needed.

These run confiture in-process through main(argv, environ) (exit codes and messages exactly as
users see them) or call the core functions directly where that is clearer.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest

import confiture

BASE = """\
[project]
name = "shop"
schema = ["db/schema"]
[env.local]
url = "postgresql:///shop_dev"
seeds = ["common"]
[env.prod]
url = "postgresql:///shop_prod"
protected = true
"""


def make_project(root: Path, config: str = BASE, files: dict[str, str | bytes] | None = None) -> Path:
    files = files if files is not None else {
        "db/schema/10_tables/1_a.sql": "create table a (id int);\n",
        "db/seeds/common/1.sql": "insert into a values (1);\n",
    }
    (root / "confiture.toml").write_text(config)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root / "confiture.toml"


def run(root: Path, *argv: str, environ: dict[str, str] | None = None,
        capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    env.update(environ or {})
    code = confiture.main(["--config", str(root / "confiture.toml"), *argv], env)
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


# ── configuration errors: exit 2, and the message names the file, key or variable ──────────


def test_malformed_toml_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE + "[env.broken\nurl = 1\n")
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2
    assert "confiture.toml" in err and "invalid TOML" in err and "line" in err
    assert "Traceback" not in err


def test_unknown_key_is_rejected_with_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE.replace('seeds = ["common"]', 'seed = ["common"]'))
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2
    assert "'seed'" in err and "did you mean 'seeds'" in err


def test_unknown_section_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE + "[tempaltes]\nkeep = 2\n")
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "[tempaltes]" in err and "templates" in err


def test_wrong_type_names_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE + "[templates]\nkeep = \"three\"\n")
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "keep must be int" in err


@pytest.mark.parametrize("table", ['a.b.c', '"unterminated', "x" * 64, "s."])
def test_bad_migrations_table_is_a_config_error_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str) -> None:
    make_project(tmp_path, BASE + f"[migrations]\ntable = {json.dumps(table)}\n")
    code, _, err = run(tmp_path, "config", "check", capsys=capsys)
    assert code == 2 and "confiture.toml" in err and "migrations.table" in err, err


@pytest.mark.parametrize("extra, key", [
    ("[backups]\ncompression = 99\n", "backups.compression must be 0–9, not 99"),
    ("[backups]\nkeep = 0\n", "backups.keep must be at least 1"),
    ("[templates]\nkeep = 0\n", "templates.keep must be at least 1"),
    ('[deploy]\ntable = "a.b.c"\n', "deploy.table"),
    ('[status]\nmax_backup_age = "soon"\n', "status.max_backup_age"),
    ('[sync]\nlock_timeout = "forever"\n', "sync.lock_timeout"),
    ('[sync]\nfrom = "prdo"\n', "sync.from 'prdo'"),
    ('[project]\nscratch_url = "host=x bogus=1"\n', "project.scratch_url"),
])
def test_config_check_validates_every_value(tmp_path: Path, extra: str, key: str) -> None:
    """Issue 11.11: a value only one command reads is still checked when the config loads."""
    import subprocess
    import sys

    text = BASE + extra
    if extra.startswith("[project]"):
        text = BASE.replace("[project]\n", extra)
    make_project(tmp_path, text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CONFITURE"))}
    result = subprocess.run([sys.executable, confiture.__file__, "config", "check"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and "confiture.toml" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_variable_is_an_error_only_where_used(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE.replace('"postgresql:///shop_prod"', '"${PROD_URL_FOR_TEST}"'))
    # scanning local does not need prod's URL
    code, _, _ = run(tmp_path, "scan", capsys=capsys)
    assert code == 0
    code, _, err = run(tmp_path, "--env", "prod", "template", "--check", capsys=capsys)
    assert code == 2
    assert "PROD_URL_FOR_TEST" in err and "env.prod.url" in err
    # config check is a check: it fails naming the variable and the env (issue 11.13)
    code, out, err = run(tmp_path, "config", "check", capsys=capsys)
    assert code == 2 and "PROD_URL_FOR_TEST" in err and "env prod" in err


@pytest.mark.parametrize(("extra", "named"), [
    ("[backups]\ncompression = 99\n", "backups.compression must be 0–9"),
    ("[status]\nmax_backup_age = \"soon\"\n", "status.max_backup_age"),
    ("[sync]\nlock_timeout = \"later\"\n", "sync.lock_timeout"),
    ("[sync]\ntables = [1]\n", "sync.tables"),
    ("[sync.rules]\n\"a.b\" = \"scramble\"\n", "[sync].rules 'a.b'"),
    ("[sync.rules]\n\"a.b.c.d\" = \"keep\"\n", "'a.b.c.d'"),
    ("[sync.where]\n\"a\" = \"\"\n", "where 'a'"),
])
def test_every_value_is_checked_when_the_config_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, named: str) -> None:
    """Not only the command that uses a value: `config check` and `scan` fail on it too."""
    make_project(tmp_path, BASE + extra)
    for argv in (["config", "check"], ["scan"]):
        code, _, err = run(tmp_path, *argv, capsys=capsys)
        assert code == 2 and named in err and "Traceback" not in err, (argv, err)


def test_schema_folders_expand_the_given_environment(tmp_path: Path) -> None:
    make_project(tmp_path, BASE.replace('schema = ["db/schema"]', 'schema = ["${SCHEMA_DIR}"]'),
                 {"db/other/1.sql": "create table o (id int);\n"})
    config = confiture.load_config(tmp_path / "confiture.toml", {"SCHEMA_DIR": "db/other"})
    assert config.schema[0].path == (tmp_path / "db/other").resolve()
    with pytest.raises(confiture.ConfigError, match="SCHEMA_DIR"):
        confiture.load_config(tmp_path / "confiture.toml", {})


def test_variable_expansion_and_default() -> None:
    env = {"HOST": "db.example"}
    assert confiture.expand_vars("postgresql://${HOST}/x", "k", env) == "postgresql://db.example/x"
    assert confiture.expand_vars("${NOPE:-fallback}", "k", env) == "fallback"
    assert confiture.expand_vars("a$$b", "k", env) == "a$b"
    with pytest.raises(confiture.ConfigError, match="NOPE"):
        confiture.expand_vars("${NOPE}", "k", env)


def test_unknown_env_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    code, _, err = run(tmp_path, "--env", "lcoal", "scan", capsys=capsys)
    assert code == 2 and "'lcoal'" in err and "did you mean 'local'" in err


def test_seeds_in_protected_env_are_a_config_error(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE.replace("protected = true", 'protected = true\nseeds = ["common"]'))
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "env.prod is protected" in err and "seed" in err


def test_unprotected_alias_of_protected_database_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = BASE + '[env.sneaky]\nurl = "host=localhost dbname=shop_prod"\n'
    make_project(tmp_path, config)
    code, _, err = run(tmp_path, "--env", "sneaky", "template", "--check", capsys=capsys)
    assert code == 2
    assert "same database as protected env.prod" in err


def test_env_resolution_order(tmp_path: Path) -> None:
    make_project(tmp_path, BASE.replace('name = "shop"', 'name = "shop"\ndefault_env = "prod"'))
    config = confiture.load_config(tmp_path / "confiture.toml")
    assert confiture.resolve_env_name(config, None, {}) == "prod"
    assert confiture.resolve_env_name(config, None, {"CONFITURE_ENV": "local"}) == "local"
    assert confiture.resolve_env_name(config, "prod", {"CONFITURE_ENV": "local"}) == "prod"


def test_global_options_work_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    code, out, _ = run(tmp_path, "scan", "--json", "--env", "prod", capsys=capsys)
    assert code == 0
    import json
    doc = json.loads(out)
    assert doc["env"] == "prod" and len(doc["files"]) == 1  # prod has no seeds


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        confiture.main([*argv, "--help"], {})
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_help_lists_commands_by_area_and_every_command_says_what_it_does(
        capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(capsys)
    titles = [title for title, _ in confiture.COMMAND_AREAS]
    assert [t for t in titles if f"\n{t}:\n" in top] == titles
    assert "global options (before or after the command):" in top and "exit codes:" in top
    commands = [line.split()[0] for line in top.splitlines()
                if line.startswith("  ") and not line.startswith("  confiture.py")
                and not line.lstrip().startswith("-")]
    assert {"init", "migrate", "deploy", "sync", "diff", "status"} <= set(commands)
    for command in commands:
        words = [command, "status" if command == "migrate" else ""]
        for argv in ([command], [w for w in words if w]):
            text = _help(capsys, *argv)
            description = text.split("\n\n")[1]
            assert description.strip() and not description.startswith(("options", "positional")), \
                (argv, text)
            assert "examples:\n  confiture.py " in text, argv  # its area's examples
    assert "confiture.py migrate up --dry-run" in _help(capsys, "migrate", "up")
    assert "confiture.py deploy --env prod --yes" in _help(capsys, "deploy")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_a_migrate_action_builds_only_its_parser_and_parses_as_the_full_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Start-up: `migrate up` builds the parser of `up` alone, not of every migrate action;
    what it parses is what the full parser parses, and a mistyped action still names them all."""
    full = confiture.build_parser()
    actions = sorted(_subparsers(_subparsers(full)["migrate"]))
    assert {"status", "up", "down", "new"} <= set(actions)
    for argv in (["migrate", "up", "--to", "7", "--dry-run"], ["--env", "x", "migrate", "status",
                                                                  "--check"],
                 ["migrate", "new", "add_thing"], ["migrate"], ["-q", "migrate", "down", "--to", "0"]):
        built = confiture.build_parser(argv)
        levels = _subparsers(_subparsers(built)["migrate"])
        assert sorted(levels) == ([argv[argv.index("migrate") + 1]] if argv[-1] != "migrate"
                                else actions), argv
        assert vars(built.parse_args(argv)) == vars(full.parse_args(argv)), argv
    assert sorted(_subparsers(_subparsers(confiture.build_parser(["migrate", "sttaus"]))
                              ["migrate"])) == actions
    assert confiture.main(["migrate", "sttaus"], {}) == confiture.EXIT_USAGE
    assert "invalid choice: 'sttaus' (choose from 'new'" in capsys.readouterr().err
    # a command's argument that happens to be an action name does not restrict anything
    assert vars(confiture.build_parser(["clone", "up"]).parse_args(["clone", "up"]))["name"] == "up"


def test_usage_error_is_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    code, _, err = run(tmp_path, "clone", capsys=capsys)
    assert code == 2 and "Traceback" not in err


def test_config_found_upward_and_via_environment(tmp_path: Path) -> None:
    make_project(tmp_path)
    (tmp_path / ".git").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert confiture.find_config(None, {}, deep) == tmp_path / "confiture.toml"
    other = tmp_path / "elsewhere.toml"
    other.write_text(BASE)
    assert confiture.find_config(None, {"CONFITURE_CONFIG": str(other)}, deep) == other
    with pytest.raises(confiture.ConfigError, match="no confiture.toml"):
        confiture.find_config(None, {}, tmp_path / "a" if False else Path("/"))


# ── connections ────────────────────────────────────────────────────────────────────────────


def test_url_parsing_and_masking() -> None:
    conn = confiture.ConnInfo.parse("postgresql://app:s3cr%40t@db1:5433,db2:5434/shop?sslmode=require")
    assert conn.get("user") == "app" and conn.get("password") == "s3cr@t"
    assert conn.get("host") == "db1,db2" and conn.get("port") == "5433,5434"
    assert conn.get("dbname") == "shop" and conn.get("sslmode") == "require"
    env = conn.child_env({}, "other")
    assert env["PGPASSWORD"] == "s3cr@t" and env["PGDATABASE"] == "other"
    assert env["PGSSLMODE"] == "require"
    assert conn.argv_conninfo() == []  # nothing on argv, least of all the password
    shown = conn.display({})
    assert "s3cr" not in shown and "***" in shown
    assert "s3cr" not in confiture.mask_password_in("postgresql://app:s3cr%40t@db1/x")


def test_keyvalue_parsing_and_unknown_parameter() -> None:
    conn = confiture.ConnInfo.parse("host=/tmp port=5 dbname='my db' password='it''s'".replace("''", "\\'"))
    assert conn.get("dbname") == "my db" and conn.get("password") == "it's"
    with pytest.raises(confiture.ConfigError, match="unknown connection parameter 'hots'"):
        confiture.ConnInfo.parse("hots=x")


def test_server_identity_folds_local_addresses() -> None:
    a = confiture.ConnInfo.parse("postgresql://localhost:5432/x").server_identity({})
    b = confiture.ConnInfo.parse("host=/var/run/postgresql dbname=x").server_identity({})
    c = confiture.ConnInfo.parse("postgresql://db.example/x").server_identity({})
    assert a == b != c


def test_protected_env_needs_yes_and_refuses_without_terminal(tmp_path: Path) -> None:
    make_project(tmp_path)
    config = confiture.load_config(tmp_path / "confiture.toml")
    env = confiture.resolve_env(config, "prod", {})
    console = confiture.Console(stderr=io.StringIO())
    with pytest.raises(confiture.Refused) as info:
        confiture.confirm_protected(env, "deploy", yes=False, console=console, stdin=io.StringIO())
    assert info.value.exit_code == 4
    confiture.confirm_protected(env, "deploy", yes=True, console=console, stdin=io.StringIO())

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    with pytest.raises(confiture.Refused, match="typed 'pord'"):
        confiture.confirm_protected(env, "deploy", yes=True, console=console, stdin=Tty("pord\n"))
    confiture.confirm_protected(env, "deploy", yes=True, console=console, stdin=Tty("prod\n"))


# ── scanning and hashing ───────────────────────────────────────────────────────────────────


def test_natural_order_hidden_and_non_sql_files(tmp_path: Path) -> None:
    make_project(tmp_path, files={
        "db/schema/10_views/1_v.sql": "select 1;",
        "db/schema/2_tables/10_b.sql": "select 1;",
        "db/schema/2_tables/9_a.sql": "select 1;",
        "db/schema/2_tables/.hidden.sql": "select 1;",
        "db/schema/.hidden/x.sql": "select 1;",
        "db/schema/2_tables/readme.md": "x",
        "db/seeds/common/1.sql": "select 1;",
    })
    config = confiture.load_config(tmp_path / "confiture.toml")
    rels = [f.rel for f in confiture.scan_env(config, "local").files]
    assert rels == ["db/schema/2_tables/9_a.sql", "db/schema/2_tables/10_b.sql",
                    "db/schema/10_views/1_v.sql", "db/seeds/common/1.sql"]


def test_exclude_globs(tmp_path: Path) -> None:
    make_project(tmp_path, BASE.replace('seeds = ["common"]', 'seeds = ["common"]\nexclude = ["**/*.draft.sql"]'),
                 files={"db/schema/a.sql": "select 1;", "db/schema/x/b.draft.sql": "select 1;",
                        "db/seeds/common/c.draft.sql": "select 1;", "db/seeds/common/d.sql": "x"})
    config = confiture.load_config(tmp_path / "confiture.toml")
    assert [f.rel for f in confiture.scan_env(config, "local").files] == [
        "db/schema/a.sql", "db/seeds/common/d.sql"]


def test_symlink_loop_is_an_error_not_a_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    os.symlink(tmp_path / "db" / "schema", tmp_path / "db" / "schema" / "10_tables" / "loop")
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "symlink loop" in err


def test_symlinked_folder_is_followed(tmp_path: Path) -> None:
    make_project(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.sql").write_text("select 1;")
    os.symlink(tmp_path / "shared", tmp_path / "db" / "schema" / "20_shared")
    config = confiture.load_config(tmp_path / "confiture.toml")
    assert "db/schema/20_shared/x.sql" in [f.rel for f in confiture.scan_env(config, "local").files]


def test_non_utf8_file_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, files={"db/schema/a.sql": b"select 1;\n-- caf\xe9\n",
                                  "db/seeds/common/1.sql": "x"})
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "db/schema/a.sql:2" in err and "UTF-8" in err


def test_empty_or_missing_schema_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, files={"db/schema/readme.txt": "no sql here", "db/seeds/common/1.sql": "x"})
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "holds no .sql files" in err
    make_project(tmp_path, BASE.replace('"db/schema"', '"db/nope"'))
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "db/nope" in err and "does not exist" in err


def test_missing_seed_set_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path, BASE.replace('["common"]', '["common", "dev"]'))
    code, _, err = run(tmp_path, "scan", capsys=capsys)
    assert code == 2 and "seed set 'dev'" in err


def test_hash_tracks_content_and_path_but_not_location(tmp_path: Path) -> None:
    def hash_of(root: Path) -> str:
        return confiture.scan_env(confiture.load_config(root / "confiture.toml"), "local").hash

    one, two = tmp_path / "one", tmp_path / "two" / "deeper"
    for root in (one, two):
        root.mkdir(parents=True)
        make_project(root)
    assert hash_of(one) == hash_of(two)
    (two / "db/schema/10_tables/1_a.sql").write_text("create table a (id bigint);\n")
    assert hash_of(one) != hash_of(two)
    (two / "db/schema/10_tables/1_a.sql").write_text("create table a (id int);\n")
    assert hash_of(one) == hash_of(two)
    (two / "db/schema/10_tables/1_a.sql").rename(two / "db/schema/10_tables/2_a.sql")
    assert hash_of(one) != hash_of(two)


def test_multi_folder_schema_in_listed_order(tmp_path: Path) -> None:
    other = tmp_path / "other-checkout" / "db"
    (other / "core").mkdir(parents=True)
    (other / "core" / "1_core.sql").write_text("create table core (id int);\n")
    project = tmp_path / "app"
    project.mkdir()
    make_project(project, BASE.replace('schema = ["db/schema"]',
                                       'schema = [{ path = "../other-checkout/db", name = "core" }, "db/schema"]'))
    config = confiture.load_config(project / "confiture.toml")
    rels = [f.rel for f in confiture.scan_env(config, "local").files]
    assert rels == ["core/core/1_core.sql", "db/schema/10_tables/1_a.sql", "db/seeds/common/1.sql"]


# ── build ──────────────────────────────────────────────────────────────────────────────────


def test_build_is_deterministic_and_headed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    assert run(tmp_path, "build", capsys=capsys)[0] == 0
    first = (tmp_path / "db/generated/schema_local.sql").read_bytes()
    assert run(tmp_path, "build", capsys=capsys)[0] == 0
    assert (tmp_path / "db/generated/schema_local.sql").read_bytes() == first
    text = first.decode()
    config = confiture.load_config(tmp_path / "confiture.toml")
    assert f"-- hash: {confiture.scan_env(config, 'local').hash}" in text
    assert "-- env: local" in text and "--   db/schema/10_tables/1_a.sql" in text


def test_build_schema_only_leaves_out_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    code, out, _ = run(tmp_path, "build", "--schema-only", "-o", "-", capsys=capsys)
    assert code == 0 and "create table a" in out and "insert into a" not in out


def test_line_map_points_into_files(tmp_path: Path) -> None:
    make_project(tmp_path, files={"db/schema/1.sql": "select 1;\nselect 2;\n",
                                  "db/schema/2.sql": "\n\nselect nope(;\n",
                                  "db/seeds/common/x.sql": "select 3"})
    config = confiture.load_config(tmp_path / "confiture.toml")
    build = confiture.render_build(confiture.scan_env(config, "local"), confiture.sql_guard(config))
    lines = build.script.split("\n")
    target = next(i for i, line in enumerate(lines, 1) if "nope" in line)
    assert build.line_map.locate(target) == ("db/schema/2.sql", 3)
