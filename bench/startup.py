#!/usr/bin/env python3
"""Start-up time of confiture.py on the three paths users run, with and without a bytecode cache.

    python3 bench/startup.py [ROOT ...]          (ROOT: a folder holding confiture.py; default: ours)

Paths: `python3 confiture.py` (compiles the whole file on every call), `python3 -m confiture`
(module import: uses __pycache__) and `bin/confiture` (module import, `-S`). Each is run as is and
with PYTHONDONTWRITEBYTECODE=1 from a copy that has no __pycache__ (a Docker image or CI checkout),
where the module path compiles the file on every call too. Commands: `--version` (the bare start)
and `scan` in a small project made by `init` (configuration, file hashing; no server needed).

Runs are interleaved (every root, path and mode in turn, RUNS rounds, default 21) and medians are
printed, in ms, of CPU time (user + system, the steadier figure on a loaded machine) and of wall
time: a shared machine's load swings within seconds, so only runs taken side by side compare. Several roots compare variants of the file (one trick removed each, say).
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PATHS = ("python3 confiture.py", "python3 -m confiture", "bin/confiture")
COMMANDS = (("--version",), ("scan",))


def copy_root(root: Path, into: Path) -> Path:
    """confiture.py and bin/confiture of `root` in a fresh folder (no __pycache__)."""
    into.mkdir(parents=True)
    shutil.copy(root / "confiture.py", into / "confiture.py")
    (into / "bin").mkdir()
    shutil.copy(HERE / "bin" / "confiture", into / "bin" / "confiture")
    return into


def argv_for(path: str, root: Path, words: tuple[str, ...]) -> list[str]:
    if path == "python3 confiture.py":
        return [sys.executable, str(root / "confiture.py"), *words]
    if path == "python3 -m confiture":
        return [sys.executable, "-m", "confiture", *words]
    return [str(root / "bin" / "confiture"), *words]


def time_one(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children). On a loaded
    machine the CPU time is the steadier figure: waiting for a core does not count."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, check=False, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu


def main() -> None:
    roots = [Path(r).resolve() for r in sys.argv[1:]] or [HERE]
    runs = int(os.environ.get("RUNS", "21"))
    work = Path(tempfile.mkdtemp(prefix="confiture-startup-"))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PG", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"))}
    base["PYTHON"] = sys.executable
    project = work / "project"
    project.mkdir()
    subprocess.run([sys.executable, str(roots[0] / "confiture.py"), "init"], cwd=project,
                   env=base, check=True, capture_output=True)
    cases = []
    for i, root in enumerate(roots):
        for mode in ("cached", "PYTHONDONTWRITEBYTECODE=1"):
            copy = copy_root(root, work / f"{i}-{mode[:6]}")
            env = dict(base, PYTHONPATH=str(copy))
            if mode != "cached":
                env["PYTHONDONTWRITEBYTECODE"] = "1"
            for path in PATHS:
                for words in COMMANDS:
                    cases.append((str(root), mode, path, words, argv_for(path, copy, words), env))
    for case in cases:  # warm: write __pycache__ where allowed, fill the OS's file cache
        time_one(case[4], case[5], project)
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(cases))}
    for _ in range(runs):
        for i, case in enumerate(cases):
            times[i].append(time_one(case[4], case[5], project))
    print(f"{runs} interleaved runs, ms; load average {os.getloadavg()[0]:.2f}")
    print("| root | bytecode | path | command | CPU median | wall median | wall min |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (root, mode, path, words, _, _) in enumerate(cases):
        wall = [w for w, _ in times[i]]
        cpu = statistics.median(c for _, c in times[i])
        print(f"| {root} | {mode} | {path} | {' '.join(words)} | {cpu * 1000:.1f} | "
              f"{statistics.median(wall) * 1000:.1f} | {min(wall) * 1000:.1f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
