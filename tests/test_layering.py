"""The book's layering, checked on confiture.py's syntax tree (no server needed).

- a section uses only names defined in itself or in the sections above it (no back-edges);
- only the PostgreSQL client section starts processes (subprocess, os.exec*/spawn*/system…);
- a private name (`_x`) is used only in the section that defines it.

Annotations are not checked: with `from __future__ import annotations` they are never evaluated.
Each rule is shown to fail on a small synthetic source, so the check cannot pass vacuously.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "confiture.py"
BANNER = re.compile(r"^# §(\d+)([a-z]?) (.+)$")  # §8, §8b …
CLIENT_TITLE = "PostgreSQL client"
PROCESS_CALLS = {
    "subprocess": {"Popen", "run", "call", "check_call", "check_output", "getoutput",
                   "getstatusoutput"},
    "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv",
           "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
           "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"},
}


@dataclass(frozen=True)
class Section:
    number: str  # "8", "8b"
    title: str
    start: int  # first line

    @property
    def order(self) -> tuple[int, str]:
        return int(self.number.rstrip("abcdefghijklmnopqrstuvwxyz")), self.number[-1:].strip("0123456789")


def sections_of(source: str) -> list[Section]:
    found = []
    for lineno, line in enumerate(source.splitlines(), 1):
        match = BANNER.match(line)
        if match:
            found.append(Section(match.group(1) + match.group(2), match.group(3).strip(), lineno))
    return found


def section_at(sections: list[Section], lineno: int) -> Section | None:
    current = None
    for section in sections:
        if section.start <= lineno:
            current = section
    return current


def defined_names(node: ast.stmt) -> list[str]:
    """Module-level names a top-level statement binds (imports are not sections' names)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _annotations(node: ast.AST) -> Iterator[ast.AST]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg) and sub.annotation is not None:
            yield sub.annotation
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.returns is not None:
            yield sub.returns
        elif isinstance(sub, ast.AnnAssign):
            yield sub.annotation


def used_names(node: ast.stmt) -> list[ast.Name]:
    """Names a top-level statement reads, minus annotations and names it binds locally
    (parameters, assignments, loop and comprehension variables inside functions)."""
    skipped = {id(n) for a in _annotations(node) for n in ast.walk(a)}
    local: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        for sub in ast.walk(node):
            if sub is node:
                continue
            if isinstance(sub, ast.arg):
                local.add(sub.arg)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                local.add(sub.id)
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local.add(sub.name)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                local.update((a.asname or a.name).split(".")[0] for a in sub.names)
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and id(n) not in skipped and n.id not in local]


def process_starts(node: ast.AST) -> Iterator[tuple[int, str]]:
    skipped = {id(n) for a in _annotations(node) for n in ast.walk(a)}
    for sub in ast.walk(node):
        if id(sub) in skipped:
            continue
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) \
                and sub.attr in PROCESS_CALLS.get(sub.value.id, ()):
            yield sub.lineno, f"{sub.value.id}.{sub.attr}"
        elif isinstance(sub, ast.ImportFrom) and sub.module in PROCESS_CALLS:
            for alias in sub.names:
                if alias.name in PROCESS_CALLS[sub.module]:
                    yield sub.lineno, f"{sub.module}.{alias.name}"


def layering_violations(source: str) -> list[str]:
    """Every breach of the three rules, as 'line N: …' messages."""
    tree = ast.parse(source)
    sections = sections_of(source)
    home: dict[str, Section] = {}
    placed = [(node, section_at(sections, node.lineno)) for node in tree.body]
    for node, section in placed:
        for name in defined_names(node):
            if section is not None:
                home.setdefault(name, section)
    problems = []
    for node, section in placed:
        if section is None:
            continue
        for name in used_names(node):
            owner = home.get(name.id)
            if owner is None or owner == section:
                continue
            if owner.order > section.order:
                problems.append(f"line {name.lineno}: §{section.number} uses {name.id} "
                                f"from §{owner.number} below it")
            elif name.id.startswith("_"):
                problems.append(f"line {name.lineno}: §{section.number} uses private "
                                f"{name.id} of §{owner.number}")
        if CLIENT_TITLE not in section.title:
            problems.extend(f"line {line}: §{section.number} starts a process ({call}); only "
                            f"the {CLIENT_TITLE} section may" for line, call in process_starts(node))
    return problems


def test_confiture_keeps_its_layering() -> None:
    source = SOURCE.read_text(encoding="utf-8")
    titles = [s.title for s in sections_of(source)]
    assert len(titles) >= 12 and any(CLIENT_TITLE in t for t in titles), titles
    assert layering_violations(source) == []


SYNTHETIC = '''\
import os
import subprocess

# §1 Bottom
def _helper():
    return 1

def uses_below():
    return top_level()

# §2 PostgreSQL client
def start():
    return subprocess.run(["psql"])

# §3 Top
def top_level():
    return _helper() + start()

def sneaky(argv):
    os.execvp(argv[0], argv)

def fine(x: Later) -> subprocess.Popen:
    _local = 1
    return _local
'''


def test_the_check_fails_when_the_layering_is_broken() -> None:
    problems = layering_violations(SYNTHETIC)
    assert problems == [
        "line 9: §1 uses top_level from §3 below it",
        "line 17: §3 uses private _helper of §1",
        "line 20: §3 starts a process (os.execvp); only the PostgreSQL client section may",
    ], problems
    # and the same source with the breaches removed passes
    repaired = (SYNTHETIC.replace("return top_level()", "return 2")
                .replace("_helper() + ", "").replace("os.execvp(argv[0], argv)", "pass"))
    assert layering_violations(repaired) == []


def unused_constants(source: str, readers: str = "") -> list[str]:
    """Module-level CONSTANTS that neither the module nor `readers` (the tests) read."""
    tree = ast.parse(source)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return [name for node in tree.body for name in defined_names(node)
            if re.fullmatch(r"_?[A-Z][A-Z0-9_]*", name) and name not in read
            and not re.search(rf"\b{name}\b", readers)]


def test_no_constant_is_dead() -> None:
    tests = "".join(p.read_text(encoding="utf-8") for p in SOURCE.parent.glob("tests/*.py")
                    if p.name != "test_layering.py")
    assert unused_constants(SOURCE.read_text(encoding="utf-8"), tests) == []
    assert unused_constants("USED = 1\nDEAD = 2\nprint(USED)\n") == ["DEAD"]
