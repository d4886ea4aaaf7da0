"""Fixtures for a local federation of real silo processes, plus comparison helpers.

Loaded as a pytest plugin from conftest.py. The session shares one 3-silo
federation (silo start-up costs a TFF import each); tests that break silos on
purpose start their own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.broker import delete_federation_entities, new_federation_name
from tests.support.data import write_silo_csvs
from tff_amqp.local import LocalFederation, SiloOptions

SILO_NAMES = ("alpha", "bravo", "charlie")


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
    env: Mapping[str, str] | None = None,
) -> Federation:
    """Write each silo's CSV folder, start the silos (with `env` added to
    their environment), wait until ready."""
    folders: dict[str, Path] = {}
    for i, name in enumerate(names):
        folders[name] = write_silo_csvs(root, i, clients_per_silo[i % len(clients_per_silo)])
        options = SiloOptions(extra_args=extra_args, env=env)
        local.start_silo(name, data={"readings": folders[name]}, options=options)
    local.wait_ready(timeout=240)
    return Federation(local, folders)


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


@contextlib.contextmanager
def started_context(amqp_url: str, federation: str, silos: int) -> Iterator[Any]:
    """A started stateful context of a session federation (all `silos` in
    the cohort), closed afterwards."""
    import tff_amqp

    context = tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=federation, min_silos=silos, cohort_timeout=120.0, deadline=300.0
    )
    context.start()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture(scope="session")
def amqp_context(amqp_url: str, silo_federation: Federation) -> Iterator[Any]:
    with started_context(amqp_url, silo_federation.name, len(silo_federation.silos)) as context:
        yield context


def replies_in(payload: bytes) -> list[Any]:
    """The reply envelopes one message a coordinator's link received carries:
    one, or a bundle's members (a silo bundles replies that queue up behind
    an unconfirmed one whenever its latest coordinator takes bundles, so a
    test reading raw payloads off `link.taps` must unpack them); nothing for
    a message that does not decode."""
    from tff_amqp import protocol as p

    try:
        envelope = p.decode(payload)
    except p.ProtocolError:
        return []
    if envelope.kind is not p.Kind.BUNDLE:
        return [envelope]
    return [m for m in p.members(envelope) if isinstance(m, p.Envelope)]


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


def wait_live(context: Any, silos: Iterable[str], timeout: float = 30.0) -> None:
    """Wait until the context's coordinator counts every one of `silos` live."""
    silos = list(silos)
    membership = context.runtime.membership
    deadline = time.monotonic() + timeout
    while not all(membership.is_live(s) for s in silos):
        assert time.monotonic() < deadline, f"silos {silos} not live within {timeout:.0f} s"
        time.sleep(0.2)


def native_over(
    native_context: Any, comp: Any, federation: Federation, silos: Iterable[str]
) -> Any:
    """What TFF's native runtime gives for `comp` over the `readings` client
    datasets of these silos of `federation` (read as the silos read them)."""
    import tensorflow_federated as tff

    from tests.support.computations import ROW
    from tff_amqp.silo.data import DataSource, SiloDataStore

    element_type = tff.to_type(ROW)
    datasets = []
    for silo in silos:
        store = SiloDataStore(silo, [DataSource("readings", federation.silos[silo])])
        datasets += store.client_datasets("readings", element_type)
    return run_in(native_context, comp, datasets)
