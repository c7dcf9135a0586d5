#!/usr/bin/env python3
"""make bench — our commands against the raw floor, measured in the same run, as ratios.

Starts its own throwaway clusters with bin/pg-dev (names 'bench' and 'bench2'), runs every
bench/bench_<area>.py module (or those named in $BENCH, comma-separated), and prints one
Markdown table. Each module defines `run(ctx: Bench) -> list[Row]`.

Timings interleave ours and the floor (A/B/A/B…) and report medians, because this machine's
file-creation cost swings several-fold within minutes; only the ratios are meaningful.
"""
from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


@dataclass
class Row:
    what: str
    ours: float          # median seconds (or a rate, see `unit`)
    floor: float
    target: str          # e.g. "≤ 1.3×" or "≥ 0.9×"
    note: str = ""
    unit: str = "s"      # "s": ratio = ours/floor; "rows/s": ratio = ours/floor as throughput;
    #                      "share": a fraction (ours) of a whole (floor 1.0)

    @property
    def ratio(self) -> float:
        return self.ours / self.floor if self.floor else float("nan")

    def met(self) -> bool | None:
        """None for rows shown for comparison only (target "—")."""
        if self.target == "—":
            return None
        op, value = self.target.split()[0], float(self.target.split()[1].rstrip("×"))
        return self.ratio <= value if op == "≤" else self.ratio >= value


@dataclass
class Cluster:
    name: str
    env: dict[str, str]

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run([PGBIN + "/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                              "-d", db, "-c", sql], env=self.env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"psql failed: {sql[:200]}\n{out.stderr}")
        return out.stdout.strip()


def _pgbin() -> str:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "/usr/lib/postgresql/15/bin"


PGBIN = _pgbin()
PYTHON = os.path.realpath(sys.executable)


def start_cluster(name: str, extra_env: dict[str, str] | None = None) -> Cluster:
    env = dict(os.environ, **(extra_env or {}))
    subprocess.run([str(ROOT / "bin/pg-dev"), "start", name], check=True, env=env)
    out = subprocess.run([str(ROOT / "bin/pg-dev"), "env", name], check=True, env=env,
                         capture_output=True, text=True).stdout
    # Bytecode caching on, as users normally have it (some sandboxes export the opposite).
    cenv = {k: v for k, v in os.environ.items()
            if not k.startswith(("PG", "CONFITURE_")) and k != "PYTHONDONTWRITEBYTECODE"}
    cenv["PYTHON"] = PYTHON
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[7:].partition("=")
            cenv[key] = value.strip("'\"")
    return Cluster(name, cenv)


@dataclass
class Bench:
    main: Cluster
    second: Cluster
    work: Path
    runs: int = int(os.environ.get("RUNS", "5"))
    quick: bool = os.environ.get("QUICK") == "1"
    rows: list[Row] = field(default_factory=list)

    def time(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def paired(self, ours: Callable[[], object], floor: Callable[[], object],
               runs: int | None = None, setup: Callable[[], object] | None = None,
               warmup: int = 1) -> tuple[float, float]:
        """Median seconds of ours and floor, run alternately (A/B/A/B)."""
        a, b = [], []
        for i in range(warmup + (runs or self.runs)):
            for fn, acc in ((ours, a), (floor, b)):
                if setup:
                    setup()
                t = self.time(fn)
                if i >= warmup:
                    acc.append(t)
        return statistics.median(a), statistics.median(b)

    def cli(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        """Run the tool as the Makefile does (bin/confiture): a new interpreter each time."""
        self._run([str(ROOT / "bin/confiture"), *args], cwd, env)

    def cli_script(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        """`python confiture.py …`: the file is compiled on every call (no bytecode cache)."""
        self._run([PYTHON, str(ROOT / "confiture.py"), *args], cwd, env)

    def _run(self, argv: list[str], cwd: Path, env: dict[str, str] | None) -> None:
        out = subprocess.run(argv, cwd=cwd, env=env or self.main.env, capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr}")

    def sh(self, cmd: str, env: dict[str, str] | None = None) -> None:
        out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env or self.main.env,
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"command failed: {cmd}\n{out.stderr}")


def _format(r: Row) -> str:
    fmt = (lambda v: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s") if r.unit == "s" \
        else (lambda v: f"{v:.1%}") if r.unit == "share" \
        else (lambda v: f"{v / 1000:,.0f} k {r.unit}")
    return (f"| {r.what} | {fmt(r.ours)} | {fmt(r.floor)} | {r.ratio:.2f}× | {r.target} | "
            f"{ {True: 'yes', False: 'no', None: '—'}[r.met()]} |" + (f" {r.note} |" if r.note else ""))


def main() -> int:
    import tempfile

    wanted = [w for w in os.environ.get("BENCH", "").split(",") if w]
    modules = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
    if wanted:
        modules = [m for m in modules if m.removeprefix("bench_") in wanted]
    subprocess.run([PYTHON, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import confiture"],
                   check=True, env={k: v for k, v in os.environ.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})  # warm __pycache__
    main_c = start_cluster("bench")
    second = start_cluster("bench2")
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="confiture-bench-") as work:
        for name in modules:
            print(f"== {name}", file=sys.stderr, flush=True)
            ctx = Bench(main_c, second, Path(work) / name)
            ctx.work.mkdir()
            try:
                mod = importlib.import_module(name)
                done = mod.run(ctx)
            except Exception:  # one module's failure must not lose the others' figures
                import traceback

                traceback.print_exc()
                failed.append(name)
                continue
            for row in done:
                print("   " + _format(row), file=sys.stderr, flush=True)
            rows.extend(done)
    print("| what | ours | raw floor | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(_format(r))
    for name in failed:
        print(f"| {name} | failed (see stderr) | | | | |")
    if os.environ.get("KEEP_CLUSTERS") != "1":
        for c in ("bench", "bench2"):
            subprocess.run([str(ROOT / "bin/pg-dev"), "stop", c], check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
