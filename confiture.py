#!/usr/bin/env python3
"""confiture.py — the whole PostgreSQL database workflow in one standard-library file.

Build databases from DDL files, cache them as hashed template databases, clone them in
milliseconds, keep seed data out of production, migrate, back up, deploy with automatic
rollback, sync anonymized production data, and detect schema drift. Copy this file into a repository and run
``python confiture.py --help``.

Sections (``grep -n '^# §' confiture.py`` prints this table of contents). Each section uses
only the sections above it.

  §1  Errors and exit codes     one root error type; every expected failure is one of these
  §2  Small utilities           records, natural order, hashing, quoting, files,
                                background calls, console output
  §3  Configuration             confiture.toml → frozen records; environments; safety rules
  §4  Scanning and hashing      the env's file set in build order, sha256 per file and combined;
                                SQL split as psql reads it; the psql meta-command guard;
                                migration files (versions, layouts, checksums)
  §5  PostgreSQL client         the only section that starts psql / pg_dump / pg_restore;
                                advisory locks; Workspace and the database operations later
                                sections share; the migrations tracking table (TrackingTable)
  §6  Build                     concatenated, deterministic SQL for an environment
  §7  Templates and clones      hashed template databases, clone, reset, prune
  §7b Backups                   verified pg_dump backups (sidecar last), list, prune
  §8  Migrations                status, plans, up/down under the lock, one transaction each;
                                bounded lock waits with retry; the env's database as a
                                deploy finds it
  §8b Migration safety: lint    hazard rules per statement, with the target's table sizes
  §8c Running the lint          the env's pending migrations (or FILES) through the rules,
                                with its catalog's facts; the parse cache; the deploy gate
  §9  Restore                   swap-in restore from a verified backup; scratch and replaced
                                copies of the env's database
  §10 Anonymized sync           keyed rules as SQL, streamed COPY, schema-to-schema
  §11 Schema model              the catalog read into records (one JSON round trip), each
                                object with its dependencies from pg_depend
  §12 Schema planner            pure plans that turn one model into another, in dependency
                                order; each kind's create, drop and alter; online variants
  §13 Drift                     schema diff on the models, object by object (owners and
                                grants with --privileges); the template's catalog cached
  §14 Status and watch          the env at a glance; reset on file changes
  §15 Derived migrations        migrate generate (planned, proved on scratch databases),
                                diff --sql, the guard before a protected env is written
  §16 The guard and deploy      every precondition of a destructive run, in one table; deploy:
                                backup, migrate, verify (drift included), record, or roll back;
                                rehearsal of pending migrations on a scratch copy
  §17 Command-line plumbing     App (one run's options, console, configuration), hints,
                                workspace_for; the argparse classes, global options, areas
  §18 Commands                  argparse → values → core calls → output, area by area;
                                build_parser, and main(): errors → messages, exit codes

Core functions take values and raise ConfitureError subclasses; only ``main(argv)`` turns
them into messages and exit codes. Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    NamedTuple,
    NoReturn,
    Self,
    TypeVar,
    dataclass_transform,
)

_T = TypeVar("_T")

__version__ = "0.1.0"
BUILD_FORMAT = 2  # bump when the build output changes meaning: it invalidates every template


# ════════════════════════════════════════════════════════════════════════════════════════════
# §1 Errors and exit codes
# Every expected failure is a ConfitureError carrying its exit code and an optional hint.
# Library code raises; only main() prints and exits.
# ════════════════════════════════════════════════════════════════════════════════════════════

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECK = 3
EXIT_REFUSED = 4
EXIT_LOCKED = 5
EXIT_INTERRUPTED = 130


class ConfitureError(Exception):
    """Root of every expected failure: a one-line message, an exit code and an optional hint."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(ConfitureError):
    """The configuration or the command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class UnsetVariable(ConfigError):
    """A ${VAR} of the configuration is not set in the environment (exit 2)."""


class InputError(ConfitureError):
    """A project file cannot be used (missing folder, bad encoding, symlink loop)."""

    exit_code = EXIT_USAGE


class Refused(ConfitureError):
    """A safety rule refused the operation (exit 4)."""

    exit_code = EXIT_REFUSED


class LockTimeout(ConfitureError):
    """Another run held a lock for longer than we were allowed to wait (exit 5)."""

    exit_code = EXIT_LOCKED


class CheckFailed(ConfitureError):
    """A check found differences or pending work (exit 3)."""

    exit_code = EXIT_CHECK


class PgError(ConfitureError):
    """A PostgreSQL client program or the server reported a failure (exit 1)."""


class ConnectionFailed(PgError):
    """The server could not be reached or refused the connection; `reason` says which
    (SERVER_DOWN, NO_DATABASE, NO_ROLE, AUTH_FAILED, NOT_ALLOWED or OTHER, decided in §5)."""

    def __init__(self, message: str, hint: str | None = None, reason: str = "other") -> None:
        super().__init__(message, hint)
        self.reason = reason


SERVER_DOWN, NO_DATABASE, NO_ROLE = "server down", "no database", "no role"
AUTH_FAILED, NOT_ALLOWED, OTHER = "authentication failed", "not allowed", "other"


class SqlError(PgError):
    """A statement failed; carries SQLSTATE and, for project files, the file and line."""

    def __init__(self, message: str, sqlstate: str = "", location: str = "",
                 hint: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message, hint)
        self.sqlstate = sqlstate
        self.location = location
        self.server_message = message


class Interrupted(ConfitureError):
    """Ctrl-C or SIGTERM; raised after cleanup (exit 130)."""

    exit_code = EXIT_INTERRUPTED


# ════════════════════════════════════════════════════════════════════════════════════════════
# §2 Small utilities
# Pure helpers with no knowledge of configuration or PostgreSQL processes: `record` (cheap
# dataclasses), natural ordering, hashing, SQL quoting,
# durations, path globs, atomic/anonymous/synced files, calls in a background thread, and the
# Console that owns stdout/stderr.
# ════════════════════════════════════════════════════════════════════════════════════════════

# ── records: small value classes ──────────────────────────────────────────────────────────
# Measured (2026-12, Python 3.11, bench/startup.py and an in-process timing of this module's
# body): with `dataclasses` instead, the module body takes 36 ms instead of 1.7 ms (it compiles
# five methods for each of ~70 classes at import) plus 6 ms importing `inspect`: every run
# would start ~40 ms later, doubling `bin/confiture`'s start. So this trick stays. `record`
# gives the same declarations (annotated fields, defaults, `field(...)`, frozen) and compiles
# a class's __init__ only when the first instance is made. `evolve` and `as_dict` stand in
# for dataclasses.replace and dataclasses.asdict.

_NO_DEFAULT: Any = object()


class _Field:
    __slots__ = ("compare", "default", "factory", "repr")

    def __init__(self, default: Any, factory: Callable[[], Any] | None, repr: bool,
                 compare: bool) -> None:
        self.default, self.factory, self.repr, self.compare = default, factory, repr, compare


def field(*, default: Any = _NO_DEFAULT, default_factory: Callable[[], Any] | None = None,
          repr: bool = True, compare: bool = True) -> Any:
    return _Field(default, default_factory, repr, compare)


class FrozenInstanceError(AttributeError):
    pass


@dataclass_transform(field_specifiers=(field,))
def record(*, frozen: bool = False) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: fields are the class's annotations, in order (like @dataclass)."""
    def wrap(cls: type[_T]) -> type[_T]:
        specs: dict[str, _Field] = {}
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 — not inherited ones
        for name in own:
            value = cls.__dict__.get(name, _NO_DEFAULT)
            spec = value if isinstance(value, _Field) else _Field(value, None, True, True)
            if isinstance(value, _Field):
                if spec.default is _NO_DEFAULT:
                    delattr(cls, name)
                else:
                    setattr(cls, name, spec.default)
            specs[name] = spec
        attrs: dict[str, Any] = {
            "__record_fields__": tuple(specs), "__record_specs__": specs,
            "__match_args__": tuple(specs), "__init__": _first_init, "__repr__": _record_repr,
            "__eq__": _record_eq, "__hash__": _record_hash if frozen else None}
        if frozen:
            attrs.update(__setattr__=_frozen_setattr, __delattr__=_frozen_setattr)
        for name, value in attrs.items():
            if name not in cls.__dict__:
                setattr(cls, name, value)
        return cls
    return wrap


def _first_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Compile the real __init__ for this record class, install it, and run it."""
    cls = type(self)
    specs: dict[str, _Field] = cls.__record_specs__
    setter = "_set(self, {0!r}, {0})" if cls.__setattr__ is _frozen_setattr else "self.{0} = {0}"
    params, body, env = [], [], {"_set": object.__setattr__, "_NO_DEFAULT": _NO_DEFAULT}
    for name, spec in specs.items():
        if spec.factory is not None:
            params.append(f"{name}=_NO_DEFAULT")
            env[f"_f_{name}"] = spec.factory
            body.append(f"if {name} is _NO_DEFAULT: {name} = _f_{name}()")
        elif spec.default is not _NO_DEFAULT:
            params.append(f"{name}=_d_{name}")
            env[f"_d_{name}"] = spec.default
        else:
            params.append(name)
        body.append(setter.format(name))
    source = f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body or ["pass"])
    exec(source, env)  # noqa: S102 -- our own field names, checked by Python as identifiers
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    init(self, *args, **kwargs)


def _record_repr(self: Any) -> str:
    shown = (f"{name}={getattr(self, name)!r}"
             for name, spec in self.__record_specs__.items() if spec.repr)
    return f"{type(self).__qualname__}({', '.join(shown)})"


def _compared(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, name) for name, spec in self.__record_specs__.items() if spec.compare)


def _record_eq(self: Any, other: object) -> Any:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _record_hash(self: Any) -> int:
    return hash(_compared(self))


def _frozen_setattr(self: Any, name: str, *value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of frozen {type(self).__name__}")


def evolve(obj: _T, **changes: Any) -> _T:
    """A copy of record `obj` with some fields changed (dataclasses.replace)."""
    values = {name: getattr(obj, name)
              for name in getattr(obj, "__record_fields__")}  # noqa: B009 — unknown to mypy
    values.update(changes)
    return type(obj)(**values)


def as_dict(obj: object) -> dict[str, Any]:
    """Record → plain dict, recursively through records, lists, tuples and dicts."""
    return {name: _plain(getattr(obj, name))
            for name in getattr(obj, "__record_fields__")}  # noqa: B009 — unknown to mypy


def _plain(value: Any) -> Any:
    if hasattr(type(value), "__record_fields__"):
        return as_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key where digit runs compare as numbers: '2_x' < '10_x'."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in _DIGITS.split(text) if part)


def natural_path_key(rel: str) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    """Compare paths folder by folder, each component naturally (folder names repeat across
    a tree's files: each is keyed once)."""
    return tuple(_component_key(part) for part in rel.split("/"))


@functools.cache
def _component_key(part: str) -> tuple[tuple[int, int | str], ...]:
    return natural_key(part)


# hashlib is imported by the first hash, not at start: loading OpenSSL's is ~3 ms of every
# run (python -X importtime), and runs whose caches are warm (status, migrate lint) hash nothing.
if TYPE_CHECKING:
    import hashlib


def sha256(data: bytes = b"") -> hashlib._Hash:
    """A SHA-256 digest object (hashlib's, OpenSSL's implementation)."""
    import hashlib

    return hashlib.sha256(data)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of one input."""
    return sha256(data).hexdigest()


def slugify(text: str, ascii_only: bool = False) -> str:
    """TEXT lowercased, its letters and digits kept (any script), every run of other
    characters one '_': 'Ajout  élément!' → 'ajout_élément'. With `ascii_only`, accents are
    folded first ('ü' → 'u') and letters with no ASCII form dropped: for names that prefix
    database names, which must fit 63 bytes and stay easy to type."""
    import unicodedata

    text = unicodedata.normalize("NFKD" if ascii_only else "NFC", text.lower())
    if ascii_only:
        text = text.encode("ascii", "ignore").decode()
    return re.sub(r"[\W_]+", "_", text).strip("_")


def quote_ident(name: str) -> str:
    """Quote an SQL identifier. Names are always quoted, never interpolated raw."""
    if not name or "\x00" in name:
        raise ConfigError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    if "\x00" in value:
        raise ConfigError("a NUL byte cannot be sent to PostgreSQL")
    return "'" + value.replace("'", "''") + "'"


MAX_IDENT_BYTES = 63


def check_db_name(name: str, what: str = "database name") -> str:
    """Reject names PostgreSQL would silently truncate or cannot hold; return the name."""
    if not name:
        raise ConfigError(f"empty {what}")
    if "\x00" in name:
        raise ConfigError(f"{what} {name!r} contains a NUL byte")
    if len(name.encode()) > MAX_IDENT_BYTES:
        raise ConfigError(f"{what} {name!r} is longer than {MAX_IDENT_BYTES} bytes; "
                          "PostgreSQL would truncate it")
    return name


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*$")


def parse_duration(text: str | float, key: str) -> float:
    """'60s', '500ms', '2m', '1h' or a number of seconds → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{key}: cannot read {text!r} as a duration",
                          hint="write e.g. \"500ms\", \"60s\", \"2m\" or \"1h\"")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob with '**' (any folders), '*' and '?' into a regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Background:
    """A blocking call (one that waits on a child process) running in a thread; result()
    waits for it and re-raises its error. (threading, not concurrent.futures: 15 ms less
    import time on every run.)"""

    def __init__(self, call: Callable[[], Any]) -> None:
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # noqa: BLE001 — handed to the waiting thread by result()
            self._error = exc

    def wait(self) -> None:
        """Wait for the call to end, ignoring its outcome."""
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run blocking calls at the same time; results in order, the first failure re-raised."""
    background = [Background(call) for call in calls[1:]]
    first = [calls[0]()] if calls else []
    return first + [job.result() for job in background]


def pid_alive(text: str) -> bool:
    """Is a process with this id (as text, from a name or file) running on this machine?"""
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (os.fsync releases the GIL: run it beside other work)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scratch_file() -> Any:
    """An anonymous read-write binary file (a child's stderr, say), gone when closed. On Linux
    a memfd: `tempfile` costs ~5 ms to import (it pulls in random and shutil)."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("confiture", os.MFD_CLOEXEC), "w+b")
    import tempfile

    return tempfile.TemporaryFile()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc


@record()
class Console:
    """Owns the process's output: results on stdout, diagnostics and progress on stderr."""

    quiet: bool = False
    verbose: bool = False
    json_mode: bool = False
    color: bool = False
    stdout: Any = field(default=None, repr=False)  # None: sys.stdout at the time of writing
    stderr: Any = field(default=None, repr=False)
    emitted: bool = field(default=False, repr=False)  # a --json document went out already
    warned: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def out(self) -> Any:
        return self.stdout or sys.stdout

    @property
    def err(self) -> Any:
        return self.stderr or sys.stderr

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def result(self, text: str) -> None:
        """A result line on stdout (suppressed in --json mode, where emit() prints)."""
        if not self.json_mode:
            print(text, file=self.out)

    def emit(self, document: Any) -> None:
        """The one JSON document of a --json run."""
        if self.json_mode:
            print(json.dumps(document, indent=2, sort_keys=False, default=str), file=self.out)
            self.emitted = True

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.err)

    def ok(self, text: str) -> None:
        self.info(self._paint("32", "✓ ") + text if self.color else text)

    def debug(self, text: str) -> None:
        if self.verbose:
            print(self._paint("2", text), file=self.err)

    def warn(self, text: str) -> None:
        print(self._paint("33", "warning: ") + text, file=self.err)

    def warn_once(self, text: str) -> None:
        """A warning about the setup, true every time a run meets it: said once per run."""
        if text not in self.warned:
            self.warned.add(text)
            self.warn(text)

    def error(self, text: str, hint: str | None = None) -> None:
        print(self._paint("31", "error: ") + text, file=self.err)
        if hint:
            print(self._paint("2", "hint: ") + hint, file=self.err)

    def is_terminal(self) -> bool:
        return bool(getattr(self.err, "isatty", lambda: False)())


# ════════════════════════════════════════════════════════════════════════════════════════════
# §3 Configuration
# confiture.toml → frozen records, validated once: unknown keys are errors with a
# suggestion, ${VAR} expands from the environment when a value is used. Connection strings
# are parsed here into ConnInfo; environment safety rules (protected envs) live here too.
# ════════════════════════════════════════════════════════════════════════════════════════════

CONFIG_NAME = "confiture.toml"
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_PROJECT_NAME = 24
MAX_ENV_NAME = 16

# Every key the configuration accepts: section → key → expected type(s). Sections whose
# keys are free-form (rule tables) map to None. Later sections add their keys here.
_STR, _BOOL, _INT, _LIST = (str,), (bool,), (int,), (list,)
CONFIG_KEYS: dict[str, dict[str, tuple[type, ...]] | None] = {
    "project": {"name": _STR, "schema": (str, list), "seeds": _STR, "migrations": _STR,
                "generated": _STR, "state_dir": _STR, "default_env": _STR,
                "maintenance_db": _STR, "scratch_url": _STR, "psql_meta_commands": _STR},
    "templates": {"keep": _INT, "strategy": _STR, "lock_timeout": (str, int, float)},
    "migrations": {"table": _STR, "lock_timeout": (str, int, float),
                   "statement_lock_timeout": (str, int, float), "lock_retries": _INT,
                   "lint_enable": _LIST, "lint_disable": _LIST,
                   "baseline_schema": _STR},
    "backups": {"dir": _STR, "keep": _INT, "compression": _INT},
    "deploy": {"verify": _STR, "drift_check": _BOOL, "table": _STR,
               "require_consistent": _BOOL},
    "status": {"max_backup_age": (str, int, float)},
    "env.*": {"url": _STR, "seeds": _LIST, "exclude": _LIST, "protected": _BOOL,
              "backups": _STR, "maintenance_db": _STR},
    "sync": {"from": _STR, "to": _STR, "key": _STR, "strict": _BOOL, "tables": _LIST,
             "exclude": _LIST, "rules": (dict,), "where": (dict,),
             "lock_timeout": (str, int, float)},
    "sync.rules": None,
    "sync.where": None,
}


def suggest(word: str, choices: Sequence[str]) -> str | None:
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value: str, key: str, environ: Mapping[str, str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; '$$' stays a literal '$'. A missing VAR is an error."""

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise UnsetVariable(f"{key}: environment variable {name} is not set",
                          hint=f"export {name}=… or use ${{{name}:-default}}")

    parts = value.split("$$")
    return "$".join(_VAR.sub(repl, part) for part in parts)


# libpq connection parameters that have an environment variable: we hand connections to
# child processes through their environment only, so argv never carries a password.
_PARAM_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
    "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "service": "PGSERVICE", "servicefile": "PGSERVICEFILE", "options": "PGOPTIONS",
    "application_name": "PGAPPNAME", "sslmode": "PGSSLMODE", "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY", "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI", "sslcompression": "PGSSLCOMPRESSION",
    "requiressl": "PGREQUIRESSL", "gssencmode": "PGGSSENCMODE", "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB", "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "channel_binding": "PGCHANNELBINDING", "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION", "require_auth": "PGREQUIREAUTH",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
# Parameters without an environment variable go into a conninfo string on argv: none secret.
ARGV_PARAMS = {"keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                "tcp_user_timeout", "replication", "fallback_application_name"}
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


def _parse_url(url: str) -> dict[str, str]:
    from urllib.parse import unquote  # cheap, but only needed for URLs

    rest = url.split("://", 1)[1]
    query = ""
    if "?" in rest:
        rest, query = rest.split("?", 1)
    netloc, _, path = rest.partition("/")
    params: dict[str, str] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if sep:
            params["password"] = unquote(password)
    hosts, ports = [], []
    for spec in netloc.split(",") if netloc else []:
        if spec.startswith("["):
            host, _, port = spec[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = spec.partition(":")
        hosts.append(unquote(host))
        ports.append(port)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if path:
        params["dbname"] = unquote(path)
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        params[unquote(key)] = unquote(value)
    return params


def _parse_keyvalue(text: str, key: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pattern = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = pattern.match(text, pos)
        if not match:
            raise ConfigError(f"{key}: cannot read connection string near {text[pos:pos + 20]!r}",
                              hint="use a URL (postgresql://user@host/db) or key=value pairs")
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1)] = value
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return params


@record(frozen=True)
class ConnInfo:
    """A parsed connection: libpq parameters, never printed with the password."""

    params: tuple[tuple[str, str], ...]

    @staticmethod
    def parse(text: str, key: str = "url") -> ConnInfo:
        text = text.strip()
        if text.startswith(("postgresql://", "postgres://")):
            params = _parse_url(text)
        elif "://" in text:
            raise ConfigError(f"{key}: unsupported URL scheme in {mask_password_in(text)!r}",
                              hint="URLs start with postgresql://")
        else:
            params = _parse_keyvalue(text, key)
        for name in params:
            if name not in _PARAM_ENV and name not in ARGV_PARAMS:
                raise ConfigError(f"{key}: unknown connection parameter {name!r}",
                                  hint=suggest(name, [*_PARAM_ENV, *ARGV_PARAMS]))
        return ConnInfo(tuple(sorted(params.items())))

    def get(self, name: str) -> str | None:
        return dict(self.params).get(name)

    def with_params(self, **changes: str) -> ConnInfo:
        merged = dict(self.params)
        merged.update(changes)
        return ConnInfo(tuple(sorted(merged.items())))

    def dbname(self, environ: Mapping[str, str] = os.environ) -> str | None:
        return self.get("dbname") or environ.get("PGDATABASE") or None

    def child_env(self, base: Mapping[str, str], dbname: str | None = None) -> dict[str, str]:
        """Environment for a client program: base PG* variables overridden by ours."""
        env = dict(base)
        for name, value in self.params:
            if name in _PARAM_ENV:
                env[_PARAM_ENV[name]] = value
        if dbname is not None:
            env["PGDATABASE"] = dbname
        env.setdefault("PGAPPNAME", "confiture")
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        return env

    def argv_conninfo(self) -> list[str]:
        """Extra conninfo for parameters that have no environment variable (never secret)."""
        extra = [f"{name}={value}" for name, value in self.params if name in ARGV_PARAMS]
        return ["-d", " ".join(extra)] if extra else []

    def server_identity(self, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
        """(host, port) with libpq defaults; all local addresses fold to 'local' (fail closed)."""
        host = self.get("host") or environ.get("PGHOST", "")
        port = self.get("port") or environ.get("PGPORT", "5432")
        if host.startswith(("/", "@")) or host in _LOCAL_HOSTS:
            host = "local"
        return host.lower(), port

    def passfile_password(self, dbname: str, user: str,
                          environ: Mapping[str, str] = os.environ) -> str | None:
        """The password libpq would take from the password file (passfile, $PGPASSFILE or
        ~/.pgpass) for this connection as `user` to `dbname`; None when no line matches.
        A unix-socket connection matches host `localhost` too, as libpq's default one does."""
        path = self.get("passfile") or environ.get("PGPASSFILE") or str(Path.home() / ".pgpass")
        host = self.get("host") or environ.get("PGHOST") or "localhost"
        hosts = {host, "localhost"} if host.startswith("/") else {host}
        port = self.get("port") or environ.get("PGPORT") or "5432"
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            fields = [f.replace("\\:", ":").replace("\\\\", "\\")
                      for f in re.split(r"(?<!\\):", line, maxsplit=4)]
            if len(fields) != 5:
                continue
            wanted = (hosts, {port}, {dbname}, {user})
            if all(f == "*" or f in w for f, w in zip(fields[:4], wanted, strict=True)):
                return fields[4]
        return None

    def display(self, environ: Mapping[str, str] = os.environ) -> str:
        """A URL for humans: no password, defaults filled in."""
        from urllib.parse import quote

        user = self.get("user") or environ.get("PGUSER", "")
        host = self.get("host") or environ.get("PGHOST", "")
        port = self.get("port") or environ.get("PGPORT", "")
        db = self.dbname(environ) or ""
        auth = f"{quote(user)}{':***' if self.get('password') else ''}@" if user else ""
        if host.startswith("/"):
            where = f"/{quote(db)}?host={quote(host, safe='')}" + (f"&port={port}" if port else "")
            return f"postgresql://{auth}{where}"
        return f"postgresql://{auth}{host}{':' + port if port else ''}/{quote(db)}"


def mask_password_in(text: str, password: str | None = None) -> str:
    """Text safe to show: `password` (a connection's, when known) and passwords written in
    URLs or key=value strings replaced by ***. The one place secrets are scrubbed."""
    if password:
        text = text.replace(password, "***")
    text = re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


@record(frozen=True)
class SchemaSource:
    """One folder of DDL; several sources (even from other checkouts) are built in order."""

    name: str
    path: Path


@record(frozen=True)
class EnvConfig:
    name: str
    url: str  # unexpanded: ${VAR} is expanded when the env is used
    seeds: tuple[str, ...]
    exclude: tuple[str, ...]
    protected: bool
    backups: str | None
    maintenance_db: str | None


@record(frozen=True)
class SyncConfig:
    """[sync] as written: §10 turns patterns and rules into SQL (and checks them when the
    CLI loads the configuration). The key stays unexpanded: its ${VAR} is read at use."""

    source: str | None = None
    target: str | None = None
    key: str | None = field(default=None, repr=False)
    strict: bool = True
    tables: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[tuple[str, Any], ...] = ()    # (pattern, rule value) in file order
    where: tuple[tuple[str, str], ...] = ()    # (table pattern, SQL condition)
    lock_timeout: float = 60.0
    written: str = "{}"          # [sync] without its key, as canonical JSON (hashed by §10)


@record(frozen=True)
class Config:
    path: Path
    root: Path
    project: str
    schema: tuple[SchemaSource, ...]
    seeds_dir: Path
    migrations_dir: Path
    generated_dir: Path
    state_dir: Path
    default_env: str
    maintenance_db: str
    templates_keep: int
    template_strategy: str
    template_lock_timeout: float
    migrations_table: str
    migrations_lock_timeout: float
    backups_dir: str
    backups_keep: int
    backups_compression: int         # pg_dump -Z level, 0–9
    deploy_verify: Path
    deploy_drift_check: bool
    deploys_table: str
    max_backup_age: float | None     # [status]: older (or no) backups need attention
    sync: SyncConfig
    envs: Mapping[str, EnvConfig]
    scratch_url: str | None = None  # unexpanded, like env urls; see scratch_server()
    deploy_require_consistent: bool = True   # §15's guard before a protected env is written
    migrations_baseline: Path | None = None  # the schema the first migration starts from
    psql_meta_commands: str = "safe"  # "all": SQL files may reach the client (§4 guard_sql)
    # None: unset, i.e. 5 s on protected envs and none elsewhere (see statement_lock_timeout)
    migrations_statement_lock_timeout: float | None = None
    migrations_lock_retries: int = 5
    lint_enable: tuple[str, ...] = ()
    lint_disable: tuple[str, ...] = ()


@record(frozen=True)
class Env:
    """A resolved environment: its configuration plus an expanded, parsed connection."""

    config: Config
    spec: EnvConfig
    conn: ConnInfo
    database: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def protected(self) -> bool:
        return self.spec.protected

    @property
    def maintenance_db(self) -> str:
        return self.spec.maintenance_db or self.config.maintenance_db


def find_config(explicit: str | None, environ: Mapping[str, str], cwd: Path) -> Path:
    """--config, else $CONFITURE_CONFIG, else ./confiture.toml searched upward to the repo root."""
    if explicit or environ.get("CONFITURE_CONFIG"):
        path = Path(explicit or environ["CONFITURE_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    for folder in (cwd, *cwd.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
        if (folder / ".git").exists():
            break
    raise ConfigError(f"no {CONFIG_NAME} in {cwd} or its parents (up to the repository root)",
                      hint="run 'confiture.py init' to create one, or pass --config PATH")


def _check_keys(table: Mapping[str, Any], section: str, where: str) -> None:
    known = CONFIG_KEYS[section]
    if known is None:
        return
    for key, value in table.items():
        sub = f"{section}.{key}"
        if key not in known:
            if isinstance(value, dict) and sub in CONFIG_KEYS:
                continue
            raise ConfigError(f"{where}: unknown key [{section.replace('*', '…')}] {key!r}",
                              hint=suggest(key, list(known)))
        expected = known[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"{where}: [{section.replace('*', '…')}] {key} must be {names}, "
                              f"not {type(value).__name__}")


def _validate_tables(data: Mapping[str, Any], where: str) -> None:
    for section, table in data.items():
        if section == "env":
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [env] must hold tables like [env.local]")
            for env_name, env_table in table.items():
                if not isinstance(env_table, dict):
                    raise ConfigError(f"{where}: env.{env_name} must be a table")
                _check_keys(env_table, "env.*", f"{where} [env.{env_name}]")
            continue
        if section not in CONFIG_KEYS or "." in section:
            raise ConfigError(f"{where}: unknown section [{section}]",
                              hint=suggest(section, [s for s in CONFIG_KEYS if "." not in s]
                                            + ["env"]))
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        _check_keys(table, section, where)
        for key, value in table.items():
            if isinstance(value, dict) and f"{section}.{key}" in CONFIG_KEYS:
                _check_keys(value, f"{section}.{key}", where)


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of strings")
    return tuple(value)


def _schema_sources(value: Any, root: Path, where: str,
                    environ: Mapping[str, str]) -> tuple[SchemaSource, ...]:
    items = [value] if isinstance(value, str) else value
    sources: list[SchemaSource] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            path, name = item, None
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            unknown = set(item) - {"path", "name"}
            if unknown:
                raise ConfigError(f"{where}: project.schema[{index}]: unknown key "
                                  f"{min(unknown)!r}", hint="entries take 'path' and 'name'")
            path, name = item["path"], item.get("name")
        else:
            raise ConfigError(f"{where}: project.schema[{index}] must be a folder path or "
                              "{ path = \"…\", name = \"…\" }")
        folder = (root / expand_vars(path, "project.schema", environ)).resolve()
        if name is None:
            try:
                name = folder.relative_to(root.resolve()).as_posix()
            except ValueError:
                name = folder.name
        if any(s.name == name for s in sources):
            raise ConfigError(f"{where}: two schema sources are named {name!r}",
                              hint="give each a distinct name = \"…\"")
        sources.append(SchemaSource(name=name, path=folder))
    if not sources:
        raise ConfigError(f"{where}: project.schema lists no folder")
    return tuple(sources)


def parse_table_name(text: str, key: str = "migrations.table") -> tuple[str | None, str]:
    """'t', 's.t', '"My Schema"."T"' → (schema or None, table); unquoted parts fold to lower case
    as PostgreSQL folds them."""
    parts: list[str] = []
    pos = 0
    pattern = re.compile(r'\s*(?:"((?:[^"]|"")+)"|([^".\s]+))\s*(\.|$)')
    while pos < len(text):
        match = pattern.match(text, pos)
        if not match:
            raise ConfigError(f"{key}: cannot read {text!r} as [schema.]table")
        parts.append(match.group(1).replace('""', '"') if match.group(1) else match.group(2).lower())
        pos = match.end()
        if match.group(3) == "." and not text[pos:].strip():
            raise ConfigError(f"{key}: {text!r} ends with a dot")
        if match.group(3) == "" or pos >= len(text):
            break
    if not 1 <= len(parts) <= 2:
        raise ConfigError(f"{key}: {text!r} must be table or schema.table")
    for part in parts:
        check_db_name(part, f"{key} name")
    if key == "migrations.table":  # the tracking table's log is <table>_log
        check_db_name(parts[-1] + "_log", "migrations.table name (+ '_log')")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file. Raises OSError, UnicodeDecodeError, or ValueError for bad TOML.
    (Nothing is kept of it: a parsed copy would put a password written in a 0600 file into
    another file, and saved ~3 ms a run only on the bytecode-cached path.)"""
    return tomllib.loads(path.read_bytes().decode("utf-8"))


def remove_old_config_copy(path: Path) -> None:
    """Delete the parsed copy of confiture.toml that versions up to 0.1.0 kept (0644, with any
    password written in the file) in .confiture/cache/. Best effort: a read-only checkout."""
    try:
        (path.parent / ".confiture" / "cache" / f"{path.name}.json").unlink(missing_ok=True)
    except OSError:
        pass


def _at_least(low: int, high: int | None = None) -> Callable[[Any, str], object]:
    def check(value: Any, key: str) -> None:
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{key} must be " + (f"{low}–{high}" if high is not None
                                                   else f"at least {low}") + f", not {value}")
    return check


def _one_of(*choices: str) -> Callable[[Any, str], object]:
    def check(value: Any, key: str) -> None:
        if value not in choices:
            raise ConfigError(f"{key} must be " + " or ".join(map(repr, choices))
                              + f", not {value!r}", hint=suggest(str(value), choices))
    return check


# The ids of §8b's lint rules (LINT_RULES; tests/test_lint.py checks that both agree). They
# are named here because the config names them: a misspelt id in lint_enable / lint_disable
# is refused when the config loads, not found out when a deploy's lint runs.
LINT_RULE_NAMES = (
    "create-index-not-concurrent", "drop-index-not-concurrent", "constraint-not-valid",
    "set-not-null", "rewriting-type-change", "volatile-default", "unique-without-index",
    "drop-table", "drop-column", "truncate", "rename-table", "rename-column", "vacuum-full",
    "cluster", "lock-table", "reindex-not-concurrent", "enum-add-value-in-transaction",
    "concurrently-in-transaction", "missing-lock-timeout", "ddl-with-data-update",
    "prefer-identity", "prefer-timestamptz", "prefer-text", "avoid-money", "unknown-allow")


def _rule_ids(value: Any, key: str) -> None:
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of lint rule ids")
    for name in value:
        if name not in LINT_RULE_NAMES:
            raise ConfigError(f"{key}: no lint rule {name!r}",
                              hint=suggest(name, LINT_RULE_NAMES)
                              or "see 'confiture.py migrate lint --rules'")


# Values with a range or a grammar (CONFIG_KEYS checks their types): (section, key) → a check
# that raises ConfigError naming the key. All run when the config loads, whatever the command,
# so `config check` finds what `backup` or `deploy` would trip over later.
_VALUE_CHECKS: dict[tuple[str, str], Callable[[Any, str], object]] = {
    ("project", "psql_meta_commands"): _one_of("safe", "all"),
    ("templates", "keep"): _at_least(1),
    ("templates", "lock_timeout"): parse_duration,
    ("migrations", "table"): parse_table_name,
    ("migrations", "lock_timeout"): parse_duration,
    ("migrations", "statement_lock_timeout"): parse_duration,
    ("migrations", "lock_retries"): _at_least(0),
    ("migrations", "lint_enable"): _rule_ids,
    ("migrations", "lint_disable"): _rule_ids,
    ("backups", "keep"): _at_least(1),
    ("backups", "compression"): _at_least(0, 9),
    ("deploy", "table"): parse_table_name,
    ("status", "max_backup_age"): parse_duration,
    ("sync", "lock_timeout"): parse_duration,
}


def _check_values(data: Mapping[str, Any], where: str) -> None:
    for (section, key), check in _VALUE_CHECKS.items():
        value = data.get(section, {}).get(key)
        if value is not None:
            try:
                check(value, f"{section}.{key}")
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
    sync = data.get("sync", {})
    for key in ("from", "to"):
        name = sync.get(key)
        if name is not None and name not in data.get("env", {}):
            raise ConfigError(f"{where}: sync.{key} {name!r} is not a configured environment",
                              hint=suggest(name, list(data.get("env", {}))))


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate confiture.toml; every later step takes the returned Config. `environ`
    expands the ${VAR}s of project.schema (URLs and the sync key are expanded at use)."""
    where = str(path)
    remove_old_config_copy(path)
    data = _read_config_file(path, where)
    _validate_tables(data, where)
    _check_values(data, where)
    root = path.resolve().parent
    project = data.get("project", {})
    templates = data.get("templates", {})
    migrations = data.get("migrations", {})
    backups = data.get("backups", {})
    deploy = data.get("deploy", {})
    envs = _parse_envs(data.get("env", {}), where)
    return Config(
        path=path.resolve(), root=root, project=_project_name(project, root, where),
        schema=_schema_sources(project.get("schema", ["db/schema"]), root, where, environ),
        seeds_dir=root / project.get("seeds", "db/seeds"),
        migrations_dir=root / project.get("migrations", "db/migrations"),
        generated_dir=root / project.get("generated", "db/generated"),
        state_dir=root / project.get("state_dir", ".confiture"),
        default_env=_default_env(project, envs, where),
        maintenance_db=project.get("maintenance_db", "postgres"),
        templates_keep=templates.get("keep", 3),
        template_strategy=_template_strategy(templates, where),
        template_lock_timeout=parse_duration(templates.get("lock_timeout", "10m"),
                                             "templates.lock_timeout"),
        migrations_table=migrations.get("table", "confiture_migrations"),
        migrations_lock_timeout=parse_duration(migrations.get("lock_timeout", "60s"),
                                               "migrations.lock_timeout"),
        backups_dir=backups.get("dir", ".confiture/backups"),
        backups_keep=backups.get("keep", 10),
        backups_compression=backups.get("compression", 1),
        deploy_verify=root / deploy.get("verify", "db/verify"),
        deploy_drift_check=deploy.get("drift_check", False),
        deploys_table=deploy.get("table", "confiture_deploys"),
        max_backup_age=_max_backup_age(data.get("status", {})),
        sync=_parse_sync(data.get("sync", {}), where),
        envs=envs, scratch_url=_checked_scratch_url(project.get("scratch_url"), where),
        deploy_require_consistent=deploy.get("require_consistent", True),
        migrations_baseline=root / migrations["baseline_schema"]
        if "baseline_schema" in migrations else None,
        psql_meta_commands=project.get("psql_meta_commands", "safe"),
        **_migration_safety_keys(migrations))


def _read_config_file(path: Path, where: str) -> dict[str, Any]:
    try:
        return read_toml(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc


def _project_name(project: Mapping[str, Any], root: Path, where: str) -> str:
    name = str(project.get("name") or root.name.lower().replace("-", "_"))
    if not NAME_RE.match(name) or len(name) > MAX_PROJECT_NAME:
        raise ConfigError(f"{where}: project.name {name!r} must be lowercase letters, digits "
                          f"and _ (at most {MAX_PROJECT_NAME}), starting with a letter or _",
                          hint="it prefixes template and database names")
    return name


def _parse_envs(tables: Mapping[str, Any], where: str) -> dict[str, EnvConfig]:
    envs: dict[str, EnvConfig] = {}
    for env_name, table in tables.items():
        if not NAME_RE.match(env_name) or len(env_name) > MAX_ENV_NAME:
            raise ConfigError(f"{where}: environment name {env_name!r} must be lowercase "
                              f"letters, digits and _ (at most {MAX_ENV_NAME})")
        envs[env_name] = EnvConfig(
            name=env_name, url=table.get("url", ""),
            seeds=_str_list(table.get("seeds", []), f"env.{env_name}.seeds"),
            exclude=_str_list(table.get("exclude", []), f"env.{env_name}.exclude"),
            protected=table.get("protected", False), backups=table.get("backups"),
            maintenance_db=table.get("maintenance_db"))
        if envs[env_name].protected and envs[env_name].seeds:
            raise ConfigError(
                f"{where}: env.{env_name} is protected but selects seed sets "
                f"{list(envs[env_name].seeds)}",
                hint="seed and test data never go to a protected environment; remove 'seeds'")
    return envs


def _default_env(project: Mapping[str, Any], envs: Mapping[str, EnvConfig], where: str) -> str:
    default_env = str(project.get("default_env", "local"))
    if envs and default_env not in envs:
        raise ConfigError(f"{where}: project.default_env {default_env!r} is not a configured "
                          "environment", hint=suggest(default_env, list(envs)))
    return default_env


def _template_strategy(templates: Mapping[str, Any], where: str) -> str:
    strategy = str(templates.get("strategy", "auto"))
    if strategy not in ("auto", "wal_log", "file_copy"):
        raise ConfigError(f"{where}: templates.strategy must be auto, wal_log or file_copy")
    return strategy


def _max_backup_age(status: Mapping[str, Any]) -> float | None:
    value = status.get("max_backup_age")
    return None if value is None else parse_duration(value, "status.max_backup_age")


def _parse_sync(table: Mapping[str, Any], where: str) -> SyncConfig:
    """[sync] → SyncConfig; its patterns and rules are read by §10 (sync_settings_errors)."""
    conditions = []
    for text, condition in table.get("where", {}).items():
        if not isinstance(condition, str) or not condition.strip():
            raise ConfigError(f"{where} [sync].where {text!r} must be an SQL condition string")
        conditions.append((text, condition.strip()))
    public = {k: v for k, v in table.items() if k != "key"}
    return SyncConfig(
        source=table.get("from"), target=table.get("to"), key=table.get("key"),
        strict=table.get("strict", True),
        tables=_str_list(table.get("tables", []), "sync.tables"),
        exclude=_str_list(table.get("exclude", []), "sync.exclude"),
        rules=tuple(table.get("rules", {}).items()), where=tuple(conditions),
        lock_timeout=parse_duration(table.get("lock_timeout", "60s"), "sync.lock_timeout"),
        written=json.dumps(public, sort_keys=True, default=str))


def _checked_scratch_url(value: str | None, where: str) -> str | None:
    """project.scratch_url is parsed at load unless it holds ${VAR}s (expanded when used)."""
    if value is not None and "${" not in value:
        try:
            ConnInfo.parse(value, "project.scratch_url")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
    return value


def _migration_safety_keys(migrations: Mapping[str, Any]) -> dict[str, Any]:
    """[migrations] statement_lock_timeout, lock_retries, lint_enable, lint_disable."""
    timeout = migrations.get("statement_lock_timeout")  # checked by _VALUE_CHECKS
    retries = migrations.get("lock_retries", 5)
    return {"migrations_statement_lock_timeout": None if timeout is None else parse_duration(
                timeout, "migrations.statement_lock_timeout"),
            "migrations_lock_retries": retries,
            "lint_enable": tuple(migrations.get("lint_enable", ())),
            "lint_disable": tuple(migrations.get("lint_disable", ()))}


def resolve_env_name(config: Config, requested: str | None, environ: Mapping[str, str]) -> str:
    """--env, else $CONFITURE_ENV, else project.default_env, else 'local'."""
    name = requested or environ.get("CONFITURE_ENV") or config.default_env
    if name not in config.envs:
        known = ", ".join(sorted(config.envs)) or "none"
        raise ConfigError(f"unknown environment {name!r} (configured: {known})",
                          hint=suggest(name, list(config.envs)))
    return name


def resolve_env(config: Config, name: str, environ: Mapping[str, str] = os.environ) -> Env:
    """Expand the env's URL and apply the safety rules that need it."""
    if name not in config.envs:
        raise ConfigError(f"unknown environment {name!r}", hint=suggest(name, list(config.envs)))
    spec = config.envs[name]
    conn = ConnInfo.parse(expand_vars(spec.url, f"env.{name}.url", environ), f"env.{name}.url")
    database = conn.dbname(environ)
    if not database:
        raise ConfigError(f"env.{name}.url names no database",
                          hint="add it to the URL (postgresql://host/DBNAME) or set PGDATABASE")
    check_db_name(database, f"env.{name} database")
    env = Env(config=config, spec=spec, conn=conn, database=database)
    if not spec.protected:
        _refuse_alias_of_protected(config, env, environ)
    return env


def _refuse_alias_of_protected(config: Config, env: Env, environ: Mapping[str, str]) -> None:
    """An unprotected env must not reach a protected env's database under another name."""
    mine = (*env.conn.server_identity(environ), env.database)
    for other in config.envs.values():
        if not other.protected or other.name == env.name:
            continue
        try:
            conn = ConnInfo.parse(expand_vars(other.url, f"env.{other.name}.url", environ))
        except ConfigError:
            continue  # its URL is not resolvable here, so it cannot be the same target
        theirs = (*conn.server_identity(environ), conn.dbname(environ))
        if mine == theirs:
            raise ConfigError(
                f"env.{env.name} points at the same database as protected env.{other.name} "
                f"({env.database} on {mine[0]}:{mine[1]})",
                hint=f"mark env.{env.name} protected, or point it at another database")


@record(frozen=True)
class ScratchServer:
    """Where an env's throwaway databases (expected schemas, scratch copies) are created:
    `conn` reaches the server, `maintenance_db` is where CREATE/DROP DATABASE are sent, and
    `origin` names the setting that chose it (for messages)."""

    conn: ConnInfo
    maintenance_db: str
    origin: str


def scratch_server(config: Config, env_name: str,
                   environ: Mapping[str, str] = os.environ) -> ScratchServer:
    """The server for an env's scratch work. An unprotected env uses its own server. A
    protected env never gets a database created on its server (a read-only role there must be
    enough to inspect it): it uses [project] scratch_url, else the server of the project's
    default_env when that env is unprotected; otherwise the work is refused (exit 4)."""
    spec = config.envs[env_name]
    if not spec.protected:
        env = resolve_env(config, env_name, environ)
        return ScratchServer(env.conn, env.maintenance_db, f"env {env_name!r}'s own server")
    if config.scratch_url is not None:
        key = "project.scratch_url"
        conn = ConnInfo.parse(expand_vars(config.scratch_url, key, environ), key)
        return ScratchServer(conn, conn.get("dbname") or config.maintenance_db, key)
    hint = ("set [project] scratch_url to a server where databases may be created "
            "(a local or CI server); the expected schema is built there")
    default = config.envs.get(config.default_env)
    if default is None or default.protected:
        raise Refused(f"env {env_name!r} is protected and no scratch server is configured: "
                      "its expected schema is never built on its own server", hint=hint)
    try:
        env = resolve_env(config, default.name, environ)
    except ConfigError as exc:
        raise Refused(f"env {env_name!r} is protected and the scratch server (the server of "
                      f"default env {default.name!r}) is not usable: {exc.message}",
                      hint=hint) from None
    return ScratchServer(env.conn, env.maintenance_db, f"the server of default env {default.name!r}")


def confirm_protected(env: Env, action: str, yes: bool, console: Console,
                      stdin: Any = None) -> None:
    """Protected envs need --yes, and on a terminal the env's name typed back (SPEC §5)."""
    if not env.protected:
        return
    stdin = stdin or sys.stdin
    interactive = bool(getattr(stdin, "isatty", lambda: False)())
    if not yes:
        raise Refused(f"{action} on protected environment {env.name!r} needs --yes",
                      hint=f"re-run with --yes{' and type the name' if interactive else ''}")
    if interactive:
        console.info(f"{action} on protected environment {env.name!r} ({env.conn.display()}).")
        console.err.write("Type the environment name to continue: ")
        console.err.flush()
        answer = stdin.readline().strip()
        if answer != env.name:
            raise Refused(f"{action} cancelled: typed {answer!r}, expected {env.name!r}")


def refuse_protected(env: Env, action: str) -> None:
    """Operations that are never allowed on a protected env (reset, clone over it, watch…)."""
    if env.protected:
        raise Refused(f"{action} is refused on protected environment {env.name!r}",
                      hint="protected environments are only changed by migrate/deploy/restore")


# ════════════════════════════════════════════════════════════════════════════════════════════
# §4 Scanning and hashing
# The env's file set: schema sources in order, then its seed sets in listed order, minus its
# exclude globs; files in natural path order; sha256 per file and a combined hash. SQL is
# split as psql's lexer splits it, and every project file that will run passes the
# meta-command guard (guard_sql). Migration files too (builds record them, §8 runs them).
# Pure filesystem work: no database, no processes.
# ════════════════════════════════════════════════════════════════════════════════════════════


@record(frozen=True)
class SqlFile:
    path: Path      # absolute, as found (symlinks not resolved, for messages)
    rel: str        # stable display path: "<source name>/<path in source>"
    kind: str       # "schema", "seed", or "migration" (hashed, recorded as applied, not run)
    sha256: str
    size: int


@record(frozen=True)
class FileSet:
    env: str
    files: tuple[SqlFile, ...]
    hash: str
    seeds: bool

    def by_kind(self, kind: str) -> tuple[SqlFile, ...]:
        return tuple(f for f in self.files if f.kind == kind)


def walk_sql_files(top: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every *.sql below top, natural order; hidden entries skipped.
    Symlinked folders are followed; a symlink that leads back into its own ancestry is an
    error, not a hang."""
    found: list[tuple[str, Path]] = []

    def visit(folder: Path, rel: str, ancestors: tuple[str, ...]) -> None:
        real = os.path.realpath(folder)
        if real in ancestors:
            raise InputError(f"symlink loop: {folder} leads back to {real}",
                             hint="remove the link or point it outside its own folder")
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise InputError(f"cannot read folder {folder}: {exc.strerror}") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as exc:
                raise InputError(f"cannot read {entry.path}: {exc.strerror}") from exc
            if is_dir:
                visit(Path(entry.path), child_rel, (*ancestors, real))
            elif is_file and entry.name.endswith(".sql"):
                found.append((child_rel, Path(entry.path)))
            elif entry.is_symlink() and not os.path.exists(entry.path) \
                    and entry.name.endswith(".sql"):
                raise InputError(f"broken symlink {entry.path}")

    visit(top, "", ())
    found.sort(key=lambda item: natural_path_key(item[0]))
    return found


class ChecksumCache:
    """What was computed from files (checksums), keyed by what any write changes: size, mtime,
    ctime and inode. Only read-only reports use it (`migrate status`, `status`, `diff` naming
    the template to compare with); every command that writes or builds reads and hashes each
    file. An entry is stored only when the file's ctime is more than two seconds old, so a
    write in the same timestamp tick as our read cannot hide. `width`: values per entry."""

    FORMAT = 1

    def __init__(self, path: Path, width: int) -> None:
        self.path, self.width = path, width
        self.now_ns = time.time_ns()
        self.entries: dict[str, list[Any]] = {}
        self.seen: set[str] = set()
        self.dirty = False
        try:
            data = json.loads(path.read_bytes())
            if isinstance(data, dict) and data.get("format") == self.FORMAT \
                    and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache, or a broken one: start afresh

    def lookup(self, path: str) -> tuple[list[int], list[Any] | None]:
        """(stat key, the values stored for the file when the cache still holds it)."""
        self.seen.add(path)
        try:
            st = os.stat(path)
        except OSError:
            return [], None
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self.entries.get(path)
        if isinstance(hit, list) and len(hit) == 4 + self.width and hit[:4] == key:
            return key, hit[4:]
        return key, None

    def store(self, path: str, key: list[int], *values: Any) -> None:
        if key and key[2] < self.now_ns - 2_000_000_000:
            self.entries[path] = [*key, *values]
            self.dirty = True

    def save(self) -> None:
        gone = set(self.entries) - self.seen
        if not (self.dirty or gone):
            return
        files = {p: e for p, e in self.entries.items() if p in self.seen}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"format": self.FORMAT, "files": files}).encode())
        except (OSError, InputError):
            pass  # a read-only checkout: stay correct, just slower


def read_sql_file(path: Path | str, rel: str) -> bytes:
    try:
        with open(path, "rb", buffering=0) as handle:  # unbuffered: one read of the whole file
            data = handle.readall()
    except OSError as exc:
        raise InputError(f"cannot read {rel}: {exc.strerror}") from exc
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{rel}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                         hint="convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from exc
    return data


def _excluded(rel_paths: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> bool:
    return any(p.match(rel) for p in patterns for rel in rel_paths)


# Over 60 lines: a nested `add` keeps the exclude globs and the cache in one place for the
# schema sources and the seed sets.
def scan_env(config: Config, env_name: str, seeds: bool = True,
             read: Callable[[Path, str], bytes] = read_sql_file,
             cache: ChecksumCache | None = None) -> FileSet:
    """The env's files in build order with their hashes. With `cache` (read-only reports
    only, see ChecksumCache), unchanged files are not read again."""
    spec = config.envs[env_name]
    patterns = [glob_regex(p) for p in spec.exclude]
    files: list[SqlFile] = []

    def add(top: Path, prefix: str, kind: str) -> None:
        try:
            top_rel: str | None = top.relative_to(config.root).as_posix()
        except ValueError:
            top_rel = None
        for rel, path in walk_sql_files(top):
            display = f"{prefix}/{rel}"
            project_rel = display if top_rel is None else rel if top_rel == "." \
                else f"{top_rel}/{rel}"
            if _excluded((rel, display, project_rel), patterns):
                continue
            key, hit = cache.lookup(str(path)) if cache is not None else ([], None)
            if hit is not None:
                digest, size = str(hit[0]), key[0]
            else:
                data = read(path, display)
                digest, size = sha256_bytes(data), len(data)
                if cache is not None:
                    cache.store(str(path), key, digest)
            files.append(SqlFile(path=path, rel=display, kind=kind, sha256=digest, size=size))

    for source in config.schema:
        if not source.path.is_dir():
            raise InputError(f"schema folder {source.path} does not exist",
                             hint="check [project] schema in " + str(config.path))
        before = len(files)
        add(source.path, source.name, "schema")
        if len(files) == before:
            raise InputError(f"schema folder {source.path} holds no .sql files"
                             + (" (after exclude)" if spec.exclude else ""))
    if seeds:
        for seed_set in spec.seeds:
            folder = config.seeds_dir / seed_set
            if not folder.is_dir():
                raise InputError(f"env.{env_name}: seed set {seed_set!r} not found at {folder}")
            try:
                prefix = folder.relative_to(config.root).as_posix()
            except ValueError:
                prefix = f"seeds/{seed_set}"
            add(folder, prefix, "seed")
    if config.migrations_dir.is_dir():
        # A database built from the DDL is where every migration leads: the build records
        # them as applied, so they are inputs of the template (not part of its SQL).
        try:
            prefix = config.migrations_dir.relative_to(config.root).as_posix()
        except ValueError:
            prefix = "migrations"
        add(config.migrations_dir, prefix, "migration")
    if cache is not None:
        cache.save()
    return FileSet(env=env_name, files=tuple(files), hash=combined_hash(files, seeds),
                   seeds=seeds)


def scan_cache(config: Config, env_name: str, seeds: bool) -> ChecksumCache:
    """The file-checksum cache of one env's scan (one per env and seed choice: a scan drops the
    entries of files it did not see)."""
    name = f"files-{env_name}{'' if seeds else '-schema-only'}.json"
    return ChecksumCache(config.state_dir / "cache" / name, 1)


def combined_hash(files: Sequence[SqlFile], seeds: bool = True) -> str:
    """Hash of the build inputs: format version, seed selection, paths and contents in order."""
    digest = sha256(f"confiture-build-v{BUILD_FORMAT}\nseeds={seeds}\n".encode())
    for item in files:
        digest.update(f"{item.kind}\0{item.rel}\0{item.sha256}\n".encode())
    return digest.hexdigest()


# ── SQL splitting: what psql's lexer sees as statement boundaries ─────────────────────────

@record(frozen=True)
class Statement:
    text: str                # as written (leading comments kept, trailing blanks cut)
    line: int                # line of its first character in the file
    words: tuple[str, ...]   # first keywords, upper-cased (strings and comments skipped)
    meta: bool = False       # a psql backslash command


_SQL_SPECIAL = re.compile(r"""(?x)
    (?P<semi>;) | (?P<open>\() | (?P<close>\)) | (?P<line>--) | (?P<block>/\*)
  | (?P<estr>(?<![\w$])[Ee]') | (?P<str>') | (?P<ident>")
  | (?P<dollar>(?<![\w$])\$(?:[^\W\d]\w*)?\$) | (?P<meta>\\)""")
_STR_BODY = re.compile(r"[^']*(?:''[^']*)*'")
_ESTR_BODY = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.DOTALL)
_IDENT_BODY = re.compile(r'[^"]*(?:""[^"]*)*"')
_BLOCK_EDGE = re.compile(r"/\*|\*/")
_WORD = re.compile(r"[^\W\d][\w$]*|[()]")
_COPY_STDIN = re.compile(r"^\s*COPY\b.*\bFROM\s+STDIN\b", re.IGNORECASE | re.DOTALL)
_COPY_END = re.compile(r"^\\\.[ \t\r]*$", re.MULTILINE)


def skip_block_comment(text: str, pos: int) -> int:
    depth = 1
    for match in _BLOCK_EDGE.finditer(text, pos):
        depth += 1 if match.group() == "/*" else -1
        if depth == 0:
            return match.end()
    return len(text)


def _keywords(code: str, limit: int = 6) -> tuple[str, ...]:
    words: list[str] = []
    for match in _WORD.finditer(code):
        if match.group() not in "()":
            words.append(match.group().upper())
            if len(words) == limit:
                break
    return tuple(words)


def _inside_routine_body(code: str, head: tuple[str, ...]) -> bool:
    """psql's heuristic: in CREATE [OR REPLACE] FUNCTION|PROCEDURE, a ';' between BEGIN (ATOMIC)
    and its END does not end the statement. `head`: the first keywords of `code`."""
    if not head or head[0] != "CREATE" or not (
            head[1:2] in (("FUNCTION",), ("PROCEDURE",))
            or (head[1:3] == ("OR", "REPLACE") and head[3:4] in (("FUNCTION",), ("PROCEDURE",)))):
        return False
    parens = depth = 0
    for match in _WORD.finditer(code):
        word = match.group().upper()
        if word == "(":
            parens += 1
        elif word == ")":
            parens = max(parens - 1, 0)
        elif parens == 0:
            if word == "BEGIN" or (word == "CASE" and depth >= 1):
                depth += 1
            elif word == "END" and depth > 0:
                depth -= 1
    return depth > 0


# Over 60 lines: one scanner loop with its two small closures (line numbers, emitting a
# statement); psql's lexical states are easier to check side by side than split apart.
def split_sql(text: str) -> list[Statement]:
    """Split SQL the way psql does: quotes, E'' strings, dollar quoting with tags, nested
    block comments, parentheses, BEGIN ATOMIC bodies, COPY … FROM stdin data and backslash
    commands. Comment-only pieces are not statements."""
    out: list[Statement] = []
    size = len(text)
    pos = start = depth = 0
    code: list[str] = []
    line, line_pos = 1, 0

    def line_at(index: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, index)
        line_pos = index
        return line

    def emit(end: int, meta: bool = False, words: tuple[str, ...] | None = None) -> None:
        nonlocal start, code, depth
        words = _keywords("".join(code)) if words is None else words
        if words or meta:
            first = start + len(text[start:end]) - len(text[start:end].lstrip())
            out.append(Statement(text[first:end].rstrip(), line_at(first), words, meta))
        start, code, depth = end, [], 0

    while pos < size:
        match = _SQL_SPECIAL.search(text, pos)
        if not match:
            code.append(text[pos:])
            break
        code.append(text[pos:match.start()])
        kind, pos = match.lastgroup, match.end()
        if kind == "semi":
            joined = "".join(code)
            words = _keywords(joined)  # once: the routine test and the statement both need them
            if depth == 0 and not _inside_routine_body(joined, words):
                if _COPY_STDIN.match(joined):
                    end = _COPY_END.search(text, pos)
                    pos = end.end() if end else size
                emit(pos, words=words)
                continue
            code.append(";")
        elif kind == "open":
            depth += 1
            code.append("(")
        elif kind == "close":
            depth = max(depth - 1, 0)
            code.append(")")
        elif kind == "line":
            newline = text.find("\n", pos)
            pos = size if newline < 0 else newline
            code.append(" ")
        elif kind == "block":
            pos = skip_block_comment(text, pos)
            code.append(" ")
        elif kind in ("str", "estr", "ident"):
            body = {"str": _STR_BODY, "estr": _ESTR_BODY, "ident": _IDENT_BODY}[kind]
            found = body.match(text, pos)
            pos = found.end() if found else size
            code.append(' "q" ' if kind == "ident" else " '' ")
        elif kind == "dollar":
            close = text.find(match.group(), pos)
            pos = size if close < 0 else close + len(match.group())
            code.append(" $$ ")
        else:  # a backslash command runs to the end of its line
            if _keywords("".join(code)):
                emit(match.start())
            start = match.start()
            newline = text.find("\n", pos)
            pos = size if newline < 0 else newline
            code = []
            emit(pos, meta=True)
    emit(size)
    return out


# ── the meta-command guard: project SQL files cannot reach the machine that runs the tool ──

# psql meta-commands refused in project SQL files (SPEC §5), each with why. psql compares
# command names exactly (\copy case-insensitively); we compare lower-cased, which only
# refuses more. `[project] psql_meta_commands = "all"` re-allows everything.
_META_REFUSED: dict[str, str] = {
    "!": "runs a shell command",
    "o": "sends query output to a file or a command", "out": "sends output to a file or a command",
    "w": "writes to a file or a command", "write": "writes to a file or a command",
    "s": "writes psql's history to a file",
    "cd": "changes psql's working directory",
    "setenv": "changes the environment of psql and of the commands it starts",
    "getenv": "reads the tool's environment (passwords included) into the script",
    "e": "starts an editor", "edit": "starts an editor", "ef": "starts an editor",
    "ev": "starts an editor",
    "c": "connects elsewhere with the tool's credentials",
    "connect": "connects elsewhere with the tool's credentials",
    "password": "changes a password interactively",
    "prompt": "reads input that is not in the file (the script itself, or a terminal)",
    "lo_export": "writes a client-side file",
    "gset": "turns server data into psql variables, which psql runs as script text when "
            "interpolated (:name)",
}


@record(frozen=True)
class SqlGuard:
    """What project SQL files may do on the client: `roots` are the folders whose files
    \\i, \\ir, \\copy … FROM and \\lo_import may read (the project, its schema sources);
    `cwd` is psql's working directory, where relative paths resolve."""

    roots: tuple[Path, ...]
    cwd: Path
    allow_all: bool = False

    def inside(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root) for root in self.roots)


@record(frozen=True)
class MetaCommand:
    name: str   # lower-cased, without the backslash
    args: str
    line: int


def meta_commands(statements: Sequence[Statement]) -> list[MetaCommand]:
    """Every psql meta-command of split_sql's statements, as psql reads them: a backslash
    line may hold several commands, each starting at an unquoted backslash. A backquote
    outside quotes (shell substitution) is a command named '`'."""
    found: list[MetaCommand] = []
    for stmt in statements:
        if not stmt.meta:
            continue
        pieces, current, quote, index = [], "", "", 0
        body = stmt.text
        while index < len(body):
            char = body[index]
            if quote:
                if char == "\\" and quote == "'" and index + 1 < len(body):
                    current += body[index:index + 2]
                    index += 2
                    continue
                quote = "" if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "`":
                found.append(MetaCommand("`", body, stmt.line))
            elif char == "\\" and current.strip():
                pieces.append(current)
                current = ""
            current += char
            index += 1
        pieces.append(current)
        for piece in (p.strip()[1:] for p in pieces):
            name = re.split(r"[\s\\]", piece, maxsplit=1)[0]  # psql: up to a space or backslash
            found.append(MetaCommand(name.lower(), piece[len(name):].strip(), stmt.line))
    return found


def _meta_words(args: str) -> list[str]:
    """psql-style argument words: whitespace-separated, '…' quoted (\\ escapes, '' a quote),
    parenthesised groups kept whole."""
    return re.findall(r"'(?:[^'\\]|\\.|'')*'|\((?:[^()']|'[^']*')*\)|\"[^\"]*\"|[^\s'()\"]+",
                      args)


def _unquote(word: str) -> str:
    if word.startswith("'") and word.endswith("'") and len(word) >= 2:
        return word[1:-1].replace("''", "'")  # (a name with backslashes is refused)
    return word


def _file_argument(word: str, bases: Sequence[Path], guard: SqlGuard) -> list[Path] | str:
    """The files a path argument can name (one per base folder psql might resolve it
    from), or why it is refused."""
    if not word.startswith("'") and ":" in word:
        return "names a file through a psql variable"
    if "\\" in word:  # psql reads '\x2f' as '/': the name would not be the one checked
        return "names a file with backslash escapes"
    path = _unquote(word)
    if not path or path.startswith("|"):
        return "pipes to or from a command"
    candidates = [Path(path)] if Path(path).is_absolute() else [base / path for base in bases]
    if not all(guard.inside(c) for c in candidates):
        return f"reads {path!r}, outside the project"
    return candidates


# Each check gets the command's arguments and the folders a relative path may resolve from
# (the file's folder, then psql's working directory) and returns why the command is refused,
# or the files it reads (to be checked too).
_MetaCheck = Callable[[str, Sequence[Path], SqlGuard], "list[Path] | str"]


def _output_problem(args: str, bases: Sequence[Path], guard: SqlGuard) -> list[Path] | str:
    """\\g and \\gx: options in parentheses are fine; a file or |command is not."""
    rest = [w for w in _meta_words(args) if not w.startswith("(")]
    return "sends query output to a file or a command" if rest else []


def _set_problem(args: str, bases: Sequence[Path], guard: SqlGuard) -> list[Path] | str:
    """psql copies a variable's value into the script as is (:name): a stored backslash
    command would run there."""
    return "stores a backslash command, which psql runs when the variable is interpolated" \
        if "\\" in args else []


def _copy_problem(args: str, bases: Sequence[Path], guard: SqlGuard) -> list[Path] | str:
    """\\copy … FROM stdin or a project file; never TO (client files, stdout) or PROGRAM.
    psql resolves its file from its working directory."""
    words = _meta_words(args)
    lowered = [w.lower() for w in words]
    where = next((i for i, w in enumerate(lowered) if w in ("from", "to") and i > 0), None)
    if where is None or where + 1 >= len(words):
        return "cannot be read (no FROM or TO)"
    if lowered[where] == "to":
        return "writes a client-side file or sends rows to a command"
    source = lowered[where + 1]
    if source == "program":
        return "runs a command (PROGRAM)"
    if source in ("stdin", "pstdin"):
        return []
    return _file_argument(words[where + 1], bases[-1:], guard)


def _read_problem(args: str, bases: Sequence[Path], guard: SqlGuard) -> list[Path] | str:
    """\\i and \\lo_import read a file relative to psql's working directory."""
    words = _meta_words(args)
    return _file_argument(words[0], bases[-1:], guard) if words else []


def _read_relative_problem(args: str, bases: Sequence[Path], guard: SqlGuard
                           ) -> list[Path] | str:
    """\\ir reads relative to the including file, or to psql's working directory when the
    script comes from stdin (a build): both must be project files."""
    words = _meta_words(args)
    return _file_argument(words[0], bases, guard) if words else []


_META_CHECKS: dict[str, _MetaCheck] = {
    "g": _output_problem, "gx": _output_problem,
    "set": _set_problem,
    "copy": _copy_problem,
    "i": _read_problem, "include": _read_problem, "lo_import": _read_problem,
    "ir": _read_relative_problem, "include_relative": _read_relative_problem,
}


def _meta_problem(command: MetaCommand, folder: Path, guard: SqlGuard) -> list[Path] | str:
    """Why a meta-command is refused, or the project files it reads (to be checked too)."""
    if command.name == "`":
        return "runs a shell command (backquotes)"
    if command.name in _META_REFUSED:
        return _META_REFUSED[command.name]
    check = _META_CHECKS.get(command.name)
    return check(command.args, (folder, guard.cwd), guard) if check else []


def guard_sql(statements: Sequence[Statement], path: Path, rel: str, guard: SqlGuard,
              seen: frozenset[Path] = frozenset()) -> None:
    """Refuse, before anything runs, a project SQL file (split_sql's statements) whose psql
    meta-commands reach the client's shell, files outside the project or other servers
    (SPEC §5), naming the file and line; files it includes with \\i or \\ir are checked
    the same way. Every path that runs project files calls it: the build (schema, seeds:
    templates, reset, clone, deploy), migrations (up and down, both transaction modes) and
    deploy's verify checks."""
    if guard.allow_all:
        return
    for command in meta_commands(statements):
        problem = _meta_problem(command, path.parent, guard)
        if isinstance(problem, str):
            shown = "`…`" if command.name == "`" else f"\\{command.name}"
            raise Refused(f"{rel}:{command.line}: {shown} {problem}",
                          hint="SQL files cannot reach the machine that runs confiture; "
                               "[project] psql_meta_commands = \"all\" allows it for this project")
        for included in problem:
            real = included.resolve()
            if command.name == "copy" or command.name == "lo_import" or real in seen \
                    or not real.is_file():
                continue
            guard_sql(split_sql(read_sql_file(real, str(included)).decode("utf-8")), real,
                      f"{included} (included by {rel}:{command.line})", guard, seen | {real})


def sql_guard(config: Config, cwd: Path | None = None) -> SqlGuard:
    """The project's guard: its folders (and its schema sources, wherever they are) may be
    read; psql runs in our working directory."""
    roots = {config.root, *(s.path for s in config.schema), config.seeds_dir,
             config.migrations_dir, config.deploy_verify}
    return SqlGuard(roots=tuple(sorted(r.resolve() for r in roots)), cwd=cwd or Path.cwd(),
                    allow_all=config.psql_meta_commands == "all")


# ── migration files: versioned up/down SQL, checksums (pure filesystem work) ─────────────

_VERSION_RE = re.compile(r"^(\d[\d-]*)(?:_(.*))?$")
_FLAT_RE = re.compile(r"^(\d[\d-]*(?:_.*)?)\.(up|down)\.sql$")
_MIGRATION_FOLDER_FILES = {"up.sql", "down.sql", "metadata.toml"}


@record(frozen=True)
class Migration:
    version: int
    name: str
    label: str            # as written on disk: "2017-08-31-230457_create_user"
    up_file: str
    down_file: str | None
    checksum: str         # sha256 of up with CRLF → LF and without a UTF-8 BOM
    transactional: bool   # False: '-- confiture:no-transaction' or Diesel run_in_transaction
    layout: str           # "flat" or "folder"

    # Made once per migration, not per use: a 200-migration down asked for them ~1,000 times
    # (~20 ms of Path parsing, profiled). cached_property writes the instance's __dict__
    # directly, so the record stays frozen; equality and hashing read the fields only.
    @functools.cached_property
    def up(self) -> Path:
        return Path(self.up_file)

    @functools.cached_property
    def down(self) -> Path | None:
        return Path(self.down_file) if self.down_file else None


@record(frozen=True)
class MigrationFiles:
    migrations: tuple[Migration, ...]
    strays: tuple[str, ...]   # paths under the migrations folder that are not migrations


def parse_version(text: str) -> int:
    """'2017-08-31-230457' or '20170831230457' → 20170831230457 (SPEC §7)."""
    digits = str(text).strip().replace("-", "")
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"{text!r} is not a migration version",
                          hint="versions are the leading digits of a migration's name")
    return version_number(digits, ConfigError)


def version_number(digits: str, error: type[ConfitureError] = InputError,
                   where: str = "") -> int:
    """A version's digits as an exact integer (any length Python converts: 4,300 digits)."""
    try:
        return int(digits)
    except ValueError:
        raise error(f"{where or digits[:20] + '…'}: a migration version of {len(digits)} "
                    "digits is too long") from None


def normalise_sql(data: bytes) -> bytes:
    """What checksums are taken of: CRLF (and lone CR) as LF, no UTF-8 byte-order mark."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _diesel_transactional(folder: Path, rel: str) -> bool:
    meta = folder / "metadata.toml"
    if not meta.is_file():
        return True
    try:
        data = read_toml(meta)
    except (ValueError, OSError) as exc:  # UnicodeDecodeError and TOMLDecodeError included
        raise InputError(f"{rel}/metadata.toml: cannot read: {exc}") from exc
    value = data.get("run_in_transaction", True)
    if not isinstance(value, bool):
        raise InputError(f"{rel}/metadata.toml: run_in_transaction must be true or false")
    return value


_NO_TRANSACTION_START = re.compile(rb"\s*--[ \t]*confiture:no-transaction\b", re.IGNORECASE)


def file_transactional(text: bytes) -> bool:
    """False when the first non-blank line is '-- confiture:no-transaction'."""
    return not _NO_TRANSACTION_START.match(text)


def _make_migration(label: str, up: str, down: str | None, rel: str, layout: str,
                    folder_transactional: bool = True,
                    cache: ChecksumCache | None = None) -> Migration:
    match = _VERSION_RE.match(label)
    assert match is not None
    key, found = cache.lookup(up) if cache is not None else ([], None)
    hit = (str(found[0]), bool(found[1])) if found is not None else None
    if hit is None:
        try:
            with open(up, "rb") as handle:
                data = normalise_sql(handle.read())
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            data = normalise_sql(read_sql_file(Path(up), rel))  # the slow path names the problem
        hit = sha256_bytes(data), file_transactional(data)
        if cache is not None:
            cache.store(up, key, *hit)
    return Migration(version=version_number(match.group(1).replace("-", ""), where=rel),
                     name=match.group(2) or "",
                     label=label, up_file=up, down_file=down, checksum=hit[0],
                     transactional=folder_transactional and hit[1], layout=layout)


# Over 60 lines: the walk's closures (both layouts, flat and folder) share one list and one
# cache; read together they show which files are migrations and which are strays.
def scan_migrations(folder: Path, root: Path | None = None,
                    cache: ChecksumCache | None = None) -> MigrationFiles:
    """Every migration below `folder` in version order, plus stray files (reported, never run).
    Folders named like a version hold up.sql/down.sql; other folders are searched for flat
    files. Duplicate versions are an error naming both. With `cache`, unchanged files are not
    read again (see ChecksumCache)."""
    root = root or folder
    base = str(root).rstrip(os.sep) + os.sep
    # plain strings while walking: `migrate status` reads a thousand files per run

    def show(path: str | Path) -> str:
        text = str(path)
        return text[len(base):].replace(os.sep, "/") if text.startswith(base) else text

    found: list[Migration] = []
    strays: list[str] = []

    version_match, flat_match = _VERSION_RE.match, _FLAT_RE.match  # hot: bound once

    def visit(current: str) -> None:
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"cannot read folder {current}: {exc.strerror}") from exc
        flat: dict[str, dict[str, str]] = {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if version_match(entry.name):
                    visit_folder(entry.path, entry.name)
                else:
                    visit(entry.path)
                continue
            match = flat_match(entry.name)
            if match:
                flat.setdefault(match.group(1), {})[match.group(2)] = entry.path
            else:
                strays.append(show(entry.path))
        for label, pair in flat.items():
            if "up" not in pair:
                strays.append(show(pair["down"]) + " (down without up)")
                continue
            found.append(_make_migration(label, pair["up"], pair.get("down"),
                                         show(pair["up"]), "flat", cache=cache))

    def visit_folder(path: str, label: str) -> None:
        names = {e.name for e in os.scandir(path) if not e.name.startswith(".")}
        folder_path = Path(path)
        strays.extend(show(folder_path / n) for n in sorted(names - _MIGRATION_FOLDER_FILES))
        if "up.sql" not in names:
            strays.append(show(path) + "/ (no up.sql)")
            return
        transactional = _diesel_transactional(folder_path, show(path))
        up = os.path.join(path, "up.sql")
        found.append(_make_migration(label, up,
                                     os.path.join(path, "down.sql") if "down.sql" in names else None,
                                     show(up), "folder", transactional, cache))

    if folder.is_dir():
        visit(str(folder))
    if cache is not None:
        cache.save()
    found.sort(key=lambda m: (m.version, m.label))
    for before, after in itertools.pairwise(found):
        if before.version == after.version:
            raise InputError(f"two migrations have version {before.version}: "
                             f"{show(before.up)} and {show(after.up)}",
                             hint="give one of them a new version (rename it)")
    return MigrationFiles(tuple(found), tuple(strays))


def discover_migrations(config: Config) -> list[Migration]:
    """The project's migrations in version order (strays left out: see scan_migrations)."""
    return list(scan_migrations(config.migrations_dir, config.root).migrations)


# ════════════════════════════════════════════════════════════════════════════════════════════
# §5 PostgreSQL client
# The only section that starts psql, pg_dump and pg_restore. Finds the real binaries, hands
# connections to children through their environment (never argv), keeps one long-lived psql
# Session per run for cheap round trips, and turns psql's error output into SqlError with
# the project file and line, and a failed connection into ConnectionFailed saying why. Also
# advisory locks; the database layer later sections share (Workspace, admin_session,
# existence/properties/drop/sessions of databases); and the migrations tracking table behind
# one narrow interface (TrackingTable) that builds (§7) and migrations (§8) share.
# ════════════════════════════════════════════════════════════════════════════════════════════

_PG_WRAPPER = "/usr/share/postgresql-common/pg_wrapper"


@record(frozen=True)
class PgTools:
    bindir: Path

    @property
    def psql(self) -> str:
        return str(self.bindir / "psql")

    @property
    def pg_dump(self) -> str:
        return str(self.bindir / "pg_dump")

    @property
    def pg_restore(self) -> str:
        return str(self.bindir / "pg_restore")


def _real_bindir(candidate: str | None) -> Path | None:
    if not candidate:
        return None
    psql = Path(candidate) / "psql"
    if not psql.exists() or os.path.realpath(psql) == _PG_WRAPPER:
        return None
    return Path(os.path.realpath(psql)).parent


def find_pg_tools(environ: Mapping[str, str] = os.environ) -> PgTools:
    """$CONFITURE_PGBIN, then psql on PATH, then the folder pg_config links into, then the newest
    /usr/lib/postgresql/*/bin, then `pg_config --bindir` — skipping Debian's pg_wrapper (it
    costs ~25 ms a call). The order avoids starting a process in the common cases."""
    path = environ.get("PATH")
    candidates: list[Callable[[], str | None]] = [
        lambda: environ.get("CONFITURE_PGBIN"),
        lambda: os.path.dirname(_which("psql", path) or "") or None,
        lambda: os.path.dirname(os.path.realpath(_which("pg_config", path) or "/")) or None,
        _newest_debian_bindir,
        lambda: _pg_config_bindir(_which("pg_config", path)),
    ]
    for candidate in candidates:
        bindir = _real_bindir(candidate())
        if bindir:
            return PgTools(bindir)
    raise PgError("cannot find psql (looked at $CONFITURE_PGBIN, PATH, pg_config and "
                  "/usr/lib/postgresql/*/bin)",
                  hint="install the PostgreSQL client (apt-get install postgresql-client)")


def _which(name: str, path: str | None) -> str | None:
    """shutil.which for one executable name (shutil's import pulls in compression modules)."""
    for folder in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _newest_debian_bindir() -> str | None:
    try:
        versions = [v for v in os.listdir("/usr/lib/postgresql")
                    if os.path.exists(f"/usr/lib/postgresql/{v}/bin/psql")]
    except OSError:
        return None
    return f"/usr/lib/postgresql/{max(versions, key=natural_key)}/bin" if versions else None


def _pg_config_bindir(pg_config: str | None) -> str | None:
    if not pg_config:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                             check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


PSQL_ERROR_LINE = re.compile(r"^psql:(?P<file>.*?):(?P<line>\d+): (?P<level>ERROR|FATAL|PANIC):  ?"
                         r"(?:(?P<code>[0-9A-Z]{5}): )?(?P<msg>.*)$")  # code: VERBOSITY verbose
_PSQL_CONTEXT_LINE = re.compile(r"^LINE (\d+): (.*)$")


@record(frozen=True)
class LineMap:
    """Maps lines of a concatenated script back to (file, line) of the project's files."""

    # (first script line of the chunk, display path, first file line) in ascending order
    chunks: tuple[tuple[int, str, int], ...] = ()
    lines: tuple[str, ...] = ()

    def locate(self, script_line: int) -> tuple[str, int]:
        chosen = (1, "<script>", 1)
        for chunk in self.chunks:
            if chunk[0] <= script_line:
                chosen = chunk
        start, path, first = chosen
        return path, first + script_line - start


def parse_psql_errors(stderr: str, line_map: LineMap | None,
                      password: str | None = None) -> SqlError:
    """Turn psql's stderr after a failed script into one SqlError naming file and line.
    psql reports the line where the failing statement ended; with the server's 'LINE n:'
    context we find the exact line inside the statement."""
    text = mask_password_in(stderr, password)
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = PSQL_ERROR_LINE.match(line)
        if not match:
            continue
        end_line = int(match.group("line"))
        detail = [l for l in lines[index + 1:] if not PSQL_ERROR_LINE.match(l)]
        context = next((_PSQL_CONTEXT_LINE.match(l) for l in detail
                        if _PSQL_CONTEXT_LINE.match(l)), None)
        exact = _exact_line(line_map, end_line, context)
        message = match.group("msg")
        extra = [l for l in detail if l.startswith(("DETAIL:", "HINT:", "CONTEXT:"))]
        if extra:
            message += " (" + "; ".join(e.strip() for e in extra[:2]) + ")"
        location = ""
        if line_map is not None:
            path, file_line = line_map.locate(exact)
            location = f"{path}:{file_line}"
        return SqlError(message, sqlstate=match.group("code") or "", location=location)
    cleaned = "; ".join(l.strip() for l in lines if l.strip())
    return SqlError(cleaned or "psql failed without a message")


def _exact_line(line_map: LineMap | None, end_line: int, context: re.Match[str] | None) -> int:
    if not context or line_map is None or not line_map.lines:
        return end_line
    snippet = context.group(2).strip()
    snippet = snippet.removeprefix("...")
    snippet = snippet.removesuffix("...")
    snippet = snippet.strip()
    offset = int(context.group(1)) - 1
    guess = end_line - offset  # the statement may span more lines before the reported one
    for candidate in range(min(end_line, len(line_map.lines)), max(guess - 200, 0), -1):
        if snippet and snippet in line_map.lines[candidate - 1]:
            return candidate
    return end_line


# ── why a connection failed ─────────────────────────────────────────────────────────────────
# psql prints no SQLSTATE for a failed connection, so libpq's message decides: the server is
# down (or unreachable), or it answered and refused — no such database (3D000), no such role
# or failed authentication (28000/28P01), no CONNECT privilege (42501). Each wants its own
# advice; the first pattern that matches wins.

_CONNECT_FAILURES: tuple[tuple[str, str], ...] = (
    (r'database "([^"]*)" does not exist', NO_DATABASE),
    (r'role "([^"]*)" does not exist', NO_ROLE),
    ((r"password authentication failed|no password supplied|authentication failed for user|"
      r"pg_hba\.conf"), AUTH_FAILED),
    (r"permission denied for database|does not have CONNECT privilege", NOT_ALLOWED),
    ((r"Connection refused|No such file or directory|could not translate host name|"
      r"timeout expired|Network is unreachable|No route to host|"
      r"the database system is (starting up|shutting down|in recovery mode)|"
      r"server closed the connection unexpectedly"), SERVER_DOWN),
)
_CONNECT_HINTS = {
    NO_DATABASE: "create it ('confiture.py reset', or 'confiture.py deploy' for a protected "
                 "env), or fix the database name in the env's url",
    NO_ROLE: "connect as an existing role: name it in the env's url "
             "(postgresql://ROLE@HOST/DB) or set PGUSER; a superuser can create it with "
             "'createuser ROLE'",
    AUTH_FAILED: "check the password (in the url, PGPASSWORD or ~/.pgpass) and the server's "
                 "pg_hba.conf",
    NOT_ALLOWED: "a superuser can GRANT CONNECT ON DATABASE … TO the role",
    SERVER_DOWN: "is the server running and accepting connections there?",
}


def never_connected(text: str) -> bool:
    """Does a client tool's stderr say that it never reached the server (libpq's words)?"""
    return "connection to server" in text or "could not connect" in text


def connection_failure(text: str, where: str) -> ConnectionFailed:
    """The error for libpq's message TEXT about a connection to WHERE (already masked)."""
    text = re.sub(r"^(psql|pg_dump|pg_restore): (error: )?", "", text.strip())
    for pattern, reason in _CONNECT_FAILURES:
        match = re.search(pattern, text)
        if match is None:
            continue
        if reason == NO_DATABASE:
            return missing_database(match.group(1), where)
        if reason == NO_ROLE:
            message = f"role {match.group(1)!r} does not exist on the server ({where})"
        elif reason == AUTH_FAILED:
            message = f"authentication failed at {where}: {_fatal_line(text)}"
        else:
            message = f"cannot connect to {where}: {_fatal_line(text)}"
        return ConnectionFailed(message, _CONNECT_HINTS[reason], reason)
    return ConnectionFailed(f"cannot connect to {where}: {text or 'psql exited'}", None, OTHER)


def missing_database(name: str, where: str) -> ConnectionFailed:
    """Database NAME does not exist on the server at WHERE (libpq said so, or we looked)."""
    return ConnectionFailed(f"database {name!r} does not exist ({where})",
                            _CONNECT_HINTS[NO_DATABASE], NO_DATABASE)


def _fatal_line(text: str) -> str:
    """libpq's message without the 'connection to server … failed:' preamble."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = re.sub(r"^connection to server .*? failed: ", "", lines[0]) if lines else text
    return "; ".join([head.removeprefix("FATAL:  "), *lines[1:]])


class ScriptStopped(PgError):
    """psql stopped a script at its first error (ON_ERROR_STOP) and exited; `stderr` says where."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _copy_unescape(field: str) -> str:
    """One field of COPY's text output: backslash escapes back to characters."""
    return re.sub(r"\\(.)", lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), field)


def json_rows_sql(sql: str) -> str:
    """A SELECT wrapped so that its rows come back as one JSON array (json_rows reads it)."""
    return f"SELECT coalesce(json_agg(q), '[]') FROM ({sql.strip().rstrip(';')}) q"


def json_rows(lines: Sequence[str]) -> list[dict[str, Any]]:
    return json.loads("\n".join(lines)) if lines else []


def copy_rows_sql(sql: str) -> str:
    """A SELECT as COPY text rows (copy_rows reads them)."""
    return f"COPY ({sql.strip().rstrip(';')}) TO STDOUT"


def copy_rows(lines: Sequence[str]) -> list[list[str | None]]:
    return [[None if f == "\\N" else _copy_unescape(f) if "\\" in f else f
             for f in line.split("\t")] for line in lines]


def psql_batch(statements: Sequence[str]) -> str:
    """Statements as one psql input that reaches the server as one Query message (one round
    trip instead of one per statement): psql's `\\;` joins them. Each ends with ';'."""
    return " \\;\n".join(s.strip().removesuffix(";") for s in statements) + ";"


class Session:
    """One long-lived psql process: statements go in on stdin, results come back framed by a
    random marker. ~0.1 ms per round trip instead of ~13 ms per new psql process."""

    def __init__(self, tools: PgTools, conn: ConnInfo, dbname: str,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.dbname = dbname
        self.conn = conn
        self._password = conn.get("password") or environ.get("PGPASSWORD")
        self._marker = f"__confiture_{os.urandom(8).hex()}__".encode()
        argv = [tools.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0",
                "-P", "pager=off", "-P", "footer=off", *conn.argv_conninfo()]
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=conn.child_env(environ, dbname), start_new_session=True)
        except OSError as exc:
            raise PgError(f"cannot start {tools.psql}: {exc.strerror}") from exc
        self._closed = False
        # One selector for the session's life, not one per answer: an answer per migration
        # made and closed two epoll objects each time (~30 µs of a loaded core per answer)
        import selectors

        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout.fileno(), selectors.EVENT_READ)
        self._selector.register(self._proc.stderr.fileno(), selectors.EVENT_READ)
        self._stdout_buf = b""
        self._stderr_carry: list[bytes] = []  # stderr that may belong to a queued script
        self._queued = 0                      # scripts sent by send_stop_on_error, not waited for
        self.last_stderr = ""
        # Not waited for: psql connects while the caller goes on (e.g. hashing files); the
        # first statement that reads an answer also reads this one's (and any error).
        self.submit("SET client_min_messages = warning;")
        self._unread = 1

    # -- framing ---------------------------------------------------------------------------

    def _send(self, text: str, queued: bool = False) -> None:
        """Write to psql. `queued`: psql may already have exited at an error in a script queued
        before this one; then the closed pipe is not an error here — reading that script's
        outcome reports it (with psql's stderr)."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(text.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            if not queued:
                self._raise_dead(self._stderr_after_exit())

    def _stderr_after_exit(self) -> str:
        """Everything psql wrote to stderr once its stdin pipe broke: it has exited (or is
        exiting), so the read ends at EOF. Without it a session whose psql died before the
        first write (server down, no such role) is reported with no reason and no hint."""
        assert self._proc.stderr is not None
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        rest = self._proc.stderr.read() or b""
        return b"".join([*self._stderr_carry, rest]).decode("utf-8", "replace")

    def _read_frame(self, timeout: float | None, ahead: bool = False
                    ) -> tuple[list[str], str, bool, str]:
        while self._unread:
            self._unread -= 1
            _, sqlstate, failed, stderr = self._next_frame(timeout)
            if failed:
                raise self._sql_error(stderr, sqlstate)
        return self._next_frame(timeout, ahead)

    def _next_frame(self, timeout: float | None, ahead: bool = False
                    ) -> tuple[list[str], str, bool, str]:
        """The next answer. `ahead`: psql may already be running later scripts, so stderr read
        so far may be theirs: it is carried over to the next frame instead of returned (this
        frame's stderr is then ""), and goes with psql's exit if one of them fails."""
        assert self._proc.stdout is not None and self._proc.stderr is not None
        out_fd, err_fd = self._proc.stdout.fileno(), self._proc.stderr.fileno()
        err_chunks, self._stderr_carry = self._stderr_carry, []
        deadline = None if timeout is None else time.monotonic() + timeout
        sel = self._selector
        while True:
            idx = self._stdout_buf.find(self._marker)
            if idx >= 0 and b"\n" in self._stdout_buf[idx:]:
                end = self._stdout_buf.index(b"\n", idx)
                body, tail = self._stdout_buf[:idx], self._stdout_buf[idx:end]
                self._stdout_buf = self._stdout_buf[end + 1:]
                if ahead:
                    self._stderr_carry, err_chunks = err_chunks, []
                else:
                    err_chunks.append(self._drain(err_fd))
                fields = tail.decode().split(" ", 2)
                failed = len(fields) > 1 and fields[1] == "true"
                sqlstate = fields[2] if len(fields) > 2 else ""
                # split on \n only: str.splitlines() also splits at U+2028, \x1c…
                lines = body.decode("utf-8", "replace").split("\n")
                if lines[-1] == "":
                    lines.pop()
                return lines, sqlstate, failed, b"".join(err_chunks).decode("utf-8", "replace")
            wait = None if deadline is None else max(deadline - time.monotonic(), 0)
            if wait == 0:
                self.cancel()
                raise PgError(f"no answer from the server within {timeout:.0f} s")
            for key, _ in sel.select(wait):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    if key.fd == out_fd:
                        err_chunks.append(self._drain(err_fd))
                        self._raise_dead(b"".join(err_chunks).decode("utf-8", "replace"))
                    sel.unregister(key.fd)
                elif key.fd == out_fd:
                    self._stdout_buf += chunk
                else:
                    err_chunks.append(chunk)

    def _drain(self, fd: int) -> bytes:
        """What psql's stderr (`fd`) holds now, without waiting. (An fd unregistered at its
        EOF is never ready: nothing more can come.)"""
        chunks = []
        while any(key.fd == fd for key, _ in self._selector.select(0)):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _raise_dead(self, stderr: str = "") -> NoReturn:
        self._closed = True
        self.last_stderr = stderr
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        text = stderr.strip()
        text = mask_password_in(text, self._password)
        text = re.sub(r"^psql: (error: )?", "", text)
        where = f"{self.conn.display()}" if self.dbname is None else \
            self.conn.with_params(dbname=self.dbname).display()
        if never_connected(text) or not text:
            raise connection_failure(text, where)
        raise PgError(f"lost the session to {where}: {text}")

    # -- statements ------------------------------------------------------------------------

    def execute(self, sql: str, timeout: float | None = None) -> list[str]:
        """Run statements; return psql's unaligned output lines; raise SqlError on failure."""
        if self._closed:
            raise PgError("session is closed")
        sql = sql.strip()
        if not sql.endswith(";"):
            sql += ";"
        marker = self._marker.decode()
        self._send(f"{sql}\n\\echo {marker} :ERROR :SQLSTATE\n")
        lines, sqlstate, failed, stderr = self._read_frame(timeout)
        if failed:
            raise self._sql_error(stderr, sqlstate)
        return lines

    def transaction(self, sql: str, timeout: float | None = None) -> list[str]:
        """Run statements in one transaction; SqlError if any of them failed. (execute()
        cannot tell: psql's ERROR is about the last statement, and COMMIT of a failed
        transaction succeeds as a ROLLBACK; LAST_ERROR_SQLSTATE, reset first, remembers.)"""
        if self._closed:
            raise PgError("session is closed")
        marker = self._marker.decode()
        self._send(f"\\set LAST_ERROR_SQLSTATE 00000\nBEGIN;\n{sql.strip()}\nCOMMIT;\n"
                   f"\\echo {marker} :ERROR :LAST_ERROR_SQLSTATE\n")
        lines, sqlstate, failed, stderr = self._read_frame(timeout)
        if failed or sqlstate != "00000":
            raise self._sql_error(stderr, sqlstate)
        return lines

    def submit(self, script: str) -> None:
        """Send statements or meta-commands without waiting for them; collect() reads the
        outcome. Lets one thread drive two sessions at once (sync streams between two)."""
        if self._closed:
            raise PgError("session is closed")
        self._send(f"{script.strip()}\n\\echo {self._marker.decode()} :ERROR :SQLSTATE\n")

    def collect(self, timeout: float | None = None) -> list[str]:
        """Output lines of the last submit(); its stderr is kept in `last_stderr`."""
        lines, sqlstate, failed, stderr = self._read_frame(timeout)
        self.last_stderr = stderr
        if failed:
            raise self._sql_error(stderr, sqlstate)
        return lines

    def run_stop_on_error(self, script: str) -> list[str]:
        """Run statements and meta-commands (e.g. ``\\i FILE``) with ON_ERROR_STOP on. At the
        first error psql exits, so the server rolls back any open transaction; that raises
        ScriptStopped carrying psql's stderr, and the session is closed for good."""
        self.send_stop_on_error(script)
        return self.wait_stop_on_error()

    def send_stop_on_error(self, script: str) -> None:
        """run_stop_on_error's first half: queue the script without waiting, so psql can start
        on it while the caller waits for an earlier one (wait_stop_on_error, in order). psql
        stops at the first error, so nothing queued after a failing script runs. Keep what is
        queued small (a few KiB): psql's output is only read while waiting."""
        if self._closed:
            raise PgError("session is closed")
        marker = self._marker.decode()
        self._send(f"\\set ON_ERROR_STOP on\n{script.rstrip()}\n\\set ON_ERROR_STOP off\n"
                   f"\\echo {marker} :ERROR :SQLSTATE\n", queued=True)
        self._queued += 1

    def wait_stop_on_error(self) -> list[str]:
        """The outcome of the oldest script queued by send_stop_on_error (see run_stop_on_error)."""
        self._queued -= 1
        try:
            lines, _, _, _ = self._read_frame(None, ahead=self._queued > 0)
        except ConnectionFailed:
            raise
        except PgError as exc:
            stderr = getattr(self, "last_stderr", "")
            stderr = mask_password_in(stderr, self._password)
            raise ScriptStopped(exc.message, stderr) from None
        return lines

    @property
    def closed(self) -> bool:
        return self._closed

    def _sql_error(self, stderr: str, sqlstate: str) -> SqlError:
        text = mask_password_in(stderr, self._password)
        text = re.sub(r"^psql:<stdin>:\d+: ", "", text.strip(), flags=re.MULTILINE)
        first, *rest = text.splitlines() or ["statement failed"]
        message = re.sub(r"^(ERROR|FATAL):\s+", "", first)
        details = [r.strip() for r in rest if r.startswith(("DETAIL:", "HINT:"))]
        if details:
            message += " (" + "; ".join(details) + ")"
        return SqlError(message, sqlstate=sqlstate)

    def pipeline(self, statements: Sequence[str]) -> list[list[str]]:
        """Run independent statements in one round trip: all are sent before any answer is
        read (psql runs them in order). Their output lines, in order. Every answer is read
        before a failure is raised (the session stays in step); as stderr cannot be told
        apart between answers read ahead, the error carries all of it."""
        return list(self.stream(statements))

    def stream(self, statements: Sequence[str]) -> Iterator[list[str]]:
        """pipeline(), each answer handed out as it arrives, so that the caller works on one
        while the server runs the next. From a failed statement on, no answer is handed out;
        the failure is raised once every answer was read."""
        for sql in statements:
            self.submit(sql.strip().removesuffix(";") + ";")
        stderr, failure = [], None
        for left in range(len(statements) - 1, -1, -1):
            lines, sqlstate, failed, err = self._read_frame(None, ahead=left > 0)
            stderr.append(err)
            if failed and failure is None:
                failure = sqlstate
            if failure is None:
                yield lines
        self.last_stderr = "".join(stderr)
        if failure is not None:
            raise self._sql_error(self.last_stderr, failure)

    def query(self, sql: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """Rows of a SELECT as dicts (through json_agg: safe for any value)."""
        return json_rows(self.execute(json_rows_sql(sql), timeout))

    def rows(self, sql: str) -> list[list[str | None]]:
        """Rows of a SELECT as lists of text (None for NULL), through COPY's text format:
        several times cheaper than json_agg for thousands of rows, and as safe."""
        return copy_rows(self.execute(copy_rows_sql(sql)))

    def value(self, sql: str) -> Any:
        rows = self.query(sql)
        return next(iter(rows[0].values())) if rows else None

    def cancel(self) -> None:
        """Cancel the running statement (psql forwards SIGINT as a cancel request)."""
        if not self._closed and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)

    def quit(self) -> None:
        """Tell psql to exit, without waiting for it: it ends its connection while the caller
        goes on (close() then only reaps it, ~1 ms sooner; more on a loaded machine). No
        statement may follow."""
        if self._closed:
            return
        self._closed = True
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"\\q\n")
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def close(self) -> None:
        assert self._proc.stdout is not None
        if self._proc.stdout.closed:
            return  # closed already
        self.quit()
        # psql closes its stdout as it exits: waiting for that EOF is exact, where
        # Popen.wait(timeout) polls with growing sleeps.
        import select

        deadline = time.monotonic() + 10
        try:
            while select.select([self._proc.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
                if not os.read(self._proc.stdout.fileno(), 65536):
                    break
            else:
                self._proc.kill()
        except OSError:
            pass
        self._proc.wait()
        self._selector.close()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and exc[0] in (KeyboardInterrupt, Interrupted):
            self.cancel()
        self.close()


@record()
class Client:
    """Starts client programs for one environment's server."""

    tools: PgTools
    conn: ConnInfo
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def session(self, dbname: str) -> Session:
        return Session(self.tools, self.conn, dbname, self.environ)

    def child_env(self, dbname: str | None = None) -> dict[str, str]:
        return self.conn.child_env(self.environ, dbname)

    @property
    def password(self) -> str | None:
        return self.conn.get("password") or self.environ.get("PGPASSWORD")

    def run_script(self, script: str, dbname: str, line_map: LineMap | None = None,
                   single_transaction: bool = True) -> None:
        """Run a whole SQL script (psql -f -), stopping at the first error."""
        argv = psql_script_argv(self.tools, self.conn, single_transaction)
        proc = self.run(argv, dbname, input=script.encode())
        if proc.returncode != 0:
            stderr = proc.stderr.decode("utf-8", "replace")
            if proc.returncode == 2 and not PSQL_ERROR_LINE.search(stderr):
                self._connection_failed(stderr, dbname)
            raise parse_psql_errors(stderr, line_map, self.password)

    def run(self, argv: list[str], dbname: str | None, input: bytes | None = None,
            stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
        """Run one client program with the connection in its environment."""
        try:
            return subprocess.run(argv, input=input, stdout=stdout, stderr=subprocess.PIPE,
                                  env=self.child_env(dbname), check=False)
        except OSError as exc:
            raise PgError(f"cannot start {argv[0]}: {exc.strerror}") from exc

    def spawn(self, argv: list[str], dbname: str | None, stdin: Any = subprocess.DEVNULL,
              stdout: Any = subprocess.DEVNULL, stderr: Any = None) -> subprocess.Popen[bytes]:
        """Start a long-running client program (dump, restore) in the background, with the
        connection in its environment; the caller waits, polls for progress, or stops it."""
        try:
            return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                    env=self.child_env(dbname))
        except OSError as exc:
            raise PgError(f"cannot start {argv[0]}: {exc.strerror}") from exc

    def _connection_failed(self, stderr: str, dbname: str) -> NoReturn:
        text = stderr.strip()
        text = mask_password_in(text, self.password)
        where = self.conn.with_params(dbname=dbname).display(self.environ)
        raise connection_failure(text, where)


# ── client argument lists: how each program is started for each job ──────────────────────

# psql for a script: no ~/.psqlrc, quiet, stop at the first error, never a pager.
PSQL_SCRIPT_FLAGS = ("-X", "-q", "-v", "ON_ERROR_STOP=1", "-P", "pager=off")


def psql_script_argv(tools: PgTools, conn: ConnInfo, single_transaction: bool = True,
                     tuples_only: bool = False) -> list[str]:
    """psql running the script on its stdin (`tuples_only`: bare rows on stdout)."""
    return [tools.psql, *(["--single-transaction"] if single_transaction else []),
            *(["-A", "-t"] if tuples_only else []), *PSQL_SCRIPT_FLAGS,
            *conn.argv_conninfo(), "-f", "-"]


def dbname_conninfo(conn: ConnInfo, dbname: str) -> str:
    """A conninfo string naming only the database (plus non-secret argv-only parameters):
    pg_dump and pg_restore need -d to connect at all; everything else stays in the environment."""
    escaped = dbname.replace("\\", "\\\\").replace("'", "\\'")
    extra = [f"{name}={value}" for name, value in conn.params if name in ARGV_PARAMS]
    return " ".join([f"dbname='{escaped}'", *extra])


def pg_dump_argv(tools: PgTools, conn: ConnInfo, dbname: str, *options: str) -> list[str]:
    """pg_dump of one database; never prompts for a password (-w)."""
    return [tools.pg_dump, *options, "-w", "-d", dbname_conninfo(conn, dbname)]


def pg_restore_argv(tools: PgTools, conn: ConnInfo, dbname: str | None,
                    *options: str) -> list[str]:
    """pg_restore into one database, or (dbname None) reading an archive without a server."""
    if dbname is None:
        return [tools.pg_restore, *options]
    return [tools.pg_restore, *options, "-w", "-d", dbname_conninfo(conn, dbname)]


def dump_schema_argv(tools: PgTools, conn: ConnInfo, privileges: bool) -> list[str]:
    """pg_dump of a schema to copy into a scratch database (§13 FromSide). Owners and grants
    only with `privileges`; tablespaces never (the scratch server need not have them, and the
    schema model does not compare them); subscriptions never (their connection strings may
    hold passwords)."""
    argv = [tools.pg_dump, "--schema-only", "--no-subscriptions", "--encoding=UTF8",
            "--no-tablespaces"]
    if not privileges:
        argv += ["--no-owner", "--no-privileges"]
    return argv + conn.argv_conninfo()


# ── advisory locks: one per name, in whichever database the session is connected to ───────

LOCK_CLASS = 1668247142  # 'conf' as int4: the first key of every confiture advisory lock
MIGRATION_LOCK = "migrate"  # taken by migrate runs, deploy and restore (one writer at a time)


def query_error(session: Session, query: str) -> SqlError | None:
    """Does `query` parse and plan on the server (EXPLAIN)? The error if not. The text
    travels as a string literal that a DO block executes, so psql never lexes it: an
    unbalanced parenthesis or quote in it (a user's { sql = … } rule) cannot swallow the
    statements after it, and it must be one statement. Call inside a transaction: the check
    runs in a savepoint, so a failure leaves the transaction usable."""
    body = f"BEGIN EXECUTE {quote_literal('EXPLAIN (COSTS OFF) ' + query)}; END"
    session.execute("SAVEPOINT confiture_check")
    try:
        session.execute(f"DO {quote_literal(body)}")
    except SqlError as exc:
        session.execute("ROLLBACK TO SAVEPOINT confiture_check")
        return exc
    finally:
        session.execute("RELEASE SAVEPOINT confiture_check")
    return None


def lock_key_sql(name: str) -> str:
    return f"{LOCK_CLASS}, hashtext({quote_literal(name)})"


def lock_row_sql(alias: str, name: str) -> str:
    """The condition on pg_locks row `alias` that is our advisory lock `name`, held."""
    return (f"{alias}.locktype = 'advisory' AND {alias}.granted AND {alias}.classid = {LOCK_CLASS} "
            f"AND {alias}.objid = (hashtext({quote_literal(name)})::bigint & 4294967295) "
            f"AND {alias}.objsubid = 2")


def lock_holder(session: Session, name: str) -> str:
    """Who holds our advisory lock `name`: pid, application, client, since when."""
    rows = session.query(
        "SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local') AS client, "
        "a.usename, to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS') AS since "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        f"WHERE {lock_row_sql('l', name)}")
    if not rows:
        return "another session"
    row = rows[0]
    return (f"pid {row['pid']} ({row['application_name'] or 'no application_name'}, "
            f"{row['usename']}@{row['client']}, connected since {row['since']})")


def acquire_lock(session: Session, name: str, timeout: float, what: str,
                 on_wait: Callable[[str], None] | None = None) -> None:
    """Take a session-level advisory lock by polling pg_try_advisory_lock: a waiting run never
    sits in a blocking lock call (so it cannot deadlock with CREATE INDEX CONCURRENTLY in the
    holder) and can name the holder when it gives up."""
    key = lock_key_sql(name)
    deadline = time.monotonic() + timeout
    delay = 0.02
    announced = False
    while True:
        if session.value(f"SELECT pg_try_advisory_lock({key})"):
            return
        if not announced and on_wait:
            on_wait(f"waiting for {what}, held by {lock_holder(session, name)}")
            announced = True
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{what} is held by {lock_holder(session, name)}; gave up after "
                              f"{format_seconds(timeout)}",
                              hint="wait for that run to finish, or raise the lock_timeout")
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.001)))
        delay = min(delay * 1.5, 0.5)


def release_lock_sql(name: str) -> str:
    return f"SELECT pg_advisory_unlock({lock_key_sql(name)});"


def release_lock(session: Session, name: str) -> None:
    session.execute(release_lock_sql(name))


# ── the env's databases: workspace, admin session, existence, properties, sessions ──────
# The one database layer every later section uses: a Workspace (env + client + console) and
# the catalog operations on databases that templates, restore, deploy and drift share.

@record()
class Workspace:
    """What an operation on one env needs: the env, its client and a reporter."""

    env: Env
    client: Client
    console: Console

    @property
    def config(self) -> Config:
        return self.env.config


def open_workspace(env: Env, console: Console, environ: Mapping[str, str] = os.environ
                   ) -> Workspace:
    return Workspace(env=env, client=Client(find_pg_tools(environ), env.conn, dict(environ)),
                     console=console)


def scratch_workspace(ws: Workspace) -> Workspace:
    """The workspace for the env's scratch work (templates, scratch databases): the env
    itself when unprotected, else the same env reached on its scratch server (§3
    scratch_server), so that inspecting a protected env creates nothing on its server."""
    if not ws.env.protected:
        return ws
    server = scratch_server(ws.config, ws.env.name, ws.client.environ)
    if server.conn.server_identity(ws.client.environ) == \
            ws.env.conn.server_identity(ws.client.environ):
        host, port = server.conn.server_identity(ws.client.environ)
        ws.console.warn_once(f"the scratch server of protected env {ws.env.name!r} ({server.origin}, "
                        f"{host}:{port}) is the env's own server: scratch databases will be "
                        "created on it; set [project] scratch_url to another server")
    env = evolve(ws.env, conn=server.conn,
                 spec=evolve(ws.env.spec, maintenance_db=server.maintenance_db))
    return evolve(ws, env=env, client=Client(ws.client.tools, server.conn, ws.client.environ))


def admin_session(ws: Workspace) -> Session:
    """A session on the maintenance database: creating and dropping databases happens here."""
    return ws.client.session(ws.env.maintenance_db)


def drop_database(session: Session, name: str, force: bool) -> None:
    """Drop a database if it exists; a template is unmarked first (PostgreSQL requires it)."""
    rows = session.query(f"SELECT datistemplate FROM pg_database WHERE datname = {quote_literal(name)}")
    if not rows:
        return
    if rows[0]["datistemplate"]:
        session.execute(f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE false")
    session.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}"
                    + (" WITH (FORCE)" if force else ""))


def database_exists(session: Session, name: str) -> bool:
    return bool(session.value(
        f"SELECT count(*) FROM pg_database WHERE datname = {quote_literal(name)}"))


def require_database(ws: Workspace, session: Session | None = None) -> None:
    """The env's database must exist: checked before expensive work that needs it (a template
    build, a dump), so a missing database is reported at once. Through an admin `session` on
    the env's server (one query), else by connecting to the database itself (all a read-only
    role on a protected env may do; §5 names a missing database as such)."""
    if session is None:
        with ws.client.session(ws.env.database) as own:
            own.value("SELECT 1")
    elif not database_exists(session, ws.env.database):
        where = ws.env.conn.with_params(dbname=ws.env.database).display(ws.client.environ)
        raise missing_database(ws.env.database, where)


def database_properties(session: Session, name: str) -> dict[str, Any] | None:
    """What CREATE DATABASE and ALTER DATABASE carry (pg_dump leaves them out without
    --create): owner, encoding, locale, limits, ACL, per-database settings, comment."""
    rows = session.query(
        "SELECT to_jsonb(d) AS d, pg_encoding_to_char(d.encoding) AS encoding, "
        "r.rolname AS owner, pg_has_role(d.datdba, 'MEMBER') AS can_own, "
        "t.spcname AS tablespace, shobj_description(d.oid, 'pg_database') AS comment, "
        "(SELECT coalesce(json_agg(json_build_object('role', sr.rolname, 'config', s.setconfig)), "
        " '[]') FROM pg_db_role_setting s LEFT JOIN pg_roles sr ON sr.oid = s.setrole "
        " WHERE s.setdatabase = d.oid) AS settings, "
        "(SELECT coalesce(json_agg(json_build_object('grantee', "
        "   CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
        "   'privilege', a.privilege_type, 'grantable', a.is_grantable)), '[]') "
        " FROM aclexplode(d.datacl) a) AS acl "
        f"FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
        f"JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = {quote_literal(name)}")
    return rows[0] if rows else None


def other_sessions(session: Session, database: str, exclude: Sequence[int] = ()) -> list[int]:
    """Backends connected to `database`, except ours and `exclude`."""
    skip = ", ".join(str(int(p)) for p in exclude) or "0"
    rows = session.query(
        f"SELECT pid FROM pg_stat_activity WHERE datname = {quote_literal(database)} "
        f"AND pid <> pg_backend_pid() AND pid NOT IN ({skip})")
    return [int(r["pid"]) for r in rows]


def lasting_sessions(session: Session, database: str, exclude: Sequence[int] = (),
                     grace: float = 2.0) -> list[int]:
    """Other sessions that are still there after `grace` seconds: a backend whose client just
    closed (ours included) lingers in pg_stat_activity for a moment and must not count."""
    deadline = time.monotonic() + grace
    while True:
        others = other_sessions(session, database, exclude)
        if not others or time.monotonic() >= deadline:
            return others
        time.sleep(0.05)


class SessionSampler:
    """Calls sample(session) every `interval` seconds, in a daemon thread with a session of its
    own, between __enter__ and __exit__ (lock watchers of §8 and §16). A failing sampling session
    ends the sampling quietly: samples only add to what the caller sees for itself."""

    def __init__(self, open_session: Callable[[], Session], interval: float, name: str) -> None:
        import threading

        self._open, self.interval = open_session, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self, session: Session) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            with self._open() as session:
                while not self._stop.wait(self.interval):
                    self.sample(session)
        except ConfitureError:
            pass


# ── the migrations tracking table (dbmate's Driver shape) ───────────────────────────────────
# One narrow interface over `<schema>.<table>` and its append-only log `<table>_log`: resolve,
# ensure, read, record, forget, log. Migrations (§8) and builds (§7) reach the table only
# through it. The *_sql methods give statements for callers that commit them in the same
# transaction as a migration's own SQL.

@record(frozen=True)
class AppliedRow:
    version: int
    name: str
    checksum: str
    applied_at: str
    applied_by: str
    duration_ms: int
    how: str    # "applied", "baseline" (recorded by hand) or "build" (built from the DDL)


@record(frozen=True)
class PartialRun:
    """A no-transaction migration that started but neither finished nor was repaired."""

    version: int
    name: str
    checksum: str
    done: int           # statements that completed
    total: int
    prefix: str         # sha256 of the completed statements' text
    at: str
    error: str | None


# Versions are whole numbers of any length (popx/ory names have 20 digits, past bigint):
# `numeric` stores them exactly and orders them numerically; Python ints carry them.
VERSION_TYPE = "numeric"
_TRACKING_COLUMNS = {"version", "name", "checksum", "applied_at", "applied_by", "duration_ms",
                     "how"}
# Events whose latest occurrence for a version that is not applied means "partly run".
_PARTIAL_EVENTS = ("started", "progress", "failed")
_DURATION_SQL = "(extract(epoch FROM clock_timestamp() - now()) * 1000)::integer"


def _json_literal(value: Mapping[str, Any]) -> str:
    return quote_literal(json.dumps(value, sort_keys=True)) + "::jsonb"


class TrackingTable:
    """The tracking table and its log in the database `session` is connected to,
    schema-qualified and quoted. `exists`/`has_log`: what resolve() found (ensure() makes
    both true); `schema_exists` and the `version` column types (`table_type`, `log_type`)
    are what ensure() needs to know, read by resolve() in the same round trip."""

    def __init__(self, session: Session, schema: str, table: str, exists: bool = True,
                 has_log: bool = True, schema_exists: bool = True,
                 table_type: str | None = None, log_type: str | None = None) -> None:
        self.session, self.schema, self.table = session, schema, table
        self.exists, self.has_log = exists, has_log
        self.schema_exists, self.table_type, self.log_type = schema_exists, table_type, log_type

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def log_table(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + '_log')}"

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.table}"

    @classmethod
    def resolve(cls, session: Session, configured: str) -> TrackingTable:
        """Qualify the configured table (unqualified: where search_path finds it, else the
        current schema); find whether it exists with our columns, its log, and what ensure()
        needs. One round trip; nothing is created."""
        schema, table = parse_table_name(configured)
        where = quote_literal(schema) if schema is not None else (
            "coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = to_regclass("
            f"{quote_literal(quote_ident(table))})), current_schema())")
        relation = ("FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = s.schema AND c.relname = ")
        attributes = ("FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN "
                      "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = s.schema "
                      "AND a.attnum > 0 AND NOT a.attisdropped AND c.relname = ")
        row = session.query(
            f"SELECT s.schema, (SELECT coalesce(json_agg(a.attname::text), '[]') "
            f"{attributes}{quote_literal(table)}) AS columns, "
            f"EXISTS (SELECT 1 {relation}{quote_literal(table + '_log')}) AS log, "
            "EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = s.schema) AS schema_exists, "
            + ", ".join(f"(SELECT format_type(a.atttypid, a.atttypmod) {attributes}"
                        f"{quote_literal(name)} AND a.attname = 'version') AS {alias}"
                        for name, alias in ((table, "table_type"), (table + "_log", "log_type")))
            + f" FROM (SELECT {where} AS schema) s")[0]
        if not row["schema"]:
            raise ConfigError("search_path names no existing schema for the tracking table",
                              hint="qualify [migrations] table, e.g. "
                                   "\"public.confiture_migrations\"")
        tracking = cls(session, str(row["schema"]), table)
        found = set(row["columns"] or [])
        if found and not _TRACKING_COLUMNS <= found:
            raise ConfigError(
                f"table {tracking.display} exists but is not a confiture tracking table "
                f"(it lacks {', '.join(sorted(_TRACKING_COLUMNS - found))})",
                hint="set [migrations] table to another name; to adopt a database migrated by "
                     "another tool, use 'confiture.py migrate baseline --to VERSION'")
        tracking.exists, tracking.has_log = bool(found), bool(row["log"])
        tracking.schema_exists = bool(row["schema_exists"])
        tracking.table_type, tracking.log_type = row["table_type"], row["log_type"]
        return tracking

    def ensure(self) -> None:
        """Create what is missing of the schema, the table and its log (the caller holds the
        migration lock, and resolved the table under it), and upgrade tables of earlier
        versions in place (_upgrade_sql), in one transaction; no round trip when nothing is
        missing. Existing objects are otherwise left alone: CREATE SCHEMA IF NOT EXISTS alone
        would need the CREATE privilege on the database even when it exists."""
        sql = []
        if not self.schema_exists:
            sql.append(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)};")
        if not self.exists:
            sql.append(
                f"CREATE TABLE IF NOT EXISTS {self.qualified} (\n"
                f"  version {VERSION_TYPE} PRIMARY KEY,\n  name text NOT NULL,\n"
                "  checksum text NOT NULL,\n"
                "  applied_at timestamptz NOT NULL DEFAULT now(),\n"
                "  applied_by text NOT NULL DEFAULT current_user,\n"
                "  duration_ms integer NOT NULL DEFAULT 0,\n"
                "  how text NOT NULL DEFAULT 'applied');")
        if not self.has_log:
            sql.append(
                f"CREATE TABLE IF NOT EXISTS {self.log_table} (\n"
                "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
                "  at timestamptz NOT NULL DEFAULT clock_timestamp(),\n"
                "  by text NOT NULL DEFAULT current_user,\n"
                f"  event text NOT NULL,\n  version {VERSION_TYPE},\n  name text,\n"
                "  checksum text,\n  detail jsonb);")
        sql += self._upgrade_sql(self.table_type, self.log_type)
        if sql:
            self.session.transaction("\n".join(sql))
        self.exists = self.has_log = self.schema_exists = True
        self.table_type = self.log_type = VERSION_TYPE

    def _upgrade_sql(self, table_type: str | None, log_type: str | None) -> list[str]:
        """Tables made before versions could exceed bigint have `version bigint`: widen them
        to numeric (a rewrite of two small tables). Reads never need it: both read as digits."""
        return [f"ALTER TABLE {relation} ALTER COLUMN version TYPE {VERSION_TYPE} "
                f"USING version::{VERSION_TYPE};"
                for relation, found in ((self.qualified, table_type), (self.log_table, log_type))
                if found is not None and found != VERSION_TYPE]

    def read(self) -> tuple[list[AppliedRow], list[PartialRun]]:
        """Applied rows in version order, and interrupted no-transaction runs (one round
        trip; none without the table)."""
        if not self.exists:
            return [], []
        applied_sql = copy_rows_sql(
            "SELECT version, name, checksum, to_char(applied_at, 'YYYY-MM-DD HH24:MI:SS TZ'), "
            f"applied_by, duration_ms, how FROM {self.qualified} ORDER BY version")
        rows, *partial = self.session.pipeline(
            [applied_sql, self._partial_sql()] if self.has_log else [applied_sql])
        applied = [AppliedRow(int(r[0] or 0), r[1] or "", r[2] or "", r[3] or "", r[4] or "",
                              int(r[5] or 0), r[6] or "") for r in copy_rows(rows)]
        return applied, self._partial_runs(partial[0]) if partial else []

    def _partial_sql(self) -> str:
        return (
            "SELECT coalesce(json_agg(p ORDER BY p.version), '[]') FROM ("
            "SELECT DISTINCT ON (l.version) l.version, l.name, l.checksum, l.event, l.detail, "
            "to_char(l.at, 'YYYY-MM-DD HH24:MI:SS') AS at "
            f"FROM {self.log_table} l WHERE l.version IS NOT NULL AND NOT EXISTS "
            f"(SELECT 1 FROM {self.qualified} t WHERE t.version = l.version) "
            "ORDER BY l.version, l.id DESC) p "
            f"WHERE p.event IN ({', '.join(quote_literal(e) for e in _PARTIAL_EVENTS)})")

    @staticmethod
    def _partial_runs(lines: Sequence[str]) -> list[PartialRun]:
        found = json.loads("\n".join(lines)) if lines else []
        partial = []
        for p in found:
            detail = p.get("detail") or {}
            partial.append(PartialRun(version=int(p["version"]), name=p["name"] or "",
                                      checksum=p["checksum"] or "",
                                      done=int(detail.get("done", 0)),
                                      total=int(detail.get("total", 0)),
                                      prefix=str(detail.get("prefix", "")), at=p["at"],
                                      error=detail.get("error")))
        return partial

    def log_sql(self, event: str, item: Migration | AppliedRow | PartialRun | None,
                detail: Mapping[str, Any] | None = None) -> str:
        """An INSERT of one event into the log."""
        version = str(item.version) if item else "NULL"
        name = quote_literal(item.name) if item else "NULL"
        checksum = quote_literal(item.checksum) if item else "NULL"
        return (f"INSERT INTO {self.log_table} (event, version, name, checksum, detail) VALUES "
                f"({quote_literal(event)}, {version}, {name}, {checksum}, "
                f"{_json_literal(detail) if detail else 'NULL'});")

    def record_sql(self, migration: Migration, how: str = "applied",
                   duration: str = _DURATION_SQL,
                   detail: Mapping[str, Any] | None = None) -> list[str]:
        """Record `migration` as applied (its row and its log event, with `detail`)."""
        return [(f"INSERT INTO {self.qualified} (version, name, checksum, duration_ms, how) "
                 f"VALUES ({migration.version}, {quote_literal(migration.name)}, "
                 f"{quote_literal(migration.checksum)}, {duration}, {quote_literal(how)});"),
                self.log_sql(how, migration, detail)]

    def forget_sql(self, item: Migration | AppliedRow, event: str = "reverted",
                   detail: Mapping[str, Any] | None = None) -> list[str]:
        """Remove `item`'s row (dbmate's DeleteMigration) and log why."""
        return [f"DELETE FROM {self.qualified} WHERE version = {item.version};",
                self.log_sql(event, item, detail)]

    def accept_sql(self, migration: Migration, row: AppliedRow) -> list[str]:
        """Record the file's current checksum for an applied migration, logging the old one."""
        return [(f"UPDATE {self.qualified} SET checksum = {quote_literal(migration.checksum)} "
                 f"WHERE version = {migration.version};"),
                self.log_sql("repair", migration, {"action": "checksum", "old": row.checksum})]

    def record(self, migrations: Sequence[Migration], how: str) -> None:
        """Record migrations as applied without running them (baseline, build), in one
        transaction."""
        self.write([sql for m in migrations for sql in self.record_sql(m, how, duration="0")])

    def log(self, event: str, item: Migration | AppliedRow | PartialRun | None,
            detail: Mapping[str, Any] | None = None) -> None:
        self.session.execute(self.log_sql(event, item, detail))

    def write(self, statements: Sequence[str]) -> None:
        """Statements from the *_sql methods, committed together or not at all."""
        if statements:
            self.session.transaction("\n".join(statements))


# ════════════════════════════════════════════════════════════════════════════════════════════
# §6 Build
# Renders an environment's file set into one deterministic SQL script (header: env, hash,
# files) and a LineMap back to the original files. Each file starts from a clean session
# state, as if run on its own with psql -f.
# ════════════════════════════════════════════════════════════════════════════════════════════

_FILE_PRELUDE = "RESET ALL;\nSET client_min_messages = warning;\n"


@record(frozen=True)
class Build:
    env: str
    hash: str
    script: str
    line_map: LineMap
    files: tuple[SqlFile, ...]


def render_build(fileset: FileSet, guard: SqlGuard,
                 read: Callable[[Path], bytes] | None = None) -> Build:
    """The env's files concatenated under a header, with a map from script lines to files.
    Each file is followed by a lone ';' so a missing final semicolon cannot glue two files.
    Every file passes the meta-command guard first (§4 guard_sql)."""
    read = read or (lambda p: p.read_bytes())
    built = [f for f in fileset.files if f.kind != "migration"]
    migrations = len(fileset.files) - len(built)
    header = [
        f"-- confiture build (format {BUILD_FORMAT})",
        f"-- env: {fileset.env}",
        f"-- hash: {fileset.hash}",
        f"-- seeds: {'yes' if fileset.seeds else 'no'}",
        f"-- files: {len(built)}",
        *(f"--   {f.rel}  {f.sha256[:12]}" for f in built),
        *([f"-- migration files: {migrations} (recorded as applied after the build)"]
          if migrations else []),
        "",
    ]
    lines: list[str] = list(header)
    chunks: list[tuple[int, str, int]] = []
    for item in built:
        data = read(item.path)
        if sha256_bytes(data) != item.sha256:  # the template is named after what was hashed
            raise InputError(f"{item.rel} changed while it was being read for the build",
                             hint="run the command again")
        text = data.decode("utf-8").removeprefix("\ufeff")
        text = text.replace("\r\n", "\n")
        guard_sql(split_sql(text), item.path, item.rel, guard)
        lines.append(f"-- ==== {item.rel}")
        lines.extend(_FILE_PRELUDE.rstrip("\n").split("\n"))
        chunks.append((len(lines) + 1, item.rel, 1))
        body = text.split("\n")
        if body and body[-1] == "":
            body.pop()
        lines.extend(body)
        lines.append(";")
        lines.append("")
    script = "\n".join(lines) + "\n"
    return Build(env=fileset.env, hash=fileset.hash, script=script,
                 line_map=LineMap(tuple(chunks), tuple(lines)), files=tuple(built))


def build_path(config: Config, env: str, seeds: bool = True) -> Path:
    return config.generated_dir / (f"schema_{env}.sql" if seeds else f"schema_{env}_schema_only.sql")


def write_build(build: Build, path: Path) -> Path:
    write_atomic(path, build.script.encode("utf-8"))
    return path


# ════════════════════════════════════════════════════════════════════════════════════════════
# §7 Templates and clones
# Template databases named <project>_tpl_<env>_<hash12>: built under <name>_tmp in one
# transaction, published atomically (rename + IS_TEMPLATE + ALLOW_CONNECTIONS false), with
# JSON metadata in the database comment. A lock per template name means concurrent runs build
# it once. Clones are CREATE DATABASE … TEMPLATE with the fastest strategy for the server.
# ════════════════════════════════════════════════════════════════════════════════════════════

TEMPLATE_MARK = "confiture-template"
_RESERVED_DBS = {"postgres", "template0", "template1"}


def template_name(project: str, env: str, input_hash: str) -> str:
    return f"{project}_tpl_{env}_{input_hash[:12]}"


def template_prefix(project: str, env: str | None = None) -> str:
    return f"{project}_tpl_" + (f"{env}_" if env else "")


@record(frozen=True)
class TemplateInfo:
    name: str
    env: str
    hash: str
    size: int
    built_at: str
    files: int
    seeds: bool
    build_seconds: float
    order: int = 0  # publishing transaction id: newer builds have larger ones (0: unknown)


@record(frozen=True)
class TemplateResult:
    name: str
    built: bool
    seconds: float
    files: int


def template_probe(session: Session, name: str) -> dict[str, Any]:
    """The one catalog query of the fast path: does it exist, and how to clone it."""
    rows = session.query(
        "SELECT d.datistemplate AS is_template, shobj_description(d.oid, 'pg_database') AS "
        "comment, d.datallowconn AS open, d.oid::bigint AS oid, current_setting('fsync') AS "
        "fsync, current_setting('server_version_num')::int AS version "
        f"FROM (SELECT 1) AS one LEFT JOIN pg_database d ON d.datname = {quote_literal(name)}")
    if rows[0]["is_template"] and rows[0]["open"]:
        _close_template(session, name)
    return rows[0]


def _close_template(session: Session, name: str) -> None:
    """A published template accepting connections was left so by a diff killed mid-dump
    (_dump_template_in_place): close it again, unless a dump is running now — in any session,
    this one included (advisory locks are re-entrant, so trying the lock is not enough)."""
    lock = f"template-dump:{name}"
    if session.value(
            f"SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks l WHERE {lock_row_sql('l', lock)}) "
            f"THEN false ELSE pg_try_advisory_lock({lock_key_sql(lock)}) END"):
        try:
            session.execute(f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS false")
        finally:
            release_lock(session, lock)


def clone_strategy(config: Config, probe: Mapping[str, Any]) -> str | None:
    """FILE_COPY when fsync is off (faster at every size) or the template is ≥ 100 MB;
    WAL_LOG otherwise (no forced checkpoints on a busy server). None before PostgreSQL 15."""
    if int(probe["version"]) < 150000:
        return None
    if config.template_strategy != "auto":
        return config.template_strategy
    size = 0
    try:
        size = int(json.loads(probe.get("comment") or "{}").get("size", 0))
    except (ValueError, AttributeError):
        pass
    return "file_copy" if probe["fsync"] == "off" or size >= 100 * 2**20 else "wal_log"


def ensure_template(ws: Workspace, rebuild: bool = False, seeds: bool = True,
                    fileset: FileSet | None = None, session: Session | None = None,
                    cached: bool = False) -> tuple[TemplateResult, dict[str, Any]]:
    """Make sure the env's current template exists; build it (once, under a lock) if not.
    Returns the result and the catalog probe of the template. The fast path is one catalog
    query on `session` (an admin session; opened here when not given). `cached`: name the
    template from the scan cache (read-only reports); a build still reads every file."""
    if session is None:
        with admin_session(ws) as own:
            return ensure_template(ws, rebuild, seeds, fileset, own, cached)
    started = time.monotonic()
    fileset = fileset or scan_env(ws.config, ws.env.name, seeds=seeds,
                                  cache=scan_cache(ws.config, ws.env.name, seeds) if cached
                                  else None)
    name = template_name(ws.config.project, ws.env.name, fileset.hash)
    probe = template_probe(session, name)
    if probe["is_template"] and not rebuild:
        return TemplateResult(name, False, time.monotonic() - started, len(fileset.files)), probe
    if cached:
        return ensure_template(ws, rebuild, seeds, None, session)
    acquire_lock(session, f"template:{name}", ws.config.template_lock_timeout,
                 f"the build of template {name}", ws.console.info)
    try:
        probe = template_probe(session, name)
        if probe["is_template"] and not rebuild:  # another run built it while we waited
            return (TemplateResult(name, False, time.monotonic() - started,
                                   len(fileset.files)), probe)
        _build_template(ws, session, name, fileset, clone_strategy(ws.config, probe))
        probe = template_probe(session, name)
    finally:
        release_lock(session, f"template:{name}")
    prune_templates(ws, session, ws.config.templates_keep, env_name=ws.env.name, keep_name=name)
    return TemplateResult(name, True, time.monotonic() - started, len(fileset.files)), probe


def record_built_migrations(ws: Workspace, database: str) -> None:
    """A database built from the DDL is at the state every migration leads to: record them
    all as applied (how = 'build'), so `migrate up` later applies only newer ones."""
    migrations = scan_migrations(ws.config.migrations_dir, ws.config.root).migrations
    if migrations:
        with ws.client.session(database) as session:
            tracking = TrackingTable.resolve(session, ws.config.migrations_table)
            tracking.ensure()
            tracking.record(migrations, how="build")


def _build_template(ws: Workspace, session: Session, name: str, fileset: FileSet,
                    strategy: str | None) -> None:
    tmp = f"{name}_tmp"
    started = time.monotonic()
    ws.console.info(f"building template {name} from {len(fileset.files)} files …")
    build = render_build(fileset, sql_guard(ws.config))
    drop_database(session, tmp, force=True)
    session.execute(f"CREATE DATABASE {quote_ident(tmp)} TEMPLATE template0"
                    + (f" STRATEGY {strategy}" if strategy else ""))
    try:
        ws.client.run_script(build.script, tmp, build.line_map)
        record_built_migrations(ws, tmp)
    except BaseException as exc:
        drop_database(session, tmp, force=True)
        if isinstance(exc, SqlError) and exc.hint is None and \
                exc.location.rpartition(":")[0] in {f.rel for f in build.files
                                                    if f.kind == "seed"}:
            exc.hint = (f"a seed file of env {ws.env.name} no longer fits the schema the DDL "
                        "builds (a renamed or dropped column, say): update it")
        raise
    size = int(session.value(f"SELECT pg_database_size({quote_literal(tmp)})"))
    meta = {"mark": TEMPLATE_MARK, "env": ws.env.name, "hash": fileset.hash,
            "files": len(fileset.files), "seeds": fileset.seeds, "size": size,
            "built_at": utc_now(), "build_seconds": round(time.monotonic() - started, 3),
            "tool": __version__}
    existing = session.value(f"SELECT count(*) FROM pg_database WHERE datname = {quote_literal(name)}")
    if existing:
        drop_database(session, name, force=True)
    session.execute("BEGIN")
    try:
        session.execute(
            f"ALTER DATABASE {quote_ident(tmp)} RENAME TO {quote_ident(name)};\n"
            f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
        # Builds are ordered by the id of the transaction that publishes them: it strictly
        # increases on a server (built_at has one-second steps, and clients' clocks differ).
        meta["order"] = int(session.value("SELECT txid_current()"))
        session.execute(
            f"COMMENT ON DATABASE {quote_ident(name)} IS {quote_literal(json.dumps(meta))};\n"
            "COMMIT")
    except ConfitureError:  # (interrupted: psql ends with the session, and so does the BEGIN)
        session.execute("ROLLBACK")
        raise
    ws.console.info(f"built template {name} in {format_seconds(time.monotonic() - started)} "
                    f"({format_bytes(size)})")


def list_templates(session: Session, project: str, env_name: str | None = None) -> list[TemplateInfo]:
    """Our templates on this server, newest first (identified by name prefix and comment)."""
    prefix = template_prefix(project, env_name)
    rows = session.query(
        "SELECT datname, shobj_description(oid, 'pg_database') AS comment FROM pg_database "
        f"WHERE datistemplate AND starts_with(datname, {quote_literal(prefix)})")
    found = []
    for row in rows:
        try:
            meta = json.loads(row["comment"] or "")
        except ValueError:
            continue
        if not isinstance(meta, dict) or meta.get("mark") != TEMPLATE_MARK:
            continue
        found.append(TemplateInfo(name=row["datname"], env=str(meta.get("env")),
                                  hash=str(meta.get("hash")), size=int(meta.get("size", 0)),
                                  built_at=str(meta.get("built_at")), files=int(meta.get("files", 0)),
                                  seeds=bool(meta.get("seeds", True)),
                                  build_seconds=float(meta.get("build_seconds", 0)),
                                  order=int(meta.get("order", 0))))
    found.sort(key=lambda t: (t.order, t.built_at, t.name), reverse=True)
    return found


def current_templates(config: Config, env_name: str) -> set[str] | None:
    """The names of the env's templates that match its files now (with and without its seed
    sets: reset and diff --migrations use both); None when the env or its files cannot be
    read (then none of its templates may be assumed stale)."""
    if env_name not in config.envs:
        return set()
    try:
        return {template_name(config.project, env_name, scan_env(config, env_name, seeds).hash)
                for seeds in (True, False)}
    except ConfitureError:
        return None


def prune_templates(ws: Workspace, session: Session, keep: int, env_name: str | None = None,
                    keep_name: str | None = None) -> list[str]:
    """Drop all but the newest `keep` templates per env, and leftovers of killed builds
    (<name>_tmp whose build lock is free). Never dropped: `keep_name`, and a template that
    matches its env's current files (the next reset, clone or diff would rebuild it)."""
    dropped: list[str] = []
    by_env: dict[str, list[TemplateInfo]] = {}
    for info in list_templates(session, ws.config.project, env_name):
        by_env.setdefault(info.env, []).append(info)
    for env, infos in by_env.items():
        current = current_templates(ws.config, env)
        if current is None:
            ws.console.debug(f"templates of env {env} not pruned: its files cannot be read")
            continue
        current.add(keep_name or "")
        kept = [t for t in infos if t.name in current]
        for info in infos:
            if info.name in current:
                continue
            if len(kept) < keep:
                kept.append(info)
                continue
            drop_database(session, info.name, force=False)
            dropped.append(info.name)
    prefix = template_prefix(ws.config.project, env_name)
    leftovers = session.query(
        f"SELECT datname FROM pg_database WHERE starts_with(datname, {quote_literal(prefix)}) "
        "AND datname LIKE '%\\_tmp'")
    for row in leftovers:
        base = row["datname"][:-4]
        if session.value(f"SELECT pg_try_advisory_lock({lock_key_sql('template:' + base)})"):
            try:
                drop_database(session, row["datname"], force=True)
                dropped.append(row["datname"])
            finally:
                release_lock(session, "template:" + base)
    if dropped:
        ws.console.debug("pruned " + ", ".join(dropped))
    return dropped


def _protected_databases(config: Config, environ: Mapping[str, str]
                         ) -> dict[tuple[str, str, str], str]:
    """(host, port, database) → env name, for protected envs whose URL resolves here."""
    found = {}
    for spec in config.envs.values():
        if spec.protected:
            try:
                conn = ConnInfo.parse(expand_vars(spec.url, f"env.{spec.name}.url", environ))
            except ConfigError:
                continue
            db = conn.dbname(environ)
            if db:
                found[(*conn.server_identity(environ), db)] = spec.name
    return found


def check_clone_target(ws: Workspace, target: str) -> None:
    """Refuse to create or replace databases that must never be overwritten."""
    check_db_name(target)
    if target in _RESERVED_DBS or target == ws.env.maintenance_db:
        raise Refused(f"refusing to overwrite system database {target!r}")
    if target.startswith(template_prefix(ws.config.project)):
        raise Refused(f"{target!r} is a template name; choose another database name")
    protected = _protected_databases(ws.config, ws.client.environ)
    key = (*ws.env.conn.server_identity(ws.client.environ), target)
    if key in protected:
        raise Refused(f"{target!r} is the database of protected environment "
                      f"{protected[key]!r}")


def clone_database(ws: Workspace, target: str, replace: bool = False, force: bool = False,
                   what: str = "clone", session: Session | None = None
                   ) -> tuple[TemplateResult, float]:
    """CREATE DATABASE target from the env's current template; (template result, clone s).
    A test suite that clones often passes one admin `session` for all its clones."""
    if session is None:
        with admin_session(ws) as own:
            return clone_database(ws, target, replace, force, what, own)
    check_clone_target(ws, target)
    # Files scanned before the first question to the server: psql connects meanwhile.
    fileset = scan_env(ws.config, ws.env.name)
    _refuse_clone_target(session, target, replace, force)  # before a template build, and
    result, probe = ensure_template(ws, fileset=fileset, session=session)  # again below
    strategy = clone_strategy(ws.config, probe)
    started = time.monotonic()
    lock = f"database:{target}"
    acquire_lock(session, lock, ws.config.template_lock_timeout, f"{what} of {target}",
                 ws.console.info)
    try:
        if _refuse_clone_target(session, target, replace, force):
            drop_database(session, target, force=force)
        session.execute(f"CREATE DATABASE {quote_ident(target)} TEMPLATE "
                        f"{quote_ident(result.name)}"
                        + (f" STRATEGY {strategy}" if strategy else ""))
    finally:
        release_lock(session, lock)
    return result, time.monotonic() - started


def _refuse_clone_target(session: Session, target: str, replace: bool, force: bool) -> bool:
    """Whether TARGET exists (to be replaced); Refused when it may not be."""
    if not database_exists(session, target):
        return False
    if not replace:
        raise Refused(f"database {target!r} already exists",
                      hint="pass --replace to drop and recreate it")
    others = [] if force else lasting_sessions(session, target)
    if others:
        raise Refused(f"database {target!r} has {len(others)} other session(s)",
                      hint="close them, or pass --force to terminate them")
    return True


def reset_env_database(ws: Workspace, force: bool = False) -> tuple[TemplateResult, float]:
    """Recreate the env's own database from its current template (make db-reset)."""
    refuse_protected(ws.env, "reset")
    return clone_database(ws, ws.env.database, replace=True, force=force, what="reset")


# ════════════════════════════════════════════════════════════════════════════════════════════
# §7b Backups
# pg_dump -Fc under a temporary name, read back (pg_restore --list) and hashed, then published
# dump first and JSON sidecar last: only a dump with a complete sidecar is a backup. Backups
# sit below migrations (§8) because a migration run on a protected env takes one itself,
# under its lock, once it knows something will run; restore (§9) builds on them.
# ════════════════════════════════════════════════════════════════════════════════════════════

BACKUP_SUFFIX = ".dump"
SIDECAR_SUFFIX = ".json"
_STAMP = "%Y%m%dT%H%M%SZ"


class BackupError(PgError):
    """A backup could not be written, read back or verified (exit 1)."""


@record(frozen=True)
class Backup:
    """A complete backup: the dump file and what its sidecar records."""

    path: Path
    sha256: str
    size: int
    created_at: str
    server_version: str
    migration_version: str | None
    tool_version: str
    env: str
    database: str
    compression: int
    seconds: float

    def sidecar(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "size": self.size,
                "created_at": self.created_at, "server_version": self.server_version,
                "migration_version": self.migration_version, "tool_version": self.tool_version,
                "env": self.env, "database": self.database, "format": "custom",
                "compression": self.compression, "seconds": round(self.seconds, 3),
                "complete": True}


def qualified_name(name: str) -> str:
    """'schema.table' or 'table' → quoted identifiers."""
    return ".".join(quote_ident(part) for part in name.split("."))


def sidecar_path(dump: Path) -> Path:
    return dump.with_name(dump.name + SIDECAR_SUFFIX)


def backup_folder(config: Config, env_name: str,
                  environ: Mapping[str, str] = os.environ) -> Path:
    """The env's `backups` folder, else <[backups] dir>/<env>, relative to the project root."""
    spec = config.envs[env_name]
    if spec.backups:
        return config.root / expand_vars(spec.backups, f"env.{env_name}.backups", environ)
    return config.root / expand_vars(config.backups_dir, "backups.dir", environ) / env_name


def read_sidecar(dump: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar_path(dump).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_backup(dump: Path) -> Backup | None:
    """The backup `dump` is, or None unless its sidecar is complete and the size matches."""
    data = read_sidecar(dump)
    try:
        size = dump.stat().st_size
    except OSError:
        return None
    if (data is None or data.get("complete") is not True or data.get("size") != size
            or not isinstance(data.get("sha256"), str)):
        return None
    version = data.get("migration_version")
    return Backup(path=dump, sha256=data["sha256"], size=size,
                  created_at=str(data.get("created_at", "")),
                  server_version=str(data.get("server_version", "")),
                  migration_version=None if version is None else str(version),
                  tool_version=str(data.get("tool_version", "")), env=str(data.get("env", "")),
                  database=str(data.get("database", "")),
                  compression=int(data.get("compression", -1)),
                  seconds=float(data.get("seconds", 0.0)))


def list_backups(folder: Path) -> list[Backup]:
    """The complete backups in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [b for p in folder.glob("*" + BACKUP_SUFFIX) if (b := read_backup(p))]
    found.sort(key=lambda b: (b.created_at, natural_key(b.path.name)), reverse=True)
    return found


def newest_backup(config: Config, env_name: str,
                  environ: Mapping[str, str] = os.environ) -> Backup | None:
    """The env's newest complete backup (what `restore latest` and `status` use)."""
    backups = list_backups(backup_folder(config, env_name, environ))
    return backups[0] if backups else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def backup_filename(project: str, env: str, stamp: str, seq: int = 0) -> str:
    return f"{project}_{env}_{stamp}{f'_{seq + 1}' if seq else ''}{BACKUP_SUFFIX}"


def utc_stamp(when: float | None = None) -> str:
    return time.strftime(_STAMP, time.gmtime(when))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_folder(folder: Path) -> None:
    """Create the backup folder, or say clearly why it cannot hold a backup."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create backup folder {folder}: {exc.strerror}",
                          hint="set env.<name>.backups or [backups] dir to a writable folder"
                          ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackupError(f"backup folder {folder} is not writable",
                          hint="set env.<name>.backups or [backups] dir to a writable folder")


def _tool_failure(what: str, returncode: int, stderr: str, password: str | None) -> str:
    text = stderr.strip()
    text = mask_password_in(text, password)
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = " (file size limit: the disk or quota is full)" if name == "SIGXFSZ" else ""
        return f"{what} was killed by {name}{why}" + (f": {text}" if text else "")
    lines = [re.sub(r"^(pg_dump|pg_restore): (error: )?", "", line) for line in text.splitlines()]
    return f"{what} failed: " + ("; ".join(x for x in lines[:3] if x) or f"exit {returncode}")


def wait_tool(ws: Workspace, proc: subprocess.Popen[bytes], errfile: Any, what: str,
               progress: Path | None = None) -> None:
    """Wait for a dump/restore, showing the output size on a terminal; stop it on interrupt."""
    show = progress is not None and ws.console.is_terminal() and not ws.console.quiet
    try:
        while show:
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                if show and progress is not None and progress.exists():
                    ws.console.err.write(f"\r{what}: {format_bytes(progress.stat().st_size)} …  ")
                    ws.console.err.flush()
        proc.wait()  # blocking: no polling latency when there is no progress to show
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if show:
            ws.console.err.write("\r\033[K")
    if proc.returncode != 0:
        errfile.seek(0)
        stderr = errfile.read().decode("utf-8", "replace")
        raise BackupError(_tool_failure(what, proc.returncode, stderr, ws.client.password))


def start_dump(ws: Workspace, dbname: str, path: Path, compression: int,
               errfile: Any) -> subprocess.Popen[bytes]:
    """Start pg_dump -Fc of one database of the env's server into `path`; wait for it with
    wait_tool. The file is not synced to disk (--no-sync): the caller syncs it while it hashes
    and lists it (see create_backup), which saves most of the sync's time."""
    argv = pg_dump_argv(ws.client.tools, ws.env.conn, dbname, "-Fc", f"-Z{compression}",
                        "--no-sync", "-f", str(path))
    return ws.client.spawn(argv, dbname, stderr=errfile)


def _sidecar_migration_version(ws: Workspace, session: Session) -> str | None:
    """The newest applied migration version, read from the tracking table (None without
    one). A backup must not fail over the tracking table, so its problems only cost the
    version."""
    try:
        applied, _ = TrackingTable.resolve(session, ws.config.migrations_table).read()
    except ConfigError as exc:
        ws.console.warn(f"migration version not recorded in the backup: {exc.message}")
        return None
    return str(applied[-1].version) if applied else None


def _backup_facts(ws: Workspace, session: Session | None) -> tuple[str, str | None]:
    """(server version, applied migration version) for the sidecar."""
    if session is None:
        with ws.client.session(ws.env.database) as own:
            return _backup_facts(ws, own)
    version = str(session.value("SELECT current_setting('server_version')"))
    return version, _sidecar_migration_version(ws, session)


def check_listing(ws: Workspace, path: Path, meanwhile: Callable[[], None] | None = None) -> None:
    """pg_restore must read the archive's table of contents; `meanwhile` runs while it does."""
    with scratch_file() as errfile:
        proc = ws.client.spawn(pg_restore_argv(ws.client.tools, ws.env.conn, None, "--list", str(path)), None,
                               stderr=errfile)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            code = proc.wait()
        if code != 0:
            errfile.seek(0)
            raise BackupError(f"{path} is not a readable pg_dump archive: "
                              + _tool_failure("pg_restore --list", code,
                                              errfile.read().decode("utf-8", "replace"), None))


def _publish(tmp: Path, final: Path, exclusive: bool) -> None:
    """Rename tmp to final; with `exclusive`, fail with FileExistsError instead of replacing."""
    if not exclusive:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic create-if-absent: two backups in one second never clash
    except FileExistsError:
        raise
    except OSError:
        if final.exists():
            raise FileExistsError(str(final)) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


# Over 60 lines: the dump, its read-back, hashing and syncing run at once, and one try/finally
# must remove every partial file on any failure; split, the cleanup would be spread out.
def create_backup(ws: Workspace, output: Path | None = None,
                  session: Session | None = None) -> Backup:
    """Back up the env's database into its backup folder (or `output`). The dump is written
    under a temporary name, read back and hashed, then published with its sidecar; on any
    failure nothing is left behind and BackupError says why."""

    started = time.monotonic()
    compression = ws.config.backups_compression
    folder = output.parent if output else backup_folder(ws.config, ws.env.name, ws.client.environ)
    if output is not None and (output.exists() or sidecar_path(output).exists()):
        raise Refused(f"{output} already exists; a backup never overwrites a file",
                      hint="choose another -o FILE, or leave -o out to use the backup folder")
    _prepare_folder(folder)
    stamp = utc_stamp()
    tmp = folder / f".{stamp}.{os.getpid()}.dump.tmp"
    side_tmp = folder / f".{stamp}.{os.getpid()}.json.tmp"
    published: Path | None = None
    try:
        with scratch_file() as errfile:
            proc = start_dump(ws, ws.env.database, tmp, compression, errfile)
            try:
                server_version, migration_version = _backup_facts(ws, session)  # meanwhile
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wait_tool(ws, proc, errfile, f"pg_dump of {ws.env.database}", progress=tmp)
        synced = Background(lambda: fsync_file(tmp))  # the disk works while we hash and list
        digests: list[str] = []
        try:
            check_listing(ws, tmp, meanwhile=lambda: digests.append(sha256_file(tmp)))
        finally:
            synced.wait()
        synced.result()
        digest, size = digests[0], tmp.stat().st_size
        for seq in range(1000):
            final = output or folder / backup_filename(ws.config.project, ws.env.name, stamp, seq)
            backup = Backup(path=final, sha256=digest, size=size, created_at=utc_now(),
                            server_version=server_version, migration_version=migration_version,
                            tool_version=__version__, env=ws.env.name, database=ws.env.database,
                            compression=compression, seconds=time.monotonic() - started)
            side_tmp.write_text(json.dumps(backup.sidecar(), indent=2) + "\n", encoding="utf-8")
            try:
                _publish(tmp, final, exclusive=True)
            except FileExistsError:
                if output is not None:
                    raise Refused(f"{output} already exists; a backup never overwrites a "
                                  "file") from None
                continue
            published = final
            os.replace(side_tmp, sidecar_path(final))  # the sidecar last: now it is a backup
            published = None
            _fsync_dir(folder)
            return backup
        raise BackupError(f"cannot find a free backup name in {folder}")
    except OSError as exc:
        raise BackupError(f"cannot write the backup in {folder}: {exc.strerror}",
                          hint="check the free space and permissions of the backup folder"
                          ) from exc
    finally:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        if published is not None:
            published.unlink(missing_ok=True)


def prune_backups(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups (sidecar first, so a crash leaves at most an
    unlisted dump), and leftovers: temporary files of dead runs, dumps without a sidecar."""
    removed: list[Path] = []
    for backup in list_backups(folder)[keep:]:
        sidecar_path(backup.path).unlink(missing_ok=True)
        backup.path.unlink(missing_ok=True)
        removed.append(backup.path)
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        stale = now - path.stat().st_mtime > 3600 if path.exists() else False
        parts = path.name.split(".")  # .<stamp>.<pid>.dump.tmp
        leftover = (path.name.startswith(".") and path.name.endswith(".tmp")
                    and not pid_alive(parts[2] if len(parts) >= 4 else ""))
        orphan = path.suffix == BACKUP_SUFFIX and read_backup(path) is None and stale
        if leftover or orphan:
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            removed.append(path)
    return removed


# ════════════════════════════════════════════════════════════════════════════════════════════
# §8 Migrations
# Versioned up/down SQL files (§4 finds them: flat V_name.up.sql or Diesel folders V_name/up.sql)
# applied through one psql Session under the per-database "migrate" advisory lock, recorded
# through §5's TrackingTable. Each migration and its tracking row commit together; no-transaction migrations run statement by statement with
# their progress logged, so an interrupted one resumes where it stopped. Planning is pure.
# ════════════════════════════════════════════════════════════════════════════════════════════

# '-- confiture:allow RULE reason': a lint finding accepted for one statement (§8b checks
# the rule; the applied row's log records what was allowed)
ALLOW_RE = re.compile(r"--[ \t]*confiture:allow\b[ \t]*([\w-]*)[ \t]*([^\n]*)", re.IGNORECASE)


def statement_lock_timeout(config: Config, env: Env) -> float | None:
    """lock_timeout for every migration statement: [migrations] statement_lock_timeout, else
    5 s on a protected env (DDL queued behind a long transaction blocks every query after
    it) and none elsewhere. 0 turns it off."""
    value = config.migrations_statement_lock_timeout
    if value is None:
        return 5.0 if env.protected else None
    return value or None


class MigrationError(PgError):
    """A migration failed; `done` lists the versions that were applied or reverted before it."""

    def __init__(self, message: str, done: Sequence[int] = (), hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.done = tuple(done)


class MigrationInterrupted(Interrupted):
    """Ctrl-C or SIGTERM while a migration ran: which one, and what was applied before it
    (a deploy names it as the failing step)."""

    def __init__(self, label: str, transactional: bool, done: Sequence[int]) -> None:
        super().__init__(f"interrupted while applying {label}")
        self.label, self.transactional, self.done = label, transactional, tuple(done)


def migration_rel(config: Config, path: Path | None) -> str:
    if path is None:
        return "(none)"
    try:
        return path.relative_to(config.root).as_posix()
    except ValueError:
        return str(path)


def new_migration(config: Config, name: str, now: float | None = None,
                  bodies: tuple[str, str] | None = None) -> list[Path]:
    """Create <UTC yyyymmddHHMMSS>_<name>.up.sql and .down.sql (or a folder, when the
    project's newest migration is a folder), with `bodies` or a placeholder; never
    overwrites."""
    slug = slugify(name)
    if not slug:
        raise ConfigError(f"migration name {name!r} has no letters or digits")
    files = scan_migrations(config.migrations_dir, config.root).migrations
    folder_layout = bool(files) and files[-1].layout == "folder"
    stamp = int(now if now is not None else time.time())
    existing = {m.version for m in files}
    while True:
        version = time.strftime("%Y%m%d%H%M%S", time.gmtime(stamp))
        if int(version) not in existing:
            break
        stamp += 1
    base = config.migrations_dir / f"{version}_{slug}"
    if folder_layout:
        paths = [base / "up.sql", base / "down.sql"]
    else:
        paths = [base.with_name(base.name + ".up.sql"), base.with_name(base.name + ".down.sql")]
    if bodies is None:
        bodies = (f"-- {version}_{slug}: up\n", f"-- {version}_{slug}: revert what up.sql did\n")
    for path, body in zip(paths, bodies):
        if path.exists():
            raise Refused(f"{path} already exists")
        write_atomic(path, body.encode())
    return paths


_TXN_CONTROL = {"BEGIN", "COMMIT", "END", "ABORT", "ROLLBACK"}


def transaction_control(words: Sequence[str]) -> bool:
    """BEGIN/COMMIT/ROLLBACK/…: these would end the transaction we wrap a migration in."""
    if not words:
        return False
    if words[0] == "ROLLBACK" and words[1:2] == ("TO",):
        return False  # ROLLBACK TO SAVEPOINT stays inside our transaction
    return words[0] in _TXN_CONTROL or tuple(words[:2]) == ("START", "TRANSACTION") \
        or tuple(words[:2]) == ("PREPARE", "TRANSACTION")


def needs_no_transaction(words: Sequence[str]) -> bool:
    """Statements PostgreSQL refuses inside a transaction block."""
    w = tuple(words)
    if w[:1] in (("VACUUM",), ("CLUSTER",)) and "CONCURRENTLY" not in w:
        return w[0] == "VACUUM"
    return ((w[:1] in (("CREATE",), ("DROP",), ("REINDEX",)) and "CONCURRENTLY" in w[:5]
             and "MATERIALIZED" not in w)
            or w[:2] in (("CREATE", "DATABASE"), ("DROP", "DATABASE"), ("ALTER", "SYSTEM"),
                         ("CREATE", "TABLESPACE"), ("DROP", "TABLESPACE")))


def migration_statements(migration: Migration, which: str = "up", root: Path | None = None,
                         needed: Callable[[str], bool] | None = None
                         ) -> tuple[list[Statement], bool]:
    """The statements of a migration's up or down file and whether it runs in a transaction.
    `needed(text)` False: the caller needs no statements of this file (none are split)."""
    file = migration.up_file if which == "up" else migration.down_file
    assert file is not None
    rel = migration_rel_file(root, file) if root else file
    data = normalise_sql(read_sql_file(file, rel))
    transactional = migration.transactional and file_transactional(data)
    text = data.decode("utf-8")
    return (split_sql(text) if needed is None or needed(text) else []), transactional


# Every word that transaction_control or needs_no_transaction looks for, wherever it could
# be a keyword psql's splitter finds (not inside a longer word). A file without any of them
# and without a backslash (no psql meta-command for guard_sql) cannot be refused, so
# check_migration_sql need not split it (~0.3 ms a file).
_REFUSAL_WORDS = re.compile(r"(?<![^\W\d])(?:begin|commit|end|abort|rollback|start|prepare|vacuum"
                         r"|concurrently|database|system|tablespace)(?![\w$])", re.IGNORECASE)


def _may_be_refused(text: str) -> bool:
    return "\\" in text or bool(_REFUSAL_WORDS.search(text))


def check_migrations_sql(migrations: Sequence[Migration], which: str, config: Config
                         ) -> dict[int, bool]:
    """check_migration_sql for each of a run's migrations, before any runs: version → whether
    it runs in a transaction. The guard is the same for all (its roots are resolved once:
    per file, that was ~5 realpath calls, most of a 200-migration down's Python time)."""
    guard = sql_guard(config)
    return {m.version: check_migration_sql(m, which, config, guard) for m in migrations}


def check_migration_sql(migration: Migration, which: str, config: Config,
                        guard: SqlGuard | None = None) -> bool:
    """Refuse, before anything runs, SQL that would break the one-transaction guarantee or
    reach the machine that runs the tool (§4 guard_sql). Returns whether the file runs in a
    transaction."""
    statements, transactional = migration_statements(migration, which, config.root,
                                                     needed=_may_be_refused)
    if not statements:  # nothing to refuse (see _may_be_refused): no path work either
        return transactional
    path = migration.up if which == "up" else migration.down
    rel = migration_rel_path(config.root, path)
    assert path is not None
    guard_sql(statements, path, rel, guard or sql_guard(config))
    for stmt in statements:
        if stmt.meta:
            continue
        if transaction_control(stmt.words):
            raise InputError(
                f"{rel}:{stmt.line}: {stmt.words[0]} controls the transaction; confiture runs "
                "each migration in its own transaction",
                hint="remove it, or start the file with '-- confiture:no-transaction'"
                if transactional else "a no-transaction migration runs in autocommit mode")
        if transactional and needs_no_transaction(stmt.words):
            raise InputError(
                f"{rel}:{stmt.line}: {' '.join(stmt.words[:4])} … cannot run inside a "
                "transaction",
                hint="put it in its own migration whose first line is "
                     "'-- confiture:no-transaction'")
    return transactional


def migration_rel_path(root: Path, path: Path | None) -> str:
    if path is None:
        return "(none)"
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def migration_rel_file(root: Path, file: str) -> str:
    """migration_rel_path of a scanned file's path string, without making Path objects (the
    scan's strings are already normalised: the folder's path joined with entry names)."""
    base = os.path.join(str(root), "")
    return file[len(base):].replace(os.sep, "/") if file.startswith(base) else file


# ── status: files against the tracking table (pure) ───────────────────────────────────────

@record(frozen=True)
class MigrationStatus:
    table: str
    tracking: bool                                  # the tracking table exists
    files: MigrationFiles
    applied: tuple[AppliedRow, ...]                 # every row, version order
    pending: tuple[Migration, ...]                  # not applied, version order
    out_of_order: tuple[Migration, ...]             # pending, older than the newest applied
    changed: tuple[tuple[Migration, AppliedRow], ...]
    missing: tuple[AppliedRow, ...]                 # applied, file gone
    partial: tuple[PartialRun, ...]

    @property
    def current(self) -> int | None:
        return self.applied[-1].version if self.applied else None

    @property
    def clean(self) -> bool:
        return not (self.pending or self.changed or self.missing or self.partial)

    def as_json(self) -> dict[str, Any]:
        def mig(m: Migration) -> dict[str, Any]:
            return {"version": m.version, "name": m.name, "label": m.label,
                    "file": str(m.up), "transactional": m.transactional}

        def row(r: AppliedRow) -> dict[str, Any]:
            return {"version": r.version, "name": r.name, "checksum": r.checksum,
                    "applied_at": r.applied_at, "applied_by": r.applied_by,
                    "duration_ms": r.duration_ms, "how": r.how}

        return {"table": self.table, "current": self.current, "clean": self.clean,
                "applied": [row(r) for r in self.applied],
                "pending": [mig(m) for m in self.pending],
                "out_of_order": [m.version for m in self.out_of_order],
                "changed": [{"version": m.version, "name": m.name, "file": str(m.up),
                             "recorded": r.checksum, "current": m.checksum}
                            for m, r in self.changed],
                "missing": [row(r) for r in self.missing],
                "partial": [as_dict(p) for p in self.partial],
                "strays": list(self.files.strays)}


def plan_status(files: MigrationFiles, applied: Sequence[AppliedRow],
                partial: Sequence[PartialRun] = (), table: str = "",
                tracking: bool = True) -> MigrationStatus:
    by_version = {m.version: m for m in files.migrations}
    rows = sorted(applied, key=lambda r: r.version)
    done = {r.version for r in rows}
    newest = rows[-1].version if rows else None
    pending = tuple(m for m in files.migrations if m.version not in done)
    return MigrationStatus(
        table=table, tracking=tracking, files=files, applied=tuple(rows), pending=pending,
        out_of_order=tuple(m for m in pending if newest is not None and m.version < newest),
        changed=tuple((by_version[r.version], r) for r in rows
                      if r.version in by_version and by_version[r.version].checksum != r.checksum),
        missing=tuple(r for r in rows if r.version not in by_version),
        partial=tuple(partial))


def refuse_unclean_history(status: MigrationStatus, config: Config) -> None:
    """`up` refuses while an applied migration's file changed or vanished (exit 3)."""
    problems = [f"{migration_rel(config, m.up)} changed since it was applied "
                f"(recorded {r.checksum[:12]}, now {m.checksum[:12]})" for m, r in status.changed]
    problems += [f"{r.version}_{r.name} was applied but its file is gone" for r in status.missing]
    if problems:
        raise CheckFailed("; ".join(problems),
                          hint="restore the file(s), or accept the current files with "
                               "'confiture.py migrate repair'")


def plan_up(status: MigrationStatus, to: int | None = None) -> list[Migration]:
    """Pending migrations in version order, up to and including `to`."""
    return [m for m in status.pending if to is None or m.version <= to]


def plan_down(status: MigrationStatus, config: Config, steps: int | None = None,
              to: int | None = None) -> list[tuple[AppliedRow, Migration]]:
    """Applied migrations to revert, newest first; refused up front (all or nothing) when any
    of them has no down file."""
    if (steps is None) == (to is None):
        raise ConfigError("migrate down needs exactly one of --steps N or --to VERSION")
    rows = list(reversed(status.applied))
    if steps is not None:
        if steps < 1:
            raise ConfigError("--steps must be at least 1")
        chosen = rows[:steps]
    else:
        chosen = [r for r in rows if r.version > (to or 0)]
    by_version = {m.version: m for m in status.files.migrations}
    lacking = [f"{r.version}_{r.name}" + (" (its files are gone)" if r.version not in by_version
                                          else f" ({migration_rel(config, by_version[r.version].up)}"
                                               " has no down file)")
               for r in chosen if r.version not in by_version or by_version[r.version].down is None]
    if lacking:
        raise Refused(f"cannot revert {len(chosen)} migration(s): no down file for "
                      + ", ".join(lacking), hint="nothing was reverted; add the down file(s) or "
                                                  "revert fewer steps")
    return [(r, by_version[r.version]) for r in chosen]


def open_migration_session(ws: Workspace) -> Session:
    """A session on the env's own database."""
    return ws.client.session(ws.env.database)


def _status_with(session: Session, ws: Workspace, files: MigrationFiles | None = None,
                 cached: bool = False) -> tuple[MigrationStatus, TrackingTable]:
    cache = ChecksumCache(ws.config.state_dir / "cache" / "migrations.json", 2) if cached \
        else None
    files = files or scan_migrations(ws.config.migrations_dir, ws.config.root, cache)
    tracking = TrackingTable.resolve(session, ws.config.migrations_table)
    applied, partial = tracking.read()
    return plan_status(files, applied, partial, tracking.display, tracking.exists), tracking


def migration_status(ws: Workspace, session: Session | None = None,
                     cached: bool = False) -> MigrationStatus:
    """Applied / pending / changed / missing / out-of-order / partial, without taking the lock.
    `cached`: trust ChecksumCache for unchanged files (read-only reports only)."""
    if session is None:
        with open_migration_session(ws) as own:
            return migration_status(ws, own, cached)
    return _status_with(session, ws, cached=cached)[0]


# ── running: one psql session, the lock, one transaction per migration ────────────────────

_RESET_SESSION = ("RESET ALL;", "SET client_min_messages = warning;")
# psql prints the SQLSTATE of a failed migration statement (a lock timeout is retried);
# client-side settings, so they cost no round trip
_VERBOSE_ERRORS, _DEFAULT_ERRORS = "\\set VERBOSITY verbose", "\\set VERBOSITY default"
LOCK_NOT_AVAILABLE = "55P03"


def _lock_timeout_sql(seconds: float | None) -> list[str]:
    """lock_timeout for the migration's statements (the migration may set its own after)."""
    return [f"SET lock_timeout = '{max(round(seconds * 1000), 1)}ms';"] if seconds else []


def psql_quote_path(path: Path) -> str:
    """A file name as a psql meta-command argument."""
    text = str(path)
    if "\n" in text or "\r" in text:
        raise InputError(f"cannot run a file whose name holds a line break: {text!r}")
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def migration_failure(stderr: str, path: Path, rel: str, what: str,
                      aliases: Sequence[str] = ()) -> SqlError:
    """psql's stderr after a stopped script → one error naming the migration file and line.
    `aliases` are other files psql ran for this migration (statement files padded to the
    original line numbers)."""
    match = next((m for m in map(PSQL_ERROR_LINE.match, stderr.splitlines()) if m), None)
    where = match.group("file") if match else str(path)
    if where == "<stdin>":
        return SqlError(f"{what}: {parse_psql_errors(stderr, None).server_message}")
    if where != str(path) and where not in aliases:  # a file the migration included itself
        return parse_psql_errors(stderr, LineMap(((1, where, 1),)))
    try:
        lines = tuple(normalise_sql(path.read_bytes()).decode("utf-8", "replace").split("\n"))
    except OSError:
        lines = ()
    return parse_psql_errors(stderr, LineMap(((1, rel, 1),), lines))


def migration_allowances(migration: Migration) -> list[dict[str, Any]]:
    """The lint suppressions written in a migration's up file, for its 'applied' log row."""
    try:
        text = normalise_sql(migration.up.read_bytes()).decode("utf-8", "replace")
    except OSError:
        return []
    return [{"rule": m.group(1).lower(), "reason": m.group(2).strip(),
             "line": text.count("\n", 0, m.start()) + 1} for m in ALLOW_RE.finditer(text)]


def _applied_detail(migration: Migration) -> dict[str, Any] | None:
    allowed = migration_allowances(migration)
    return {"allowed": allowed} if allowed else None


@record()
class MigrationRun:
    """What a migrate up/down run did."""

    direction: str
    planned: list[Migration] = field(default_factory=list)
    done: list[tuple[Migration, float]] = field(default_factory=list)
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    backup: Backup | None = None     # taken first, on a protected env (back_up_protected)

    def as_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "dry_run": self.dry_run,
                "planned": [{"version": m.version, "name": m.name, "label": m.label,
                             "transactional": m.transactional} for m in self.planned],
                "done": [{"version": m.version, "name": m.name,
                          "ms": round(s * 1000, 1)} for m, s in self.done],
                "notes": self.notes}


class MigrationLockTimeout(MigrationError):
    """A migration kept hitting lock_timeout: another session held its table (exit 5)."""

    exit_code = EXIT_LOCKED


class _Locked:
    """Session + migration lock + tracking table, for the writing commands."""

    def __init__(self, ws: Workspace, session: Session | None, lock: bool,
                 before: Callable[[], Any] | None = None) -> None:
        """`before`: work that needs no database, done once the session's psql is started
        (it connects meanwhile) and before the lock is asked for; its result is `self.before`."""
        self.ws, self.lock = ws, lock
        self.own = session is None
        self.session = session or open_migration_session(ws)
        self._before = before
        self.before: Any = None

    def __enter__(self) -> Self:
        try:
            if self._before is not None:
                self.before = self._before()
            if self.lock:
                acquire_lock(self.session, MIGRATION_LOCK, self.ws.config.migrations_lock_timeout,
                             f"the migration lock on database {self.ws.env.database}",
                             self.ws.console.info)
            self.tracking = TrackingTable.resolve(self.session, self.ws.config.migrations_table)
            self.tracking.ensure()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def reopen(self) -> None:
        """A new session (and lock) after a failed migration ended the old one."""
        if not self.session.closed:
            self.session.close()
        self.session, self.own = open_migration_session(self.ws), True
        if self.lock:
            acquire_lock(self.session, MIGRATION_LOCK, self.ws.config.migrations_lock_timeout,
                         f"the migration lock on database {self.ws.env.database}",
                         self.ws.console.info)

    def status(self, files: MigrationFiles | None = None) -> MigrationStatus:
        files = files or scan_migrations(self.ws.config.migrations_dir, self.ws.config.root)
        applied, partial = self.tracking.read()
        return plan_status(files, applied, partial, self.tracking.display, True)

    def __exit__(self, *exc: Any) -> None:  # noqa: PYI036 — exc[0] is a type when set
        if exc and exc[0] is not None and issubclass(exc[0], (KeyboardInterrupt, Interrupted)):
            # cancel the running statement: psql stops (ON_ERROR_STOP), the server rolls the
            # migration back, and the lock goes with the connection
            self.session.cancel()
        elif self.lock and not self.session.closed:
            try:
                if self.own:  # closing waits for psql to exit, after it ran the unlock
                    self.session.submit(release_lock_sql(MIGRATION_LOCK))
                else:
                    release_lock(self.session, MIGRATION_LOCK)
            except PgError:
                pass  # the lock goes with the session anyway
        if self.own:
            self.session.close()


def _prefix_hash(statements: Sequence[Statement]) -> str:
    return sha256_bytes("\0".join(s.text for s in statements).encode())


def transactional_script(path: Path, change: Sequence[str], prelude: Sequence[str] = (),
                         reset: bool = True) -> str:
    """A migration file in a transaction of its own, committed with its tracking `change`,
    each from a clean session state (plus `prelude`, e.g. lock_timeout). The bookkeeping costs
    two round trips, as BEGIN and COMMIT around a file do in raw psql: (BEGIN, reset) and
    (reset, change, COMMIT). `reset` False: the session is known clean (the previous script's
    own reset was committed with it), so the first reset is left out."""
    return "\n".join([_VERBOSE_ERRORS,
                      psql_batch(["BEGIN;", *(_RESET_SESSION if reset else ()), *prelude]),
                      f"\\i {psql_quote_path(path)}",
                      psql_batch([*_RESET_SESSION, *change, "COMMIT;"]), _DEFAULT_ERRORS])


# Transactional migrations psql holds at once: the next is queued while one runs, so psql never
# waits for us between migrations. Each is still its own transaction with its record. On Ctrl-C
# or SIGTERM psql stops (nothing queued runs); if the client is killed outright, psql can still
# finish the one queued behind the running one, whole.
PIPELINE_DEPTH = 2


class _Failed(Exception):
    """A migration of a _MigrationQueue failed: which one, and the SqlError saying where."""

    def __init__(self, migration: Migration, error: SqlError) -> None:
        super().__init__(error.message)
        self.migration, self.error = migration, error


class _MigrationQueue:
    """Runs one direction's migrations in order on the locked session: transactional ones
    pipelined (PIPELINE_DEPTH), others one by one after the queue drained. Each finished one
    goes into `run.done` and is reported; a failure raises _Failed naming it."""

    def __init__(self, ws: Workspace, session: Session, run: MigrationRun) -> None:
        self.ws, self.session, self.run = ws, session, run
        self.waiting: list[tuple[Migration, Path, float]] = []
        self.calling: Migration | None = None  # the one call() runs
        self.mark = time.monotonic()   # when the previous migration finished
        # The session's settings are the defaults: true after a transactional script (it
        # resets them before its COMMIT), not at the start (the caller's session) nor after
        # call() (a no-transaction migration's SETs stay). Each reset skipped is two
        # statements of server work: ~15 ms over a 200-migration down (README, issue 15).
        self.clean = False

    def running(self) -> Migration | None:
        """The migration the server is working on (an interrupt names it)."""
        return self.waiting[0][0] if self.waiting else self.calling

    def push(self, migration: Migration, path: Path, change: Sequence[str],
             prelude: Sequence[str] = ()) -> None:
        self.session.send_stop_on_error(transactional_script(path, change, prelude,
                                                             reset=not self.clean))
        self.clean = True
        self.waiting.append((migration, path, time.monotonic()))
        if len(self.waiting) >= PIPELINE_DEPTH:
            self._finish_oldest()

    def call(self, migration: Migration, fn: Callable[[], None]) -> None:
        self.drain()
        started = time.monotonic()
        self.calling = migration
        self.clean = False
        try:
            fn()
        except SqlError as exc:
            raise _Failed(migration, exc) from None
        self.calling = None
        self._done(migration, started)

    def drain(self) -> None:
        while self.waiting:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        migration, path, sent = self.waiting[0]  # still running() while it is waited for
        try:
            self.session.wait_stop_on_error()
        except ScriptStopped as exc:
            verb = "recording" if self.run.direction == "up" else "forgetting"
            raise _Failed(migration, migration_failure(
                exc.stderr, path, migration_rel(self.ws.config, path),
                f"{verb} {migration.label}")) from None
        self.waiting.pop(0)
        self._done(migration, max(sent, self.mark))

    def _done(self, migration: Migration, started: float) -> None:
        self.mark = time.monotonic()
        seconds = self.mark - started
        self.run.done.append((migration, seconds))
        verb = "applied" if self.run.direction == "up" else "reverted"
        self.ws.console.info(f"{verb} {migration.label} ({format_seconds(seconds)})")


_CIC_NAME = re.compile(r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                       r"(?:(?:\"(?:[^\"]|\"\")+\"|[\w$]+)\s*\.\s*)?(\"(?:[^\"]|\"\")+\"|[\w$]+)",
                       re.IGNORECASE)


def drop_invalid_index_of(session: Session, stmt: Statement, console: Console) -> str | None:
    """A CREATE INDEX CONCURRENTLY that failed or was interrupted leaves an INVALID index
    behind; drop it (concurrently) so the statement can run again. Returns its name."""
    match = _CIC_NAME.match(strip_comments(stmt.text))
    if not match:
        return None
    raw = match.group(1)
    name = raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()
    rows = session.query(
        "SELECT i.indexrelid::regclass::text AS index FROM pg_index i JOIN pg_class c "
        f"ON c.oid = i.indexrelid WHERE NOT i.indisvalid AND c.relname = {quote_literal(name)}")
    if len(rows) != 1:
        return None
    index = str(rows[0]["index"])
    session.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
    console.info(f"dropped invalid index {index} left by an interrupted CREATE INDEX CONCURRENTLY")
    return index


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"--[^\n]*", " ", text)


def invalid_indexes(session: Session) -> list[str]:
    rows = session.query(
        "SELECT i.indexrelid::regclass::text AS index FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "ORDER BY 1")
    return [str(r["index"]) for r in rows]


def _apply_statements(ws: Workspace, session: Session, tracking: TrackingTable, migration: Migration,
                      rel: str, statements: list[Statement], resume: PartialRun | None,
                      lock_timeout: float | None = None) -> None:
    """A no-transaction migration: statements one at a time in autocommit, each followed (in
    the same psql input, so even a killed client cannot separate them) by a progress row."""
    import tempfile

    start = 0
    total = len(statements)
    if resume is not None and resume.done and resume.prefix == _prefix_hash(statements[:resume.done]):
        start = resume.done
        ws.console.info(f"resuming {migration.label} at statement {start + 1} of {total} "
                        f"(statements 1–{start} ran on {resume.at})")
    elif resume is not None and resume.done:
        raise CheckFailed(
            f"{rel}: the {resume.done} statement(s) that already ran in an interrupted run "
            "have changed since", hint="make the database match the file, then run "
                                       "'confiture.py migrate repair' to start it afresh")
    if start < total:
        drop_invalid_index_of(session, statements[start], ws.console)
    session.execute(psql_batch([*_RESET_SESSION, *_lock_timeout_sql(lock_timeout),
                                tracking.log_sql("started", migration, {
                                    "done": start, "total": total,
                                    "prefix": _prefix_hash(statements[:start])})]))
    with tempfile.TemporaryDirectory(prefix="confiture-stmt-") as folder:
        for index in range(start, total):
            progress = tracking.log_sql("progress", migration, {
                "done": index + 1, "total": total,
                "prefix": _prefix_hash(statements[:index + 1])})
            try:
                _run_statement(session, Path(folder), index, statements[index], progress)
            except ScriptStopped as exc:
                error = migration_failure(exc.stderr, migration.up, rel, f"recording {rel}",
                                          [str(Path(folder) / f"{index + 1}.sql")])
                _record_failure(ws, tracking, migration, index, total, statements, error)
                raise error from None
    session.run_stop_on_error(psql_batch(["BEGIN;", *_RESET_SESSION,
                                          *tracking.record_sql(migration, duration="0",
                                                               detail=_applied_detail(migration)),
                                          "COMMIT;"]))


def _run_statement(session: Session, folder: Path, index: int, stmt: Statement,
                   after: str = "") -> None:
    """One statement through its own file: psql's lexer state cannot leak into what follows,
    and the file is padded so psql reports the original file's line numbers."""
    path = folder / f"{index + 1}.sql"
    path.write_text("\n" * (stmt.line - 1) + stmt.text + "\n", encoding="utf-8")
    session.run_stop_on_error(f"{_VERBOSE_ERRORS}\n\\i {psql_quote_path(path)}\n"
                              f"{_DEFAULT_ERRORS}\n{after}")


def _record_failure(ws: Workspace, tracking: TrackingTable, migration: Migration, index: int,
                    total: int, statements: Sequence[Statement], error: SqlError) -> None:
    """After a failed no-transaction statement (the session is gone): log it and drop an
    invalid index it left, on a fresh session. Best effort: the progress rows already say
    where it stopped."""
    try:
        with open_migration_session(ws) as session:
            drop_invalid_index_of(session, statements[index], ws.console)
            session.execute(tracking.log_sql("failed", migration, {
                "done": index, "total": total, "prefix": _prefix_hash(statements[:index]),
                "error": error.message}))
    except ConfitureError as exc:
        ws.console.warn(f"could not log the failure of {migration.label}: {exc.message}")


# ── bounded locks: lock_timeout, retries with backoff, who blocked ───────────────────────

LOCK_RETRY_BACKOFF = (0.5, 30.0)   # seconds before the first retry, doubling up to the cap


@record(frozen=True)
class Blocker:
    """A session that held a lock a migration statement waited for (pg_blocking_pids)."""

    pid: int
    application: str
    state: str
    query_start: str
    query: str          # its first line

    def describe(self) -> str:
        return (f"pid {self.pid} ({self.application or 'no application_name'}, {self.state}, "
                f"query started {self.query_start}): {self.query}")


def blockers_sql(pid: int) -> str:
    return ("SELECT pid, coalesce(application_name, '') AS application, "
            "coalesce(state, '') AS state, "
            "coalesce(to_char(query_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '') AS query_start, "
            "split_part(ltrim(coalesce(query, '')), E'\\n', 1) AS query "
            f"FROM pg_stat_activity WHERE pid = ANY (pg_blocking_pids({int(pid)})) ORDER BY pid")


class LockWatcher(SessionSampler):
    """Samples, from a second session, who blocks the migration's session: once lock_timeout
    fires the wait is over and pg_blocking_pids() has nothing left to say. Naming the blocker is
    a courtesy; the migration's own outcome decides."""

    def __init__(self, ws: Workspace, pid: int, interval: float = 0.05) -> None:
        super().__init__(lambda: open_migration_session(ws), interval, "lock-watcher")
        self.pid, self._sql = pid, blockers_sql(pid)
        self.seen: tuple[Blocker, ...] = ()

    def sample(self, session: Session) -> None:
        rows = session.query(self._sql)
        if rows:
            self.seen = tuple(Blocker(int(r["pid"]), r["application"], r["state"],
                                      r["query_start"], r["query"]) for r in rows)


def _named(blockers: Sequence[Blocker], watched: bool) -> str:
    return "; ".join(b.describe() for b in blockers) or (
        "a session that ended before it could be named" if watched else
        "an unnamed session (blockers are sampled only with statement_lock_timeout)")


def _retry_after_lock_timeout(ws: Workspace, locked: _Locked, failed: _Failed, attempt: int,
                              blockers: Sequence[Blocker], named: str) -> None:
    """Log the timeout and who blocked, wait the backoff, and take a new session (and the
    lock again): psql ended the old one, rolling a transactional migration back."""
    wait = min(LOCK_RETRY_BACKOFF[0] * 2 ** attempt, LOCK_RETRY_BACKOFF[1])
    ws.console.warn(f"{failed.migration.label}: lock timeout on attempt {attempt + 1} of "
                    f"{ws.config.migrations_lock_retries + 1}, blocked by {named}; retrying "
                    f"in {format_seconds(wait)}")
    locked.reopen()
    # logged without a version: the latest versioned event must stay the one that says how
    # far an interrupted no-transaction migration got
    locked.tracking = TrackingTable.resolve(locked.session, ws.config.migrations_table)
    locked.tracking.log("lock-timeout", None, {
        "migration": failed.migration.label, "version": failed.migration.version,
        "attempt": attempt + 1, "error": failed.error.message,
        "blockers": [as_dict(b) for b in blockers]})
    time.sleep(wait)


def _queue_up(ws: Workspace, locked: _Locked, run: MigrationRun, plan: Sequence[Migration],
              checked: Mapping[Any, bool], partial: Mapping[Any, PartialRun],
              timeout: float | None) -> None:
    """Run `plan` through a _MigrationQueue on the locked session (raises _Failed, or
    MigrationInterrupted naming the migration an interrupt stopped)."""
    config = ws.config
    queue = _MigrationQueue(ws, locked.session, run)
    try:
        for migration in plan:
            if checked[migration.version]:
                queue.push(migration, migration.up, locked.tracking.record_sql(
                    migration, detail=_applied_detail(migration)), _lock_timeout_sql(timeout))
            else:
                queue.call(migration, functools.partial(
                    _apply_statements, ws, locked.session, locked.tracking, migration,
                    migration_rel(config, migration.up),
                    migration_statements(migration, "up", config.root)[0],
                    partial.get(migration.version), timeout))
        queue.drain()
    except (KeyboardInterrupt, Interrupted) as exc:
        running = queue.running()
        if running is None:
            raise
        raise MigrationInterrupted(running.label, checked[running.version],
                                   [m.version for m, _ in run.done]) from exc


def wait_for_quiet(ws: Workspace, seconds: float, limit: float | None = None,
                   session: Session | None = None) -> None:
    """Do not start while a transaction older than `seconds` is open on the env's database:
    DDL would queue behind it (blocking everyone after) and CONCURRENTLY would wait for it.
    Gives up after `limit` ([migrations] lock_timeout) with LockTimeout naming them."""
    if session is None:
        with open_migration_session(ws) as own:
            return wait_for_quiet(ws, seconds, limit, own)
    limit = ws.config.migrations_lock_timeout if limit is None else limit
    deadline = time.monotonic() + limit
    sql = ("SELECT pid, coalesce(application_name, '') AS application, "
           "coalesce(state, '') AS state, to_char(query_start, 'YYYY-MM-DD HH24:MI:SS TZ') "
           "AS query_start, split_part(ltrim(coalesce(query, '')), E'\\n', 1) AS query "
           "FROM pg_stat_activity WHERE datname = current_database() "
           "AND backend_type = 'client backend' "  # not autovacuum: it yields to DDL
           "AND pid <> pg_backend_pid() AND xact_start < clock_timestamp() - "
           f"make_interval(secs => {float(seconds)}) ORDER BY xact_start")
    announced = False
    while True:
        old = [Blocker(int(r["pid"]), r["application"], r["state"], r["query_start"],
                       r["query"]) for r in session.query(sql)]
        if not old:
            return
        named = "; ".join(b.describe() for b in old)
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{ws.env.database} did not become quiet within "
                              f"{format_seconds(limit)}: transaction(s) older than "
                              f"{format_seconds(seconds)} still open: {named}",
                              hint="end them, or raise [migrations] lock_timeout")
        if not announced:
            ws.console.info(f"waiting for transaction(s) older than {format_seconds(seconds)} "
                            f"to end: {named}")
            announced = True
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))


def _up_failed(run: MigrationRun, failed: _Failed, checked: Mapping[Any, bool],
               attempt: int | None, named: str) -> MigrationError:
    """The MigrationError of a failed `up`: what was applied before, what remains of it;
    after lock timeouts (`attempt`), how often it tried and who blocked (exit 5)."""
    done = [m.version for m, _ in run.done]
    message = failed.error.message
    if attempt is not None:
        message += f" after {attempt + 1} attempt(s); blocked by {named}"
    error = MigrationError if attempt is None else MigrationLockTimeout
    return error(
        message + (f" (applied before it: {len(done)} migration(s), up to "
                   f"{run.done[-1][0].label})" if done else ""),
        done, hint=f"{failed.migration.label} was not applied"
        + ("; nothing of it remains (one transaction)" if checked[failed.migration.version]
           else "; its completed statements are logged and the next run resumes after them"))


def back_up_protected(ws: Workspace, locked: _Locked, run: MigrationRun, backup: bool) -> None:
    """SPEC §5: a backup is taken before anything writes to a protected environment: by the
    run itself, under its lock, once its plan is known and not empty (`backup` False: the
    caller took one, as deploy does, or the run writes a scratch copy)."""
    if backup and ws.env.protected and run.planned:
        run.backup = create_backup(ws, session=locked.session)
        ws.console.info(f"backed up {ws.env.database} before migrate {run.direction}: "
                        f"{run.backup.path}")


def migrate_up(ws: Workspace, to: int | None = None, dry_run: bool = False,
               session: Session | None = None, lock: bool = True,
               backup: bool = True) -> MigrationRun:
    """Apply pending migrations in version order. Under the migration lock unless lock=False
    (the caller already holds it on another session); a protected env is backed up first
    (back_up_protected). Refuses (exit 3) while an applied migration changed or vanished.
    After a failed migration psql has exited: the session is closed, the failed migration
    left nothing behind (or, without a transaction, logged how far it got), and
    MigrationError says which ones were applied before it."""
    config = ws.config
    files = scan_migrations(config.migrations_dir, config.root)
    run = MigrationRun("up", dry_run=dry_run)
    if dry_run:
        if session is None:
            with open_migration_session(ws) as own:
                status = _status_with(own, ws, files)[0]
        else:
            status = _status_with(session, ws, files)[0]
        refuse_unclean_history(status, config)
        run.planned = plan_up(status, to)
        check_migrations_sql(run.planned, "up", config)
        return run
    with _Locked(ws, session, lock) as locked:
        status = locked.status(files)
        refuse_unclean_history(status, config)
        run.planned = plan_up(status, to)
        checked = check_migrations_sql(run.planned, "up", config)
        back_up_protected(ws, locked, run, backup)
        partial = {p.version: p for p in status.partial}
        for stale in set(partial) - {m.version for m in run.planned}:
            ws.console.warn(f"migration {stale} was interrupted earlier but is not in this plan")
        if status.out_of_order:
            run.notes.append("out of order: " + ", ".join(m.label for m in status.out_of_order))
            ws.console.warn(f"applying {len(status.out_of_order)} migration(s) older than the "
                            f"newest applied one: {', '.join(m.label for m in status.out_of_order)}")
        timeout = statement_lock_timeout(config, ws.env)
        plan = list(run.planned)
        for attempt in itertools.count():
            watcher = LockWatcher(ws, int(locked.session.value("SELECT pg_backend_pid()"))) \
                if timeout else None
            try:
                with watcher or contextlib.nullcontext():
                    _queue_up(ws, locked, run, plan, checked, partial, timeout)
                break
            except _Failed as failed:
                timed_out = failed.error.sqlstate == LOCK_NOT_AVAILABLE
                blockers = watcher.seen if watcher else ()
                named = _named(blockers, watcher is not None)
                if not timed_out or attempt >= config.migrations_lock_retries:
                    raise _up_failed(run, failed, checked, attempt if timed_out else None,
                                     named) from None
                _retry_after_lock_timeout(ws, locked, failed, attempt, blockers, named)
                status = locked.status(files)
                pending = {m.version for m in status.pending}
                plan = [m for m in run.planned if m.version in pending]
                partial = {p.version: p for p in status.partial}
    return run


def migrate_down(ws: Workspace, steps: int | None = None, to: int | None = None,
                 dry_run: bool = False, session: Session | None = None,
                 lock: bool = True, backup: bool = True) -> MigrationRun:
    """Revert applied migrations newest first, each with the removal of its tracking row in
    one transaction; a protected env is backed up first (back_up_protected). Refused up front
    when a needed down file is missing; stops at the first failing down (MigrationError
    lists what was reverted before it)."""
    config = ws.config
    run = MigrationRun("down", dry_run=dry_run)
    if dry_run:
        files = scan_migrations(config.migrations_dir, config.root)
        if session is None:
            with open_migration_session(ws) as own:
                status = _status_with(own, ws, files)[0]
        else:
            status = _status_with(session, ws, files)[0]
        run.planned = [m for _, m in plan_down(status, config, steps, to)]
        check_migrations_sql(run.planned, "down", config)
        return run
    # psql starts and connects (~10-15 ms, on the other core) while the files are scanned
    with _Locked(ws, session, lock, before=functools.partial(
            scan_migrations, config.migrations_dir, config.root)) as locked:
        files = locked.before
        status = locked.status(files)
        run.planned = [m for _, m in plan_down(status, config, steps, to)]
        checked = check_migrations_sql(run.planned, "down", config)
        back_up_protected(ws, locked, run, backup)
        queue = _MigrationQueue(ws, locked.session, run)
        try:
            for migration in run.planned:
                assert migration.down is not None
                forget = locked.tracking.forget_sql(migration)
                if checked[migration.version]:
                    queue.push(migration, migration.down, forget)
                else:
                    queue.call(migration, functools.partial(
                        _revert_statements, locked.session, migration,
                        migration_rel(config, migration.down), config, forget))
            queue.drain()
        except _Failed as failed:
            done = [m.label for m, _ in run.done]
            label = failed.migration.label
            raise MigrationError(
                f"reverting {label} failed: {failed.error.message}",
                [m.version for m, _ in run.done],
                hint=(f"reverted {len(done)} migration(s) before it ({_span(done)}); "
                      if done else "nothing was reverted; ")
                + f"{label} and everything older remain applied") from None
    return run


def _span(labels: Sequence[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{labels[0]} … {labels[-1]}"


def _revert_statements(session: Session, migration: Migration, rel: str, config: Config,
                       forget: Sequence[str]) -> None:
    """A no-transaction down: statements in autocommit, the row removed after all succeeded."""
    import tempfile

    assert migration.down is not None
    statements = migration_statements(migration, "down", config.root)[0]
    session.execute("\n".join(_RESET_SESSION))
    with tempfile.TemporaryDirectory(prefix="confiture-stmt-") as folder:
        for index, stmt in enumerate(statements):
            try:
                _run_statement(session, Path(folder), index, stmt)
            except ScriptStopped as exc:
                raise migration_failure(exc.stderr, migration.down, rel, rel,
                                        [str(Path(folder) / f"{index + 1}.sql")]) from None
    session.run_stop_on_error(psql_batch(["BEGIN;", *forget, "COMMIT;"]))


def verify_migrations(ws: Workspace, session: Session | None = None) -> MigrationStatus:
    """Recorded checksums against the files; CheckFailed (exit 3) on any difference."""
    status = migration_status(ws, session)
    problems = len(status.changed) + len(status.missing)
    if problems:
        names = [m.label for m, _ in status.changed] + [f"{r.version}_{r.name}"
                                                          for r in status.missing]
        raise CheckFailed(f"{problems} applied migration(s) differ from their files: "
                          + ", ".join(names),
                          hint="restore the files, or accept them with "
                               "'confiture.py migrate repair'")
    return status


def baseline_migrations(ws: Workspace, to: int, session: Session | None = None,
                        lock: bool = True) -> list[Migration]:
    """Record every migration up to `to` as applied without running it (adopting a database
    built by other means). Returns the migrations it recorded."""
    files = scan_migrations(ws.config.migrations_dir, ws.config.root)
    if not any(m.version == to for m in files.migrations):
        raise ConfigError(f"no migration has version {to}",
                          hint="baseline --to takes the version of an existing migration")
    with _Locked(ws, session, lock) as locked:
        status = locked.status(files)
        chosen = [m for m in status.pending if m.version <= to]
        locked.tracking.record(chosen, how="baseline")
    return chosen


@record(frozen=True)
class RepairResult:
    accepted: tuple[tuple[Migration, AppliedRow], ...]
    forgotten: tuple[AppliedRow, ...]
    cleared: tuple[PartialRun, ...]


def repair_migrations(ws: Workspace, session: Session | None = None,
                      lock: bool = True) -> RepairResult:
    """Accept the files as they are: record current checksums of changed migrations, forget
    rows whose files are gone, clear interrupted no-transaction runs. Every change is logged
    with the old values."""
    with _Locked(ws, session, lock) as locked:
        status = locked.status()
        tracking = locked.tracking
        sql = [stmt for m, row in status.changed for stmt in tracking.accept_sql(m, row)]
        sql += [stmt for row in status.missing for stmt in tracking.forget_sql(
            row, "repair", {"action": "forget", "applied_at": row.applied_at, "how": row.how})]
        sql += [tracking.log_sql("repair", partial, {"action": "clear-partial",
                                                     "done": partial.done, "total": partial.total})
                for partial in status.partial]
        tracking.write(sql)
    return RepairResult(status.changed, status.missing, status.partial)


def migration_sql_preview(migration: Migration, which: str = "up") -> str:
    path = migration.up if which == "up" else migration.down
    assert path is not None
    return normalise_sql(path.read_bytes()).decode("utf-8", "replace")


# ── the env's migration state, and the tables confiture keeps ─────────────────────────────

@record(frozen=True)
class MigrationState:
    applied: tuple[int, ...]                       # versions recorded, ascending
    pending: tuple[tuple[int, str, bool], ...]     # (version, label, transactional)
    problems: tuple[str, ...]                      # changed / missing applied migrations
    partial: tuple[str, ...]                       # interrupted no-transaction migrations

    @property
    def version(self) -> str | None:
        return str(self.applied[-1]) if self.applied else None


def migration_state(ws: Workspace, session: Session) -> MigrationState:
    status = migration_status(ws, session)
    problems = [f"{migration_rel(ws.config, m.up)} changed since it was applied"
                for m, _ in status.changed]
    problems += [f"{r.version}_{r.name} was applied but its file is gone" for r in status.missing]
    return MigrationState(
        applied=tuple(r.version for r in status.applied),
        pending=tuple((m.version, m.label, m.transactional) for m in status.pending),
        problems=tuple(problems), partial=tuple(f"{p.version}_{p.name}" for p in status.partial))


def database_is_empty(session: Session, keep: Sequence[str] = ()) -> bool:
    """True when the connected database holds no user objects (schemas besides public,
    relations, routines, types, extensions besides plpgsql). `keep` names tables of ours
    that do not count."""
    ignore = ", ".join(quote_literal(n) for n in keep) or "''"
    user_ns = ("n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
               "AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
               "AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'")
    count = session.value(
        f"SELECT (SELECT count(*) FROM pg_namespace n WHERE {user_ns} "
        "AND n.nspname <> 'public')"
        " + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"   WHERE {user_ns} AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        f"   AND c.relname NOT IN ({ignore}))"
        " + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"   WHERE {user_ns} AND c.relkind = 'S' AND NOT EXISTS (SELECT 1 FROM pg_depend d "
        "    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid "
        "    AND d.deptype IN ('a', 'i')))"
        " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        f"   WHERE {user_ns})"
        " + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        f"   WHERE {user_ns} AND t.typrelid = 0 AND t.typelem = 0)"
        " + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')")
    return int(count) == 0


@record(frozen=True)
class TargetState:
    """The env's database as a deploy finds it, read-only: whether it exists, whether it is
    empty (then a deploy is a first deploy), its migrations (None when it is missing or
    empty) and the labels a deploy would apply (every migration on a first deploy)."""

    exists: bool
    empty: bool
    migrations: MigrationState | None
    pending: tuple[str, ...]

    @property
    def first_deploy(self) -> bool:
        return not self.exists or self.empty


def inspect_target(ws: Workspace, session: Session | None = None) -> TargetState:
    """Read the env's database, on `session` when the caller holds one on it."""
    if session is None:
        with admin_session(ws) as admin:
            if not database_exists(admin, ws.env.database):
                return _target_state(ws, False, None)
        with ws.client.session(ws.env.database) as own:
            return inspect_target(ws, own)
    empty = database_is_empty(session, [ws.config.deploys_table.split(".")[-1]])
    return _target_state(ws, True, None if empty else migration_state(ws, session))


def _target_state(ws: Workspace, exists: bool, state: MigrationState | None) -> TargetState:
    pending = (tuple(m.label for m in discover_migrations(ws.config)) if state is None
               else tuple(label for _, label, _ in state.pending))
    return TargetState(exists, state is None, state, pending)


def own_tables(config: Config) -> frozenset[tuple[str | None, str]]:
    """Every table confiture keeps in a project database, as (schema, name): §8's tracking
    table and its log, §16's deploys table. They are never copied by sync, listed as rules or
    treated as user data. Schema None: the name is unqualified in the config, so the table is
    wherever search_path put it, and the name is ours in every schema."""
    schema, table = parse_table_name(config.migrations_table)
    deploy_schema, deploy_table = parse_table_name(config.deploys_table)
    return frozenset({(schema, table), (schema, table + "_log"), (deploy_schema, deploy_table)})


def is_own_table(own: frozenset[tuple[str | None, str]], schema: str, name: str) -> bool:
    return (schema, name) in own or (None, name) in own


# ════════════════════════════════════════════════════════════════════════════════════════════
# §8b Migration safety: lint
# Hazards in migration statements, found before anything runs. A registry of rules (id,
# level, why, safe alternative, a pure check over one parsed statement and what the lint
# knows about the target), fed by §4's splitter (through §8's migration files) and by one
# catalog query through §5.
# ════════════════════════════════════════════════════════════════════════════════════════════

LINT_LARGE_ROWS = 100_000   # an UPDATE of this many rows beside DDL holds the DDL's locks long
LINT_SMALL_BYTES = 1 << 20  # a blocking build or rewrite of a table this small is over at once
LINT_LEVELS = ("error", "warning")


class Token(NamedTuple):
    """One SQL token: `word` is what rules compare (an unquoted word upper-cased, '"' for a
    quoted identifier, "'" for any string, '0' for a number, else the character);
    `name` is the identifier as PostgreSQL folds it (unquoted lower-cased, quoted exact)."""

    word: str
    name: str


_TOKEN_RE = re.compile(r"""(?x)
    (?P<space>\s+) | (?P<line>--[^\n]*) | (?P<block>/\*)
  | (?P<estr>(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*(?:'|$)) | (?P<str>'(?:[^']|'')*(?:'|$))
  | (?P<ident>"(?:[^"]|"")*(?:"|$)) | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
  | (?P<word>[^\W\d][\w$]*) | (?P<num>\d+(?:\.\d*)?) | (?P<op>::|.)""", re.DOTALL)


def sql_tokens(text: str) -> tuple[Token, ...]:
    """Tokens of one statement, comments dropped and strings collapsed (never executed)."""
    out: list[Token] = []
    pos, size = 0, len(text)
    next_token = _TOKEN_RE.match  # bound once: hot
    while pos < size:
        match = next_token(text, pos)
        assert match is not None  # the last alternative matches any character
        kind, pos = match.lastgroup, match.end()
        value = match.group()
        if kind in ("space", "line"):
            continue
        if kind == "block":
            pos = skip_block_comment(text, pos)
        elif kind in ("str", "estr"):
            out.append(Token("'", value))
        elif kind == "dollar":
            close = text.find(value, pos)
            pos = size if close < 0 else close + len(value)
            out.append(Token("'", text[match.start():pos]))
        elif kind == "ident":
            out.append(Token('"', value[1:-1].replace('""', '"')))
        elif kind == "word":
            out.append(Token(value.upper(), value.lower()))
        elif kind == "num":
            out.append(Token("0", value))
        else:
            out.append(Token(value, value))
    return tuple(out)


@record(frozen=True)
class Allowance:
    """`-- confiture:allow RULE reason` on one statement."""

    rule: str
    reason: str
    line: int


def statement_allowances(stmt: Statement, rel: str) -> tuple[Allowance, ...]:
    """The suppressions written in a statement's comments (the lines above it included).
    A suppression without a reason is refused: the reason is what reviewers read. One that
    names no rule is kept: the rule unknown-allow reports it with the other findings."""
    found = []
    for match in ALLOW_RE.finditer(stmt.text):
        line = stmt.line + stmt.text.count("\n", 0, match.start())
        rule, reason = match.group(1).lower(), match.group(2).strip()
        if not reason:
            raise InputError(f"{rel}:{line}: confiture:allow {rule} needs a reason",
                             hint=f"write '-- confiture:allow {rule} <why this is safe here>'")
        found.append(Allowance(rule, reason, line))
    return tuple(found)


@record(frozen=True)
class Action:
    """One action of an ALTER TABLE (`ADD COLUMN …`, `ALTER c TYPE …`), tokens and words."""

    tokens: tuple[Token, ...]
    words: tuple[str, ...]


@record(frozen=True)
class AlterTable:
    table: str
    actions: tuple[Action, ...]


@record(frozen=True)
class Parsed:
    """One statement as the rules see it, with the facts several rules share worked out
    once here (not once per rule: ~9,000 ALTER TABLE parses for 800 statements)."""

    file: str
    tokens: tuple[Token, ...]
    words: tuple[str, ...]
    allowed: tuple[Allowance, ...]
    line: int          # of its first word (the comments above it are part of its text)
    alter: AlterTable | None = None   # an ALTER TABLE: its table and actions
    created: str | None = None        # the table a CREATE TABLE / MATERIALIZED VIEW makes


_FROM_STDIN = re.compile(r"\bFROM\s+STDIN\b[^\n]*", re.IGNORECASE)
_LEADING_COMMENTS = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*", re.DOTALL)


def parse_statement(stmt: Statement, rel: str) -> Parsed:
    text = stmt.text
    if stmt.words[:1] == ("COPY",) and (data := _FROM_STDIN.search(text)):
        text = text[:data.end()]  # the command, not its data rows
    tokens = sql_tokens(text) if not stmt.meta else ()
    while tokens and tokens[-1].word == ";":
        tokens = tokens[:-1]
    return parsed_statement(rel, tokens, statement_allowances(stmt, rel), first_word_line(stmt))


def parsed_statement(rel: str, tokens: tuple[Token, ...], allowed: tuple[Allowance, ...],
                     line: int) -> Parsed:
    words = tuple(t.word for t in tokens)
    return Parsed(rel, tokens, words, allowed, line, alter_table(tokens, words),
                  created_table(tokens, words))


def first_word_line(stmt: Statement) -> int:
    """The line of a statement's first word (the comments above it belong to its text)."""
    lead = _LEADING_COMMENTS.match(stmt.text)
    return stmt.line + (stmt.text.count("\n", 0, lead.end()) if lead else 0)


# ── facts about the target, from one catalog query ───────────────────────────────────────

@record(frozen=True)
class TableFacts:
    name: str                        # schema.table
    bytes: int                       # with indexes and TOAST
    rows: int                        # planner estimate; -1: never analysed
    columns: Mapping[str, str]       # column → format_type()
    indexes: tuple[tuple[str, bool, str], ...]        # (name, unique, definition)
    checks: tuple[tuple[str, bool, str], ...]         # (name, validated, definition)


@record(frozen=True)
class CatalogFacts:
    server_version: int              # server_version_num
    search_path: tuple[str, ...]
    tables: Mapping[str, TableFacts]
    index_tables: Mapping[str, str]  # schema.index → schema.table
    timezone: str = ""               # the TimeZone a migration session starts with
    volatile: frozenset[str] = frozenset()   # VOLATILE functions among the names mentioned

    def table(self, name: str) -> TableFacts | None:
        """`name` as written (unqualified names resolve through search_path)."""
        return self.tables.get(name) if "." in name else self.visible_tables.get(name)

    @functools.cached_property
    def visible_tables(self) -> dict[str, TableFacts]:
        """Unqualified name → the table search_path finds (rules ask ~4 times a statement)."""
        found: dict[str, TableFacts] = {}
        for schema in reversed(self.search_path):  # the first schema's table wins
            found.update((name.split(".", 1)[1], facts) for name, facts in self.tables.items()
                         if name.split(".", 1)[0] == schema)
        return found

    def index_table(self, name: str) -> str | None:
        if "." in name:
            return self.index_tables.get(name)
        return next((self.index_tables[f"{s}.{name}"] for s in self.search_path
                     if f"{s}.{name}" in self.index_tables), None)


def catalog_sql(names: Sequence[str]) -> str:
    """One read-only query: server version, search_path, and the facts of every table or
    index whose name the migrations mention (not the whole catalog: production may hold
    thousands of tables)."""
    wanted = "ARRAY[" + ", ".join(quote_literal(n) for n in sorted(names)) + "]::text[]"
    return f"""SELECT json_build_object(
 'version', current_setting('server_version_num')::int,
 'timezone', current_setting('TimeZone'),
 'volatile', (SELECT coalesce(json_agg(DISTINCT p.proname), '[]') FROM pg_proc p
              WHERE p.provolatile = 'v' AND p.proname = ANY ({wanted})),
 'search_path', to_json(current_schemas(false)),
 'tables', (SELECT coalesce(json_agg(json_build_object(
   'name', n.nspname || '.' || c.relname, 'bytes', pg_total_relation_size(c.oid),
   'rows', c.reltuples::bigint,
   'columns', (SELECT json_object_agg(a.attname, format_type(a.atttypid, a.atttypmod))
               FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
               AND NOT a.attisdropped),
   'indexes', (SELECT json_agg(json_build_array(n.nspname || '.' || i.relname, x.indisunique,
                                                pg_get_indexdef(x.indexrelid)))
               FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
               WHERE x.indrelid = c.oid AND x.indisvalid),
   'checks', (SELECT json_agg(json_build_array(k.conname, k.convalidated,
                                               pg_get_constraintdef(k.oid)))
              FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'c'))), '[]')
   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p', 'm')
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     AND (c.relname = ANY ({wanted}) OR EXISTS (SELECT 1 FROM pg_index x
          JOIN pg_class i ON i.oid = x.indexrelid
          WHERE x.indrelid = c.oid AND i.relname = ANY ({wanted})))))"""


def read_catalog(session: Session, names: Iterable[str]) -> CatalogFacts:
    return request_catalog(session, names)()


def request_catalog(session: Session, names: Iterable[str]) -> Callable[[], CatalogFacts]:
    """Send the catalog query now; the function returned reads its answer, so the server
    works while the caller goes on (lint_on parses meanwhile)."""
    session.submit(json_rows_sql(catalog_sql(sorted(names))) + ";")
    return lambda: catalog_facts(next(iter(json_rows(session.collect())[0].values())))


def catalog_facts(data: Mapping[str, Any]) -> CatalogFacts:
    tables: dict[str, TableFacts] = {}
    index_tables: dict[str, str] = {}
    for t in data["tables"]:
        indexes = tuple((str(i[0]), bool(i[1]), str(i[2])) for i in t["indexes"] or ())
        tables[t["name"]] = TableFacts(
            name=t["name"], bytes=int(t["bytes"]), rows=int(t["rows"]),
            columns=dict(t["columns"] or {}), indexes=indexes,
            checks=tuple((str(k[0]), bool(k[1]), str(k[2])) for k in t["checks"] or ()))
        index_tables.update({i[0]: t["name"] for i in indexes})
    return CatalogFacts(int(data["version"]), tuple(data["search_path"] or ()), tables,
                        index_tables, str(data["timezone"] or ""),
                        frozenset(data["volatile"] or ()))


def format_count(n: int) -> str:
    for size, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"~{n / size:.0f} {unit}"
    return f"~{n}"


def describe_table(name: str, facts: TableFacts | None) -> str:
    """'public.events (41.0 GB, ~180 M rows)', or just the name without a target."""
    if facts is None:
        return name
    rows = "rows unknown (never analysed)" if facts.rows < 0 else f"{format_count(facts.rows)} rows"
    return f"{facts.name} ({format_bytes(facts.bytes)}, {rows})"


# ── what the rules know: the statement, its migration, the target ────────────────────────

@record(frozen=True)
class LintContext:
    """What a rule may consult besides the statement; built by a pure fold over the
    statements of one migration (see advance_context)."""

    catalog: CatalogFacts | None
    transactional: bool
    tool_lock_timeout: bool            # confiture sets lock_timeout for every statement
    has_ddl: bool                      # the migration holds DDL somewhere
    created: frozenset[str] = frozenset()       # tables created earlier in this migration
    lock_timeout_set: bool = False              # the migration set lock_timeout before
    locked_before: bool = False                 # an earlier statement locked an existing table
    not_null_checks: Mapping[str, str] = field(default_factory=dict)  # constraint → table.col
    proven_not_null: frozenset[str] = frozenset()  # table.col, by a CHECK validated here
    utc: bool = False           # the session's TimeZone is UTC (the target's, or SET here)
    volatile: frozenset[str] = frozenset()  # user functions known VOLATILE (target, this run)

    def table(self, name: str) -> TableFacts | None:
        return self.catalog.table(name) if self.catalog else None

    def existing(self, name: str) -> bool:
        """Does the table hold data already? Not if this migration created it; not if the
        target's catalog lacks it (an earlier pending migration creates it)."""
        if self.created and (bare_name(name) in self.created or name in self.created):
            return False
        return self.catalog is None or self.catalog.table(name) is not None

    def describe(self, name: str) -> str:
        return describe_table(name, self.table(name))


def bare_name(name: str) -> str:
    """A name without its schema: public.events → events."""
    return name.rsplit(".", 1)[-1]


def _name_at(tokens: Sequence[Token], i: int) -> tuple[str | None, int]:
    """A possibly qualified name starting at tokens[i] → ('schema.table' or 'table', next)."""
    parts: list[str] = []
    while i < len(tokens) and (tokens[i].word == '"' or tokens[i].word[:1].isalpha()
                               or tokens[i].word[:1] == "_"):
        parts.append(tokens[i].name)
        i += 1
        if i < len(tokens) and tokens[i].word == "." :
            i += 1
            continue
        break
    return (".".join(parts) if parts else None), i


def _skip(words: Sequence[str], i: int, *optional: Sequence[str]) -> int:
    """Skip optional keyword runs (IF EXISTS, ONLY, …) at position i."""
    moved = True
    while moved:
        moved = False
        for run in optional:
            if tuple(words[i:i + len(run)]) == tuple(run):
                i += len(run)
                moved = True
    return i


def _split_top(tokens: Sequence[Token], sep: str = ",") -> list[tuple[Token, ...]]:
    parts: list[tuple[Token, ...]] = []
    depth, start = 0, 0
    for i, tok in enumerate(tokens):
        if tok.word == "(":
            depth += 1
        elif tok.word == ")":
            depth = max(depth - 1, 0)
        elif tok.word == sep and depth == 0:
            parts.append(tuple(tokens[start:i]))
            start = i + 1
    parts.append(tuple(tokens[start:]))
    return [p for p in parts if p]


def alter_table(tokens: Sequence[Token], words: Sequence[str]) -> AlterTable | None:
    """ALTER TABLE [IF EXISTS] [ONLY] name [*] action, action, …"""
    if tuple(words[:2]) != ("ALTER", "TABLE"):
        return None
    i = _skip(words, 2, ("IF", "EXISTS"), ("ONLY",))
    name, i = _name_at(tokens, i)
    if name is None:
        return None
    if i < len(words) and words[i] == "*":
        i += 1
    return AlterTable(name, tuple(Action(part, _words(part)) for part in _split_top(tokens[i:])))


def _words(tokens: Sequence[Token]) -> tuple[str, ...]:
    return tuple(t.word for t in tokens)


def _index_of(words: tuple[str, ...], run: tuple[str, ...], start: int = 0) -> int:
    """Where the words `run` start in `words`, from `start` on; -1 if nowhere."""
    i = max(start, 0)
    try:
        while True:
            i = words.index(run[0], i)  # a C scan: this runs for every action of every rule
            if words[i:i + len(run)] == run:
                return i
            i += 1
    except ValueError:
        return -1


def created_table(tokens: Sequence[Token], words: Sequence[str]) -> str | None:
    """CREATE [UNLOGGED|TEMP …] TABLE [IF NOT EXISTS] name (also … AS)."""
    if not words or words[0] != "CREATE":
        return None
    i = _skip(words, 1, ("OR", "REPLACE"), ("GLOBAL",), ("LOCAL",), ("TEMPORARY",),
              ("TEMP",), ("UNLOGGED",))
    if tuple(words[i:i + 1]) not in (("TABLE",), ("MATERIALIZED",)):
        return None
    i = _skip(words, i + 1, ("VIEW",), ("IF", "NOT", "EXISTS"))
    return _name_at(tokens, i)[0]


def is_ddl(words: Sequence[str]) -> bool:
    """DDL whose locks matter to other sessions: on tables that exist (not CREATE TABLE)."""
    w = tuple(words[:3])
    return w[:2] in (("ALTER", "TABLE"), ("CREATE", "INDEX"), ("CREATE", "UNIQUE"),
                     ("CREATE", "TRIGGER"), ("DROP", "TABLE"), ("DROP", "INDEX")) \
        or w[:1] in (("TRUNCATE",), ("LOCK",), ("CLUSTER",), ("REINDEX",))


def locked_table(p: Parsed, ctx: LintContext) -> str | None:
    """The existing table this statement locks against reads or writes, if any."""
    w = p.words
    name: str | None = None
    if p.alter is not None:
        name = p.alter.table
    elif w[:1] == ("CREATE",) and "INDEX" in w[1:3] and "CONCURRENTLY" not in w[:4]:
        name = index_target(p)
    elif w[:2] in (("DROP", "TABLE"), ("TRUNCATE", "TABLE")) or w[:1] == ("TRUNCATE",) \
            or w[:1] == ("LOCK",):
        names = listed_names(p)
        name = names[0] if names else None
    elif w[:2] == ("DROP", "INDEX") and "CONCURRENTLY" not in w[:3] and ctx.catalog:
        names = listed_names(p)
        name = ctx.catalog.index_table(names[0]) if names else None
    elif p.created is not None and w[:1] == ("CREATE",):
        name = next((n for n in tables_named_by_create(p) if ctx.existing(n)), None)
    return name if name and ctx.existing(name) else None


def tables_named_by_create(p: Parsed) -> list[str]:
    """The other tables a CREATE TABLE locks (seen in pg_locks): the parent of PARTITION OF
    (ACCESS EXCLUSIVE) and each table it REFERENCES (SHARE ROW EXCLUSIVE: writes wait). Both
    queue behind a long transaction like an ALTER TABLE."""
    w = p.words
    starts = [i + 1 for i, word in enumerate(w)
              if word == "REFERENCES" or (word == "OF" and w[i - 1] == "PARTITION")]
    itself = {p.created, bare_name(p.created or "")}  # a self-reference locks nothing else
    return [name for i in starts if (name := _name_at(p.tokens, i)[0]) is not None
            and name not in itself and bare_name(name) != p.created]


def listed_names(p: Parsed) -> list[str]:
    """The names after DROP TABLE / TRUNCATE / LOCK / DROP INDEX … (IF EXISTS, ONLY skipped)."""
    w = p.words
    i = 1 + (1 if w[1:2] in (("TABLE",), ("INDEX",)) else 0)
    i = _skip(w, i, ("CONCURRENTLY",), ("IF", "EXISTS"), ("ONLY",))
    names = []
    for part in _split_top(p.tokens[i:]):
        start = 1 if part and part[0].word == "ONLY" else 0
        name = _name_at(part, start)[0]
        if name:
            names.append(name)
    return names


def index_target(p: Parsed) -> str | None:
    """CREATE [UNIQUE] INDEX [CONCURRENTLY] [[IF NOT EXISTS] name] ON [ONLY] table"""
    on = _index_of(p.words, ("ON",))
    if on < 0:
        return None
    return _name_at(p.tokens, _skip(p.words, on + 1, ("ONLY",)))[0]


def _not_null_check(action: Action) -> str | None:
    """The column of a `CHECK (col IS NOT NULL)` constraint, in as many parentheses as
    pg_get_constraintdef (and so migrate generate) writes: `CHECK ((col IS NOT NULL))`."""
    w = action.words
    at = _index_of(w, ("CHECK", "("))
    if at < 0:
        return None
    depth = 1
    while at + depth + 1 < len(w) and w[at + depth + 1] == "(":
        depth += 1
    column = at + depth + 1
    if tuple(w[column + 1:column + 4 + depth]) != ("IS", "NOT", "NULL") + (")",) * depth:
        return None
    return action.tokens[column].name


def _timezone_set(p: Parsed) -> str | None:
    """The zone of SET [SESSION|LOCAL] timezone = 'X' / SET TIME ZONE 'X'."""
    w = p.words
    i = _skip(w, 1, ("SESSION",), ("LOCAL",)) if w[:1] == ("SET",) else 0
    if i and (w[i:i + 1] == ("TIMEZONE",) or w[i:i + 2] == ("TIME", "ZONE")):
        value = p.tokens[-1]
        return value.name.strip("'") if value.word in ("'", '"') or value.word.isalpha() \
            else None
    return None


def volatile_function_created(p: Parsed) -> str | None:
    """CREATE [OR REPLACE] FUNCTION name(…) without IMMUTABLE or STABLE (VOLATILE is the
    default) → its bare name."""
    w = p.words
    i = _skip(w, 1, ("OR", "REPLACE")) if w[:1] == ("CREATE",) else 0
    if not i or w[i:i + 1] != ("FUNCTION",) or "IMMUTABLE" in w or "STABLE" in w:
        return None
    name = _name_at(p.tokens, i + 1)[0]
    return bare_name(name) if name else None


def advance_context(ctx: LintContext, p: Parsed) -> LintContext:
    """What the next statement of the migration may assume after this one ran."""
    w = p.words
    changes: dict[str, Any] = {}
    if (made := p.created) is not None:
        changes["created"] = ctx.created | {made, bare_name(made)}
    if (w[:2] == ("SET", "LOCK_TIMEOUT") or w[:3] == ("SET", "LOCAL", "LOCK_TIMEOUT")
            or (w[:3] == ("SELECT", "SET_CONFIG", "(") and len(p.tokens) > 3
                and p.tokens[3].name.strip("'").lower() == "lock_timeout")):
        changes["lock_timeout_set"] = True
    if not ctx.locked_before and locked_table(p, ctx):
        changes["locked_before"] = True
    if (zone := _timezone_set(p)) is not None:
        changes["utc"] = zone.lower() in UTC_NAMES
    if (function := volatile_function_created(p)) is not None:
        changes["volatile"] = ctx.volatile | {function}
    if (at := p.alter) is not None:
        checks = dict(ctx.not_null_checks)
        proven = set(ctx.proven_not_null)
        for action in at.actions:
            aw, tokens = action.words, action.tokens
            column = _not_null_check(action)
            if aw[:2] == ("ADD", "CONSTRAINT") and column and len(aw) > 2:
                checks[tokens[2].name] = f"{bare_name(at.table)}.{column}"
                if aw[-2:] != ("NOT", "VALID"):
                    proven.add(f"{bare_name(at.table)}.{column}")
            if aw[:2] == ("VALIDATE", "CONSTRAINT") and len(aw) > 2 \
                    and tokens[2].name in checks:
                proven.add(checks[tokens[2].name])
        if checks != ctx.not_null_checks or proven != ctx.proven_not_null:
            changes["not_null_checks"], changes["proven_not_null"] = checks, frozenset(proven)
    return evolve(ctx, **changes) if changes else ctx  # a copy only when something changed


# ── the rules ─────────────────────────────────────────────────────────────────────────────

@record(frozen=True)
class Hit:
    """A rule's verdict on one statement: the message, the table it is about, and a level
    when the target's facts change it (a tiny table makes a blocking build harmless)."""

    message: str
    table: str | None = None
    level: str | None = None
    line: int | None = None     # when not the statement's first line (a comment above it)


RuleCheck = Callable[[Parsed, LintContext], Iterable[Hit]]


@record(frozen=True)
class LintRule:
    id: str
    level: str        # "error" or "warning"
    why: str          # one line: what goes wrong in production
    instead: str      # the safe alternative
    check: RuleCheck
    default: bool = True     # False: runs only when [migrations] lint_enable lists it
    scales: bool = False     # its harm grows with the table: below LINT_SMALL_BYTES, a warning
    reads: tuple[str, ...] = ()  # the first words of the statements it checks; (): all


def check_create_index(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    w = p.words
    if w[:1] == ("CREATE",) and "INDEX" in w[1:3] and "CONCURRENTLY" not in w[:4]:
        table = index_target(p)
        if table and ctx.existing(table):
            yield Hit(f"builds an index on {ctx.describe(table)} and blocks its writes until "
                      "done", table)


def check_drop_index(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if p.words[:2] == ("DROP", "INDEX") and "CONCURRENTLY" not in p.words[:3]:
        for name in listed_names(p):
            table = ctx.catalog.index_table(name) if ctx.catalog else None
            if ctx.catalog is None:
                yield Hit(f"drops index {name} under an ACCESS EXCLUSIVE lock on its table")
            elif table is not None:
                yield Hit(f"drops index {name} under an ACCESS EXCLUSIVE lock on "
                          f"{ctx.describe(table)}", table)


def _alter_actions(p: Parsed, ctx: LintContext) -> Iterator[tuple[str, Action]]:
    at = p.alter
    if at is not None and ctx.existing(at.table):
        for action in at.actions:
            yield at.table, action


def check_constraint_not_valid(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        w = action.words
        if w[:1] != ("ADD",) or w[-2:] == ("NOT", "VALID"):
            continue
        kind = next((k for k in ("FOREIGN", "REFERENCES", "CHECK") if k in w), None)
        if kind is None:
            continue
        what = "a CHECK constraint" if kind == "CHECK" else "a foreign key"
        yield Hit(f"adds {what} to {ctx.describe(table)} and scans it to validate, blocking "
                  "writes meanwhile", table)


def check_set_not_null(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        altered = _altered_column(action)
        if altered is None or action.words[-3:] != ("SET", "NOT", "NULL"):
            continue
        column = altered[0]
        if f"{bare_name(table)}.{column}" in ctx.proven_not_null:
            continue
        facts = ctx.table(table)
        if facts and (ctx.catalog is None or ctx.catalog.server_version >= 120000) and any(
                validated and re.fullmatch(rf'CHECK \(\(?"?{re.escape(column)}"? IS NOT NULL\)?\)',
                                           definition)
                for _, validated, definition in facts.checks):
            continue
        yield Hit(f"SET NOT NULL on {table}.{column} scans {ctx.describe(table)} under an "
                  "ACCESS EXCLUSIVE lock", table)


_TYPE_ALIASES = {"varchar": "character varying", "int": "integer", "int4": "integer",
                 "int8": "bigint", "int2": "smallint", "decimal": "numeric",
                 "timestamptz": "timestamp with time zone", "bool": "boolean",
                 "float8": "double precision", "float4": "real", "char": "character",
                 "bpchar": "character", "varbit": "bit varying"}


def normalise_type(text: str) -> tuple[str, tuple[int, ...]]:
    """'VARCHAR(20)' → ('character varying', (20,)); as format_type() spells types."""
    match = re.fullmatch(r"\s*([a-z0-9_ .\"]+?)\s*(?:\(([\d,\s]+)\))?\s*(\[\])?\s*",
                         text.lower())
    if not match:
        return text.lower().strip(), ()
    base = re.sub(r"\s+", " ", match.group(1).replace('"', "")).removeprefix("pg_catalog.")
    base = _TYPE_ALIASES.get(base, base)
    if base == "timestamp":
        base = "timestamp without time zone"
    args = tuple(int(a) for a in (match.group(2) or "").replace(" ", "").split(",") if a)
    return base + (match.group(3) or ""), args


_TIMESTAMPS = ("timestamp without time zone", "timestamp with time zone")
UTC_NAMES = ("utc", "etc/utc", "gmt", "etc/gmt", "z", "zulu", "uct", "universal")


def type_change_rewrites(old: str | None, new: str, utc: bool = False) -> bool | None:
    """Whether ALTER COLUMN … TYPE new rewrites a column of type old (None: cannot tell).
    `utc`: the session's TimeZone is UTC, where timestamp ↔ timestamptz is binary compatible
    (PostgreSQL 12+)."""
    nb, na = normalise_type(new)
    if old is None:  # widening varchar/numeric/text is free; without the old type, no verdict
        return None if nb in ("text", "character varying", "numeric", "bit varying") or (
            utc and nb in _TIMESTAMPS) else True
    ob, oa = normalise_type(old)
    if (ob, oa) == (nb, na) or (utc and ob in _TIMESTAMPS and nb in _TIMESTAMPS and oa == na):
        return False
    if ob in ("character varying", "text") and nb in ("character varying", "text"):
        return bool(na) and (ob == "text" or not oa or na[0] < oa[0])
    if ob == nb == "numeric":
        return bool(na) and (not oa or len(na) < 2 or len(oa) < 2 or na[1] != oa[1]
                             or na[0] < oa[0])
    if ob == nb == "bit varying":
        return bool(na) and (not oa or na[0] < oa[0])
    return not (ob == "cidr" and nb == "inet")


def _altered_column(action: Action) -> tuple[str, int] | None:
    """ALTER [COLUMN] name … → (name, index of what follows the name)."""
    w = action.words
    if w[:1] != ("ALTER",) or len(w) < 3:
        return None
    i = 2 if w[1] == "COLUMN" else 1
    return action.tokens[i].name, i + 1


def check_type_change(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        altered = _altered_column(action)
        if altered is None:
            continue
        column, at = altered
        w, tokens = action.words, action.tokens
        at = _skip(w, at, ("SET", "DATA"))
        if w[at:at + 1] != ("TYPE",):
            continue
        stop = next((i for i in range(at + 1, len(w)) if w[i] in ("USING", "COLLATE")), len(w))
        new = " ".join(t.name for t in tokens[at + 1:stop]).replace(" ( ", "(").replace(
            " )", ")").replace(" , ", ",")
        facts = ctx.table(table)
        old = facts.columns.get(column) if facts else None
        using = [t.name for t in tokens[stop + 1:]] if "USING" in w[stop:stop + 1] else None
        utc = ctx.utc and (ctx.catalog is None or ctx.catalog.server_version >= 120000)
        rewrites = True if using not in (None, [column]) else type_change_rewrites(old, new, utc)
        if rewrites:
            change = f"from {old} to {new}" if old else f"to {new}"
            yield Hit(f"changes {table}.{column} {change}: rewrites {ctx.describe(table)} "
                      "under an ACCESS EXCLUSIVE lock", table)


_VOLATILE = {"random", "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v1mc",
             "uuid_generate_v4", "clock_timestamp", "timeofday", "nextval", "txid_current",
             "statement_timestamp"}
_SERIALS = {"SERIAL", "BIGSERIAL", "SMALLSERIAL", "SERIAL2", "SERIAL4", "SERIAL8"}


def _added_column(action: Action) -> tuple[str, tuple[Token, ...]] | None:
    """ADD [COLUMN] [IF NOT EXISTS] name type … → (name, the rest)."""
    w = action.words
    if w[:1] != ("ADD",) or w[1:2] in (("CONSTRAINT",), ("PRIMARY",), ("UNIQUE",), ("CHECK",),
                                       ("FOREIGN",), ("EXCLUDE",)):
        return None
    i = _skip(w, 1, ("COLUMN",), ("IF", "NOT", "EXISTS"))
    if i >= len(w):
        return None
    return action.tokens[i].name, action.tokens[i + 1:]


def check_volatile_default(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        added = _added_column(action)
        if added is None:
            continue
        column, rest = added
        w = _words(rest)
        why = None
        if w[:1] and w[0] in _SERIALS:
            why = f"a {rest[0].name} (nextval) default"
        elif "GENERATED" in w and w[-1:] == ("STORED",):
            why = "a stored generated value"
        elif "DEFAULT" in w:
            tail = rest[w.index("DEFAULT") + 1:]
            func = next((t.name for t, n in itertools.pairwise(tail)
                         if (t.name in _VOLATILE or t.name in ctx.volatile) and n.word == "("),
                        None)
            if func:
                why = f"the volatile default {func}()"
            elif ctx.catalog and ctx.catalog.server_version < 110000 \
                    and _words(tail)[:1] != ("NULL",):
                why = "a default (PostgreSQL < 11 rewrites for any default)"
        if why:
            yield Hit(f"adds column {column} with {why}: rewrites {ctx.describe(table)} under "
                      "an ACCESS EXCLUSIVE lock", table)


def _index_columns(definition: str) -> str:
    match = re.search(r"USING \w+ \((.*)\)", definition)
    return match.group(1).replace('"', "") if match else ""


def check_unique_without_index(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        w = action.words
        if w[:1] != ("ADD",) or "USING" in w:
            continue
        kind = "PRIMARY KEY" if _index_of(w, ("PRIMARY", "KEY")) >= 0 else (
            "UNIQUE" if "UNIQUE" in w else None)
        if kind is None:
            continue
        open_at = _index_of(w, ("(",), _index_of(w, tuple(kind.split())))
        close_at = _index_of(w, (")",), open_at)
        columns = ", ".join(t.name for t in action.tokens[open_at + 1:close_at] if t.word != ",") \
            if open_at >= 0 and close_at > open_at else ""
        facts = ctx.table(table)
        ready = next((name for name, unique, definition in (facts.indexes if facts else ())
                      if unique and columns and _index_columns(definition) == columns), None)
        note = f"; unique index {ready} exists: ADD … {kind} USING INDEX {bare_name(ready)}" \
            if ready else ""
        yield Hit(f"adds {kind} to {ctx.describe(table)}, building its index under an ACCESS "
                  f"EXCLUSIVE lock{note}", table)


def check_drop_table(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if p.words[:2] == ("DROP", "TABLE"):
        for name in listed_names(p):
            if ctx.existing(name):
                yield Hit(f"drops {ctx.describe(name)} and its data", name)


def check_drop_column(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        w = action.words
        if w[:1] == ("DROP",) and w[1:2] not in (("CONSTRAINT",), ("DEFAULT",), ("NOT",),
                                                  ("EXPRESSION",), ("IDENTITY",)):
            i = _skip(w, 1, ("COLUMN",), ("IF", "EXISTS"))
            if i < len(w):
                yield Hit(f"drops column {action.tokens[i].name} of {ctx.describe(table)} and its "
                          "data", table)


def check_truncate(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if p.words[:1] == ("TRUNCATE",):
        for name in listed_names(p):
            if ctx.existing(name):
                yield Hit(f"empties {ctx.describe(name)}", name)


def check_rename_table(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        if action.words[:2] == ("RENAME", "TO") and len(action.words) > 2:
            yield Hit(f"renames table {table} to {action.tokens[2].name}: running code still uses "
                      "the old name", table)


def check_rename_column(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for table, action in _alter_actions(p, ctx):
        w, tokens = action.words, action.tokens
        if w[:1] == ("RENAME",) and w[1:2] not in (("TO",), ("CONSTRAINT",)):
            at = _index_of(w, ("TO",))
            column = tokens[2 if w[1] == "COLUMN" else 1].name
            if at > 0 and at + 1 < len(w):
                yield Hit(f"renames column {table}.{column} to {tokens[at + 1].name}: running "
                          "code still uses the old name", table)


def check_unknown_allow(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    for allowance in p.allowed:
        if allowance.rule not in LINT_RULE_IDS:
            close = suggest(allowance.rule, sorted(LINT_RULE_IDS))
            yield Hit(f"confiture:allow names no lint rule {allowance.rule!r}"
                      + (f" ({close})" if close else "") + ": it silences nothing",
                      line=allowance.line)


def _statement_hit(label: str, needs: Sequence[str], absent: str | None = None) -> RuleCheck:
    """A rule that fires on a kind of statement (VACUUM FULL, CLUSTER, LOCK, REINDEX)."""
    verb = label.split()[0]

    def check(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
        head = p.words[:6]
        if p.words[:1] == (verb,) and all(n in head for n in needs) \
                and (absent is None or absent not in head):
            names = listed_names(p) if verb == "LOCK" else []
            target = next((t for t in (index_target_of_maintenance(p), *names) if t), None)
            where = f" on {ctx.describe(target)}" if target else ""
            yield Hit(f"{label}{where} blocks the table's users while it runs", target)
    return check


def index_target_of_maintenance(p: Parsed) -> str | None:
    """The table named by VACUUM FULL t / CLUSTER t / REINDEX TABLE t."""
    w = p.words
    if w[:1] == ("REINDEX",) and w[1:2] == ("TABLE",):
        return _name_at(p.tokens, _skip(w, 2, ("CONCURRENTLY",)))[0]
    if w[:1] in (("VACUUM",), ("CLUSTER",)):
        i = 1
        if w[1:2] == ("(",):
            i = w.index(")") + 1 if ")" in w else len(w)
        i = _skip(w, i, ("FULL",), ("VERBOSE",), ("FREEZE",), ("ANALYZE",))
        return _name_at(p.tokens, i)[0]
    return None


def check_enum_in_transaction(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if (p.words[:2] == ("ALTER", "TYPE") and _index_of(p.words, ("ADD", "VALUE")) > 0
            and ctx.transactional and ctx.catalog and ctx.catalog.server_version < 120000):
        yield Hit(f"ALTER TYPE … ADD VALUE cannot run in a transaction on PostgreSQL "
                  f"{ctx.catalog.server_version // 10000}")


def check_concurrently_in_transaction(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if ctx.transactional and needs_no_transaction(p.words):
        what = f"{p.words[0]} … CONCURRENTLY" if "CONCURRENTLY" in p.words[:5] else p.words[0]
        yield Hit(f"{what} cannot run inside the migration's transaction")


def check_lock_timeout(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    if ctx.tool_lock_timeout or ctx.lock_timeout_set or ctx.locked_before:
        return
    table = locked_table(p, ctx)
    if table:
        yield Hit(f"locks {ctx.describe(table)} with no lock_timeout: queued behind one long "
                  "transaction, it blocks every query after it", table)


def check_ddl_with_update(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
    w = p.words
    if not (ctx.transactional and ctx.has_ddl and w[:1] in (("UPDATE",), ("DELETE",))):
        return
    i = _skip(w, 1, ("FROM",), ("ONLY",))
    table = _name_at(p.tokens, i)[0]
    if table is None or not ctx.existing(table):
        return
    facts = ctx.table(table)
    if facts is not None and facts.rows < LINT_LARGE_ROWS:
        return
    yield Hit(f"{w[0]} of {ctx.describe(table)} in the same transaction as DDL: the DDL's "
              "locks are held until it finishes", table,
              None if facts is not None else "warning")


def _type_rule(test: Callable[[Sequence[str], int], bool], text: str) -> RuleCheck:
    """A rule on column types, in CREATE TABLE and ALTER TABLE only (not in function
    signatures or casts elsewhere)."""
    def check(p: Parsed, ctx: LintContext) -> Iterable[Hit]:
        table = p.created or (p.alter.table if p.alter else None)
        if table is not None and any(test(p.words, i) for i in range(len(p.words))):
            yield Hit(f"{text} in {table}", table)
    return check


def _is_serial(w: Sequence[str], i: int) -> bool:
    return w[i] in _SERIALS


def _is_timestamp(w: Sequence[str], i: int) -> bool:
    if w[i] != "TIMESTAMP" or (i and w[i - 1] in ("::", "AS", "DEFAULT")):
        return False
    j = i + 4 if w[i + 1:i + 2] == ("(",) else i + 1
    return tuple(w[j:j + 3]) != ("WITH", "TIME", "ZONE")


def _is_char(w: Sequence[str], i: int) -> bool:
    return w[i] in ("CHAR", "CHARACTER", "BPCHAR") and w[i + 1:i + 2] != ("VARYING",)


def _is_money(w: Sequence[str], i: int) -> bool:
    return w[i] == "MONEY"


LINT_RULES: tuple[LintRule, ...] = (
    LintRule("create-index-not-concurrent", "error",
             "CREATE INDEX blocks writes to the table until the index is built",
             "CREATE INDEX CONCURRENTLY, in a migration of its own that starts with "
             "'-- confiture:no-transaction'", check_create_index, scales=True,
             reads=("CREATE",)),
    LintRule("drop-index-not-concurrent", "error",
             "DROP INDEX takes an ACCESS EXCLUSIVE lock on the table: it waits for every "
             "running query and blocks all that come after",
             "DROP INDEX CONCURRENTLY, in a '-- confiture:no-transaction' migration",
             check_drop_index,
             reads=("DROP",)),
    LintRule("constraint-not-valid", "error",
             "adding a FOREIGN KEY or CHECK scans the whole table while writes are blocked",
             "ADD CONSTRAINT … NOT VALID, then ALTER TABLE … VALIDATE CONSTRAINT in a later "
             "migration (it does not block writes)", check_constraint_not_valid, scales=True,
             reads=("ALTER",)),
    LintRule("set-not-null", "error",
             "SET NOT NULL scans the table under an ACCESS EXCLUSIVE lock",
             "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; then "
             "SET NOT NULL skips the scan (PostgreSQL 12+) and c can be dropped",
             check_set_not_null, scales=True,
             reads=("ALTER",)),
    LintRule("rewriting-type-change", "error",
             "changing a column's type rewrites the table and its indexes under an ACCESS "
             "EXCLUSIVE lock (int→bigint does; varchar widening and varchar→text do not)",
             "add a new column, backfill it in batches, switch readers, drop the old one",
             check_type_change, scales=True,
             reads=("ALTER",)),
    LintRule("volatile-default", "error",
             "ADD COLUMN with a volatile default (random(), gen_random_uuid(), "
             "clock_timestamp(), serial) rewrites the table under an ACCESS EXCLUSIVE lock",
             "add the column without a default (or with a constant one), SET DEFAULT, then "
             "backfill in batches", check_volatile_default, scales=True,
             reads=("ALTER",)),
    LintRule("unique-without-index", "error",
             "ADD UNIQUE / PRIMARY KEY builds the index while the table is locked",
             "CREATE UNIQUE INDEX CONCURRENTLY first, then ADD CONSTRAINT … UNIQUE (or "
             "PRIMARY KEY) USING INDEX", check_unique_without_index, scales=True,
             reads=("ALTER",)),
    LintRule("drop-table", "error", "the table and its data are gone; running code that "
             "still reads it fails", "stop using the table in a release first; keep a backup",
             check_drop_table,
             reads=("DROP",)),
    LintRule("drop-column", "error", "the column's data is gone; running code that still "
             "names it fails", "stop using the column in a release first, then drop it",
             check_drop_column,
             reads=("ALTER",)),
    LintRule("truncate", "error", "TRUNCATE deletes every row under an ACCESS EXCLUSIVE lock",
             "DELETE in batches, or suppress when the data is meant to go",
             check_truncate,
             reads=("TRUNCATE",)),
    LintRule("rename-table", "error", "running code still uses the old name and fails",
             "create a view with the old name, or rename in steps across releases",
             check_rename_table,
             reads=("ALTER",)),
    LintRule("rename-column", "error", "running code still uses the old name and fails",
             "add the new column, write both, backfill, switch readers, drop the old one",
             check_rename_column,
             reads=("ALTER",)),
    LintRule("vacuum-full", "error",
             "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock",
             "plain VACUUM, or pg_repack outside the migration",
             _statement_hit("VACUUM FULL", ("FULL",)),
             reads=("VACUUM",)),
    LintRule("cluster", "error", "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock",
             "pg_repack outside the migration", _statement_hit("CLUSTER", ()),
             reads=("CLUSTER",)),
    LintRule("lock-table", "error", "an explicit LOCK TABLE blocks other sessions for the "
             "rest of the migration", "rely on the locks the statements take, bounded by "
             "lock_timeout", _statement_hit("LOCK TABLE", ()),
             reads=("LOCK",)),
    LintRule("reindex-not-concurrent", "error",
             "REINDEX blocks writes (and reads through the index) while it runs",
             "REINDEX … CONCURRENTLY (PostgreSQL 12+) in a '-- confiture:no-transaction' "
             "migration", _statement_hit("REINDEX", (), "CONCURRENTLY"),
             reads=("REINDEX",)),
    LintRule("enum-add-value-in-transaction", "error",
             "before PostgreSQL 12, ALTER TYPE … ADD VALUE fails inside a transaction block",
             "put it in a '-- confiture:no-transaction' migration", check_enum_in_transaction,
             reads=("ALTER",)),
    LintRule("concurrently-in-transaction", "error",
             "CONCURRENTLY (and VACUUM) cannot run inside a transaction block; the migration "
             "would fail", "move it to a migration that starts with "
             "'-- confiture:no-transaction'", check_concurrently_in_transaction,
             reads=("VACUUM", "CREATE", "DROP", "REINDEX", "ALTER")),
    LintRule("missing-lock-timeout", "warning",
             "DDL waiting for its lock behind a long transaction blocks every query queued "
             "after it", "SET lock_timeout = '5s' at the top of the migration, or set "
             "[migrations] statement_lock_timeout", check_lock_timeout,
             reads=("ALTER", "CREATE", "DROP", "TRUNCATE", "LOCK")),
    LintRule("ddl-with-data-update", "error",
             "a large UPDATE/DELETE in the same transaction as DDL keeps the DDL's locks "
             "for as long as the data change runs",
             "move the data change to its own migration (in batches)", check_ddl_with_update,
             reads=("UPDATE", "DELETE")),
    LintRule("prefer-identity", "warning",
             "serial columns own a separate sequence with its own permissions and dump quirks",
             "GENERATED BY DEFAULT AS IDENTITY", _type_rule(_is_serial, "serial column"),
             reads=("CREATE", "ALTER")),
    LintRule("prefer-timestamptz", "warning",
             "timestamp without time zone loses the offset; comparisons across zones break",
             "timestamptz", _type_rule(_is_timestamp, "timestamp without time zone"),
             default=False,
             reads=("CREATE", "ALTER")),
    LintRule("prefer-text", "warning",
             "char(n) pads with blanks and is no faster than text",
             "text (with a CHECK on length if needed)", _type_rule(_is_char, "char(n)"),
             default=False,
             reads=("CREATE", "ALTER")),
    LintRule("avoid-money", "warning",
             "money depends on lc_monetary and rounds to the locale's fraction",
             "numeric with an explicit scale", _type_rule(_is_money, "money"), default=False,
             reads=("CREATE", "ALTER")),
    LintRule("unknown-allow", "error",
             "a '-- confiture:allow' that names no rule (a typo?) silences nothing: the finding "
             "it was written for still stands, or was never there",
             "name a rule listed by 'confiture.py migrate lint --rules'", check_unknown_allow),
)
LINT_RULE_IDS = {rule.id: rule for rule in LINT_RULES}


# ════════════════════════════════════════════════════════════════════════════════════════════
# §8c Running the lint
# The rules of §8b over the files to lint: which files (the env's pending migrations, or those
# named), the facts of the env's catalog through §5 (asked once, early), the parse cache,
# findings and the report, and the gate deploy / migrate up pass on a protected env.
# ════════════════════════════════════════════════════════════════════════════════════════════

# ── running the rules (pure) ──────────────────────────────────────────────────────────────

@record(frozen=True)
class LintUnit:
    """One file to lint: a migration's up file, or a file named on the command line."""

    label: str          # its path as shown (relative to the project)
    statements: tuple[Statement, ...]
    transactional: bool
    checksum: str | None = None               # a migration's: the key of the ParseCache
    parsed: tuple[Parsed, ...] | None = None  # from the ParseCache (statements not read)


@record(frozen=True)
class Finding:
    rule: str
    level: str
    file: str
    line: int
    message: str
    table: str | None = None
    allowed: str | None = None    # the suppression's reason

    def as_json(self) -> dict[str, Any]:
        rule = LINT_RULE_IDS[self.rule]
        return {"rule": self.rule, "level": self.level, "file": self.file, "line": self.line,
                "message": self.message, "table": self.table, "why": rule.why,
                "instead": rule.instead, "allowed": self.allowed}


@record(frozen=True)
class LintSettings:
    enabled: frozenset[str]
    tool_lock_timeout: bool = False

    @staticmethod
    def of(enable: Sequence[str] = (), disable: Sequence[str] = (),
           tool_lock_timeout: bool = False) -> LintSettings:
        for name in (*enable, *disable):
            if name not in LINT_RULE_IDS:
                raise ConfigError(f"[migrations] lint_enable/lint_disable: no lint rule {name!r}",
                                  hint=suggest(name, sorted(LINT_RULE_IDS)))
        on = {r.id for r in LINT_RULES if r.default} | set(enable)
        return LintSettings(frozenset(on - set(disable)), tool_lock_timeout)


@record(frozen=True)
class LintReport:
    findings: tuple[Finding, ...]
    files: int
    statements: int
    target: str | None           # the env whose catalog was read
    server_version: int | None
    note: str | None = None      # why there is no catalog, when there is none

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "error" and f.allowed is None)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "warning" and f.allowed is None)

    @property
    def allowed(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.allowed is not None)

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "server_version": self.server_version,
                "note": self.note, "files": self.files, "statements": self.statements,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "allowed": len(self.allowed), "findings": [f.as_json() for f in self.findings]}


def parse_units(units: Sequence[LintUnit], cache: ParseCache | None = None
                ) -> list[list[Parsed]]:
    out = []
    for unit in units:
        if unit.parsed is not None:
            out.append(list(unit.parsed))
            continue
        out.append([parse_statement(s, unit.label) for s in unit.statements])
        if cache is not None:
            cache.keep(unit, out[-1])
    return out


def referenced_names(parsed: Sequence[Sequence[Parsed]]) -> set[str]:
    """Every identifier the statements mention, bare: the catalog query looks only at these."""
    return token_names((t.word, t.name) for unit in parsed for p in unit for t in p.tokens)


def token_names(tokens: Iterable[tuple[str, str]]) -> set[str]:
    """referenced_names of tokens given as (word, name) pairs."""
    return {bare_name(name) if word == '"' else name  # only a quoted name holds a '.'
            for word, name in tokens if word == '"' or word[:1].isalpha()}


_NAME_OR_WORD = re.compile(r'"((?:[^"]|"")*)"|([^\W\d][\w$]*)')


def mentioned_names(units: Sequence[LintUnit]) -> set[str]:
    """Every word and quoted name in the units' text, comments and strings included: almost
    always a superset of referenced_names, found without parsing (a quote inside a string
    can hide a quoted name: answered_catalog then asks again)."""
    found: set[str] = set()
    for unit in units:
        for stmt in unit.statements:
            found.update(bare_name(quoted.replace('""', '"')) if quoted else word.lower()
                         for quoted, word in _NAME_OR_WORD.findall(stmt.text))
    return found


def lint_units(units: Sequence[LintUnit], parsed: Sequence[Sequence[Parsed]],
               catalog: CatalogFacts | None, settings: LintSettings) -> list[Finding]:
    """Every rule over every statement, in file order. Pure."""
    rules = [r for r in LINT_RULES if r.id in settings.enabled]
    by_verb: dict[str, list[LintRule]] = {}   # a statement meets only the rules that read it
    findings: list[Finding] = []
    volatile = catalog.volatile if catalog else frozenset()  # grows with CREATE FUNCTION
    # NOT NULL checks carry over to the migrations after: `migrate generate --online` adds one
    # NOT VALID in its first migration and validates it before SET NOT NULL in the second
    checks: Mapping[str, str] = {}
    proven: frozenset[str] = frozenset()
    for unit, statements in zip(units, parsed):
        ctx = LintContext(catalog=catalog, transactional=unit.transactional,
                          tool_lock_timeout=settings.tool_lock_timeout,
                          has_ddl=any(is_ddl(p.words) for p in statements),
                          utc=catalog is not None and catalog.timezone.lower() in UTC_NAMES,
                          volatile=volatile, not_null_checks=checks, proven_not_null=proven)
        for p in statements:
            allowed = {a.rule: a.reason for a in p.allowed} if p.allowed else {}
            verb = p.words[0] if p.words else ""
            if verb not in by_verb:
                by_verb[verb] = [r for r in rules if not r.reads or verb in r.reads]
            for rule in by_verb[verb]:
                for hit in rule.check(p, ctx):
                    facts = ctx.table(hit.table) if hit.table else None
                    findings.append(Finding(rule.id, _hit_level(rule, hit, ctx), p.file,
                                            hit.line or p.line, hit.message,
                                            facts.name if facts else hit.table,
                                            allowed.get(rule.id)))
            ctx = advance_context(ctx, p)
        volatile, checks, proven = ctx.volatile, ctx.not_null_checks, ctx.proven_not_null
    return findings


def _hit_level(rule: LintRule, hit: Hit, ctx: LintContext) -> str:
    if hit.level:
        return hit.level
    facts = ctx.table(hit.table) if hit.table else None
    if rule.scales and facts is not None and facts.bytes < LINT_SMALL_BYTES:
        return "warning"  # an ACCESS EXCLUSIVE build of a few pages is over in milliseconds
    return rule.level


def lint_report(units: Sequence[LintUnit], catalog: CatalogFacts | None,
                settings: LintSettings, target: str | None = None,
                note: str | None = None) -> LintReport:
    parsed = parse_units(units)
    return LintReport(tuple(lint_units(units, parsed, catalog, settings)), len(units),
                      sum(len(u) for u in parsed), target,
                      catalog.server_version if catalog else None, note)


# ── the doing: which files, which target ──────────────────────────────────────────────────

def lint_settings(config: Config, env: Env) -> LintSettings:
    return LintSettings.of(config.lint_enable, config.lint_disable,
                           statement_lock_timeout(config, env) is not None)


def migration_unit(migration: Migration, root: Path, cache: ParseCache | None = None
                   ) -> LintUnit:
    label = migration_rel_file(root, migration.up_file)
    if cache is not None and (parsed := cache.parsed(migration.checksum, label)) is not None:
        return LintUnit(label, (), migration.transactional, migration.checksum, parsed)
    statements, transactional = migration_statements(migration, "up", root)
    return LintUnit(label, tuple(statements), transactional, migration.checksum)


def _entry_names(entry: Any) -> set[str] | None:
    """referenced_names of a ParseCache entry's statements; None for a damaged entry."""
    try:
        names = token_names(pair for _, _, flat in entry for pair in zip(flat[0::2], flat[1::2]))
    except (TypeError, ValueError, AttributeError):
        return None
    return names if all(isinstance(name, str) for name in names) else None


class ParseCache:
    """The parsed statements of the migrations the last lint read, by checksum. Splitting
    and tokenising are most of a lint's own time: ~35 ms of ~60 for 200 migrations
    (bench_lint), against ~10 ms to load them from here. The key is the migration's
    checksum (a changed file is a new key) and the stamp of this very file (what another
    version of confiture wrote is never read). Like the scan's ChecksumCache, a broken or
    unwritable cache only makes the lint slower."""

    def __init__(self, path: Path) -> None:
        self.path = path
        stat = os.stat(__file__)
        self.code = f"{stat.st_size}:{stat.st_mtime_ns}"
        self.entries: dict[str, Any] = {}
        self.used: dict[str, Any] = {}
        try:
            data = json.loads(path.read_bytes())
            if data["code"] == self.code and isinstance(data["files"], dict):
                self.entries = data["files"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # The names for the catalog query, read from the tokens as stored (not rebuilt): of
        # every file held, pending or not (a name too many costs the query nothing). A
        # damaged entry is dropped: its file is parsed again.
        self.names: set[str] = set()
        for checksum, entry in list(self.entries.items()):
            if (names := _entry_names(entry)) is None:
                del self.entries[checksum]
            else:
                self.names |= names

    def holds(self, checksum: str) -> bool:
        return checksum in self.entries

    def parsed(self, checksum: str, label: str) -> tuple[Parsed, ...] | None:
        entry = self.entries.get(checksum)
        if entry is None:
            return None
        try:
            parsed = tuple(parsed_statement(label, tuple(map(Token, flat[0::2], flat[1::2])),
                                            tuple(Allowance(*a) for a in allowed), line)
                           for line, allowed, flat in entry)
        except (TypeError, ValueError, AttributeError):
            return None  # a damaged entry: the file is parsed again
        self.used[checksum] = entry
        return parsed

    def keep(self, unit: LintUnit, parsed: Sequence[Parsed]) -> None:
        if unit.checksum is not None:
            self.used[unit.checksum] = [
                [p.line, [[a.rule, a.reason, a.line] for a in p.allowed],
                 [part for t in p.tokens for part in (t.word, t.name)]] for p in parsed]

    def save(self) -> None:
        """Keep the entries this run used (the pending migrations), drop the rest."""
        if self.used.keys() != self.entries.keys():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, json.dumps({"code": self.code,
                                                    "files": self.used}).encode())
            except (OSError, InputError):
                pass  # a read-only checkout: stay correct, just slower


def file_unit(path: Path, root: Path) -> LintUnit:
    rel = migration_rel_path(root, path.resolve()) if path.is_absolute() else str(path)
    data = normalise_sql(read_sql_file(path, rel))
    return LintUnit(rel, tuple(split_sql(data.decode("utf-8"))), file_transactional(data))


def lint_on(session: Session, ws: Workspace, units: Sequence[LintUnit],
            settings: LintSettings) -> LintReport:
    """Lint with the facts of the session's database. The catalog query goes out before the
    statements are parsed and is answered meanwhile (the parse is most of the lint's time)."""
    asked = mentioned_names(units)
    answer = request_catalog(session, asked)
    parsed = parse_units(units)
    catalog = answered_catalog(session, answer, asked, parsed)
    return LintReport(tuple(lint_units(units, parsed, catalog, settings)), len(units),
                      sum(len(u) for u in parsed), ws.env.name, catalog.server_version)


def lint_pending(session: Session, ws: Workspace, pending: Sequence[Migration],
                 settings: LintSettings, cache: ParseCache) -> LintReport:
    """lint_on for the env's pending migrations, through the parse cache. The names of the
    files it holds are in it, so the catalog query goes out before their statements are
    rebuilt (~7 ms for 200 files) and is answered meanwhile; the files it lacks are read
    first, for their names."""
    root = ws.config.root
    read = [None if cache.holds(m.checksum) else migration_unit(m, root) for m in pending]
    asked = cache.names | mentioned_names([unit for unit in read if unit is not None])
    answer = request_catalog(session, asked)
    units = [unit or migration_unit(m, root, cache) for unit, m in zip(read, pending)]
    parsed = parse_units(units, cache)
    # a statement rebuilt from the cache references exactly the names asked for its entry
    fresh = [p for unit, p in zip(units, parsed) if unit.parsed is None]
    catalog = answered_catalog(session, answer, asked, fresh)
    session.quit()  # nothing more to ask: psql exits while the rules run
    cache.save()
    return LintReport(tuple(lint_units(units, parsed, catalog, settings)), len(units),
                      sum(len(u) for u in parsed), ws.env.name, catalog.server_version)


def answered_catalog(session: Session, answer: Callable[[], CatalogFacts], asked: set[str],
                     parsed: Sequence[Sequence[Parsed]]) -> CatalogFacts:
    """The answer to a catalog query sent early for the names `asked`; when the statements
    reference a name that was not asked, a second query for exactly theirs."""
    names = referenced_names(parsed)  # before the answer is read: it may still be on its way
    catalog = answer()
    return catalog if names <= asked else read_catalog(session, names)


def lint_env(ws: Workspace, files: Sequence[Path] = (), reach: bool = True) -> LintReport:
    """Lint `files`, or the env's pending migrations, with the facts of the env's catalog
    when it can be reached (read-only: one status read and one catalog query). When it
    cannot, FILES are linted alone and, without FILES, every migration is."""
    config = ws.config
    settings = lint_settings(config, ws.env)
    note = f"no facts from env {ws.env.name}: not asked to reach it"
    if reach:
        try:
            with open_migration_session(ws) as session:  # psql connects while files are read
                if not files:
                    # read while psql connects, as the migrations are scanned
                    cache = ParseCache(config.state_dir / "cache" / "lint.json")
                    # pending versions only: the checksums of the scan cache will do
                    pending = migration_status(ws, session, cached=True).pending
                    return lint_pending(session, ws, pending, settings, cache)
                applied = applied_among(ws, session, files)
                if not applied:
                    units = [file_unit(f, config.root) for f in files]
                    return lint_on(session, ws, units, settings)
                # its catalog holds what they made: a type change would read 'from the new
                # type', an index they create 'exists already' (seen linting Lemmy's history)
                note = (f"no facts from env {ws.env.name}: {applied} of the files are applied "
                        "there already, and its catalog shows the schema after them")
        except ConnectionFailed as exc:
            note = f"no facts from env {ws.env.name}: {exc.message}"
    units = [file_unit(f, config.root) for f in files] or [
        migration_unit(m, config.root) for m in discover_migrations(config)]
    parsed = parse_units(units)
    return LintReport(tuple(lint_units(units, parsed, None, settings)), len(units),
                      sum(len(u) for u in parsed), None, None, note)


def applied_among(ws: Workspace, session: Session, files: Sequence[Path]) -> int:
    """How many of `files` are up files of migrations applied on the env's database."""
    status = migration_status(ws, session, cached=True)
    applied = {row.version for row in status.applied}
    named = {Path(f).resolve() for f in files}
    return sum(1 for m in status.files.migrations
               if m.version in applied and m.up.resolve() in named)


_EMPTY_DATABASE_SQL = ("SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON "
                       "n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT "
                       "IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')")


def lint_gate(ws: Workspace, what: str) -> LintReport | None:
    """Before deploy / migrate up writes to a protected env: lint its pending migrations
    against its catalog and refuse (exit 4) on an error that is not allowed. Nothing to
    gate when the database or its tracking table does not exist yet (a first deploy
    restores the schema and runs no migration)."""
    if not ws.env.protected:
        return None
    try:
        with open_migration_session(ws) as session:
            status = migration_status(ws, session)
            if not status.pending or (not status.tracking and session.value(_EMPTY_DATABASE_SQL)):
                return None
            units = [migration_unit(m, ws.config.root) for m in status.pending]
            report = lint_on(session, ws, units, lint_settings(ws.config, ws.env))
    except ConnectionFailed:
        return None  # the command itself reports (or creates) the missing database
    refuse_lint_errors(report, what)
    for finding in report.warnings:
        ws.console.warn(f"{finding.file}:{finding.line}: {finding.rule}: {finding.message}")
    return report


def refuse_lint_errors(report: LintReport, what: str) -> None:
    """deploy / migrate up on a protected env: refuse (exit 4) while an error is not allowed."""
    if report.errors:
        shown = [f"{f.file}:{f.line} {f.rule}: {f.message}" for f in report.errors[:5]]
        more = len(report.errors) - len(shown)
        raise Refused(f"{what} refused: {len(report.errors)} lint error(s): " + "; ".join(shown)
                      + (f"; and {more} more" if more > 0 else ""),
                      hint="fix the migration, or allow one statement with a comment above it: "
                           "'-- confiture:allow RULE reason' (see 'confiture.py migrate lint')")


# ════════════════════════════════════════════════════════════════════════════════════════════
# §9 Restore
# restore: verify first, restore into a scratch database, swap names (the replaced one is kept).
# Deploy (§16) and rehearsal build on the scratch restore and the swap below.
# ════════════════════════════════════════════════════════════════════════════════════════════

DB_MARK = "confiture-restore"  # JSON comment of scratch and replaced databases
_OBJECT_IN_USE = "55006"


# ── the env's database: existence, emptiness, properties, scratch and replaced copies ──────

_SIDE_TOKEN = 8  # hex digits of randomness after the stamp


def _side_head(database: str, kind: str) -> str:
    """The database part of a side name, shortened so that the whole name fits 63 bytes."""
    room = MAX_IDENT_BYTES - len(f"_{kind}_{utc_stamp(0).lower()}_") - _SIDE_TOKEN
    return database.encode()[:room].decode("utf-8", "ignore")


def side_name(database: str, kind: str, stamp: str) -> str:
    """<db>_<kind>_<stamp>_<random>: the stamp is for humans (one-second steps, so two runs in
    one second would collide without the random part); the pattern makes a scratch database
    recognisable from the moment it exists, before its comment is written (_side_pattern).
    os.urandom, as secrets.token_hex does, without importing secrets (~3 ms: random, hmac)."""
    return f"{_side_head(database, kind)}_{kind}_{stamp.lower()}_{os.urandom(_SIDE_TOKEN // 2).hex()}"


def _side_pattern(database: str, kinds: Sequence[str]) -> re.Pattern[str]:
    """The names side_name gives to `database`'s side databases of these kinds (fullmatch)."""
    tail = r"_\d{8}t\d{6}z_[0-9a-f]{" + str(_SIDE_TOKEN) + "}"
    return re.compile("|".join(f"{re.escape(_side_head(database, kind))}_{kind}{tail}"
                               for kind in kinds))


def _marks(session: Session) -> list[dict[str, Any]]:
    """Scratch and replaced databases on this server (identified by their JSON comment)."""
    rows = session.query(
        "SELECT datname, shobj_description(oid, 'pg_database') AS comment, "
        "pg_database_size(oid) AS size FROM pg_database "
        "WHERE shobj_description(oid, 'pg_database') LIKE '%" + DB_MARK + "%'")
    found = []
    for row in rows:
        try:
            meta = json.loads(row["comment"] or "")
        except ValueError:
            continue
        if isinstance(meta, dict) and meta.get("mark") == DB_MARK:
            found.append({**meta, "datname": row["datname"], "size": row["size"]})
    return found


def replaced_databases(session: Session, database: str) -> list[dict[str, Any]]:
    """Databases a restore replaced (kept until dropped), newest first."""
    found = [m for m in _marks(session) if m.get("kind") == "replaced"
             and m.get("database") == database and m["datname"] == m.get("name")]
    return sorted(found, key=lambda m: str(m.get("at", "")), reverse=True)


def drop_scratch_leftovers(ws: Workspace, session: Session, database: str) -> list[str]:
    """Drop half-restored scratch databases of `database` left by killed runs: marked ones,
    and ones killed before their mark was written, known by their name alone. Call with the
    database lock held, so no live restore or deploy of it can own one."""
    dropped = []
    marked = {m["datname"]: m for m in _marks(session)}
    named = _side_pattern(database, ("restore", "build"))
    for row in session.query("SELECT datname FROM pg_database"):
        name, meta = row["datname"], marked.get(row["datname"])
        if (meta is None and named.fullmatch(name)) or (
                meta is not None and meta.get("kind") == "scratch"
                and meta.get("database") == database and name == meta.get("name")):
            drop_database(session, name, force=True)
            dropped.append(name)
    if dropped:
        ws.console.info("dropped leftover scratch database(s) " + ", ".join(dropped))
    return dropped


def _create_options(props: Mapping[str, Any] | None) -> str:
    if props is None:
        return " TEMPLATE template0"
    d = props["d"]
    parts = [" TEMPLATE template0", f"ENCODING {quote_literal(props['encoding'])}",
             f"LC_COLLATE {quote_literal(d['datcollate'])}",
             f"LC_CTYPE {quote_literal(d['datctype'])}"]
    icu = d.get("daticulocale") or d.get("datlocale")
    if d.get("datlocprovider") == "i" and icu:
        parts += ["LOCALE_PROVIDER icu", f"ICU_LOCALE {quote_literal(icu)}"]
    if props["can_own"]:
        parts.append(f"OWNER {quote_ident(props['owner'])}")
    if props["tablespace"] != "pg_default":
        parts.append(f"TABLESPACE {quote_ident(props['tablespace'])}")
    if int(d.get("datconnlimit", -1)) != -1:
        parts.append(f"CONNECTION LIMIT {int(d['datconnlimit'])}")
    return " ".join(parts)


def _copy_settings(session: Session, name: str, props: Mapping[str, Any] | None) -> None:
    """Give the scratch database the target's per-database settings and privileges. A
    setting is copied through set_config + SET … FROM CURRENT, so its stored text (lists,
    quoting) survives exactly."""
    if props is None:
        return
    db = quote_ident(name)
    for entry in props["settings"] or []:
        role = f" IN ROLE {quote_ident(entry['role'])}" if entry.get("role") else ""
        for item in entry.get("config") or []:
            key, _, value = item.partition("=")
            if key.lower() in ("role", "session_authorization"):
                session.execute(f"ALTER DATABASE {db}{role} SET {quote_ident(key)} = "
                                f"{quote_literal(value)}")
                continue
            session.execute(
                f"BEGIN; SELECT set_config({quote_literal(key)}, {quote_literal(value)}, true);"
                f" ALTER DATABASE {db}{role} SET {quote_ident(key)} FROM CURRENT; COMMIT")
    if props["d"].get("datacl") is not None:
        session.execute(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")
        for grant in props["acl"] or []:
            grantee = quote_ident(grant["grantee"]) if grant["grantee"] else "PUBLIC"
            session.execute(f"GRANT {grant['privilege']} ON DATABASE {db} TO {grantee}"
                            + (" WITH GRANT OPTION" if grant["grantable"] else ""))


def can_create_databases(session: Session) -> bool:
    return bool(session.value(
        "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"))


# ── restore ─────────────────────────────────────────────────────────────────────────────────

@record(frozen=True)
class RestoreResult:
    backup: Path
    database: str
    mode: str               # "swap" (scratch database, then rename) or "in-place"
    replaced: str | None    # the previous database, kept under this name
    verified: bool          # sha256 checked against the sidecar
    seconds: float
    safety_backup: Path | None = None  # in-place mode: the state it overwrote


def resolve_backup(config: Config, env_name: str, spec: str,
                   environ: Mapping[str, str] = os.environ) -> Path:
    """'latest' → the env's newest complete backup; otherwise an existing file."""
    if spec == "latest":
        latest = newest_backup(config, env_name, environ)
        if latest is None:
            raise BackupError(f"no backups of env {env_name!r} in "
                              f"{backup_folder(config, env_name, environ)}",
                              hint="take one with 'confiture.py backup'")
        return latest.path
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"backup file {path} not found")
    return path


def check_backup(ws: Workspace, path: Path, digest: bool = True,
                 listing: bool = True) -> dict[str, Any] | None:
    """Refuse a backup that is not intact, before any database is touched: its sidecar must
    be complete and match size and (with `digest`) sha256, and pg_restore must read it.
    Returns the sidecar (None for a bare pg_dump file, which is accepted with a warning)."""
    meta = read_sidecar(path)
    if sidecar_path(path).exists():
        if meta is None or meta.get("complete") is not True:
            raise BackupError(f"{path}: its sidecar {sidecar_path(path).name} is unreadable "
                              "or incomplete; refusing to restore it")
        size = path.stat().st_size
        if meta.get("size") != size:
            raise BackupError(f"{path} is corrupted: {size} bytes, its sidecar recorded "
                              f"{meta.get('size')}; refusing to restore it")
        if digest:
            _check_digest(path, str(meta.get("sha256")))
    else:
        ws.console.warn(f"{path} has no sidecar: its integrity cannot be verified")
    if listing:
        check_listing(ws, path)
    if meta and meta.get("env") not in (None, ws.env.name):
        ws.console.warn(f"{path.name} is a backup of env {meta.get('env')!r}, restoring into "
                        f"env {ws.env.name!r}")
    return meta


def _check_digest(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise BackupError(f"{path} is corrupted: sha256 {actual[:16]}… does not match "
                          f"{expected[:16]}… recorded in its sidecar; refusing to restore it")


# pg_restore on a server other than the backup's: the roles that own the objects or hold
# grants, the tablespaces and the subscription's publisher belong to the other server.
FOREIGN_SERVER_RESTORE = ("--no-owner", "--no-privileges", "--no-tablespaces",
                          "--no-subscriptions")


def restore_into_scratch(ws: Workspace, admin: Session, path: Path, expected: str | None,
                         props: Mapping[str, Any] | None, stamp: str,
                         options: Sequence[str] = ()) -> str:
    """Create a scratch database like the target and pg_restore the backup into it; the
    sha256 and the archive's table of contents are checked meanwhile (the target is not
    touched before the swap). A backup whose sha256 matches its sidecar is the file that
    passed pg_restore --list when it was taken: it is not listed again. Returns the scratch
    database's name. `options`: more for pg_restore (FOREIGN_SERVER_RESTORE)."""

    target = ws.env.database
    scratch = side_name(target, "restore", stamp)
    mark = {"mark": DB_MARK, "kind": "scratch", "name": scratch, "database": target,
            "env": ws.env.name, "backup": str(path), "at": utc_now()}
    admin.execute(f"CREATE DATABASE {quote_ident(scratch)}{_create_options(props)}")
    try:
        admin.execute(f"COMMENT ON DATABASE {quote_ident(scratch)} IS "
                      f"{quote_literal(json.dumps(mark))}")
        argv = [*pg_restore_argv(ws.client.tools, ws.env.conn, scratch, "--exit-on-error",
                                 *options), str(path)]
        with scratch_file() as errfile:
            proc = ws.client.spawn(argv, scratch, stderr=errfile)
            try:
                if expected is not None:  # the very bytes that passed pg_restore --list
                    _check_digest(path, expected)   # when the backup was taken
                else:
                    check_listing(ws, path)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wait_tool(ws, proc, errfile, f"pg_restore of {path.name}")
        _copy_settings(admin, scratch, props)
    except BaseException:
        drop_database(admin, scratch, force=True)
        raise
    return scratch


def swap_in(ws: Workspace, admin: Session, scratch: str, props: Mapping[str, Any] | None,
             force: bool, backup: Path, stamp: str) -> str | None:
    """Rename target → <db>_replaced_<stamp> and scratch → target in one statement (names
    and comments change together or not at all). Other sessions on the target are refused,
    or terminated with `force`. Returns the replaced database's name (None if none)."""
    target = ws.env.database
    replaced = side_name(target, "replaced", stamp) if props is not None else None
    comment = props["comment"] if props is not None else None
    statements = []
    if replaced is not None:
        mark = {"mark": DB_MARK, "kind": "replaced", "name": replaced, "database": target,
                "env": ws.env.name, "backup": str(backup), "at": utc_now(), "comment": comment}
        statements += [f"ALTER DATABASE {quote_ident(target)} RENAME TO {quote_ident(replaced)}",
                       (f"COMMENT ON DATABASE {quote_ident(replaced)} IS "
                        f"{quote_literal(json.dumps(mark))}")]
    statements += [f"ALTER DATABASE {quote_ident(scratch)} RENAME TO {quote_ident(target)}",
                   (f"COMMENT ON DATABASE {quote_ident(target)} IS "
                    + (quote_literal(comment) if comment else "NULL"))]
    body = "BEGIN " + " ".join(f"EXECUTE {quote_literal(s)};" for s in statements) + " END"
    deadline = time.monotonic() + 15
    while True:
        others = other_sessions(admin, target) if force else lasting_sessions(admin, target)
        if others and not force:
            raise Refused(f"database {target!r} has {len(others)} other session(s); it was "
                          "left untouched", hint="close them, or pass --force to terminate them")
        if others:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                          f"datname = {quote_literal(target)} AND pid <> pg_backend_pid()")
        try:
            admin.execute(f"DO {quote_literal(body)}")
            return replaced
        except SqlError as exc:
            if exc.sqlstate != _OBJECT_IN_USE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _restore_in_place(ws: Workspace, path: Path) -> None:
    """Without CREATEDB: one psql transaction drops what this role owns in the database, then
    runs the archive as SQL. Anything failing rolls it all back: the target stays as it was.
    (pg_restore --clean cannot do this: it trips over partitions and keeps unknown objects.)"""
    import shutil

    psql_argv = psql_script_argv(ws.client.tools, ws.env.conn)
    with scratch_file() as psql_err, scratch_file() as restore_err:
        psql = ws.client.spawn(psql_argv, ws.env.database, stdin=subprocess.PIPE,
                               stderr=psql_err)
        source = ws.client.spawn(pg_restore_argv(ws.client.tools, ws.env.conn, None, "-f", "-", str(path)),
                                 None,
                                 stdout=subprocess.PIPE, stderr=restore_err)
        assert psql.stdin is not None and source.stdout is not None
        try:
            psql.stdin.write(b"SET client_min_messages = warning;\nDROP OWNED BY CURRENT_USER;\n")
            shutil.copyfileobj(source.stdout, psql.stdin, 1 << 20)
        except BrokenPipeError:
            source.kill()  # psql stopped at an error: its message says which
        finally:
            source.stdout.close()
            try:
                psql.stdin.close()
            except BrokenPipeError:
                pass
        wait_tool(ws, psql, psql_err, f"in-place restore of {path.name}")
        wait_tool(ws, source, restore_err, f"pg_restore of {path.name}")


class DatabaseLocks:
    """The locks a restore or deploy holds: `database:<db>` in the maintenance database (the
    same lock clone/reset take; held across the swap) and MIGRATION_LOCK inside the target, the
    lock `migrate` runs take. The second needs a session on the target, so it is released for
    the instant of a swap, while the first keeps other deploys and restores out."""

    def __init__(self, ws: Workspace, admin: Session) -> None:
        self.ws, self.admin = ws, admin
        self.target: Session | None = None
        self.target_pid = 0

    def lock_database(self) -> None:
        acquire_lock(self.admin, f"database:{self.ws.env.database}",
                     self.ws.config.migrations_lock_timeout,
                     f"the deploy/restore lock of {self.ws.env.database}", self.ws.console.info)

    def try_lock_database(self) -> bool:
        """Take the database lock only if it is free right now."""
        key = lock_key_sql(f"database:{self.ws.env.database}")
        return bool(self.admin.value(f"SELECT pg_try_advisory_lock({key})"))

    def lock_target(self) -> Session:
        session = self.ws.client.session(self.ws.env.database)
        try:
            acquire_lock(session, MIGRATION_LOCK, self.ws.config.migrations_lock_timeout,
                         f"the migration lock of {self.ws.env.database}", self.ws.console.info)
        except BaseException:
            session.close()
            raise
        self.target = session
        self.target_pid = int(session.value("SELECT pg_backend_pid()"))
        return session

    def unlock_target(self) -> None:
        if self.target is not None:
            self.target.close()  # ending the session releases its advisory locks
            self.target = None

    def close(self) -> None:
        self.unlock_target()
        try:
            release_lock(self.admin, f"database:{self.ws.env.database}")
        except PgError:
            pass


@contextlib.contextmanager
def locked_database(ws: Workspace, admin: Session) -> Iterator[DatabaseLocks]:
    """The env's database under the deploy/restore lock, with the scratch leftovers of killed
    runs dropped first; every lock is released on the way out. Restore and deploy both run
    inside it, so they exclude each other the same way."""
    locks = DatabaseLocks(ws, admin)
    locks.lock_database()
    try:
        drop_scratch_leftovers(ws, admin, ws.env.database)
        yield locks
    finally:
        locks.close()


def restore_backup(ws: Workspace, path: Path, force: bool = False) -> RestoreResult:
    """Restore a backup into the env's database so that a failed or interrupted restore
    leaves it exactly as it was: into a scratch database, then an atomic swap of names (the
    previous database is kept). Without CREATEDB: one transaction, in place."""
    started = time.monotonic()
    meta = check_backup(ws, path, digest=False, listing=False)  # the rest runs meanwhile
    with admin_session(ws) as admin, locked_database(ws, admin) as locks:
        exists = database_exists(admin, ws.env.database)
        if exists:
            locks.lock_target()
            others = lasting_sessions(admin, ws.env.database, [locks.target_pid])
            if others and not force:
                raise Refused(f"database {ws.env.database!r} has {len(others)} other "
                              "session(s); nothing was restored",
                              hint="close them, or pass --force to terminate them")
        if not can_create_databases(admin):
            if not exists:
                raise PgError(f"database {ws.env.database!r} does not exist and this role "
                              "cannot create databases (no CREATEDB)")
            ws.console.warn("this role has no CREATEDB privilege: restoring in place in "
                            "one transaction instead of into a new database")
            if meta is not None:
                _check_digest(path, str(meta.get("sha256")))
            check_listing(ws, path)
            # nothing keeps the overwritten state in this mode: back it up first
            safety = create_backup(ws, session=locks.target)
            ws.console.info(f"backed up the current state first: {safety.path}")
            _restore_in_place(ws, path)
            return RestoreResult(path, ws.env.database, "in-place", None, meta is not None,
                                 time.monotonic() - started, safety.path)
        stamp = utc_stamp()
        props = database_properties(admin, ws.env.database)
        ws.console.info(f"restoring {path.name} into a new database …")
        scratch = restore_into_scratch(
            ws, admin, path, None if meta is None else str(meta.get("sha256")), props, stamp)
        try:
            locks.unlock_target()
            replaced = swap_in(ws, admin, scratch, props, force, path, stamp)
        except BaseException:
            drop_database(admin, scratch, force=True)
            raise
    return RestoreResult(path, ws.env.database, "swap", replaced, meta is not None,
                         time.monotonic() - started)


def drop_replaced(ws: Workspace, keep: int | None = None) -> list[str]:
    """Drop scratch leftovers of killed restores and deploys and, unless `keep` is None, all
    but the newest `keep` databases a restore replaced."""
    dropped: list[str] = []
    with admin_session(ws) as admin:
        locks = DatabaseLocks(ws, admin)
        if keep is not None:
            locks.lock_database()
        elif not locks.try_lock_database():
            return dropped  # a restore or deploy is running: its scratch database is no leftover
        try:
            dropped += drop_scratch_leftovers(ws, admin, ws.env.database)
            doomed = replaced_databases(admin, ws.env.database)[keep:] if keep is not None else []
            for meta in doomed:
                drop_database(admin, meta["datname"], force=False)
                dropped.append(meta["datname"])
        finally:
            locks.close()
    return dropped



# ════════════════════════════════════════════════════════════════════════════════════════════
# §10 Anonymized sync
# Copies tables from one env to another with personal data rewritten by keyed rules compiled
# into the source SELECT. Rows stream source psql → named pipe → target psql and never pass
# through Python; the source is read in one repeatable-read snapshot, the target is loaded in
# one transaction. schema-to-schema copies an old database into a new one via postgres_fdw.
# Longer than the ~1,300 lines the other sections keep to: rules, catalogs, planning and
# streaming are one pipeline, and schema-to-schema (~370 lines) reuses its catalog readers; it
# is the first candidate for a section of its own.
# ════════════════════════════════════════════════════════════════════════════════════════════


class SyncError(PgError):
    """A sync or schema-to-schema run failed; the target was left as it was (exit 1)."""


class UnclassifiedColumns(ConfigError):
    """strict = true and some copied columns match no rule (exit 2): nothing was written."""


SYNC_KEY_MIN_BYTES = 16
SYNC_REPORT_DIR = "sync"
_HASH_PREFIX = "__confiture_h"
# Built-in name lists: 64 × 64 = 4,096 full names, chosen by the first two bytes of the HMAC.
_FIRST_NAMES = (
    "Ada", "Alan", "Alice", "Amara", "Ana", "Ben", "Bianca", "Carlos", "Chen", "Chloe", "Dan",
    "Daria", "David", "Elena", "Emil", "Emma", "Farah", "Felix", "Grace", "Hana", "Hugo", "Ines",
    "Ivan", "Jade", "James", "Jon", "Julia", "Kai", "Karin", "Leo", "Lina", "Louis", "Lucia",
    "Maya", "Mia", "Milan", "Nadia", "Nils", "Noah", "Nora", "Omar", "Paula", "Pedro", "Quinn",
    "Rosa", "Ruth", "Sam", "Sara", "Sofia", "Tariq", "Theo", "Tom", "Uma", "Vera", "Victor",
    "Wen", "Will", "Xena", "Yara", "Yusuf", "Zoe", "Aziz", "Lars", "Ines-Marie")
_LAST_NAMES = (
    "Abe", "Adler", "Almeida", "Baker", "Berg", "Brown", "Castro", "Chen", "Costa", "Dahl",
    "Diaz", "Dubois", "Evans", "Fischer", "Garcia", "Gomez", "Hansen", "Hoffmann", "Ito",
    "Jensen", "Kato", "Keller", "Khan", "Kim", "Klein", "Kowalski", "Larsen", "Laurent", "Lee",
    "Lopez", "Martin", "Meyer", "Moreau", "Mueller", "Nakamura", "Novak", "Okafor", "Olsen",
    "Park", "Patel", "Perez", "Petrov", "Quinn", "Rossi", "Sato", "Schmidt", "Silva", "Singh",
    "Smith", "Suzuki", "Tanaka", "Taylor", "Torres", "Ueda", "Vogel", "Wagner", "Walker",
    "Weber", "Wilson", "Wong", "Yilmaz", "Young", "Zhang", "Zimmer")
_DATE_TYPES = ("date", "timestamp without time zone", "timestamp with time zone")
_INT_TYPES = {"smallint": (4, 32767), "integer": (8, 2147483647),
              "bigint": (16, 9223372036854775807), "numeric": (16, 9223372036854775807)}


# ── rules and patterns ────────────────────────────────────────────────────────────────────


@record(frozen=True)
class Rule:
    """One rewriting rule: a name from RULE_KINDS (see "the rule registry") and, for rules
    written as a table ({ int_range = [18, 90] }), its argument."""

    kind: str
    arg: Any = None

    @property
    def keyed(self) -> bool:
        return RULE_KINDS[self.kind].keyed

    @property
    def masks(self) -> bool:
        return self.kind != "keep"

    def toml(self) -> str:
        """The rule as a TOML value (what `sync rules` prints)."""
        if self.arg is None:
            return json.dumps(self.kind)
        if isinstance(self.arg, bool):
            return f"{{ {self.kind} = {'true' if self.arg else 'false'} }}"
        return f"{{ {self.kind} = {json.dumps(self.arg, ensure_ascii=False)} }}"

    def label(self) -> str:
        shown = self.arg is not None and RULE_KINDS[self.kind].shows_arg
        return f"{self.kind}={self.arg}" if shown else self.kind


def parse_rule(value: Any, where: str) -> Rule:
    """A rule from TOML: a name ("email") or a one-key table ({ int_range = [18, 90] })."""
    if isinstance(value, str):
        if value in RULE_KINDS and RULE_KINDS[value].bare:
            return Rule(value)
        raise ConfigError(f"{where}: unknown rule {value!r}",
                          hint=suggest(value, list(RULE_KINDS))
                          or "rules: " + ", ".join(RULE_KINDS))
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}: a rule is a name like \"email\" or a one-key table like "
                          "{ int_range = [18, 90] }")
    (name, arg), = value.items()
    kind = RULE_KINDS.get(name)
    if kind is None or kind.read_arg is None:
        raise ConfigError(f"{where}: unknown rule {name!r}",
                          hint=suggest(name, [n for n, k in RULE_KINDS.items() if k.read_arg]))
    return Rule(name, kind.read_arg(arg, where))


def split_name(text: str, where: str) -> list[tuple[str, bool]]:
    """Split a dotted name pattern into (segment, quoted) pairs; "double quotes" keep dots,
    stars and quotes ("" inside) literal."""
    parts: list[tuple[str, bool]] = []
    i, current, quoted = 0, "", False
    while i < len(text):
        char = text[i]
        if char == '"':
            end = i + 1
            literal = ""
            while True:
                end_quote = text.find('"', end)
                if end_quote < 0:
                    raise ConfigError(f"{where}: unbalanced quote in {text!r}")
                literal += text[end:end_quote]
                if text.startswith('""', end_quote):
                    literal += '"'
                    end = end_quote + 2
                    continue
                break
            current += literal
            quoted = True
            i = end_quote + 1
        elif char == ".":
            parts.append((current, quoted))
            current, quoted = "", False
            i += 1
        else:
            current += char
            i += 1
    parts.append((current, quoted))
    if any(not seg for seg, _ in parts):
        raise ConfigError(f"{where}: empty name segment in {text!r}")
    return parts


def _segment_regex(segment: str, quoted: bool) -> re.Pattern[str]:
    if quoted:
        return re.compile(re.escape(segment) + r"\Z", re.DOTALL)
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in segment)
    return re.compile(body + r"\Z", re.DOTALL)


def _segment_score(segment: str, quoted: bool) -> int:
    if quoted or not any(c in segment for c in "*?"):
        return 2
    return 0 if segment == "*" else 1


@record(frozen=True)
class NamePattern:
    """A glob over schema.table[.column]; an omitted schema matches every schema.
    Specificity (compared in order): column, table, schema — exact 2 > partial glob 1 > '*' 0
    (an omitted schema counts as '*') — then the number of literal characters."""

    text: str
    regexes: tuple[re.Pattern[str], ...]
    specificity: tuple[int, ...]

    def matches(self, *names: str) -> bool:
        return all(rx.match(name) for rx, name in zip(self.regexes, names))


def parse_pattern(text: str, where: str, column: bool) -> NamePattern:
    """`table.column` or `schema.table.column` (column=True); `table` or `schema.table`."""
    parts = split_name(text, where)
    want = 3 if column else 2
    if len(parts) == want - 1:
        parts = [("*", False), *parts]
    if len(parts) != want:
        shape = "table.column or schema.table.column" if column else "table or schema.table"
        raise ConfigError(f"{where}: pattern {text!r} must be {shape}")
    scores = [_segment_score(seg, q) for seg, q in parts]
    literal = sum(len(seg) if q else len(seg.replace("*", "").replace("?", "")) for seg, q in parts)
    return NamePattern(text=text, regexes=tuple(_segment_regex(s, q) for s, q in parts),
                       specificity=(*reversed(scores), literal))


def find_rule(rules: Sequence[tuple[NamePattern, Rule]], schema: str, table: str,
              column: str) -> tuple[NamePattern, Rule] | None:
    """The most specific rule matching schema.table.column; equally specific rules that
    disagree are a configuration error."""
    matching = [(p, r) for p, r in rules if p.matches(schema, table, column)]
    if not matching:
        return None
    top = max(p.specificity for p, _ in matching)
    best = [(p, r) for p, r in matching if p.specificity == top]
    if len({r for _, r in best}) > 1:
        raise ConfigError(f"[sync.rules]: {best[0][0].text!r} and {best[1][0].text!r} are "
                          f"equally specific for {schema}.{table}.{column} but disagree",
                          hint="add a more specific pattern for that column")
    return best[0]


def pattern_segment(name: str) -> str:
    """A name as a literal pattern segment (quoted when it holds glob or special characters)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def hmac_pads(key: bytes) -> tuple[str, str]:
    """HMAC-SHA256 inner and outer padded keys (hex): HMAC(m) = H(k_o ‖ H(k_i ‖ m))."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key).hex(), bytes(b ^ 0x5C for b in key).hex()


# ── settings ──────────────────────────────────────────────────────────────────────────────


@record(frozen=True)
class SyncSettings:
    source: str
    target: str
    key: bytes | None = field(repr=False)
    strict: bool
    tables: tuple[NamePattern, ...]
    exclude: tuple[NamePattern, ...]
    rules: tuple[tuple[NamePattern, Rule], ...]
    where: tuple[tuple[NamePattern, str], ...]
    lock_timeout: float
    config_hash: str


def load_sync_settings(config: Config, environ: Mapping[str, str], source: str | None = None,
                       target: str | None = None, tables: Sequence[str] = (),
                       need_key: bool = True) -> SyncSettings:
    """[sync] of confiture.toml (plus command-line overrides) → SyncSettings."""
    sync = config.sync
    source, target = source or sync.source, target or sync.target
    if not source:
        raise ConfigError("sync needs a source environment", hint="pass --from ENV or set "
                          "[sync] from = \"prod\"")
    if not target:
        raise ConfigError("sync needs a target environment", hint="pass --to ENV or set "
                          "[sync] to = \"staging\"")
    for name in (source, target):
        if name not in config.envs:
            raise ConfigError(f"sync: unknown environment {name!r}",
                              hint=suggest(name, list(config.envs)))
    rules = sync_rules_of(config)
    key = sync_key(sync, environ) if need_key else None
    if need_key and key is None and any(r.keyed for _, r in rules):
        keyed = ", ".join(name for name, kind in RULE_KINDS.items() if kind.keyed)
        raise ConfigError(f"[sync] key is not set, but keyed rules ({keyed}) need it",
                          hint="key = \"${CONFITURE_SYNC_KEY}\" and export the secret")
    return SyncSettings(
        source=source, target=target, key=key, strict=sync.strict,
        tables=tuple(parse_pattern(t, "sync.tables", column=False)
                     for t in (list(tables) or sync.tables)),
        exclude=tuple(parse_pattern(t, "sync.exclude", column=False) for t in sync.exclude),
        rules=rules, where=sync_filters_of(config), lock_timeout=sync.lock_timeout,
        config_hash=sha256_bytes(sync.written.encode()))


def sync_rules_of(config: Config) -> tuple[tuple[NamePattern, Rule], ...]:
    """[sync.rules] as (pattern, rule) pairs; a bad pattern or rule is a ConfigError."""
    where = f"{config.path} [sync]"
    return tuple((parse_pattern(text, f"{where}.rules", column=True),
                  parse_rule(value, f"{where}.rules {text!r}"))
                 for text, value in config.sync.rules)


def sync_filters_of(config: Config) -> tuple[tuple[NamePattern, str], ...]:
    where = f"{config.path} [sync]"
    return tuple((parse_pattern(text, f"{where}.where", column=False), condition)
                 for text, condition in config.sync.where)


def sync_key(sync: SyncConfig, environ: Mapping[str, str]) -> bytes | None:
    """The HMAC key, expanded; None when [sync] has none."""
    if not sync.key:
        return None
    key = expand_vars(sync.key, "sync.key", environ).encode()
    if len(key) < SYNC_KEY_MIN_BYTES:
        raise ConfigError(f"sync.key is {len(key)} bytes; at least {SYNC_KEY_MIN_BYTES} "
                          "are required", hint="generate one: python3 -c \"import secrets;"
                          " print(secrets.token_urlsafe(32))\"")
    return key


def check_sync_config(config: Config) -> None:
    """Read every pattern and rule of [sync] (no key, no environment): the CLI calls it when
    it loads the configuration, so a broken rule is reported by any command."""
    sync = config.sync
    sync_rules_of(config)
    sync_filters_of(config)
    for text in (*sync.tables, *sync.exclude):
        parse_pattern(text, "sync.tables" if text in sync.tables else "sync.exclude",
                      column=False)


# ── catalogs ──────────────────────────────────────────────────────────────────────────────


@record(frozen=True)
class Column:
    name: str
    type: str          # format_type with modifier, as PostgreSQL writes it
    base: str          # the type (or a domain's base type) without modifier
    category: str      # pg_type.typcategory of the base type: S string, N numeric, D date…
    typmod: int
    notnull: bool
    generated: bool
    has_default: bool
    portable: bool     # binary COPY format is safe across clusters (built-in type or enum)


@record(frozen=True)
class TableInfo:
    schema: str
    name: str
    kind: str          # 'r' table, 'p' partitioned (copied through its root)
    estimate: int
    columns: tuple[Column, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.schema, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def scan(self) -> str:
        """FROM-clause name: ONLY for plain tables (inheritance children are tables of their
        own); partitioned tables are read and written through their root."""
        return ("ONLY " if self.kind == "r" else "") + self.sql


@record(frozen=True)
class ForeignKey:
    name: str
    child: tuple[str, str]      # (schema, table) of the root table holding the constraint
    parent: tuple[str, str]
    child_scan: str             # FROM-clause names of the constrained relations
    parent_scan: str
    child_columns: tuple[str, ...]
    parent_columns: tuple[str, ...]
    deferrable: bool
    match_full: bool


@record(frozen=True)
class SequenceUse:
    sequence: str               # regclass text, valid SQL
    increment: int
    table: tuple[str, str]
    column: str


_TABLES_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind AS kind,
       greatest(c.reltuples, 0)::bigint AS estimate,
       coalesce((SELECT json_agg(json_build_object(
           'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
           'base', format_type(coalesce(b.oid, t.oid), NULL),
           'category', coalesce(b.typcategory, t.typcategory),
           'typmod', CASE WHEN b.oid IS NULL THEN a.atttypmod ELSE t.typtypmod END,
           'notnull', a.attnotnull OR coalesce(t.typnotnull, false),
           'generated', a.attgenerated <> '',
           'has_default', a.atthasdef OR a.attidentity <> '',
           'portable', coalesce(b.oid, t.oid) < 16384 OR coalesce(b.typtype, t.typtype) = 'e')
           ORDER BY a.attnum)
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]') AS columns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

_FOREIGN_KEYS_SQL = """
SELECT con.conname AS name,
       rcn.nspname AS child_schema, rc.relname AS child, cc.relkind AS child_kind,
       cc.oid::regclass::text AS child_rel,
       rpn.nspname AS parent_schema, rp.relname AS parent, pc.relkind AS parent_kind,
       pc.oid::regclass::text AS parent_rel,
       con.condeferrable AS deferrable, con.confmatchtype = 'f' AS match_full,
       (SELECT json_agg(a.attname ORDER BY k.i) FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n) AS child_columns,
       (SELECT json_agg(a.attname ORDER BY k.i) FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n) AS parent_columns
FROM pg_constraint con
JOIN pg_class cc ON cc.oid = con.conrelid
JOIN pg_class rc ON rc.oid = coalesce(pg_partition_root(con.conrelid), con.conrelid)
JOIN pg_namespace rcn ON rcn.oid = rc.relnamespace
JOIN pg_class pc ON pc.oid = con.confrelid
JOIN pg_class rp ON rp.oid = coalesce(pg_partition_root(con.confrelid), con.confrelid)
JOIN pg_namespace rpn ON rpn.oid = rp.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
ORDER BY 2, 3, 1
"""

_SEQUENCES_SQL = """
SELECT DISTINCT s.oid::regclass::text AS sequence, q.seqincrement AS increment,
       n.nspname AS schema, r.relname AS table, x.column
FROM (SELECT d.objid AS seq, d.refobjid AS rel, a.attname AS column
        FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
       WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
         AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
      UNION
      SELECT d.refobjid, ad.adrelid, a.attname
        FROM pg_depend d JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
        JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
       WHERE d.refclassid = 'pg_class'::regclass) x
JOIN pg_class s ON s.oid = x.seq AND s.relkind = 'S'
JOIN pg_sequence q ON q.seqrelid = s.oid
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(x.rel), x.rel)
JOIN pg_namespace n ON n.oid = r.relnamespace
ORDER BY 1, 3, 4, 5
"""


def read_tables(session: Session) -> list[TableInfo]:
    """User tables of the database (partitions folded into their root; extension tables and
    system schemas left out), with their columns."""
    return [TableInfo(schema=row["schema"], name=row["name"], kind=row["kind"],
                      estimate=int(row["estimate"]),
                      columns=tuple(Column(**col) for col in row["columns"]))
            for row in session.query(_TABLES_SQL)]


def read_foreign_keys(session: Session) -> list[ForeignKey]:
    fks = []
    for row in session.query(_FOREIGN_KEYS_SQL):
        fks.append(ForeignKey(
            name=row["name"], child=(row["child_schema"], row["child"]),
            parent=(row["parent_schema"], row["parent"]),
            child_scan=("ONLY " if row["child_kind"] == "r" else "") + row["child_rel"],
            parent_scan=("ONLY " if row["parent_kind"] == "r" else "") + row["parent_rel"],
            child_columns=tuple(row["child_columns"]), parent_columns=tuple(row["parent_columns"]),
            deferrable=row["deferrable"], match_full=row["match_full"]))
    return fks


def read_sequences(session: Session) -> list[SequenceUse]:
    return [SequenceUse(sequence=row["sequence"], increment=int(row["increment"]),
                        table=(row["schema"], row["table"]), column=row["column"])
            for row in session.query(_SEQUENCES_SQL)]


def server_identity(session: Session) -> tuple[str, str]:
    """(system identifier of the cluster, database): equal means the same database."""
    row = session.query("SELECT system_identifier::text AS system, current_database() AS db "
                        "FROM pg_control_system()")[0]
    return row["system"], row["db"]


# ── compiling rules to SQL ────────────────────────────────────────────────────────────────


def _hex_int(hx: str, digits: int, start: int = 1) -> str:
    """An integer from `digits` hex digits of the hash (bit string cast: no sign trouble
    below 64 bits)."""
    bits = digits * 4
    target = "int" if bits < 32 else "bigint"
    return f"('x' || substr({hx}, {start}, {digits}))::bit({bits})::{target}"


def _sql_literal(value: str | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote_literal(value)


def _array_literal(items: Sequence[str]) -> str:
    return "(ARRAY[" + ", ".join(quote_literal(i) for i in items) + "])"


def _names_sql(variant: str | None, hx: str) -> str:
    first = f"{_array_literal(_FIRST_NAMES)}[1 + {_hex_int(hx, 2, 1)} % 64]"
    last = f"{_array_literal(_LAST_NAMES)}[1 + {_hex_int(hx, 2, 3)} % 64]"
    return first if variant == "first" else last if variant == "last" else \
        f"{first} || ' ' || {last}"


EMAIL_LENGTH = len("user.") + 20 + len("@example.com")


# ── the rule registry ─────────────────────────────────────────────────────────────────────
# One entry per rule: how it is written, which columns it can rewrite, and its SQL. Adding a
# rule touches this table only (and README's list of rules).


@record(frozen=True)
class RuleKind:
    keyed: bool     # rewrites from the HMAC of the value, so it needs [sync] key
    bare: bool      # may be written as a bare name: "email"
    read_arg: Callable[[Any, str], Any] | None   # { rule = arg } → Rule.arg; None: no table form
    refuses: Callable[[Column], str | None]      # why it cannot rewrite a column; None: it can
    sql: Callable[[Rule, Column, str, str], str]  # (rule, column, ref, hx) → the expression
    shows_arg: bool = True                        # labels show the argument


def rule_applies(rule: Rule, column: Column) -> str | None:
    """Why `rule` cannot rewrite `column` (None if it can)."""
    return RULE_KINDS[rule.kind].refuses(column)


def rule_sql(rule: Rule, column: Column, ref: str, hx: str) -> str:
    """The SQL expression that rewrites one column. `ref` is the column, `hx` the hex HMAC of
    its value (NULL for NULL, so keyed rules keep NULL as NULL)."""
    if rule.kind not in RULE_KINDS:
        raise ConfigError(f"unknown rule {rule.kind!r}")
    return RULE_KINDS[rule.kind].sql(rule, column, ref, hx)


def _any_column(column: Column) -> str | None:
    return None


def _text_only(kind: str) -> Callable[[Column], str | None]:
    def refuses(column: Column) -> str | None:
        if column.category != "S":
            return f"{kind} writes text, but the column is {column.type}"
        return None
    return refuses


def _email_refuses(column: Column) -> str | None:
    room = column.typmod - 4
    if column.base == "character varying" and 0 < room < EMAIL_LENGTH:
        return f"email writes {EMAIL_LENGTH} characters, the column holds {room}"
    return _text_only("email")(column)


def _hash_refuses(column: Column) -> str | None:
    if column.category == "S" or column.base in _INT_TYPES or \
            column.base in ("uuid", "bytea", "inet", "cidr"):
        return None
    return f"hash applies to text, integer, numeric, uuid, bytea and inet columns, not {column.type}"


def _uuid_refuses(column: Column) -> str | None:
    if column.category == "S" or column.base == "uuid":
        return None
    return f"uuid applies to uuid and text columns, not {column.type}"


def _int_range_refuses(column: Column) -> str | None:
    if column.category in ("S", "N"):
        return None
    return f"int_range applies to numeric and text columns, not {column.type}"


def _shift_days_refuses(column: Column) -> str | None:
    if column.base in _DATE_TYPES:
        return None
    return f"shift_days applies to date and timestamp columns, not {column.type}"


def _not_null_refuses(column: Column) -> str | None:
    return "the column is NOT NULL" if column.notnull else None


def _read_value(arg: Any, where: str) -> Any:
    if not isinstance(arg, (str, int, float, bool)):
        raise ConfigError(f"{where}: {{ value = … }} takes a string, number or boolean")
    if isinstance(arg, str) and "\x00" in arg:
        raise ConfigError(f"{where}: value contains a NUL byte")
    return arg


def _read_sql_rule(arg: Any, where: str) -> str:
    if not isinstance(arg, str) or not arg.strip() or "\x00" in arg:
        raise ConfigError(f"{where}: {{ sql = \"…\" }} takes an SQL expression")
    return arg.strip()


def _read_int_range(arg: Any, where: str) -> tuple[int, int]:
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in arg)
            or arg[0] > arg[1] or max(abs(arg[0]), abs(arg[1])) >= 2**62):
        raise ConfigError(f"{where}: int_range takes [low, high] integers, low ≤ high")
    return (arg[0], arg[1])


def _read_shift_days(arg: Any, where: str) -> int:
    if not isinstance(arg, int) or isinstance(arg, bool) or not 1 <= arg <= 36500:
        raise ConfigError(f"{where}: shift_days takes a number of days from 1 to 36500")
    return arg


def _read_name(arg: Any, where: str) -> str | None:
    if arg not in ("full", "first", "last"):
        raise ConfigError(f"{where}: {{ name = … }} takes \"full\", \"first\" or \"last\"")
    return None if arg == "full" else str(arg)


def _int_range_sql(rule: Rule, column: Column, ref: str, hx: str) -> str:
    low, high = rule.arg
    return f"({low} + {_hex_int(hx, 15)} % {high - low + 1})::{column.type}"


def _shift_days_sql(rule: Rule, column: Column, ref: str, hx: str) -> str:
    days, value = rule.arg, _hex_int(hx, 8)
    # a shift in [-N, -1] ∪ [1, N]: never zero, so every value moves
    shift = f"({value} % {2 * days} - {days} + ({value} % {2 * days} >= {days})::int)"
    return f"({ref} + make_interval(days => {shift}::int))::{column.type}"


def _hash_sql(rule: Rule, column: Column, ref: str, hx: str) -> str:
    typ = column.type
    if column.category == "S":
        return f"({hx})::{typ}"
    if column.base in _INT_TYPES:
        digits, mask = _INT_TYPES[column.base]
        return f"({_hex_int(hx, digits)} & {mask})::{typ}"
    if column.base == "uuid":
        return f"left({hx}, 32)::uuid::{typ}"
    if column.base == "bytea":
        return f"decode({hx}, 'hex')::{typ}"
    return (f"('10.' || {_hex_int(hx, 2, 1)} || '.' || {_hex_int(hx, 2, 3)} || '.' || "
            f"{_hex_int(hx, 2, 5)})::inet::{typ}")


RULE_KINDS: dict[str, RuleKind] = {
    "keep": RuleKind(False, True, None, _any_column, lambda r, c, ref, hx: ref),
    "null": RuleKind(False, True, None, _not_null_refuses,
                     lambda r, c, ref, hx: f"NULL::{c.type}"),
    "hash": RuleKind(True, True, None, _hash_refuses, _hash_sql),
    "email": RuleKind(True, True, None, _email_refuses,
                      lambda r, c, ref, hx: f"('user.' || left({hx}, 20) || '@example.com')::{c.type}"),
    "name": RuleKind(True, True, _read_name, _text_only("name"),
                     lambda r, c, ref, hx: f"({_names_sql(r.arg, hx)})::{c.type}"),
    "phone": RuleKind(True, True, None, _text_only("phone"), lambda r, c, ref, hx: (
        f"('+1555' || lpad(({_hex_int(hx, 7)} % 10000000)::text, 7, '0'))::{c.type}")),
    "uuid": RuleKind(True, True, None, _uuid_refuses,
                     lambda r, c, ref, hx: f"(left({hx}, 32)::uuid)::{c.type}"),
    "redact": RuleKind(False, True, None, _text_only("redact"), lambda r, c, ref, hx: (
        f"(CASE WHEN {ref} IS NULL THEN NULL ELSE '[redacted]' END)::{c.type}")),
    "value": RuleKind(False, False, _read_value, _any_column, lambda r, c, ref, hx: (
        f"(CASE WHEN {ref} IS NULL THEN NULL ELSE {_sql_literal(r.arg)} END)::{c.type}"),
        shows_arg=False),
    "sql": RuleKind(False, False, _read_sql_rule, _any_column,
                    lambda r, c, ref, hx: f"({r.arg})::{c.type}", shows_arg=False),
    "int_range": RuleKind(True, False, _read_int_range, _int_range_refuses, _int_range_sql),
    "shift_days": RuleKind(True, False, _read_shift_days, _shift_days_refuses, _shift_days_sql),
}


def hmac_sql(value: str) -> str:
    """Hex HMAC-SHA256 of value::text with the key's pads read from custom settings that were
    passed at connection start (never in query text). NULL in, NULL out."""
    return (f"encode(sha256(k.__confiture_ko || sha256(k.__confiture_ki || "
            f"convert_to(({value})::text, 'UTF8'))), 'hex')")


_KEY_CTE = ("WITH k AS MATERIALIZED (SELECT decode(current_setting('confiture.k_i'), 'hex') "
            "AS __confiture_ki, decode(current_setting('confiture.k_o'), 'hex') "
            "AS __confiture_ko)")


def build_select(table: TableInfo, columns: Sequence[tuple[Column, Rule]],
                 where: str | None) -> str:
    """The source query: rule expressions over the table. Keyed columns get their HMAC
    computed once per row in an inner query (OFFSET 0 stops the planner from inlining it
    into every use)."""
    hashed = [col for col, rule in columns if rule.keyed]
    refs = {col.name: f"{_HASH_PREFIX}{i}" for i, col in enumerate(hashed)}
    outer = []
    for col, rule in columns:
        hx = f"s.{quote_ident(refs[col.name])}" if col.name in refs else "NULL"
        outer.append(rule_sql(rule, col, f"s.{quote_ident(col.name)}", hx))
    condition = f" WHERE ({where})" if where else ""
    if not hashed:
        return f"SELECT {', '.join(outer)} FROM {table.scan} AS s{condition}"
    inner = ", ".join(f"{hmac_sql('s.' + quote_ident(col.name))} AS {quote_ident(refs[col.name])}"
                      for col in hashed)
    return (f"{_KEY_CTE} SELECT {', '.join(outer)} FROM (SELECT s.*, {inner} "
            f"FROM {table.scan} AS s CROSS JOIN k{condition} OFFSET 0) AS s")


# ── planning (pure) ───────────────────────────────────────────────────────────────────────


@record(frozen=True)
class TablePlan:
    source: TableInfo
    target: TableInfo
    columns: tuple[str, ...]           # copied, in target order
    rules: tuple[tuple[str, str], ...]  # (column, rule label) for masked columns
    kept: tuple[str, ...]
    defaulted: tuple[str, ...]         # target-only columns left to their defaults
    select: str
    binary: bool
    where: str | None
    # (what, query): the smallest source query for each user-written piece ({ sql = … } rule,
    # [sync.where] filter), so that a failing `select` can be blamed on the right one
    checks: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.source.key

    @property
    def name(self) -> str:
        return self.source.qualified


@record(frozen=True)
class SyncPlan:
    tables: tuple[TablePlan, ...]
    foreign_keys: tuple[ForeignKey, ...]     # constraints whose child table is reloaded
    sequences: tuple[SequenceUse, ...]
    keyed: bool
    warnings: tuple[str, ...]


def select_tables(tables: Sequence[TableInfo], settings: SyncSettings,
                  internal: frozenset[tuple[str | None, str]] = frozenset()) -> list[TableInfo]:
    """The tables to copy: `tables` globs (default all), minus `exclude` and our own tables.
    A pattern that matches nothing is an error (a typo must not silently copy less)."""
    for pattern in settings.tables:
        if not any(pattern.matches(t.schema, t.name) for t in tables):
            raise ConfigError(f"sync tables: {pattern.text!r} matches no table in the source",
                              hint="partitions are copied through their partitioned table")
    chosen = []
    for table in tables:
        if settings.tables and not any(p.matches(table.schema, table.name) for p in settings.tables):
            continue
        if any(p.matches(table.schema, table.name) for p in settings.exclude):
            continue
        if is_own_table(internal, table.schema, table.name):
            continue
        chosen.append(table)
    return chosen


# Over 60 lines: every check of one table's column matching appends to the same problem
# lists, so that a plan reports all problems at once, not the first.
def _plan_table(source: TableInfo, target: TableInfo, settings: SyncSettings,
                problems: list[str], unclassified: list[str], warnings: list[str]
                ) -> TablePlan | None:
    src_cols = {c.name: c for c in source.columns}
    tgt_cols = {c.name: c for c in target.columns}
    copied: list[tuple[Column, Rule]] = []
    checks: list[tuple[str, str]] = []
    masked, kept, defaulted = [], [], []
    for col in source.columns:
        if col.name not in tgt_cols and not col.generated:
            problems.append(f"{source.qualified}.{col.name}: in the source, not in the target")
    for tcol in target.columns:
        if tcol.generated:
            continue
        scol = src_cols.get(tcol.name)
        if scol is None:
            if tcol.notnull and not tcol.has_default:
                problems.append(f"{source.qualified}.{tcol.name}: NOT NULL without default in "
                                "the target, missing in the source")
            defaulted.append(tcol.name)
            continue
        if scol.type != tcol.type:
            problems.append(f"{source.qualified}.{tcol.name}: type {scol.type} in the source, "
                            f"{tcol.type} in the target")
            continue
        if "\n" in tcol.name or "\r" in tcol.name:
            problems.append(f"{source.qualified}: column name {tcol.name!r} holds a line break")
            continue
        found = find_rule(settings.rules, source.schema, source.name, scol.name)
        if found is None:
            if settings.strict:
                unclassified.append(f"{source.qualified}.{scol.name} ({scol.type})")
                continue
            warnings.append(f"{source.qualified}.{scol.name}: no rule, kept (strict = false)")
            rule = Rule("keep")
        else:
            rule = found[1]
            why = rule_applies(rule, scol)
            if why:
                problems.append(f"{source.qualified}.{scol.name}: rule {rule.label()} (from "
                                f"{found[0].text!r}) cannot apply: {why}")
                continue
            if rule.kind == "sql":
                what = f"{source.qualified}.{scol.name}: rule {rule.toml()} (from {found[0].text!r})"
                expression = rule_sql(rule, scol, f"s.{quote_ident(scol.name)}", "NULL")
                checks.append((what, f"SELECT {expression} FROM {source.scan} AS s"))
        copied.append((scol, rule))
        if rule.masks:
            masked.append((scol.name, rule.label()))
        else:
            kept.append(scol.name)
    if "\n" in source.qualified or "\r" in source.qualified:
        problems.append(f"{source.qualified!r}: table names with line breaks cannot be synced")
    where = next(((p, cond) for p, cond in settings.where
                  if p.matches(source.schema, source.name)), None)
    if where is not None:
        checks.append((f"{source.qualified}: [sync.where] {where[0].text!r}",
                       f"SELECT 1 FROM {source.scan} AS s WHERE ({where[1]})"))
    if not copied:
        return None
    return TablePlan(
        source=source, target=target, columns=tuple(c.name for c, _ in copied),
        rules=tuple(masked), kept=tuple(kept), defaulted=tuple(defaulted),
        select=build_select(source, copied, where and where[1]),
        binary=all(c.portable for c, _ in copied) and
        all(tgt_cols[c.name].portable for c, _ in copied),
        where=where and where[1], checks=tuple(checks))


def plan_sync(settings: SyncSettings, source_tables: Sequence[TableInfo],
              target_tables: Sequence[TableInfo], foreign_keys: Sequence[ForeignKey],
              sequences: Sequence[SequenceUse],
              internal: frozenset[tuple[str | None, str]] = frozenset()
              ) -> SyncPlan:
    """Decide everything before anything is written: tables, columns, rules, SQL, format.
    Raises UnclassifiedColumns (strict) or SyncError listing every problem at once."""
    chosen = select_tables(source_tables, settings, internal)
    targets = {t.key: t for t in target_tables}
    problems: list[str] = []
    unclassified: list[str] = []
    warnings: list[str] = []
    plans: list[TablePlan] = []
    for table in chosen:
        target = targets.get(table.key)
        if target is None:
            problems.append(f"{table.qualified}: no such table in the target")
            continue
        plan = _plan_table(table, target, settings, problems, unclassified, warnings)
        if plan is not None:
            plans.append(plan)
    for pattern, _ in settings.where:
        if not any(pattern.matches(*t.key) for t in chosen):
            problems.append(f"[sync.where] {pattern.text!r} matches no copied table")
    selected = {p.key for p in plans}
    for fk in foreign_keys:
        if fk.parent in selected and fk.child not in selected and fk.child != fk.parent:
            problems.append(f"{'.'.join(fk.child)} references {'.'.join(fk.parent)} "
                            f"({fk.name}) but is not copied: emptying "
                            f"{'.'.join(fk.parent)} would break it")
    if unclassified:
        raise UnclassifiedColumns(
            f"{len(unclassified)} column(s) match no [sync.rules] rule (strict = true); "
            "nothing was written:\n  " + "\n  ".join(unclassified),
            hint="add a rule for each (\"keep\" to copy as is); 'confiture.py sync rules' "
                 "prints a complete rules block for the source")
    if problems:
        raise SyncError("the sync cannot start; nothing was written:\n  " + "\n  ".join(problems),
                        hint="bring the target's schema up to date (migrate) or leave the "
                             "tables out with [sync] exclude / --tables")
    return SyncPlan(
        tables=tuple(plans),
        foreign_keys=tuple(fk for fk in foreign_keys if fk.child in selected),
        sequences=tuple(s for s in sequences if s.table in selected),
        keyed=any(p.select.startswith(_KEY_CTE) for p in plans),
        warnings=tuple(warnings))


def load_order(tables: Sequence[tuple[str, str]], foreign_keys: Sequence[ForeignKey]
               ) -> list[tuple[str, str]]:
    """Parents before children for non-deferrable foreign keys (self-references are checked
    at the end of their COPY statement); a cycle cannot be loaded in order."""
    needs: dict[tuple[str, str], set[tuple[str, str]]] = {k: set() for k in tables}
    for fk in foreign_keys:
        if fk.child in needs and fk.parent in needs and fk.child != fk.parent \
                and not fk.deferrable:
            needs[fk.child].add(fk.parent)
    order: list[tuple[str, str]] = []
    done: set[tuple[str, str]] = set()
    while len(order) < len(needs):
        ready = [k for k in needs if k not in done and needs[k] <= done]
        if not ready:
            cycle = sorted(".".join(k) for k in needs if k not in done)
            raise SyncError(
                "foreign keys form a cycle that cannot be loaded in order: " + ", ".join(cycle),
                hint="run as a role allowed to SET session_replication_role (a superuser, or "
                     "GRANT SET ON PARAMETER session_replication_role on PostgreSQL 15+), or "
                     "make one constraint of the cycle DEFERRABLE")
        order.extend(ready)
        done.update(ready)
    return order


def fk_violations_sql(fk: ForeignKey) -> str:
    """Rows of the child that reference no parent row (MATCH SIMPLE: any NULL passes)."""
    present = " AND ".join(f"c.{quote_ident(c)} IS NOT NULL" for c in fk.child_columns)
    join = " AND ".join(f"p.{quote_ident(p)} = c.{quote_ident(c)}"
                        for c, p in zip(fk.child_columns, fk.parent_columns))
    sql = (f"SELECT count(*) FROM {fk.child_scan} c WHERE {present} AND NOT EXISTS "
           f"(SELECT 1 FROM {fk.parent_scan} p WHERE {join})")
    if fk.match_full and len(fk.child_columns) > 1:
        some = " OR ".join(f"c.{quote_ident(c)} IS NULL" for c in fk.child_columns)
        sql += f" OR (({some}) AND NOT ({' AND '.join(f'c.{quote_ident(c)} IS NULL' for c in fk.child_columns)}))"
    return sql


def raise_sequence_sql(sequence: str, increment: int, uses: Sequence[tuple[str, str]]) -> str:
    """setval past the copied values, never backwards: setval is not transactional, so a
    sync that later rolls back leaves a sequence ahead (harmless), never behind."""
    agg, pick = ("max", "greatest") if increment > 0 else ("min", "least")
    values = [f"(SELECT {agg}({quote_ident(column)})::bigint FROM {scan})" for scan, column in uses]
    copied = values[0] if len(values) == 1 else f"{pick}({', '.join(values)})"
    return (f"SELECT setval({quote_literal(sequence)}::regclass, {pick}(x.m, q.last_value)) "
            f"FROM (SELECT {copied} AS m) x, {sequence} q WHERE x.m IS NOT NULL")


# ── running a sync ────────────────────────────────────────────────────────────────────────

def source_settings(settings: SyncSettings) -> str:
    """Session settings of the source. Text forms of values (hashed, or sent in text COPY)
    must not depend on the server's or role's defaults, or one value would hash differently;
    row_security off turns a policy that would silently hide rows into an error."""
    idle = int(settings.lock_timeout) + 300  # the source waits while the target takes its locks
    return ("SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; "
            "SET bytea_output = 'hex'; SET extra_float_digits = 1; SET row_security = off; "
            f"SET statement_timeout = 0; SET idle_in_transaction_session_timeout = '{idle}s'")


def key_conn(conn: ConnInfo, key: bytes | None, environ: Mapping[str, str]) -> ConnInfo:
    """The source connection with the key's HMAC pads as custom settings in the startup
    packet (PGOPTIONS): readable by current_setting() in that session only, absent from
    query text, pg_stat_activity and the server log."""
    if key is None:
        return conn
    inner, outer = hmac_pads(key)
    options = conn.get("options") or environ.get("PGOPTIONS", "")
    return conn.with_params(options=f"{options} -c confiture.k_i={inner} "
                                    f"-c confiture.k_o={outer}".strip())


def refuse_same_database(source: Env, target: Env, environ: Mapping[str, str]) -> None:
    """By configuration: same server address and database name (all local addresses fold
    together, so this fails closed)."""
    mine = (*source.conn.server_identity(environ), source.database)
    theirs = (*target.conn.server_identity(environ), target.database)
    if mine == theirs:
        raise Refused(f"sync from {source.name!r} to {target.name!r}: both reach database "
                      f"{target.database!r} on {mine[0]}:{mine[1]}",
                      hint="point the target at another database")


_FIFO_DIR_PREFIX = "confiture-sync-"


def make_fifo_dir() -> Path:
    """A private folder for this run's named pipes, named after our pid
    (confiture-sync-<pid>-<random>). A killed run cannot remove its own, so the folders of
    runs whose process is gone are removed first."""
    import shutil
    import tempfile

    top = Path(tempfile.gettempdir())
    try:
        found = list(top.glob(f"{_FIFO_DIR_PREFIX}*-*"))
    except OSError:
        found = []
    for folder in found:
        pid = folder.name[len(_FIFO_DIR_PREFIX):].partition("-")[0]
        try:
            mine = folder.is_dir() and not folder.is_symlink() and \
                folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_FIFO_DIR_PREFIX}{os.getpid()}-"))


def _release_fifo(path: Path) -> None:
    """Unblock a psql waiting to open the named pipe because its partner failed first."""
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            os.close(os.open(path, flags))
        except OSError:
            pass


def stream_table(source: Session, target: Session, plan: TablePlan, fifo: Path) -> int:
    """COPY one table: the source psql writes into a named pipe that the target psql reads
    (binary when every column type allows). Returns the rows loaded."""
    import threading

    os.mkfifo(fifo, 0o600)
    fmt = "binary" if plan.binary else "text"
    freeze = ", FREEZE" if plan.target.kind == "r" else ""  # the table was truncated in this transaction
    columns = ", ".join(quote_ident(c) for c in plan.columns)
    # psql sets neither ERROR after a failed COPY TO STDOUT nor after a failed \copy, so each
    # side ends with a statement that fails when the COPY aborted its transaction; \copy
    # also leaves ROW_COUNT at -1 when it could not even start.
    source.submit(f"\\o {quote_literal(str(fifo))}\n"
                  f"COPY ({plan.select}) TO STDOUT WITH (FORMAT {fmt});\n\\o\n"
                  "SELECT NULL WHERE false;")
    target.submit(f"\\set ROW_COUNT -1\n"
                  f"\\copy {plan.target.sql} ({columns}) FROM {quote_literal(str(fifo))} "
                  f"WITH (FORMAT {fmt}{freeze})\n"
                  f"\\echo confiture_rows :ROW_COUNT\nSELECT NULL WHERE false;")
    outcome: dict[str, BaseException] = {}

    def read_source() -> None:
        try:
            source.collect()
        except BaseException as exc:  # noqa: BLE001 — reported by the main thread
            outcome["source"] = exc
            _release_fifo(fifo)

    reader = threading.Thread(target=read_source, name="sync-source", daemon=True)
    reader.start()
    try:
        lines = target.collect()
        rows = int(next((l.split()[1] for l in lines if l.startswith("confiture_rows ")), "-1"))
        target_error = None if rows >= 0 else \
            (target.last_stderr or "psql could not read the stream").strip()
    except SqlError as exc:
        target_error = exc.message
    except BaseException:  # interrupted: stop both sides now rather than after the table
        _abandon_stream(source, target, fifo, reader)
        raise
    if target_error is not None:
        reader.join(timeout=0.5)  # a source that failed first is the cause: report it
        if "source" not in outcome:
            _abandon_stream(source, None, fifo, reader)
            raise SyncError(f"{plan.name}: loading the target failed: {target_error}")
    reader.join()
    fifo.unlink(missing_ok=True)
    if "source" in outcome:
        failure = outcome["source"]
        if isinstance(failure, (KeyboardInterrupt, Interrupted)):
            raise failure
        message = failure.message if isinstance(failure, ConfitureError) else str(failure)
        raise SyncError(f"{plan.name}: reading the source failed: {message}")
    return rows


def _abandon_stream(source: Session, target: Session | None, fifo: Path,
                    reader: Any) -> None:
    """Cancel a table's COPY on both sides (the source would otherwise read the whole table
    into a pipe nobody reads) and wait briefly for the source thread."""
    for session in (target, source):
        if session is not None:
            session.cancel()
    _release_fifo(fifo)
    reader.join(timeout=10)
    fifo.unlink(missing_ok=True)


def _try_replica_mode(target: Session) -> bool:
    """SET LOCAL session_replication_role = replica if this role may (superuser, or granted
    on PostgreSQL 15+): no triggers and no per-row foreign-key checks while loading; the keys
    are validated by query before COMMIT instead."""
    target.execute("SAVEPOINT confiture_replica")
    try:
        target.execute("SET LOCAL session_replication_role = replica")
    except SqlError:
        target.execute("ROLLBACK TO SAVEPOINT confiture_replica")
        return False
    target.execute("RELEASE SAVEPOINT confiture_replica")
    return True


def validate_foreign_keys(target: Session, foreign_keys: Sequence[ForeignKey]) -> None:
    """Count child rows that reference no parent row, per constraint; any → SyncError."""
    broken = []
    for fk in foreign_keys:
        count = int(target.value(fk_violations_sql(fk)))
        if count:
            broken.append(f"{'.'.join(fk.child)} → {'.'.join(fk.parent)} ({fk.name}): "
                          f"{count} row(s) reference nothing")
    if broken:
        raise SyncError("foreign keys would be broken; nothing was written:\n  "
                        + "\n  ".join(broken),
                        hint="a [sync.where] filter or --tables left out referenced rows")


def raise_sequences(target: Session, tables: Sequence[tuple[TableInfo, Sequence[str]]],
                    sequences: Sequence[SequenceUse]) -> int:
    """Move the sequences behind the copied numeric columns past the copied values.
    `tables`: (target table, copied columns)."""
    scans = {table.key: table.scan for table, _ in tables}
    numeric = {(table.key, c.name) for table, copied in tables for c in table.columns
               if c.category == "N" and c.name in copied}
    grouped: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for use in sequences:
        if (use.table, use.column) in numeric:
            grouped.setdefault((use.sequence, use.increment), []).append(
                (scans[use.table], use.column))
    for (sequence, increment), uses in grouped.items():
        target.execute(raise_sequence_sql(sequence, increment, uses))
    return len(grouped)


def _progress_line(name: str, rows: int, seconds: float) -> str:
    rate = f"{rows / seconds:,.0f} rows/s" if seconds > 0 and rows else ""
    return f"  {name:<40} {rows:>12,} rows  {format_seconds(seconds):>8}  {rate}"


@record()
class SyncOutcome:
    report: dict[str, Any]
    plan: SyncPlan | None
    replica: bool | None


def _new_report(settings: SyncSettings) -> dict[str, Any]:
    return {"started_at": utc_now(), "finished_at": None, "from": settings.source,
            "to": settings.target, "ok": False, "tables": [], "rows": 0, "seconds": 0.0,
            "config_hash": settings.config_hash, "error": None}


def write_sync_report(config: Config, report: Mapping[str, Any]) -> Path:
    """<state_dir>/sync/<YYYYmmddTHHMMSSZ>_<from>_to_<to>.json (never overwrites one)."""
    stamp = report["started_at"].replace("-", "").replace(":", "")
    folder = config.state_dir / SYNC_REPORT_DIR
    path = folder / f"{stamp}_{report['from']}_to_{report['to']}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}_{report['from']}_to_{report['to']}.{n}.json"
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def open_sync_sessions(settings: SyncSettings, config: Config, environ: Mapping[str, str]
                       ) -> tuple[Env, Env, Session, Session]:
    """Resolve both envs, apply the safety rules, connect (source with the key)."""
    source_env = resolve_env(config, settings.source, environ)
    target_env = resolve_env(config, settings.target, environ)
    refuse_protected(target_env, f"sync into {target_env.name!r}")
    refuse_same_database(source_env, target_env, environ)
    tools = find_pg_tools(environ)
    base = dict(environ, PGCLIENTENCODING="UTF8")
    source = Session(tools, key_conn(source_env.conn, settings.key, environ),
                     source_env.database, base)
    try:
        target = Session(tools, target_env.conn, target_env.database, base)
    except BaseException:
        source.close()
        raise
    try:
        if server_identity(source) == server_identity(target):
            raise Refused(f"sync from {source_env.name!r} to {target_env.name!r}: both are "
                          f"database {target_env.database!r} of the same PostgreSQL cluster")
    except BaseException:
        source.close()
        target.close()
        raise
    return source_env, target_env, source, target


def run_sync(config: Config, settings: SyncSettings, console: Console,
             environ: Mapping[str, str] = os.environ, dry_run: bool = False) -> SyncOutcome:
    """Plan, then copy every selected table in one source snapshot into one target
    transaction. Any failure rolls the target back; the report records what happened."""
    report = _new_report(settings)
    started = time.monotonic()
    outcome = SyncOutcome(report=report, plan=None, replica=None)
    try:
        _run_sync(config, settings, console, environ, dry_run, outcome)
        report["ok"] = True
    except BaseException as exc:
        report["error"] = exc.message if isinstance(exc, ConfitureError) else \
            "interrupted" if isinstance(exc, KeyboardInterrupt) else repr(exc)
        raise
    finally:
        report["finished_at"] = utc_now()
        report["seconds"] = round(time.monotonic() - started, 3)
        report["rows"] = sum(t["rows"] for t in report["tables"])
        if not dry_run:
            report["report"] = str(write_sync_report(config, report))
    return outcome


def check_source_queries(source: Session, plan: SyncPlan) -> None:
    """Every compiled source query parses and plans, before anything is written (and in
    --dry-run); a failing one is blamed on its { sql = … } rule or [sync.where] filter."""
    for table in plan.tables:
        error = query_error(source, table.select)
        if error is None:
            continue
        culprit = next(((what, found) for what, query in table.checks
                        if (found := query_error(source, query)) is not None), None)
        what, error = culprit or (f"{table.name}: the source query", error)
        raise ConfigError(f"{what} fails in the source: {error.server_message}",
                          hint="fix the rule or filter in confiture.toml; nothing was written")


# Over 60 lines: one try/finally owns both sessions, the named pipes and the target
# transaction; the steps inside are calls.
def _run_sync(config: Config, settings: SyncSettings, console: Console,
              environ: Mapping[str, str], dry_run: bool, outcome: SyncOutcome) -> None:
    import shutil

    source_env, target_env, source, target = open_sync_sessions(settings, config, environ)
    fifo_dir: str | None = None
    try:
        source.execute(source_settings(settings))
        source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        plan = plan_sync(settings, read_tables(source), read_tables(target),
                         read_foreign_keys(target), read_sequences(target),
                         own_tables(config))
        outcome.plan = plan
        for warning in plan.warnings:
            console.warn(warning)
        check_source_queries(source, plan)
        acquire_lock(target, "sync", settings.lock_timeout,
                     f"another sync into {target_env.name!r}", console.info)
        target.execute("BEGIN")
        target.execute(f"SET LOCAL lock_timeout = {int(settings.lock_timeout * 1000)}; "
                       "SET LOCAL statement_timeout = 0; "
                       "SET LOCAL idle_in_transaction_session_timeout = '5min'")
        outcome.replica = _try_replica_mode(target)
        order = list(plan.tables)
        if not outcome.replica:
            by_key = {p.key: p for p in plan.tables}
            order = [by_key[k] for k in load_order(list(by_key), plan.foreign_keys)]
        if dry_run:
            target.execute("ROLLBACK")
            outcome.plan = evolve(plan, tables=tuple(order))
            return
        if not outcome.replica:
            target.execute("SET CONSTRAINTS ALL DEFERRED")
        console.info(f"sync {source_env.name} → {target_env.name}: {len(order)} tables"
                     f"{'' if outcome.replica else ' (in foreign-key order)'}")
        if order:
            target.execute("TRUNCATE " + ", ".join(p.target.scan for p in order))
        fifo_dir = str(make_fifo_dir())
        for index, table in enumerate(order):
            t0 = time.monotonic()
            rows = stream_table(source, target, table, Path(fifo_dir) / f"{index}.pipe")
            seconds = time.monotonic() - t0
            outcome.report["tables"].append({
                "table": table.name, "rows": rows, "seconds": round(seconds, 3),
                "masked": [f"{c} ({r})" for c, r in table.rules], "kept": list(table.kept)})
            console.info(_progress_line(table.name, rows, seconds))
        source.execute("COMMIT")  # release the snapshot before the checks on the target
        if outcome.replica:
            validate_foreign_keys(target, plan.foreign_keys)
        else:
            target.execute("SET CONSTRAINTS ALL IMMEDIATE")
        raise_sequences(target, [(p.target, p.columns) for p in plan.tables], plan.sequences)
        target.execute("COMMIT")
    except BaseException:
        if fifo_dir:
            for pipe in Path(fifo_dir).glob("*.pipe"):
                _release_fifo(pipe)
        target.cancel()
        source.cancel()
        raise
    finally:
        target.close()  # closing an open transaction rolls it back
        source.close()
        if fifo_dir:
            shutil.rmtree(fifo_dir, ignore_errors=True)


# ── sync rules: a complete rules block guessed from names and types ───────────────────────

# Patterns as text, searched with re.IGNORECASE: `re` compiles each at its first use and keeps
# it, where compiling them all at import was ~1.5 ms of every run (only sync's rules block
# reads them).
_PERSON_TABLES = (r"user|customer|client|person|people|staff|employee|member|contact|"
                  r"author|patient|account|profile|actor|owner|student|driver|guest")
# (regex on the column name, rule) in priority order; rule_applies() filters by type
_GUESSES: tuple[tuple[str, Rule], ...] = (
    (r"e_?mail", Rule("email")),
    (r"^(first_?name|given_?name|fname|forename)$", Rule("name", "first")),
    (r"^(last_?name|surname|family_?name|lname)$", Rule("name", "last")),
    (r"^(full_?name|display_?name|contact_?name|person_?name|customer_?name)$", Rule("name")),
    (r"phone|mobile|fax|^tel(ephone)?$|_tel$", Rule("phone")),
    (r"pass(word|wd)?($|_)|secret|token|api_?key|salt|otp|credential|private_?key",
     Rule("null")),
    ((r"ssn|social_?sec|tax_?id|national_?id|passport|iban|account_?n(o|um)|card_?n|"
      r"credit_?card|cvv|licen[cs]e_?n"), Rule("redact")),
    (r"^(user_?name|login|nick_?name|handle|screen_?name)$", Rule("hash")),
    (r"birth|^dob$|_dob$", Rule("shift_days", 30)),
    (r"address|street|^addr|postal|zip|post_?code", Rule("redact")),
    (r"(^|_)ip($|_)|ip_?addr|remote_?addr", Rule("hash")),
    (r"^(lat|lng|lon|latitude|longitude|geo|location|coordinates?)$", Rule("null")),
    (r"photo|picture|avatar|image|signature|selfie", Rule("null")),
)
_FREE_TEXT = r"note|comment|description|bio|message|body|remark|memo|text"


def guess_rule(table: TableInfo, column: Column) -> tuple[Rule, str]:
    """A sensible first rule for a column, and the comment printed beside it."""
    candidates = [rule for rx, rule in _GUESSES if re.search(rx, column.name, re.IGNORECASE)]
    if column.name.lower() == "name" and re.search(_PERSON_TABLES, table.name, re.IGNORECASE):
        candidates.insert(0, Rule("name"))
    if re.search(r"(^|_)id$", column.name, re.IGNORECASE):
        candidates = []  # keys keep their values, so joins and foreign keys keep working
    for rule in candidates:
        for option in (rule, Rule("redact"), Rule("null")):
            if rule_applies(option, column) is None:
                return option, "review: guessed from the name"
    if column.category in ("S", "U", "A") or column.base in ("json", "jsonb", "bytea", "xml") \
            or re.search(_FREE_TEXT, column.name, re.IGNORECASE):
        return Rule("keep"), "review: free text or structured data may hold personal data"
    return Rule("keep"), ""


def rules_block(settings: SyncSettings, tables: Sequence[TableInfo], env: Env) -> str:
    """A complete [sync.rules] block: every copied column with the configured rule when one
    matches, else a guess; guesses and free-text columns are marked '# review'."""
    out = [(f"# [sync.rules] for env {env.name!r} (database {env.database}), written by "
            f"confiture.py {__version__} on {utc_now()}."),
           "# Every column of every selected table is listed: strict = true needs a rule for each.",
           "# Check every line marked '# review' before the first sync.",
           "[sync.rules]"]
    for table in tables:
        out.append("")
        out.append(f"# {table.qualified}" + (" (partitioned)" if table.kind == "p" else "")
                   + (f", ~{table.estimate:,} rows" if table.estimate > 0 else ""))
        for column in table.columns:
            pattern = ".".join(pattern_segment(p) for p in (table.schema, table.name, column.name))
            if column.generated:
                out.append(f"# {json.dumps(pattern)}: generated column, computed by the target")
                continue
            found = find_rule(settings.rules, table.schema, table.name, column.name)
            if found:
                rule, note = found[1], f"from confiture.toml ({found[0].text})"
            else:
                rule, note = guess_rule(table, column)
            line = f"{json.dumps(pattern, ensure_ascii=False)} = {rule.toml()}"
            out.append(f"{line:<64}  # {note}" if note else line)
    return "\n".join(out) + "\n"


def sync_rules(config: Config, settings: SyncSettings, environ: Mapping[str, str]
               ) -> tuple[str, list[TableInfo]]:
    """Connect to the source and print its rules block (nothing is written anywhere)."""
    env = resolve_env(config, settings.source, environ)
    with Session(find_pg_tools(environ), env.conn, env.database, environ) as session:
        tables = select_tables(read_tables(session), settings, own_tables(config))
    return rules_block(settings, tables, env), tables


# ── schema-to-schema: an old database into a freshly built one, through postgres_fdw ──────


@record(frozen=True)
class TableMapping:
    """Where each NEW table and column takes its data from in OLD (a TOML file)."""

    tables: Mapping[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    columns: Mapping[tuple[str, str], Mapping[str, Rule]] = field(default_factory=dict)
    skip: tuple[tuple[str, str], ...] = ()


def _qualified(text: str, where: str) -> tuple[str, str]:
    parts = [seg for seg, _ in split_name(text, where)]
    if len(parts) == 1:
        return ("public", parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise ConfigError(f"{where}: {text!r} must be table or schema.table")


# The mapping file's keys: their TOML type and an example for the error's hint.
_MAPPING_KEYS: dict[str, tuple[type, str]] = {
    "tables": (dict, '[tables] "new_table" = "old_table"'),
    "columns": (dict, '[columns.new_table] new_col = "old_col"'),
    "skip": (list, 'skip = ["new_table"]'),
}


def load_mapping(path: Path | None) -> TableMapping:
    """[tables] "new" = "old"; [columns."new_table"] new_col = "old_col" | { sql = "…" };
    skip = ["new_table", …]. Unqualified tables are in schema public."""
    if path is None:
        return TableMapping()

    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    for key, value in data.items():
        if key not in _MAPPING_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}", hint=suggest(key, list(_MAPPING_KEYS)))
        expected, example = _MAPPING_KEYS[key]
        if not isinstance(value, expected):
            raise ConfigError(f"{where}: {key} must be a {'table' if expected is dict else 'list'},"
                              f" not {type(value).__name__}", hint=f"for example: {example}")
    tables = {}
    for new, old in data.get("tables", {}).items():
        if not isinstance(old, str):
            raise ConfigError(f"{where}: [tables] {new!r} must name the old table")
        tables[_qualified(new, where)] = _qualified(old, where)
    columns: dict[tuple[str, str], dict[str, Rule]] = {}
    for table, mapping in data.get("columns", {}).items():
        if not isinstance(mapping, dict):
            raise ConfigError(f"{where}: [columns.{table!r}] must be a table")
        entries = columns.setdefault(_qualified(table, where), {})
        for new_col, source in mapping.items():
            if isinstance(source, str):
                entries[new_col] = Rule("keep", source)
            elif isinstance(source, dict) and set(source) == {"sql"} and isinstance(source["sql"], str):
                entries[new_col] = Rule("sql", source["sql"])
            else:
                raise ConfigError(f"{where}: [columns.{table!r}] {new_col!r} must be the old "
                                  "column's name or { sql = \"…\" }")
    skip = data.get("skip", [])
    if not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{where}: skip must be a list of table names")
    return TableMapping(tables=tables, columns=columns,
                        skip=tuple(_qualified(s, where) for s in skip))


@record(frozen=True)
class CopyPlan:
    new: TableInfo
    old: TableInfo
    columns: tuple[str, ...]            # NEW columns filled
    expressions: tuple[str, ...]        # over the staged OLD table, aliased s
    defaulted: tuple[str, ...]


@record(frozen=True)
class SchemaCopyPlan:
    tables: tuple[CopyPlan, ...]
    empty: tuple[str, ...]              # NEW tables without an OLD counterpart
    dropped: tuple[str, ...]            # OLD tables copied nowhere
    notes: tuple[str, ...]


# Over 60 lines: like _plan_table, it collects every mapping problem before refusing.
def plan_schema_copy(old_tables: Sequence[TableInfo], new_tables: Sequence[TableInfo],
                     mapping: TableMapping,
                     internal: frozenset[tuple[str | None, str]] = frozenset()
                     ) -> SchemaCopyPlan:
    """Match NEW tables and columns to OLD ones (same names unless the mapping says otherwise)."""
    old_by_key = {t.key: t for t in old_tables}
    new_by_key = {t.key: t for t in new_tables}
    problems, notes, empty = [], [], []
    plans: list[CopyPlan] = []
    for key in [*mapping.tables, *mapping.columns, *mapping.skip]:
        if key not in new_by_key:
            problems.append(f"mapping names {'.'.join(key)}, which is not a table of the new "
                            "database")
    for key, old_key in mapping.tables.items():
        if old_key not in old_by_key:
            problems.append(f"mapping: {'.'.join(old_key)} (for {'.'.join(key)}) is not a table "
                            "of the old database")
    used: set[tuple[str, str]] = set()
    for new in new_tables:
        if new.key in mapping.skip or is_own_table(internal, *new.key):
            continue
        old = old_by_key.get(mapping.tables.get(new.key, new.key))
        if old is None:
            empty.append(new.qualified)
            continue
        used.add(old.key)
        old_cols = {c.name: c for c in old.columns}
        renames = mapping.columns.get(new.key, {})
        for name in renames:
            if not any(c.name == name for c in new.columns):
                problems.append(f"mapping: {new.qualified}.{name} is not a column of the new "
                                "table")
        columns, expressions, defaulted = [], [], []
        for col in new.columns:
            if col.generated:
                continue
            rule = renames.get(col.name)
            if rule is not None and rule.kind == "sql":
                expression = f"({rule.arg})"
            else:
                source = rule.arg if rule is not None else col.name
                if source not in old_cols:
                    if rule is not None:
                        problems.append(f"mapping: {old.qualified}.{source} (for "
                                        f"{new.qualified}.{col.name}) does not exist")
                    elif col.notnull and not col.has_default:
                        problems.append(f"{new.qualified}.{col.name}: NOT NULL, no default, and "
                                        f"{old.qualified} has no column {col.name!r} (map one "
                                        "in the mapping file)")
                    defaulted.append(col.name)
                    continue
                expression = f"s.{quote_ident(source)}"
            columns.append(col.name)
            expressions.append(expression)
        if columns:
            plans.append(CopyPlan(new=new, old=old, columns=tuple(columns),
                                  expressions=tuple(expressions), defaulted=tuple(defaulted)))
        if defaulted:
            notes.append(f"{new.qualified}: {', '.join(defaulted)} left to their defaults")
    dropped = [t.qualified for t in old_tables if t.key not in used
               and not is_own_table(internal, *t.key)]
    if problems:
        raise ConfigError("schema-to-schema cannot start; nothing was written:\n  "
                          + "\n  ".join(problems))
    return SchemaCopyPlan(tables=tuple(plans), empty=tuple(empty), dropped=tuple(dropped),
                          notes=tuple(notes))


def _fdw_server_options(conn: ConnInfo, database: str, environ: Mapping[str, str]) -> str:
    options = {"dbname": database}
    for name, variable in (("host", "PGHOST"), ("port", "PGPORT"), ("sslmode", "PGSSLMODE")):
        value = conn.get(name) or environ.get(variable)
        if value:
            options[name] = value
    return ", ".join(f"{name} {quote_literal(value)}" for name, value in options.items())


@record()
class SchemaCopyResult:
    tables: list[dict[str, Any]]
    rows: int
    seconds: float
    replica: bool
    plan: SchemaCopyPlan


def schema_to_schema(config: Config, old_name: str, new_name: str, mapping: TableMapping,
                     console: Console, environ: Mapping[str, str] = os.environ,
                     yes: bool = False, dry_run: bool = False) -> SchemaCopyResult:
    """Copy OLD's data into NEW in one NEW transaction: a temporary postgres_fdw server and
    staging schema, INSERT … SELECT in foreign-key order, row counts compared, foreign keys
    and sequences fixed, then the server and staging schemas dropped — all or nothing."""
    old_env = resolve_env(config, old_name, environ)
    new_env = resolve_env(config, new_name, environ)
    refuse_same_database(old_env, new_env, environ)
    confirm_protected(new_env, "schema-to-schema", yes, console)
    if new_env.protected and not dry_run:  # SPEC §5: a backup before any write
        backup = create_backup(open_workspace(new_env, console, environ))
        console.info(f"backed up {new_env.database} before schema-to-schema: {backup.path}")
    tools = find_pg_tools(environ)
    started = time.monotonic()
    with Session(tools, old_env.conn, old_env.database, environ) as old, \
            Session(tools, _fdw_login(old, old_env, new_env, environ), new_env.database,
                    environ) as new:
        if server_identity(old) == server_identity(new):
            raise Refused(f"schema-to-schema: {old_name!r} and {new_name!r} are the same "
                          "database of the same cluster")
        plan = plan_schema_copy(read_tables(old), read_tables(new), mapping,
                                own_tables(config))
        old.close()
        new.execute("BEGIN")
        new.execute("SET LOCAL statement_timeout = 0")
        replica = _try_replica_mode(new)
        foreign_keys = read_foreign_keys(new)
        order = _copy_order(plan, foreign_keys, replica)
        _refuse_filled(new, order)
        if dry_run:
            new.execute("ROLLBACK")
            return SchemaCopyResult([], 0, 0.0, replica,
                                    evolve(plan, tables=tuple(order)))
        if not replica:
            new.execute("SET CONSTRAINTS ALL DEFERRED")
        staged = _stage_old_tables(new, order, old_env, environ)
        results: list[dict[str, Any]] = []
        for table in order:
            t0 = time.monotonic()
            rows = _copy_one(new, table, staged.tables[table.old.key])
            seconds = time.monotonic() - t0
            results.append({"table": table.new.qualified, "from": table.old.qualified,
                            "rows": rows, "seconds": round(seconds, 3),
                            "defaulted": list(table.defaulted)})
            console.info(_progress_line(table.new.qualified, rows, seconds))
        copied = {t.new.key for t in order}
        if replica:
            validate_foreign_keys(new, [fk for fk in foreign_keys if fk.child in copied])
        else:
            new.execute("SET CONSTRAINTS ALL IMMEDIATE")
        raise_sequences(new, [(t.new, t.columns) for t in order],
                        [s for s in read_sequences(new) if s.table in copied])
        _drop_staging(new, staged)
        new.execute("COMMIT")  # a failure anywhere above rolls back server, schemas and data
    return SchemaCopyResult(results, sum(r["rows"] for r in results),
                            time.monotonic() - started, replica, plan)


_FDW_SERVER = "confiture_s2s"


def _fdw_login(old: Session, old_env: Env, new_env: Env, environ: Mapping[str, str]) -> ConnInfo:
    """NEW's connection, carrying the login NEW's server uses to reach OLD: the role OLD's
    session really has (a URL may name none), and the password libpq used (URL, $PGPASSWORD
    or the password file), if any: trust and peer logins have none, and an empty password
    must not reach the server at all. It travels hex-encoded as custom settings in the startup
    packet and is used only inside a DO block, so it is in no query text, pg_stat_activity
    row or statement log."""
    user = str(old.value("SELECT session_user"))
    password = (old_env.conn.get("password") or environ.get("PGPASSWORD")
                or old_env.conn.passfile_password(old_env.database, user, environ))
    settings = f"-c confiture.fdw_user={user.encode().hex()}"
    if password:
        settings += f" -c confiture.fdw_password={password.encode().hex()}"
    options = new_env.conn.get("options") or environ.get("PGOPTIONS", "")
    return new_env.conn.with_params(options=f"{options} {settings}".strip())


def _copy_order(plan: SchemaCopyPlan, foreign_keys: Sequence[ForeignKey], replica: bool
                ) -> list[CopyPlan]:
    if replica:
        return list(plan.tables)
    by_key = {t.new.key: t for t in plan.tables}
    return [by_key[k] for k in load_order(list(by_key), foreign_keys)]


def _refuse_filled(session: Session, order: Sequence[CopyPlan]) -> None:
    if not order:
        return
    probes = ", ".join(f"EXISTS (SELECT 1 FROM {t.new.scan}) AS {quote_ident(t.new.qualified)}"
                       for t in order)
    row = session.query(f"SELECT {probes}")[0]
    filled = [name for name, has_rows in row.items() if has_rows is True]
    if filled:
        raise Refused("schema-to-schema fills a freshly built database, but these tables "
                      "already hold rows: " + ", ".join(filled),
                      hint="rebuild the new database without seed data, or skip the tables "
                           "in the mapping file")


@record()
class Staging:
    """What _stage_old_tables created in the new database, for _drop_staging."""

    tables: dict[tuple[str, str], str] = field(default_factory=dict)  # OLD table → foreign table
    schemas: list[str] = field(default_factory=list)
    extension_created: bool = False


def _stage_old_tables(session: Session, order: Sequence[CopyPlan], old_env: Env,
                      environ: Mapping[str, str]) -> Staging:
    """postgres_fdw server + user mapping to OLD, one staging schema per OLD schema with the
    needed tables imported as foreign tables."""
    created = not session.value("SELECT count(*) FROM pg_extension WHERE extname = 'postgres_fdw'")
    try:
        session.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    except SqlError as exc:
        raise SyncError(f"cannot create extension postgres_fdw in {session.dbname}: "
                        f"{exc.message}", hint="a superuser must run CREATE EXTENSION "
                        "postgres_fdw in the new database once (package postgresql-contrib)")
    session.execute(f"CREATE SERVER {_FDW_SERVER} FOREIGN DATA WRAPPER postgres_fdw OPTIONS "
                    f"({_fdw_server_options(old_env.conn, old_env.database, environ)})")
    session.execute(  # no password setting (trust, peer): the mapping names none
        "DO $confiture$ DECLARE pw text := current_setting('confiture.fdw_password', true); "
        "BEGIN EXECUTE format('CREATE USER MAPPING FOR CURRENT_USER SERVER "
        f"{_FDW_SERVER} OPTIONS (user %L' || CASE WHEN pw IS NULL THEN ')' "
        "ELSE ', password %L)' END, "
        "convert_from(decode(current_setting('confiture.fdw_user'), 'hex'), 'UTF8'), "
        "convert_from(decode(pw, 'hex'), 'UTF8')); END $confiture$")
    staged = Staging(extension_created=created)
    by_schema: dict[str, list[str]] = {}
    for table in order:
        by_schema.setdefault(table.old.schema, []).append(table.old.name)
    for index, (schema, names) in enumerate(sorted(by_schema.items())):
        staging = f"{_FDW_SERVER}_{index}"
        session.execute(f"CREATE SCHEMA {staging}")
        staged.schemas.append(staging)
        limit = ", ".join(quote_ident(n) for n in sorted(set(names)))
        try:
            session.execute(f"IMPORT FOREIGN SCHEMA {quote_ident(schema)} LIMIT TO ({limit}) "
                            f"FROM SERVER {_FDW_SERVER} INTO {staging}")
        except SqlError as exc:
            raise SyncError(f"cannot read the old database through postgres_fdw: {exc.message}",
                            hint="the new database's server connects to the old one itself: "
                                 "it needs a network path and, for non-superusers, a password")
        for name in names:
            staged.tables[(schema, name)] = f"{staging}.{quote_ident(name)}"
    return staged


def _copy_one(session: Session, table: CopyPlan, staged: str) -> int:
    """INSERT … SELECT one table, then compare its row count with OLD's (both reads use the
    one remote snapshot postgres_fdw keeps for the transaction)."""
    columns = ", ".join(quote_ident(c) for c in table.columns)
    select = f"SELECT {', '.join(table.expressions)} FROM {staged} AS s"
    if (error := query_error(session, select)) is not None:  # a mapping's { sql = … } (§5)
        culprit = next((f"{table.new.qualified}.{column} = {expression}"
                        for column, expression in zip(table.columns, table.expressions,
                                                      strict=True)
                        if query_error(session, f"SELECT {expression} FROM {staged} AS s")),
                       f"{table.new.qualified} (from {table.old.qualified})")
        raise ConfigError(f"{culprit}: fails in the new database: {error.server_message}",
                          hint="fix the mapping; nothing was written")
    try:
        session.execute(f"INSERT INTO {table.new.sql} ({columns}) OVERRIDING SYSTEM VALUE "
                        f"{select}")
    except SqlError as exc:
        raise SyncError(f"{table.new.qualified} (from {table.old.qualified}): {exc.message}")
    counts = session.query(f"SELECT (SELECT count(*) FROM {table.new.scan}) AS new, "
                           f"(SELECT count(*) FROM {staged}) AS old")[0]
    if counts["new"] != counts["old"]:
        raise SyncError(f"{table.new.qualified}: {counts['new']} rows copied, but "
                        f"{table.old.qualified} has {counts['old']}; nothing was written")
    return int(counts["new"])


def _drop_staging(session: Session, staged: Staging) -> None:
    """Drop what _stage_old_tables created (the extension only if it was not there before)."""
    if staged.schemas:
        session.execute(f"DROP SCHEMA {', '.join(staged.schemas)} CASCADE")
    session.execute(f"DROP USER MAPPING IF EXISTS FOR CURRENT_USER SERVER {_FDW_SERVER}")
    session.execute(f"DROP SERVER IF EXISTS {_FDW_SERVER} CASCADE")
    if staged.extension_created:
        session.execute("DROP EXTENSION IF EXISTS postgres_fdw")


# ════════════════════════════════════════════════════════════════════════════════════════════
# §11 Schema model
# Reads a database's schema from the catalog (one psql round trip of JSON) into plain records,
# one per object, keyed by kind and qualified name, with their dependencies from pg_depend.
# Each kind of object is one registry entry: its catalog query and how a row becomes objects.
# ════════════════════════════════════════════════════════════════════════════════════════════

@record(frozen=True)
class DbObject:
    """One schema object. `key` is unique in a model ("table public.users", "column
    public.users.id"); `facts` are what is compared (text from pg_get_*def and the catalog);
    `parent` is the key of the owning table; `depends` the keys it needs (from pg_depend)."""

    kind: str
    key: str
    schema: str
    name: str
    parent: str
    facts: Mapping[str, Any]
    comment: str | None = None
    depends: frozenset[str] = frozenset()

    def same_as(self, other: DbObject) -> bool:
        return self.facts == other.facts and self.comment == other.comment


@record(frozen=True)
class SchemaModel:
    objects: Mapping[str, DbObject]

    @functools.cached_property
    def users(self) -> dict[str, list[str]]:
        """Key → the keys of the objects that need it directly (built once: a model is never
        changed after it is made; cached_property writes past the frozen record's setattr)."""
        direct: dict[str, list[str]] = {}
        for obj in self.objects.values():
            for dep in obj.depends:
                direct.setdefault(dep, []).append(obj.key)
        return direct

    def dependents(self, key: str) -> list[str]:
        """Keys of the objects that need `key`, directly or through others (nearest first)."""
        direct = self.users
        found: list[str] = []
        todo = [key]
        while todo:
            for child in sorted(direct.get(todo.pop(0), [])):
                if child not in found and child != key:
                    found.append(child)
                    todo.append(child)
        return found


# ── reading the catalog ───────────────────────────────────────────────────────────────────

_USER_NS = "{n}.nspname NOT LIKE 'pg\\_%' AND {n}.nspname <> 'information_schema'"


def _user_ns(alias: str = "n") -> str:
    return _USER_NS.format(n=alias)


def _not_extension(catalog: str, oid: str) -> str:
    """Objects an extension owns are the extension's business, never ours (extension_owned:
    see model_catalog_statements)."""
    return (f"NOT EXISTS (SELECT 1 FROM extension_owned xd WHERE xd.classid = "
            f"'{catalog}'::regclass AND xd.objid = {oid})")


def _comment(oid: str, catalog: str, subid: str = "0") -> str:
    """An object's comment: obj_description() written out, as a SQL function called per row
    cost ~7 ms of the ~65 ms catalog read of 200 tables on a new backend."""
    return (f"(SELECT ds.description FROM pg_description ds WHERE ds.objoid = {oid} "
            f"AND ds.classoid = '{catalog}'::regclass AND ds.objsubid = {subid})")


_QUALIFIED_COLLATION = ("(SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) "
                        "FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace "
                        "WHERE co.oid = {coll})")


def _relations(kinds: str, excluded: str, joins: str = "", where: str = "") -> str:
    """FROM the user's relations of some kinds (with more joins and conditions)."""
    return (f"FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace {joins} "
            f"WHERE c.relkind IN ({kinds}) AND {_user_ns()} "
            f"AND {_not_extension('pg_class', 'c.oid')}{excluded}{where}")


def _query_schemas(excluded: str) -> str:
    return (f"SELECT n.oid, quote_ident(n.nspname) AS name, "
            f"{_comment('n.oid', 'pg_namespace')} AS comment FROM pg_namespace n "
            f"WHERE {_user_ns()} AND {_not_extension('pg_namespace', 'n.oid')}")


def _query_extensions(excluded: str) -> str:
    return ("SELECT e.oid, quote_ident(e.extname) AS name, quote_ident(n.nspname) AS schema, "
            f"{_comment('e.oid', 'pg_extension')} AS comment FROM pg_extension e "
            "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql'")


def _query_types(excluded: str) -> str:
    collation = _QUALIFIED_COLLATION.format(coll="a.attcollation")
    return f"""
SELECT t.oid, t.typarray AS array_oid, quote_ident(n.nspname) AS schema, quote_ident(t.typname) AS name,
  t.typtype AS type, {_comment('t.oid', 'pg_type')} AS comment,
  CASE t.typtype WHEN 'e' THEN (SELECT json_agg(enumlabel ORDER BY enumsortorder)
    FROM pg_enum WHERE enumtypid = t.oid) END AS labels,
  CASE t.typtype WHEN 'c' THEN (SELECT json_agg(json_build_object(
      'name', quote_ident(a.attname), 'type', format_type(a.atttypid, a.atttypmod),
      'collation', CASE WHEN a.attcollation <> at.typcollation THEN {collation} END)
      ORDER BY a.attnum) FROM pg_attribute a JOIN pg_type at ON at.oid = a.atttypid
    WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped) END AS attributes,
  CASE t.typtype WHEN 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS base,
  t.typdefault AS default, t.typnotnull AS notnull,
  CASE t.typtype WHEN 'd' THEN (SELECT json_agg(json_build_object('name', quote_ident(c.conname),
      'def', pg_get_constraintdef(c.oid)) ORDER BY c.conname)
    FROM pg_constraint c WHERE c.contypid = t.oid) END AS checks,
  CASE t.typtype WHEN 'r' THEN (SELECT json_build_object(
      'subtype', format_type(r.rngsubtype, NULL),
      'canonical', nullif(r.rngcanonical::regproc::text, '-'),
      'subdiff', nullif(r.rngsubdiff::regproc::text, '-'))
    FROM pg_range r WHERE r.rngtypid = t.oid) END AS range
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE {_user_ns()} AND t.typtype IN ('e', 'c', 'd', 'r') AND {_not_extension('pg_type', 't.oid')}
  AND (t.typtype <> 'c' OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')"""


def _query_sequences(excluded: str) -> str:
    return f"""
SELECT c.oid, quote_ident(n.nspname) AS schema, quote_ident(c.relname) AS name,
  {_comment('c.oid', 'pg_class')} AS comment, format_type(s.seqtypid, NULL) AS type,
  s.seqstart::text AS start,
  s.seqincrement::text AS increment, s.seqmin::text AS min, s.seqmax::text AS max,
  s.seqcache::text AS cache, s.seqcycle AS cycle,
  (SELECT quote_ident(tn.nspname) || '.' || quote_ident(tc.relname) || '.' || quote_ident(a.attname)
    FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid
    JOIN pg_namespace tn ON tn.oid = tc.relnamespace
    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
      AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a') AS owned_by
{_relations("'S'", excluded, "JOIN pg_sequence s ON s.seqrelid = c.oid",
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
            " AND d.objid = c.oid AND d.deptype = 'i')")}"""


def _query_tables(excluded: str) -> str:
    return f"""
SELECT c.oid, c.reltype AS type_oid, quote_ident(n.nspname) AS schema,
  quote_ident(c.relname) AS name,
  {_comment('c.oid', 'pg_class')} AS comment, c.relkind AS relkind,
  c.relpersistence AS persistence, c.relrowsecurity AS rls, c.relforcerowsecurity AS force_rls,
  to_json(c.reloptions) AS options,
  CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_by,
  CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END AS bound,
  (SELECT json_agg(quote_ident(pn.nspname) || '.' || quote_ident(p.relname) ORDER BY i.inhseqno)
    FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
    JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid) AS parents,
  (SELECT json_agg(quote_ident(a.attname) ORDER BY a.attnum) FROM pg_attribute a
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
{_relations("'r', 'p'", excluded)}"""


_COLUMN_JOINS = """
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"""


def _query_columns(excluded: str) -> str:
    collation = _QUALIFIED_COLLATION.format(coll="a.attcollation")
    return f"""
SELECT c.oid, a.attnum, d.oid AS default_oid, quote_ident(n.nspname) AS schema,
  quote_ident(c.relname) AS table, quote_ident(a.attname) AS name,
  {_comment('c.oid', 'pg_class', 'a.attnum')} AS comment,
  format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull,
  a.attidentity AS identity, a.attgenerated AS generated, a.attislocal AS local,
  CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END AS default,
  CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS expression,
  CASE WHEN a.attcollation <> t.typcollation THEN {collation} END AS collation,
  c.relispartition AS partition
{_relations("'r', 'p'", excluded, _COLUMN_JOINS)}
ORDER BY c.oid, a.attnum"""


def _query_constraints(excluded: str) -> str:
    return f"""
SELECT co.oid, co.conindid AS index_oid, quote_ident(n.nspname) AS schema,
  quote_ident(c.relname) AS table, quote_ident(co.conname) AS name,
  {_comment('co.oid', 'pg_constraint')} AS comment,
  co.contype AS type, pg_get_constraintdef(co.oid) AS def
{_relations("'r', 'p'", excluded, "JOIN pg_constraint co ON co.conrelid = c.oid",
            " AND co.contype IN ('p', 'u', 'f', 'c', 'x') AND co.conislocal"
            " AND co.conparentid = 0")}"""


def _query_indexes(excluded: str) -> str:
    return f"""
SELECT ic.oid, quote_ident(n.nspname) AS schema, quote_ident(ic.relname) AS name,
  quote_ident(c.relname) AS table,
  c.relkind AS table_kind, {_comment('ic.oid', 'pg_class')} AS comment,
  pg_get_indexdef(ic.oid) AS def
{_relations("'r', 'p', 'm'", excluded,
            "JOIN pg_index i ON i.indrelid = c.oid JOIN pg_class ic ON ic.oid = i.indexrelid",
            " AND NOT ic.relispartition AND NOT EXISTS (SELECT 1 FROM pg_constraint x"
            " WHERE x.conindid = ic.oid AND x.conrelid = c.oid AND x.contype IN ('p', 'u', 'x'))")}"""


def _query_views(excluded: str) -> str:
    return f"""
SELECT c.oid, r.oid AS rule_oid, c.reltype AS type_oid, quote_ident(n.nspname) AS schema,
  quote_ident(c.relname) AS name, {_comment('c.oid', 'pg_class')} AS comment, c.relkind AS relkind,
  pg_get_viewdef(c.oid) AS def, to_json(c.reloptions) AS options
{_relations("'v', 'm'", excluded,
            "LEFT JOIN pg_rewrite r ON r.ev_class = c.oid AND r.rulename = '_RETURN'")}"""


def _query_functions(excluded: str) -> str:
    return f"""
SELECT p.oid, quote_ident(n.nspname) AS schema, quote_ident(p.proname) AS name,
  {_comment('p.oid', 'pg_proc')} AS comment,
  pg_get_function_identity_arguments(p.oid) AS args, p.prokind AS prokind,
  pg_get_function_result(p.oid) AS result, pg_get_functiondef(p.oid) AS def
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prokind IN ('f', 'p') AND {_user_ns()} AND {_not_extension('pg_proc', 'p.oid')}
  AND NOT EXISTS (SELECT 1 FROM pg_depend i WHERE i.classid = 'pg_proc'::regclass
                  AND i.objid = p.oid AND i.deptype = 'i')"""  # not a range's constructors


def _query_triggers(excluded: str) -> str:
    return f"""
SELECT tg.oid, quote_ident(n.nspname) AS schema, quote_ident(c.relname) AS table,
  quote_ident(tg.tgname) AS name,
  {_comment('tg.oid', 'pg_trigger')} AS comment, pg_get_triggerdef(tg.oid) AS def,
  tg.tgenabled AS enabled
{_relations("'r', 'p', 'v'", excluded, "JOIN pg_trigger tg ON tg.tgrelid = c.oid",
            " AND NOT tg.tgisinternal AND tg.tgparentid = 0")}"""


def _query_policies(excluded: str) -> str:
    return f"""
SELECT pol.oid, quote_ident(n.nspname) AS schema, quote_ident(c.relname) AS table,
  quote_ident(pol.polname) AS name,
  {_comment('pol.oid', 'pg_policy')} AS comment, pol.polcmd AS cmd,
  pol.polpermissive AS permissive,
  (SELECT json_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END
    ORDER BY 1) FROM unnest(pol.polroles) r) AS roles,
  pg_get_expr(pol.polqual, pol.polrelid) AS using, pg_get_expr(pol.polwithcheck, pol.polrelid) AS check
{_relations("'r', 'p'", excluded, "JOIN pg_policy pol ON pol.polrelid = c.oid")}"""


def _option_list(column: str) -> str:
    """A catalog OPTIONS array as [[name, value], …] (names quoted as needed), sorted by name:
    their order means nothing to PostgreSQL."""
    return (f"(SELECT json_agg(json_build_array(quote_ident(o.option_name), o.option_value) "
            f"ORDER BY o.option_name) FROM pg_options_to_table({column}) o)")


def _query_wrappers(excluded: str) -> str:
    return f"""
SELECT w.oid, quote_ident(w.fdwname) AS name,
  {_comment('w.oid', 'pg_foreign_data_wrapper')} AS comment,
  nullif(w.fdwhandler::regproc::text, '-') AS handler,
  nullif(w.fdwvalidator::regproc::text, '-') AS validator, {_option_list('w.fdwoptions')} AS options
FROM pg_foreign_data_wrapper w WHERE {_not_extension('pg_foreign_data_wrapper', 'w.oid')}"""


def _query_servers(excluded: str) -> str:
    """Servers, with the extension that brings their wrapper (postgres_fdw, file_fdw): the
    model holds the extension, not its objects, and the server needs it first."""
    return f"""
SELECT s.oid, quote_ident(s.srvname) AS name,
  {_comment('s.oid', 'pg_foreign_server')} AS comment,
  quote_ident(w.fdwname) AS wrapper, s.srvtype AS type, s.srvversion AS version,
  {_option_list('s.srvoptions')} AS options,
  (SELECT quote_ident(x.extname) FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
    WHERE d.classid = 'pg_foreign_data_wrapper'::regclass AND d.objid = w.oid
      AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e') AS extension
FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
WHERE {_not_extension('pg_foreign_server', 's.oid')}"""


def _query_foreign_tables(excluded: str) -> str:
    """Foreign tables with their columns (a foreign table holds no rows: it is one object,
    altered in place where ALTER FOREIGN TABLE can, else created again)."""
    collation = _QUALIFIED_COLLATION.format(coll="a.attcollation")
    return f"""
SELECT c.oid, c.reltype AS type_oid, quote_ident(n.nspname) AS schema,
  quote_ident(c.relname) AS name, {_comment('c.oid', 'pg_class')} AS comment,
  quote_ident(s.srvname) AS server, {_option_list('ft.ftoptions')} AS options,
  CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END AS bound,
  (SELECT json_agg(quote_ident(pn.nspname) || '.' || quote_ident(p.relname) ORDER BY i.inhseqno)
    FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
    JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid) AS parents,
  (SELECT json_agg(json_build_object('name', quote_ident(a.attname),
      'type', format_type(a.atttypid, a.atttypmod), 'notnull', a.attnotnull,
      'local', a.attislocal, 'default_oid', d.oid,
      'default', CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
      'expression', CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
      'collation', CASE WHEN a.attcollation <> t.typcollation THEN {collation} END,
      'options', {_option_list('a.attfdwoptions')},
      'comment', {_comment('c.oid', 'pg_class', 'a.attnum')}) ORDER BY a.attnum)
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
  (SELECT json_agg(json_build_object('name', quote_ident(co.conname),
      'def', pg_get_constraintdef(co.oid), 'oid', co.oid) ORDER BY co.conname)
    FROM pg_constraint co WHERE co.conrelid = c.oid AND co.contype = 'c' AND co.conislocal)
    AS checks
{_relations("'f'", excluded, "JOIN pg_foreign_table ft ON ft.ftrelid = c.oid "
            "JOIN pg_foreign_server s ON s.oid = ft.ftserver")}"""


def _query_event_triggers(excluded: str) -> str:
    """Event triggers (reading them needs no privilege; creating them needs a superuser)."""
    return f"""
SELECT e.oid, quote_ident(e.evtname) AS name,
  {_comment('e.oid', 'pg_event_trigger')} AS comment,
  e.evtevent AS event, (SELECT json_agg(tag ORDER BY tag) FROM unnest(e.evttags) tag) AS tags,
  e.evtfoid::regproc::text AS function, e.evtenabled AS enabled
FROM pg_event_trigger e WHERE {_not_extension('pg_event_trigger', 'e.oid')}"""


# Kinds the model knows by name only: a difference in them is reported, never planned.
# Over 60 lines: one query, a UNION ALL branch per kind; there is no logic to split.
def _query_others(excluded: str) -> str:
    return f"""
SELECT r.oid, 'rule' AS type, quote_ident(n.nspname) AS schema,
  quote_ident(r.rulename) || ' on ' || quote_ident(c.relname) AS name,
  pg_get_ruledef(r.oid) AS def,
  'DROP RULE ' || quote_ident(r.rulename) || ' ON ' || c.oid::regclass::text AS drop
{_relations("'r', 'p', 'v', 'm'", excluded, "JOIN pg_rewrite r ON r.ev_class = c.oid",
            " AND r.rulename <> '_RETURN'")}
UNION ALL
SELECT s.oid, 'statistics', quote_ident(n.nspname), quote_ident(s.stxname), pg_get_statisticsobjdef(s.oid),
  'DROP STATISTICS ' || quote_ident(n.nspname) || '.' || quote_ident(s.stxname)
FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE {_user_ns()}
UNION ALL
SELECT p.oid, 'aggregate', quote_ident(n.nspname),
  quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')',
  CASE WHEN a.aggkind = 'n' THEN 'CREATE AGGREGATE ' || p.oid::regprocedure::text
    || ' (SFUNC = ' || a.aggtransfn::regproc::text
    || ', STYPE = ' || format_type(a.aggtranstype, NULL)
    || coalesce(', FINALFUNC = ' || nullif(a.aggfinalfn::regproc::text, '-'), '')
    || coalesce(', COMBINEFUNC = ' || nullif(a.aggcombinefn::regproc::text, '-'), '')
    || coalesce(', INITCOND = ' || quote_literal(a.agginitval), '')
    || coalesce(', SORTOP = ' || nullif(a.aggsortop, 0)::regoperator::text, '') || ')' END,
  'DROP AGGREGATE ' || p.oid::regprocedure::text
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  LEFT JOIN pg_aggregate a ON a.aggfnoid = p.oid
WHERE p.prokind IN ('a', 'w') AND {_user_ns()} AND {_not_extension('pg_proc', 'p.oid')}
UNION ALL
SELECT co.oid, 'collation', quote_ident(n.nspname), quote_ident(co.collname),
  (to_jsonb(co) - 'oid' - 'collname' - 'collnamespace' - 'collowner' - 'collversion')::text, NULL
FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
WHERE {_user_ns()} AND {_not_extension('pg_collation', 'co.oid')}
UNION ALL
SELECT o.oid, 'operator', quote_ident(n.nspname),
  o.oprname || '(' || coalesce(format_type(nullif(o.oprleft, 0), NULL), 'NONE') || ', '
    || coalesce(format_type(nullif(o.oprright, 0), NULL), 'NONE') || ')',
  o.oprcode::regprocedure::text || ' ' || format_type(o.oprresult, NULL), NULL
FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
WHERE {_user_ns()} AND {_not_extension('pg_operator', 'o.oid')}
UNION ALL
SELECT ca.oid, 'cast', '', '(' || format_type(ca.castsource, NULL) || ' AS '
    || format_type(ca.casttarget, NULL) || ')',
  concat_ws(' ', nullif(ca.castfunc, 0)::regprocedure::text, ca.castcontext, ca.castmethod), NULL
FROM pg_cast ca WHERE ca.oid >= 16384 AND {_not_extension('pg_cast', 'ca.oid')}
  AND NOT EXISTS (SELECT 1 FROM pg_depend i WHERE i.classid = 'pg_cast'::regclass
                  AND i.objid = ca.oid AND i.deptype = 'i')  -- a range's multirange cast
UNION ALL
SELECT t.oid, 'text search configuration', quote_ident(n.nspname), quote_ident(t.cfgname),
  (SELECT prsname FROM pg_ts_parser WHERE oid = t.cfgparser), NULL
FROM pg_ts_config t JOIN pg_namespace n ON n.oid = t.cfgnamespace
WHERE {_user_ns()} AND {_not_extension('pg_ts_config', 't.oid')}
UNION ALL
SELECT t.oid, 'text search dictionary', quote_ident(n.nspname), quote_ident(t.dictname),
  t.dictinitoption, NULL
FROM pg_ts_dict t JOIN pg_namespace n ON n.oid = t.dictnamespace
WHERE {_user_ns()} AND {_not_extension('pg_ts_dict', 't.oid')}
UNION ALL
SELECT p.oid, 'publication', '', quote_ident(p.pubname),
  (to_jsonb(p) - 'oid' - 'pubname' - 'pubowner')::text, NULL FROM pg_publication p"""


# ── owners and grants (read only with --privileges) ──────────────────────────────────────
# Each object's owner and its effective ACL (a NULL acl is its acldefault), one entry
# "grantee=PRIVILEGE" ("*" when grantable) per privilege, the owner written "(owner)": an
# ALTER … OWNER TO carries the owner's entries to the new owner, so entries relative to the
# owner survive it. `base` is what the object has with no GRANT at all (acldefault; empty for
# a column and for default privileges in a schema). Grantors are not compared.

def _acl_entries(acl: str, owner: str) -> str:
    return (f"(SELECT json_agg(CASE WHEN x.grantee = {owner} THEN '(owner)' "
            "WHEN x.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(x.grantee)) END "
            "|| '=' || x.privilege_type || CASE WHEN x.is_grantable THEN '*' ELSE '' END) "
            f"FROM aclexplode({acl}) x)")


def _acl_columns(what: str, owner: str, acl: str, base: str | None) -> str:
    """owner, acl and base columns of one grants row (`acl` NULL means acldefault)."""
    default = base or "NULL"
    return (f"quote_ident(pg_get_userbyid({owner})) AS owner, "
            f"{_acl_entries(f'coalesce({acl}, {default})', owner)} AS acl, "
            f"{_acl_entries(default, owner) if base else 'NULL'} AS base, '{what}' AS what")


# acldefault's object codes: 's' for a sequence, 'r' for other relations; default privileges
# in a schema start from nothing, global ones from the role's acldefault
_RELATION_ACLDEFAULT = ("acldefault((CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::\"char\", "
                        "c.relowner)")
_DEFAULT_ACLDEFAULT = ("CASE WHEN d.defaclnamespace = 0 THEN acldefault((CASE d.defaclobjtype "
                       "WHEN 'S' THEN 's' ELSE d.defaclobjtype END)::\"char\", d.defaclrole) END")


def _query_grants(excluded: str) -> str:
    relation = ("CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' "
                "WHEN 'm' THEN 'view' WHEN 'f' THEN 'foreign_table' ELSE 'table' END")
    return f"""
SELECT c.relkind AS relkind, quote_ident(n.nspname) AS schema, quote_ident(c.relname) AS name,
  NULL AS args, NULL AS column, {relation} AS kind, EXISTS (SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND c.relkind = 'S'
      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) AS linked,
  {_acl_columns('relation', 'c.relowner', 'c.relacl',
                _RELATION_ACLDEFAULT)}
{_relations("'r', 'p', 'v', 'm', 'S', 'f'", excluded)}
UNION ALL
SELECT c.relkind, quote_ident(n.nspname), quote_ident(c.relname), NULL, quote_ident(a.attname),
  'column', false, {_acl_columns('column', 'c.relowner', 'a.attacl', None)}
{_relations("'r', 'p', 'v', 'm'", excluded, _COLUMN_JOINS, " AND a.attacl IS NOT NULL")}
UNION ALL
SELECT p.prokind, quote_ident(n.nspname), quote_ident(p.proname),
  pg_get_function_identity_arguments(p.oid), NULL, 'function', false,
  {_acl_columns('function', 'p.proowner', 'p.proacl', "acldefault('f', p.proowner)")}
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prokind IN ('f', 'p') AND {_user_ns()}
UNION ALL
SELECT t.typtype, quote_ident(n.nspname), quote_ident(t.typname), NULL, NULL, 'type', false,
  {_acl_columns('type', 't.typowner', 't.typacl', "acldefault('T', t.typowner)")}
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE {_user_ns()} AND t.typtype IN ('e', 'c', 'd', 'r')
UNION ALL
SELECT 'n', '', quote_ident(n.nspname), NULL, NULL, 'schema', false,
  {_acl_columns('schema', 'n.nspowner', 'n.nspacl', "acldefault('n', n.nspowner)")}
FROM pg_namespace n WHERE {_user_ns()}
UNION ALL
SELECT d.defaclobjtype, coalesce(quote_ident(n.nspname), ''), '', NULL, NULL, 'default', false,
  {_acl_columns('default', 'd.defaclrole', 'd.defaclacl', _DEFAULT_ACLDEFAULT)}
FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
UNION ALL
SELECT 's', '', quote_ident(s.srvname), NULL, NULL, 'server', false,
  {_acl_columns('server', 's.srvowner', 's.srvacl', "acldefault('S', s.srvowner)")}
FROM pg_foreign_server s
UNION ALL
SELECT 'w', '', quote_ident(w.fdwname), NULL, NULL, 'wrapper', false,
  {_acl_columns('wrapper', 'w.fdwowner', 'w.fdwacl', "acldefault('F', w.fdwowner)")}
FROM pg_foreign_data_wrapper w"""


# One array a dependency, [catalog, oid, subid, its catalog, oid, subid]: a third less JSON
# than objects (~2,500 of them for 200 tables).
_DEPENDS_SQL = """
SELECT coalesce(json_agg(json_build_array(d.classid::regclass::text, d.objid, d.objsubid,
  d.refclassid::regclass::text, d.refobjid, d.refobjsubid)), '[]')
FROM pg_depend d WHERE d.deptype IN ('n', 'a') AND d.objid >= 16384 AND d.refobjid >= 16384"""


def _excluded_tables(excluded: frozenset[tuple[str, str]]) -> str:
    if not excluded:
        return ""
    pairs = ", ".join(f"({quote_literal(s)}, {quote_literal(t)})" for s, t in sorted(excluded))
    return f" AND (n.nspname, c.relname) NOT IN ({pairs})"


def read_schema_model(session: Session, excluded: frozenset[tuple[str, str]] = frozenset(),
                      privileges: bool = False) -> SchemaModel:
    """The schema of the session's database (see catalog_json)."""
    return model_from_catalog(catalog_rows(catalog_json(session, excluded, privileges)))


# The catalog's second statement reads the kinds from this one on (CATALOG_KINDS' order) and
# the dependencies: the first one's answer (tables and columns: most of the JSON and of the
# records) is parsed while the server works on these (~8 ms of a 200-table diff --sql's ~14 ms
# of parsing after the last catalog arrived).
_SECOND_STATEMENT_FROM = "constraint"


def model_catalog_statements(excluded: frozenset[tuple[str, str]] = frozenset(),
                             privileges: bool = False) -> list[str]:
    """The two statements that return every kind's rows, each as one JSON object (owners and
    grants only with `privileges`)."""
    where = _excluded_tables(excluded)
    parts = {name: f"(SELECT coalesce(json_agg(q), '[]') FROM ({kind.query(where)}) q)"
             for name, kind in CATALOG_KINDS.items() if privileges or not kind.privileges}
    parts["depends"] = f"({_DEPENDS_SQL})"
    fields = [f"'{name}', {sql}" for name, sql in parts.items()]
    split = list(parts).index(_SECOND_STATEMENT_FROM)
    halves = [fields[:split], fields[split:]]
    # pg_depend's extension members found once, not by ~20 scans of it (one a kind): ~3 ms
    # less backend CPU for 200 tables
    return ["WITH extension_owned AS MATERIALIZED (SELECT classid, objid FROM pg_depend "
            f"WHERE deptype = 'e') SELECT json_build_object({', '.join(half)})"
            for half in halves]


def model_catalog_sql(excluded: frozenset[tuple[str, str]] = frozenset(),
                      privileges: bool = False) -> str:
    """The catalog's statements as one text (what a kept catalog is keyed by)."""
    return ";\n".join(model_catalog_statements(excluded, privileges))


def catalog_json(session: Session, excluded: frozenset[tuple[str, str]] = frozenset(),
                 privileges: bool = False, on_part: Callable[[str], None] | None = None
                 ) -> str:
    """The model_catalog_statements() rows of the session's database as JSON text (an array
    of their answers), read with an empty search_path (set in the same round trip) so that
    every name in a definition is schema-qualified. Each answer is handed to `on_part` as it
    arrives, before the next one is read."""
    statements = model_catalog_statements(excluded, privileges)
    statements[0] = f"SET search_path = ''; {statements[0]}"
    parts = []
    for lines in session.stream(statements):
        parts.append("\n".join(lines))
        if on_part is not None:
            on_part(parts[-1])
    return "[" + ",\n".join(parts) + "]"


def catalog_rows(text: str) -> dict[str, Any]:
    """catalog_json()'s text as one mapping: kind → rows."""
    rows: dict[str, Any] = {}
    for part in json.loads(text):
        rows.update(part)
    return rows


def model_from_catalog(rows: Mapping[str, Any]) -> SchemaModel:
    """Pure: the catalog's JSON rows → objects, with pg_depend turned into keys."""
    objects: dict[str, DbObject] = {}
    by_oid: dict[tuple[str, int, int], str] = {}
    read_catalog_objects(rows, objects, by_oid)
    return link_catalog_objects(objects, by_oid, rows.get("depends", []))


def read_catalog_objects(rows: Mapping[str, Any], objects: dict[str, DbObject],
                         by_oid: dict[tuple[str, int, int], str]) -> None:
    """Pure: the objects of the kinds in `rows`, added to `objects`, and the catalog oids
    that name them to `by_oid` (model_from_catalog, in steps)."""
    for name, kind in CATALOG_KINDS.items():
        for row in rows.get(name, []):
            for obj, oids in kind.read(row):
                objects[obj.key] = obj
                for oid in oids:
                    by_oid.setdefault(oid, obj.key)


def link_catalog_objects(objects: dict[str, DbObject], by_oid: dict[tuple[str, int, int], str],
                         dependencies: Sequence[Sequence[Any]]) -> SchemaModel:
    """Pure: the model of the objects read, with pg_depend's rows turned into keys."""
    for key in [k for k, o in objects.items() if o.kind in HANGERS_ON and o.parent
                and o.parent not in objects]:
        del objects[key]  # an owner or grants of something the model does not hold
    depends: dict[str, set[str]] = {}
    for catalog, oid, sub, ref_catalog, ref_oid, ref_sub in dependencies:
        source = by_oid.get((catalog, oid, sub)) or by_oid.get((catalog, oid, 0))
        target = by_oid.get((ref_catalog, ref_oid, ref_sub)) or by_oid.get((ref_catalog, ref_oid, 0))
        if source and target and source != target and not _owned_sequence(objects, source, target):
            depends.setdefault(source, set()).add(target)
    for key, obj in objects.items():
        needs = depends.get(key, set())
        if obj.parent in objects:
            needs.add(obj.parent)
        if obj.depends:  # set by the reader (an object's grants need its owner set first)
            needs |= obj.depends & objects.keys()
        if needs:
            # set on the record the reader just made, which nothing else holds yet: a second
            # DbObject per object (evolve() ~15 µs, a direct call ~3 µs) cost ~10 ms a side
            # for 200 tables in diff --sql's profile
            object.__setattr__(obj, "depends", frozenset(needs))
    return SchemaModel(objects=objects)


HANGERS_ON = frozenset({"owner", "acl"})  # kinds that exist only on another object


def _owned_sequence(objects: Mapping[str, DbObject], source: str, target: str) -> bool:
    """A sequence OWNED BY a column depends on it only for DROP ... CASCADE; its creation
    comes first (the column's default needs it), the ownership is set at the end."""
    obj = objects[source]
    return obj.kind == "sequence" and obj.facts.get("owned_by") is not None \
        and target.startswith("column ")


# ── reading each kind of object ───────────────────────────────────────────────────────────

def _row_object(kind: str, row: Mapping[str, Any], key_name: str, facts: Mapping[str, Any],
                parent: str = "") -> DbObject:
    schema = row.get("schema") or ""
    return DbObject(kind=kind, key=f"{kind} {key_name}", schema=schema, name=row["name"],
                    parent=parent, facts=facts, comment=row.get("comment"))


def qname(schema: str, name: str) -> str:
    """Names arrive quoted as needed (the catalog queries apply quote_ident)."""
    return f"{schema}.{name}" if schema else name


def _table_key(row: Mapping[str, Any]) -> str:
    return f"table {qname(row['schema'], row['table'])}"


Read = list[tuple[DbObject, list[tuple[str, int, int]]]]


def _read_schema(row: Mapping[str, Any]) -> Read:
    obj = _row_object("schema", row, row["name"], {})
    return [(evolve(obj, schema=""), [("pg_namespace", row["oid"], 0)])]


def _read_extension(row: Mapping[str, Any]) -> Read:
    obj = _row_object("extension", {**row, "schema": ""}, row["name"],
                      {"schema": row["schema"]})
    return [(obj, [("pg_extension", row["oid"], 0)])]


def _read_type(row: Mapping[str, Any]) -> Read:
    facts = {k: row[k] for k in ("type", "labels", "attributes", "base", "default", "notnull",
                                 "checks", "range")}
    obj = _row_object("type", row, qname(row["schema"], row["name"]), facts)
    return [(obj, [("pg_type", row["oid"], 0), ("pg_type", row["array_oid"], 0)])]


def _read_sequence(row: Mapping[str, Any]) -> Read:
    facts = {k: row[k] for k in ("type", "start", "increment", "min", "max", "cache", "cycle",
                                 "owned_by")}
    obj = _row_object("sequence", row, qname(row["schema"], row["name"]), facts)
    return [(obj, [("pg_class", row["oid"], 0)])]


def _read_table(row: Mapping[str, Any]) -> Read:
    """A table; `columns` is its column order, inherited ones included (what SELECT * and
    COPY without a column list see): it is compared, as pg_dump's CREATE TABLE shows it."""
    facts = {k: row[k] for k in ("relkind", "persistence", "rls", "force_rls", "options",
                                 "partition_by", "bound", "parents", "columns")}
    obj = _row_object("table", row, qname(row["schema"], row["name"]), facts)
    return [(obj, [("pg_class", row["oid"], 0), ("pg_type", row["type_oid"], 0)])]


def _read_column(row: Mapping[str, Any]) -> Read:
    """A column and, apart, its default: a default can change (or be dropped for a function
    being replaced) without touching the column. Inherited columns belong to their parent."""
    if not row["local"] or row["partition"]:
        return []
    table = _table_key(row)
    name = f"{qname(row['schema'], row['table'])}.{row['name']}"
    facts = {k: row[k] for k in ("type", "notnull", "identity", "generated", "expression",
                                 "collation")}
    column = DbObject(kind="column", key=f"column {name}", schema=row["schema"], name=row["name"],
                      parent=table, facts=facts, comment=row.get("comment"))
    found: Read = [(column, [("pg_class", row["oid"], row["attnum"])])]
    if row["default"] is not None:
        default = DbObject(kind="default", key=f"default {name}", schema=row["schema"],
                           name=row["name"], parent=table, facts={"expr": row["default"]})
        found.append((default, [("pg_attrdef", row["default_oid"], 0)]))
    return found


def _read_constraint(row: Mapping[str, Any]) -> Read:
    name = f"{row['name']} on {qname(row['schema'], row['table'])}"
    obj = _row_object("constraint", row, name, {"type": row["type"], "def": row["def"]},
                      _table_key(row))
    oids = [("pg_constraint", row["oid"], 0)]
    if row["index_oid"] and row["type"] in ("p", "u", "x"):
        oids.append(("pg_class", row["index_oid"], 0))
    return [(obj, oids)]


def _read_index(row: Mapping[str, Any]) -> Read:
    obj = _row_object("index", row, qname(row["schema"], row["name"]), {"def": row["def"]},
                      f"{'view' if row['table_kind'] == 'm' else 'table'} "
                      f"{qname(row['schema'], row['table'])}")
    return [(obj, [("pg_class", row["oid"], 0)])]


def _read_view(row: Mapping[str, Any]) -> Read:
    obj = _row_object("view", row, qname(row["schema"], row["name"]),
                      {"relkind": row["relkind"], "def": row["def"], "options": row["options"]})
    oids = [("pg_class", row["oid"], 0), ("pg_type", row["type_oid"], 0)]
    if row["rule_oid"]:
        oids.append(("pg_rewrite", row["rule_oid"], 0))
    return [(obj, oids)]


def _read_function(row: Mapping[str, Any]) -> Read:
    name = f"{qname(row['schema'], row['name'])}({row['args']})"
    obj = _row_object("function", row, name, {k: row[k] for k in ("prokind", "result", "def")})
    return [(obj, [("pg_proc", row["oid"], 0)])]


def _read_trigger(row: Mapping[str, Any]) -> Read:
    name = f"{row['name']} on {qname(row['schema'], row['table'])}"
    obj = _row_object("trigger", row, name, {"def": row["def"], "enabled": row["enabled"]},
                      _table_key(row))
    return [(obj, [("pg_trigger", row["oid"], 0)])]


def _read_policy(row: Mapping[str, Any]) -> Read:
    name = f"{row['name']} on {qname(row['schema'], row['table'])}"
    facts = {k: row[k] for k in ("cmd", "permissive", "roles", "using", "check")}
    obj = _row_object("policy", row, name, facts, _table_key(row))
    return [(obj, [("pg_policy", row["oid"], 0)])]


_DEFAULT_ACL_OBJECTS = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES",
                        "n": "SCHEMAS"}
_RELATION_WORDS = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW",
                   "S": "SEQUENCE", "f": "FOREIGN TABLE"}


def _read_grants(row: Mapping[str, Any]) -> Read:
    """An object's owner and ACL, as two objects ('owner table public.t', 'acl table
    public.t') that hang off it: the owner is reported with the object, the grants apart
    (as pg_dump's ACL entries). An object the model does not hold (an extension's, a table's
    row type) drops them again (model_from_catalog)."""
    schema, name, code = row["schema"], row["name"], row["relkind"]
    acl = sorted(row["acl"] or [])
    base = sorted(row["base"] or [])
    if row["what"] == "default":
        role = row["owner"]  # quote_ident'ed by the query, as every name
        where = f" IN SCHEMA {schema}" if schema else ""
        label = f"default privileges for role {row['owner']}{where.lower()} on " \
            f"{_DEFAULT_ACL_OBJECTS[code].lower()}"
        facts = {"prefix": f"ALTER DEFAULT PRIVILEGES FOR ROLE {role}{where} ",
                 "on": _DEFAULT_ACL_OBJECTS[code], "columns": "", "owner": row["owner"],
                 "acl": acl, "base": base}
        obj = DbObject(kind="acl", key=f"acl {label}", schema=schema, name=label,
                       parent=f"schema {schema}" if schema else "", facts=facts)
        return [(obj, [])]
    target = f"{row['kind']} {qname(schema, name)}"
    if row["args"] is not None:
        target += f"({row['args']})"
    word = {"relation": _RELATION_WORDS.get(code, "TABLE"),
            "function": "PROCEDURE" if code == "p" else "FUNCTION",
            "type": "DOMAIN" if code == "d" else "TYPE", "server": "SERVER",
            "wrapper": "FOREIGN DATA WRAPPER"}.get(row["what"], "SCHEMA")
    grant_word = ("SEQUENCE" if code == "S" else "TABLE") if row["what"] == "relation" else \
        "FOREIGN SERVER" if row["what"] == "server" else word
    on = f"{grant_word} {ident_of(target)}"
    if row["what"] == "column":
        target = f"column {qname(schema, name)}.{row['column']}"
        on = f"TABLE {qname(schema, name)}"
    found: Read = []
    if row["what"] != "column":
        owner = DbObject(kind="owner", key=f"owner {target}", schema=schema, name=name,
                         parent=target, facts={"alter": f"{word} {ident_of(target)}",
                                               "owner": row["owner"],
                                               "linked": bool(row.get("linked"))})
        found.append((owner, []))
    facts = {"prefix": "", "on": on, "columns": f" ({row['column']})" if row["column"] else "",
             "owner": row["owner"], "acl": acl, "base": base}
    grants = DbObject(kind="acl", key=f"acl {target}", schema=schema, name=name, parent=target,
                      facts=facts, depends=frozenset({f"owner {target}"} if found else ()))
    return [*found, (grants, [])]


def ident_of(key: str) -> str:
    """A key's name part: 'public.f(integer)' of 'function public.f(integer)'."""
    return key.split(" ", 1)[1]


def _read_wrapper(row: Mapping[str, Any]) -> Read:
    facts = {k: row[k] for k in ("handler", "validator", "options")}
    obj = _row_object("wrapper", {**row, "schema": ""}, row["name"], facts)
    return [(obj, [("pg_foreign_data_wrapper", row["oid"], 0)])]


def _read_server(row: Mapping[str, Any]) -> Read:
    facts = {k: row[k] for k in ("wrapper", "type", "version", "options")}
    obj = _row_object("server", {**row, "schema": ""}, row["name"], facts)
    if row["extension"]:  # its wrapper is the extension's (not in the model)
        obj = evolve(obj, depends=frozenset({f"extension {row['extension']}"}))
    return [(obj, [("pg_foreign_server", row["oid"], 0)])]


def _read_foreign_table(row: Mapping[str, Any]) -> Read:
    """A foreign table, its columns (their defaults and checks are its own: their oids name
    it, so what they use comes before it) and its row type."""
    columns = [{k: v for k, v in c.items() if k != "default_oid"} for c in row["columns"] or []]
    checks = [{"name": c["name"], "def": c["def"]} for c in row["checks"] or []]
    facts = {"server": row["server"], "options": row["options"], "bound": row["bound"],
             "parents": row["parents"], "columns": columns, "checks": checks}
    obj = _row_object("foreign_table", row, qname(row["schema"], row["name"]), facts)
    oids = [("pg_class", row["oid"], 0), ("pg_type", row["type_oid"], 0)]
    oids += [("pg_attrdef", c["default_oid"], 0) for c in row["columns"] or []
             if c["default_oid"]]
    oids += [("pg_constraint", c["oid"], 0) for c in row["checks"] or []]
    return [(obj, oids)]


def _read_event_trigger(row: Mapping[str, Any]) -> Read:
    facts = {k: row[k] for k in ("event", "tags", "function", "enabled")}
    obj = _row_object("event_trigger", {**row, "schema": ""}, row["name"], facts)
    return [(obj, [("pg_event_trigger", row["oid"], 0)])]


_OTHER_CATALOGS = {"rule": "pg_rewrite", "statistics": "pg_statistic_ext", "aggregate": "pg_proc",
                   "collation": "pg_collation", "operator": "pg_operator", "cast": "pg_cast",
                   "text search configuration": "pg_ts_config",
                   "text search dictionary": "pg_ts_dict", "publication": "pg_publication"}


def _read_other(row: Mapping[str, Any]) -> Read:
    name = f"{row['type']} {qname(row['schema'], row['name'])}"
    obj = _row_object("other", row, name, {k: row[k] for k in ("type", "def", "drop")})
    catalog = _OTHER_CATALOGS[row["type"]]
    return [(obj, [(catalog, row["oid"], 0)])]


@record(frozen=True)
class CatalogKind:
    """How one kind of object is read: its catalog query (given the excluded tables' condition)
    and how one of its rows becomes objects (with the catalog oids that name them)."""

    query: Callable[[str], str]
    read: Callable[[Mapping[str, Any]], Read]
    privileges: bool = False  # read only with --privileges (owners and grants)


# Read in this order (a default is read with its column); the planner's OBJECT_KINDS (§12)
# says how each kind is created, dropped and altered.
CATALOG_KINDS: dict[str, CatalogKind] = {
    "schema": CatalogKind(_query_schemas, _read_schema),
    "extension": CatalogKind(_query_extensions, _read_extension),
    "type": CatalogKind(_query_types, _read_type),
    "sequence": CatalogKind(_query_sequences, _read_sequence),
    "function": CatalogKind(_query_functions, _read_function),
    "table": CatalogKind(_query_tables, _read_table),
    "column": CatalogKind(_query_columns, _read_column),
    "constraint": CatalogKind(_query_constraints, _read_constraint),
    "index": CatalogKind(_query_indexes, _read_index),
    "view": CatalogKind(_query_views, _read_view),
    "trigger": CatalogKind(_query_triggers, _read_trigger),
    "policy": CatalogKind(_query_policies, _read_policy),
    "wrapper": CatalogKind(_query_wrappers, _read_wrapper),
    "server": CatalogKind(_query_servers, _read_server),
    "foreign_table": CatalogKind(_query_foreign_tables, _read_foreign_table),
    "event_trigger": CatalogKind(_query_event_triggers, _read_event_trigger),
    "other": CatalogKind(_query_others, _read_other),
    "grants": CatalogKind(_query_grants, _read_grants, privileges=True),
}


# ════════════════════════════════════════════════════════════════════════════════════════════
# §12 Schema planner
# Pure: plan_schema(from, to) orders the DDL that turns one model (§11) into the other:
# creates in dependency order, drops in reverse, alters in place where PostgreSQL can.
# Each object kind is one registry entry (how to create, drop and alter it).
# ════════════════════════════════════════════════════════════════════════════════════════════

@record(frozen=True)
class PlannedStatement:
    """One DDL statement of a plan, for the object `key`."""

    sql: str
    key: str
    destructive: bool = False
    transactional: bool = True


@record(frozen=True)
class SchemaPlan:
    statements: tuple[PlannedStatement, ...]
    unsupported: tuple[str, ...] = ()   # objects the plan cannot express, with the reason
    suggestions: tuple[str, ...] = ()   # drop+add pairs that look like renames

    @property
    def destructive(self) -> list[PlannedStatement]:
        return [s for s in self.statements if s.destructive]

    def script(self) -> str:
        """The statements as one SQL script (check_function_bodies off, as pg_dump does: a SQL
        function may name a table that the same plan creates later)."""
        if not self.statements:
            return ""
        head = "SET check_function_bodies = false;\n" if any(
            s.sql.startswith("CREATE OR REPLACE FUNCTION") or
            s.sql.startswith("CREATE OR REPLACE PROCEDURE") for s in self.statements) else ""
        return head + "".join(f"{s.sql.rstrip().rstrip(';')};\n" for s in self.statements)


def ident(obj: DbObject) -> str:
    """How DDL names the object: its key without the kind ('public.f(integer)', 'c on public.t')."""
    return obj.key.split(" ", 1)[1]


def _table_of(obj: DbObject) -> str:
    return obj.parent.split(" ", 1)[1]


@record(frozen=True)
class Alteration:
    """How an object changes in place. `disturbs`: the kinds of its dependents that must be
    dropped first and created again (views, policies and triggers over a column whose type
    changes)."""

    statements: tuple[str, ...]
    disturbs: frozenset[str] = frozenset()
    destructive: bool = False
    lossy: frozenset[str] = frozenset()  # of a destructive one, the statements that lose data
                                         # (empty: all of them)

    def loses(self, statement: str) -> bool:
        return self.destructive and (not self.lossy or statement in self.lossy)


_NO_CHANGE = Alteration(statements=())
# Dependents PostgreSQL refuses to keep over a column whose type changes (a default is
# dropped and set again: it may not cast to the new type).
_DISTURBED_KINDS = frozenset({"view", "policy", "trigger", "default"})
# …and over a column whose enum type is swapped for a new one (their text names the type).
_SWAP_DISTURBED = _DISTURBED_KINDS | {"default", "constraint", "index"}


def _literal_list(values: Sequence[str]) -> str:
    return ", ".join(quote_literal(v) for v in values)


def _options(options: Sequence[str] | None) -> str:
    return f" WITH ({', '.join(options)})" if options else ""


def _create_schema(obj: DbObject, model: SchemaModel) -> list[str]:
    return [f"CREATE SCHEMA {ident(obj)}"]


def _create_extension(obj: DbObject, model: SchemaModel) -> list[str]:
    return [(f"CREATE EXTENSION IF NOT EXISTS {ident(obj)} WITH SCHEMA "
            f"{obj.facts['schema']}")]


def _alter_extension(old: DbObject, new: DbObject) -> Alteration | None:
    return Alteration(((f"ALTER EXTENSION {ident(new)} SET SCHEMA "
                       f"{new.facts['schema']}"),))


def _create_type(obj: DbObject, model: SchemaModel) -> list[str]:
    f, name = obj.facts, ident(obj)
    if f["type"] == "e":
        return [f"CREATE TYPE {name} AS ENUM ({_literal_list(f['labels'] or [])})"]
    if f["type"] == "c":
        return [f"CREATE TYPE {name} AS ({', '.join(_attribute(a) for a in f['attributes'] or [])})"]
    if f["type"] == "r":
        r = f["range"]
        extra = "".join(f", {k.upper() if k == 'canonical' else 'SUBTYPE_DIFF'} = {r[k]}"
                        for k in ("canonical", "subdiff") if r[k])
        return [f"CREATE TYPE {name} AS RANGE (SUBTYPE = {r['subtype']}{extra})"]
    text = f"CREATE DOMAIN {name} AS {f['base']}"
    text += f" DEFAULT {f['default']}" if f["default"] is not None else ""
    text += " NOT NULL" if f["notnull"] else ""
    text += "".join(f" CONSTRAINT {c['name']} {c['def']}" for c in f["checks"] or [])
    return [text]


def _attribute(attr: Mapping[str, Any]) -> str:
    collate = f" COLLATE {attr['collation']}" if attr.get("collation") else ""
    return f"{attr['name']} {attr['type']}{collate}"


def _drop_type(obj: DbObject) -> list[str]:
    return [f"DROP {'DOMAIN' if obj.facts['type'] == 'd' else 'TYPE'} {ident(obj)}"]


def _alter_type(old: DbObject, new: DbObject) -> Alteration | None:
    alter = {"e": _alter_enum, "d": _alter_domain, "c": _alter_composite}.get(new.facts["type"])
    if old.facts["type"] != new.facts["type"] or alter is None:
        return None
    return alter(old, new)


def _alter_enum(old: DbObject, new: DbObject) -> Alteration | None:
    """Labels can be added anywhere (ADD VALUE … BEFORE/AFTER); removing or reordering needs
    a new type."""
    before, after = list(old.facts["labels"] or []), list(new.facts["labels"] or [])
    if [label for label in after if label in before] != before:
        return None
    statements = []
    for index, label in enumerate(after):
        if label in before:
            continue
        place = (f" AFTER {quote_literal(after[index - 1])}" if index else
                 f" BEFORE {quote_literal(after[1])}" if len(after) > 1 else "")
        statements.append(f"ALTER TYPE {ident(new)} ADD VALUE {quote_literal(label)}{place}")
        before.insert(index, label)
    return Alteration(tuple(statements))


def _alter_domain(old: DbObject, new: DbObject) -> Alteration | None:
    o, n, name = old.facts, new.facts, ident(new)
    if o["base"] != n["base"]:
        return None
    out = []
    if o["default"] != n["default"]:
        out.append(f"ALTER DOMAIN {name} " + (f"SET DEFAULT {n['default']}"
                                              if n["default"] is not None else "DROP DEFAULT"))
    if o["notnull"] != n["notnull"]:
        out.append(f"ALTER DOMAIN {name} {'SET' if n['notnull'] else 'DROP'} NOT NULL")
    old_checks = {c["name"]: c["def"] for c in o["checks"] or []}
    new_checks = {c["name"]: c["def"] for c in n["checks"] or []}
    for cname, definition in old_checks.items():
        if new_checks.get(cname) != definition:
            out.append(f"ALTER DOMAIN {name} DROP CONSTRAINT {cname}")
    for cname, definition in new_checks.items():
        if old_checks.get(cname) != definition:
            out.append(f"ALTER DOMAIN {name} ADD CONSTRAINT {cname} {definition}")
    return Alteration(tuple(out))


def _alter_composite(old: DbObject, new: DbObject) -> Alteration | None:
    before = {a["name"]: a for a in old.facts["attributes"] or []}
    after = {a["name"]: a for a in new.facts["attributes"] or []}
    actions = [f"DROP ATTRIBUTE {a}" for a in before if a not in after]
    for name, attr in after.items():
        if name not in before:
            actions.append(f"ADD ATTRIBUTE {_attribute(attr)}")
        elif before[name] != attr:
            collate = f" COLLATE {attr['collation']}" if attr.get("collation") else ""
            actions.append(f"ALTER ATTRIBUTE {name} TYPE {attr['type']}{collate}")
    return Alteration((f"ALTER TYPE {ident(new)} {', '.join(actions)}",),
                      disturbs=_DISTURBED_KINDS)


_SEQUENCE_CLAUSES = (("type", "AS {}"), ("increment", "INCREMENT BY {}"), ("min", "MINVALUE {}"),
                     ("max", "MAXVALUE {}"), ("start", "START WITH {}"), ("cache", "CACHE {}"))


def _sequence_clauses(facts: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = [pattern.format(facts[k]) for k, pattern in _SEQUENCE_CLAUSES if k in keys]
    if "cycle" in keys:
        parts.append("CYCLE" if facts["cycle"] else "NO CYCLE")
    return " ".join(parts)


def _create_sequence(obj: DbObject, model: SchemaModel) -> list[str]:
    keys = [k for k, _ in _SEQUENCE_CLAUSES] + ["cycle"]
    return [f"CREATE SEQUENCE {ident(obj)} {_sequence_clauses(obj.facts, keys)}"]


def _drop_sequence(obj: DbObject) -> list[str]:
    # a sequence owned by a column goes with it: the column may be dropped before
    owned = " IF EXISTS" if obj.facts.get("owned_by") else ""
    return [f"DROP SEQUENCE{owned} {ident(obj)}"]


def _alter_sequence(old: DbObject, new: DbObject) -> Alteration | None:
    keys = [k for k in ("type", "increment", "min", "max", "start", "cache", "cycle")
            if old.facts[k] != new.facts[k]]
    return Alteration((f"ALTER SEQUENCE {ident(new)} {_sequence_clauses(new.facts, keys)}",)
                      if keys else ())


def _late_sequence(old: DbObject | None, new: DbObject) -> list[str]:
    """Ownership is set once the owning column exists (the plan's last statements)."""
    owner = new.facts.get("owned_by")
    if (old.facts.get("owned_by") if old else None) == owner:
        return []
    return [f"ALTER SEQUENCE {ident(new)} OWNED BY {owner or 'NONE'}"]


def column_definition(column: DbObject, default: DbObject | None) -> str:
    f = column.facts
    text = f"{column.name} {f['type']}"
    text += f" COLLATE {f['collation']}" if f["collation"] else ""
    if f["generated"]:
        text += f" GENERATED ALWAYS AS ({f['expression']}) STORED"
    if f["identity"]:
        text += f" GENERATED {'ALWAYS' if f['identity'] == 'a' else 'BY DEFAULT'} AS IDENTITY"
    text += f" DEFAULT {default.facts['expr']}" if default is not None else ""
    return text + (" NOT NULL" if f["notnull"] else "")


def table_columns(table: DbObject, model: SchemaModel) -> list[DbObject]:
    prefix = f"column {ident(table)}."
    return [o for k, o in model.objects.items() if k.startswith(prefix) and o.parent == table.key]


def _create_table(obj: DbObject, model: SchemaModel) -> list[str]:
    """The table with its own columns and their defaults (constraints, indexes and the rest
    are objects of their own, created after it)."""
    f = obj.facts
    unlogged = "UNLOGGED " if f["persistence"] == "u" else ""
    columns = [column_definition(c, model.objects.get(f"default {ident(c)}"))
               for c in table_columns(obj, model)]
    body = ",\n    ".join(columns)
    if f["bound"] is not None:
        text = f"CREATE {unlogged}TABLE {ident(obj)} PARTITION OF {f['parents'][0]} {f['bound']}"
    else:
        text = f"CREATE {unlogged}TABLE {ident(obj)} (\n    {body}\n)" if columns else \
            f"CREATE {unlogged}TABLE {ident(obj)} ()"
        text += f" INHERITS ({', '.join(f['parents'])})" if f["parents"] else ""
    text += f" PARTITION BY {f['partition_by']}" if f["partition_by"] else ""
    out = [text + _options(f["options"])]
    if f["rls"]:
        out.append(f"ALTER TABLE {ident(obj)} ENABLE ROW LEVEL SECURITY")
    if f["force_rls"]:
        out.append(f"ALTER TABLE {ident(obj)} FORCE ROW LEVEL SECURITY")
    return out


def _drop_table(obj: DbObject) -> list[str]:
    return [f"DROP TABLE {ident(obj)}"]


def _alter_table(old: DbObject, new: DbObject) -> Alteration | None:
    o, n, name = old.facts, new.facts, ident(new)
    if any(o[k] != n[k] for k in ("relkind", "partition_by", "bound")) or \
            (n["bound"] is not None and o["parents"] != n["parents"]):
        return None
    out = []
    if o["persistence"] != n["persistence"]:
        out.append(f"ALTER TABLE {name} SET {'UNLOGGED' if n['persistence'] == 'u' else 'LOGGED'}")
    if o["rls"] != n["rls"]:
        out.append(f"ALTER TABLE {name} {'ENABLE' if n['rls'] else 'DISABLE'} ROW LEVEL SECURITY")
    if o["force_rls"] != n["force_rls"]:
        out.append(f"ALTER TABLE {name} {'' if n['force_rls'] else 'NO '}FORCE ROW LEVEL SECURITY")
    before, after = set(o["options"] or []), set(n["options"] or [])
    gone = sorted({opt.split("=")[0] for opt in before - after} -
                  {opt.split("=")[0] for opt in after})
    if gone:
        out.append(f"ALTER TABLE {name} RESET ({', '.join(gone)})")
    if after - before:
        out.append(f"ALTER TABLE {name} SET ({', '.join(sorted(after - before))})")
    for parent in o["parents"] or []:
        if parent not in (n["parents"] or []):
            out.append(f"ALTER TABLE {name} NO INHERIT {parent}")
    for parent in n["parents"] or []:
        if parent not in (o["parents"] or []):
            out.append(f"ALTER TABLE {name} INHERIT {parent}")
    return Alteration(tuple(out))


def _create_column(obj: DbObject, model: SchemaModel) -> list[str]:
    default = model.objects.get(f"default {ident(obj)}")
    return [f"ALTER TABLE {_table_of(obj)} ADD COLUMN {column_definition(obj, default)}"]


def _drop_column(obj: DbObject) -> list[str]:
    return [f"ALTER TABLE {_table_of(obj)} DROP COLUMN {obj.name}"]


# Type changes that never lose data and need no USING (PostgreSQL casts them implicitly).
_WIDER = {("smallint", "integer"), ("smallint", "bigint"), ("integer", "bigint"),
          ("real", "double precision"), ("character varying", "text"), ("character", "text"),
          ("integer", "numeric"), ("bigint", "numeric"), ("smallint", "numeric"),
          ("timestamp without time zone", "timestamp with time zone")}
_TYPMOD = re.compile(r"^(.*)\((\d+)(?:,(\d+))?\)$")


def widening(old: str, new: str) -> bool:
    """Whether a column type change keeps every value as it is (varchar(10) → varchar(20) or
    text, integer → bigint, …): such changes are not destructive."""
    if (old, new) in _WIDER:
        return True
    a, b = _TYPMOD.match(old), _TYPMOD.match(new)
    if a and (a.group(1), new) in {("character varying", "text"), ("character", "text"),
                                   ("numeric", "numeric"), ("character varying",
                                                            "character varying")}:
        return not b
    if a and b and a.group(1) == b.group(1) and a.group(1) in ("character varying", "numeric"):
        return int(b.group(2)) >= int(a.group(2)) and \
            int(b.group(3) or 0) >= int(a.group(3) or 0) and \
            int(b.group(2)) - int(b.group(3) or 0) >= int(a.group(2)) - int(a.group(3) or 0)
    return False


def _alter_column(old: DbObject, new: DbObject) -> Alteration | None:
    o, n = old.facts, new.facts
    if o["generated"] != n["generated"] or o["expression"] != n["expression"]:
        return None
    head = f"ALTER TABLE {_table_of(new)} ALTER COLUMN {new.name}"
    out, disturbs, destructive = [], frozenset[str](), False
    if o["identity"] and o["identity"] != n["identity"]:
        out.append(f"{head} DROP IDENTITY")
    if o["type"] != n["type"] or o["collation"] != n["collation"]:
        collate = f" COLLATE {n['collation']}" if n["collation"] else ""
        using = "" if widening(o["type"], n["type"]) or o["type"] == n["type"] \
            else f" USING {new.name}::{n['type']}"
        out.append(f"{head} TYPE {n['type']}{collate}{using}")
        disturbs = _DISTURBED_KINDS
        destructive = o["type"] != n["type"] and not widening(o["type"], n["type"])
    if o["notnull"] != n["notnull"]:
        out.append(f"{head} {'SET' if n['notnull'] else 'DROP'} NOT NULL")
    if n["identity"] and o["identity"] != n["identity"]:
        kind = "ALWAYS" if n["identity"] == "a" else "BY DEFAULT"
        out.append(f"{head} ADD GENERATED {kind} AS IDENTITY")
    return Alteration(tuple(out), disturbs=disturbs, destructive=destructive)


def _create_default(obj: DbObject, model: SchemaModel) -> list[str]:
    return [(f"ALTER TABLE {_table_of(obj)} ALTER COLUMN {obj.name} "
            f"SET DEFAULT {obj.facts['expr']}")]


def _drop_default(obj: DbObject) -> list[str]:
    return [f"ALTER TABLE {_table_of(obj)} ALTER COLUMN {obj.name} DROP DEFAULT"]


def _alter_default(old: DbObject, new: DbObject) -> Alteration | None:
    return Alteration(tuple(_create_default(new, SchemaModel(objects={}))))


def _create_constraint(obj: DbObject, model: SchemaModel) -> list[str]:
    return [(f"ALTER TABLE {_table_of(obj)} ADD CONSTRAINT {obj.name} "
            f"{obj.facts['def']}")]


def _drop_constraint(obj: DbObject) -> list[str]:
    return [f"ALTER TABLE {_table_of(obj)} DROP CONSTRAINT {obj.name}"]


def _alter_constraint(old: DbObject, new: DbObject) -> Alteration | None:
    """Only validation happens in place; any other change replaces the constraint."""
    if old.facts["def"] == new.facts["def"] + " NOT VALID":
        return Alteration(((f"ALTER TABLE {_table_of(new)} VALIDATE CONSTRAINT "
                           f"{new.name}"),))
    return None


def _create_index(obj: DbObject, model: SchemaModel) -> list[str]:
    # pg_get_indexdef says ON ONLY for a partitioned table's index; without ONLY, creating
    # it creates and attaches the partitions' indexes too
    return [obj.facts["def"].replace(" ON ONLY ", " ON ", 1)]


def _drop_index(obj: DbObject) -> list[str]:
    return [f"DROP INDEX {ident(obj)}"]


def _view_word(obj: DbObject) -> str:
    return "MATERIALIZED VIEW" if obj.facts["relkind"] == "m" else "VIEW"


def _create_view(obj: DbObject, model: SchemaModel) -> list[str]:
    body = obj.facts["def"].strip().rstrip(";")
    return [f"CREATE {_view_word(obj)} {ident(obj)}{_options(obj.facts['options'])} AS\n{body}"]


def _drop_view(obj: DbObject) -> list[str]:
    return [f"DROP {_view_word(obj)} {ident(obj)}"]


def _create_function(obj: DbObject, model: SchemaModel) -> list[str]:
    return [obj.facts["def"].strip()]


def _routine_word(obj: DbObject) -> str:
    return "PROCEDURE" if obj.facts["prokind"] == "p" else "FUNCTION"


def _drop_function(obj: DbObject) -> list[str]:
    return [f"DROP {_routine_word(obj)} {ident(obj)}"]


def _alter_function(old: DbObject, new: DbObject) -> Alteration | None:
    """CREATE OR REPLACE keeps dependents, but cannot change the result type or the kind."""
    if any(old.facts[k] != new.facts[k] for k in ("prokind", "result")):
        return None
    return Alteration((new.facts["def"].strip(),))


_TRIGGER_STATE = {"D": "DISABLE TRIGGER", "R": "ENABLE REPLICA TRIGGER",
                  "A": "ENABLE ALWAYS TRIGGER", "O": "ENABLE TRIGGER"}


def _create_trigger(obj: DbObject, model: SchemaModel) -> list[str]:
    out = [obj.facts["def"]]
    if obj.facts["enabled"] != "O":
        out.append(f"ALTER TABLE {_table_of(obj)} {_TRIGGER_STATE[obj.facts['enabled']]} "
                   f"{obj.name}")
    return out


def _drop_trigger(obj: DbObject) -> list[str]:
    return [f"DROP TRIGGER {obj.name} ON {_table_of(obj)}"]


def _alter_trigger(old: DbObject, new: DbObject) -> Alteration | None:
    if old.facts["def"] != new.facts["def"]:
        return None
    return Alteration(((f"ALTER TABLE {_table_of(new)} {_TRIGGER_STATE[new.facts['enabled']]} "
                       f"{new.name}"),))


_POLICY_COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


def _create_policy(obj: DbObject, model: SchemaModel) -> list[str]:
    f = obj.facts
    text = (f"CREATE POLICY {obj.name} ON {_table_of(obj)} AS "
            f"{'PERMISSIVE' if f['permissive'] else 'RESTRICTIVE'} FOR {_POLICY_COMMANDS[f['cmd']]}"
            f" TO {', '.join(f['roles'] or ['PUBLIC'])}")
    text += f" USING ({f['using']})" if f["using"] is not None else ""
    return [text + (f" WITH CHECK ({f['check']})" if f["check"] is not None else "")]


def _drop_policy(obj: DbObject) -> list[str]:
    return [f"DROP POLICY {obj.name} ON {_table_of(obj)}"]


def _create_other(obj: DbObject, model: SchemaModel) -> list[str] | None:
    return [obj.facts["def"]] if obj.facts["def"] and obj.facts["drop"] else None


def _drop_other(obj: DbObject) -> list[str] | None:
    return [obj.facts["drop"]] if obj.facts["drop"] else None


def create_owner(obj: DbObject, model: SchemaModel) -> list[str]:
    return [f"ALTER {obj.facts['alter']} OWNER TO {obj.facts['owner']}"]


def _alter_owner(old: DbObject, new: DbObject) -> Alteration | None:
    """A sequence linked to a column (serial, OWNED BY) follows its table's owner: PostgreSQL
    refuses to change it alone, and ALTER TABLE … OWNER TO carries it. (A sequence a plan
    creates is linked only at its end, after owners are set: its OWNER TO runs.)"""
    if old.facts["owner"] == new.facts["owner"] or (old.facts.get("linked") and
                                                    new.facts.get("linked")):
        return _NO_CHANGE
    return Alteration(tuple(create_owner(new, SchemaModel(objects={}))))


def _acl_statements(facts: Mapping[str, Any], before: Sequence[str], after: Sequence[str]
                    ) -> list[str]:
    """GRANT and REVOKE that take ACL entries `before` to `after` (see _query_grants); the
    owner's entries are granted to the owner by name."""
    def parse(entries: Sequence[str]) -> dict[tuple[str, str], bool]:
        out = {}
        for entry in entries:
            grantee, _, privilege = entry.rpartition("=")
            out[(grantee, privilege.rstrip("*"))] = privilege.endswith("*")
        return out

    old, new = parse(before), parse(after)
    head, columns = facts["prefix"], facts["columns"]
    out = []

    def who(grantee: str) -> str:
        return facts["owner"] if grantee == "(owner)" else grantee

    for (grantee, privilege), grantable in sorted(old.items()):
        if (grantee, privilege) not in new:
            out.append(f"{head}REVOKE {privilege}{columns} ON {facts['on']} FROM {who(grantee)}")
        elif grantable and not new[(grantee, privilege)]:
            out.append(f"{head}REVOKE GRANT OPTION FOR {privilege}{columns} ON {facts['on']} "
                       f"FROM {who(grantee)}")
    for (grantee, privilege), grantable in sorted(new.items()):
        if old.get((grantee, privilege)) is None or (grantable and not old[(grantee, privilege)]):
            out.append(f"{head}GRANT {privilege}{columns} ON {facts['on']} TO {who(grantee)}"
                       + (" WITH GRANT OPTION" if grantable else ""))
    return out


def _create_acl(obj: DbObject, model: SchemaModel) -> list[str]:
    """From what a new object has (its acldefault, after its owner is set) to its ACL."""
    return _acl_statements(obj.facts, obj.facts["base"] or [], obj.facts["acl"] or [])


def _drop_acl(obj: DbObject) -> list[str]:
    """Back to the object's acldefault (a column's grants, default privileges)."""
    return _acl_statements(obj.facts, obj.facts["acl"] or [], obj.facts["base"] or [])


def _alter_acl(old: DbObject, new: DbObject) -> Alteration | None:
    """Entries relative to the owner: an owner change (planned before, §11 depends) carries
    them over, so only the difference is granted or revoked."""
    return Alteration(tuple(_acl_statements(new.facts, old.facts["acl"] or [],
                                            new.facts["acl"] or [])))


# ── foreign data: wrappers, servers, foreign tables ──────────────────────────────────────
# Options are [name, value] pairs (§11 _option_list). A foreign table holds no rows (they
# live on the other side), so creating one again loses nothing: it is never destructive.

def _options_clause(options: Sequence[Sequence[str]] | None) -> str:
    pairs = ", ".join(f"{name} {quote_literal(value)}" for name, value in options or [])
    return f" OPTIONS ({pairs})" if pairs else ""


def _options_change(before: Sequence[Sequence[str]] | None,
                    after: Sequence[Sequence[str]] | None) -> str:
    """' OPTIONS (ADD …, SET …, DROP …)' that takes one option list to the other ('' if equal)."""
    old = {name: value for name, value in before or []}
    new = {name: value for name, value in after or []}
    actions = [f"DROP {name}" for name in old if name not in new]
    actions += [f"{'SET' if name in old else 'ADD'} {name} {quote_literal(value)}"
                for name, value in new.items() if old.get(name) != value]
    return f" OPTIONS ({', '.join(actions)})" if actions else ""


def _create_wrapper(obj: DbObject, model: SchemaModel) -> list[str]:
    f = obj.facts
    return [(f"CREATE FOREIGN DATA WRAPPER {ident(obj)}"
            f"{_wrapper_functions(f)}{_options_clause(f['options'])}")]


def _wrapper_functions(facts: Mapping[str, Any]) -> str:
    return "".join(f" {word} {facts[key]}" if facts[key] else f" NO {word}"
                   for key, word in (("handler", "HANDLER"), ("validator", "VALIDATOR")))


def _alter_wrapper(old: DbObject, new: DbObject) -> Alteration | None:
    functions = _wrapper_functions(new.facts) if any(
        old.facts[k] != new.facts[k] for k in ("handler", "validator")) else ""
    change = functions + _options_change(old.facts["options"], new.facts["options"])
    return Alteration((f"ALTER FOREIGN DATA WRAPPER {ident(new)}{change}",) if change else ())


def _create_server(obj: DbObject, model: SchemaModel) -> list[str]:
    f = obj.facts
    kind = f" TYPE {quote_literal(f['type'])}" if f["type"] is not None else ""
    version = f" VERSION {quote_literal(f['version'])}" if f["version"] is not None else ""
    return [(f"CREATE SERVER {ident(obj)}{kind}{version} FOREIGN DATA WRAPPER {f['wrapper']}"
            f"{_options_clause(f['options'])}")]


def _alter_server(old: DbObject, new: DbObject) -> Alteration | None:
    """Version and options change in place; another wrapper or type needs a new server."""
    o, n = old.facts, new.facts
    if o["wrapper"] != n["wrapper"] or o["type"] != n["type"]:
        return None
    change = "" if o["version"] == n["version"] else \
        f" VERSION {quote_literal(n['version']) if n['version'] is not None else 'NULL'}"
    change += _options_change(o["options"], n["options"])
    return Alteration((f"ALTER SERVER {ident(new)}{change}",) if change else ())


def _foreign_column(column: Mapping[str, Any]) -> str:
    text = f"{column['name']} {column['type']}{_options_clause(column['options'])}"
    text += f" COLLATE {column['collation']}" if column["collation"] else ""
    if column["expression"] is not None:
        text += f" GENERATED ALWAYS AS ({column['expression']}) STORED"
    text += f" DEFAULT {column['default']}" if column["default"] is not None else ""
    return text + (" NOT NULL" if column["notnull"] else "")


def _create_foreign_table(obj: DbObject, model: SchemaModel) -> list[str]:
    f, name = obj.facts, ident(obj)
    if f["bound"] is not None:
        text = f"CREATE FOREIGN TABLE {name} PARTITION OF {f['parents'][0]} {f['bound']}"
    else:
        parts = [_foreign_column(c) for c in f["columns"] if c["local"]]
        parts += [f"CONSTRAINT {c['name']} {c['def']}" for c in f["checks"]]
        text = f"CREATE FOREIGN TABLE {name} (\n    " + ",\n    ".join(parts) + "\n)" \
            if parts else f"CREATE FOREIGN TABLE {name} ()"
        text += f" INHERITS ({', '.join(f['parents'])})" if f["parents"] else ""
    out = [f"{text} SERVER {f['server']}{_options_clause(f['options'])}"]
    if f["bound"] is not None:  # a partition's own checks
        out += [f"ALTER FOREIGN TABLE {name} ADD CONSTRAINT {c['name']} {c['def']}"
                for c in f["checks"]]
    return out + _foreign_column_comments(obj, {})


def _foreign_column_comments(new: DbObject, before: Mapping[str, Any]) -> list[str]:
    """COMMENT ON COLUMN for each column whose comment is not what `before` (name → column)
    has."""
    out = []
    for column in new.facts["columns"]:
        if column["comment"] != (before.get(column["name"]) or {}).get("comment"):
            text = quote_literal(column["comment"]) if column["comment"] is not None else "NULL"
            out.append(f"COMMENT ON COLUMN {ident(new)}.{column['name']} IS {text}")
    return out


def _alter_foreign_table(old: DbObject, new: DbObject) -> Alteration | None:
    """ALTER FOREIGN TABLE where it can: columns added at the end, dropped, retyped, their
    defaults, NOT NULL and options; checks; the table's options. Another server, partition
    or parent, a generated expression or a column order ADD COLUMN cannot reach: created
    again (and what is over it, views, with it)."""
    o, n = old.facts, new.facts
    if any(o[k] != n[k] for k in ("server", "bound", "parents")):
        return None
    before = {c["name"]: c for c in o["columns"]}
    after = {c["name"]: c for c in n["columns"]}
    kept = [c for c in before if c in after]
    if kept + [c for c in after if c not in before] != list(after) or \
            any(before[c]["expression"] != after[c]["expression"] or
                before[c]["local"] != after[c]["local"] for c in kept):
        return None
    actions = [f"DROP COLUMN {c}" for c in before if c not in after]
    retyped = bool(actions)
    for name, column in after.items():
        if name not in before:
            actions.append(f"ADD COLUMN {_foreign_column(column)}")
            continue
        actions += _foreign_column_changes(before[name], column)
        retyped = retyped or (before[name]["type"], before[name]["collation"]) != \
            (column["type"], column["collation"])
    old_checks = {c["name"]: c["def"] for c in o["checks"]}
    new_checks = {c["name"]: c["def"] for c in n["checks"]}
    actions += [f"DROP CONSTRAINT {c}" for c, d in old_checks.items() if new_checks.get(c) != d]
    actions += [f"ADD CONSTRAINT {c} {d}" for c, d in new_checks.items() if old_checks.get(c) != d]
    out = [f"ALTER FOREIGN TABLE {ident(new)} {', '.join(actions)}"] if actions else []
    options = _options_change(o["options"], n["options"])
    out += [f"ALTER FOREIGN TABLE {ident(new)}{options}"] if options else []
    # a view over a column that goes or changes type must go first (PostgreSQL refuses)
    return Alteration(tuple(out + _foreign_column_comments(new, before)),
                      disturbs=frozenset({"view"}) if retyped else frozenset())


def _foreign_column_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    head = f"ALTER COLUMN {new['name']}"
    out = []
    if (old["type"], old["collation"]) != (new["type"], new["collation"]):
        collate = f" COLLATE {new['collation']}" if new["collation"] else ""
        out.append(f"{head} TYPE {new['type']}{collate}")
    if old["default"] != new["default"]:
        out.append(f"{head} SET DEFAULT {new['default']}" if new["default"] is not None
                   else f"{head} DROP DEFAULT")
    if old["notnull"] != new["notnull"]:
        out.append(f"{head} {'SET' if new['notnull'] else 'DROP'} NOT NULL")
    options = _options_change(old["options"], new["options"])
    return out + ([f"{head}{options}"] if options else [])


# ── event triggers (created last, dropped first: they fire on the plan's own DDL) ─────────

_EVENT_TRIGGER_STATE = {"O": "ENABLE", "D": "DISABLE", "R": "ENABLE REPLICA",
                        "A": "ENABLE ALWAYS"}


def _create_event_trigger(obj: DbObject, model: SchemaModel) -> list[str]:
    f = obj.facts
    when = f" WHEN TAG IN ({_literal_list(f['tags'])})" if f["tags"] else ""
    out = [(f"CREATE EVENT TRIGGER {ident(obj)} ON {f['event']}{when} "
           f"EXECUTE FUNCTION {f['function']}()")]
    if f["enabled"] != "O":
        out.append(f"ALTER EVENT TRIGGER {ident(obj)} {_EVENT_TRIGGER_STATE[f['enabled']]}")
    return out


def _alter_event_trigger(old: DbObject, new: DbObject) -> Alteration | None:
    """Only the enabled state changes in place (ALTER EVENT TRIGGER has no other form)."""
    if any(old.facts[k] != new.facts[k] for k in ("event", "tags", "function")):
        return None
    return Alteration(((f"ALTER EVENT TRIGGER {ident(new)} "
                       f"{_EVENT_TRIGGER_STATE[new.facts['enabled']]}"),))


def _cannot_alter(old: DbObject, new: DbObject) -> Alteration | None:
    return None


def _comment_word(word: str) -> Callable[[DbObject], str]:
    return lambda obj: f"{word} {ident(obj)}"


@record(frozen=True)
class ObjectKind:
    """One kind of schema object: how it is created, dropped and altered in place (`alter`
    returns None when it must be dropped and created again). `rank` orders independent
    creations; `keeps_data`: replacing it loses rows."""

    rank: int
    create: Callable[[DbObject, SchemaModel], list[str] | None]
    drop: Callable[[DbObject], list[str] | None]
    alter: Callable[[DbObject, DbObject], Alteration | None]
    comment_on: Callable[[DbObject], str] | None
    keeps_data: bool = False
    late: Callable[[DbObject | None, DbObject], list[str]] | None = None
    last: bool = False  # created after every other object and dropped before (event triggers)


OBJECT_KINDS: dict[str, ObjectKind] = {
    "schema": ObjectKind(0, _create_schema, lambda o: [f"DROP SCHEMA {ident(o)}"],
                         lambda o, n: _NO_CHANGE, _comment_word("SCHEMA")),
    "extension": ObjectKind(1, _create_extension, lambda o: [f"DROP EXTENSION {ident(o)}"],
                            _alter_extension, _comment_word("EXTENSION")),
    "type": ObjectKind(2, _create_type, _drop_type, _alter_type,
                       lambda o: f"{'DOMAIN' if o.facts['type'] == 'd' else 'TYPE'} {ident(o)}"),
    "sequence": ObjectKind(3, _create_sequence, _drop_sequence, _alter_sequence,
                           _comment_word("SEQUENCE"), keeps_data=True, late=_late_sequence),
    "function": ObjectKind(4, _create_function, _drop_function, _alter_function,
                           lambda o: f"{_routine_word(o)} {ident(o)}"),
    "table": ObjectKind(5, _create_table, _drop_table, _alter_table, _comment_word("TABLE"),
                        keeps_data=True),
    "column": ObjectKind(6, _create_column, _drop_column, _alter_column, _comment_word("COLUMN"),
                         keeps_data=True),
    "default": ObjectKind(7, _create_default, _drop_default, _alter_default, None),
    "constraint": ObjectKind(8, _create_constraint, _drop_constraint, _alter_constraint,
                             _comment_word("CONSTRAINT")),
    "index": ObjectKind(9, _create_index, _drop_index, _cannot_alter, _comment_word("INDEX")),
    "view": ObjectKind(10, _create_view, _drop_view, _cannot_alter,
                       lambda o: f"{_view_word(o)} {ident(o)}"),
    "trigger": ObjectKind(11, _create_trigger, _drop_trigger, _alter_trigger,
                          _comment_word("TRIGGER")),
    "policy": ObjectKind(12, _create_policy, _drop_policy, _cannot_alter, _comment_word("POLICY")),
    "wrapper": ObjectKind(13, _create_wrapper, lambda o: [f"DROP FOREIGN DATA WRAPPER {ident(o)}"],
                          _alter_wrapper, _comment_word("FOREIGN DATA WRAPPER")),
    "server": ObjectKind(13, _create_server, lambda o: [f"DROP SERVER {ident(o)}"],
                         _alter_server, _comment_word("SERVER")),
    "foreign_table": ObjectKind(13, _create_foreign_table,
                                lambda o: [f"DROP FOREIGN TABLE {ident(o)}"],
                                _alter_foreign_table, _comment_word("FOREIGN TABLE")),
    "event_trigger": ObjectKind(16, _create_event_trigger,
                                lambda o: [f"DROP EVENT TRIGGER {ident(o)}"],
                                _alter_event_trigger, _comment_word("EVENT TRIGGER"), last=True),
    "other": ObjectKind(13, _create_other, _drop_other, _cannot_alter, None),
    # with --privileges only (§11 _read_grants): set once the object exists, in place after
    "owner": ObjectKind(14, create_owner, lambda o: [], _alter_owner, None),
    "acl": ObjectKind(15, _create_acl, _drop_acl, _alter_acl, None),
}


# ── planning (pure) ───────────────────────────────────────────────────────────────────────

@record(frozen=True)
class Rename:
    """An explicit rename hint: `table:old=new` or `column:table.old=new` (names as in SQL,
    schema public when not qualified)."""

    kind: str
    old: str      # key of the object in the `from` model
    new: str      # key in the `to` model


def _hint_name(text: str) -> str:
    """A name from the command line as the catalog's quote_ident writes it (quoted unless
    plain lower case; a keyword used as a name must be given quoted)."""
    text = text.strip()
    if text.startswith('"') or not text or re.fullmatch(r"[a-z_][a-z0-9_$]*", text):
        return text
    return quote_ident(text)


def parse_rename(text: str) -> Rename:
    """'table:old=new', 'table:s.old=new', 'column:t.old=new', 'column:s.t.old=new'."""
    kind, _, rest = text.partition(":")
    old, _, new = rest.partition("=")
    parts = [_hint_name(p) for p in old.split(".")]
    new = _hint_name(new)
    if kind == "table" and 1 <= len(parts) <= 2 and new and all(parts):
        schema, name = (["public"] + parts)[-2:]
        return Rename("table", f"table {qname(schema, name)}", f"table {qname(schema, new)}")
    if kind == "column" and 2 <= len(parts) <= 3 and new and all(parts):
        schema, table, name = (["public"] + parts)[-3:]
        qualified = qname(schema, table)
        return Rename("column", f"column {qualified}.{name}", f"column {qualified}.{new}")
    raise ConfigError(f"--rename {text!r}: expected table:OLD=NEW or column:TABLE.OLD=NEW")


def _renamed_key(key: str, old: str, new: str) -> str:
    """The key of an object after its table or column was renamed."""
    old_name, new_name = old.split(" ", 1)[1], new.split(" ", 1)[1]
    kind, _, rest = key.partition(" ")
    if kind in ("owner", "acl") and " " in rest:  # 'acl table public.t': its object's key
        return f"{kind} {_renamed_key(rest, old, new)}"
    if rest == old_name:
        return f"{kind} {new_name}"
    if rest.startswith(old_name + "."):
        return f"{kind} {new_name}{rest[len(old_name):]}"
    if rest.endswith(" on " + old_name):
        return f"{kind} {rest[:-len(old_name)]}{new_name}"
    return key


def _key_name(key: str) -> str:
    """The object's own name in a key: 'u_pkey' of 'constraint u_pkey on public.u', 'b' of
    'column public.t.b'."""
    name = key.split(" ", 1)[1]
    return name.split(" on ", 1)[0] if " on " in name else name.rsplit(".", 1)[-1]


# How an object named after its table is renamed with it (_implied_renames).
_RENAME_SQL: dict[str, Callable[[DbObject, str], str]] = {
    "table": lambda obj, name: f"ALTER TABLE {ident(obj)} RENAME TO {name}",
    "column": lambda obj, name: f"ALTER TABLE {_table_of(obj)} RENAME COLUMN {obj.name} TO {name}",
    "sequence": lambda obj, name: f"ALTER SEQUENCE {ident(obj)} RENAME TO {name}",
    "index": lambda obj, name: f"ALTER INDEX {ident(obj)} RENAME TO {name}",
    "constraint": lambda obj, name: (f"ALTER TABLE {_table_of(obj)} RENAME CONSTRAINT "
                                     f"{obj.name} TO {name}"),
}


def apply_renames(model: SchemaModel, renames: Sequence[Rename],
                  target: SchemaModel | None = None
                  ) -> tuple[list[PlannedStatement], SchemaModel, list[str]]:
    """RENAME statements, the `from` model as it is after them, and hints that name nothing.
    A renamed table's sequences, indexes and constraints named after it are renamed with it
    when `target` has them under the new name (_implied_renames)."""
    statements, problems = [], []
    objects = dict(model.objects)
    todo = list(renames)
    while todo:
        rename = todo.pop(0)
        obj = objects.get(rename.old)
        if obj is None:
            kind = rename.old.split(" ", 1)[0] + " "
            close = suggest(rename.old, [k for k in objects if k.startswith(kind)])
            problems.append(f"--rename: no {rename.old} in the migrated schema"
                            + (f" ({close})" if close else ""))
            continue
        sql = _RENAME_SQL[rename.kind](obj, _key_name(rename.new))
        statements.append(PlannedStatement(sql=sql, key=rename.new))
        objects = {_renamed_key(k, rename.old, rename.new): _rename_object(o, rename)
                   for k, o in objects.items()}
        if rename.kind == "table" and target is not None:
            todo[:0] = _implied_renames(objects, target, rename)
    return statements, SchemaModel(objects=objects), problems


_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def _implied_renames(objects: Mapping[str, DbObject], target: SchemaModel, rename: Rename
                     ) -> list[Rename]:
    """The renamed table's sequences (serial), indexes and constraints that PostgreSQL named
    after it (t_id_seq, t_pkey, t_a_idx, t_a_fkey) and that `target`, built from DDL naming
    the new table, has under the new table's name: renamed rather than dropped and created
    again (a sequence created again would start over; a key, rebuild its index)."""
    old_table, new_table = _key_name(rename.old), _key_name(rename.new)
    if not (_PLAIN_NAME.fullmatch(old_table) and _PLAIN_NAME.fullmatch(new_table)):
        return []
    table = ident_of(rename.new)
    found = []
    for key, obj in sorted(objects.items()):
        owned = obj.facts.get("owned_by") if obj.kind == "sequence" else None
        mine = obj.parent == rename.new or str(owned or "").startswith(table + ".")
        if obj.kind not in _RENAME_SQL or key in target.objects or not mine or \
                not obj.name.startswith(old_table + "_"):
            continue
        name = new_table + obj.name[len(old_table):]
        new_key = key.replace(f" {obj.name} on ", f" {name} on ", 1) \
            if obj.kind == "constraint" else f"{obj.kind} {qname(obj.schema, name)}"
        counterpart = target.objects.get(new_key)
        if _PLAIN_NAME.fullmatch(name) and counterpart is not None and \
                counterpart.kind == obj.kind and counterpart.parent == obj.parent:
            found.append(Rename(obj.kind, key, new_key))
    return found


def _swap_name(text: str, old: str, new: str) -> str:
    """`old` (a qualified name) replaced by `new` where it stands as a whole name."""
    return re.sub(r'(?<![\w"$.])' + re.escape(old) + r'(?![\w"$])', new, text)


def _rename_object(obj: DbObject, rename: Rename) -> DbObject:
    key = _renamed_key(obj.key, rename.old, rename.new)
    name = obj.name
    if key == rename.new or (rename.kind == "column" and key == "default " +
                             rename.new.split(" ", 1)[1]):
        name = _key_name(rename.new)
    facts = _renamed_facts(obj, rename)
    return evolve(obj, key=key, name=name, facts=facts,
                  parent=_renamed_key(obj.parent, rename.old, rename.new) if obj.parent else "",
                  depends=frozenset(_renamed_key(d, rename.old, rename.new) for d in obj.depends))


def _renamed_facts(obj: DbObject, rename: Rename) -> Mapping[str, Any]:
    """The facts that name the renamed table or column follow the rename, so that what
    PostgreSQL carries along by itself (a table's column order, a sequence's OWNED BY, an
    owner's and a grant's target) is not planned again."""
    facts = obj.facts
    old_name, new_name = ident_of(rename.old), ident_of(rename.new)
    if rename.kind == "column" and obj.kind == "table" and facts.get("columns") and \
            old_name.rsplit(".", 1)[0] == ident(obj):
        before, after = old_name.rsplit(".", 1)[1], new_name.rsplit(".", 1)[1]
        facts = {**facts, "columns": [after if c == before else c for c in facts["columns"]]}
    owned = facts.get("owned_by") if obj.kind == "sequence" else None
    if owned:
        facts = {**facts, "owned_by": ident_of(_renamed_key(f"column {owned}", rename.old,
                                                            rename.new))}
    if rename.kind == "table" and obj.kind in ("index", "constraint", "trigger"):
        facts = {**facts, "def": _swap_name(facts["def"], old_name, new_name)}
    if rename.kind == "index" and obj.key == rename.old:  # its def names it
        facts = {**facts, "def": _swap_name(facts["def"], _key_name(rename.old),
                                            _key_name(rename.new))}
    if rename.kind == "sequence" and obj.kind == "default":  # nextval('public.s'::regclass)
        facts = {**facts, "expr": facts["expr"].replace(f"'{old_name}'::regclass",
                                                        f"'{new_name}'::regclass")}
    if obj.kind in HANGERS_ON:  # 'TABLE public.t' in an owner's or a grant's statement
        for fact in ("alter", "on"):
            word, _, name = str(facts.get(fact, "")).rpartition(" ")
            if word:
                target = ident_of(_renamed_key(f"table {name}", rename.old, rename.new))
                facts = {**facts, fact: f"{word} {target}"}
        if facts.get("columns") and obj.parent == rename.old:
            facts = {**facts, "columns": f" ({new_name.rsplit('.', 1)[1]})"}
    return facts


def compare_models(expected: SchemaModel, actual: SchemaModel) -> list[str]:
    """Object-level differences: '+ key' only in actual, '- key' missing, '~ key' changed."""
    a, e = actual.objects, expected.objects
    return sorted([f"+ {k}" for k in a if k not in e] + [f"- {k}" for k in e if k not in a] +
                  [f"~ {k}" for k in e if k in a and not e[k].same_as(a[k])],
                  key=lambda line: line[2:])




@record()
class _Planner:
    """One plan's working state: which objects are created, dropped, replaced or altered."""

    old: SchemaModel
    new: SchemaModel
    alters: dict[str, Alteration] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    released: set[str] = field(default_factory=set)   # sequences whose owner is dropped
    swaps: dict[str, list[str]] = field(default_factory=dict)  # enum → columns it converts

    def classify(self) -> None:
        a, b = self.old.objects, self.new.objects
        for key in sorted(a.keys() & b.keys()):
            if a[key].same_as(b[key]):
                continue
            if a[key].facts == b[key].facts:
                self.alters[key] = _NO_CHANGE
                continue
            alteration = OBJECT_KINDS[b[key].kind].alter(a[key], b[key])
            if alteration is None and b[key].kind == "type" and a[key].facts["type"] == "e" \
                    and b[key].facts["type"] == "e":
                alteration = self._swap_enum(a[key], b[key])
            if alteration is None:
                self.replaced.add(key)
            else:
                self.alters[key] = alteration
        self._close_replacements()
        self._release_sequences()

    def _swap_enum(self, old: DbObject, new: DbObject) -> Alteration:
        """An enum that loses or reorders labels: renamed away, created anew, its columns
        converted through text, the old one dropped (what careful hands do)."""
        a, b = self.old.objects, self.new.objects
        aside = f"{ident(old)}__old".replace('"__old', '__old"')
        out = [f"ALTER TYPE {ident(old)} RENAME TO {aside.rsplit('.', 1)[-1]}",
               *_create_type(new, self.new)]
        conversions = []  # what a removed label makes fail: the rest renames and creates
        for column in sorted(k for k, o in a.items() if o.kind == "column" and old.key in o.depends
                             and k in b):
            target = b[column].facts["type"]
            via = "text[]" if target.endswith("[]") else "text"
            conversions.append(f"ALTER TABLE {_table_of(b[column])} ALTER COLUMN "
                               f"{b[column].name} TYPE {target} USING "
                               f"{b[column].name}::{via}::{target}")
            out.append(conversions[-1])
            self.alters.setdefault(column, Alteration((), disturbs=_DISTURBED_KINDS))
            self.swaps.setdefault(new.key, []).append(column)
        out.append(f"DROP TYPE {aside}")
        for hanger in (f"owner {new.key}", f"acl {new.key}"):  # the new type has the defaults
            if hanger in b:
                create = OBJECT_KINDS[b[hanger].kind].create(b[hanger], self.new) or []
                self.alters[hanger] = Alteration(tuple(create))
        removed = set(old.facts["labels"] or []) - set(new.facts["labels"] or [])
        return Alteration(tuple(out), disturbs=_SWAP_DISTURBED, destructive=bool(removed),
                          lossy=frozenset(conversions or out))

    def _release_sequences(self) -> None:
        """A sequence that stays while the column owning it goes would go with it: its
        ownership is released first (and set again at the end)."""
        a, b, dropped = self.old.objects, self.new.objects, self.dropped()
        for key in sorted(a.keys() & b.keys()):
            owner = a[key].facts.get("owned_by") if a[key].kind == "sequence" else None
            if owner and f"column {owner}" in dropped and key not in self.replaced:
                done = self.alters.get(key, _NO_CHANGE)
                self.alters[key] = evolve(done, statements=(
                    f"ALTER SEQUENCE {ident(b[key])} OWNED BY NONE", *done.statements))
                self.released.add(key)

    def _close_replacements(self) -> None:
        """Dependents of what is replaced (or of a column whose type changes) go too."""
        a, b = self.old.objects, self.new.objects
        direct = self.old.users
        todo = sorted(self.replaced | {k for k in a if k not in b} |
                      {k for k, alt in self.alters.items() if alt.disturbs})
        while todo:
            key = todo.pop()
            whole = key in self.replaced or key not in b
            disturbed = frozenset() if whole else self.alters[key].disturbs
            for child in sorted(direct.get(key, [])):
                if child not in b or child in self.replaced:
                    continue
                if key not in b[child].depends and child in self.alters:
                    continue  # its alteration lets go of it (a column changing type)
                if not whole and a[child].kind not in disturbed:
                    continue
                if OBJECT_KINDS[a[child].kind].keeps_data and a[child].parent != key and \
                        not (a[child].kind == "column" and a[child].parent in self.replaced):
                    self.problems.append(f"{child}: depends on {key}, which must be dropped and "
                                         "created again")
                    continue
                self.replaced.add(child)
                self.alters.pop(child, None)
                todo.append(child)

    def created(self) -> set[str]:
        return {k for k in self.new.objects if k not in self.old.objects} | self.replaced

    def dropped(self) -> set[str]:
        return {k for k in self.old.objects if k not in self.new.objects} | self.replaced

    def host(self, key: str, created: set[str]) -> str:
        """The object whose creation also creates this one: a new table's columns and their
        defaults are written in its CREATE TABLE, a new column's default in its ADD COLUMN."""
        obj = self.new.objects[key]
        if obj.kind == "column" and obj.parent in created:
            return obj.parent
        if obj.kind == "default":
            column = f"column {ident(obj)}"
            if column in created:
                return self.host(column, created)
        return key

    def implicit_drop(self, key: str, dropped: set[str]) -> bool:
        """Dropped with its table (or its column) by PostgreSQL itself."""
        obj = self.old.objects[key]
        if obj.parent and obj.parent in dropped:
            return True
        return obj.kind == "default" and f"column {ident(obj)}" in dropped

    def actions(self) -> dict[tuple[str, str], list[PlannedStatement]]:
        """('drop'|'create'|'alter', key) → its statements (empty when PostgreSQL does it)."""
        created, dropped = self.created(), self.dropped()
        out: dict[tuple[str, str], list[PlannedStatement]] = {}
        for key in sorted(dropped):
            obj = self.old.objects[key]
            sql = [] if self.implicit_drop(key, dropped) else OBJECT_KINDS[obj.kind].drop(obj)
            if sql is None:
                self.problems.append(f"{key}: cannot be dropped by a plan ({obj.facts['type']})")
                sql = []
            loses = OBJECT_KINDS[obj.kind].keeps_data
            out[("drop", key)] = [PlannedStatement(s, key, destructive=loses) for s in sql]
        for key in sorted(created):
            obj = self.new.objects[key]
            if self.host(key, created) != key:
                continue
            sql = OBJECT_KINDS[obj.kind].create(obj, self.new)
            if sql is None:
                self.problems.append(f"{key}: cannot be created by a plan ({obj.facts['type']})")
                sql = []
            out[("create", key)] = [PlannedStatement(s, key) for s in sql] + \
                self._comments(None, obj, created)
        for key, alteration in sorted(self.alters.items()):
            obj = self.new.objects[key]
            out[("alter", key)] = [PlannedStatement(s, key, destructive=alteration.loses(s))
                                   for s in alteration.statements] + \
                self._comments(self.old.objects[key], obj, created)
        return out

    def _comments(self, old: DbObject | None, new: DbObject, created: set[str]
                  ) -> list[PlannedStatement]:
        """COMMENT ON for the object and, for a table created with its columns, theirs."""
        hosted = [new] + table_columns(new, self.new) if new.kind == "table" and old is None \
            else [new]
        out = []
        for obj in hosted:
            before = old.comment if old is not None and obj is new else None
            target = OBJECT_KINDS[obj.kind].comment_on
            if target is not None and obj.comment != before:
                text = quote_literal(obj.comment) if obj.comment is not None else "NULL"
                out.append(PlannedStatement(f"COMMENT ON {target(obj)} IS {text}", obj.key))
        return out

    def edges(self, actions: Mapping[tuple[str, str], object]) -> dict[tuple[str, str],
                                                                      set[tuple[str, str]]]:
        """action → the actions that must run before it. What PostgreSQL drops with its
        table (or column) is ordered as that table's drop."""
        a, b = self.old.objects, self.new.objects
        created, dropped = self.created(), self.dropped()
        after: dict[tuple[str, str], set[tuple[str, str]]] = {n: set() for n in actions}
        hosted: dict[str, set[str]] = {}
        for key in created:
            hosted.setdefault(self.host(key, created), set()).add(key)

        def forward(key: str) -> tuple[str, str] | None:
            if key in created:
                node = ("create", self.host(key, created))
                return node if node in actions else None
            return ("alter", key) if ("alter", key) in actions else None

        def dropper(key: str) -> tuple[str, str] | None:
            if key not in dropped:
                return None
            if self.implicit_drop(key, dropped):
                obj = a[key]
                return dropper(obj.parent if obj.kind != "default" else f"column {ident(obj)}")
            return ("drop", key)

        def link(node: tuple[str, str] | None, before: tuple[str, str] | None) -> None:
            if node is not None and before is not None and node != before:
                after[node].add(before)

        users = self.old.users
        for node in actions:
            verb, key = node
            if verb in ("create", "alter"):
                needs = set(b[key].depends)
                if verb == "create":  # a new table's columns and defaults bring their needs
                    needs |= {d for k in hosted.get(key, ()) for d in b[k].depends}
                for dep in needs:
                    link(node, forward(dep))
                link(node, dropper(key))
            target = dropper(key) if verb == "drop" else \
                node if verb == "alter" and self.alters[key].disturbs else None
            for user in users.get(key, []):  # what needs it is dropped first
                link(target, dropper(user))
            if verb == "alter":  # what it stops needing is dropped after it
                for dep in a[key].depends:
                    link(dropper(dep), node)
        for key, columns in self.swaps.items():  # the swap converts them: their users go first
            for column in columns:
                for user in users.get(column, []):
                    link(("alter", key), dropper(user))
        for key in self.released:
            link(dropper(f"column {a[key].facts['owned_by']}"), ("alter", key))
        for key in created:  # after its owner's changes (a dropped identity frees its name)
            owner = b[key].facts.get("owned_by") if b[key].kind == "sequence" else None
            if owner and ("alter", f"column {owner}") in actions:
                link(("create", key), ("alter", f"column {owner}"))
        self._link_lasts(actions, link)
        return after

    def _link_lasts(self, actions: Mapping[tuple[str, str], object],
                    link: Callable[[tuple[str, str], tuple[str, str]], None]) -> None:
        """Kinds created last and dropped first (ObjectKind.last): an event trigger would
        fire on the plan's other statements."""
        def is_last(node: tuple[str, str]) -> bool:
            model = self.old if node[0] == "drop" else self.new
            return OBJECT_KINDS[model.objects[node[1]].kind].last

        lasts = [node for node in actions if is_last(node)]
        for node in actions if lasts else ():
            for last in lasts:
                if node not in lasts and (node[0] == "drop") == (last[0] == "drop"):
                    if node[0] == "drop":
                        link(node, last)
                    else:
                        link(last, node)


_PHASE = {"drop": 0, "alter": 1, "create": 1}


def _order(actions: Mapping[tuple[str, str], list[PlannedStatement]],
           after: Mapping[tuple[str, str], set[tuple[str, str]]],
           model_kind: Callable[[str, str], str],
           tiebreak: Callable[[str, str], str] = lambda verb, key: key
           ) -> tuple[list[tuple[str, str]], list[str]]:
    """Topological order; among ready actions: drops first (dependents before what they
    need: reverse rank), then creations by kind rank and `tiebreak` (the key by default).
    Returns the order and, on a cycle, the keys it could not place."""
    import heapq

    waiting = {node: set(deps) for node, deps in after.items()}
    users: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for node, deps in waiting.items():
        for dep in deps:
            users.setdefault(dep, []).append(node)

    def priority(node: tuple[str, str]) -> tuple[int, int, str]:
        rank = OBJECT_KINDS[model_kind(*node)].rank
        return (_PHASE[node[0]], -rank if node[0] == "drop" else rank, tiebreak(*node))

    ready = [(priority(n), n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for user in users.get(node, []):
            waiting[user].discard(node)
            if not waiting[user]:
                heapq.heappush(ready, (priority(user), user))
    stuck = sorted(n[1] for n, deps in waiting.items() if deps)
    return order, stuck


def plan_schema(old: SchemaModel, new: SchemaModel, renames: Sequence[Rename] = ()) -> SchemaPlan:
    """The statements that turn `old` into `new`, in an order PostgreSQL accepts."""
    renaming, old, problems = apply_renames(old, renames, new)
    planner = _Planner(old=old, new=new, problems=problems)
    planner.classify()
    actions = planner.actions()
    after = planner.edges(actions)

    def kind_of(verb: str, key: str) -> str:
        return (old if verb == "drop" else new).objects[key].kind

    position = {key: index for index, key in enumerate(new.objects)}

    def tiebreak(verb: str, key: str) -> str:
        """New columns of a table are added in the table's order (ADD COLUMN appends)."""
        obj = new.objects.get(key) if verb == "create" else None
        if obj is not None and obj.kind == "column":
            return f"{obj.parent}\x00{position[key]:09d}"
        return key

    order, stuck = _order(actions, after, kind_of, tiebreak)
    statements = renaming + [s for node in order for s in actions[node]]
    statements += _late_statements(old, new, planner.released)
    unsupported = planner.problems + [f"{key}: in a dependency cycle" for key in stuck] + \
        column_order_problems(old, new, planner.created())
    return SchemaPlan(statements=tuple(statements), unsupported=tuple(sorted(set(unsupported))),
                      suggestions=tuple(suggest_renames(old, new)))


def column_order_problems(old: SchemaModel, new: SchemaModel, created: set[str]) -> list[str]:
    """Tables whose column order the plan cannot reach. PostgreSQL adds a column at the end
    (and a column created again goes there too); it cannot move one. The order matters to
    SELECT * and to COPY without a column list, so a different order is a difference."""
    problems = []
    for key, table in new.objects.items():
        before = old.objects.get(key)
        if table.kind != "table" or before is None or key in created:
            continue
        want, have = table.facts.get("columns"), before.facts.get("columns")
        if want is None or have is None or want == have:
            continue
        kept = [c for c in have if c in want and f"column {ident(table)}.{c}" not in created]
        reached = kept + [c for c in want if c not in kept]
        if reached != want:
            at = next(i for i, (a, b) in enumerate(zip(reached, want, strict=True)) if a != b)
            problems.append(f"{key}: column order: the DDL has {', '.join(want[at:at + 3])} "
                            f"where the plan gives {', '.join(reached[at:at + 3])} (PostgreSQL "
                            "adds columns at the end and cannot move one: put new columns "
                            "last in the DDL, or rebuild the table by hand)")
    return problems


def _late_statements(old: SchemaModel, new: SchemaModel, released: set[str]
                     ) -> list[PlannedStatement]:
    out = []
    for key, obj in sorted(new.objects.items()):
        late = OBJECT_KINDS[obj.kind].late
        if late is not None:
            before = None if key in released else old.objects.get(key)
            out += [PlannedStatement(s, key) for s in late(before, obj)]
    return out


def suggest_renames(old: SchemaModel, new: SchemaModel) -> list[str]:
    """Drop+add pairs that look like renames: a table dropped and one added in the same schema
    with the same columns, or a column dropped and one added to the same table with the same
    type. Only suggested: a rename is planned only from an explicit --rename."""
    a, b = old.objects, new.objects
    gone = [o for k, o in a.items() if k not in b and o.kind in ("table", "column")]
    added = [o for k, o in b.items() if k not in a and o.kind in ("table", "column")]
    out = []
    for before in gone:
        for now in added:
            if before.kind != now.kind or before.schema != now.schema:
                continue
            if before.kind == "column" and before.parent == now.parent and \
                    before.facts == now.facts:
                table = _table_of(now)
                out.append(f"--rename column:{table}.{before.name}="
                           f"{now.name}")
            elif before.kind == "table" and _column_shape(before, old) == \
                    _column_shape(now, new) and _column_shape(now, new):
                out.append(f"--rename table:{ident(before)}={now.name}")
    return out


def _column_shape(table: DbObject, model: SchemaModel) -> list[tuple[str, Any]]:
    return sorted((c.name, sorted(c.facts.items())) for c in table_columns(table, model))


# ── online changes: what a live table needs to stay available ─────────────────────────────

def online_stage(old: SchemaModel, new: SchemaModel) -> SchemaModel:
    """The schema between the two migrations of an online change: `new` without the indexes
    it adds to tables that already exist (built CONCURRENTLY by the second migration, with
    what needs them), with the foreign keys and checks it adds to existing tables NOT VALID
    (validated by the second migration, without blocking writes), and with the columns of
    existing tables that become NOT NULL still nullable, a NOT VALID check standing in
    (not_null_checks)."""
    a, b = old.objects, new.objects
    later = {k for k, o in b.items() if o.kind == "index" and k not in a and o.parent in a
             and " ON ONLY " not in o.facts["def"]}  # a partitioned table's: no CONCURRENTLY
    for key in sorted(later):
        later.update(new.dependents(key))
    objects = {k: o for k, o in b.items() if k not in later}
    for key, obj in objects.items():
        if obj.kind == "constraint" and obj.facts["type"] in ("f", "c") and obj.parent in a \
                and a.get(key) != obj and not obj.facts["def"].endswith(" NOT VALID"):
            objects[key] = evolve(obj, facts={**obj.facts, "def": obj.facts["def"] + " NOT VALID"})
    for column, check in not_null_checks(old, new).items():
        objects[column] = evolve(b[column], facts={**b[column].facts, "notnull": False})
        objects[check.key] = check
    return SchemaModel(objects=objects)


def not_null_checks(old: SchemaModel, new: SchemaModel) -> dict[str, DbObject]:
    """Column key → the NOT VALID check that stands in for its NOT NULL during an online
    change. SET NOT NULL scans the table under an ACCESS EXCLUSIVE lock unless a valid
    CHECK (c IS NOT NULL) proves it (PostgreSQL 12+); VALIDATE CONSTRAINT scans without
    blocking writes. So: ADD CONSTRAINT … NOT VALID; VALIDATE; SET NOT NULL; DROP CONSTRAINT."""
    a, b = old.objects, new.objects
    found = {}
    for key, column in b.items():
        before = a.get(key)
        if column.kind != "column" or before is None or before.facts["notnull"] or \
                not column.facts["notnull"]:
            continue
        table, name = _table_of(column), column.name
        raw = f"{table.rsplit('.', 1)[-1]}_{name}_not_null".replace('"', "")[:63]
        label = raw if re.fullmatch(r"[a-z_][a-z0-9_$]*", raw) else f'"{raw}"'
        found[key] = DbObject(kind="constraint", key=f"constraint {label} on {table}",
                              schema=column.schema, name=label, parent=column.parent,
                              facts={"type": "c", "def": f"CHECK (({name} IS NOT NULL)) NOT VALID"},
                              depends=frozenset({column.parent, key}))
    return found


def through_checks(plan: SchemaPlan, checks: Mapping[str, DbObject]) -> SchemaPlan:
    """The second migration's SET NOT NULL of each column in `checks`, preceded by the
    VALIDATE of its stand-in check and followed by its DROP (the plan drops it first)."""
    drops = {check.key for check in checks.values()}
    out = []
    for statement in plan.statements:
        if statement.key in drops:
            continue
        check = checks.get(statement.key)
        if check is not None and statement.sql.endswith(" SET NOT NULL"):
            table = _table_of(check)
            out += [evolve(statement, sql=f"ALTER TABLE {table} VALIDATE CONSTRAINT {check.name}",
                           key=check.key),
                    statement,
                    evolve(statement, sql=f"ALTER TABLE {table} DROP CONSTRAINT {check.name}",
                           key=check.key)]
        else:
            out.append(statement)
    return evolve(plan, statements=tuple(out))


_CREATE_INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX ")


def concurrently(plan: SchemaPlan) -> SchemaPlan:
    """The second migration of an online change: indexes created and dropped CONCURRENTLY,
    every statement in its own transaction."""
    def online(sql: str) -> str:
        sql = _CREATE_INDEX.sub(lambda m: f"CREATE {m.group(1) or ''}INDEX CONCURRENTLY ", sql)
        return "DROP INDEX CONCURRENTLY " + sql[len("DROP INDEX "):] \
            if sql.startswith("DROP INDEX ") else sql
    return evolve(plan, statements=tuple(evolve(s, sql=online(s.sql), transactional=False)
                                         for s in plan.statements))


# ════════════════════════════════════════════════════════════════════════════════════════════
# §13 Drift
# Both schemas read at once as §11 models (owners and grants too with --privileges), compared
# object by object; confiture's tracking tables are ignored. Schema
# sources report their git commits (read from .git, no git needed).
# ════════════════════════════════════════════════════════════════════════════════════════════

# ── schema sources and their checkouts (multi-repo) ───────────────────────────────────────


@record(frozen=True)
class GitHead:
    """Where a checkout's HEAD points: commit (None on an unborn branch), branch (None when
    detached), and the checkout's top folder."""

    commit: str | None
    branch: str | None
    root: Path


@record(frozen=True)
class SourceInfo:
    name: str
    path: Path
    files: int
    git: GitHead | None

    def describe(self, root: Path) -> str:
        try:
            where = os.path.relpath(self.path, root)
        except ValueError:
            where = str(self.path)
        text = f"{self.name}: {where}, {self.files} files"
        if self.git:
            commit = self.git.commit[:12] if self.git.commit else "no commits"
            text += f", git {commit}" + (f" on {self.git.branch}" if self.git.branch
                                         else " (detached)")
        return text

    def as_json(self) -> dict[str, Any]:
        git = None if self.git is None else {"commit": self.git.commit, "branch": self.git.branch,
                                             "root": str(self.git.root)}
        return {"name": self.name, "path": str(self.path), "files": self.files, "git": git}


def find_git_dir(folder: Path) -> tuple[Path, Path] | None:
    """(checkout top, git dir) of the checkout holding `folder`. A '.git' file (worktrees,
    submodules) points at the real git dir."""
    for top in (folder, *folder.parents):
        dotgit = top / ".git"
        try:
            if dotgit.is_dir():
                return top, dotgit
            if dotgit.is_file():
                text = dotgit.read_text(encoding="utf-8", errors="replace").strip()
                if not text.startswith("gitdir:"):
                    return None
                gitdir = Path(text[len("gitdir:"):].strip())
                return top, gitdir if gitdir.is_absolute() else (top / gitdir).resolve()
        except OSError:
            return None
    return None


def read_git_head(folder: Path) -> GitHead | None:
    """The commit checked out around `folder`, read from the git files (loose refs, packed
    refs, worktrees' commondir); None outside a checkout."""
    found = find_git_dir(folder)
    if found is None:
        return None
    top, gitdir = found
    try:
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    try:
        common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    except OSError:
        common = gitdir
    if not head.startswith("ref:"):
        return GitHead(head or None, None, top)
    ref = head[len("ref:"):].strip()
    return GitHead(_resolve_git_ref(gitdir, common, ref), ref.removeprefix("refs/heads/"), top)


def _resolve_git_ref(gitdir: Path, common: Path, ref: str, depth: int = 0) -> str | None:
    for base in (gitdir, common):
        try:
            value = (base / ref).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if value.startswith("ref:") and depth < 5:
            return _resolve_git_ref(gitdir, common, value[4:].strip(), depth + 1)
        return value or None
    try:
        packed = (common / "packed-refs").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and not line.startswith(("#", "^")):
            return sha
    return None


def describe_sources(config: Config, fileset: FileSet | None = None) -> list[SourceInfo]:
    """Each schema source in build order, with its file count and git commit."""
    infos = []
    for source in config.schema:
        files = 0
        if fileset is not None:
            files = sum(1 for f in fileset.files
                        if f.kind == "schema" and f.path.is_relative_to(source.path))
        infos.append(SourceInfo(source.name, source.path, files, read_git_head(source.path)))
    return infos


# ── confiture's own tables ────────────────────────────────────────────────────────────────

# Tables confiture itself writes into a project's databases. They are never drift. The
# migrations table comes from [migrations] table; the others live beside it (or in public).
def tracking_tables(config: Config) -> frozenset[tuple[str, str]]:
    """(schema, table) of every table confiture keeps in a project database: §8's tracking
    table and its log, §16's deploy record ([deploy] table)."""
    qualifier, _ = parse_table_name(config.migrations_table)
    found = set()
    for schema, table in own_tables(config):  # unqualified: the tracking table's schema
        for where in {schema or qualifier or "public", schema or "public"}:
            found.add((where, table))
    return frozenset(found)


@record(frozen=True)
class Difference:
    """One object that differs. 'added': only in the database being checked; 'missing': only
    in the reference (the DDL, or the other env); 'changed': in both, with different text."""

    change: str
    type: str
    schema: str
    name: str
    summary: tuple[str, ...]
    diff: str
    label_text: str = ""  # names as SQL writes them: 'index public.users_email'

    @property
    def label(self) -> str:
        return self.label_text

    def as_json(self) -> dict[str, Any]:
        return {"change": self.change, "object": self.label, "type": self.type,
                "schema": self.schema, "name": self.name, "summary": list(self.summary),
                "diff": self.diff}


@record(frozen=True)
class DriftReport:
    """A comparison of `actual` (the env's database) with `expected` (its DDL build, or
    another env's database)."""

    actual: str
    expected: str
    reference: str  # short name of `expected` for messages: "the DDL", "env staging"
    differences: tuple[Difference, ...]
    seconds: float = 0.0
    cached: bool = False  # the DDL's catalog came from the cache (see drift_cache_path)

    def counts(self) -> dict[str, int]:
        return {change: sum(1 for d in self.differences if d.change == change)
                for change in ("added", "missing", "changed")}

    def as_json(self) -> dict[str, Any]:
        return {"actual": self.actual, "expected": self.expected,
                "identical": not self.differences, "counts": self.counts(),
                "differences": [d.as_json() for d in self.differences],
                "seconds": round(self.seconds, 3), "cached": self.cached}


# ── schema models: compare object by object (pure) ────────────────────────────────────────
# diff reads both schemas as §11 models (one catalog query each: ~0.09 s for a 200-table
# schema where pg_dump -s takes ~0.2 s) and reports them in the dump-era shape: a table's
# columns, defaults and check constraints on the table (column-level detail in the summary),
# every other object on its own, with a unified diff of the DDL that creates it (§12).


def drop_tracking_leftovers(model: SchemaModel, tables: frozenset[tuple[str, str]]
                            ) -> SchemaModel:
    """Leave out the sequences owned by confiture's tracking tables, and their schema when
    nothing else lives in it (the tables themselves, with their columns, constraints and
    indexes, are left out by the catalog query)."""
    names = {f"{_catalog_ident(schema)}.{_catalog_ident(table)}" for schema, table in tables}
    owned = {k for k, o in model.objects.items() if o.kind == "sequence" and
             str(o.facts.get("owned_by") or "").rsplit(".", 1)[0] in names}
    used = {o.schema for k, o in model.objects.items() if o.kind != "schema" and k not in owned
            and o.parent not in owned}
    lonely = {_catalog_ident(schema) for schema, _ in tables if schema != "public"} - used
    if not owned and not lonely:
        return model
    gone = owned | {f"schema {name}" for name in lonely}
    return SchemaModel(objects={k: o for k, o in model.objects.items() if k not in gone
                                and not (o.kind in HANGERS_ON and o.parent in gone)})


def _catalog_ident(name: str) -> str:
    """A name as the catalog queries write it (PostgreSQL's quote_ident: quoted only when
    needed; our own table names are never keywords)."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else quote_ident(name)


def diff_unit(obj: DbObject) -> str:
    """The key a difference in `obj` is reported on: columns, defaults and check
    constraints on their table (pg_dump writes them into its CREATE TABLE), the rest alone."""
    if obj.kind in ("column", "default", "owner") or (obj.kind == "constraint" and
                                                      obj.facts.get("type") == "c"):
        return obj.parent
    return obj.key


_DIFF_TYPES = {"schema": "SCHEMA", "extension": "EXTENSION", "sequence": "SEQUENCE",
               "table": "TABLE", "index": "INDEX", "trigger": "TRIGGER", "policy": "POLICY",
               "acl": "ACL", "wrapper": "FOREIGN DATA WRAPPER", "server": "SERVER",
               "foreign_table": "FOREIGN TABLE", "event_trigger": "EVENT TRIGGER"}


def diff_type(obj: DbObject) -> str:
    """The object's type as pg_dump names it (diff's JSON 'type')."""
    f = obj.facts
    if obj.kind == "type":
        return "DOMAIN" if f.get("type") == "d" else "TYPE"
    if obj.kind == "function":
        return "PROCEDURE" if f.get("prokind") == "p" else "FUNCTION"
    if obj.kind == "view":
        return "MATERIALIZED VIEW" if f.get("relkind") == "m" else "VIEW"
    if obj.kind == "constraint":
        return "FK CONSTRAINT" if f.get("type") == "f" else "CONSTRAINT"
    if obj.kind == "other":
        return str(f.get("type", "other")).upper()
    return _DIFF_TYPES.get(obj.kind, obj.kind.upper())


def diff_label(obj: DbObject) -> str:
    """'table public.users', 'fk constraint users_m_fkey on public.users', 'extension pg_trgm'."""
    return ident(obj) if obj.kind == "other" else f"{diff_type(obj).lower()} {ident(obj)}"


def unit_body(head: DbObject, model: SchemaModel) -> str:
    """The DDL that creates a reported object (a table with its checks), then its comments:
    what the unified diff of a changed object compares."""
    create = OBJECT_KINDS[head.kind].create(head, model)
    lines = list(create) if create is not None else [str(head.facts.get("def") or "")]
    members = [head]
    if head.kind == "table":
        members += table_columns(head, model)
        lines += [s for c in sorted((o for o in model.objects.values() if o.parent == head.key
                                     and o.kind == "constraint" and o.facts.get("type") == "c"),
                                    key=lambda o: o.key)
                  for s in OBJECT_KINDS["constraint"].create(c, model) or []]
    for obj in members:
        target = OBJECT_KINDS[obj.kind].comment_on
        if target is not None and obj.comment is not None:
            lines.append(f"COMMENT ON {target(obj)} IS {quote_literal(obj.comment)}")
    owner = model.objects.get(f"owner {head.key}")
    if owner is not None:  # with --privileges: pg_dump writes it with the object
        lines += create_owner(owner, model)
    return "\n".join(f"{line.rstrip().rstrip(';')};" for line in lines if line)


def _column_facts(column: DbObject, default: DbObject | None) -> dict[str, str]:
    f = column.facts
    out = {"type": f["type"], "collation": f["collation"] or "none",
           "default": default.facts["expr"] if default is not None else "none",
           "generated": f["expression"] if f["generated"] else "none",
           "identity": {"a": "always", "d": "by default"}.get(f["identity"], "none"),
           "not null": "yes" if f["notnull"] else "no"}
    return out


def _column_text(column: DbObject, model: SchemaModel) -> str:
    default = model.objects.get(f"default {ident(column)}")
    return column_definition(column, default).split(" ", 1)[1]


def summarize_table_change(old: DbObject, new: DbObject, expected: SchemaModel,
                           actual: SchemaModel) -> list[str]:
    """Column-level detail of a changed table ('added' = only in the database checked)."""
    before = {c.name: c for c in table_columns(old, expected)}
    after = {c.name: c for c in table_columns(new, actual)}
    lines = [f"column {n} added ({_column_text(c, actual)})" for n, c in after.items()
             if n not in before]
    for name, column in before.items():
        if name not in after:
            lines.append(f"column {name} missing ({_column_text(column, expected)})")
            continue
        a = _column_facts(column, expected.objects.get(f"default {ident(column)}"))
        b = _column_facts(after[name], actual.objects.get(f"default {ident(after[name])}"))
        lines += [f"column {name}: {attr} {a[attr]} → {b[attr]}" for attr in a
                  if a[attr] != b[attr]]
        if column.comment != after[name].comment:
            lines.append(f"column {name}: comment changed")
    common = [c for c in old.facts.get("columns") or [] if c in (new.facts.get("columns") or [])]
    if common != [c for c in new.facts.get("columns") or [] if c in common]:
        lines.append("column order differs")
    checks = [{o.name: o.facts["def"] for o in m.objects.values() if o.parent == t.key
               and o.kind == "constraint" and o.facts.get("type") == "c"}
              for m, t in ((expected, old), (actual, new))]
    for name in sorted(checks[0].keys() | checks[1].keys()):
        if name not in checks[0]:
            lines.append(f"constraint {name} added")
        elif name not in checks[1]:
            lines.append(f"constraint {name} missing")
        elif checks[0][name] != checks[1][name]:
            lines.append(f"constraint {name} changed")
    o, n = old.facts, new.facts
    if (o.get("rls"), o.get("force_rls")) != (n.get("rls"), n.get("force_rls")):
        lines.append(f"row level security {_rls(o)} → {_rls(n)}")
    if any(o.get(k) != n.get(k) for k in ("relkind", "persistence", "options", "partition_by",
                                          "bound", "parents")):
        lines.append("table options differ (partitioning, inheritance or storage)")
    if old.comment != new.comment:
        lines.append("comment changed")
    return lines


def _rls(facts: Mapping[str, Any]) -> str:
    return "forced" if facts.get("force_rls") else "on" if facts.get("rls") else "off"


def _fold_grants(units: Mapping[str, None], e: Mapping[str, DbObject],
                 a: Mapping[str, DbObject]) -> dict[str, str]:
    """acl unit → the unit it is folded into: the grants of an object that is added or
    missing as a whole go with it ('with its grants'), as the dump diff did."""
    folded = {}
    for unit in units:
        obj = e.get(unit) or a[unit]
        if obj.kind != "acl" or not obj.parent or (unit in e) == (unit in a):
            continue
        owner = (e if unit in e else a).get(obj.parent)
        host = diff_unit(owner) if owner is not None else ""
        if host in units and (host in e) != (host in a):
            folded[unit] = host
    return folded


def _owner_change(unit: str, e: Mapping[str, DbObject], a: Mapping[str, DbObject]) -> list[str]:
    before, after = e.get(f"owner {unit}"), a.get(f"owner {unit}")
    if before is None or after is None or before.facts["owner"] == after.facts["owner"]:
        return []
    return [f"owner {before.facts['owner']} → {after.facts['owner']}"]


def _acl_change(old: DbObject, new: DbObject) -> list[str]:
    """'granted SELECT to reader', 'revoked EXECUTE from PUBLIC' (granted = only in the
    database checked, as 'added')."""
    if old.kind != "acl":
        return []
    before, after = set(old.facts["acl"] or []), set(new.facts["acl"] or [])
    return [f"granted {e.rpartition('=')[2]} to {e.rpartition('=')[0]}"
            for e in sorted(after - before)] + \
        [f"revoked {e.rpartition('=')[2]} from {e.rpartition('=')[0]}"
         for e in sorted(before - after)]


def compare_model_objects(expected: SchemaModel, actual: SchemaModel,
                          expected_label: str = "ddl", actual_label: str = "database"
                          ) -> list[Difference]:
    """diff on models: each reported object (diff_unit) that is only in one model, or whose
    own facts or folded members differ, sorted by schema, name and type like the dump diff."""
    import difflib

    e, a = expected.objects, actual.objects
    units: dict[str, None] = {}
    for key in e.keys() | a.keys():
        if key not in e or key not in a or not e[key].same_as(a[key]):
            units[diff_unit(e.get(key) or a[key])] = None
    folded = _fold_grants(units, e, a)
    found = []
    for unit in units:
        old, new = e.get(unit), a.get(unit)
        head = old or new
        assert head is not None
        change = "added" if old is None else "missing" if new is None else "changed"
        if unit in folded or (old is not None and new is not None and head.kind == "acl" and
                              {**old.facts, "owner": ""} == {**new.facts, "owner": ""}):
            continue  # an owner's change is reported on its object (the entries follow it)
        before = unit_body(old, expected) if old is not None else ""
        after = unit_body(new, actual) if new is not None else ""
        diff = "\n".join(difflib.unified_diff(before.split("\n") if old else [],
                                              after.split("\n") if new else [],
                                              expected_label, actual_label, lineterm="", n=3))
        if old is not None and new is not None:
            summary = summarize_table_change(old, new, expected, actual) \
                if head.kind == "table" else ([] if old.comment == new.comment
                                              else ["comment changed"])
            summary += _owner_change(unit, e, a) + _acl_change(old, new)
        else:
            summary = ["with its comment"] if head.comment is not None else []
            summary += ["with its grants"] if unit in folded.values() else []
        name = f"{head.parent.rsplit('.', 1)[-1]} {head.name}" \
            if head.kind in ("constraint", "trigger", "policy") else head.name \
            if head.kind == "acl" else ident(head).removeprefix(f"{head.schema}." if head.schema
                                                                else "")
        label = diff_label(head)
        if head.kind == "acl":
            on = e.get(head.parent) or a.get(head.parent)
            label = f"acl on {diff_label(on) if on is not None else head.name}"
        found.append(Difference(change, diff_type(head), head.schema, name, tuple(summary),
                                diff, label_text=label))
    return sorted(found, key=lambda d: (d.schema, d.name, d.type))


# ── schema models: run (thin) ─────────────────────────────────────────────────────────


def read_catalog_text(ws: Workspace, dbname: str, privileges: bool = False,
                      on_part: Callable[[str], None] | None = None) -> str:
    """The catalog's JSON of one database of the workspace's server (§11), confiture's own
    tables left out (owners and grants only with `privileges`): what a model is made of, and
    what the drift cache keeps. `on_part`: see catalog_json."""
    with ws.client.session(dbname) as session:
        return catalog_json(session, tracking_tables(ws.config), privileges, on_part)


def model_of(ws: Workspace, text: str) -> SchemaModel:
    return drop_tracking_leftovers(model_from_catalog(catalog_rows(text)),
                                   tracking_tables(ws.config))


class CatalogPair:
    """Two catalogs read at once by two threads (side 0 the reference, side 1 the checked
    database), each side's model built by the thread that reads it, part by part as
    catalog_json's answers arrive: tables and columns are parsed while the server is still
    at work on the rest, and the side that arrives first while the other is still read.
    Not parsed: a part that the other side already has, the same, at the same place (a
    database cloned from its template and unchanged: same oids, same rows), unless the
    whole texts turn out to differ. The same texts have no differences. Without
    `speculate`, a side is parsed only once the other has shown a difference: for pairs that
    are most often the same (an env and its template), where parsing ahead would take a core
    from the other side's server (~20 ms of CPU on a 200-table first `diff` after a build)."""

    def __init__(self, ws: Workspace, speculate: bool = True) -> None:
        import threading

        self._ws = ws
        self._speculate = speculate
        self._lock = threading.Lock()
        self.texts: list[str | None] = [None, None]
        self._parts: list[list[str]] = [[], []]
        self._parsed = [0, 0]  # parts read into objects, in order
        self._objects: list[dict[str, DbObject]] = [{}, {}]
        self._by_oid: list[dict[tuple[str, int, int], str]] = [{}, {}]
        self._depends: list[list[Any]] = [[], []]
        self._models: list[SchemaModel | None] = [None, None]

    def read(self, side: int, ws: Workspace, dbname: str, privileges: bool) -> str:
        """Read one side from a database of `ws`'s server (in the calling thread)."""
        return self.arrived(side, read_catalog_text(ws, dbname, privileges, self.reader(side)))

    def reader(self, side: int) -> Callable[[str], None]:
        """catalog_json's `on_part` for one side."""
        return lambda part: self._arrived_part(side, part)

    def _arrived_part(self, side: int, part: str) -> None:
        with self._lock:
            self._parts[side].append(part)
            mine = "[" + ",\n".join(self._parts[side])
            other = self.texts[1 - side] or "[" + ",\n".join(self._parts[1 - side])
            known = self.texts[1 - side] is not None or \
                len(self._parts[1 - side]) >= len(self._parts[side])
        # JSON objects end where they balance: the other side holds this very part at this
        # place when its text so far starts with ours
        if not other.startswith(mine) and (known or self._speculate):
            self._parse_parts(side)  # with any earlier part skipped: the texts differ

    def _parse_parts(self, side: int) -> None:
        for part in self._parts[side][self._parsed[side]:]:
            rows = json.loads(part)
            read_catalog_objects(rows, self._objects[side], self._by_oid[side])
            self._depends[side] += rows.get("depends", [])
            self._parsed[side] += 1

    def arrived(self, side: int, text: str) -> str:
        """Keep one side's whole text (called by the thread that read it, or with a kept
        catalog) and finish its model, unless the other side arrived first with the same
        text."""
        with self._lock:
            self.texts[side] = text
            other = self.texts[1 - side]
        if other != text and (other is not None or self._speculate):
            self._models[side] = self._finish(side)
        return text

    def _finish(self, side: int) -> SchemaModel:
        text = self.texts[side]
        assert text is not None
        if not self._parts[side]:  # a kept catalog: read whole, not in parts
            return model_of(self._ws, text)
        self._parse_parts(side)
        model = link_catalog_objects(self._objects[side], self._by_oid[side],
                                     self._depends[side])
        return drop_tracking_leftovers(model, tracking_tables(self._ws.config))

    @property
    def same(self) -> bool:
        return self.texts[0] == self.texts[1]

    def model(self, side: int) -> SchemaModel:
        built = self._models[side]
        return built if built is not None else self._finish(side)


def read_database_model(ws: Workspace, dbname: str, privileges: bool = False) -> SchemaModel:
    """The schema model of one database of the workspace's server, confiture's own tables
    (and their schema when nothing else lives there) left out."""
    return model_of(ws, read_catalog_text(ws, dbname, privileges))


def dump_schema(client: Client, dbname: str, privileges: bool) -> str:
    """`pg_dump --schema-only` of one database, as text."""
    proc = client.run(dump_schema_argv(client.tools, client.conn, privileges), dbname)
    if proc.returncode != 0:
        text = proc.stderr.decode("utf-8", "replace").strip()
        text = mask_password_in(text, client.password)
        text = re.sub(r"^pg_dump: (error: )?", "", text)
        where = client.conn.with_params(dbname=dbname).display(client.environ)
        if never_connected(text):
            raise connection_failure(text, where)
        raise PgError(f"pg_dump of {dbname} failed: {text}")
    return proc.stdout.decode("utf-8", "replace")


SCRATCH_INFIX = "_scratch_"


def template_seeds(env: Env) -> bool:
    """Which template stands for an env's DDL: the one reset/clone use (with its seed sets) for
    unprotected envs, the schema-only one deploy uses for protected envs."""
    return not env.protected


def drop_stale_scratch(ws: Workspace, session: Session) -> list[str]:
    """Drop scratch databases left by killed runs (their advisory lock is free)."""
    prefix = ws.config.project + SCRATCH_INFIX
    dropped = []
    for row in session.query("SELECT datname FROM pg_database WHERE "
                             f"starts_with(datname, {quote_literal(prefix)})"):
        lock = f"scratch:{row['datname']}"
        if session.value(f"SELECT pg_try_advisory_lock({lock_key_sql(lock)})"):
            try:
                drop_database(session, row["datname"], force=True)
                dropped.append(row["datname"])
            finally:
                release_lock(session, lock)
    return dropped


@record()
class ScratchDatabase:
    """A throwaway database for one run, locked while in use and dropped afterwards, even on
    failure or Ctrl-C (a killed run's leftovers are dropped by the next run)."""

    ws: Workspace
    session: Session
    template: str
    strategy: str | None
    name: str = ""

    def __enter__(self) -> str:
        import secrets

        drop_stale_scratch(self.ws, self.session)
        self.name = f"{self.ws.config.project}{SCRATCH_INFIX}{secrets.token_hex(4)}"
        check_clone_target(self.ws, self.name)
        acquire_lock(self.session, f"scratch:{self.name}", 5.0, f"scratch database {self.name}")
        try:
            self.session.execute(
                f"CREATE DATABASE {quote_ident(self.name)} TEMPLATE {quote_ident(self.template)}"
                + (f" STRATEGY {self.strategy}" if self.strategy else ""))
        except BaseException:
            release_lock(self.session, f"scratch:{self.name}")
            raise
        return self.name

    def __exit__(self, *exc: object) -> None:
        interrupted = isinstance(exc[1], (KeyboardInterrupt, Interrupted))
        try:
            if interrupted:  # the session may be mid-statement: cancel it, drop from a new one
                self.session.cancel()
                with admin_session(self.ws) as fresh:
                    drop_database(fresh, self.name, force=True)
            else:
                drop_database(self.session, self.name, force=True)
                release_lock(self.session, f"scratch:{self.name}")
        except ConfitureError as error:
            if exc[0] is None:
                raise
            self.ws.console.warn(f"could not drop scratch database {self.name}: {error.message}")


def _template_label(result: TemplateResult) -> str:
    return f"ddl ({result.name})"


DRIFT_CACHE_FORMAT = 1


def drift_cache_path(ws: Workspace, template: str, probe: Mapping[str, Any],
                     variant: str) -> Path:
    """Where the catalog's JSON of a template is kept (variant 'model', or 'privileges' with
    owners and grants). A published template never changes, so it is reusable
    while the template (name, database oid and build time: a rebuild within the same second
    as the build it replaces differs by its oid), the server and the pg_dump binary stay the
    same; all of them are in the file name's key (and, for a model, the catalog query)."""
    try:
        built_at = json.loads(probe.get("comment") or "{}").get("built_at")
    except (ValueError, AttributeError):
        built_at = None
    try:
        binary = os.stat(ws.client.tools.pg_dump)
        tool = (ws.client.tools.pg_dump, binary.st_size, binary.st_mtime_ns)
    except OSError:
        tool = (ws.client.tools.pg_dump, 0, 0)
    # a kept model is that query's output
    query = sha256_bytes(model_catalog_sql(tracking_tables(ws.config),
                                           variant == "privileges").encode())
    key = json.dumps([DRIFT_CACHE_FORMAT, template, probe.get("oid"), built_at,
                      probe.get("version"), ws.env.conn.server_identity(ws.client.environ), tool,
                      variant, query])
    return ws.config.state_dir / "drift" / \
        f"{template}.{variant}.{sha256_bytes(key.encode())[:16]}.json"


def read_drift_cache(path: Path) -> str | None:
    """A kept catalog, if whole: caches are written without fsync, and after a crash a file
    can exist with none or part of its data; its last line is the sha256 of the rest (~1 ms
    to check; parsing the JSON to prove it whole cost ~15 ms for 200 tables)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, _, digest = text.rstrip("\n").rpartition("\n")
    return body if body and sha256_bytes(body.encode()) == digest else None


def write_drift_cache(path: Path, text: str, config: Config) -> None:
    """Keep the catalog, its sha256 last, and clean the folder (prune_drift_cache: after a
    catalog read, never on the path of a kept one). Best effort: a cache that cannot be
    written only costs time."""
    data = text.encode("utf-8")
    data += f"\n{sha256_bytes(data)}\n".encode()
    try:
        write_atomic(path, data)
    except InputError:
        return
    prune_drift_cache(config, keep=path)


# <template>.<variant>.<key>.json (drift_cache_path); write_atomic's .<name>.<pid>.tmp
_DRIFT_CACHE_NAME = re.compile(r"^(.+_[0-9a-f]{12})\.(model|privileges)\.[0-9a-f]{16}\.json$")
_DRIFT_CACHE_TEMP = re.compile(r"^\..*\.(\d+)\.tmp$")


def template_env(config: Config, template: str) -> str | None:
    """The configured env a template name (template_name) is of; None for none of them (an
    env since removed or renamed, another project name)."""
    for env in config.envs:
        rest = template.removeprefix(template_prefix(config.project, env))
        if rest != template and re.fullmatch(r"[0-9a-f]{12}", rest):
            return env
    return None


def prune_drift_cache(config: Config, keep: Path | None = None,
                      dropped: Sequence[str] = ()) -> list[Path]:
    """Remove the kept catalogs nothing reads again: those of a template in `dropped`, of no
    configured env, in a name this version does not write, and, when `keep` (the file just
    written) is given, its env's older ones of the same variant (another template or an older
    key); and the temporary files of writers that died. A file being written is never
    touched: it has its temporary name until complete, with the pid of a live process.
    One listing of a folder of a few files per env."""
    folder = config.state_dir / "drift"
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    kept = _DRIFT_CACHE_NAME.match(keep.name) if keep is not None else None
    kept_env = template_env(config, kept.group(1)) if kept else None
    removed = []
    for name in names:
        temp = _DRIFT_CACHE_TEMP.match(name)
        found = _DRIFT_CACHE_NAME.match(name)
        env = template_env(config, found.group(1)) if found else None
        if temp:
            doomed = not pid_alive(temp.group(1))
        elif found is None or env is None or found.group(1) in dropped:
            doomed = True
        else:
            doomed = kept is not None and name != kept.group(0) and env == kept_env and \
                found.group(2) == kept.group(2)
        if doomed:
            try:
                (folder / name).unlink()
                removed.append(folder / name)
            except OSError:
                pass  # gone already, or not ours to remove: it only costs space
    return removed


def template_model(ws: Workspace, session: Session, result: TemplateResult,
                   probe: Mapping[str, Any], privileges: bool = False
                   ) -> tuple[SchemaModel, bool]:
    """(schema model of a template, from cache?): see template_catalog."""
    text, cached = template_catalog(ws, session, result, probe, privileges)
    return model_of(ws, text), cached


def template_catalog(ws: Workspace, session: Session, result: TemplateResult,
                     probe: Mapping[str, Any], privileges: bool = False,
                     on_part: Callable[[str], None] | None = None) -> tuple[str, bool]:
    """(catalog JSON of a template, from cache?): kept (drift_cache_path, variant 'model', or
    'privileges' with owners and grants); the first time it is read in place (_in_template),
    or from a scratch clone by a role that does not own the template (`on_part`: see
    catalog_json; a kept catalog comes whole)."""
    cache = drift_cache_path(ws, result.name, probe, "privileges" if privileges else "model")
    text = read_drift_cache(cache)
    if text is not None:
        return text, True
    drop_stale_scratch(ws, session)
    try:
        text = _in_template(ws, session, result.name,
                            lambda: read_catalog_text(ws, result.name, privileges, on_part))
    except SqlError as exc:
        if exc.sqlstate != "42501":  # insufficient_privilege: not the template's owner
            raise
        with ScratchDatabase(ws, session, result.name,
                             clone_strategy(ws.config, probe)) as scratch:
            text = read_catalog_text(ws, scratch, privileges, on_part)
    write_drift_cache(cache, text, ws.config)
    return text, False


def _in_template(ws: Workspace, session: Session, name: str, work: Callable[[], _T]) -> _T:
    """Run `work` (a dump, a catalog read) on a template itself: connections are allowed for
    the ~0.1 s it takes, under a lock so that concurrent diffs take turns. A clone started
    meanwhile is not refused: CREATE DATABASE waits up to 5 s for other sessions on its
    template to end. (A scratch clone costs ~1 s for a 1,000-relation template: more than
    the read itself.)"""
    lock = f"template-dump:{name}"
    acquire_lock(session, lock, ws.config.template_lock_timeout, f"the dump of template {name}")
    try:
        session.execute(f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS true")
        try:
            return work()
        finally:
            session.execute(f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS false")
    finally:
        release_lock(session, lock)


def diff_against_ddl(ws: Workspace, privileges: bool = False) -> DriftReport:
    """The env's live database against the schema its files build, as models: the env's
    template is made current and its model read from the cache or, the first time after a
    build, in place (template_model); the live catalog is read meanwhile. With privileges,
    owners and grants are read and compared too."""
    started = time.monotonic()
    scratch = scratch_workspace(ws)  # a protected env's template is built elsewhere
    pair = CatalogPair(ws, speculate=False)  # most often a clone of its template
    with admin_session(scratch) as session:
        require_database(ws, session if scratch is ws else None)
        live = Background(lambda: pair.read(1, ws, ws.env.database, privileges))
        try:
            result, probe = ensure_template(scratch, seeds=template_seeds(ws.env),
                                            session=session, cached=True)
            expected, cached = template_catalog(scratch, session, result, probe, privileges,
                                                pair.reader(0))
            pair.arrived(0, expected)
        finally:
            live.wait()
    live.result()
    label = f"{ws.env.database} (env {ws.env.name})"
    diffs = compare_catalogs(pair, _template_label(result), label)
    return DriftReport(label, _template_label(result), "the DDL", tuple(diffs),
                       time.monotonic() - started, cached)


def compare_catalogs(pair: CatalogPair, expected_label: str,
                     actual_label: str) -> list[Difference]:
    """Two catalogs compared as models (side 0 expected). The same text has no differences:
    ~40 ms of parsing and model building saved for 200 tables (see CatalogPair)."""
    if pair.same:
        return []
    return compare_model_objects(pair.model(0), pair.model(1), expected_label, actual_label)


def diff_against_env(ws: Workspace, other: Workspace, privileges: bool = False) -> DriftReport:
    """The env's live database against another env's live database: both catalogs read at
    once, compared as models (owners and grants too with `privileges`)."""
    started = time.monotonic()
    pair = CatalogPair(ws)
    run_concurrently([lambda: pair.read(1, ws, ws.env.database, privileges),
                      lambda: pair.read(0, other, other.env.database, privileges)])
    label = f"{ws.env.database} (env {ws.env.name})"
    reference = f"{other.env.database} (env {other.env.name})"
    return DriftReport(label, reference, f"env {other.env.name}",
                       tuple(compare_catalogs(pair, reference, label)),
                       time.monotonic() - started)


def diff_migrations(ws: Workspace, privileges: bool = False,
                    base: Workspace | None = None) -> DriftReport:
    """Prove that migrations and DDL agree: apply every pending migration to a scratch
    database and compare it with the env's schema-only DDL build. The scratch database starts
    empty (histories that build everything from nothing), from [migrations] baseline_schema
    when it is set (histories that start from an existing schema), or, with `base`, as a
    schema copy of that env's database with its applied migrations recorded (a preview of
    deploying there). Both are built on the env's scratch server (scratch_workspace)."""
    started = time.monotonic()
    side = FromSide(base=base, baseline=ws.config.migrations_baseline)
    ws = scratch_workspace(ws)
    with admin_session(ws) as session:
        result, probe = ensure_template(ws, seeds=False, session=session)
        expected = template_model(ws, session, result, probe, privileges)[0]
        with ScratchDatabase(ws, session, "template0", clone_strategy(ws.config, probe)) \
                as migrated_db:
            applied = side.fill(ws, migrated_db, privileges)
            actual = read_database_model(ws, migrated_db, privileges)
    if base is not None:
        start = f"env {base.env.name} at {applied_migration_version(base) or 'no migration'}"
    else:
        start = side.origin() if side.baseline is not None else "empty"
    label = f"migrations ({applied} applied to {start})"
    return DriftReport(label, _template_label(result), "the DDL", tuple(
        compare_model_objects(expected, actual, _template_label(result), label)),
        time.monotonic() - started)


# ── integration with §8 migrations ────────────────────────────────────────────────────────


def apply_all_migrations(ws: Workspace, dbname: str, base_version: int | None = None) -> int:
    """Apply every pending migration (§8) to `dbname`, a scratch database, after recording
    those up to `base_version` as applied; return how many ran. Each one's 'applied' line is
    shown only with -v: said of a scratch copy before a deploy, it reads as if the env's
    database had them already (and a long history buries the run's own output)."""
    console = evolve(ws.console, quiet=ws.console.quiet or not ws.console.verbose)
    scratch = evolve(ws, env=evolve(ws.env, database=dbname), console=console)
    with open_migration_session(scratch) as session:
        if base_version is not None:
            baseline_migrations(scratch, base_version, session=session)
        return len(migrate_up(scratch, session=session, backup=False).done)


@record(frozen=True)
class FromSide:
    """Where a replay starts (diff --migrations, migrate generate, the guard): the migrations
    replayed on an empty database, on the configured baseline schema, or on a schema copy of
    `base` with its applied ones recorded; or (generate) a live env's schema as is."""

    base: Workspace | None = None
    live: Workspace | None = None
    baseline: Path | None = None   # a schema file the history starts from

    def origin(self) -> str:
        return f"env {self.base.env.name}'s schema" if self.base is not None else \
            f"baseline {self.baseline.name}" if self.baseline is not None else \
            "an empty database"

    def describe(self, applied: int) -> str:
        if self.live is not None:
            return f"env {self.live.env.name} ({self.live.env.database})"
        return f"migrations ({applied} applied to {self.origin()})"

    def fill(self, ws: Workspace, dbname: str, privileges: bool = False) -> int:
        """Build the `from` schema in the scratch database `dbname` (an env's schema with its
        owners and grants with `privileges`); return how many migrations ran."""
        source = self.live or self.base
        if source is not None:
            ws.client.run_script(dump_schema(source.client, source.env.database, privileges),
                                 dbname)
        elif self.baseline is not None:
            try:
                text = self.baseline.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise InputError(f"migrations.baseline_schema: cannot read "
                                 f"{migration_rel(ws.config, self.baseline)}: {why}",
                                 hint="point it at a SQL file that creates the schema the "
                                      "first migration starts from") from exc
            where = LineMap(chunks=((1, migration_rel(ws.config, self.baseline), 1),))
            ws.client.run_script(text, dbname, where)
        if self.live is not None:
            return 0
        version = applied_migration_version(self.base) if self.base is not None else None
        try:
            return apply_all_migrations(ws, dbname, version)
        except MigrationError as exc:
            # only a history whose first migration fails may start from an existing schema;
            # a later one that fails is a broken migration, whose own error says enough
            if self.base is None and self.baseline is None and not exc.done \
                    and not isinstance(exc, MigrationLockTimeout):
                exc.hint = ("the migrations do not replay from an empty database; if the history "
                            "starts from an existing schema, set [migrations] baseline_schema "
                            "to a file that creates it")
            raise


def applied_migration_version(ws: Workspace) -> int | None:
    """The newest migration applied to the env's database (None: none, or no tracking table)."""
    return migration_status(ws).current


def migrations_summary(ws: Workspace) -> dict[str, Any]:
    """Applied / pending / changed / missing / interrupted migrations of the env's database
    (§8), for status. A database without the tracking table is 'untracked'."""
    try:
        status = migration_status(ws, cached=True)
    except ConfitureError as exc:
        return {"state": "unknown", "error": exc.message}
    if not status.tracking:
        return {"state": "untracked", "table": status.table,
                "pending": 0, "files": len(status.files.migrations)}
    return {"state": "clean" if status.clean else "unclean", "table": status.table,
            "current": status.current, "applied": len(status.applied),
            "pending": len(status.pending), "changed": len(status.changed),
            "missing": len(status.missing), "interrupted": len(status.partial)}


# ════════════════════════════════════════════════════════════════════════════════════════════
# §14 Status and watch
# Status: a read-only look at one env (database, migrations, template, backups, sync, drift).
# Watch: stat-polls the env's folders and resets its database on change.
# ════════════════════════════════════════════════════════════════════════════════════════════

# ── status ────────────────────────────────────────────────────────────────────────────────


def latest_backup(config: Config, env: Env) -> dict[str, Any] | None:
    """The env's newest complete backup (§7b decides what counts), as status shows it."""
    backup = newest_backup(config, env.name)
    if backup is None:
        return None
    return {**as_dict(backup), "file": str(backup.path), "path": str(backup.path)}


def latest_sync(config: Config, env_name: str) -> dict[str, Any] | None:
    """The newest sync report from or into the env (<state_dir>/sync/*.json)."""
    folder = config.state_dir / "sync"
    best: dict[str, Any] | None = None
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or env_name not in (report.get("from"), report.get("to")):
            continue
        when = str(report.get("finished_at") or report.get("started_at") or "")
        if best is None or when >= str(best.get("finished_at") or best.get("started_at") or ""):
            best = {**report, "report": str(path)}
    return best


def parse_utc(text: str) -> float | None:
    """Seconds since the epoch of an ISO UTC timestamp ('2024-05-01T12:00:00Z', '+00:00')."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def format_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@record()
class EnvStatus:
    """Everything `status` knows about one env; `attention` lists what needs a human."""

    env: str
    protected: bool
    url: str
    database: str
    sources: list[dict[str, Any]]
    server: dict[str, Any]
    db: dict[str, Any]
    template: dict[str, Any]
    migrations: dict[str, Any]
    drift: dict[str, Any]
    backup: dict[str, Any] | None
    sync: dict[str, Any] | None
    attention: list[str] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        return bool(self.server.get("reachable"))


def _server_facts(ws: Workspace, fileset: FileSet) -> tuple[dict[str, Any], dict[str, Any],
                                                            dict[str, Any]]:
    """(server, database, template) facts from one admin session; unreachable → a message.
    A protected env's template lives on its scratch server: asked there, in a second session."""
    name = template_name(ws.config.project, ws.env.name, fileset.hash)
    try:
        with admin_session(ws) as session:
            row = session.query(
                "SELECT current_setting('server_version') AS version, "
                f"(SELECT pg_database_size(oid) FROM pg_database WHERE datname = "
                f"{quote_literal(ws.env.database)}) AS size, "
                f"(SELECT count(*) FROM pg_database WHERE datname = "
                f"{quote_literal(ws.env.database)}) AS exists")[0]
            template = None if ws.env.protected else _template_facts(ws, session, fileset)
    except PgError as exc:
        reason = exc.reason if isinstance(exc, ConnectionFailed) else OTHER
        return ({"reachable": False, "error": exc.message, "hint": exc.hint,
                 "reason": reason}, {"exists": None},
                {"name": name, "state": "unknown"})
    if template is None:
        try:
            scratch = scratch_workspace(ws)
            with admin_session(scratch) as session:
                template = _template_facts(scratch, session, fileset)
        except ConfitureError as exc:
            template = {"name": name, "state": "unknown", "error": exc.message}
    return ({"reachable": True, "version": row["version"]},
            {"exists": bool(row["exists"]), "size": row["size"]}, template)


def _template_facts(ws: Workspace, session: Session, fileset: FileSet) -> dict[str, Any]:
    """Is the env's template for these files built (current), is an older one (stale), or none?"""
    name = template_name(ws.config.project, ws.env.name, fileset.hash)
    built = [t for t in list_templates(session, ws.config.project, ws.env.name)
             if t.seeds == fileset.seeds]
    current = any(t.name == name for t in built)
    state = "current" if current else "stale" if built else "missing"
    template: dict[str, Any] = {"name": name, "state": state}
    if built and not current:
        template["newest"] = {"name": built[0].name, "built_at": built[0].built_at}
    return template


def gather_status(ws: Workspace, drift: bool = False, now: float | None = None) -> EnvStatus:
    """A read-only look at one env: nothing is built, created or changed (except with
    `drift`, which makes the env's template current to compare against it)."""
    now = time.time() if now is None else now
    seeds = template_seeds(ws.env)
    fileset = scan_env(ws.config, ws.env.name, seeds=seeds,
                       cache=scan_cache(ws.config, ws.env.name, seeds))
    server, db, template = _server_facts(ws, fileset)
    migrations: dict[str, Any] = {"state": "unknown", "note": "server unreachable"}
    drift_info: dict[str, Any] = {"checked": False}
    if server["reachable"] and db["exists"]:
        migrations = migrations_summary(ws)
        if drift:
            try:
                report = diff_against_ddl(ws)
                drift_info = {"checked": True, "differences": len(report.differences),
                              "counts": report.counts()}
            except ConfitureError as exc:
                drift_info = {"checked": False, "error": exc.message}
    elif server["reachable"]:
        migrations = {"state": "unknown", "note": "no database"}
    backup = latest_backup(ws.config, ws.env)
    if backup and parse_utc(str(backup.get("created_at"))) is not None:
        backup["age_seconds"] = round(now - (parse_utc(str(backup["created_at"])) or now))
    sync = latest_sync(ws.config, ws.env.name)
    status = EnvStatus(
        env=ws.env.name, protected=ws.env.protected, url=ws.env.conn.display(ws.client.environ),
        database=ws.env.database,
        sources=[s.as_json() for s in describe_sources(ws.config, fileset)],
        server=server, db=db, template=template, migrations=migrations, drift=drift_info,
        backup=backup, sync=sync)
    status.attention = needs_attention(status, ws.config.max_backup_age)
    return status


def needs_attention(status: EnvStatus, backup_max_age: float | None) -> list[str]:
    """What `status --check` reports (exit 3): pure, so the rules are easy to read and test."""
    found = []
    if not status.reachable:
        return [f"server unreachable: {status.server.get('error')}"]
    # Advice names the safe command; a destructive one only with what it would destroy.
    if not status.db["exists"]:
        found.append(f"database {status.database} does not exist (create it: 'confiture.py "
                     + ("deploy')" if status.protected else "reset')"))
    if not status.protected and status.template["state"] == "stale":
        found.append("template is stale: the env's files changed since the last build "
                     "(rebuild it: 'confiture.py template'" + (
                         f"; 'confiture.py reset' would recreate {status.database} from it, "
                         "replacing the data it holds)" if status.db["exists"] else ")"))
    mig = status.migrations
    for what in ("pending", "changed", "missing", "interrupted"):
        if mig.get(what):
            found.append(f"{mig[what]} {what} migration(s)" + (
                "" if what != "pending" else " (apply them: 'confiture.py "
                + ("deploy')" if status.protected else "migrate up')")))
    if mig.get("error"):
        found.append(f"migrations: {mig['error']}")
    if status.protected and mig.get("state") == "untracked":
        found.append(f"no migration tracking table {mig.get('table')} "
                     "(adopt the database with 'confiture.py migrate baseline')")
    if status.drift.get("differences"):
        found.append(f"schema drift: {status.drift['differences']} difference(s) from the DDL")
    if status.sync is not None and status.sync.get("ok") is False:
        found.append(f"last sync {status.sync.get('from')} → {status.sync.get('to')} failed: "
                     f"{status.sync.get('error') or 'see ' + str(status.sync.get('report'))}")
    if backup_max_age is not None:
        if status.backup is None:
            found.append("no backup (status.max_backup_age is set)")
        elif status.backup.get("age_seconds", 0) > backup_max_age:
            found.append(f"last backup is {format_age(status.backup['age_seconds'])} old "
                         f"(limit {format_age(backup_max_age)})")
    return found


def format_status(status: EnvStatus) -> list[str]:
    """The one-screen text of `status`."""
    flag = " [protected]" if status.protected else ""
    lines = [f"env {status.env}{flag}  {status.url}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<11}{text}")

    for source in status.sources:
        git = source["git"]
        text = f"{source['name']}  {source['path']}  ({source['files']} files"
        if git:
            text += f", git {(git['commit'] or 'no commits')[:12]}"
            text += f" on {git['branch']}" if git["branch"] else " detached"
        row("source", text + ")")
    server = status.server
    down = server.get("reason", OTHER) in (SERVER_DOWN, OTHER)  # else it answered, and refused
    row("server", f"reachable, PostgreSQL {server['version']}" if server["reachable"]
        else f"{'UNREACHABLE' if down else 'REFUSED'}: {server.get('error')}")
    if server["reachable"]:
        row("database", f"{status.database}, " + (format_bytes(int(status.db["size"] or 0))
                                                   if status.db["exists"] else "does not exist"))
    template = status.template
    text = f"{template['name']}  {template['state']}"
    if "newest" in template:
        text += f" (newest built: {template['newest']['name']} at {template['newest']['built_at']})"
    row("template", text)
    mig = status.migrations
    if mig.get("state") == "unknown":
        row("migrations", f"unknown ({mig.get('note') or mig.get('error')})")
    elif mig.get("state") == "untracked":
        # a build records every migration (how = 'build'), so no table means: no migration
        # files when it was built, or a database made some other way
        row("migrations", f"untracked (no {mig.get('table')} table; " + (
            "the project has no migrations)" if not mig.get("files") else
            f"{mig.get('files')} migration file(s), none recorded here: adopt the database "
            "with 'confiture.py migrate baseline')"))
    else:
        row("migrations", f"at {mig.get('current') or 'none'}: " + ", ".join(
            f"{mig.get(k, 0)} {k}" for k in ("applied", "pending", "changed", "missing")
            if k in ("applied", "pending") or mig.get(k))
            + (f", {mig['interrupted']} interrupted" if mig.get("interrupted") else ""))
    drift = status.drift
    row("drift", f"{drift['differences']} difference(s)" if drift.get("checked") and
        drift.get("differences") else "none" if drift.get("checked") else
        f"unknown ({drift['error']})" if drift.get("error") else "unknown (status --drift checks)")
    backup = status.backup
    row("backup", "none" if backup is None else
        f"{Path(backup['file']).name}, {format_age(backup.get('age_seconds', 0))} ago"
        + (f", {format_bytes(int(backup['size']))}" if backup.get("size") else ""))
    sync = status.sync
    row("sync", "none" if sync is None else
        f"{sync.get('from')} → {sync.get('to')} {'ok' if sync.get('ok') else 'FAILED'}, "
        f"finished {sync.get('finished_at') or sync.get('started_at')}"
        + (f", {sync['rows']} rows" if sync.get("rows") is not None else ""))
    row("attention", "none" if not status.attention else status.attention[0])
    for item in status.attention[1:]:
        row("", item)
    return lines


# ── watch ─────────────────────────────────────────────────────────────────────────────────


@record(frozen=True)
class WatchEvent:
    kind: str                     # "reset", "unchanged", "error", "watching", "stopped"
    message: str
    changed: tuple[str, ...] = ()
    seconds: float = 0.0
    hint: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, "at": utc_now(), "message": self.message,
                "changed": list(self.changed), "seconds": round(self.seconds, 3),
                "hint": self.hint}


def watched_folders(config: Config, env_name: str) -> list[Path]:
    """The folders an env's file set comes from: schema sources and its seed sets."""
    return [s.path for s in config.schema] + \
        [config.seeds_dir / s for s in config.envs[env_name].seeds]


FileState = dict[str, tuple[int, int]]


def snapshot_files(folders: Sequence[Path]) -> FileState:
    """(mtime_ns, size) of every .sql file below the folders; an unreadable folder is a
    state too, so that fixing it counts as a change."""
    state: FileState = {}
    for folder in folders:
        try:
            for _, path in walk_sql_files(folder):
                info = os.stat(path)
                state[str(path)] = (info.st_mtime_ns, info.st_size)
        except (InputError, OSError) as exc:
            state[f"{folder} (unreadable: {exc})"] = (0, 0)
    return state


def changed_files(before: FileState, after: FileState, root: Path) -> tuple[str, ...]:
    """Paths (relative to the project when possible) added, removed or modified."""
    paths = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}

    def show(path: str) -> str:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            return path

    return tuple(sorted(show(p) for p in paths))


def watch_env(ws: Workspace, interval: float, report: Callable[[WatchEvent], None],
              force: bool = False, sleep: Callable[[float], None] = time.sleep,
              cycles: int | None = None) -> None:
    """Reset the env's database now and whenever its files change; errors are reported and
    watching goes on. A change is acted on once two polls `interval` apart agree (editors
    write files in several steps). Returns when interrupted while waiting (Ctrl-C, SIGTERM);
    an interrupt during a rebuild propagates after the usual cleanup."""
    refuse_protected(ws.env, "watch")
    if interval <= 0:
        raise ConfigError("--interval must be positive")
    folders = watched_folders(ws.config, ws.env.name)
    state = snapshot_files(folders)
    last_hash = rebuild_once(ws, (), force, report, None)
    report(WatchEvent("watching", f"watching {len(state)} files in {len(folders)} folders "
                      f"every {format_seconds(interval)} (Ctrl-C to stop)"))
    done = 0
    while cycles is None or done < cycles:
        try:
            current = wait_for_change(folders, state, interval, sleep)
        except KeyboardInterrupt:
            report(WatchEvent("stopped", "stopped watching"))
            return
        changed = changed_files(state, current, ws.config.root)
        state = current
        last_hash = rebuild_once(ws, changed, force, report, last_hash)
        done += 1


def wait_for_change(folders: Sequence[Path], state: FileState, interval: float,
                    sleep: Callable[[float], None]) -> FileState:
    """Poll until the files differ from `state` and two consecutive polls agree."""
    while True:
        sleep(interval)
        current = snapshot_files(folders)
        if current == state:
            continue
        while True:
            sleep(interval)
            again = snapshot_files(folders)
            if again == current:
                return current
            current = again


def rebuild_once(ws: Workspace, changed: tuple[str, ...], force: bool,
                 report: Callable[[WatchEvent], None], last_hash: str | None) -> str | None:
    """One watch cycle: rebuild the template (if the file set changed) and reset the env's
    database. Returns the hash now in the database (None after a failure: retry next time)."""
    started = time.monotonic()
    try:
        fileset = scan_env(ws.config, ws.env.name)
        if fileset.hash == last_hash:
            report(WatchEvent("unchanged", "the env's file set is unchanged "
                              f"(hash {fileset.hash[:12]})", changed))
            return last_hash
        result, _ = reset_env_database(ws, force=force)
    except ConfitureError as exc:
        report(WatchEvent("error", exc.message, changed, time.monotonic() - started, exc.hint))
        return None
    how = f"built {result.name}" if result.built else f"template {result.name} reused"
    report(WatchEvent("reset", f"reset {ws.env.database} ({how}) in "
                      f"{format_seconds(time.monotonic() - started)}", changed,
                      time.monotonic() - started))
    return fileset.hash


# ════════════════════════════════════════════════════════════════════════════════════════════
# §15 Derived migrations
# `migrate generate`: the schema the migrations produce (replayed on a scratch database) and
# the schema the DDL builds (the env's template) are read as models (§11); the planned up and
# down are applied to scratch copies and written only when both reproduce their target
# exactly. `diff --sql`: the plan that turns a database into its reference. The guard: a
# protected env is written only when its schema plus its pending migrations equals the DDL's.
# Scratch work runs on the env's scratch server (§7 scratch_workspace), always dropped.
# ════════════════════════════════════════════════════════════════════════════════════════════

@record(frozen=True)
class GeneratedMigration:
    """What `migrate generate` planned, proved and wrote (`paths` empty: nothing to do)."""

    up: SchemaPlan
    down: SchemaPlan
    source: str                    # where the `from` schema came from
    paths: tuple[str, ...] = ()
    lint_errors: tuple[Finding, ...] = ()  # of the up files written (see lint_errors_of)

    def as_json(self) -> dict[str, Any]:
        return {"created": list(self.paths), "from": self.source,
                "up": [s.sql for s in self.up.statements],
                "down": [s.sql for s in self.down.statements],
                "destructive": [s.sql for s in self.up.destructive],
                "suggestions": list(self.up.suggestions),
                "lint_errors": [f.as_json() for f in self.lint_errors]}


def ddl_model(ws: Workspace, session: Session, privileges: bool = False
              ) -> tuple[SchemaModel, dict[str, Any]]:
    """The schema the env's DDL builds: its schema-only template's model (§13 template_model:
    cached, or read in place); and the template's probe (clone_strategy's input)."""
    result, probe = ensure_template(ws, seeds=False, session=session)
    return template_model(ws, session, result, probe, privileges)[0], probe


def generate_migration(ws: Workspace, name: str, side: FromSide | None = None,
                       renames: Sequence[Rename] = (), allow_destructive: bool = False,
                       online: bool = False, write: bool = True, privileges: bool = False
                       ) -> GeneratedMigration:
    """Plan the migration from the `from` schema to the DDL's, prove it (and its down) on
    scratch copies, then write it. `online`: a second, no-transaction migration builds the
    new indexes of existing tables CONCURRENTLY and validates their new constraints.
    `privileges`: owners and grants are planned (and proved) too.
    Raises CheckFailed (exit 3) listing what the plan cannot express or what stayed
    different, Refused (exit 4) for a destructive plan not allowed."""
    side = side or FromSide()
    scratch = scratch_workspace(ws)
    with admin_session(scratch) as session:
        to_model, probe = ddl_model(scratch, session, privileges)
        with ScratchDatabase(scratch, session, "template0",
                             clone_strategy(ws.config, probe)) as from_db:
            applied = side.fill(scratch, from_db, privileges)
            from_model = read_database_model(scratch, from_db, privileges)
            source = side.describe(applied)
            stages = plan_stages(from_model, to_model, renames, online)
            up, down = _joined([u for u, _ in stages]), _joined([d for _, d in stages])
            check_renames(up, down)
            if not up.statements and not up.unsupported:
                return GeneratedMigration(up=up, down=down, source=source)
            check_plans(up, down, allow_destructive)
            prove_plans(scratch, from_db, probe, stages, from_model, to_model, privileges)
    paths: list[str] = []
    ups: list[Path] = []
    for index, (stage_up, stage_down) in enumerate(stages if write else []):
        label = name if index == 0 else f"{name}_concurrently"
        created = new_migration(ws.config, label, bodies=(
            migration_text(stage_up, f"{source} → DDL"),
            migration_text(stage_down, f"DDL → {source}")))
        paths += [migration_rel(ws.config, p) for p in created]
        ups.append(created[0])
    return GeneratedMigration(up=up, down=down, source=source, paths=tuple(paths),
                              lint_errors=tuple(lint_errors_of(ws, ups)))


def lint_errors_of(ws: Workspace, ups: Sequence[Path]) -> list[Finding]:
    """The lint's error findings (§8b, without a target's facts) on up files just written:
    said at once, since deploy and migrate up on a protected env refuse them (there with
    the env's table sizes) until each statement carries its allow comment."""
    units = [file_unit(path, ws.config.root) for path in ups]
    return list(lint_report(units, None, lint_settings(ws.config, ws.env)).errors)


def plan_stages(old: SchemaModel, new: SchemaModel, renames: Sequence[Rename], online: bool
                ) -> list[tuple[SchemaPlan, SchemaPlan]]:
    """(up, down) of each migration to write: one, or for an online change a transactional
    one to online_stage() and a no-transaction one from there (empty ones left out)."""
    back = [Rename(r.kind, r.new, r.old) for r in reversed(renames)]
    if not online:
        return [(plan_schema(old, new, renames), plan_schema(new, old, back))]
    middle = online_stage(old, new)
    checks = not_null_checks(old, new)
    stages = [(plan_schema(old, middle, renames), plan_schema(middle, old, back)),
              (through_checks(concurrently(plan_schema(middle, new)), checks),
               concurrently(plan_schema(new, middle)))]
    kept = [stage for stage in stages if stage[0].statements or stage[0].unsupported]
    return kept or stages[:1]


def _joined(plans: Sequence[SchemaPlan]) -> SchemaPlan:
    return SchemaPlan(statements=tuple(s for p in plans for s in p.statements),
                      unsupported=tuple(u for p in plans for u in p.unsupported),
                      suggestions=tuple(dict.fromkeys(x for p in plans for x in p.suggestions)))


def check_renames(up: SchemaPlan, down: SchemaPlan) -> None:
    """A --rename that names nothing is a mistake in the command (exit 2), not something
    the plan cannot express: its old name must be in the migrations' schema, its new one in
    the DDL's (the down plan renames back from there)."""
    wrong = [p for p in up.unsupported if p.startswith("--rename:")] + [
        p.replace("the migrated schema", "the DDL's schema") for p in down.unsupported
        if p.startswith("--rename:")]
    if wrong:
        raise ConfigError("; ".join(wrong), hint="--rename column:TABLE.OLD=NEW or "
                          "table:OLD=NEW: OLD as the migrations leave it, NEW as the DDL has it")


def check_plans(up: SchemaPlan, down: SchemaPlan, allow_destructive: bool) -> None:
    """Refuse plans that cannot be expressed or that lose data without permission."""
    missing = sorted(set(up.unsupported) | {f"{p} (down)" for p in down.unsupported})
    if missing:  # a renamed column is a drop+add whose add lands last: say the rename first
        raise CheckFailed("the plan cannot express: " + "; ".join(missing),
                          hint=_rename_hint(up, "write this migration by hand (migrate new)"))
    if up.destructive and not allow_destructive:
        shown = "; ".join(s.sql.split("\n")[0] for s in up.destructive[:5])
        raise Refused(f"the migration would destroy data: {shown}",
                      hint=_rename_hint(up, "if the data may go, add --allow-destructive"))


def _rename_hint(up: SchemaPlan, otherwise: str) -> str:
    return f"a rename? try {' '.join(up.suggestions)}; else {otherwise}" if up.suggestions \
        else otherwise


def prove_plans(ws: Workspace, from_db: str, probe: Mapping[str, Any],
                stages: Sequence[tuple[SchemaPlan, SchemaPlan]], from_model: SchemaModel,
                to_model: SchemaModel, privileges: bool = False) -> None:
    """Apply every up to a copy of `from_db` and compare with `to_model`; apply the downs,
    last first, and compare with `from_model`. Any difference, or a statement PostgreSQL
    refuses, is a CheckFailed naming the objects. (A second admin session: scratch locks are
    per session.)"""
    with admin_session(ws) as session, \
            ScratchDatabase(ws, session, from_db, clone_strategy(ws.config, probe)) as proof:
        ups, downs = [u for u, _ in stages], [d for _, d in reversed(stages)]
        for plans, target, what in ((ups, to_model, "up"), (downs, from_model, "down")):
            for plan in plans:
                _apply_plan(ws, proof, plan, what)
            left = compare_models(target, read_database_model(ws, proof, privileges))
            if left:
                raise CheckFailed(f"the planned {what} migration leaves {len(left)} "
                                  f"difference(s): {'; '.join(left[:20])}",
                                  hint="write this migration by hand (migrate new)")


def _apply_plan(ws: Workspace, dbname: str, plan: SchemaPlan, what: str) -> None:
    transactional = all(s.transactional for s in plan.statements)
    try:
        ws.client.run_script(plan.script(), dbname, single_transaction=transactional)
    except SqlError as exc:
        raise CheckFailed(f"the planned {what} migration fails on a scratch copy: {exc.message}",
                          hint="write this migration by hand (migrate new)") from exc


def migration_text(plan: SchemaPlan, what: str) -> str:
    """A generated migration file: a header, then the statements (destructive ones flagged)."""
    lines = ["-- confiture:no-transaction"] if not all(
        s.transactional for s in plan.statements) else []
    lines += [f"-- generated by confiture migrate generate: {what}",
             "-- proved on scratch copies: applying it reproduces the target schema exactly"]
    return "\n".join(lines + plan_lines(plan)) + "\n"


def plan_lines(plan: SchemaPlan) -> list[str]:
    """The plan's script as a reviewer reads it (a migration file, diff --sql): each statement
    that loses data preceded by `-- destructive: data is lost`."""
    lines = ["SET check_function_bodies = false;"] if plan.script().startswith(
        "SET check_function_bodies") else []
    for statement in plan.statements:
        if statement.destructive:
            lines.append("-- destructive: data is lost")
        lines.append(statement.sql.rstrip().rstrip(";") + ";")
    return lines


# ── the guard: a protected env is written only when the result equals the DDL's schema ───

@record(frozen=True)
class Consistency:
    """Whether the env will have the DDL's schema once written: `differences` (object keys,
    as compare_models writes them) between the DDL's schema and what the migrations make of
    the env (`start` says from where)."""

    differences: tuple[str, ...]
    start: str
    cached: bool = False


def model_digest(model: SchemaModel) -> str:
    """A hash of everything a model compares."""
    text = json.dumps({k: [o.facts, o.comment] for k, o in model.objects.items()},
                      sort_keys=True, default=str)
    return sha256_bytes(text.encode())


def consistency_key(ws: Workspace, first: bool) -> str:
    """What the verdict depends on: the DDL files, the migration files, the baseline file
    and (for a deployed env) the env's schema."""
    files = scan_env(ws.config, ws.env.name, seeds=False)
    migrations = scan_migrations(ws.config.migrations_dir, ws.config.root).migrations
    baseline = ws.config.migrations_baseline
    parts = [files.hash, [(m.version, m.checksum) for m in migrations],
             sha256_bytes(baseline.read_bytes()) if baseline and baseline.is_file() else None,
             "first" if first else model_digest(read_database_model(ws, ws.env.database))]
    return sha256_bytes(json.dumps(parts).encode())


def check_consistency(ws: Workspace, deploying: bool = True) -> Consistency:
    """The guard before a protected env is written: its schema plus its pending migrations
    (or, for a first deploy, the migrations from an empty database or the configured
    baseline_schema) replayed on a scratch database of the scratch server, compared with the
    DDL's schema. A positive verdict is kept, keyed by consistency_key()."""
    target = inspect_target(ws)
    first = deploying and target.first_deploy
    if first and not scan_migrations(ws.config.migrations_dir, ws.config.root).migrations:
        return Consistency(differences=(), start="a build from the DDL (no migrations)")
    side = FromSide(baseline=ws.config.migrations_baseline) if first else FromSide(base=ws)
    key = consistency_key(ws, first)
    cache = ws.config.state_dir / "consistency" / f"{ws.env.name}.{int(first)}.json"
    try:
        if json.loads(cache.read_text(encoding="utf-8")).get("key") == key:
            return Consistency(differences=(), start=side.describe(len(target.pending)),
                               cached=True)
    except (OSError, ValueError, AttributeError):
        pass
    scratch = scratch_workspace(ws)
    with admin_session(scratch) as session:
        expected, probe = ddl_model(scratch, session)
        with ScratchDatabase(scratch, session, "template0",
                             clone_strategy(ws.config, probe)) as dbname:
            try:
                applied = side.fill(scratch, dbname)
            except (PgError, InputError) as exc:
                if not first:
                    raise
                later = isinstance(exc, MigrationError) and bool(exc.done)  # the first replayed
                raise CheckFailed(
                    f"env {ws.env.name}: a first deploy records every migration as applied, "
                    f"but they do not replay from {side.origin()}: "
                    f"{exc.message}",
                    hint="fix that migration (diff --migrations replays them)" if later else
                         "if the history starts from an existing schema, set [migrations] "
                         'baseline_schema = "db/baseline.sql" to that schema') from exc
            left = compare_models(expected, read_database_model(scratch, dbname))
    verdict = Consistency(differences=tuple(left), start=side.describe(applied))
    if not left:
        try:
            write_atomic(cache, json.dumps({"key": key}).encode())
        except InputError:
            pass  # a verdict that cannot be kept only costs time
    return verdict


def guard_consistency(ws: Workspace, action: str) -> Consistency | None:
    """Refuse (exit 3) to write a protected env whose result would differ from the DDL's
    schema; None when the guard does not apply ([deploy] require_consistent = false, or an
    unprotected env)."""
    if not ws.env.protected or not ws.config.deploy_require_consistent:
        return None
    verdict = check_consistency(ws, deploying=action == "deploy")
    if verdict.differences:
        shown = "; ".join(verdict.differences[:20])
        raise CheckFailed(
            f"{action} refused: env {ws.env.name} would not match the DDL after "
            f"{verdict.start}: {len(verdict.differences)} difference(s): {shown}",
            hint="run `migrate generate NAME` to write the missing migration (or fix the DDL); "
                 "[deploy] require_consistent = false turns this check off")
    return verdict


def diff_sql(ws: Workspace, against: Workspace | None = None,
             privileges: bool = False) -> SchemaPlan:
    """The plan that turns the env's database into its reference: the DDL's schema (its
    template's catalog, §13 template_catalog), or another env's database; owners and grants
    too with `privileges`. The same catalog text plans nothing without being parsed (see
    compare_catalogs)."""
    pair = CatalogPair(ws)
    if against is not None:  # two servers' catalogs at once
        run_concurrently([lambda: pair.read(1, ws, ws.env.database, privileges),
                          lambda: pair.read(0, against, against.env.database, privileges)])
    else:
        live = Background(lambda: pair.read(1, ws, ws.env.database, privileges))
        scratch = scratch_workspace(ws)
        try:
            with admin_session(scratch) as session:
                result, probe = ensure_template(scratch, seeds=False, session=session)
                pair.arrived(0, template_catalog(scratch, session, result, probe,
                                                 privileges, pair.reader(0))[0])
        finally:
            live.wait()
        live.result()
    if pair.same:
        return SchemaPlan(statements=())
    return plan_schema(pair.model(1), pair.model(0))


# ════════════════════════════════════════════════════════════════════════════════════════════
# §16 The guard and deploy
# the guard: every precondition of a destructive run in one table, checked cheapest first;
# a failure names the precondition and its override (git-filter-repo's sanity_check).
# deploy: lock → backup → migrate or first deploy → verify (migrations clean, the verify
# checks, [deploy] drift_check through §13's diff) → record, or roll back by restoring the
# backup (§9). It sits after drift and derived migrations so it calls them directly.
# rehearsal: the pending migrations on a scratch copy of the env, locks sampled.
# ════════════════════════════════════════════════════════════════════════════════════════════

class DeployFailed(ConfitureError):
    """A deploy failed; the message says what was rolled back and where the backup is (exit 1)."""


class MigrationRunFailed(ConfitureError):
    """A migration failed during a deploy: which one, whether it ran in a transaction, and
    what this run had applied before it."""

    def __init__(self, name: str, transactional: bool, applied: Sequence[str],
                 cause: ConfitureError) -> None:
        super().__init__(cause.message, cause.hint)
        self.name, self.transactional, self.applied = name, transactional, tuple(applied)
        self.interrupted = isinstance(cause, Interrupted)


def apply_pending_migrations(ws: Workspace, session: Session) -> list[str]:
    """migrate up on a session of its own, without taking the lock: the caller holds it on
    `session`, which must survive a failure (§8 ends the session a migration failed on)."""
    pending = migration_state(ws, session).pending
    try:
        run = migrate_up(ws, lock=False, backup=False)  # deploy took its own
    except MigrationError as exc:
        done = set(exc.done)
        applied = [label for version, label, _ in pending if version in done]
        failing = next(((label, tx) for version, label, tx in pending if version not in done),
                       ("unknown", False))
        raise MigrationRunFailed(failing[0], failing[1], applied, exc) from exc
    except MigrationInterrupted as exc:
        done = set(exc.done)
        applied = [label for version, label, _ in pending if version in done]
        raise MigrationRunFailed(exc.label, exc.transactional, applied, exc) from exc
    return [m.label for m, _ in run.done]


def baseline_all_migrations(ws: Workspace, session: Session) -> list[str]:
    """Record every migration as applied; a template built with them recorded (how='build')
    brought its rows along, so usually nothing is left to baseline. Returns all labels."""
    migrations = discover_migrations(ws.config)
    if migrations:
        baseline_migrations(ws, migrations[-1].version, lock=False)
    return [m.label for m in migrations]


# ── the plan ───────────────────────────────────────────────────────────────────────────────

@record(frozen=True)
class DeployPlan:
    """What a deploy will do, decided before anything changes (printed by --dry-run)."""

    env: str
    database: str
    server: str
    protected: bool
    exists: bool
    first_deploy: bool
    backup: bool
    backup_folder: str
    from_version: str | None
    to_version: str | None
    pending: tuple[str, ...]
    verify: tuple[str, ...]
    problems: tuple[str, ...]
    drift_check: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return self.exists and not self.first_deploy and not self.pending


@record()
class DeployResult:
    plan: DeployPlan
    outcome: str                     # "ok", "dry-run"
    applied: list[str]
    backup: Backup | None
    seconds: float


def verify_files(config: Config) -> list[Path]:
    """The verify checks in order, each through the meta-command guard (§4 guard_sql): the
    deploy plan lists them, so a refused one stops a deploy before anything runs."""
    folder = config.deploy_verify
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.glob("*.sql") if not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    guard = sql_guard(config)
    for path in found:
        rel = migration_rel_path(config.root, path)
        guard_sql(split_sql(read_sql_file(path, rel).decode("utf-8")), path, rel, guard)
    return found


def plan_deploy(ws: Workspace, target: TargetState, no_backup: bool) -> DeployPlan:
    """The deploy's steps from the target's state (§8 inspect_target)."""
    migrations = discover_migrations(ws.config)
    to_version = str(migrations[-1].version) if migrations else None
    state = target.migrations
    from_version = state.version if state is not None else None
    problems = state.problems if state is not None else ()
    try:
        rel = ws.config.deploy_verify.relative_to(ws.config.root).as_posix()
    except ValueError:
        rel = str(ws.config.deploy_verify)
    return DeployPlan(
        env=ws.env.name, database=ws.env.database, server=ws.env.conn.display(ws.client.environ),
        protected=ws.env.protected, exists=target.exists, first_deploy=target.first_deploy,
        backup=target.exists and not no_backup,
        backup_folder=str(backup_folder(ws.config, ws.env.name, ws.client.environ)),
        from_version=from_version, to_version=to_version, pending=target.pending,
        verify=tuple(f"{rel}/{p.name}" for p in verify_files(ws.config)), problems=problems,
        drift_check=ws.config.deploy_drift_check)


def inspect_deploy(ws: Workspace, no_backup: bool = False,
                   session: Session | None = None) -> DeployPlan:
    """The plan for the env as it is now, read-only (what --dry-run prints)."""
    return plan_deploy(ws, inspect_target(ws, session), no_backup)


def describe_plan(plan: DeployPlan) -> list[str]:
    lines = [f"deploy env {plan.env} → {plan.database} on {plan.server}"
             + (" [protected]" if plan.protected else "")]
    if not plan.exists:
        lines.append("  create the database (it does not exist)")
    lines.append(f"  backup into {plan.backup_folder}" if plan.backup else
                 "  no backup" + (" (nothing to back up)" if not plan.exists else " (--no-backup)"))
    if plan.first_deploy:
        lines.append("  first deploy: build the env's template without seeds, dump it, restore "
                     f"it, baseline {len(plan.pending)} migration(s) up to "
                     f"{plan.to_version or '-'}")
    elif plan.pending:
        lines.append(f"  apply {len(plan.pending)} migration(s), "
                     f"{plan.from_version or 'none'} → {plan.to_version}:")
        lines.extend(f"    {name}" for name in plan.pending)
    else:
        lines.append(f"  nothing to apply (at version {plan.from_version or 'none'})")
    for problem in plan.problems:
        lines.append(f"  blocked: {problem}")
    lines.append("  verify: migrations clean" + "".join(f", {v}" for v in plan.verify)
                 + (", no drift from the DDL" if plan.drift_check else ""))
    lines.append("  record the deploy; on failure, roll back (restore the backup if needed)")
    return lines


@record()
class DeployRun:
    """One deploy under way: what its rollback and its row in the deploys table need."""

    ws: Workspace
    admin: Session
    locks: DatabaseLocks
    plan: DeployPlan
    backup: Backup | None
    created: bool          # the deploy created the database (a first deploy into nothing)
    started: float         # time.monotonic() at the start
    started_at: str        # UTC, for the deploys table
    # how far it got, for the rollback
    before: tuple[int, ...] = ()                 # versions applied before the deploy
    changed: bool = False                        # the first deploy wrote the schema
    failed: MigrationRunFailed | None = None     # the migration that failed, if one did


@record(frozen=True)
class DeployRow:
    """How a deploy ended, as its row in the deploys table records it."""

    outcome: str                     # 'ok', 'rolled_back', 'failed'
    to_version: str | None
    applied: tuple[str, ...] = ()
    failed: str | None = None        # the failing migration's label
    message: str | None = None


def _deployer() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return f"uid {os.getuid()}@{socket.gethostname()}"


def record_deploy(session: Session, run: DeployRun, row: DeployRow) -> None:
    """Append a row to the deploys table (created on first use)."""
    ws, plan, backup = run.ws, run.plan, run.backup
    seconds = time.monotonic() - run.started
    table = qualified_name(ws.config.deploys_table)

    def lit(value: str | None) -> str:
        return "NULL" if value is None else quote_literal(value)

    session.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (\n"
        "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "  started_at timestamptz NOT NULL,\n"
        "  finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),\n"
        "  duration_ms bigint NOT NULL,\n"
        "  env text NOT NULL,\n"
        "  deployed_by text NOT NULL,\n"
        "  db_user text NOT NULL DEFAULT current_user,\n"
        "  from_version text,\n"
        "  to_version text,\n"
        "  applied text[] NOT NULL DEFAULT '{}',\n"
        "  backup_file text,\n"
        "  backup_sha256 text,\n"
        "  outcome text NOT NULL CHECK (outcome IN ('ok', 'rolled_back', 'failed')),\n"
        "  failed_migration text,\n"
        "  message text,\n"
        "  tool_version text NOT NULL)")
    array = "ARRAY[" + ", ".join(quote_literal(a) for a in row.applied) + "]::text[]"
    message = mask_password_in(row.message) if row.message else None
    session.execute(
        f"INSERT INTO {table} (started_at, duration_ms, env, deployed_by, from_version, "
        "to_version, applied, backup_file, backup_sha256, outcome, failed_migration, message, "
        f"tool_version) VALUES ({quote_literal(run.started_at)}, {int(seconds * 1000)}, "
        f"{quote_literal(ws.env.name)}, {quote_literal(_deployer())}, "
        f"{lit(plan.from_version)}, {lit(row.to_version)}, {array}, "
        f"{lit(str(backup.path) if backup else None)}, "
        f"{lit(backup.sha256 if backup else None)}, {quote_literal(row.outcome)}, "
        f"{lit(row.failed)}, {lit(message)}, {quote_literal(__version__)})")


def _first_deploy(ws: Workspace, admin: Session) -> None:
    """Empty target: build the env's template without seeds, clone it to a scratch database
    (templates refuse connections), and stream pg_dump | pg_restore --single-transaction into
    the target, so it either gets the whole schema or stays empty."""

    result, probe = ensure_template(ws, seeds=False, session=admin)
    scratch = side_name(ws.env.database, "build", utc_stamp())
    strategy = clone_strategy(ws.config, probe)
    admin.execute(f"CREATE DATABASE {quote_ident(scratch)} TEMPLATE {quote_ident(result.name)}"
                  + (f" STRATEGY {strategy}" if strategy else ""))
    mark = {"mark": DB_MARK, "kind": "scratch", "name": scratch, "database": ws.env.database,
            "env": ws.env.name, "at": utc_now()}
    try:
        admin.execute(f"COMMENT ON DATABASE {quote_ident(scratch)} IS "
                      f"{quote_literal(json.dumps(mark))}")
        with scratch_file() as dump_err, scratch_file() as restore_err:
            dump = ws.client.spawn(
                pg_dump_argv(ws.client.tools, ws.env.conn, scratch, "-Fc", "-Z0"),
                scratch, stdout=subprocess.PIPE, stderr=dump_err)
            try:
                restore = ws.client.spawn(
                    pg_restore_argv(ws.client.tools, ws.env.conn, ws.env.database,
                                    "--single-transaction", "--exit-on-error"),
                    ws.env.database, stdin=dump.stdout, stderr=restore_err)
            finally:
                assert dump.stdout is not None
                dump.stdout.close()
            try:
                wait_tool(ws, restore, restore_err, f"pg_restore into {ws.env.database}")
            finally:
                if restore.returncode != 0:
                    dump.kill()
                wait_tool(ws, dump, dump_err, f"pg_dump of template {result.name}")
    finally:
        drop_database(admin, scratch, force=True)


# ── the guard: every precondition of a destructive run, cheapest first ──────────────────

WRITES_MIGRATIONS = frozenset({"migrate up", "deploy"})  # runs that apply pending migrations


def refuse_no_backup(env: Env, no_backup: bool) -> None:
    """A protected env is always backed up before anything writes to it (SPEC §5)."""
    if no_backup and env.protected:
        raise Refused(f"--no-backup is refused on protected environment {env.name!r}",
                      hint="a backup is always taken before anything writes to it")


def refuse_deploy_problems(plan: DeployPlan) -> None:
    """A deploy changes nothing while an applied migration changed or vanished (exit 3)."""
    if plan.problems:
        raise CheckFailed("deploy refused before changing anything: " + "; ".join(plan.problems),
                          hint="restore the files, or run 'confiture.py migrate repair'")


@record(frozen=True)
class GuardRequest:
    """A destructive run as the user asked for it: what its preconditions look at."""

    kind: str                        # 'migrate up', 'deploy', 'restore' … (what applies)
    env: Env
    console: Console
    ws: Workspace | None = None      # None: only the confirmation applies (backups prune)
    action: str = ""                 # the run in messages; default: kind
    yes: bool = False
    dry_run: bool = False            # a dry run changes nothing: no precondition applies
    to: int | None = None            # migrate up --to
    no_backup: bool = False
    quiet: float | None = None       # --wait-for-quiet SECONDS

    @property
    def workspace(self) -> Workspace:
        assert self.ws is not None, f"{self.kind}: the guard needs a workspace"
        return self.ws

    @property
    def writes_migrations(self) -> bool:
        return self.kind in WRITES_MIGRATIONS and self.env.protected


@record()
class GuardState:
    """What the checks learn on the way: whether anything will run, the guard's verdict."""

    request: GuardRequest
    planned: bool = True
    verdict: Consistency | None = None


@record(frozen=True)
class Precondition:
    """One check before a destructive run: when it applies, the check, the errors that mean
    'refused by this precondition' (others, such as a server down, pass through as they are)
    and how to override or satisfy it."""

    name: str
    applies: Callable[[GuardRequest], bool]
    check: Callable[[GuardState], None]
    refusals: tuple[type[ConfitureError], ...]
    override: str


class PreconditionFailed(ConfitureError):
    """A precondition refused a destructive run; its exit code is the refusal's own."""

    def __init__(self, precondition: Precondition, cause: ConfitureError) -> None:
        override = f"override: {precondition.override}"
        hint = cause.hint if cause.hint and precondition.override in cause.hint else \
            "; ".join(filter(None, [cause.hint, override]))  # said once, not twice
        super().__init__(f"precondition {precondition.name!r} failed: {cause.message}", hint)
        self.exit_code = cause.exit_code
        self.precondition, self.cause = precondition.name, cause


def _check_history(state: GuardState) -> None:
    """The applied migrations against their files, and the plan (cheap: files and the
    tracking table) — before the guard's replay, so a changed file is named as such."""
    request = state.request
    if request.kind == "deploy":
        plan = inspect_deploy(request.workspace, request.no_backup)
        refuse_deploy_problems(plan)
        state.planned = not plan.nothing_to_do
    else:
        state.planned = bool(migrate_up(request.workspace, request.to, dry_run=True).planned)


def _check_lint(state: GuardState) -> None:
    request = state.request
    what = ("deploy of" if request.kind == "deploy" else f"{request.kind} on")
    lint_gate(request.workspace, f"{what} protected env {request.env.name!r}")


def _check_confirmation(state: GuardState) -> None:
    request = state.request
    confirm_protected(request.env, request.action or request.kind, request.yes, request.console)


def _check_consistency(state: GuardState) -> None:
    """The scratch replay (not cheap): only when migrations will run, and not for a partial
    `migrate up --to` (the DDL describes the whole history)."""
    request = state.request
    if request.kind == "migrate up" and (not state.planned or request.to is not None):
        return
    state.verdict = guard_consistency(request.workspace, request.kind)


def _wait_quiet(state: GuardState) -> None:
    assert state.request.quiet is not None
    wait_for_quiet(state.request.workspace, state.request.quiet)


# the table, cheapest first: a refusal costs as little as possible, the prompt comes after
# every check that reads only files and catalogs, and the replay and the wait come last
PRECONDITIONS = (
    Precondition("no-backup", lambda r: r.kind == "deploy" and r.no_backup and r.env.protected,
                 lambda state: refuse_no_backup(state.request.env, state.request.no_backup),
                 (Refused,), "none: leave out --no-backup (a protected env is always backed up)"),
    Precondition("history", lambda r: r.writes_migrations, _check_history, (CheckFailed,),
                 "restore the changed files, or accept them with 'confiture.py migrate repair'"),
    Precondition("lint", lambda r: r.writes_migrations, _check_lint, (Refused,),
                 "'-- confiture:allow RULE reason' on the statement, or [migrations] "
                 'lint_disable = ["RULE"]'),
    Precondition("confirmation", lambda r: r.env.protected, _check_confirmation, (Refused,),
                 "--yes, and on a terminal the env's name typed back"),
    Precondition("consistency", lambda r: r.writes_migrations, _check_consistency,
                 (CheckFailed,), "[deploy] require_consistent = false"),
    Precondition("quiet", lambda r: r.kind in WRITES_MIGRATIONS and r.quiet is not None,
                 _wait_quiet, (LockTimeout,),
                 "end the old transactions, or raise [migrations] lock_timeout"),
)


def guard(request: GuardRequest) -> GuardState:
    """Check every precondition of a destructive run that applies, cheapest first; raise
    PreconditionFailed naming the first that refuses and its override. A dry run skips them."""
    state = GuardState(request)
    if request.dry_run:
        return state
    for precondition in PRECONDITIONS:
        if not precondition.applies(request):
            continue
        try:
            precondition.check(state)
        except precondition.refusals as exc:
            raise PreconditionFailed(precondition, exc) from exc
    return state


# ── the run ────────────────────────────────────────────────────────────────────────────────

def run_verify_checks(ws: Workspace, dbname: str) -> None:
    """Run each verify file read-only: every statement must return no rows or `true`."""
    for path in verify_files(ws.config):
        try:
            rel = path.relative_to(ws.config.root).as_posix()
        except ValueError:
            rel = str(path)
        script = "SET TRANSACTION READ ONLY;\n" + path.read_text(encoding="utf-8")
        argv = psql_script_argv(ws.client.tools, ws.env.conn, tuples_only=True)
        proc = ws.client.run(argv, dbname, input=script.encode())
        if proc.returncode != 0:
            raise parse_psql_errors(proc.stderr.decode("utf-8", "replace"),
                                    LineMap(((2, rel, 1),)), ws.client.password)
        rows = [line for line in proc.stdout.decode("utf-8", "replace").splitlines() if line]
        if any(line != "t" for line in rows):
            shown = "; ".join(rows[:3]) + (" …" if len(rows) > 3 else "")
            raise CheckFailed(f"verify check {rel} failed: it returned {shown}",
                              hint="a check passes when it returns no rows or a single true")


def ddl_drift(ws: Workspace) -> str | None:
    """§13's comparison with the DDL, as deploy's optional verify step ([deploy] drift_check):
    the differences in one line, None when there are none."""
    report = diff_against_ddl(ws)
    if not report.differences:
        return None
    shown = [d.label for d in report.differences[:5]]
    more = len(report.differences) - len(shown)
    return (f"{len(report.differences)} difference(s) from the DDL: " + ", ".join(shown)
            + (f" and {more} more" if more > 0 else ""))


def deploy(ws: Workspace, no_backup: bool = False, dry_run: bool = False) -> DeployResult:
    """Bring the env's database to the current version, safely: lock → backup → first deploy
    or pending migrations → verify → record. Any failure after the backup is rolled back
    (a transactional migration by itself, anything else by restoring the backup) and raised
    as DeployFailed naming the failing step and the backup. The caller runs the guard first
    (guard(), as `confiture.py deploy` does)."""
    refuse_no_backup(ws.env, no_backup)
    started, started_at = time.monotonic(), utc_now()
    if dry_run:
        return DeployResult(inspect_deploy(ws, no_backup), "dry-run", [], None,
                            time.monotonic() - started)
    with admin_session(ws) as admin, locked_database(ws, admin) as locks:
        created = not database_exists(admin, ws.env.database)
        if created:
            ws.console.info(f"creating database {ws.env.database}")
            admin.execute(f"CREATE DATABASE {quote_ident(ws.env.database)}")
        try:
            session = locks.lock_target()
            plan = inspect_deploy(ws, no_backup, session)
            if created:
                plan = evolve(plan, exists=False, backup=False)
            refuse_deploy_problems(plan)
            backup = None
            if plan.backup and not plan.nothing_to_do:
                ws.console.info(f"backing up {ws.env.database} …")
                try:
                    backup = create_backup(ws, session=session)
                except BackupError as exc:
                    raise BackupError("deploy stopped before changing anything: the backup "
                                      f"failed: {exc.message}", exc.hint) from exc
                ws.console.info(f"backup {backup.path} ({format_bytes(backup.size)})")
        except BaseException:
            if created:
                locks.unlock_target()
                drop_database(admin, ws.env.database, force=True)
            raise
        applied = _execute_deploy(DeployRun(ws, admin, locks, plan, backup, created,
                                            started, started_at))
    return DeployResult(plan, "ok", applied, backup, time.monotonic() - started)


def _execute_deploy(run: DeployRun) -> list[str]:
    ws, locks, plan = run.ws, run.locks, run.plan
    assert locks.target is not None
    session = locks.target
    run.before = () if plan.first_deploy else migration_state(ws, session).applied
    applied: list[str] = []
    try:
        applied = _migrate_and_verify(run, session)
    except BaseException as exc:  # noqa: BLE001 — any failure, Ctrl-C included, is rolled back
        if isinstance(exc, MigrationRunFailed):
            run.failed = exc
        _roll_back(run, exc)
    try:
        to_version = migration_state(ws, session).version
        record_deploy(session, run, DeployRow("ok", to_version, tuple(applied)))
    except ConfitureError as exc:  # the deploy itself succeeded and stays
        ws.console.warn(f"deployed, but could not record it in {ws.config.deploys_table}: "
                        f"{exc.message}")
    return applied


def _migrate_and_verify(run: DeployRun, session: Session) -> list[str]:
    """The deploy's writes and its checks; the labels it applied."""
    ws, plan = run.ws, run.plan
    applied: list[str] = []
    if plan.first_deploy:
        ws.console.info("first deploy: restoring the env's schema into the empty database …")
        _first_deploy(ws, run.admin)
        run.changed = True
        applied = baseline_all_migrations(ws, session)
    elif plan.pending:
        applied = apply_pending_migrations(ws, session)
    state = migration_state(ws, session)
    if state.pending or state.problems or state.partial:
        raise CheckFailed("migrations are not clean after the deploy: " + "; ".join(
            [*state.problems, *(f"{n} pending" for _, n, _ in state.pending),
             *(f"{n} partly applied" for n in state.partial)]))
    run_verify_checks(ws, ws.env.database)
    problem = ddl_drift(ws) if ws.config.deploy_drift_check else None
    if problem:
        raise CheckFailed(f"drift check: {problem}")
    return applied


def _failure(run: DeployRun, exc: BaseException) -> tuple[str, type[ConfitureError]]:
    """What failed, in words, and the error a failed deploy raises (Interrupted for Ctrl-C)."""
    failed = run.failed
    cause = exc.message if isinstance(exc, ConfitureError) else (
        "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
    step = f"migration {failed.name}" if failed else (
        "the first deploy" if run.plan.first_deploy else "verification")
    interrupted = isinstance(exc, (KeyboardInterrupt, Interrupted)) or bool(
        failed and failed.interrupted)
    return (f"deploy of env {run.ws.env.name!r} failed at {step}: {cause}",
            Interrupted if interrupted else DeployFailed)


def _roll_back(run: DeployRun, exc: BaseException) -> NoReturn:
    """Put the database back as it was before the deploy, check it, record it, and raise."""
    ws, admin, locks, backup, failed = run.ws, run.admin, run.locks, run.backup, run.failed
    what, error_type = _failure(run, exc)
    try:
        now = migration_state(ws, locks.target).applied if locks.target else None
    except ConfitureError:
        now = None
    partial = failed is not None and not failed.transactional
    if not (run.created or run.changed or partial or now != run.before):
        how = ("the failing migration rolled back by itself" if failed else
               "nothing had changed") + "; the database is as it was"
        _record_quietly(run, "rolled_back", f"{what}; {how}")
        raise error_type(f"{what}; {how}" + (f" (backup: {backup.path})" if backup else ""))
    outcome: ConfitureError | None = None  # raised below on purpose: not a rollback failure
    try:
        if run.created:
            locks.unlock_target()
            drop_database(admin, ws.env.database, force=True)
            outcome = error_type(f"{what}; the database it had created was dropped again")
            raise outcome
        if backup is None:
            _record_quietly(run, "failed", f"{what}; no backup (--no-backup)")
            outcome = error_type(f"{what}; there is no backup to restore (--no-backup): the "
                                 f"database is left at version {_version_text(now)}")
            raise outcome
        ws.console.warn(f"{what}")
        replaced = _restore_for_rollback(run, backup)
        after = migration_state(ws, locks.lock_target()).applied
        if after != run.before:
            outcome = DeployFailed(f"{what}; the restored database is at version "
                                   f"{_version_text(after)}, expected "
                                   f"{_version_text(run.before)}")
            raise outcome
    except ConfitureError as rollback_error:
        if rollback_error is outcome:
            raise
        raise DeployFailed(f"{what}; the ROLLBACK FAILED too: {rollback_error.message}",
                           hint=(f"restore the backup by hand: confiture.py --env {ws.env.name} "
                                 f"restore {backup.path}" if backup else None)) from exc
    how = (f"rolled back by restoring {backup.path}; the failed state is kept as database "
           f"{replaced}")
    _record_quietly(run, "rolled_back", f"{what}; {how}")
    raise error_type(f"{what}; {how}")


def _restore_for_rollback(run: DeployRun, backup: Backup) -> str | None:
    """Swap the backup in for the failed database (kept under the returned name)."""
    ws, admin = run.ws, run.admin
    ws.console.warn(f"rolling back: restoring {backup.path} …")
    stamp = utc_stamp()
    props = database_properties(admin, ws.env.database)
    scratch = restore_into_scratch(ws, admin, backup.path, backup.sha256, props, stamp)
    try:
        run.locks.unlock_target()
        return swap_in(ws, admin, scratch, props, True, backup.path, stamp)
    except BaseException:
        drop_database(admin, scratch, force=True)
        raise


def _version_text(applied: Sequence[int] | None) -> str:
    return "unknown" if applied is None else (str(applied[-1]) if applied else "none")


def _record_quietly(run: DeployRun, outcome: str, message: str) -> None:
    """Record a failed deploy; a failure to record must not hide the deploy's own error."""
    failed = run.failed.name if run.failed else None
    try:
        session = run.locks.target or run.locks.lock_target()
        record_deploy(session, run, DeployRow(outcome, run.plan.from_version, (), failed,
                                              message))
    except ConfitureError as exc:
        run.ws.console.warn(f"could not record the deploy in {run.ws.config.deploys_table}: "
                            f"{exc.message}")


# ── rehearsal: the pending migrations on a scratch copy, locks sampled ───────────────────

# pg_locks modes, weakest first; shown as PostgreSQL's docs name them
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock",
              "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
              "ExclusiveLock", "AccessExclusiveLock")
REHEARSAL_SAMPLE = 0.05   # seconds between pg_locks samples


def lock_label(mode: str) -> str:
    """'AccessExclusiveLock' → 'ACCESS EXCLUSIVE'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()


@record()
class RehearsedStatement:
    migration: str
    file: str
    line: int
    text: str                   # its first line
    seconds: float = 0.0
    lock: str | None = None     # strongest pg_locks mode taken on a relation
    relation: str | None = None
    held: float = 0.0           # seconds from the statement's start until that lock went
    rewritten: list[tuple[str, int]] = field(default_factory=list)  # (table, rows)

    def take(self, mode: str, relation: str) -> None:
        if self.lock is None or LOCK_MODES.index(mode) > LOCK_MODES.index(self.lock):
            self.lock, self.relation = mode, relation

    def as_json(self) -> dict[str, Any]:
        return {"migration": self.migration, "file": self.file, "line": self.line,
                "statement": self.text, "ms": round(self.seconds * 1000, 1),
                "lock": lock_label(self.lock) if self.lock else None,
                "relation": self.relation, "held_ms": round(self.held * 1000, 1),
                "rewritten": [{"table": t, "rows": n} for t, n in self.rewritten]}


@record(frozen=True)
class Rehearsal:
    env: str
    source: str                 # the backup file, or "clone of <db>"
    server: str                 # where the scratch database lived
    statements: tuple[RehearsedStatement, ...]
    seconds: float
    failed: str | None = None   # the error that stopped the rehearsal

    def as_json(self) -> dict[str, Any]:
        return {"env": self.env, "source": self.source, "server": self.server,
                "seconds": round(self.seconds, 3), "failed": self.failed,
                "statements": [s.as_json() for s in self.statements]}


class LockSampler(SessionSampler):
    """pg_locks of one backend every REHEARSAL_SAMPLE seconds, from a second session, credited
    to the statement running at the time (`current`); the samples add to what each statement's
    own check saw."""

    def __init__(self, ws: Workspace, database: str, pid: int) -> None:
        super().__init__(lambda: ws.client.session(database), REHEARSAL_SAMPLE, "lock-sampler")
        self.pid, self._sql = pid, own_locks_sql(pid)
        self.current: RehearsedStatement | None = None
        self.held: frozenset[tuple[str, str]] = frozenset()  # taken by earlier statements

    def sample(self, session: Session) -> None:
        statement, held = self.current, self.held
        for row in session.query(self._sql):
            if statement is not None and (row["mode"], row["relation"]) not in held:
                statement.take(row["mode"], row["relation"])


def own_locks_sql(pid: int | None = None) -> str:
    """Granted locks of a backend on tables (indexes and catalogs left out: a table lock is
    what blocks the application)."""
    who = "pg_backend_pid()" if pid is None else str(int(pid))
    return ("SELECT l.mode, l.relation::regclass::text AS relation FROM pg_locks l "
            "JOIN pg_class c ON c.oid = l.relation WHERE l.locktype = 'relation' AND l.granted "
            f"AND l.pid = {who} AND c.relkind IN ('r', 'p', 'm') AND l.relation >= 16384")


_RELFILES_SQL = ("SELECT c.oid::regclass::text AS name, c.relfilenode AS file, "
                 "greatest(c.reltuples, 0)::bigint AS rows FROM pg_class c "
                 "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') "
                 "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                 "AND n.nspname NOT LIKE 'pg\\_%'")


def _relfiles(session: Session) -> dict[str, tuple[int, int]]:
    return {r["name"]: (int(r["file"]), int(r["rows"])) for r in session.query(_RELFILES_SQL)}


def rehearse_statement(session: Session, sampler: LockSampler, item: RehearsedStatement,
                       stmt: Statement, in_transaction: bool) -> float:
    """Run one statement, timed; note its locks and the tables it rewrote (a new
    relfilenode). Returns when it started."""
    before = _relfiles(session)
    sampler.current = item
    started = time.monotonic()
    try:
        session.execute(stmt.text)
    finally:
        item.seconds = time.monotonic() - started
        sampler.current = None
    if in_transaction:  # locks stay until COMMIT: this list is exact, not sampled
        for row in session.query(own_locks_sql()):
            if (row["mode"], row["relation"]) not in sampler.held:
                item.take(row["mode"], row["relation"])
                sampler.held |= {(row["mode"], row["relation"])}
    after = _relfiles(session)
    item.rewritten = [(name, rows) for name, (file, rows) in before.items()
                      if name in after and after[name][0] != file]
    item.held = item.seconds
    return started


def rehearse_migration(ws: Workspace, session: Session, sampler: LockSampler,
                       migration: Migration) -> list[RehearsedStatement]:
    statements, transactional = migration_statements(migration, "up", ws.config.root)
    rel = migration_rel(ws.config, migration.up)
    done: list[RehearsedStatement] = []
    starts: list[float] = []
    sampler.held = frozenset()
    if transactional:
        session.execute("BEGIN")
    for stmt in statements:
        item = RehearsedStatement(migration.label, rel, first_word_line(stmt),
                                  strip_comments(stmt.text).strip().split("\n")[0][:120])
        done.append(item)
        try:
            starts.append(rehearse_statement(session, sampler, item, stmt, transactional))
        except SqlError as exc:  # said as `migrate up` says it: the file and line
            raise SqlError(exc.server_message, exc.sqlstate, f"{rel}:{item.line}",
                           exc.hint) from exc
    if transactional:
        session.execute("COMMIT")
        committed = time.monotonic()
        for item, start in zip(done, starts):  # a lock first taken here was held until COMMIT
            if item.lock:
                item.held = committed - start
    sampler.held = frozenset()
    return done


def rehearsal_source(ws: Workspace) -> Path | None:
    """A protected env rehearses on its newest verified backup (never dumping production
    for it); an unprotected one on a fresh copy (None: dump it now)."""
    if not ws.env.protected:
        return None
    backup = newest_backup(ws.config, ws.env.name, ws.client.environ)
    if backup is None:
        raise Refused(f"env {ws.env.name!r} has no backup to rehearse on",
                      hint=f"take one with 'confiture.py backup --env {ws.env.name}'")
    check_backup(ws, backup.path)
    return backup.path


def rehearse(ws: Workspace, to: int | None = None) -> Rehearsal:
    """Apply the env's pending migrations to a scratch copy (its newest verified backup, or
    a fresh dump of an unprotected env), on the scratch server for a protected env, sampling
    pg_locks meanwhile; the env itself is only read. The scratch database is always dropped.
    Timings on another machine are indicative. On a scratch server other than the env's, the
    copy is restored without owners, grants and tablespaces (FOREIGN_SERVER_RESTORE): the
    env's roles need not exist there, and nothing is created outside the scratch database."""
    import tempfile

    started = time.monotonic()
    pending = plan_up(migration_status(ws), to)
    check_migrations_sql(pending, "up", ws.config)  # the guard and transaction checks, as `up`
    source = rehearsal_source(ws)
    scratch_ws = scratch_workspace(ws)
    with tempfile.TemporaryDirectory(prefix="confiture-rehearse-") as folder:
        if source is None:
            source = create_backup(ws, output=Path(folder) / "copy.dump").path
        with admin_session(scratch_ws) as admin:
            elsewhere = scratch_ws is not ws  # a protected env's copy goes to another server
            scratch = restore_into_scratch(scratch_ws, admin, source, None, None,
                                           utc_stamp() + "r" + os.urandom(2).hex(),
                                           FOREIGN_SERVER_RESTORE if elsewhere else ())
            try:
                statements, failed = _rehearse_on(scratch_ws, scratch, pending)
            finally:
                drop_database(admin, scratch, force=True)
    return Rehearsal(ws.env.name, str(source) if ws.env.protected else
                     f"a copy of {ws.env.database}", scratch_ws.env.conn.display(),
                     tuple(statements), time.monotonic() - started, failed)


def _rehearse_on(ws: Workspace, scratch: str, pending: Sequence[Migration]
                 ) -> tuple[list[RehearsedStatement], str | None]:
    done: list[RehearsedStatement] = []
    with ws.client.session(scratch) as session:
        session.execute("ANALYZE")  # row estimates for 'rows rewritten'
        pid = int(session.value("SELECT pg_backend_pid()"))
        with LockSampler(ws, scratch, pid) as sampler:
            for migration in pending:
                ws.console.info(f"rehearsing {migration.label} …")
                try:
                    done.extend(rehearse_migration(ws, session, sampler, migration))
                except SqlError as exc:
                    return done, exc.message
    return done, None


# ════════════════════════════════════════════════════════════════════════════════════════════
# §17 Command-line plumbing
# What every command area shares: App (one run's options and console, the configuration
# loaded on first use), hints finished for the user, the library entry point workspace_for,
# and the argparse classes §18's parser builders use: Commands builds only the parser of the
# command being run, CliParser turns a usage error into a ConfigError; with them the global
# options and each command area's examples.
# ════════════════════════════════════════════════════════════════════════════════════════════


def load_checked_config(path: Path, environ: Mapping[str, str]) -> Config:
    """load_config, plus the checks of sections below §3 ([sync] patterns and rules): every
    configuration error surfaces when the configuration loads, whatever the command."""
    config = load_config(path, environ)
    check_sync_config(config)
    return config


@record()
class App:
    """Per-run context for command handlers: parsed options, console, lazily loaded config."""

    args: argparse.Namespace
    console: Console
    environ: Mapping[str, str]
    cwd: Path
    _config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_checked_config(
                find_config(self.args.config, self.environ, self.cwd), self.environ)
        return self._config

    def env_name(self) -> str:
        return resolve_env_name(self.config, self.args.env, self.environ)

    def env(self, name: str | None = None) -> Env:
        return resolve_env(self.config, name or self.env_name(), self.environ)

    def workspace(self, name: str | None = None) -> Workspace:
        return open_workspace(self.env(name), self.console, self.environ)

    def with_options(self, text: str) -> str:
        """TEXT with every command it names ('confiture.py WORDS', the one way hints name
        commands) repeating this run's --config and --env, so the advice acts on the same
        project and env when pasted."""
        import shlex

        given = [(flag, value) for flag, value in (
            ("--config", self.args.config), ("--env", self.args.env)) if value]
        if not given:
            return text

        def repeat(match: re.Match[str]) -> str:  # a flag the command names already is kept
            options = "".join(f" {flag} {shlex.quote(value)}" for flag, value in given
                              if not re.search(rf"(?<!\S){flag}\b", match.group(1)))
            return "confiture.py" + options + match.group(1)

        return re.sub(r"\bconfiture\.py((?= [a-z])[^'`\n;]*)", repeat, text)


def finish_hint(hint: str | None, reason: str | None, app: App | None) -> str | None:
    """A hint as the user should read it: a server that is down (connection failure REASON)
    gets `bin/pg-dev start` only where the project has one, and every command it names
    repeats the run's options."""
    if reason == SERVER_DOWN and app is not None:
        root = app._config.root if app._config is not None else app.cwd
        running = dev_cluster(root)
        if running is not None:  # up, but this run was not pointed at it
            hint = (f"{hint} (the project's dev cluster runs at {running[0]}, port "
                    f"{running[1]}: bin/confiture uses it, or export PGHOST={running[0]} "
                    f"PGPORT={running[1]} PGUSER=postgres)")
        elif (root / "bin" / "pg-dev").is_file():
            hint = f"{hint} (the project's dev server: bin/pg-dev start)"
    return hint if app is None or hint is None else app.with_options(hint)


def dev_cluster(root: Path) -> tuple[str, str] | None:
    """The socket folder and port of the project's bin/pg-dev cluster when it is listening,
    found as bin/confiture finds it (.confiture/pg/dev: `location`, `settings`)."""
    state = root / ".confiture" / "pg" / "dev"
    home, port = str(state), "5432"
    try:
        home = (state / "location").read_text(encoding="utf-8").split("\n")[0].strip() or home
    except OSError:
        pass
    try:
        for line in (state / "settings").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            port = value.strip() if key.strip() == "port" else port
    except OSError:
        pass
    return (home, port) if (Path(home) / f".s.PGSQL.{port}").is_socket() else None


def workspace_for(config: str | Path | None = None, env: str | None = None,
                  environ: Mapping[str, str] | None = None,
                  console: Console | None = None) -> Workspace:
    """Library entry point: the Workspace of an env, resolved as the CLI would resolve it.

        ws = confiture.workspace_for("confiture.toml", env="test")
        with confiture.admin_session(ws) as session:        # one psql for many clones
            confiture.clone_database(ws, "test_42", replace=True, session=session)
    """
    environ = dict(os.environ if environ is None else environ)
    cfg = load_checked_config(find_config(str(config) if config else None, environ, Path.cwd()),
                              environ)
    env_spec = resolve_env(cfg, resolve_env_name(cfg, env, environ), environ)
    return open_workspace(env_spec, console or Console(quiet=True), environ)


# ── the parser's classes ──────────────────────────────────────────────────────────────────

# The command areas in the order of the sections (and of `confiture.py --help`), each with a
# few examples shown under the area in --help and in every one of its commands' --help.
COMMAND_AREAS: tuple[tuple[str, str], ...] = (
    ("build, templates and clones", """\
  confiture.py init                      scaffold confiture.toml and db/
  confiture.py scan --env test           files and hashes of the test environment
  confiture.py template                  build (or reuse) the env's template database
  confiture.py clone ci_run_42           a fresh database in tens of milliseconds
  confiture.py reset                     make db-reset: recreate the env's database"""),
    ("migrations", """\
  confiture.py migrate new add_user_email        db/migrations/<stamp>_add_user_email.*.sql
  confiture.py migrate up --dry-run              the plan and SQL, nothing run
  confiture.py migrate status --check            exit 3 unless everything is applied
  confiture.py migrate down --steps 1            revert the newest migration"""),
    ("backups, restore and deploy", """\
  confiture.py backup --env staging              a verified pg_dump with its sidecar
  confiture.py restore latest --env staging      swap the newest backup in
  confiture.py deploy --env prod --yes           back up, migrate, verify; roll back on failure"""),
    ("anonymized sync", """\
  confiture.py sync rules > rules.toml           a complete [sync.rules] block to review
  confiture.py sync --dry-run                    plan and check the [sync] copy, write nothing
  confiture.py sync --from prod --to staging     copy with personal data rewritten"""),
    ("drift, watch and status", """\
  confiture.py diff --env staging                what differs from the DDL (exit 3 if any)
  confiture.py watch                             rebuild and reset on every file change
  confiture.py status --json                     the env at a glance, as one document"""),
)

EXIT_CODES = """\
exit codes: 0 ok, 1 failed, 2 usage/config, 3 differences found, 4 refused by a safety rule,
5 lock not released in time, 130 interrupted
"""


def global_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command (the sub-parser copy must not reset them)."""
    default = argparse.SUPPRESS if suppress else None
    p = CliParser(add_help=False)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--config", metavar="PATH", default=default, help="confiture.toml to use")
    g.add_argument("--env", metavar="NAME", default=default, help="environment")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print one JSON document on stdout")
    g.add_argument("-q", "--quiet", action="store_true",
                   default=argparse.SUPPRESS if suppress else False, help="less output")
    g.add_argument("-v", "--verbose", action="store_true",
                   default=argparse.SUPPRESS if suppress else False, help="more output")
    g.add_argument("--yes", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="confirm operations on protected environments")
    return p


class _Width:
    """Help formatting without argparse's `import shutil` (which loads the compression modules)
    on every add_argument: the terminal width the same way shutil.get_terminal_size finds it."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(
                    sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
            except (ValueError, OSError):
                width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)  # type: ignore[call-arg]


class _Formatter(_Width, argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; text with line breaks (the examples epilogs) is kept
    as written, as RawDescriptionHelpFormatter keeps it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CliParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}", hint=f"see '{self.prog} --help'")


class _Inert:
    """Stands in for the parsers of commands not being run: every call is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., _Inert]:
        return lambda *args, **kwargs: self


class Commands:
    """Adds the parsers of one command level. Each command's one-line `help` is also its
    --help description, and its area's examples its epilog; the top level lists commands by
    area (`listing`). With `only`, it builds only the parser of the command being run:
    argparse construction of ~40 subcommands costs tens of milliseconds on every call."""

    def __init__(self, real: Any, only: str | None, listed: bool = False,
                 action: str | None = None) -> None:
        self.real, self.only, self.listed, self.matched = real, only, listed, False
        self.action = action  # the word after `only`: the action to build in nested()
        self.area, self.examples = "", ""
        self.listing: list[tuple[str, str, str]] = []  # (area, command, help)
        self.levels = [self]  # this level and those nested() made below it

    def nested(self, real: Any) -> Commands:
        """The action level under the command being added (`migrate up`): restricted to
        `action` when this level is restricted, so `migrate status` builds 1 parser of ~10."""
        running = self.only is not None and not isinstance(real, _Inert)
        level = Commands(real, self.action if running else None, listed=True)
        level.begin_area(self.area, self.examples)
        if running:
            self.levels.append(level)
        return level

    def begin_area(self, title: str, examples: str) -> None:
        self.area, self.examples = title, examples

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        summary = kwargs.get("help", "")
        self.listing.append((self.area, name, summary))
        if self.only is not None and name != self.only:
            return _Inert()
        self.matched = True
        kwargs.setdefault("description", summary[:1].upper() + summary[1:] + ".")
        if self.examples:
            kwargs.setdefault("epilog", f"examples:\n{self.examples}\n")
        if not self.listed:
            kwargs.pop("help", None)  # listed by area in the top-level epilog instead
        return self.real.add_parser(name, **kwargs)

    def epilog(self) -> str:
        """Commands by area, each area with its examples, then the exit codes."""
        parts = []
        for title, examples in COMMAND_AREAS:
            rows = [f"  {name:<18} {summary}" for area, name, summary in self.listing
                    if area == title]
            parts.append(f"{title}:\n" + "\n".join(rows) + f"\n\n{examples}\n")
        return "\n".join(parts) + "\n" + EXIT_CODES


# ════════════════════════════════════════════════════════════════════════════════════════════
# §18 Commands
# argparse → values → one core call → output, one area after another (foundation, migrate,
# backups and deploy, sync, drift): each area's cmd_<name> handlers, a few lines each, then
# its parser builder. Last, build_parser and main(), the only place that turns a
# ConfitureError into a message and an exit code.
# ════════════════════════════════════════════════════════════════════════════════════════════

# ── foundation commands ───────────────────────────────────────────────────────────────────

_INIT_CONFIG = """\
# confiture.toml — written by `confiture.py init`; `python confiture.py --help` lists commands.
# Each env's url is a libpq URL; what it leaves out comes from PGHOST, PGPORT, PGUSER and
# PGPASSWORD (or ~/.pgpass). "postgresql:///NAME" means the local server's default socket, as
# the role named after your OS user: name your server and role, for example
#   url = "postgresql://app@localhost:5432/NAME"
# and keep passwords out of this file (${{VAR}} expands from the environment, or use ~/.pgpass).
# `python confiture.py config check --env local` shows what an env resolves to.
[project]
name = "{name}"
schema = ["db/schema"]
seeds = "db/seeds"
migrations = "db/migrations"
default_env = "local"

[env.local]
url = "postgresql:///{name}_dev"
seeds = ["common", "dev"]

[env.test]
url = "postgresql:///{name}_test"
seeds = ["common", "test"]

[env.prod]
url = "${{PROD_DATABASE_URL}}"
protected = true
"""

# The folders of a project: each missing one is created (with a .keep, so git keeps it).
_INIT_FOLDERS = ("db/schema", "db/seeds/common", "db/seeds/dev", "db/seeds/test",
                 "db/migrations")
# Example content, only in a brand-new project (no confiture.toml, no db/): re-running init
# must never bring back an example the user deleted (the next reset would build it).
_INIT_EXAMPLES = {
    "db/schema/10_tables/10_example.sql":
        "-- Your schema: one object per file, numbered folders give the build order.\n"
        "CREATE TABLE example (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "    name text NOT NULL\n);\n",
    "db/seeds/dev/10_example.sql": "INSERT INTO example (name) VALUES ('dev row');\n",
}


def plan_init(root: Path, name: str) -> tuple[dict[str, str], list[str]]:
    """Pure but for looking: (files to create → text, existing things kept) for `init` in
    ROOT. A new project gets the config, the folders and the examples; an existing one only
    what is missing of the config and the folders."""
    fresh = not (root / CONFIG_NAME).exists() and not (root / "db").exists()
    wanted = {CONFIG_NAME: _INIT_CONFIG.format(name=name)}
    for folder in _INIT_FOLDERS:
        if fresh and any(rel.startswith(folder + "/") for rel in _INIT_EXAMPLES):
            continue
        wanted[f"{folder}/.keep"] = ""
    if fresh:
        wanted.update(_INIT_EXAMPLES)
    create, kept = {}, []
    for rel, text in wanted.items():
        parent = (root / rel).parent
        if rel.endswith("/.keep") and parent.is_dir():
            kept.append(str(parent.relative_to(root)) + "/")
        elif (root / rel).exists():
            kept.append(rel)
        else:
            create[rel] = text
    return create, kept


def cmd_init(app: App) -> int:
    root = Path(app.args.dir or ".").resolve()
    name = slugify(root.name, ascii_only=True)[:MAX_PROJECT_NAME].rstrip("_") or "app"
    if not NAME_RE.match(name):
        name = "db_" + name[:MAX_PROJECT_NAME - 3]
    files, kept = plan_init(root, name)
    created = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        created.append(rel)
    ignore = root / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if ".confiture/" not in lines:
        ignore.write_text("\n".join([*lines, ".confiture/", "db/generated/"]) + "\n")
        created.append(".gitignore (+ .confiture/, db/generated/)")
    for rel in created:
        app.console.result(f"created {rel}")
    for rel in kept:
        app.console.info(f"kept existing {rel}")
    app.console.emit({"created": created, "kept": kept, "root": str(root)})
    return EXIT_OK


def cmd_config_check(app: App) -> int:
    config = app.config
    # --env limits the check to one env; without it every env must resolve.
    names = [resolve_env_name(config, app.args.env, {})] if app.args.env else list(config.envs)
    report, unresolved = [], []
    for name in names:
        spec = config.envs[name]
        entry: dict[str, Any] = {"env": name, "protected": spec.protected,
                                 "seeds": list(spec.seeds)}
        try:
            env = resolve_env(config, name, app.environ)
            entry["url"] = env.conn.display(app.environ)
            entry["database"] = env.database
        except UnsetVariable as exc:
            entry["url"] = None
            entry["error"] = f"env {name}: {exc.message}"
            unresolved.append(entry["error"])
        fileset = scan_env(config, name)
        entry["files"] = len(fileset.files)
        entry["hash"] = fileset.hash
        report.append(entry)
    if app.console.json_mode:
        app.console.emit({"config": str(config.path), "project": config.project,
                          "ok": not unresolved, "envs": report})
    else:
        verdict = "ok" if not unresolved else f"{len(unresolved)} env(s) do not resolve"
        app.console.result(f"{config.path}: {verdict} (project {config.project})")
        for entry in report:
            flags = " [protected]" if entry["protected"] else ""
            seeds = ", ".join(entry["seeds"]) or "no seeds"
            app.console.result(f"  {entry['env']:<10} {entry['files']:>5} files  {seeds:<20} "
                               f"{entry['url'] or '(url unresolved)'}{flags}")
    if unresolved:
        raise ConfigError("; ".join(unresolved),
                          hint="export the variable(s), give a default with ${VAR:-default}, "
                               "or check one env with --env NAME")
    return EXIT_OK


def cmd_scan(app: App) -> int:
    name = app.env_name()
    fileset = scan_env(app.config, name, seeds=not app.args.schema_only)
    sources = describe_sources(app.config, fileset)  # §13: each source and its git commit
    for source in sources:
        app.console.info(f"source {source.describe(app.config.root)}")
    if app.console.json_mode:
        app.console.emit({"env": name, "hash": fileset.hash,
                          "sources": [s.as_json() for s in sources],
                          "files": [{"path": f.rel, "kind": f.kind, "sha256": f.sha256,
                                     "size": f.size} for f in fileset.files]})
        return EXIT_OK
    for f in fileset.files:
        app.console.result(f"{f.sha256}  {f.rel}")
    app.console.result(f"{fileset.hash}  (combined, {len(fileset.files)} files, env {name})")
    return EXIT_OK


def cmd_build(app: App) -> int:
    name = app.env_name()
    seeds = not app.args.schema_only
    build = render_build(scan_env(app.config, name, seeds=seeds), sql_guard(app.config))
    path = Path(app.args.output) if app.args.output else build_path(app.config, name, seeds)
    if str(path) == "-":
        sys.stdout.write(build.script)
        return EXIT_OK
    write_build(build, path)
    app.console.result(str(path))
    app.console.info(f"{len(build.files)} files, hash {build.hash[:12]}")
    app.console.emit({"env": name, "path": str(path), "hash": build.hash,
                      "files": [f.rel for f in build.files]})
    return EXIT_OK


def cmd_template(app: App) -> int:
    ws = app.workspace()
    if app.args.check:
        fileset = scan_env(ws.config, ws.env.name)
        name = template_name(ws.config.project, ws.env.name, fileset.hash)
        with admin_session(ws) as session:
            current = bool(template_probe(session, name)["is_template"])
            built = [t for t in list_templates(session, ws.config.project, ws.env.name)
                     if t.seeds == fileset.seeds]
        app.console.result(name)
        app.console.emit({"template": name, "current": current})
        if not current:
            why = (f"the env's files changed since the last build, {built[0].name}" if built
                   else f"no template of env {ws.env.name} was ever built on this server")
            raise CheckFailed(f"template {name} is not built ({why})",
                              hint="run 'confiture.py template' to build it")
        return EXIT_OK
    result, _ = ensure_template(ws, rebuild=app.args.rebuild)
    app.console.result(result.name)
    if not result.built:
        app.console.info(f"template is current ({format_seconds(result.seconds)})")
    app.console.emit(as_dict(result))
    return EXIT_OK


def cmd_templates(app: App) -> int:
    ws = app.workspace()
    with admin_session(ws) as session:
        if app.args.action == "prune":
            keep = app.args.keep if app.args.keep is not None else ws.config.templates_keep
            if keep < 1:
                raise ConfigError("--keep must be at least 1")
            dropped = prune_templates(ws, session, keep)
            for name in dropped:
                app.console.result(f"dropped {name}")
            for path in prune_drift_cache(ws.config, dropped=dropped):
                app.console.debug(f"removed {path}")
            app.console.emit({"dropped": dropped})
            return EXIT_OK
        infos = list_templates(session, ws.config.project)
    if app.console.json_mode:
        app.console.emit([as_dict(i) for i in infos])
        return EXIT_OK
    if not infos:
        app.console.info("no templates on this server")
    for info in infos:
        app.console.result(f"{info.name:<48} {info.env:<10} {format_bytes(info.size):>9}  "
                           f"built {info.built_at}  {info.files} files")
    return EXIT_OK


def cmd_clone(app: App) -> int:
    ws = app.workspace()
    result, seconds = clone_database(ws, app.args.name, replace=app.args.replace,
                                     force=app.args.force)
    app.console.result(app.args.name)
    app.console.info(f"cloned {result.name} → {app.args.name} in {format_seconds(seconds)}")
    app.console.emit({"database": app.args.name, "template": result.name,
                      "template_built": result.built, "seconds": round(seconds, 4)})
    return EXIT_OK


def cmd_reset(app: App) -> int:
    ws = app.workspace()
    result, seconds = reset_env_database(ws, force=app.args.force)
    app.console.result(ws.env.database)
    app.console.info(f"reset {ws.env.database} from {result.name} in {format_seconds(seconds)}")
    app.console.emit({"database": ws.env.database, "template": result.name,
                      "template_built": result.built, "seconds": round(seconds, 4)})
    return EXIT_OK


def add_foundation_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="scaffold confiture.toml and db/")
    p.add_argument("dir", nargs="?", help="project folder (default: .)")
    p.set_defaults(handler=cmd_init, needs_config=False)

    p = sub.add_parser("config", parents=[common], help="validate the configuration")
    p.add_argument("action", choices=["check"])
    p.set_defaults(handler=cmd_config_check)

    p = sub.add_parser("scan", parents=[common], help="list the env's files and hashes")
    p.add_argument("--schema-only", action="store_true", help="leave out seed sets")
    p.set_defaults(handler=cmd_scan)

    p = sub.add_parser("build", parents=[common], help="write the env's concatenated SQL")
    p.add_argument("-o", "--output", help="output file ('-' for stdout)")
    p.add_argument("--schema-only", action="store_true", help="leave out seed sets")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("template", parents=[common], help="make sure the env's template is current")
    p.add_argument("--rebuild", action="store_true", help="build even if current")
    p.add_argument("--check", action="store_true", help="exit 3 if the template is stale")
    p.set_defaults(handler=cmd_template)

    p = sub.add_parser("templates", parents=[common], help="list or prune templates")
    p.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    p.add_argument("--keep", type=int, help="templates to keep per env (prune)")
    p.set_defaults(handler=cmd_templates)

    p = sub.add_parser("clone", parents=[common], help="create a database from the env's template")
    p.add_argument("name", help="database to create")
    p.add_argument("--replace", action="store_true", help="drop it first if it exists")
    p.add_argument("--force", action="store_true", help="terminate its other sessions")
    p.set_defaults(handler=cmd_clone)

    p = sub.add_parser("reset", parents=[common], help="recreate the env's database from its template")
    p.add_argument("--force", action="store_true", help="terminate its other sessions")
    p.set_defaults(handler=cmd_reset)


# ── migration commands (§8) ───────────────────────────────────────────────────────────────


def _version_arg(text: str | None) -> int | None:
    return None if text is None else parse_version(text)


def _print_plan(app: App, run: MigrationRun) -> None:
    """A dry run: the plan and the SQL that would run, on stdout; nothing was executed."""
    which = "up" if run.direction == "up" else "down"
    verb = "apply" if which == "up" else "revert"
    if app.console.json_mode:
        doc = run.as_json()
        for item, m in zip(doc["planned"], run.planned):
            item["file"] = migration_rel(app.config, m.up if which == "up" else m.down)
            item["sql"] = migration_sql_preview(m, which)
        app.console.emit(doc)
    else:
        app.console.result(f"-- dry run: would {verb} {len(run.planned)} migration(s)"
                           + ("" if run.planned else " (nothing to do)"))
        for m in run.planned:
            path = m.up if which == "up" else m.down
            mode = "one transaction" if m.transactional else "no transaction, statement by statement"
            app.console.result(f"\n-- ==== {m.label} ({which}, {mode}): "
                               f"{migration_rel(app.config, path)}")
            app.console.result(migration_sql_preview(m, which).rstrip("\n"))
    app.console.info("dry run: nothing was executed and the database was not changed")


def _report_run(app: App, ws: Workspace, run: MigrationRun) -> int:
    if run.dry_run:
        _print_plan(app, run)
        return EXIT_OK
    verb = "applied" if run.direction == "up" else "reverted"
    if run.done:
        app.console.result(f"{verb} {len(run.done)} migration(s) on {ws.env.database}; "
                           f"last: {run.done[-1][0].label}")
    else:
        app.console.result(f"nothing to {'apply' if run.direction == 'up' else 'revert'} "
                           f"on {ws.env.database}")
    app.console.emit({"env": ws.env.name, "database": ws.env.database, **run.as_json()})
    return EXIT_OK


def cmd_migrate_new(app: App) -> int:
    paths = new_migration(app.config, app.args.name)
    for path in paths:
        app.console.result(migration_rel(app.config, path))
    app.console.emit({"created": [migration_rel(app.config, p) for p in paths]})
    return EXIT_OK


def cmd_migrate_generate(app: App) -> int:
    ws = app.workspace()
    if app.args.base and app.args.from_env:
        raise ConfigError("migrate generate: --base and --from-env are two different starts; "
                          "give one")
    side = FromSide(base=app.workspace(app.args.base) if app.args.base else None,
                    live=app.workspace(app.args.from_env) if app.args.from_env else None,
                    baseline=ws.config.migrations_baseline)
    renames = [parse_rename(text) for text in app.args.rename]
    result = generate_migration(ws, app.args.name, side, renames, app.args.allow_destructive,
                                online=app.args.online, privileges=app.args.privileges)
    app.console.emit(result.as_json())
    for hint in result.up.suggestions:
        app.console.warn(f"a drop and an add look like a rename: {hint}")
    if not result.paths:
        app.console.result(f"nothing to generate: {result.source} and the DDL agree")
        return EXIT_OK
    for path in result.paths:
        app.console.result(path)
    app.console.info(f"{len(result.up.statements)} statement(s) up, "
                     f"{len(result.down.statements)} down; proved on scratch copies of "
                     f"{result.source}")
    for finding in result.lint_errors:
        app.console.warn(f"{finding.file}:{finding.line}: {finding.rule}: {finding.message}")
    if result.lint_errors:
        app.console.warn(
            "deploy and migrate up on a protected env refuse these lint errors (judged there "
            "with its table sizes): plan with --online where it applies, or, once the change "
            "is safe, put '-- confiture:allow RULE reason' above the statement")
    return EXIT_OK


def cmd_migrate_status(app: App) -> int:
    ws = app.workspace()
    status = migration_status(ws, cached=True)
    if app.console.json_mode:
        app.console.emit({"env": ws.env.name, "database": ws.env.database, **status.as_json()})
    else:
        _print_status(app, status)
    for stray in status.files.strays:
        app.console.warn(f"not a migration (ignored): {stray}")
    if app.args.check and not status.clean:
        raise CheckFailed(f"migrations are not clean on {ws.env.database}: "
                          f"{len(status.pending)} pending, {len(status.changed)} changed, "
                          f"{len(status.missing)} missing, {len(status.partial)} interrupted")
    return EXIT_OK


def _print_status(app: App, status: MigrationStatus) -> None:
    out = app.console.result
    latest = status.applied[-1] if status.applied else None
    out(f"{len(status.applied)} applied, {len(status.pending)} pending"
        + (f"; at {latest.version} {latest.name}" if latest else "")
        + ("" if status.tracking else f" (no tracking table {status.table} yet)"))
    w = max([16, *(len(str(v)) for v in status_versions(status))])  # 20-digit versions too
    if app.console.verbose:
        for row in status.applied:
            out(f"  applied   {row.version:<{w}} {row.name:<36} {row.applied_at}  "
                f"{row.duration_ms} ms{f'  ({row.how})' if row.how != 'applied' else ''}")
    older = {m.version for m in status.out_of_order}
    for m in status.pending:
        out(f"  {'out-of-order' if m.version in older else 'pending':<12} {m.version:<{w}} "
            f"{m.name}" + ("  [no transaction]" if not m.transactional else ""))
    for m, row in status.changed:
        out(f"  changed      {m.version:<{w}} {m.name}  (recorded {row.checksum[:12]}, "
            f"file {m.checksum[:12]})")
    for row in status.missing:
        out(f"  missing      {row.version:<{w}} {row.name}  (applied {row.applied_at}, file gone)")
    for p in status.partial:
        out(f"  interrupted  {p.version:<{w}} {p.name}  ({p.done} of {p.total} statements ran, "
            f"{p.at}{'; ' + p.error if p.error else ''})")


def status_versions(status: MigrationStatus) -> list[int]:
    """Every version a status listing shows (its column is as wide as the longest)."""
    return [*(r.version for r in status.applied), *(m.version for m in status.pending),
            *(m.version for m, _ in status.changed), *(r.version for r in status.missing),
            *(p.version for p in status.partial)]


def _guard(app: App, kind: str, ws: Workspace | None = None, env: Env | None = None,
           **asked: Any) -> GuardState:
    """§16's guard for this command: --yes, --dry-run and --wait-for-quiet as given."""
    args = vars(app.args)
    env = env or (ws.env if ws is not None else app.env())
    state = guard(GuardRequest(kind, env, app.console, ws, yes=args.get("yes", False),
                               dry_run=args.get("dry_run", False),
                               quiet=args.get("wait_for_quiet"), **asked))
    if state.verdict is not None:
        app.console.info(f"consistent with the DDL after {state.verdict.start}"
                         + (" (kept verdict)" if state.verdict.cached else ""))
    return state


def cmd_migrate_up(app: App) -> int:
    ws = app.workspace()
    if app.args.rehearse:
        return _report_rehearsal(app, rehearse(ws, _version_arg(app.args.to)))
    _guard(app, "migrate up", ws, to=_version_arg(app.args.to))
    # a protected env is backed up by the run itself, under its lock
    run = migrate_up(ws, to=_version_arg(app.args.to), dry_run=app.args.dry_run)
    return _report_run(app, ws, run)


def cmd_migrate_down(app: App) -> int:
    ws = app.workspace()
    if app.args.steps is not None and app.args.to is not None:
        raise ConfigError("migrate down takes --steps N or --to VERSION, not both",
                          hint="e.g. 'confiture.py migrate down --steps 1'")
    # neither: one step, the newest applied migration (as dbmate, Rails and golang-migrate do)
    steps = 1 if app.args.steps is None and app.args.to is None else app.args.steps
    _guard(app, "migrate down", ws)
    run = migrate_down(ws, steps=steps, to=_version_arg(app.args.to),
                       dry_run=app.args.dry_run)
    return _report_run(app, ws, run)


def cmd_migrate_verify(app: App) -> int:
    ws = app.workspace()
    try:
        status = verify_migrations(ws)
    except CheckFailed:
        status = migration_status(ws)
        app.console.emit({"env": ws.env.name, "ok": False, **status.as_json()})
        if not app.console.json_mode:
            _print_status(app, status)
        raise
    app.console.result(f"{len(status.applied)} applied migration(s) match their files")
    app.console.emit({"env": ws.env.name, "ok": True, **status.as_json()})
    return EXIT_OK


def cmd_migrate_baseline(app: App) -> int:
    ws = app.workspace()
    _guard(app, "migrate baseline", ws)
    recorded = baseline_migrations(ws, parse_version(app.args.to))
    app.console.result(f"recorded {len(recorded)} migration(s) as applied without running them"
                       + (f", up to {recorded[-1].label}" if recorded else ""))
    app.console.emit({"env": ws.env.name, "baseline": [m.version for m in recorded]})
    return EXIT_OK


def cmd_migrate_repair(app: App) -> int:
    ws = app.workspace()
    _guard(app, "migrate repair", ws)
    result = repair_migrations(ws)
    for m, row in result.accepted:
        app.console.result(f"accepted {m.label}: checksum {row.checksum[:12]} → {m.checksum[:12]}")
    for row in result.forgotten:
        app.console.result(f"forgot {row.version}_{row.name} (its file is gone)")
    for p in result.cleared:
        app.console.result(f"cleared interrupted run of {p.version}_{p.name} "
                           f"({p.done} of {p.total} statements had run)")
    if not (result.accepted or result.forgotten or result.cleared):
        app.console.result("nothing to repair")
    app.console.emit({"env": ws.env.name,
                      "accepted": [m.version for m, _ in result.accepted],
                      "forgotten": [r.version for r in result.forgotten],
                      "cleared": [p.version for p in result.cleared]})
    return EXIT_OK


def cmd_migrate_lint(app: App) -> int:
    if app.args.rules:
        return _print_rules(app)
    ws = app.workspace()
    report = lint_env(ws, [Path(f) for f in app.args.files])
    if report.note:
        app.console.info(report.note)
    if app.console.json_mode:
        app.console.emit({"env": ws.env.name, **report.as_json()})
    else:
        for finding in report.findings:
            _print_finding(app, finding)
        target = (f"facts from env {report.target} (server {report.server_version})"
                  if report.target else "no target facts")
        app.console.result(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s), "
                           f"{len(report.allowed)} allowed in {report.files} file(s), "
                           f"{report.statements} statement(s); {target}")
    if report.errors:
        raise CheckFailed(f"{len(report.errors)} lint error(s)",
                          hint="fix them, or allow one statement with a comment above it: "
                               "'-- confiture:allow RULE reason'")
    return EXIT_OK


def _print_finding(app: App, finding: Finding) -> None:
    rule = LINT_RULE_IDS[finding.rule]
    level = f"allowed ({finding.allowed})" if finding.allowed else finding.level
    app.console.result(f"{finding.file}:{finding.line}: {level} [{finding.rule}] "
                       f"{finding.message}")
    if not finding.allowed:
        app.console.result(f"    why: {rule.why}")
        app.console.result(f"    instead: {rule.instead}")


def _print_rules(app: App) -> int:
    enabled = lint_settings(app.config, app.env()).enabled
    for rule in LINT_RULES:
        state = "" if rule.id in enabled else " (off)"
        app.console.result(f"{rule.id:<30} {rule.level}{state}\n    why: {rule.why}\n"
                           f"    instead: {rule.instead}")
    app.console.emit({"rules": [{"id": r.id, "level": r.level, "enabled": r.id in enabled,
                                 "why": r.why, "instead": r.instead} for r in LINT_RULES]})
    return EXIT_OK


def _add_wait_for_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-for-quiet", type=float, metavar="SECONDS",
                   help="do not start while a transaction older than SECONDS is open on the "
                        "database (gives up after [migrations] lock_timeout, exit 5)")
    p.add_argument("--rehearse", action="store_true",
                   help="apply the pending migrations to a scratch copy (newest backup of a "
                        "protected env), report durations and locks; the env is not changed")


def _report_rehearsal(app: App, result: Rehearsal) -> int:
    out = app.console.result
    out(f"rehearsal of env {result.env} on {result.source} (scratch server "
        f"{result.server}): {len(result.statements)} statement(s) in "
        f"{format_seconds(result.seconds)}")
    width = max((len(f"{s.file}:{s.line}") for s in result.statements), default=0)
    for s in result.statements:
        lock = f"{lock_label(s.lock)} on {s.relation}, held {format_seconds(s.held)}" \
            if s.lock else "no table lock"
        rewrote = "".join(f"; rewrote {t} ({format_count(n)} rows)" for t, n in s.rewritten)
        where = f"{s.file}:{s.line}"  # padded: the durations stand in one column
        out(f"  {where:<{width}}  {format_seconds(s.seconds):>9}  {lock}{rewrote}\n"
            f"      {s.text}")
    app.console.info("timings come from the scratch server: on another machine they are "
                     "indicative; the locks taken are not")
    app.console.emit(result.as_json())
    if result.failed:
        raise PgError(f"the rehearsal failed: {result.failed}",
                      hint="the env was not changed; fix the migration and rehearse again")
    return EXIT_OK


# Over 60 lines: one parser per migrate action, in the order --help lists them; a table of
# dicts would hide argparse's own vocabulary.
def add_migration_commands(sub: Commands, common: argparse.ArgumentParser) -> None:
    m = sub.add_parser("migrate", parents=[common], help="incremental migrations (up, down, …)",
                       description="Versioned up/down SQL migrations with checksums, a lock and "
                                   "one transaction per migration.")
    m.set_defaults(handler=cmd_migrate_status, check=False)
    msub = sub.nested(m.add_subparsers(dest="migrate_command", metavar="ACTION",
                                       parser_class=CliParser))

    p = msub.add_parser("new", parents=[common], help="create <UTC timestamp>_NAME up/down files")
    p.add_argument("name", help="what the migration does, e.g. add_user_email")
    p.set_defaults(handler=cmd_migrate_new)

    p = msub.add_parser("generate", parents=[common],
                        help="write the migration that takes the migrations' schema to the DDL's "
                             "(planned, then proved on scratch databases)")
    p.add_argument("name", help="what the migration does, e.g. add_user_email")
    p.add_argument("--allow-destructive", action="store_true",
                   help="allow drops of tables and columns and narrowing type changes")
    p.add_argument("--rename", action="append", default=[], metavar="KIND:OLD=NEW",
                   help="a rename instead of drop+add: table:old=new or column:table.old=new "
                        "(repeatable)")
    p.add_argument("--online", action="store_true",
                   help="for live tables: new indexes CONCURRENTLY and new constraints "
                        "validated in a second, no-transaction migration")
    p.add_argument("--base", metavar="ENV",
                   help="start from ENV's schema and applied migrations instead of an empty "
                        "database")
    p.add_argument("--from-env", metavar="ENV",
                   help="start from ENV's live schema as it is (read-only)")
    p.add_argument("--privileges", action="store_true",
                   help="also plan owners and grants (ALTER … OWNER TO, GRANT, REVOKE)")
    p.set_defaults(handler=cmd_migrate_generate)

    p = msub.add_parser("status", parents=[common],
                        help="applied / pending / changed / missing / out-of-order")
    p.add_argument("--check", action="store_true", help="exit 3 unless everything is applied")
    p.set_defaults(handler=cmd_migrate_status)

    p = msub.add_parser("up", parents=[common], help="apply pending migrations in order")
    p.add_argument("--to", metavar="VERSION", help="stop after this version")
    p.add_argument("--dry-run", action="store_true", help="print the plan and SQL; run nothing")
    _add_wait_for_quiet(p)
    p.set_defaults(handler=cmd_migrate_up)

    p = msub.add_parser("down", parents=[common],
                        help="revert the newest applied migration (--steps N, --to VERSION: more)",
                        description="Revert applied migrations, newest first. Without --steps "
                                    "or --to: one step, the newest applied migration.")
    p.add_argument("--steps", type=int, metavar="N", help="revert the N newest (default: 1)")
    p.add_argument("--to", metavar="VERSION", help="revert everything newer than VERSION (0: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and SQL; run nothing")
    p.set_defaults(handler=cmd_migrate_down)

    p = msub.add_parser("verify", parents=[common],
                        help="compare recorded checksums with the files (exit 3 on a difference)")
    p.set_defaults(handler=cmd_migrate_verify)

    p = msub.add_parser("baseline", parents=[common],
                        help="record migrations up to VERSION as applied without running them")
    p.add_argument("--to", metavar="VERSION", required=True, help="last version to record")
    p.set_defaults(handler=cmd_migrate_baseline)

    p = msub.add_parser("repair", parents=[common],
                        help="accept the current files' checksums (logged)")
    p.set_defaults(handler=cmd_migrate_repair)

    p = msub.add_parser("lint", parents=[common],
                        help="hazards in pending migrations (or FILES), with the env's table "
                             "sizes; exit 3 on an error")
    p.add_argument("files", nargs="*", metavar="FILE", help="lint these files instead")
    p.add_argument("--rules", action="store_true", help="list the rules and exit")
    p.set_defaults(handler=cmd_migrate_lint)


# ── backup, restore and deploy commands (§7b, §9, §16) ─────────────────────────────────────


def _backup_document(backup: Backup) -> dict[str, Any]:
    return {"path": str(backup.path), **backup.sidecar()}


def cmd_backup(app: App) -> int:
    ws = app.workspace()
    output = Path(app.args.output).resolve() if app.args.output else None
    backup = create_backup(ws, output)
    app.console.result(str(backup.path))
    app.console.info(f"backed up {ws.env.database} in {format_seconds(backup.seconds)} "
                     f"({format_bytes(backup.size)}, sha256 {backup.sha256[:12]}…)")
    app.console.emit(_backup_document(backup))
    return EXIT_OK


def cmd_backups(app: App) -> int:
    env = app.env()
    folder = backup_folder(app.config, env.name, app.environ)
    if app.args.action == "prune":
        keep = app.args.keep if app.args.keep is not None else app.config.backups_keep
        if keep < 1:  # as [backups] keep is checked at load: a prune keeps the newest
            raise ConfigError(f"--keep must be at least 1, not {keep}")
        doomed = list_backups(folder)[keep:]  # prune_backups deletes these, newest kept
        if doomed:  # deleting a protected env's backups is a write to it: same rules
            _guard(app, "backups prune", env=env,
                   action=f"backups prune (deleting {len(doomed)} backup(s))")
        removed = prune_backups(folder, keep)
        dropped: list[str] = []
        ws = open_workspace(env, app.console, app.environ)
        if app.args.replaced is not None:
            _guard(app, "backups prune --replaced", ws, action="dropping replaced databases of")
            dropped = drop_replaced(ws, app.args.replaced)
        else:
            try:
                dropped = drop_replaced(ws, None)
            except ConnectionFailed as exc:
                app.console.debug(f"scratch databases not checked: {exc.message}")
        for path in removed:
            app.console.result(f"removed {path}")
        for name in dropped:
            app.console.result(f"dropped database {name}")
        app.console.emit({"removed": [str(p) for p in removed], "dropped": dropped})
        return EXIT_OK
    backups = list_backups(folder)
    replaced: list[dict[str, Any]] = []
    try:
        ws = open_workspace(env, app.console, app.environ)
        with admin_session(ws) as admin:
            replaced = replaced_databases(admin, env.database)
    except PgError as exc:
        app.console.debug(f"replaced databases not listed: {exc.message}")
    if app.console.json_mode:
        app.console.emit({"folder": str(folder), "backups": [_backup_document(b) for b in backups],
                          "replaced_databases": [{k: m.get(k) for k in
                                                  ("datname", "at", "backup", "size")}
                                                 for m in replaced]})
        return EXIT_OK
    if not backups:
        app.console.info(f"no backups of env {env.name} in {folder}")
    for b in backups:
        app.console.result(f"{b.path.name:<48} {format_bytes(b.size):>9}  {b.created_at}  "
                           f"migration {b.migration_version or '-'}")
    for meta in replaced:
        app.console.result(f"database {meta['datname']:<39} {format_bytes(int(meta['size'])):>9}  "
                           f"{meta.get('at')}  replaced by a restore")
    return EXIT_OK


def cmd_restore(app: App) -> int:
    ws = app.workspace()
    path = resolve_backup(ws.config, ws.env.name, app.args.file, app.environ)
    _guard(app, "restore", ws, action=f"restore of {path.name} into {ws.env.database}")
    result = restore_backup(ws, path, force=app.args.force)
    app.console.result(ws.env.database)
    app.console.info(f"restored {path.name} into {ws.env.database} in "
                     f"{format_seconds(result.seconds)} ({result.mode})"
                     + (f"; the previous database is kept as {result.replaced}"
                        if result.replaced else "")
                     + (f"; its previous state is in {result.safety_backup}"
                        if result.safety_backup else ""))
    app.console.emit({**as_dict(result), "backup": str(result.backup),
                      "safety_backup": str(result.safety_backup) if result.safety_backup
                      else None})
    return EXIT_OK


def cmd_deploy(app: App) -> int:
    ws = app.workspace()
    if app.args.rehearse:
        return _report_rehearsal(app, rehearse(ws))
    _guard(app, "deploy", ws, no_backup=app.args.no_backup)
    result = deploy(ws, no_backup=app.args.no_backup, dry_run=app.args.dry_run)
    document = {"outcome": result.outcome, "plan": as_dict(result.plan),
                "applied": result.applied,
                "backup": str(result.backup.path) if result.backup else None,
                "seconds": round(result.seconds, 3)}
    if result.outcome == "dry-run":
        for line in describe_plan(result.plan):
            app.console.result(line)
    else:
        app.console.result(f"deployed env {ws.env.name}: {len(result.applied)} migration(s)"
                           + (" (first deploy)" if result.plan.first_deploy else "")
                           + f" in {format_seconds(result.seconds)}")
        if result.backup:
            app.console.info(f"backup: {result.backup.path}")
    app.console.emit(document)
    return EXIT_OK


def add_backup_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[common], help="pg_dump the env's database, verified")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of the backup folder")
    p.set_defaults(handler=cmd_backup)

    p = sub.add_parser("backups", parents=[common], help="list or prune the env's backups")
    p.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    p.add_argument("--keep", type=int, help="backups to keep (prune; default [backups] keep)")
    p.add_argument("--replaced", type=int, metavar="N", nargs="?", const=0,
                   help="prune: also drop databases replaced by restores, keeping the newest N "
                        "(default 0)")
    p.set_defaults(handler=cmd_backups)

    p = sub.add_parser("restore", parents=[common], help="restore a backup into the env's database")
    p.add_argument("file", metavar="FILE|latest", help="a backup file, or 'latest'")
    p.add_argument("--force", action="store_true", help="terminate other sessions on the database")
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("deploy", parents=[common],
                       help="back up, migrate, verify, record; roll back on failure")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--no-backup", action="store_true",
                   help="skip the backup (refused on protected envs)")
    _add_wait_for_quiet(p)
    p.set_defaults(handler=cmd_deploy)


# ── sync commands (§10) ───────────────────────────────────────────────────────────────────


def _sync_settings(app: App, rules: bool = False) -> SyncSettings:
    """--from/--to, else [sync] from/to; `sync rules` falls back to the current env as source,
    a sync to an explicit --env as target."""
    sync = app.config.sync
    tables = [t.strip() for item in (app.args.tables or []) for t in item.split(",") if t.strip()]
    source = app.args.source or sync.source or (app.env_name() if rules else None)
    target = app.args.target or sync.target or app.args.env
    if rules:
        target = target or source  # not used: `sync rules` reads the source only
    return load_sync_settings(app.config, app.environ, source=source, target=target,
                              tables=tables, need_key=not rules)


def cmd_sync_rules(app: App) -> int:
    settings = _sync_settings(app, rules=True)
    text, tables = sync_rules(app.config, settings, app.environ)
    if app.console.json_mode:
        app.console.emit({"from": settings.source, "rules": text,
                          "tables": [t.qualified for t in tables]})
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _print_sync_plan(app: App, outcome: SyncOutcome) -> None:
    plan = outcome.plan
    assert plan is not None
    mode = ("session_replication_role = replica, foreign keys validated by query"
            if outcome.replica else "foreign-key order, constraints checked by PostgreSQL")
    app.console.result(f"dry run: {len(plan.tables)} tables, {mode}; nothing was written")
    for table in plan.tables:
        masked = ", ".join(f"{c}={r}" for c, r in table.rules) or "-"
        app.console.result(f"  {table.name:<36} {'binary' if table.binary else 'text':<6} "
                           f"~{max(table.source.estimate, 0):,} rows  masked: {masked}  "
                           f"kept: {len(table.kept)}"
                           + (f"  where: {table.where}" if table.where else "")
                           + (f"  defaults: {', '.join(table.defaulted)}" if table.defaulted else ""))


def cmd_sync(app: App) -> int:
    if app.args.action == "rules":
        return cmd_sync_rules(app)
    settings = _sync_settings(app)
    outcome = run_sync(app.config, settings, app.console, app.environ, dry_run=app.args.dry_run)
    report = outcome.report
    if app.args.dry_run:
        if app.console.json_mode:
            assert outcome.plan is not None
            app.console.emit({"dry_run": True, "from": settings.source, "to": settings.target,
                              "replica": outcome.replica,
                              "tables": [{"table": t.name, "binary": t.binary,
                                          "masked": [f"{c} ({r})" for c, r in t.rules],
                                          "kept": list(t.kept), "where": t.where,
                                          "select": t.select} for t in outcome.plan.tables]})
        else:
            _print_sync_plan(app, outcome)
        return EXIT_OK
    app.console.result(f"synced {len(report['tables'])} tables, {report['rows']:,} rows from "
                       f"{settings.source} to {settings.target} in "
                       f"{format_seconds(report['seconds'])}")
    app.console.info(f"report: {report['report']}")
    app.console.emit(report)
    return EXIT_OK


def cmd_schema_to_schema(app: App) -> int:
    mapping = load_mapping(Path(app.args.mapping) if app.args.mapping else None)
    result = schema_to_schema(app.config, app.args.source, app.args.target, mapping,
                              app.console, app.environ, yes=app.args.yes,
                              dry_run=app.args.dry_run)
    plan = result.plan
    for note in (*plan.notes, *(f"{t}: no table in the old database, left empty"
                                for t in plan.empty),
                 *(f"{t}: not copied (no table of that name in the new database)"
                   for t in plan.dropped)):
        app.console.warn(note)
    if app.args.dry_run:
        app.console.result(f"dry run: {len(plan.tables)} tables would be copied; nothing was "
                           "written")
        for table in plan.tables:
            app.console.result(f"  {table.old.qualified} → {table.new.qualified} "
                               f"({len(table.columns)} columns)")
    else:
        app.console.result(f"copied {len(result.tables)} tables, {result.rows:,} rows from "
                           f"{app.args.source} to {app.args.target} in "
                           f"{format_seconds(result.seconds)}; row counts verified")
    app.console.emit({"from": app.args.source, "to": app.args.target, "dry_run": app.args.dry_run,
                      "tables": result.tables, "rows": result.rows,
                      "empty": list(plan.empty), "not_copied": list(plan.dropped)})
    return EXIT_OK


def add_sync_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sync", parents=[common], help="anonymized copy between environments",
                       description="Copy tables from one environment to another with personal "
                       "data rewritten by [sync.rules]; 'sync rules' prints a rules block.")
    p.add_argument("action", nargs="?", choices=["rules"], help="print a complete rules block")
    p.add_argument("--from", dest="source", metavar="ENV", help="source env ([sync] from)")
    p.add_argument("--to", dest="target", metavar="ENV", help="target env ([sync] to)")
    p.add_argument("--tables", nargs="+", metavar="PATTERN",
                   help="tables to copy (globs, schema.table allowed; overrides [sync] tables)")
    p.add_argument("--dry-run", action="store_true", help="plan and check; write nothing")
    p.set_defaults(handler=cmd_sync)

    p = sub.add_parser("schema-to-schema", parents=[common],
                       help="copy an old database's data into a freshly built one (postgres_fdw)")
    p.add_argument("--from", dest="source", metavar="ENV", required=True, help="old database")
    p.add_argument("--to", dest="target", metavar="ENV", required=True, help="new database")
    p.add_argument("--mapping", metavar="FILE", help="TOML file of table and column renames")
    p.add_argument("--dry-run", action="store_true", help="plan and check; write nothing")
    p.set_defaults(handler=cmd_schema_to_schema)


# ── drift, status and watch commands (§13, §14) ───────────────────────────────────────────


def format_drift(report: DriftReport, console: Console) -> list[str]:
    """Text of a drift report: one line per object (+ added, - missing, ~ changed), column
    detail, the unified diff of changed objects, and a count."""
    lines = [f"comparing {report.actual} with {report.expected}"]
    marks = {"added": "+", "missing": "-", "changed": "~"}
    where = {"added": f"not in {report.reference}", "missing": f"only in {report.reference}",
             "changed": ""}
    for diff in report.differences:
        note = f"  ({where[diff.change]})" if where[diff.change] else ""
        lines.append(f"{marks[diff.change]} {diff.label}{note}")
        lines.extend(f"    {item}" for item in diff.summary)
        if diff.change == "changed" and not console.quiet:
            lines.extend(f"    {line}" for line in diff.diff.split("\n"))
    counts = report.counts()
    if report.differences:
        lines.append(f"{len(report.differences)} difference(s): {counts['added']} added, "
                     f"{counts['missing']} missing, {counts['changed']} changed")
    else:
        lines.append("no differences")
    return lines


def cmd_diff(app: App) -> int:
    ws = app.workspace()
    against = app.args.against or "ddl"
    if app.args.base and not app.args.migrations:
        raise ConfigError("diff: --base goes with --migrations")
    if app.args.sql:
        return _diff_sql(app, ws, against)
    if app.args.migrations:
        if app.args.against:
            raise ConfigError("diff: --migrations compares migrations with the DDL; "
                              "leave out --against")
        base = app.workspace(app.args.base) if app.args.base else None
        report = diff_migrations(ws, app.args.privileges, base)
    elif against == "ddl":
        report = diff_against_ddl(ws, app.args.privileges)
    else:
        if against == ws.env.name:
            raise ConfigError(f"diff: --against {against} is the env itself",
                              hint="name another env, or 'ddl'")
        report = diff_against_env(ws, app.workspace(against), app.args.privileges)
    app.console.emit(report.as_json())
    for line in format_drift(report, app.console):
        app.console.result(line)
    return EXIT_CHECK if report.differences else EXIT_OK


def _diff_sql(app: App, ws: Workspace, against: str) -> int:
    """diff --sql: the statements that turn the env's database into its reference."""
    if app.args.migrations:
        raise ConfigError("diff --sql shows what the database needs; for what the migrations "
                          "need, run migrate generate")
    if against == ws.env.name:
        raise ConfigError(f"diff: --against {against} is the env itself",
                          hint="name another env, or 'ddl'")
    plan = diff_sql(ws, None if against == "ddl" else app.workspace(against),
                    app.args.privileges)
    app.console.emit({"statements": [s.sql for s in plan.statements],
                      "destructive": [s.sql for s in plan.destructive],
                      "unsupported": list(plan.unsupported),
                      "suggestions": list(plan.suggestions)})
    for text in plan_lines(plan):
        for line in text.splitlines():
            app.console.result(line)
    for problem in plan.unsupported:
        app.console.warn(f"not expressed: {problem}")
    for hint in plan.suggestions:
        app.console.warn(f"a drop and an add look like a rename: migrate generate NAME {hint} "
                         "plans ALTER … RENAME instead")
    if not plan.statements and not plan.unsupported:
        app.console.info("-- no differences")
    return EXIT_CHECK if plan.statements or plan.unsupported else EXIT_OK


def cmd_watch(app: App) -> int:
    ws = app.workspace()
    console = app.console

    def report(event: WatchEvent) -> None:
        if console.json_mode:
            print(json.dumps(event.as_json()), file=console.out, flush=True)
            return
        stamp = time.strftime("%H:%M:%S")
        changed = ""
        if event.changed:
            changed = f" [{', '.join(event.changed[:3])}" + \
                (f" +{len(event.changed) - 3} more]" if len(event.changed) > 3 else "]")
        if event.kind == "error":
            console.error(f"{stamp} {event.message}{changed} (still watching)",
                          finish_hint(event.hint, None, app))
        elif event.kind == "reset":
            console.result(f"{stamp} {event.message}{changed}")
            console.out.flush()
        else:
            console.info(f"{stamp} {event.message}{changed}")

    watch_env(ws, app.args.interval, report, force=app.args.force)
    return EXIT_OK


def cmd_status(app: App) -> int:
    ws = app.workspace()
    status = gather_status(ws, drift=app.args.drift)
    app.console.emit({**as_dict(status), "ok": not status.attention})
    for line in format_status(status):
        app.console.result(app.with_options(line))
    if not status.reachable:  # the screen (or JSON) above is the output; the error is its end
        app.console.error(f"env {ws.env.name}: {status.server.get('error')}", finish_hint(
            status.server.get("hint"), status.server.get("reason"), app))
        return EXIT_FAILED
    return EXIT_CHECK if app.args.check and status.attention else EXIT_OK


def add_drift_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("diff", parents=[common],
                       help="schema drift between the env's database and its DDL (exit 3 if any)")
    p.add_argument("--against", metavar="ddl|ENV",
                   help="compare with the DDL build (default) or another env's database")
    p.add_argument("--migrations", action="store_true",
                   help="apply all migrations to a scratch database and compare it with the DDL")
    p.add_argument("--base", metavar="ENV",
                   help="with --migrations: start from ENV's schema and applied migrations "
                        "instead of an empty database")
    p.add_argument("--privileges", action="store_true",
                   help="also compare owners and grants (with --sql: plan them)")
    p.add_argument("--sql", action="store_true",
                   help="print the statements that turn the env's database into the reference")
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser("watch", parents=[common],
                       help="rebuild the template and reset the env's database on every change")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between polls (default 0.5)")
    p.add_argument("--force", action="store_true",
                   help="terminate other sessions on the database when resetting it")
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("status", parents=[common], help="the env at a glance")
    p.add_argument("--check", action="store_true", help="exit 3 when anything needs attention")
    p.add_argument("--drift", action="store_true", help="also compare the schema with the DDL")
    p.set_defaults(handler=cmd_status)


# ── parser and main ───────────────────────────────────────────────────────────────────────


def _command_words(argv: Sequence[str]) -> list[str]:
    """The command in argv and the word after it, e.g. ['migrate', 'up'] (words that are not
    global options or their values; none after '--')."""
    skip, words = False, []
    for word in argv:
        if skip:
            skip = False
        elif word in ("--config", "--env"):
            skip = True
        elif word == "--":
            break
        elif not word.startswith("-"):
            words.append(word)
            if len(words) == 2:
                break
    return words


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with argv, only the named command's sub-parser is built (and of an
    action level, only the named action's)."""
    only, action = ([*_command_words(argv), None, None][:2] if argv is not None
                    else (None, None))
    parser = CliParser(prog="confiture.py", parents=[global_options(False)],
                     usage="confiture.py [global options] COMMAND [options]",
                     description="The whole PostgreSQL database workflow in one file.")
    parser.add_argument("--version", action="version", version=f"confiture.py {__version__}")
    common = global_options(True)
    sub = Commands(parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                                         prog="confiture.py", parser_class=CliParser), only,
                   action=action)
    adders = (add_foundation_commands, add_migration_commands, add_backup_commands,
              add_sync_commands, add_drift_commands)
    for (title, examples), add in zip(COMMAND_AREAS, adders, strict=True):
        sub.begin_area(title, examples)
        add(sub, common)
    if only is not None and not all(level.matched for level in sub.levels):
        return build_parser()  # unknown command or action: the full parser names the valid ones
    parser.epilog = sub.epilog()
    return parser


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse argv, run one command, map errors to messages and exit codes."""
    environ = dict(os.environ if environ is None else environ)
    console = Console()
    app: App | None = None
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        args = build_parser(words).parse_args(words)
        console = Console(quiet=args.quiet, verbose=args.verbose, json_mode=args.json,
                          color=sys.stderr.isatty() and "NO_COLOR" not in environ)
        if not getattr(args, "handler", None):
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        # SIGTERM unwinds like Ctrl-C, so sessions are cancelled and temporary objects dropped.
        import threading

        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
        try:
            app = App(args=args, console=console, environ=environ, cwd=Path.cwd())
            return int(args.handler(app))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except ConfitureError as exc:
        hint = finish_hint(exc.hint, getattr(exc, "reason", None), app)
        if console.json_mode and not console.emitted:  # e.g. --check after the status document
            console.emit({"error": exc.message, "hint": hint, "exit_code": exc.exit_code})
        console.error(mask_password_in(exc.message), hint)
        return exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED


def run_cli() -> NoReturn:
    """main() as a process: exit with its code. Output that cannot be flushed (a reader that
    went away, `confiture.py … | head`) makes a failed run, never a traceback at exit."""
    # What the import made lives as long as the process: frozen, the collector never walks
    # it again, neither during the run nor in the full collection of the interpreter's
    # teardown (~15 ms at best, 70 ms+ on a loaded machine: README *Start-up*). Teardown is
    # otherwise the same: atexit handlers run, buffers are flushed.
    gc.freeze()
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            code = code or EXIT_FAILED
            _silence(stream)
    sys.exit(code)


def _silence(stream: Any) -> None:
    """Point a stream's file descriptor at /dev/null, so the interpreter's own flush at exit
    does not report the pipe that went away."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    run_cli()
