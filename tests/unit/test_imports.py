"""Every import edge between project modules must be one the design's module table allows.

The table is the design card's: tests/design_layout.md holds its Layout section exactly,
and where the card itself is found (shared/DESIGN.md beside the checkout, or in a
directory above it; QMQPD_DESIGN names another path) the copy must equal it, so the two
cannot drift apart while a checkout without the card still tests its imports.
Readings on top of the "may import" column:
- `config`, `log` and `message` are shared leaves: any module but the leaves may import them.
- `errors`, `fsio` and `address` (pending: the error base; writing bytes whole; reading
  addresses) are below the leaves: every module may import them, the leaves included
  (ConfigError derives from the base, message writes its bytes whole, config reads
  host:port settings).
- `stdlib` and third-party names (cdbx, dnspython, ...) allow those packages only there;
  `all` (cli) allows anything; `— never X` lists edges that must never appear.
- imports under `if TYPE_CHECKING:` are for annotations only and load nothing at run time.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {"qmqpd.config", "qmqpd.log", "qmqpd.message"}
# Importable by every module, the leaves included: stdlib only, importing nothing of the
# project (the base every error class derives from; writing bytes whole; reading addresses).
BASE = {"qmqpd.errors", "qmqpd.fsio", "qmqpd.address"}
ANY = "*"
# Package files that are not design modules.
PACKAGING: dict[str, set[str]] = {"qmqpd": set(), "filters": set(),
                                  "qmqpd.__main__": {"qmqpd.cli"}}
# Distribution names in the table -> the name they are imported by.
IMPORT_NAMES = {"dnspython": "dns", "dkimpy": "dkim", "prometheus-client": "prometheus_client"}
# Edges the code has and the table does not list yet, each with why. The design card should
# gain them; test_pending_edges_are_still_pending fails once it does, or once code drops one.
PENDING: dict[str, set[str]] = {
    "qmqpd.worker": {"qmqpd.handler"},  # the session code shared with `qmqpd session`
    "qmqpd.session": {"qmqpd.handler"},
    "filters.dkim": {"filters.keys", "filters.mailstream",  # keys: paths, DNS, shared
                     "filters.signing",  # the core DK and DKIM share
                     "filters.dkimtags"},  # DKIM tag syntax, instead of dkimpy's internals
    "filters.dk": {"filters.keys", "filters.mailstream",  # one header parser for both
                   "filters.signing"},
    "qmqpd.master": {"qmqpd.status", "qmqpd.metrics",  # the counters it exposes
                     # the master split by ownership (the card's "Next step" table)
                     "qmqpd.admission", "qmqpd.listen", "qmqpd.lobby", "qmqpd.handoff"},
    # the planned backlog row: queue choice and flow control, its gauges, its status lines
    "qmqpd.injector": {"qmqpd.backlog"},
    "qmqpd.metrics": {"qmqpd.backlog",
                      "qmqpd.listen"},  # the one way a listening socket is made (METRICS too)
    "qmqpd.status": {"qmqpd.backlog"},
    "qmqpd.queue": {"qmqpd.commit"},  # the shared commit rounds of COMMIT_MODE=syncfs
    "qmqpd.pool": {"qmqpd.limits"},  # a busy worker holds its client's Lease
    "qmqpd.plan": {"filters.virus"},  # is clamd there: PING through the stage's own client
}
PENDING_PACKAGES: dict[str, set[str]] = {
    "qmqpd.metrics": {"prometheus_client"},  # the card names it in the job column only
    "filters.signing": {"cryptography"},  # the private-key operation DK and DKIM share
}
# Modules the card does not list yet, with what they may import.
PENDING_MODULES: dict[str, set[str]] = {
    "filters.mailstream": set(),  # streaming header parser shared by dk and dkim: stdlib
    # the card's "Next step" row: what DK and DKIM share (header block, results, keys)
    "filters.signing": {"filters.mailstream", "filters.keys", "filters.base"},
    # DKIM-Signature syntax as dkimpy writes it, without its private functions: stdlib
    "filters.dkimtags": set(),
    "qmqpd.backlog": set(),  # planned (the card's next step): per-queue backlog, stdlib
    # serve's and check's checks of the whole server; the plan checks as the service user
    "qmqpd.preflight": {"qmqpd.procctl", "qmqpd.proxy"},
    "qmqpd.commit": set(),  # group commit rounds (flock + syncfs) of one queue: stdlib
    # one error base with qmail's exit codes (100 permanent, 111 temporary): stdlib only,
    # imports nothing of the project, so every module, the leaves too, may import it
    "qmqpd.errors": set(),
    # write-all, atomic file replace and directory sync, once for every writer: stdlib only
    "qmqpd.fsio": set(),
    # the one IP parser (v4-mapped folded) and host:port syntax, config's too: stdlib only
    "qmqpd.address": set(),
    # the master split by ownership (the card's "Next step" table)
    # listening sockets; PROXY_SOCKET's owner resolved as the privilege drop resolves USER
    "qmqpd.listen": {"qmqpd.procctl"},
    "qmqpd.admission": {"qmqpd.proxy", "qmqpd.rules", "qmqpd.limits"},  # the decision
    # the wait for the request: PROXY header reader, leases, the worker's length parser
    "qmqpd.lobby": {"qmqpd.proxy", "qmqpd.limits", "qmqpd.netstring"},
    # lobby -> worker, and the slowest session giving way while others wait
    "qmqpd.handoff": {"qmqpd.limits", "qmqpd.lobby", "qmqpd.pool"},
}


COPY = ROOT / "tests" / "design_layout.md"


def design_path() -> Path | None:
    if os.environ.get("QMQPD_DESIGN"):
        return Path(os.environ["QMQPD_DESIGN"])
    for above in ROOT.parents:
        candidate = above / "shared" / "DESIGN.md"
        if candidate.is_file():
            return candidate
    return None


def layout_section(text: str) -> str:
    """The card's '## Layout' section, up to the next '## ' heading."""
    start = text.index("## Layout")
    end = text.find("\n## ", start + 1)
    return (text[start:] if end < 0 else text[start:end]).strip() + "\n"


def design_rows(text: str) -> dict[str, str]:
    """module -> its "may import" cell, from the rows of the Layout table."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        path = cells[0].split("`")[1]
        if path.endswith(".py"):
            rows[path[:-3].replace("/", ".")] = cells[2].replace("`", "")
    return rows


def _resolve(name: str, module: str, modules: set[str]) -> set[str]:
    if name.endswith(".*"):
        return {m for m in modules if m.startswith(name[:-1])}
    if "." in name:
        return {name}
    found = sorted((m for m in modules if m.split(".")[-1] == name),
                   key=lambda m: m.split(".")[0] != module.split(".")[0])
    return {found[0]} if found else set()


def parse_table(text: str) -> tuple[dict[str, set[str] | str], dict[str, set[str]],
                                    dict[str, set[str]]]:
    """(allowed project imports, allowed third-party packages, never) per module."""
    rows = design_rows(text)
    modules = set(rows)
    allowed: dict[str, set[str] | str] = {}
    third: dict[str, set[str]] = {}
    never: dict[str, set[str]] = {}
    for module, cell in rows.items():
        may, _, forbidden = cell.partition("— never")
        names = [n.strip() for n in re.split(r",| or ", may) if n.strip()]
        if "all" in names:
            allowed[module] = ANY
            continue
        project: set[str] = set()
        packages: set[str] = set()
        for name in names:
            if name == "stdlib":
                continue
            resolved = _resolve(name, module, modules)
            if resolved:
                project |= resolved
            else:
                packages.add(IMPORT_NAMES.get(name, name))
        allowed[module] = project
        third[module] = packages
        never[module] = {m for n in forbidden.split(",") if n.strip()
                         for m in (_resolve(n.strip(), module, modules) or {n.strip()})}
    return allowed, third, never


ALLOWED, THIRD_PARTY, NEVER = parse_table(COPY.read_text())


def test_the_copy_is_the_design_cards_table() -> None:
    card = design_path()
    if card is None:
        pytest.skip("the design card is not beside this checkout: the copy stands for it")
    assert layout_section(card.read_text()) == COPY.read_text(), (
        f"{COPY} differs from the Layout section of {card}: copy it again")


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
            if node.module in ("qmqpd", "qmqpd.filters"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif node.module != "__future__":
                names.add(node.module)
    return {design_name(name) for name in names}


def design_name(name: str) -> str:
    """The installed package qmqpd.filters is the repository's filters/ (the card's name)."""
    if name == "qmqpd.filters" or name.startswith("qmqpd.filters."):
        return name.removeprefix("qmqpd.")
    return name


def is_project(name: str) -> bool:
    return name.split(".")[0] in ("qmqpd", "filters")


def allowed_for(module: str) -> set[str] | str:
    if module in PACKAGING:
        return PACKAGING[module]
    if module in BASE:
        return PENDING_MODULES.get(module, set())
    if module in PENDING_MODULES and module not in ALLOWED:
        return PENDING_MODULES[module] | LEAVES | BASE
    if module not in ALLOWED:
        pytest.fail(f"{module} is not in the design's module table: the card should list it")
    allowed = ALLOWED[module]
    if allowed == ANY:
        return ANY
    assert isinstance(allowed, set)
    extra = set() if module in LEAVES else LEAVES
    return allowed | extra | BASE | PENDING.get(module, set())


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
              and top not in THIRD_PARTY.get(module, set())
              and top not in PENDING_PACKAGES.get(module, set())):
            bad.append(f"{name} (third-party)")
    assert not bad, f"{module} imports outside the module table: {', '.join(bad)}"


def test_pending_edges_are_still_pending() -> None:
    by_module = {module_name(p): imports_of(p) for p in project_files()}
    for module, extras in PENDING.items():
        assert extras <= by_module.get(module, set()), f"drop the stale extra for {module}"
        listed = ALLOWED.get(module, set())
        assert listed != ANY and not extras & set(listed), (
            f"the design card now lists {extras & set(listed)} for {module}: drop it here")
    for module in PENDING_MODULES:
        assert module in by_module, f"drop the stale pending module {module}"
        assert module not in ALLOWED, f"the design card now lists {module}: drop it here"
    tops = {m: {name.split(".")[0] for name in names} for m, names in by_module.items()}
    for module, packages in PENDING_PACKAGES.items():
        assert packages <= tops.get(module, set()), f"drop the stale package for {module}"
        assert not packages & THIRD_PARTY.get(module, set()), (
            f"the design card now lists {packages} for {module}: drop it here")


def test_the_table_is_read_from_the_design_card() -> None:
    # Rows the card has had since the start: if parsing breaks, these go missing.
    assert ALLOWED["qmqpd.cli"] == ANY
    assert ALLOWED["qmqpd.protocol"] == {"qmqpd.netstring", "qmqpd.message"}
    assert "filters.keys" in ALLOWED["filters.pipeline"]
    assert THIRD_PARTY["qmqpd.rules"] == {"cdbx"}
    assert {"qmqpd.protocol", "qmqpd.injector", "qmqpd.queue"} <= NEVER["qmqpd.master"]
    assert len(ALLOWED) >= 25


def test_the_checker_sees_a_forbidden_edge(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                      "from qmqpd import protocol\nimport cdbx\nfrom qmqpd.filters import keys\n"
                      "if TYPE_CHECKING:\n    from qmqpd.queue import Queue\n")
    assert imports_of(sample) == {"qmqpd.protocol", "cdbx", "typing", "filters.keys"}
