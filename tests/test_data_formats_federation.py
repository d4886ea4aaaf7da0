"""For every format, the federated mean of a column over real silo processes
and the real broker equals the mean computed directly from the numbers
written, and TFF's native runtime given the same clients.

Three silos each hold the same numbers under one data key per format (CSV,
TSV, XLSX, ODS, Parquet, TFRecord), plus a folder mixing every format and a
folder with blank cells read with ``#missing=drop-row``. The silos advertise
their columns: `tff-amqp status` shows them, and an invocation naming a column
one silo lacks is refused before any work is sent.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tff_amqp
from tests.support.computations import mean_glucose
from tests.support.data import FORMAT_EXTENSIONS, silo_rows, write_silo_files, write_table
from tests.support.federation import local_federation, run_in, started_context
from tff_amqp.errors import MissingColumnError
from tff_amqp.local import SiloOptions

pytestmark = pytest.mark.slow

SILOS = ("alpha", "bravo", "charlie")
CLIENTS = (2, 3, 1)
FORMATS = list(FORMAT_EXTENSIONS)


def _clients(silo_index: int) -> list[list[tuple[int, float]]]:
    """Each client's (age, glucose) rows of one silo, as written."""
    out = []
    for c in range(CLIENTS[silo_index]):
        header, rows = silo_rows(silo_index, c)
        age, glucose = header.index("age"), header.index("glucose")
        out.append([(r[age], r[glucose]) for r in rows])
    return out


def _with_blanks(silo_index: int) -> list[list[tuple[int | None, float | None]]]:
    """The silo's clients with a blank glucose cell in every third row."""
    return [
        [(age, None if r % 3 == 1 else glucose) for r, (age, glucose) in enumerate(rows)]
        for rows in _clients(silo_index)
    ]


def _write_mixed(root: Path, silo_index: int) -> Path:
    folder = root / f"mixed{silo_index}"
    for c in range(CLIENTS[silo_index]):
        fmt = FORMATS[(silo_index + c) % len(FORMATS)]
        header, rows = silo_rows(silo_index, c)
        write_table(folder / f"client_{c:02d}{FORMAT_EXTENSIONS[fmt]}", fmt, header, rows)
    return folder


def _write_blanks(root: Path, silo_index: int) -> Path:
    folder = root / f"blanks{silo_index}"
    for c, rows in enumerate(_with_blanks(silo_index)):
        fmt = FORMATS[(silo_index + c + 2) % len(FORMATS)]
        write_table(
            folder / f"client_{c:02d}{FORMAT_EXTENSIONS[fmt]}",
            fmt,
            ["age", "glucose"],
            [list(row) for row in rows],
        )
    return folder


@pytest.fixture(scope="module")
def format_federation(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("formats")
    with local_federation(amqp_url, root / "logs") as local:
        for i, name in enumerate(SILOS):
            data: dict[str, Path | str] = {
                fmt: write_silo_files(root, i, CLIENTS[i], fmt) for fmt in FORMATS
            }
            data["mixed"] = _write_mixed(root, i)
            data["blanks"] = f"{_write_blanks(root, i)}#missing=drop-row"
            # Under "partial", charlie's clients have no glucose column.
            header, rows = silo_rows(i, 0)
            keep = [c for c in header if c != "glucose" or name != "charlie"]
            data["partial"] = write_table(
                root / f"partial{i}.csv",
                "csv",
                keep,
                [[row[header.index(c)] for c in keep] for row in rows],
            )
            # Only alpha advertises its row counts.
            options = SiloOptions(extra_args=("--advertise-counts",) if name == "alpha" else ())
            local.start_silo(name, data=data, options=options)
        local.wait_ready(timeout=240)
        with started_context(amqp_url, local.federation, len(SILOS)) as context:
            context.federation = local.federation
            yield context


def _native_mean(native_context: Any, clients: list[list[tuple[int, float]]]) -> float:
    import tensorflow as tf

    datasets = [
        tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(
                age=np.array([a for a, _ in rows], np.int32).reshape(-1),
                glucose=np.array([g for _, g in rows], np.float32).reshape(-1),
            )
        )
        for rows in clients
    ]
    return float(run_in(native_context, mean_glucose, datasets))


def _direct_mean(clients: list[list[tuple[int, float]]]) -> float:
    # The silos cast to float32 first, as the element type asks.
    values = [g for rows in clients for _, g in rows]
    return float(np.mean(np.asarray(values, np.float32).astype(np.float64)))


ALL_CLIENTS = [rows for i in range(len(SILOS)) for rows in _clients(i)]


@pytest.mark.parametrize("key", [*FORMATS, "mixed"])
def test_federated_mean_equals_the_files_and_native_for_every_format(
    format_federation: Any, native_context: Any, key: str
) -> None:
    result = float(run_in(format_federation, mean_glucose, tff_amqp.silo_data(key)))
    np.testing.assert_allclose(result, _direct_mean(ALL_CLIENTS), rtol=1e-9)
    np.testing.assert_allclose(result, _native_mean(native_context, ALL_CLIENTS), rtol=1e-9)


def test_blank_cells_dropped_at_the_silos_as_if_the_rows_were_absent(
    format_federation: Any, native_context: Any
) -> None:
    kept = [
        [(a, g) for a, g in rows if g is not None]
        for i in range(len(SILOS))
        for rows in _with_blanks(i)
    ]
    assert sum(map(len, kept)) < sum(map(len, ALL_CLIENTS))  # some rows were blank
    result = float(run_in(format_federation, mean_glucose, tff_amqp.silo_data("blanks")))
    np.testing.assert_allclose(result, _direct_mean(kept), rtol=1e-9)
    np.testing.assert_allclose(result, _native_mean(native_context, kept), rtol=1e-9)


def test_a_column_a_cohort_silo_lacks_is_refused_before_any_work_is_sent(
    format_federation: Any,
) -> None:
    link = format_federation.runtime.link
    published = link.stats["published"]
    with pytest.raises(MissingColumnError) as error:
        run_in(format_federation, mean_glucose, tff_amqp.silo_data("partial"))
    message = str(error.value)
    assert "silo 'charlie' has no column 'glucose' under data key 'partial'" in message
    assert "alpha" not in message and "bravo" not in message
    assert link.stats["published"] == published  # not one request left the coordinator
    # The federation keeps serving.
    result = float(run_in(format_federation, mean_glucose, tff_amqp.silo_data("csv")))
    np.testing.assert_allclose(result, _direct_mean(ALL_CLIENTS), rtol=1e-9)


def test_status_shows_each_silos_columns_and_counts_only_where_advertised(
    format_federation: Any, amqp_url: str
) -> None:
    import asyncio

    from tff_amqp.status import format_table, observe

    seen = asyncio.run(observe(amqp_url, format_federation.federation, window=2.5))
    table = format_table(seen, format_federation.federation, 2.5)
    alpha_rows = sum(len(rows) for rows in _clients(0))
    for fmt in FORMATS:
        # TFRecord features have no order: they are listed by name.
        columns = (
            "age int, glucose float, notes str, patient str"
            if fmt == "tfrecord"
            else "patient str, age int, glucose float, notes str"
        )
        assert f"alpha {fmt}: {columns} ({alpha_rows} rows)\n" in table, table
        assert f"bravo {fmt}: {columns}\n" in table, table
    assert "charlie partial: patient str, age int, notes str" in table
    # Kinds and names only: no cell value reaches the status.
    for value in (glucose for rows in _clients(0) for _, glucose in rows):
        assert f"{value}" not in table
