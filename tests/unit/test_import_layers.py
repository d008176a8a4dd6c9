"""The package's layers: a module may import only from a lower layer (or its own package).

Pure rules at the bottom, I/O adapters above them, services above those, commands on top. A
back-edge (the store importing the API's errors, the notifier importing a route module, replay
importing the CLI) is how a codebase starts to need everything to test anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spendgate

LAYERS: dict[str, int] = {
    "domain": 0,  # windows, money, budgets, authority, check: pure
    "records": 1,  # the wire records, built on the domain's types
    "settings": 1,
    "background": 1,
    "accounting": 2,  # dedupe, batch planning, applying deltas, publish formatting: pure
    "adapters": 3,  # Kafka, the embedded broker and Postgres, DNS
    "store": 4,  # Postgres: control plane, outbox (which produces through adapters), webhooks
    "control": 5,  # the control plane's rules over a unit of work (no SQL, no HTTP)
    "api": 6,
    "worker": 6,  # Faust wiring around accounting
    "notifier": 6,
    "client": 6,
    "analysis": 7,  # replay's engine
    "dev": 7,
    "integrations": 7,
    "replay": 8,
    "cli": 9,
}
ROOT = Path(spendgate.__file__).parent


def _package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "spendgate" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_top_level_module_has_a_layer() -> None:
    modules = {_package_of(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert modules - set(LAYERS) == set(), "give the new module a layer in LAYERS"


def test_no_module_imports_a_higher_or_sibling_layer() -> None:
    back_edges = []
    for path in sorted(ROOT.rglob("*.py")):
        package = _package_of(path)
        if package == "__init__":
            continue
        for target in _imports(path) - {package}:
            if LAYERS[target] >= LAYERS[package]:
                back_edges.append(f"{path.relative_to(ROOT)} imports spendgate.{target}")
    assert back_edges == []


def test_the_walk_sees_imports_inside_functions_too(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from spendgate.cli import app\n    import spendgate.api.errors\n")
    assert _imports(module) == {"cli", "api"}


def test_accounting_is_pure_so_the_worker_and_replay_share_it() -> None:
    """The worker and replay count with the same code only while it needs neither of them."""
    io = {"worker", "api", "store", "adapters", "analysis", "replay", "cli"}
    found = [
        f"{path.relative_to(ROOT)} imports spendgate.{target}"
        for path in sorted((ROOT / "accounting").rglob("*.py"))
        for target in _imports(path) & io
    ]
    assert found == []
    assert (ROOT / "accounting" / "ingest.py").exists()  # the walk above saw the package
