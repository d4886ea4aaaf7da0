"""The layout's import rules, read from the source (no import is executed):

- neither regime imports the other's own modules: the stateless coordinator
  (`mapreduce/`) uses only the shared rooms of `coordinator/`, the pool worker
  (`worker_pool/`) only the shared rooms of `silo/`, and neither stateful side
  imports its stateless sibling;
- the coordinator side never imports the silo side, nor the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tff_amqp"

# Rooms of a side that both regimes use.
SHARED_COORDINATOR = {"intake", "membership", "options", "quorum", "sync"}
SHARED_SILO = {"endpoint", "data", "options"}

COORDINATOR_SIDE = ("tff_amqp.coordinator", "tff_amqp.mapreduce", "tff_amqp.context")
SILO_SIDE = ("tff_amqp.silo", "tff_amqp.worker_pool")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from tff_amqp.coordinator import membership` names a module too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("tff_amqp")}


def _modules(room: str) -> dict[str, set[str]]:
    folder = PACKAGE / room
    files = [folder.with_suffix(".py")] if folder.with_suffix(".py").exists() else []
    files += sorted(folder.glob("*.py")) if folder.is_dir() else []
    return {str(f.relative_to(PACKAGE)): _imports(f) for f in files}


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(room: str, forbidden: object) -> list[str]:
    found = []
    for path, imports in _modules(room).items():
        for name in sorted(imports):
            if forbidden(name):  # type: ignore[operator]
                found.append(f"{path} imports {name}")
    return found


def _stateful_coordinator(name: str) -> bool:
    parts = name.split(".")
    if name == "tff_amqp.context":
        return True
    return len(parts) >= 3 and parts[1] == "coordinator" and parts[2] not in SHARED_COORDINATOR


def _stateful_silo(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 3 and parts[1] == "silo" and parts[2] not in SHARED_SILO


def test_the_stateless_coordinator_uses_only_the_shared_coordinator_rooms() -> None:
    assert _violations("mapreduce", _stateful_coordinator) == []


def test_the_pool_worker_uses_only_the_shared_silo_rooms() -> None:
    assert _violations("worker_pool", _stateful_silo) == []


def test_the_stateful_sides_do_not_import_their_stateless_siblings() -> None:
    assert _violations("coordinator", lambda n: _starts(n, ("tff_amqp.mapreduce",))) == []
    assert _violations("context", lambda n: _starts(n, ("tff_amqp.mapreduce",))) == []
    assert _violations("silo", lambda n: _starts(n, ("tff_amqp.worker_pool",))) == []


def test_the_coordinator_side_and_the_silo_side_do_not_import_each_other() -> None:
    for room in ("coordinator", "mapreduce", "context"):
        assert _violations(room, lambda n: _starts(n, SILO_SIDE)) == []
    for room in ("silo", "worker_pool"):
        assert _violations(room, lambda n: _starts(n, COORDINATOR_SIDE)) == []


def test_the_rules_see_imports() -> None:
    # A check that cannot fail proves nothing: the reader must find real imports.
    mapreduce = _modules("mapreduce")
    assert any("tff_amqp.coordinator.intake" in names for names in mapreduce.values())
    assert _stateful_coordinator("tff_amqp.coordinator.invocation")
    assert not _stateful_coordinator("tff_amqp.coordinator.intake")
    assert _stateful_silo("tff_amqp.silo.agent") and not _stateful_silo("tff_amqp.silo.endpoint")
