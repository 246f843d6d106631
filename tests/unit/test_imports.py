"""Every import edge between project modules must be one the design's module table allows.

The table below is the design card's "may import" column. Two readings apply on top:
- `config`, `log` and `message` are leaves (settings, the event line, plain data and the
  reply table); every module that may import project code at all may import them.
- imports under `if TYPE_CHECKING:` are for annotations only and load nothing at run time.
Third-party imports are checked too: each package is allowed only where the table names it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {"qmqpd.config", "qmqpd.log", "qmqpd.message"}
ANY = "*"

# module -> project modules it may import (besides LEAVES unless it is stdlib-only)
ALLOWED: dict[str, set[str] | str] = {
    "qmqpd.netstring": set(),
    "qmqpd.message": set(),
    "qmqpd.config": set(),
    "qmqpd.log": set(),
    "qmqpd.limits": set(),
    "qmqpd.queue": set(),
    "qmqpd.rules": set(),
    "qmqpd.procctl": set(),
    "qmqpd.protocol": {"qmqpd.netstring"},
    "qmqpd.ipc": {"qmqpd.message"},
    "qmqpd.pool": {"qmqpd.ipc", "qmqpd.procctl"},
    "qmqpd.master": {"qmqpd.rules", "qmqpd.limits", "qmqpd.pool", "qmqpd.ipc",
                     "qmqpd.procctl", "qmqpd.proxy"},
    "qmqpd.worker": {"qmqpd.protocol", "qmqpd.ipc", "qmqpd.injector", "filters.pipeline",
                     "qmqpd.procctl", "qmqpd.handler"},
    "qmqpd.handler": {"qmqpd.protocol", "qmqpd.injector", "filters.pipeline"},
    "qmqpd.session": {"qmqpd.protocol", "filters.pipeline", "qmqpd.injector", "qmqpd.handler"},
    "qmqpd.injector": {"qmqpd.queue"},
    "qmqpd.client": {"qmqpd.netstring"},
    "qmqpd.service": set(),
    "qmqpd.status": set(),
    "qmqpd.proxy": set(),
    "qmqpd.metrics": {"qmqpd.status"},
    "qmqpd.cli": ANY,
    "qmqpd.__main__": {"qmqpd.cli"},
    "qmqpd": set(),
    "filters": set(),
    "filters.base": set(),
    "filters.pipeline": {"filters.base", "filters.virus", "filters.dk", "filters.dkim"},
    "filters.virus": {"filters.base"},
    "filters.keys": {"filters.base"},
    "filters.mailstream": set(),
    "filters.dk": {"filters.base", "filters.keys", "filters.mailstream"},
    "filters.dkim": {"filters.base", "filters.keys", "filters.mailstream"},
}
# Modules that may not import even the leaves: the bottom of the graph.
STDLIB_ONLY = {"qmqpd.netstring", "qmqpd.message", "qmqpd.config", "qmqpd.log",
               "qmqpd.limits", "qmqpd.queue", "qmqpd.rules", "qmqpd.procctl", "qmqpd.proxy"}
# Edges in the code that the table does not list yet, each with why; the design card
# should gain them (a stale entry here fails test_known_extras_are_still_used).
KNOWN_EXTRA: dict[str, set[str]] = {
    "qmqpd.handler": {"qmqpd.netstring"},  # FdSource/timeouts for the session's reads
    # the status file's format: the master writes it, `qmqpd status` reads it
    "qmqpd.master": {"qmqpd.status", "qmqpd.metrics"},  # the master serves /metrics
}
THIRD_PARTY: dict[str, set[str]] = {
    "qmqpd.rules": {"cdbx"},
    "qmqpd.procctl": {"setproctitle"},
    "qmqpd.metrics": {"prometheus_client"},
    "filters.virus": {"clamd"},
    "filters.dk": {"cryptography", "dkim"},
    "filters.dkim": {"dkim", "cryptography", "nacl"},
    "filters.keys": {"cryptography", "dns"},
}
NEVER = {
    "qmqpd.master": {"qmqpd.protocol", "qmqpd.injector", "qmqpd.queue", "qmqpd.worker",
                     "qmqpd.handler", "filters"},
    "qmqpd.pool": {"qmqpd.worker", "qmqpd.handler", "qmqpd.protocol"},
    "qmqpd.worker": {"qmqpd.master", "qmqpd.pool", "qmqpd.limits", "qmqpd.rules"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    return sorted(p for package in ("qmqpd", "filters") for p in (ROOT / package).glob("*.py"))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def imports_of(path: Path) -> set[str]:
    """Absolute names imported at run time; `from qmqpd import x` counts as qmqpd.x."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("qmqpd", "filters"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif node.module != "__future__":
                names.add(node.module)
    return names


def is_project(name: str) -> bool:
    return name.split(".")[0] in ("qmqpd", "filters")


def allowed_for(module: str) -> set[str] | str:
    if module not in ALLOWED:
        pytest.fail(f"{module} is not in the module table: add it with its allowed imports")
    allowed = ALLOWED[module]
    if allowed == ANY:
        return ANY
    assert isinstance(allowed, set)
    extra = set() if module in STDLIB_ONLY else LEAVES
    return allowed | extra | KNOWN_EXTRA.get(module, set())


@pytest.mark.parametrize("path", project_files(), ids=lambda p: module_name(p))
def test_imports_follow_the_module_table(path: Path) -> None:
    module = module_name(path)
    allowed = allowed_for(module)
    bad = []
    for name in sorted(imports_of(path)):
        top = name.split(".")[0]
        if is_project(name):
            if allowed != ANY and name not in allowed and name != module:
                bad.append(name)
            forbidden = NEVER.get(module, set())
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{name} (never)")
        elif (top not in sys.stdlib_module_names and allowed != ANY
              and top not in THIRD_PARTY.get(module, set())):
            bad.append(f"{name} (third-party)")
    assert not bad, f"{module} imports outside the module table: {', '.join(bad)}"


def test_known_extras_are_still_used() -> None:
    by_module = {module_name(p): imports_of(p) for p in project_files()}
    for module, extras in KNOWN_EXTRA.items():
        assert extras <= by_module.get(module, set()), f"drop the stale extra for {module}"


def test_the_checker_sees_a_forbidden_edge(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                      "from qmqpd import protocol\nimport cdbx\n"
                      "if TYPE_CHECKING:\n    from qmqpd.queue import Queue\n")
    assert imports_of(sample) == {"qmqpd.protocol", "cdbx", "typing"}
