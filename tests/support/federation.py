"""Fixtures for a local federation of real silo processes, plus comparison helpers.

Loaded as a pytest plugin from conftest.py. The session shares one 3-silo
federation (silo start-up costs a TFF import each); tests that break silos on
purpose start their own.
"""

from __future__ import annotations

import contextlib
import csv
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.broker import delete_federation_entities
from tff_amqp.local import LocalFederation

SILO_NAMES = ("alpha", "bravo", "charlie")


# Distinctive values: if any of these ever reached the coordinator as raw
# bytes, the data-locality test would see them.
def _silo_rows(silo_index: int, client_index: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1000 * silo_index + client_index)
    rows = []
    for r in range(4 + client_index + silo_index):
        rows.append(
            {
                "patient": f"p{silo_index}-{client_index}-{r}",
                "age": int(rng.integers(20, 90)),
                "glucose": round(float(rng.normal(5.5, 1.2)) + 1000.0 * (silo_index + 1), 3),
                "notes": "confidential",
            }
        )
    return rows


def write_silo_csvs(root: Path, silo_index: int, clients: int) -> Path:
    folder = root / f"silo{silo_index}"
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        rows = _silo_rows(silo_index, c)
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["patient", "age", "glucose", "notes"])
            writer.writeheader()
            writer.writerows(rows)
    return folder


def read_column_of_file(path: Path, column: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def read_column(folder: Path, column: str) -> list[float]:
    return [v for path in sorted(folder.glob("*.csv")) for v in read_column_of_file(path, column)]


class Federation:
    """A running local federation: its name and each silo's data folder."""

    def __init__(self, local: LocalFederation, silos: dict[str, Path]) -> None:
        self.local = local
        self.name = local.federation
        self.silos = silos


def start_federation(
    local: LocalFederation,
    root: Path,
    *,
    names: tuple[str, ...] = SILO_NAMES,
    clients_per_silo: tuple[int, ...] = (2, 3, 2),
    extra_args: tuple[str, ...] = (),
) -> Federation:
    """Write each silo's CSV folder, start the silos, wait until ready."""
    folders: dict[str, Path] = {}
    for i, name in enumerate(names):
        folders[name] = write_silo_csvs(root, i, clients_per_silo[i % len(clients_per_silo)])
        local.start_silo(name, data={"readings": folders[name]}, extra_args=extra_args)
    local.wait_ready(timeout=240)
    return Federation(local, folders)


def new_federation_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def local_federation(amqp_url: str, log_dir: Path) -> Iterator[LocalFederation]:
    """A LocalFederation under a fresh name whose queues and exchanges are
    deleted from the broker afterwards (its silos stopped first)."""
    name = new_federation_name()
    try:
        with LocalFederation(amqp_url, name, log_dir=log_dir) as local:
            yield local
    finally:
        delete_federation_entities(amqp_url, name)


@pytest.fixture(scope="session")
def silo_federation(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    with local_federation(amqp_url, root / "logs") as local:
        yield start_federation(local, root)


@pytest.fixture(scope="session")
def amqp_context(amqp_url: str, silo_federation: Federation) -> Iterator[Any]:
    import tff_amqp

    context = tff_amqp.create_sync_amqp_execution_context(
        amqp_url,
        federation=silo_federation.name,
        min_silos=len(silo_federation.silos),
        cohort_timeout=120.0,
        deadline=300.0,
    )
    context.start()
    try:
        yield context
    finally:
        context.close()


def run_in(context: Any, comp: Any, *args: Any) -> Any:
    import tensorflow_federated as tff

    with tff.framework.get_context_stack().install(context):
        return comp(*args)


def assert_close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Structures equal, leaves allclose."""
    import tree

    actual_leaves = tree.flatten(_normalize(actual))
    expected_leaves = tree.flatten(_normalize(expected))
    assert len(actual_leaves) == len(expected_leaves), (actual, expected)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def _normalize(value: Any) -> Any:
    from tensorflow_federated.python.common_libs import structure

    if isinstance(value, structure.Struct):
        return [_normalize(v) for v in structure.flatten(value)]
    if hasattr(value, "_asdict"):
        return [_normalize(v) for v in value._asdict().values()]
    if isinstance(value, dict):
        return [_normalize(value[k]) for k in value]
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    return value
