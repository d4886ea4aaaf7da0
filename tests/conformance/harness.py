"""Distributions, client data and the two-runtime runner of the conformance suite."""

from __future__ import annotations

import csv
import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The element type of client data: the CSV columns it names, cast to these dtypes.
ROW = OrderedDict(age=np.int32, glucose=np.float32)

SILOS = ("alpha", "bravo", "charlie")
CLIENTS_PER_SILO = {"readings": (2, 3, 1), "sparse": (1, 2, 0)}


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How the clients of one invocation are given and spread over 3 silos.

    `clients` is the length of an explicit client list (split by tff-amqp into
    contiguous chunks over the silos, sorted by name); `data_key` instead means
    `tff_amqp.silo_data(data_key)`, each silo's own CSV files."""

    name: str
    clients: int | None = None
    data_key: str | None = None

    @property
    def is_silo_data(self) -> bool:
        return self.data_key is not None


# 2 clients: fewer than silos (one silo gets none); 7: uneven chunks (3, 2, 2);
# 1: a single client; silo data: uneven (2, 3, 1) and with a silo holding none.
DISTRIBUTIONS = [
    Distribution("list2", clients=2),
    Distribution("list7", clients=7),
    Distribution("list1", clients=1),
    Distribution("silo_data", data_key="readings"),
    Distribution("silo_data_gap", data_key="sparse"),
]
# Zero clients (an empty list) only where the result is defined: sums, counts.
EMPTY = Distribution("list0", clients=0)
DISTRIBUTION_IDS = [d.name for d in DISTRIBUTIONS]


def explicit_rows(client: int) -> OrderedDict[str, np.ndarray]:
    """Rows of synthetic client `client`: ages and glucose values, 3 to 6 rows."""
    rng = np.random.default_rng(700 + client)
    n = 3 + client % 4
    return OrderedDict(
        age=rng.integers(20, 90, size=n).astype(np.int32),
        glucose=np.round(rng.normal(5.5, 1.5, size=n), 3).astype(np.float32),
    )


def csv_rows(path: Path) -> OrderedDict[str, np.ndarray]:
    """A client's CSV file as the silo reads it for element type ROW."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return OrderedDict(
        age=np.array([int(r["age"]) for r in rows], np.int32),
        glucose=np.array([float(r["glucose"]) for r in rows], np.float32),
    )


class ConformanceFederation:
    def __init__(self, name: str, folders: dict[str, dict[str, Path]]) -> None:
        self.name = name
        self.folders = folders  # data key -> silo -> folder

    def client_rows(self, key: str) -> list[OrderedDict[str, np.ndarray]]:
        """Every client's rows under `key`, in the order of silos then files."""
        return [
            csv_rows(path)
            for silo in SILOS
            for path in sorted(self.folders[key][silo].glob("*.csv"), key=lambda p: p.name)
        ]


@dataclasses.dataclass
class Both:
    """Runs a function once in each context; `fn(context, args)` installs nothing
    itself: `run` installs the context around it."""

    amqp: Any
    reference: Any
    federation: ConformanceFederation

    def rows(self, dist: Distribution) -> tuple[Any, list[OrderedDict[str, np.ndarray]]]:
        """(argument for tff-amqp, the same clients' rows for the reference)."""
        if dist.data_key is not None:
            import tff_amqp

            return tff_amqp.silo_data(dist.data_key), self.federation.client_rows(dist.data_key)
        assert dist.clients is not None
        rows = [explicit_rows(c) for c in range(dist.clients)]
        return rows, rows

    def datasets(self, dist: Distribution) -> tuple[Any, list[Any]]:
        """Like `rows`, as tf.data datasets of ROW elements."""
        import tensorflow as tf

        amqp_arg, rows = self.rows(dist)
        datasets = [tf.data.Dataset.from_tensor_slices(r) for r in rows]
        return (datasets if not dist.is_silo_data else amqp_arg), datasets

    def run(self, fn: Callable[[Any], Any], dist: Distribution) -> tuple[Any, Any]:
        """(tff-amqp result, reference result) of `fn(arg)` with the clients of
        `dist`, each under its own context."""
        import tensorflow_federated as tff

        amqp_arg, reference_arg = self.datasets(dist)
        with tff.framework.get_context_stack().install(self.reference):
            expected = fn(reference_arg)
        with tff.framework.get_context_stack().install(self.amqp):
            actual = fn(amqp_arg)
        return actual, expected


def conform(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure; integer and bool leaves equal exactly, with equal dtypes;
    float leaves within rtol (NaN equals NaN: a mean over no weight is NaN in
    both runtimes)."""
    import tree

    actual_leaves = tree.flatten(_plain(actual))
    expected_leaves = tree.flatten(_plain(expected))
    assert len(actual_leaves) == len(expected_leaves), (actual, expected)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if e.dtype.kind in "iub" or a.dtype.kind in "iub":
            assert a.dtype == e.dtype, (a, e)
            np.testing.assert_array_equal(a, e)
        elif e.dtype.kind in "SUO":
            # Only strings may be compared as objects: an opaque leaf (an
            # unknown container) would make the comparison meaningless.
            assert all(isinstance(x, str | bytes) for x in e.flat), (a, e)
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)


def _plain(value: Any) -> Any:
    """Python containers only, so tree.flatten sees every leaf."""
    from tensorflow_federated.python.common_libs import structure

    if isinstance(value, structure.Struct):
        return [_plain(v) for _, v in structure.iter_elements(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if hasattr(value, "__attrs_attrs__"):
        return [_plain(getattr(value, a.name)) for a in value.__attrs_attrs__]
    if hasattr(value, "_asdict"):
        return [_plain(v) for v in value._asdict().values()]
    if isinstance(value, dict):
        return [_plain(value[k]) for k in value]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dist_params(dists: list[Distribution]) -> list[Any]:
    """pytest params, each with the distribution's name as its id."""
    return [pytest.param(d, id=d.name) for d in dists]


DIST_PARAMS = dist_params(DISTRIBUTIONS)
WITH_EMPTY_PARAMS = dist_params([*DISTRIBUTIONS, EMPTY])
