"""The layout's import rules, read from the source (no import is executed).

Each side has a shared room and one room per regime:

    coordinator/            shared by both coordinators
    coordinator/stateful/   the stateful executor stack and its contexts
    coordinator/mapreduce/  the stateless (MapReduce) contexts and round driver
    silo/                   shared by both silo-side processes
    silo/stateful/          `tff-amqp silo` and simulation hosts
    silo/pool/              `tff-amqp worker --stateless`

- a regime's room never imports its sibling regime's room;
- the shared room of a side imports neither of its regimes;
- the coordinator side never imports the silo side, nor the other way round.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tff_amqp"

COORDINATOR = "tff_amqp.coordinator"
SILO = "tff_amqp.silo"
REGIMES = {
    "coordinator/stateful": "tff_amqp.coordinator.stateful",
    "coordinator/mapreduce": "tff_amqp.coordinator.mapreduce",
    "silo/stateful": "tff_amqp.silo.stateful",
    "silo/pool": "tff_amqp.silo.pool",
}
SIBLING = {
    "coordinator/stateful": "coordinator/mapreduce",
    "coordinator/mapreduce": "coordinator/stateful",
    "silo/stateful": "silo/pool",
    "silo/pool": "silo/stateful",
}


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


def _modules(room: str, *, recursive: bool = True) -> dict[str, set[str]]:
    folder = PACKAGE / room
    files = sorted(folder.rglob("*.py") if recursive else folder.glob("*.py"))
    return {str(f.relative_to(PACKAGE)): _imports(f) for f in files}


def _starts(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(modules: dict[str, set[str]], forbidden: Callable[[str], bool]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, imports in modules.items()
        for name in sorted(imports)
        if forbidden(name)
    ]


def test_no_regime_imports_its_sibling_regime() -> None:
    for room, sibling in SIBLING.items():
        assert _violations(_modules(room), lambda n, s=REGIMES[sibling]: _starts(n, s)) == []


def test_the_shared_rooms_import_no_regime() -> None:
    for room in ("coordinator", "silo"):
        shared = _modules(room, recursive=False)
        assert shared, room
        assert _violations(shared, lambda n: any(_starts(n, r) for r in REGIMES.values())) == []


def test_the_coordinator_side_and_the_silo_side_do_not_import_each_other() -> None:
    assert _violations(_modules("coordinator"), lambda n: _starts(n, SILO)) == []
    assert _violations(_modules("silo"), lambda n: _starts(n, COORDINATOR)) == []


# The command line and the demo put the sides together; they are not floors.
ENTRY_POINTS = {"cli.py", "demo.py", "local.py", "federation_cli.py", "status.py", "__init__.py"}


def test_the_floors_below_import_neither_side() -> None:
    floors = {
        path: names
        for path, names in _modules(".", recursive=True).items()
        if not path.startswith(("coordinator/", "silo/")) and path not in ENTRY_POINTS
    }
    assert floors
    sides = (COORDINATOR, SILO)
    assert _violations(floors, lambda n: any(_starts(n, s) for s in sides)) == []


def test_the_rules_see_imports() -> None:
    # A check that cannot fail proves nothing: the reader must find real imports.
    mapreduce = _modules("coordinator/mapreduce")
    assert any("tff_amqp.coordinator.intake" in names for names in mapreduce.values())
    pool = _modules("silo/pool")
    assert any("tff_amqp.silo.endpoint" in names for names in pool.values())
    planted = {"x.py": {"tff_amqp.coordinator.stateful.invocation"}}
    assert _violations(planted, lambda n: _starts(n, REGIMES["coordinator/stateful"])) != []
