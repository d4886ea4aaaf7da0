"""Conformance suite set-up: one 3-silo federation of its own, TFF's reference
runtime, and the client distributions every conformance test runs under.

Each conformance test runs the same computation on tff-amqp and on TFF's
native C++ runtime in the same test and compares the results (rtol 1e-5,
integers exactly).

The reference is `tff.backends.test.create_sync_test_cpp_execution_context()`:
TFF's native worker_binary behind the native compiler, plus TFF's own
`replace_secure_intrinsics_with_bodies`. The native worker has no secure
intrinsics; that pass gives them the semantics TFF defines for them (a plain
sum, a modular sum). For every other intrinsic it is the native runtime.

The federation: silos alpha, bravo, charlie, each with two data keys:
  readings: 2, 3 and 1 clients (uneven);
  sparse:   1, 2 and 0 clients (charlie has none).
Charlie's "sparse" folder is empty: a silo with no clients under that key.
The silos keep their default privacy gate: conformance computations return
SERVER-placed values only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.harness import (
    CLIENTS_PER_SILO,
    SILOS,
    Both,
    ConformanceFederation,
)
from tests.support.data import write_silo_csvs
from tests.support.federation import local_federation, started_context


@pytest.fixture(scope="session")
def conformance_federation(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConformanceFederation]:
    root = tmp_path_factory.mktemp("conformance")
    folders: dict[str, dict[str, Path]] = {key: {} for key in CLIENTS_PER_SILO}
    # Deletes the federation's broker objects afterwards, its silos stopped first.
    with local_federation(amqp_url, root / "logs") as local:
        for i, silo in enumerate(SILOS):
            for key, counts in CLIENTS_PER_SILO.items():
                folders[key][silo] = write_silo_csvs(root / key, i, counts[i])
            local.start_silo(silo, data={key: folders[key][silo] for key in folders})
        local.wait_ready(timeout=240)
        yield ConformanceFederation(local.federation, folders)


@pytest.fixture(scope="session")
def conformance_context(
    amqp_url: str, conformance_federation: ConformanceFederation
) -> Iterator[Any]:
    with started_context(amqp_url, conformance_federation.name, len(SILOS)) as context:
        yield context


@pytest.fixture(scope="session")
def both(
    conformance_context: Any, test_context: Any, conformance_federation: ConformanceFederation
) -> Both:
    # The reference: TFF's test runtime (native, plus TFF's own bodies for the
    # secure intrinsics the native worker lacks), from tests/conftest.py.
    return Both(conformance_context, test_context, conformance_federation)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Conformance tests share one broker-backed federation of their own: give
    # each a bound, and keep the suite (its start-up and ~250 comparisons with
    # TFF) out of the fast subset; run it with `scripts/test.sh tests/conformance`.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.slow)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(300))
