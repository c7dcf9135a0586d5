"""What keeps a run's start cheap must not change what a run sees: records (the dataclass
replacement), the migration checksum cache, the session's COPY rows and
its handshake that is not waited for. The speed itself is measured by `make bench`, never here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CONFITURE, CliRunner, Cluster, Project

import confiture

# ── records ───────────────────────────────────────────────────────────────────────────────

@confiture.record(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = confiture.field(default_factory=tuple)
    secret: str = confiture.field(default="s", repr=False, compare=False)


@confiture.record()
class Box:
    inner: Point
    items: list[Point] = confiture.field(default_factory=list)


def test_records_behave_like_dataclasses() -> None:
    a, b = Point(1), Point(1, 0, (), "other")
    assert (a.x, a.y, a.tags, a.secret) == (1, 0, (), "s")
    assert a == b and hash(Point(1, 2)) == hash(Point(1, 2)) and a != Point(2)
    assert Box(Point(1)).items is not Box(Point(1)).items  # a fresh list per instance
    assert repr(Point(3, 4)) == "Point(x=3, y=4, tags=())"  # repr=False field hidden
    with pytest.raises(AttributeError):
        a.x = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]
    moved = confiture.evolve(a, y=7)
    assert (moved.x, moved.y, a.y) == (1, 7, 0)
    box = Box(Point(1), [Point(2, tags=("t",))])
    box.items = []  # not frozen
    box.items.append(Point(2, tags=("t",)))
    assert confiture.as_dict(box) == {
        "inner": {"x": 1, "y": 0, "tags": (), "secret": "s"},
        "items": [{"x": 2, "y": 0, "tags": ("t",), "secret": "s"}]}
    assert Point.__match_args__ == ("x", "y", "tags", "secret")


# ── migration checksum cache ──────────────────────────────────────────────────────────────

def _scan(root: Path, cache: confiture.ChecksumCache | None) -> dict[str, str]:
    files = confiture.scan_migrations(root / "db/migrations", root, cache)
    return {m.label: m.checksum for m in files.migrations}


def _cache(root: Path, age_s: float = 10) -> confiture.ChecksumCache:
    """A cache that treats files as `age_s` seconds older than they are (freshly written
    files are never cached: see ChecksumCache)."""
    cache = confiture.ChecksumCache(root / ".confiture/cache/migrations.json", 2)
    cache.now_ns += int(age_s * 1e9)
    return cache


def test_checksum_cache_is_used_only_while_files_are_unchanged(tmp_path: Path) -> None:
    folder = tmp_path / "db/migrations"
    folder.mkdir(parents=True)
    (folder / "1_a.up.sql").write_text("CREATE TABLE a (id int);\n")
    (folder / "2_b.up.sql").write_text("-- confiture:no-transaction\nCREATE INDEX CONCURRENTLY x ON a (id);\n")
    truth = _scan(tmp_path, None)
    assert _scan(tmp_path, _cache(tmp_path)) == truth
    stored = json.loads((tmp_path / ".confiture/cache/migrations.json").read_text())["files"]
    assert len(stored) == 2
    # the cache is really consulted: a doctored entry with a matching stat key is believed …
    path = str(folder / "1_a.up.sql")
    stored[path][4] = "0" * 64
    (tmp_path / ".confiture/cache/migrations.json").write_text(
        json.dumps({"format": confiture.ChecksumCache.FORMAT, "files": stored}))
    assert _scan(tmp_path, _cache(tmp_path))["1_a"] == "0" * 64
    # … until the file is written again, even with the same size and the same mtime
    st = os.stat(path)
    (folder / "1_a.up.sql").write_text("CREATE TABLE b (id int);\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _scan(tmp_path, _cache(tmp_path))["1_a"] == _scan(tmp_path, None)["1_a"] != truth["1_a"]
    # the transactional flag comes from the cache too
    files = confiture.scan_migrations(folder, tmp_path, _cache(tmp_path)).migrations
    assert [m.transactional for m in files] == [True, False]
    # a file written in the last two seconds is never stored
    (folder / "3_c.up.sql").write_text("SELECT 1;\n")
    _scan(tmp_path, _cache(tmp_path, age_s=0))
    stored = json.loads((tmp_path / ".confiture/cache/migrations.json").read_text())["files"]
    assert str(folder / "3_c.up.sql") not in stored
    # a broken cache is ignored and replaced
    for broken in ("{not json", '{"format": 1, "files": []}', '{"format": 1, "files": {"x": 3}}'):
        (tmp_path / ".confiture/cache/migrations.json").write_text(broken)
        assert _scan(tmp_path, _cache(tmp_path)) == _scan(tmp_path, None)
    # an unwritable cache costs time, never the run
    (tmp_path / ".confiture/cache/migrations.json").unlink()
    (tmp_path / ".confiture/cache/migrations.json").mkdir()
    assert _scan(tmp_path, _cache(tmp_path)) == _scan(tmp_path, None)


def test_migrate_status_sees_a_changed_migration_through_the_cache(
        project: Project, cli: CliRunner, pg: Cluster) -> None:
    project.write("db/migrations/1_a.up.sql", "CREATE TABLE a (id int);\n")
    pg.query(f'CREATE DATABASE "{project.db("local")}"')
    assert cli("migrate", "up", cwd=project.root).returncode == 0
    path = project.root / "db/migrations/1_a.up.sql"
    os.utime(path, ns=(0, 0))
    # fill the cache as if the file were old (its ctime is recent: prime it in-process)
    _scan(project.root, _cache(project.root))
    assert cli("migrate", "status", "--check", cwd=project.root).returncode == 0
    path.write_text("CREATE TABLE z (id int);\n")  # same size
    os.utime(path, ns=(0, 0))                     # same mtime
    result = cli("migrate", "status", "--check", "--json", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert json.loads(result.stdout)["changed"][0]["version"] == 1


# ── file-set scan cache (template names for diff and status) ──────────────────────────────

def _scan_env(project: Project, age_s: float | None = 10) -> confiture.FileSet:
    config = confiture.load_config(project.config_path)
    cache = None
    if age_s is not None:
        cache = confiture.scan_cache(config, "local", True)
        cache.now_ns += int(age_s * 1e9)
    return confiture.scan_env(config, "local", cache=cache)


def test_scan_cache_is_used_only_while_files_are_unchanged(project: Project) -> None:
    path = project.root / "db/schema/10_tables/10_widgets.sql"
    truth = _scan_env(project, None)
    assert _scan_env(project) == truth
    cache_file = project.root / ".confiture/cache/files-local.json"
    stored = json.loads(cache_file.read_text())["files"]
    assert list(stored) == [str(path)]
    # a doctored entry with a matching stat key is believed (the cache is consulted) …
    stored[str(path)][4] = "0" * 64
    cache_file.write_text(json.dumps({"format": confiture.ChecksumCache.FORMAT, "files": stored}))
    doctored = _scan_env(project)
    assert doctored.files[0].sha256 == "0" * 64 and doctored.hash != truth.hash
    # … but a build never takes a file for what the scan said it was
    with pytest.raises(confiture.InputError, match="10_widgets.sql changed while it was being read"):
        confiture.render_build(doctored, confiture.sql_guard(confiture.load_config(project.config_path)))
    # a rewrite with the same size and mtime is seen (ctime and inode are in the key)
    st = os.stat(path)
    path.write_text(path.read_text().replace("label", "lebal"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    rescanned = _scan_env(project)
    assert rescanned == _scan_env(project, None) and rescanned.hash not in (truth.hash, doctored.hash)
    # seed-less scans keep their own cache (a scan drops the entries of files it did not see)
    config = confiture.load_config(project.config_path)
    assert confiture.scan_cache(config, "local", False).path.name == "files-local-schema-only.json"


def test_diff_and_status_name_the_template_from_the_scan_cache_but_build_from_the_files(
        project: Project, cli: CliRunner, pg: Cluster) -> None:
    path = project.root / "db/schema/10_tables/10_widgets.sql"
    assert cli("reset", cwd=project.root).returncode == 0
    truth = _scan_env(project)  # primes the cache as if the file were old
    template = confiture.template_name(project.name, "local", truth.hash)
    assert cli("diff", cwd=project.root).returncode == 0
    # the same size and mtime, new content: status sees a stale template, diff the drift
    st = os.stat(path)
    path.write_text(path.read_text().replace("label", "lebal"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    status = cli("status", "--json", cwd=project.root)
    assert json.loads(status.stdout)["template"]["state"] == "stale", status.stdout
    result = cli("diff", "--json", cwd=project.root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "lebal" in result.stdout
    # a cache naming a template that does not exist: the files are read and hashed again,
    # so the build is named after what it holds
    path.write_text(path.read_text().replace("lebal", "label"))
    _scan_env(project)
    cache_file = project.root / ".confiture/cache/files-local.json"
    data = json.loads(cache_file.read_text())
    data["files"][str(path)][4] = "f" * 64
    cache_file.write_text(json.dumps(data))
    result = cli("diff", "--json", cwd=project.root)
    assert result.returncode == 0, result.stdout + result.stderr
    built = pg.query("SELECT datname FROM pg_database WHERE datistemplate AND "
                     "starts_with(datname, %s)", params=(project.name + "_tpl_local_",))
    assert (template,) in built, built


# ── the session: COPY rows, U+2028, the handshake ─────────────────────────────────────────

HOSTILE = ["tab\there", "new\nline", "back\\slash", "cr\rx", "sep\u2028ara\x1ctor", "", "ünï"]


def test_session_rows_and_json_keep_every_character(pg: Cluster) -> None:
    tools = confiture.find_pg_tools()
    with confiture.Session(tools, confiture.ConnInfo.parse(pg.url()), "postgres") as session:
        values = ", ".join(f"({i}, {confiture.quote_literal(v)})" for i, v in enumerate(HOSTILE))
        sql = f"SELECT i, v FROM (VALUES {values}, ({len(HOSTILE)}, NULL)) t(i, v) ORDER BY i"
        assert session.rows(sql) == [[str(i), v] for i, v in enumerate(HOSTILE)] + \
            [[str(len(HOSTILE)), None]]
        assert [r["v"] for r in session.query(sql)] == [*HOSTILE, None]


def test_session_reports_a_dead_server_at_first_use(pg: Cluster) -> None:
    conn = confiture.ConnInfo.parse("postgresql://127.0.0.1:1/postgres?connect_timeout=2")
    session = confiture.Session(confiture.find_pg_tools(), conn, "postgres")  # does not wait
    with pytest.raises(confiture.ConnectionFailed, match="cannot connect"):
        session.value("SELECT 1")


def test_session_quit_ends_the_connection_without_waiting_and_close_reaps_it(pg: Cluster) -> None:
    """quit() sends psql its \\q and returns (migrate lint runs its rules meanwhile); no
    statement may follow; close() then waits for psql, and the server's backend goes away."""
    tools = confiture.find_pg_tools()
    session = confiture.Session(tools, confiture.ConnInfo.parse(pg.url()), "postgres")
    pid = session.value("SELECT pg_backend_pid()")
    session.quit()
    with pytest.raises(confiture.PgError, match="session is closed"):
        session.value("SELECT 1")
    session.close()
    session.close()  # twice is fine
    assert session.closed
    deadline = time.monotonic() + 30  # the server ends the backend on its own time
    while pg.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", params=(pid,)):
        assert time.monotonic() < deadline, f"backend {pid} still there"
        time.sleep(0.05)


def test_runs_that_hash_nothing_do_not_load_hashlib(tmp_path: Path) -> None:
    """hashlib (OpenSSL's, ~3 ms) is imported by the first hash: loading a configuration,
    [sync] included, hashes nothing; the [sync] digest is made when sync needs it."""
    (tmp_path / "confiture.toml").write_text(
        '[project]\nname = "imp"\n[env.local]\nurl = "postgresql:///imp"\n'
        '[sync]\nfrom = "local"\nto = "local"\nkey = "${K}"\n[sync.rules]\n"users.email" = "email"\n')
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import confiture; "
            "confiture.load_config(confiture.Path('confiture.toml'), {}); "
            "print('hashlib' in sys.modules)")
    run = subprocess.run([sys.executable, "-S", "-c", code, str(CONFITURE.parent)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False", run.stdout


def test_cli_runs_without_dataclasses_typing_or_tomllib_imported(tmp_path: Path) -> None:
    """The modules whose import cost was cut stay out of a plain run (a regression here costs
    every command several milliseconds)."""
    (tmp_path / ".confiture").mkdir()
    (tmp_path / "db/schema").mkdir(parents=True)
    (tmp_path / "db/schema/t.sql").write_text("CREATE TABLE t (id int);\n")
    (tmp_path / "confiture.toml").write_text('[project]\nname = "imp"\n[env.local]\n'
                                             'url = "postgresql:///imp"\n')
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import confiture; "
            "code = confiture.main(['scan']); "
            "print(code, sorted(m for m in ('dataclasses', 'inspect', 'typing', 'tomllib', 'shutil') "
            "if m in sys.modules))")
    runs = [subprocess.run([sys.executable, "-S", "-c", code, str(CONFITURE.parent)], cwd=tmp_path,
                           capture_output=True, text=True, check=True) for _ in range(2)]
    for run in runs:  # the config is parsed on every run (no cached copy of it: see read_toml)
        assert run.stdout.strip().splitlines()[-1] == "0 ['tomllib', 'typing']", run.stdout
